#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library from its official PyPI wheel (a zip) into DEST and
# links DEST/libonnxruntime.so to it. Idempotent.
#   scripts/fetch-onnxruntime.sh DEST [WHEEL] [VERSION]
#   WHEEL: onnxruntime (CPU, default) or onnxruntime-gpu (CUDA 12 build)
set -euo pipefail
dest=$1
wheel=${2:-onnxruntime}
version=${3:-1.31.1}
if [ -e "$dest/libonnxruntime.so" ] && [ "$(cat "$dest/VERSION" 2>/dev/null)" = "$wheel==$version" ]; then
  exit 0
fi
echo "[setup] fetching $wheel $version from PyPI into $dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$wheel==$version"
python3 - "$dest" "$tmp"/*.whl <<'PY'
import os, shutil, sys, zipfile
dest, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    libs = [n for n in z.namelist() if "/capi/" in n and os.path.basename(n).startswith("libonnxruntime")]
    for n in libs:
        with z.open(n) as src, open(os.path.join(dest, os.path.basename(n)), "wb") as out:
            shutil.copyfileobj(src, out)
main = [os.path.basename(n) for n in libs if os.path.basename(n).startswith("libonnxruntime.so.")]
if not main:
    sys.exit(f"no libonnxruntime.so.* in {wheel}")
os.symlink(main[0], os.path.join(dest, "libonnxruntime.so"))
PY
echo "$wheel==$version" > "$dest/VERSION"
