#!/usr/bin/env python3
"""Make efficientnet-lite0.fp16.onnx: the FP32 model with FP16 weights and activations, for GPUs.

Steps:
  1. onnxconverter_common.float16.convert_float_to_float16 on efficientnet-lite0.onnx with
       * keep_io_types=True: input "input" and outputs "logits" and "embedding" stay float32
         (vigil feeds and reads float32); a Cast to float16 follows the input, a Cast to
         float32 ends each output;
       * min_positive_val=0, max_finite_val=65504: plain IEEE round-to-nearest of the
         weights (the defaults, 1e-7 and 1e4, would push weights below 1e-7, down to 1e-11
         here, up to +-1e-7 instead of rounding them; no weight comes near 1e4).
     The int64 shape arithmetic of the TF-"SAME" Pad subgraphs stays int64.
  2. The Shape node that reads the batch size gets the float32 input back (the converter
     gives it a Cast of its own, a full-size cast only to read a shape), and the Gemm reads
     the float16 embedding (the converter would give it the float32 graph output).
  3. Checks: onnx.checker (full_check), a single file (no external data), no float32
     initializer left, input "input" float32 [batch,3,224,224] and the FP32 model's outputs
     ("logits" float32 [batch,1000], "embedding" float32 [batch,1280]) with the dynamic batch
     axis, and a second conversion in the same run gives the same bytes (the file is
     deterministic).
  4. Unless --no-eval: FP16 vs FP32 with onnxruntime's CPU provider (intra_op_num_threads
     --threads, default 1; the CPU provider runs float16 nodes it has no kernel for through
     inserted Casts, so this checks the numbers, not GPU speed) on the OpenCV sample photos
     and every --frame-step'th frame of the sample clips, preprocessed as vigil does it
     (preprocessing and data sets from evaluate_int8.py). Table per set: frames, top-1
     agreement on all frames and on the confident ones (FP32 top-1 probability >= --conf),
     max |probability difference| over all 1000 classes, max |logit difference|; then the
     cosine similarity of FP16's embedding to FP32's per set (mean, min). Also batch 3 ==
     3 x batch 1 for the FP16 model, both outputs.
     Exit status 1 when a confident frame's top-1 differs, the max probability difference
     exceeds --max-prob-diff (default 0.03; measured: ~0.01, 0.0126 with --views) or an
     embedding's cosine similarity is below --min-cosine (default 0.999).
  5. --speed: CPU images/s of FP32 and FP16 at batch 8 (--speed-threads, default 1;
     --speed-seconds each, default 2), for information only: FP16 is meant for GPUs.

Usage, from the repository root (venv with onnx, onnxruntime, numpy,
opencv-python-headless, as for evaluate_int8.py, plus onnxconverter-common):
  <venv>/bin/pip install onnxconverter-common==1.16.0
  <venv>/bin/python models/convert_fp16.py [--fp32 models/efficientnet-lite0.onnx]
      [--out models/efficientnet-lite0.fp16.onnx] [--image-dir DIR] [--clip VIDEO ...]
      [--frame-step 5] [--views] [--speed] [--no-eval]
  <venv>/bin/python models/convert_fp16.py --check [--speed]
      (writes nothing: the existing --out must equal a fresh conversion, then step 4)
Made and checked with onnx 1.23.2, onnxconverter-common 1.16.0, onnxruntime 1.31.1.
"""

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate_int8 as ev  # noqa: E402  (preprocessing and data sets live there)

DEFAULT_OUT = os.path.join(ev.HERE, "efficientnet-lite0.fp16.onnx")
DEFAULT_FRAME_STEP = 5  # ~290 frames of the 4 default clips
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------- conversion

def convert(fp32_path):
    """The FP16 model (ModelProto) made from the FP32 file."""
    import onnx
    from onnx import TensorProto
    from onnxconverter_common import float16

    model = onnx.load(fp32_path)
    m16 = float16.convert_float_to_float16(model, min_positive_val=0.0, max_finite_val=FP16_MAX,
                                           keep_io_types=True)
    g = m16.graph

    # Shape only reads the shape: let it read the tensor a Cast node casts.
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] in producer \
                and producer[n.input[0]].op_type == "Cast":
            n.input[0] = producer[n.input[0]].input[0]
    # A graph output the graph also reads (the embedding is the Gemm's input): the converter
    # makes the readers take the float32 output its Cast makes; give them the float16 tensor.
    outputs = {o.name for o in g.output}
    for cast in [n for n in g.node if n.op_type == "Cast" and n.output[0] in outputs]:
        for n in g.node:
            if n is not cast:
                for k, name in enumerate(n.input):
                    if name == cast.output[0]:
                        n.input[k] = cast.input[0]
    # Drop the Cast nodes nothing reads any more, and their value_info.
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        gone = {o for n in dead for o in n.output}
        for n in dead:
            g.node.remove(n)
        for vi in [vi for vi in g.value_info if vi.name in gone]:
            g.value_info.remove(vi)

    assert all(t.data_type != TensorProto.FLOAT for t in g.initializer)
    return m16


