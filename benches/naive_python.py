"""Reference C: what users write by hand. An OpenCV VideoCapture loop that preprocesses each frame
and calls onnxruntime once per frame (batch 1), on one video file.

    python benches/naive_python.py MODEL.onnx VIDEO [--frames N]

Prints {"frames": ..., "seconds": ..., "fps": ...}.
"""
import argparse
import json
import time

import cv2
import numpy as np
import onnxruntime as ort

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("video")
p.add_argument("--frames", type=int, default=0, help="stop after N frames (0: all)")
args = p.parse_args()

session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
cap = cv2.VideoCapture(args.video)
frames = 0
start = time.perf_counter()
while True:
    ok, frame = cap.read()
    if not ok:
        break
    h, w = frame.shape[:2]
    side = int(round(0.875 * min(h, w)))
    y, x = (h - side) // 2, (w - side) // 2
    crop = cv2.resize(frame[y : y + side, x : x + side], (224, 224), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32)
    tensor = ((rgb - 127.0) / 128.0).transpose(2, 0, 1)[None]
    logits = session.run(None, {name: tensor})[0]
    int(np.argmax(logits))
    frames += 1
    if args.frames and frames >= args.frames:
        break
elapsed = time.perf_counter() - start
print(json.dumps({"frames": frames, "seconds": elapsed, "fps": frames / elapsed}))
