#!/usr/bin/env python3
"""Compare efficientnet-lite0.int8.onnx with the FP32 model: top-1 agreement, embedding and speed.

Agreement: both models run on the same real inputs, preprocessed exactly as vigil does
it (efficientnet-lite0.toml); a frame "agrees" when the INT8 top-1 class is the FP32
top-1 class. It is reported on every frame and on the "confident" frames, those where
FP32's top-1 softmax probability is >= --conf (default 0.3), for three sets:
  * photos: every image in IMAGE_DIR that OpenCV reads (Debian opencv-doc's samples:
    ~90 photos, drawings, charts, chessboards, text ...);
  * views:  6 more views of each photo (mirrored; the 4 corners and the centre at 3/4 of
    the width and height), each then preprocessed like any frame: more confident
    frames than the photos alone give, so one flip moves the figure less;
  * clips:  every --frame-step'th frame of the videos given with --clip (default: the
    samples vtest.avi, Megamind.avi and tree.avi, and the repository's
    fixtures/photos.mp4, made by scripts/setup.sh), decoded with cv2.VideoCapture.
Every frame is either a calibration frame (quantize_int8.py calibrates on the photos and
clip frames of that kind, never on views) or a held-out frame, see photo_split() and
clip_split(); each set is reported held-out only and in full.

Embedding: when both models have the "embedding" output (the pooled features the
classifier reads, see export_efficientnet_lite0.py), the cosine similarity of INT8's
embedding to FP32's on the same frames, mean and minimum per set (held-out and all).

Speed: images/s of the FP32 and the INT8 model with onnxruntime's CPU provider,
intra_op_num_threads = --speed-threads (default 2), at batch 1 and batch 8, the two
models measured in alternating slices in the same process.

This file also holds the preprocessing and the data sets used by quantize_int8.py, so
both scripts see the same pixels.

Usage, from the repository root (venv with onnxruntime, numpy, opencv-python-headless):
  <venv>/bin/python models/evaluate_int8.py [--fp32 models/efficientnet-lite0.onnx]
      [--int8 models/efficientnet-lite0.int8.onnx] [--image-dir DIR] [--clip VIDEO ...]
      [--frame-step 2] [--conf 0.3] [--speed-seconds 3] [--no-speed] [--require 0.97]
      [--min-cosine 0.95]
Exit status 1 when a set's confident-frame agreement (held-out or full) is below
--require, or a set's mean embedding cosine similarity is below --min-cosine.
"""

import argparse
import os
import re
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

DEFAULT_IMAGE_DIR = "/usr/share/doc/opencv-doc/examples/data"  # Debian package opencv-doc
DEFAULT_FP32 = os.path.join(HERE, "efficientnet-lite0.onnx")
DEFAULT_INT8 = os.path.join(HERE, "efficientnet-lite0.int8.onnx")
DEFAULT_LABELS = os.path.join(HERE, "imagenet.labels.txt")
# Clips: a bare name is looked up in IMAGE_DIR, anything else is relative to the repository root.
DEFAULT_CLIPS = ["vtest.avi", "Megamind.avi", "tree.avi", "fixtures/photos.mp4"]
DEFAULT_FRAME_STEP = 2  # evaluation; quantize_int8.py calibrates on every 5th frame
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
SETS = ("photos", "views", "clips")

# Input side; the preprocessing itself (as declared in efficientnet-lite0.toml and done by
# vigil) is preprocess_bgr, imported from export_efficientnet_lite0.py below.
SIZE = 224
INPUT = "input"
OUTPUT = "logits"
EMBEDDING = "embedding"

# The photos fixtures/photos.mp4 is made of, and the other fixture photos of the tests:
# always held out; photos.mp4 itself is never used for calibration.
FIXTURE_PHOTOS = {"squirrel_cls.jpg", "orange.jpg", "baboon.jpg", "chicky_512.png",
                  "butterfly.jpg", "fruits.jpg", "messi5.jpg"}
HELD_OUT_CLIPS = {"photos.mp4"}


# The preprocessing is the export script's (the one the model was checked with).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_efficientnet_lite0 import preprocess_bgr  # noqa: E402


# ---------------------------------------------------------------------------- data sets

def photo_group(name):
    """Near-duplicate photos (stereo pairs, numbered series, before/after) share a group,
    and a group is never split between calibration and held-out."""
    stem = os.path.splitext(name)[0]
    stem = re.sub(r"_(original|modified|defocus|motion)$", "", stem)
    stem = re.sub(r"\d+$", "", stem)
    stem = re.sub(r"(?<=[a-z])[LRAB]$", "", stem)       # aloeL/aloeR, leuvenA/leuvenB
    stem = re.sub(r"[NR]$", "", stem) if stem.startswith("imageText") else stem
    stem = stem.lower()
    if stem in ("left", "right"):                          # left01.jpg / right01.jpg
        stem = "stereo"
    return stem


