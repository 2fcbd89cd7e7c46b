"""Reference A in Python: bare onnxruntime throughput of a model per batch size.

    python benches/ort_python.py MODEL.onnx [--batches 1,4,8,16,32] [--seconds 3]

Prints one JSON object per batch size: {"batch": 8, "images_per_s": ...}.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--batches", default="1,4,8,16,32")
p.add_argument("--seconds", type=float, default=3.0)
args = p.parse_args()

session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
rng = np.random.default_rng(0)
for batch in [int(b) for b in args.batches.split(",")]:
    x = rng.uniform(-1, 1, size=(batch, 3, 224, 224)).astype(np.float32)
    for _ in range(3):
        session.run(None, {name: x})
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        session.run(None, {name: x})
        runs += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"batch": batch, "images_per_s": runs * batch / elapsed}), flush=True)
