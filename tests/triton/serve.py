"""A real NVIDIA Triton Inference Server for vigil's remote-inference tests and bench.

PyPI's nvidia-pytriton starts the tritonserver binary it carries and binds a Python function
to a model name; the function runs the ONNX model with onnxruntime. The server speaks the Open
Inference Protocol (KServe v2) on its gRPC port, like any Triton deployment.

    serve.py --model models/efficientnet-lite0.onnx --grpc-port 8001 --http-port 8000 \
             --metrics-port 8002 [--name efficientnet-lite0] [--classes 1000] [--max-batch 16]

--classes N declares the scores output with N classes (a model whose metadata do not match
its manifest when N differs from the labels' count).
"""

import argparse
import signal

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="efficientnet-lite0")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--embedding", type=int, default=1280)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    args = p.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])

    @batch
    def infer(input):
        logits, embedding = session.run(["logits", "embedding"], {"input": input})
        return {"logits": logits, "embedding": embedding}

    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(3, 224, 224))],
            outputs=[
                Tensor(name="logits", dtype=np.float32, shape=(args.classes,)),
                Tensor(name="embedding", dtype=np.float32, shape=(args.embedding,)),
            ],
            config=ModelConfig(max_batch_size=args.max_batch),
            strict=False,
        )
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        triton.serve()


if __name__ == "__main__":
    main()
