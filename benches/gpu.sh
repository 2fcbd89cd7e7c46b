#!/usr/bin/env bash
# The inference benchmark on a GPU machine. Needs only Rust and the CUDA build of ONNX Runtime
# (PyPI wheel onnxruntime-gpu, CUDA 12 / cuDNN 9 on the machine or on LD_LIBRARY_PATH); no
# GStreamer, no OpenCV. Prints images/s per batch size for FP32 and FP16 on CUDA (and TensorRT
# with PROVIDERS="cuda tensorrt"), and checks each against the CPU on the same batch.
#   benches/gpu.sh            (ORT_DYLIB_PATH=... to use a library already on the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ./scripts/fetch-onnxruntime.sh .deps/onnxruntime-gpu onnxruntime-gpu "${ORT_VERSION:-1.31.1}"
  export ORT_DYLIB_PATH=$PWD/.deps/onnxruntime-gpu/libonnxruntime.so
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cargo build --release -p vigil-engine --bin engine-bench
for provider in ${PROVIDERS:-cuda}; do
  ./target/release/engine-bench --provider "$provider" --variant fp32 --variant fp16 \
    --batches 1,4,8,16,32,64 --seconds "${SECONDS_PER_BATCH:-3}" --compare-cpu
done
