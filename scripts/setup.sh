#!/usr/bin/env bash
# Installs what vigil needs to build, run its demo and run its tests, on Debian 12. Idempotent:
# each step is skipped when its result is already there.
#   1. Debian packages (GStreamer, OpenCV, clang, mosquitto, ...)
#   2. the ONNX Runtime shared library, from the official PyPI wheel, into .deps/onnxruntime/
#   3. test and demo fixtures (OpenCV's sample photos and clip) into fixtures/
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION="${ORT_VERSION:-1.31.1}"
ORT_WHEEL="${ORT_WHEEL:-onnxruntime}"   # onnxruntime-gpu for the CUDA build
PACKAGES=(
  chromium chromium-driver systemd
  pkg-config clang libclang-dev
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools gstreamer1.0-rtsp
  libopencv-dev opencv-doc mosquitto mosquitto-clients python3-pip python3-venv openssl
  protobuf-compiler
)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages.
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Rust: edition 2024 needs a recent toolchain (Debian's cargo is too old).
if ! command -v cargo >/dev/null 2>&1; then
  say "cargo not found: install Rust 1.95 or newer (https://rustup.rs), then run this again" >&2
  exit 1
fi
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$rustc_minor" -lt 95 ]; then
  say "rustc $(rustc --version) is too old: vigil needs 1.95 or newer (rustup update)" >&2
  exit 1
fi

# 2. ONNX Runtime, from the official wheel: only its shared library is kept.
./scripts/fetch-onnxruntime.sh .deps/onnxruntime "$ORT_WHEEL" "$ORT_VERSION"
ort_dir=.deps/onnxruntime

# 3. Fixtures, from OpenCV's samples (Debian package opencv-doc).
samples=/usr/share/doc/opencv-doc/examples/data
mkdir -p fixtures
for f in squirrel_cls.jpg orange.jpg butterfly.jpg baboon.jpg chicky_512.png fruits.jpg messi5.jpg box.png home.jpg; do
  [ -e "fixtures/$f" ] || cp "$samples/$f" fixtures/
done
if [ ! -e fixtures/vtest.avi ]; then
  if [ -e "$samples/vtest.avi" ]; then cp "$samples/vtest.avi" fixtures/
  elif [ -e "$samples/vtest.avi.gz" ]; then gunzip -c "$samples/vtest.avi.gz" > fixtures/vtest.avi
  fi
fi
# photos.mp4: 3 s each of squirrel, orange, baboon and Pekinese (chicky_512), 640x480 H.264 at
# 25 fps: a "camera" whose right answers are known (frames 0-74, 75-149, 150-224, 225-299).
# Without B-frames: with them, libav decoding on one thread cannot decode the B-frame before
# the last cut ("co located POCs unavailable") and skips it, and tests that count every frame
# would depend on the decoder's threads (tests/classify.rs checks that skip on its own clip).
# The marker file says which recipe made it; an older one is made again.
photos_recipe="v2 bframes=0"
if [ "$(cat fixtures/.photos-recipe 2>/dev/null)" != "$photos_recipe" ]; then
  rm -f fixtures/photos.mp4
fi
if [ ! -e fixtures/photos.mp4 ]; then
  say "making fixtures/photos.mp4"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir "$work/frames"
  n=0
  for img in squirrel_cls.jpg orange.jpg baboon.jpg chicky_512.png; do
    gst-launch-1.0 -q filesrc location="fixtures/$img" ! decodebin ! videoconvert ! videoscale \
      ! video/x-raw,width=640,height=480,pixel-aspect-ratio=1/1 ! jpegenc quality=95 \
      ! filesink location="$work/$img.jpg"
    for _ in $(seq 75); do
      ln -s "../$img.jpg" "$work/frames/$(printf %04d $n).jpg"
      n=$((n + 1))
    done
  done
  gst-launch-1.0 -q multifilesrc location="$work/frames/%04d.jpg" index=0 caps=image/jpeg,framerate=25/1 \
    ! jpegdec ! videoconvert ! x264enc speed-preset=fast key-int-max=25 bframes=0 ! mp4mux \
    ! filesink location=fixtures/photos.mp4.part
  mv fixtures/photos.mp4.part fixtures/photos.mp4
  echo "$photos_recipe" > fixtures/.photos-recipe
fi
# 4. The deployment files' checker (tests/deploy.rs): Kubernetes manifests validated offline
# against the API's schemas, which the package carries.
if [ ! -x .deps/tools-venv/bin/kubernetes-validate ]; then
  say "installing kubernetes-validate into .deps/tools-venv"
  python3 -m venv .deps/tools-venv
  .deps/tools-venv/bin/pip install -q kubernetes-validate==1.37.0
fi
# 5. A real Triton Inference Server for the remote-inference tests and bench (tests/remote.rs,
# benches/remote.py): PyPI's nvidia-pytriton carries the tritonserver binary, which serves a Python
# function running the model with onnxruntime. Debian's own python3 (a pyenv-built one fails
# when the model loads).
if [ ! -x .deps/triton/bin/python ] || ! .deps/triton/bin/python -c "import pytriton" 2>/dev/null; then
  say "installing nvidia-pytriton into .deps/triton"
  rm -rf .deps/triton
  /usr/bin/python3 -m venv .deps/triton
  .deps/triton/bin/pip install -q nvidia-pytriton==0.7.0 "onnxruntime==$ORT_VERSION" numpy
fi
say "ready: ONNX Runtime in $ort_dir, fixtures in fixtures/"
