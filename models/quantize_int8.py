#!/usr/bin/env python3
"""Make efficientnet-lite0.int8.onnx: static INT8 (QDQ) quantization of efficientnet-lite0.onnx.

Steps (defaults = the settings chosen by measurement, see evaluate_int8.py):
  1. onnxruntime.quantization.shape_inference.quant_pre_process: shape inference and
     ORT's basic graph optimizations; this folds the 17 TF-"SAME" Pad subgraphs of the
     export into the Convs, leaving Conv/Clip/Add/GlobalAveragePool/Reshape/Gemm.
  2. Calibration on real frames only: the calibration half of the OpenCV sample photos
     and of every 5th frame of the sample videos (split and preprocessing from
     evaluate_int8.py, the same as vigil's), in a fixed order, one intra-op thread,
     so that a rerun gives the same ranges and the same file.
  3. onnxruntime.quantization.quantize_static: QuantFormat.QDQ, MinMax ranges, weights
     QInt8 symmetric per output channel, activations QUInt8 (asymmetric), except:
       * --keep-float (default: the stem Conv and block 0, whose weights cost the most
         accuracy in INT8, for ~5% of the multiply-adds) stays float;
       * the final Gemm's output, the logits, is not quantized
         (OpTypesToExcludeOutputQuantization): 8-bit logits clip at the calibrated
         maximum, so two classes of a confident frame can come out tied.
  4. Bias correction (--bias-correction, default on): per-channel INT8 weights shift
     each Conv's mean output, and ReLU6 turns the shift into error that piles up
     through the network. For every Conv/Gemm with quantized weights W_q:
       bias += (W - W_q) . E[x]
     with E[x] the mean of the layer's float input per channel over the calibration
     frames; then quantize_static again with the same ranges (W_q is unchanged, only
     the bias moves).
  5. Checks: a single file (no external data), input "input" [batch,3,224,224] with the
     dynamic batch axis, outputs "logits" [batch,1000] and "embedding" [batch,1280] (the
     pooled features, as 8-bit values dequantized: exactly what the INT8 Gemm reads),
     batch 3 == 3 x batch 1 for both outputs, and no
     float Conv/Gemm that onnxruntime's WeightBiasQuantization would quantize per
     tensor at load time (it does that to a Conv whose input comes from a
     DequantizeLinear and whose output, directly or through Relu/Clip, goes to a
     QuantizeLinear: a lone float depthwise Conv between quantized layers ends up with
     per-tensor INT8 weights, worse than leaving it quantized per channel).

Usage, from the repository root (venv with onnxruntime==1.31.1, onnx, numpy,
opencv-python-headless):
  <venv>/bin/python models/quantize_int8.py [--fp32 models/efficientnet-lite0.onnx]
      [--out models/efficientnet-lite0.int8.onnx] [--image-dir DIR] [--clip VIDEO ...]
  <venv>/bin/python models/evaluate_int8.py
Options for experiments: --method, --percentile, --activations, --keep-float,
--quantize-logits, --no-bias-correction, --calib-cache (see --help).
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate_int8 as ev  # noqa: E402  (preprocessing and data sets live there)

DEFAULT_OUT = os.path.join(ev.HERE, "efficientnet-lite0.int8.onnx")
CALIB_FRAME_STEP = 5
# Node-name prefixes in the pre-processed graph: the stem Conv, and block 0's depthwise
# and projection Convs (block 0 has no expansion Conv).
DEFAULT_KEEP_FLOAT = ["/_conv_stem/", "/_blocks.0/"]


def calibration_reader(xs):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i, self.end = 0, len(xs)

        def get_next(self):
            if self.i >= self.end:
                return None
            x = xs[self.i][None]
            self.i += 1
            return {ev.INPUT: x}

        def __len__(self):
            return len(xs)

        def set_range(self, start_index, end_index):  # used with CalibStridedMinMax
            self.i, self.end = start_index, end_index

    return Reader()


def limit_calibration_threads(threads):
    """quantize_static's calibration session uses every core; give it `threads`."""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    def create_inference_session(self):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.infer_session = ort.InferenceSession(
            self.augmented_model_path, sess_options=so, providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session


def matching_nodes(model, prefixes):
    names = []
    for p in prefixes:
        hit = [n.name for n in model.graph.node
               if n.op_type in ("Conv", "Gemm") and n.name.startswith(p)]
        if not hit:
            sys.exit(f"--keep-float {p}: no Conv/Gemm node name starts with it")
        names.extend(hit)
    return sorted(set(names))


# ---------------------------------------------------------------------------- bias correction