def check_structure(m16, fp32_outputs):
    """Raises (onnx.checker) or exits on anything vigil would not accept; the outputs must be
    the FP32 model's (`fp32_outputs`, float32, same names and shapes)."""
    import onnx
    from onnx import TensorProto

    onnx.checker.check_model(m16, full_check=True)
    g = m16.graph
    problems = []
    if any(t.data_location == TensorProto.EXTERNAL for t in g.initializer):
        problems.append("initializers stored as external data")
    f32 = [t.name for t in g.initializer if t.data_type == TensorProto.FLOAT]
    if f32:
        problems.append(f"float32 initializers left: {f32[:5]}")
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                problems.append(f"float32 constant left in {node.name}")

    def sig(vi):
        tt = vi.type.tensor_type
        return (vi.name, tt.elem_type, [d.dim_param or d.dim_value for d in tt.shape.dim])

    want_in = (ev.INPUT, TensorProto.FLOAT, ["batch", 3, ev.SIZE, ev.SIZE])
    want_out = [sig(v) for v in fp32_outputs]
    if [sig(v) for v in g.input] != [want_in]:
        problems.append(f"inputs {[sig(v) for v in g.input]}, want {[want_in]}")
    if [sig(v) for v in g.output] != want_out:
        problems.append(f"outputs {[sig(v) for v in g.output]}, want {want_out}")
    if problems:
        sys.exit("bad FP16 model: " + "; ".join(problems))
    casts = [n for n in g.node if n.op_type == "Cast"
             and n.attribute[0].i in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    print(f"structure: ok ({len(g.node)} nodes, {len(g.initializer)} float16 initializers, "
          f"{len(casts)} float Casts: {', '.join(n.name for n in casts)})")


# ---------------------------------------------------------------------------- evaluation

def compare(fp32, fp16, samples, conf, labels, threads):
    """Prints the tables; returns (confident frames whose top-1 differs, max |dp|, lowest
    embedding cosine similarity or None when the models have no embedding)."""
    xs = [s.x for s in samples]
    z32, e32 = ev.run_outputs(ev.session(fp32, threads), xs)
    s16 = ev.session(fp16, threads)
    z16, e16 = ev.run_outputs(s16, xs)
    p32, p16 = ev.softmax(z32.astype(np.float64)), ev.softmax(z16.astype(np.float64))
    agree = p32.argmax(1) == p16.argmax(1)
    confident = p32.max(1) >= conf
    dp = np.abs(p32 - p16).max(1)
    dz = np.abs(z32 - z16).max(1)

    print(f"\nFP16 vs FP32, onnxruntime CPU provider (confident: FP32 top-1 probability >= {conf:g})")
    print(f"{'set':<16}{'frames':>7}{'top-1 agree':>13}{'confident':>11}{'agree':>8}"
          f"{'max|dp|':>10}{'max|dlogit|':>13}")
    for label, pick in ev.groups(samples):
        m = np.array([pick(s) for s in samples])
        n, a = int(m.sum()), int((agree & m).sum())
        nc, ac = int((m & confident).sum()), int((agree & m & confident).sum())
        print(f"{label:<16}{n:7d}{a:7d} {ev.pct(a, n):>5}{nc:11d}{ev.pct(ac, nc):>8}"
              f"{dp[m].max():10.2e}{dz[m].max():13.2e}")

    bad = [i for i in range(len(samples)) if not agree[i]]
    for i in bad:
        a, b = p32[i].argmax(), p16[i].argmax()
        print(f"  top-1 differs: {samples[i].name:<24} fp32: {labels[a]} {p32[i, a]:.4f}, "
              f"{labels[b]} {p32[i, b]:.4f} | fp16: {labels[b]} {p16[i, b]:.4f}, "
              f"{labels[a]} {p16[i, a]:.4f}")

    min_cos = None
    if e32 is not None and e16 is not None:
        cos = ev.cosine(e32, e16)
        rows = [r for r in ev.embedding_rows(samples, cos) if r[1] == "all"]
        ev.print_embedding(rows, "FP16", e32.shape[1])
        min_cos = float(cos.min())
    check_batch(s16, xs)
    return int((~agree & confident).sum()), float(dp.max()), min_cos


def check_batch(s16, xs):
    """Dynamic batch axis: batch 3 gives what 3 runs of batch 1 give, for every output."""
    names = [o.name for o in s16.get_outputs()]
    x3 = np.stack(xs[:3])
    ones = [s16.run(names, {ev.INPUT: x3[i:i + 1]}) for i in range(3)]
    three = s16.run(names, {ev.INPUT: x3})
    diff = max(float(np.abs(np.concatenate([o[k] for o in ones]) - three[k]).max())
               for k in range(len(names)))
    dtypes = {str(t.dtype) for t in three}
    print(f"\nFP16 batch 3 vs 3 x batch 1 ({', '.join(names)}): max |diff| {diff:.2e}, "
          f"output dtypes {sorted(dtypes)}")
    if dtypes != {"float32"} or diff > 1e-2:
        sys.exit("FP16 model: batch 3 differs from 3 x batch 1, or an output is not float32")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", default=ev.DEFAULT_FP32, help="FP32 model (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="FP16 model (default: %(default)s)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing: --out must equal a fresh conversion; then evaluate")
    ap.add_argument("--no-eval", action="store_true", help="skip the FP16 vs FP32 comparison")
    ap.add_argument("--labels", default=ev.DEFAULT_LABELS, help="(default: %(default)s)")
    ap.add_argument("--image-dir", default=ev.DEFAULT_IMAGE_DIR,
                    help="photos, and where bare clip names are found (default: %(default)s)")
    ap.add_argument("--clip", action="append", default=None,
                    help="video (repeatable; default: " + " ".join(ev.DEFAULT_CLIPS) + ")")
    ap.add_argument("--frame-step", type=int, default=DEFAULT_FRAME_STEP,
                    help="use every N-th clip frame (default: %(default)s)")
    ap.add_argument("--views", action="store_true",
                    help="also the 6 extra views of each photo (see evaluate_int8.py)")
    ap.add_argument("--conf", type=float, default=0.3,
                    help="FP32 top-1 probability that makes a frame confident (default: %(default)s)")
    ap.add_argument("--max-prob-diff", type=float, default=0.03,
                    help="fail above this max |probability difference| (default: %(default)s)")
    ap.add_argument("--min-cosine", type=float, default=0.999,
                    help="fail when an embedding's cosine similarity to FP32's is below this "
                         "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for the comparison (default: %(default)s)")
    ap.add_argument("--speed", action="store_true", help="CPU images/s of FP32 and FP16 at batch 8")
    ap.add_argument("--speed-threads", type=int, default=1, help="(default: %(default)s)")
    ap.add_argument("--speed-seconds", type=float, default=2.0,
                    help="seconds per model (default: %(default)s)")
    args = ap.parse_args()

    if not os.path.exists(args.fp32):
        sys.exit(f"missing {args.fp32}")
    m16 = convert(args.fp32)
    data = m16.SerializeToString()
    if convert(args.fp32).SerializeToString() != data:
        sys.exit("two conversions gave different bytes")
    import onnx

    check_structure(m16, onnx.load(args.fp32, load_external_data=False).graph.output)
    digest = hashlib.sha256(data).hexdigest()
    old = open(args.out, "rb").read() if os.path.exists(args.out) else None
    if args.check:
        if old != data:
            sys.exit(f"{args.out} is missing or differs from a fresh conversion (sha256 {digest})")
        print(f"{args.out}: same bytes as a fresh conversion, {len(data)} bytes, sha256 {digest}")
    else:
        tmp = args.out + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.out)
        state = "unchanged" if old == data else ("replaced" if old is not None else "written")
        print(f"{args.out}: {state}, {len(data)} bytes, sha256 {digest}")

    failed = []
    if not args.no_eval:
        with open(args.labels, encoding="utf-8") as f:
            labels = [ln.rstrip("\n") for ln in f]
        samples = ev.load_samples(args.image_dir, args.clip, args.frame_step, views=args.views)
        flips, max_dp, min_cos = compare(args.fp32, args.out, samples, args.conf, labels,
                                         args.threads)
        if flips:
            failed.append(f"{flips} confident frame(s) with another top-1")
        if max_dp > args.max_prob_diff:
            failed.append(f"max |probability difference| {max_dp:.2e} > {args.max_prob_diff:g}")
        if min_cos is not None and min_cos < args.min_cosine:
            failed.append(f"embedding cosine similarity {min_cos:.5f} < {args.min_cosine:g}")

    if args.speed:
        # measure_speed() labels its second model "int8"; here that is the FP16 model.
        speed = ev.measure_speed(args.fp32, args.out, batches=(8,), seconds=args.speed_seconds,
                                 threads=args.speed_threads)
        f32, f16 = speed[("fp32", 8)], speed[("int8", 8)]
        print(f"\nCPU speed, batch 8, intra_op_num_threads={args.speed_threads}: fp32 {f32:.1f} "
              f"images/s, fp16 {f16:.1f} images/s ({f16 / f32:.2f}x; FP16 is meant for GPUs)")

    print(f"\nfile sizes: fp32 {os.path.getsize(args.fp32)} bytes, fp16 {len(data)} bytes")
    if failed:
        print("FAILED: " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