def photo_split(name):
    if name in FIXTURE_PHOTOS:
        return "held-out"
    return "calib" if zlib.crc32(photo_group(name).encode()) % 2 == 0 else "held-out"


def clip_split(clip_name, index, frame_count):
    """Calibration on the first half of a clip, held-out on the second half."""
    if clip_name in HELD_OUT_CLIPS:
        return "held-out"
    return "calib" if index < frame_count // 2 else "held-out"


class Sample:
    __slots__ = ("set", "source", "name", "split", "x")

    def __init__(self, set_, source, name, split, x):
        self.set, self.source, self.name, self.split, self.x = set_, source, name, split, x


def resolve_clip(clip, image_dir):
    if "/" not in clip and os.sep not in clip:
        return os.path.join(image_dir, clip)
    return clip if os.path.isabs(clip) else os.path.join(REPO, clip)


def photo_views(bgr):
    """Extra views of one photo: mirrored, the 4 corners and the centre at 3/4 size."""
    h, w = bgr.shape[:2]
    ch, cw = (3 * h) // 4, (3 * w) // 4
    views = [("flip", bgr[:, ::-1])]
    for name, (y, x) in (("tl", (0, 0)), ("tr", (0, w - cw)), ("bl", (h - ch, 0)),
                         ("br", (h - ch, w - cw)), ("c", ((h - ch) // 2, (w - cw) // 2))):
        views.append((name, bgr[y:y + ch, x:x + cw]))
    return [(name, np.ascontiguousarray(v)) for name, v in views]


def load_photos(image_dir, views=True):
    """The photos (set "photos"), then, with views=True, their extra views (set "views")."""
    import cv2

    out, extra = [], []
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(PHOTO_EXTS):
            continue
        bgr = cv2.imread(os.path.join(image_dir, name), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        split = photo_split(name)
        out.append(Sample("photos", "photos", name, split, preprocess_bgr(bgr)))
        if views:
            for vname, v in photo_views(bgr):
                extra.append(Sample("views", "views", f"{name}:{vname}", split,
                                    preprocess_bgr(v)))
    if not out:
        sys.exit(f"no readable images in {image_dir}")
    return out + extra


def load_clip(path, step):
    import cv2

    name = os.path.basename(path)
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        return None
    frames = []
    i = 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if i % step == 0:
            frames.append((i, preprocess_bgr(bgr)))
        i += 1
    cap.release()
    return [Sample("clips", name, f"{name}#{k}", clip_split(name, k, i), x) for k, x in frames]


def load_samples(image_dir=DEFAULT_IMAGE_DIR, clips=None, step=DEFAULT_FRAME_STEP, views=True,
                 quiet=False):
    """Photos (and their views) and clip frames, always in the same order."""
    samples = load_photos(image_dir, views)
    for clip in (DEFAULT_CLIPS if clips is None else clips):
        path = resolve_clip(clip, image_dir)
        got = load_clip(path, step) if os.path.exists(path) else None
        if not got:
            print(f"warning: skipping clip {clip}: cannot read {path}", file=sys.stderr)
            continue
        samples.extend(got)
    if not quiet:
        for src in sorted({s.source for s in samples}, key=str.lower):
            n = [s for s in samples if s.source == src]
            print(f"data: {src:<14} {len(n):4d} frames, {sum(s.split == 'calib' for s in n):4d} "
                  "of them calibration frames")
    return samples


# ---------------------------------------------------------------------------- inference

def session(path, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_logits(sess, xs, batch=8):
    out = []
    for i in range(0, len(xs), batch):
        out.append(sess.run([OUTPUT], {INPUT: np.stack(xs[i:i + batch])})[0])
    return np.concatenate(out, axis=0)


def run_outputs(sess, xs, batch=8):
    """(logits, embeddings) of xs; embeddings is None when the model has no EMBEDDING output."""
    names = [OUTPUT] + [o.name for o in sess.get_outputs() if o.name == EMBEDDING]
    outs = [sess.run(names, {INPUT: np.stack(xs[i:i + batch])}) for i in range(0, len(xs), batch)]
    logits = np.concatenate([o[0] for o in outs], axis=0)
    return logits, (np.concatenate([o[1] for o in outs], axis=0) if len(names) > 1 else None)


def cosine(a, b):
    """Cosine similarity of each row of a with the same row of b."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-30)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def groups(samples):
    """(label, predicate) per set, per clip, and in total."""
    out = [(name, lambda s, name=name: s.set == name)
           for name in SETS if any(s.set == name for s in samples)]
    for src in sorted({s.source for s in samples if s.set == "clips"}, key=str.lower):
        out.append((f"  {src}", lambda s, src=src: s.source == src))
    out.append(("total", lambda s: True))
    return out


def agreement_rows(samples, p32, p8, conf):
    """Rows (label, split, n, agree, n_conf, agree_conf) per set, per clip, and in total."""
    agree = p32.argmax(1) == p8.argmax(1)
    confident = p32.max(1) >= conf
    rows = []
    for label, pick in groups(samples):
        for split in ("held-out", "all"):
            m = np.array([pick(s) and (split == "all" or s.split == split) for s in samples])
            rows.append((label, split, int(m.sum()), int((agree & m).sum()),
                         int((m & confident).sum()), int((agree & m & confident).sum())))
    return rows


def pct(a, n):
    return f"{100.0 * a / n:5.1f}%" if n else "    -"


def print_agreement(rows, conf):
    print(f"\ntop-1 agreement INT8 vs FP32 (confident: FP32 top-1 probability >= {conf:g})")
    print(f"{'set':<16}{'split':<10}{'frames':>7}{'agree':>8}{'confident':>11}{'agree':>8}")
    for label, split, n, a, nc, ac in rows:
        print(f"{label:<16}{split:<10}{n:7d}{pct(a, n):>8}{nc:11d}{pct(ac, nc):>8}"
              f"   ({a}/{n}, {ac}/{nc})")


def embedding_rows(samples, cos):
    """Rows (label, split, n, mean, min) of the embedding cosine similarity per set, per clip
    and in total."""
    rows = []
    for label, pick in groups(samples):
        for split in ("held-out", "all"):
            m = np.array([pick(s) and (split == "all" or s.split == split) for s in samples])
            if m.any():
                rows.append((label, split, int(m.sum()), float(cos[m].mean()), float(cos[m].min())))
    return rows


def print_embedding(rows, name, dim):
    print(f"\nembedding ({dim} floats): cosine similarity {name} vs FP32, per frame")
    print(f"{'set':<16}{'split':<10}{'frames':>7}{'mean':>10}{'min':>10}")
    for label, split, n, mean, low in rows:
        print(f"{label:<16}{split:<10}{n:7d}{mean:10.6f}{low:10.6f}")


def kl_divergence(p, q):
    return float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(1).mean())


def evaluate(fp32, int8, samples, conf=0.3, labels=None, threads=1, show=True):
    """Returns (rows, p32, p8, embedding rows); the embedding rows are empty when either
    model has no embedding output."""
    xs = [s.x for s in samples]
    z32, e32 = run_outputs(session(fp32, threads), xs)
    z8, e8 = run_outputs(session(int8, threads), xs)
    p32, p8 = softmax(z32), softmax(z8)
    rows = agreement_rows(samples, p32, p8, conf)
    emb_rows = [] if e32 is None or e8 is None else embedding_rows(samples, cosine(e32, e8))
    if show:
        print_agreement(rows, conf)
        if emb_rows:
            print_embedding(emb_rows, "INT8", e32.shape[1])
        else:
            print("\nembedding: not compared (a model has no \"embedding\" output)")
        held = np.array([s.split == "held-out" for s in samples])
        print(f"mean KL(fp32 || int8) of the softmax: held-out {kl_divergence(p32[held], p8[held]):.4f},"
              f" all {kl_divergence(p32, p8):.4f}")
        bad = [i for i in range(len(samples))
               if p32[i].max() >= conf and p32[i].argmax() != p8[i].argmax()]
        if bad:
            lab = labels or [str(k) for k in range(p32.shape[1])]
            print(f"\nconfident frames where INT8 differs ({len(bad)}):")
            for i in bad:
                a, b = p32[i].argmax(), p8[i].argmax()
                print(f"  {samples[i].name:<26} {samples[i].split:<9} "
                      f"fp32: {lab[a]} {p32[i, a]:.3f}, {lab[b]} {p32[i, b]:.3f} | "
                      f"int8: {lab[b]} {p8[i, b]:.3f}, {lab[a]} {p8[i, a]:.3f}")
    return rows, p32, p8, emb_rows


# ---------------------------------------------------------------------------- speed

def measure_speed(fp32, int8, batches=(1, 8), seconds=3.0, threads=2, slices=6):
    """images/s per (model, batch): `seconds` per model and batch size, spent in `slices`
    slices that alternate between the two models (so both see the same machine load)."""
    rng = np.random.default_rng(0)
    sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    result = {}
    for b in batches:
        x = rng.uniform(-1.0, 1.0, size=(b, 3, SIZE, SIZE)).astype(np.float32)
        count = {k: 0 for k in sessions}
        spent = {k: 0.0 for k in sessions}
        for s in sessions.values():  # warm-up
            for _ in range(3):
                s.run([OUTPUT], {INPUT: x})
        for _ in range(slices):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                end = t0 + seconds / slices
                while True:
                    s.run([OUTPUT], {INPUT: x})
                    count[k] += b
                    t = time.perf_counter()
                    if t >= end:
                        break
                spent[k] += t - t0
        for k in sessions:
            result[(k, b)] = count[k] / spent[k]
    return result


def print_speed(speed, threads):
    print(f"\nspeed, onnxruntime CPU provider, intra_op_num_threads={threads} (images/s)")
    print(f"{'batch':<8}{'fp32':>9}{'int8':>9}{'speed-up':>10}")
    for b in sorted({b for _, b in speed}):
        f, q = speed[("fp32", b)], speed[("int8", b)]
        print(f"{b:<8}{f:9.1f}{q:9.1f}{q / f:9.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", default=DEFAULT_FP32, help="FP32 model (default: %(default)s)")
    ap.add_argument("--int8", default=DEFAULT_INT8, help="INT8 model (default: %(default)s)")
    ap.add_argument("--labels", default=DEFAULT_LABELS, help="(default: %(default)s)")
    ap.add_argument("--image-dir", default=DEFAULT_IMAGE_DIR,
                    help="photos, and where bare clip names are found (default: %(default)s)")
    ap.add_argument("--clip", action="append", default=None,
                    help="video (repeatable; default: " + " ".join(DEFAULT_CLIPS) + ")")
    ap.add_argument("--frame-step", type=int, default=DEFAULT_FRAME_STEP,
                    help="use every N-th clip frame (default: %(default)s)")
    ap.add_argument("--no-views", action="store_true", help="skip the extra views of the photos")
    ap.add_argument("--conf", type=float, default=0.3,
                    help="FP32 top-1 probability that makes a frame confident (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for the agreement runs (default: %(default)s)")
    ap.add_argument("--speed-threads", type=int, default=2, help="(default: %(default)s)")
    ap.add_argument("--speed-seconds", type=float, default=3.0,
                    help="seconds per model and batch size (default: %(default)s)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--require", type=float, default=0.97,
                    help="minimum confident-frame agreement per set (default: %(default)s; 0: off)")
    ap.add_argument("--min-cosine", type=float, default=0.95,
                    help="minimum mean embedding cosine similarity per set "
                         "(default: %(default)s; 0: off)")
    args = ap.parse_args()

    for p in (args.fp32, args.int8):
        if not os.path.exists(p):
            sys.exit(f"missing {p}")
    with open(args.labels, encoding="utf-8") as f:
        labels = [ln.rstrip("\n") for ln in f]
    samples = load_samples(args.image_dir, args.clip, args.frame_step, views=not args.no_views)
    rows, _, _, emb_rows = evaluate(args.fp32, args.int8, samples, args.conf, labels,
                                    args.threads)

    if not args.no_speed:
        speed = measure_speed(args.fp32, args.int8, seconds=args.speed_seconds,
                              threads=args.speed_threads)
        print_speed(speed, args.speed_threads)
    print(f"\nfile sizes: fp32 {os.path.getsize(args.fp32)} bytes, "
          f"int8 {os.path.getsize(args.int8)} bytes")

    failed = [f"{label} {split}: {pct(ac, nc).strip()} of {nc}"
              for label, split, n, a, nc, ac in rows
              if label in SETS and nc and ac / nc < args.require]
    low = [f"{label} {split}: {mean:.4f}" for label, split, _, mean, _ in emb_rows
           if label in SETS and mean < args.min_cosine]
    if args.require and failed:
        print(f"\nbelow {args.require:.0%} on confident frames: " + "; ".join(failed))
    if args.min_cosine and low:
        print(f"\nmean embedding cosine similarity below {args.min_cosine:g}: " + "; ".join(low))
    if (args.require and failed) or (args.min_cosine and low):
        sys.exit(1)


if __name__ == "__main__":
    main()