def dequantized_weights(qmodel):
    """{node name: float weights as the QDQ model computes them} for Conv/Gemm nodes
    whose weight comes from a DequantizeLinear of an initializer."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    out = {}
    for n in qmodel.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        dq = producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
              if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis] = -1
        out[n.name] = (q - zp.reshape(shape)) * scale.reshape(shape)
    return out


def input_channel_means(model_path, tensors, xs, threads, batch=8):
    """Mean of each tensor per channel (axis 1) over the frames and all positions."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(model_path)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                          for t in tensors if t not in known)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    total = {t: 0.0 for t in tensors}
    for i in range(0, len(xs), batch):
        outs = sess.run(tensors, {ev.INPUT: np.stack(xs[i:i + batch])})
        for t, o in zip(tensors, outs):
            o = o.astype(np.float64)
            total[t] = total[t] + (o.mean(axis=(2, 3)) if o.ndim == 4 else o).sum(axis=0)
    return {t: total[t] / len(xs) for t in tensors}


def bias_correct(float_path, qdq_path, xs, out_path, threads):
    """Write float_path with bias += (W - W_q) . E[x] for the Conv/Gemm nodes whose
    weights qdq_path quantizes; returns how many nodes were corrected."""
    import onnx
    from onnx import numpy_helper

    fm = onnx.load(float_path)
    wq = dequantized_weights(onnx.load(qdq_path))
    inits = {t.name: t for t in fm.graph.initializer}
    nodes = [n for n in fm.graph.node
             if n.name in wq and len(n.input) > 2 and n.input[2] in inits and n.input[1] in inits]
    means = input_channel_means(float_path, sorted({n.input[0] for n in nodes}), xs, threads)
    for n in nodes:
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        dw = w - wq[n.name]
        mu = means[n.input[0]]
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            per_out = dw.sum(axis=(2, 3))                 # [out, in/group]
            out_ch, in_per_group = per_out.shape
            mu_g = mu.reshape(group, in_per_group)        # input channels of each group
            g_of_out = np.arange(out_ch) // (out_ch // group)
            delta = (per_out * mu_g[g_of_out]).sum(axis=1)
        else:  # Gemm: y = x W^T + b (transB=1) or x W + b
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            delta = dw @ mu if trans_b else mu @ dw
        b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        inits[n.input[2]].CopyFrom(numpy_helper.from_array((b + delta).astype(np.float32),
                                                           n.input[2]))
    onnx.save(fm, out_path)
    return len(nodes)


# ---------------------------------------------------------------------------- checks

