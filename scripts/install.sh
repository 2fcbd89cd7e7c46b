#!/usr/bin/env bash
# Installs vigil: the binary, the models, the pipeline templates, the ONNX Runtime library, a
# config (never over an existing one) and a systemd unit.
#
#   scripts/install.sh [--prefix /usr/local] [--sysconfdir /etc/vigil] [--statedir /var/lib/vigil]
#                      [--unitdir /etc/systemd/system] [--no-build]
#
#   <prefix>/bin/vigil
#   <prefix>/share/vigil/{models,pipelines,README.md}
#   <prefix>/lib/vigil/libonnxruntime.so (+ the versioned file it points to)
#   <sysconfdir>/config.toml           (from deploy/config.toml.in, paths filled in)
#   <unitdir>/vigil.service            (from deploy/systemd/vigil.service.in)
#
# Then: systemctl daemon-reload && systemctl enable --now vigil
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr/local
SYSCONFDIR=/etc/vigil
STATEDIR=/var/lib/vigil
UNITDIR=/etc/systemd/system
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --sysconfdir) SYSCONFDIR="$2"; shift 2 ;;
    --statedir) STATEDIR="$2"; shift 2 ;;
    --unitdir) UNITDIR="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
BINDIR="$PREFIX/bin"
DATADIR="$PREFIX/share/vigil"
LIBDIR="$PREFIX/lib/vigil"
say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

if [ "$BUILD" = 1 ]; then
  ./scripts/setup.sh
  cargo build --release
fi
[ -x target/release/vigil ] || { echo "install.sh: target/release/vigil is missing (build first)" >&2; exit 1; }
ORT=.deps/onnxruntime
[ -e "$ORT/libonnxruntime.so" ] || { echo "install.sh: $ORT/libonnxruntime.so is missing (run make setup)" >&2; exit 1; }

fill() {
  sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@DATADIR@|$DATADIR|g" -e "s|@LIBDIR@|$LIBDIR|g" \
      -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" -e "s|@STATEDIR@|$STATEDIR|g" "$1"
}

say "binary in $BINDIR, models and pipelines in $DATADIR, ONNX Runtime in $LIBDIR"
install -d "$BINDIR" "$DATADIR/models" "$DATADIR/pipelines" "$LIBDIR" "$SYSCONFDIR" "$UNITDIR"
install -m 0755 target/release/vigil "$BINDIR/vigil"
install -m 0644 models/*.onnx models/*.toml models/*.txt "$DATADIR/models/"
install -m 0644 pipelines/*.gst "$DATADIR/pipelines/"
install -m 0644 README.md "$DATADIR/README.md"
cp -P "$ORT"/libonnxruntime.so* "$ORT"/libonnxruntime_providers_shared.so "$LIBDIR/"
if [ -e "$SYSCONFDIR/config.toml" ]; then
  say "$SYSCONFDIR/config.toml exists: left as it is"
else
  fill deploy/config.toml.in > "$SYSCONFDIR/config.toml"
  chmod 0644 "$SYSCONFDIR/config.toml"
  say "config in $SYSCONFDIR/config.toml"
fi
fill deploy/systemd/vigil.service.in > "$UNITDIR/vigil.service"
chmod 0644 "$UNITDIR/vigil.service"
say "unit in $UNITDIR/vigil.service: systemctl daemon-reload && systemctl enable --now vigil"