def float_nodes_requantized_by_ort(model):
    """Float-weight Conv/Gemm nodes that onnxruntime's WeightBiasQuantization (graph
    optimization level 1) would give per-tensor INT8 weights when the model is loaded."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name for t in model.graph.initializer}
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or n.input[1] not in inits:
            continue
        p = producer.get(n.input[0])
        if p is None or p.op_type != "DequantizeLinear":
            continue
        cur = n
        while True:
            c = consumers.get(cur.output[0], [])
            if len(c) != 1:
                break
            if c[0].op_type == "QuantizeLinear":
                bad.append(n.name)
                break
            if c[0].op_type not in ("Relu", "Clip"):
                break
            cur = c[0]
    return bad


def check_output(path, fp32_path, keep_float):
    import onnx
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(m)
    if any(uses_external_data(t) for t in m.graph.initializer):
        sys.exit(f"{path}: uses external data")

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ins = [(i.name, dims(i)) for i in m.graph.input]
    outs = [(o.name, dims(o)) for o in m.graph.output]
    want_outs = [(o.name, dims(o)) for o in onnx.load(fp32_path, load_external_data=False).graph.output]
    if ins != [(ev.INPUT, ["batch", 3, ev.SIZE, ev.SIZE])] or outs != want_outs:
        sys.exit(f"{path}: unexpected inputs {ins} / outputs {outs} (want the FP32 model's "
                 f"{want_outs})")
    bad = float_nodes_requantized_by_ort(m)
    if bad:
        sys.exit(f"{path}: onnxruntime would quantize these float nodes per tensor at load time: "
                 f"{bad}; keep their neighbours float too (see --keep-float)")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=(3, 3, ev.SIZE, ev.SIZE)).astype(np.float32)
    sess = ev.session(path)
    names = [o for o, _ in outs]
    batched = sess.run(names, {ev.INPUT: x})
    singles = [sess.run(names, {ev.INPUT: x[i:i + 1]}) for i in range(3)]
    diff = 0.0
    for k, (name, want) in enumerate(outs):
        one = np.concatenate([s[k] for s in singles])
        if batched[k].shape != (3, want[1]):
            sys.exit(f"{path}: output {name} has shape {batched[k].shape} for a batch of 3")
        diff = max(diff, float(np.abs(batched[k] - one).max()))
    if diff > 1e-3:
        sys.exit(f"{path}: batch 3 differs from 3 x batch 1 (max abs diff {diff})")
    counts = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print(f"checked {path}: opset {m.opset_import[0].version}, inputs {ins}, outputs {outs}, "
          f"single file, batch 3 == 3 x batch 1 (max diff {diff:.2g}), float nodes: {keep_float}")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"size: {os.path.getsize(path)} bytes (fp32 {os.path.getsize(fp32_path)} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", default=ev.DEFAULT_FP32, help="(default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="(default: %(default)s)")
    ap.add_argument("--image-dir", default=ev.DEFAULT_IMAGE_DIR, help="(default: %(default)s)")
    ap.add_argument("--clip", action="append", default=None,
                    help="video (repeatable; default: " + " ".join(ev.DEFAULT_CLIPS) + ")")
    ap.add_argument("--frame-step", type=int, default=CALIB_FRAME_STEP,
                    help="calibrate on every N-th clip frame (default: %(default)s)")
    ap.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                    help="calibration method (default: %(default)s)")
    ap.add_argument("--percentile", type=float, default=99.99,
                    help="for --method percentile (default: %(default)s)")
    ap.add_argument("--activations", choices=["quint8", "qint8"], default="quint8",
                    help="activation type (default: %(default)s); weights are always qint8")
    ap.add_argument("--keep-float", nargs="*", default=DEFAULT_KEEP_FLOAT, metavar="PREFIX",
                    help="Conv/Gemm nodes whose name starts with one of these stay float "
                         "(default: %(default)s)")
    ap.add_argument("--quantize-logits", action="store_true",
                    help="also quantize the Gemm output (the logits)")
    ap.add_argument("--no-bias-correction", action="store_true")
    ap.add_argument("--calib-cache", default=None,
                    help="JSON calibration cache, reused when present (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for calibration and bias correction (default: %(default)s)")
    args = ap.parse_args()

    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    limit_calibration_threads(args.threads)
    samples = ev.load_samples(args.image_dir, args.clip, args.frame_step, views=False)
    xs = [s.x for s in samples if s.split == "calib"]
    print(f"calibrating on {len(xs)} frames "
          f"({sum(s.split == 'calib' and s.set == 'photos' for s in samples)} photos)")

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.method]
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    # Not CalibMaxIntermediateOutputs: in onnxruntime 1.31.1 MinMaxCalibrater throws away
    # every full chunk of outputs without reducing it (only the last partial chunk
    # counts), and the histogram calibraters ignore it. The histogram methods keep every
    # activation of every frame in memory, so they get CalibStridedMinMax (calibrate in
    # slices, merge the histograms) instead.
    if args.method != "minmax":
        extra["CalibStridedMinMax"] = max(d for d in range(1, 17) if len(xs) % d == 0)
        extra["CalibTensorRangeSymmetric"] = False
    if args.method == "percentile":
        extra["CalibPercentile"] = args.percentile
    if not args.quantize_logits:
        extra["OpTypesToExcludeOutputQuantization"] = ["Gemm"]

    with tempfile.TemporaryDirectory(prefix="quantize_int8.") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(args.fp32, pre)
        keep_float = matching_nodes(onnx.load(pre), args.keep_float)
        cache = args.calib_cache or os.path.join(tmp, "calibration.json")

        def quantize(src, dst, reader):
            quantize_static(
                src, dst, reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,  # this CPU has AVX512-VNNI: no u8s8 saturation to avoid
                activation_type=(QuantType.QUInt8 if args.activations == "quint8"
                                 else QuantType.QInt8),
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_float,
                calibrate_method=method,
                extra_options=extra,
                calibration_cache_path=cache,
            )

        if args.no_bias_correction:
            quantize(pre, args.out, calibration_reader(xs))
        else:
            first = os.path.join(tmp, "first.onnx")
            quantize(pre, first, calibration_reader(xs))
            corrected = os.path.join(tmp, "pre_bias_corrected.onnx")
            n = bias_correct(pre, first, xs, corrected, args.threads)
            print(f"bias correction: {n} Conv/Gemm biases adjusted")
            quantize(corrected, args.out, None)  # same ranges, from the cache
    print(f"wrote {args.out}")
    check_output(args.out, args.fp32, keep_float)


if __name__ == "__main__":
    main()
