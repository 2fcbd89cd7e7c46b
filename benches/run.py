#!/usr/bin/env python3
"""vigil's benchmarks in one run: the references and vigil side by side, on this machine, now.

    make bench            (python3 benches/run.py --soak; without --soak, no 5-minute memory run)

Reference A: bare ONNX Runtime on the same model file, per batch size (Rust engine-bench, and
             Python onnxruntime).
Reference B: bare GStreamer decode of the same video (gst-launch-1.0 ... ! fakesink sync=false).
Reference C: the naive Python loop (OpenCV VideoCapture + resize + onnxruntime per frame).
vigil:       frames classified per second with 1, 4 and 16 file cameras at unlimited rate
             (`vigil classify`, which runs the same stages as `vigil run`), latency at about 50%
             and 90% load, and 16 live 720p cameras analysed at 2 frames/s, full decode vs
             key frames only.
Motion:      4 live 720p cameras analysed at 5 frames/s, two zones each, with and without motion
             gating, on a still scene (the street's first frame, frozen) and on the busy street;
             motion's cost per frame (criterion) beside inference's per frame (reference A).
Micro:       criterion benches of the stages (benches/stages.rs).
Teaching:    training time for 40, 200 and 2000 images beside the bare model's embedding
             floor, a head's cost per frame beside the model call, and held-out accuracy
             against examples per label beside k-NN (benches/teach.rs).

Prints a table and writes benches/RESULTS.md. Needs `make setup` first (fixtures, ONNX
Runtime); makes its own clips in fixtures/bench/ and a Python venv in .deps/bench-venv/.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".deps" / "bench-venv"
PY_PACKAGES = ["onnxruntime==1.31.1", "opencv-python-headless==4.10.0.84", "numpy==2.2.6"]
SOURCE_FRAMES = 150  # of vtest.avi (10 fps), about 450 frames once at 25 fps
FRAMES = {}  # clip -> its frame count, counted once made
BENCH = ROOT / "fixtures" / "bench"
VIGIL = ROOT / "target" / "release" / "vigil"
ENGINE_BENCH = ROOT / "target" / "release" / "engine-bench"
ENV = dict(os.environ, ORT_DYLIB_PATH=str(ROOT / ".deps/onnxruntime/libonnxruntime.so"), RUST_LOG="info")


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV, cwd=ROOT, **kw)


def python():
    py = VENV / "bin" / "python"
    if not py.exists():
        log("making the Python venv for the references")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PY_PACKAGES], check=True)
    return str(py)


def clips():
    BENCH.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, (w, h, gop) in {"street-1080p": (1920, 1080, 25), "street-720p": (1280, 720, 12)}.items():
        path = BENCH / f"{name}.mp4"
        if not path.exists():
            log(f"making {path.name} (vtest.avi at {w}x{h}, 25 fps, key frame every {gop})")
            run(["gst-launch-1.0", "-q", "filesrc", f"location={ROOT / 'fixtures/vtest.avi'}", "!", "decodebin", "!",
                 "identity", f"eos-after={SOURCE_FRAMES}", "!", "videoconvert", "!", "videoscale", "!",
                 f"video/x-raw,width={w},height={h}", "!", "videorate", "!", "video/x-raw,framerate=25/1", "!", "x264enc",
                 "speed-preset=medium", f"key-int-max={gop}", "bitrate=4000", "!", "h264parse", "!", "mp4mux", "!",
                 "filesink", f"location={path}.part"])
            os.rename(f"{path}.part", path)
        made[name] = path
    return made


def still_clip():
    """The street's first frame held for 20 s: a still 720p scene (only the encoder's noise)."""
    path = BENCH / "still-720p.mp4"
    if not path.exists():
        log(f"making {path.name}")
        run(["gst-launch-1.0", "-q", "filesrc", f"location={ROOT / 'fixtures/vtest.avi'}", "!", "decodebin", "!",
             "videoconvert", "!", "videoscale", "!", "video/x-raw,width=1280,height=720", "!", "imagefreeze",
             "num-buffers=500", "!", "video/x-raw,framerate=25/1", "!", "x264enc", "speed-preset=medium",
             "key-int-max=12", "bitrate=4000", "!", "h264parse", "!", "mp4mux", "!", "filesink", f"location={path}.part"])
        os.rename(f"{path}.part", path)
    return path


ZONES = ('[cameras.c{i}.zones.left]\nrect = [0.0, 0.3, 0.5, 1.0]\n'
         '[cameras.c{i}.zones.right]\nrect = [0.5, 0.3, 1.0, 1.0]\n')


def gated_cameras(n, clip, motion):
    """`n` live cameras with two zones each, analysed at 5 frames/s, motion gating on or off."""
    return "".join(
        f'[cameras.c{i}]\nsource = "file"\npath = "{clip}"\nloop = true\nrealtime = true\nanalyze_fps = 5\n'
        + ZONES.format(i=i) + f'[cameras.c{i}.motion]\nenabled = {str(motion).lower()}\n'
        for i in range(n)
    )


def count_frames(py, clip):
    code = "import cv2,sys; c=cv2.VideoCapture(sys.argv[1]); n=0\nwhile c.grab(): n+=1\nprint(n)"
    FRAMES[clip] = int(run([py, "-c", code, str(clip)]).stdout)


def reference_a(py):
    rows = {}
    for variant in ["fp32", "int8"]:
        out = run([str(ENGINE_BENCH), "--variant", variant, "--batches", "1,4,8,16,32", "--seconds", "3"]).stdout
        for line in out.splitlines():
            m = re.match(rf"{variant}\s+(\d+)\s+\d+\s+([\d.]+)", line)
            if m:
                rows.setdefault(variant, {})[int(m.group(1))] = {"rust": float(m.group(2))}
        model = ROOT / "models" / ("efficientnet-lite0.onnx" if variant == "fp32" else "efficientnet-lite0.int8.onnx")
        out = run([py, "benches/ort_python.py", str(model), "--seconds", "3"]).stdout
        for line in out.splitlines():
            j = json.loads(line)
            rows[variant][j["batch"]]["python"] = j["images_per_s"]
    return rows


def reference_b(clip):
    result = {}
    for label, tail in [("decode", []), ("decode + BGR", ["videoconvert", "!", "video/x-raw,format=BGR", "!"])]:
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            run(["gst-launch-1.0", "-q", "filesrc", f"location={clip}", "!", "qtdemux", "!", "h264parse", "!",
                 "avdec_h264", "!", *tail, "fakesink", "sync=false"])
            best = max(best, FRAMES[clip] / (time.perf_counter() - start))
        result[label] = best
    return result


def reference_c(py, clip):
    out = {}
    for variant, model in [("fp32", "efficientnet-lite0.onnx"), ("int8", "efficientnet-lite0.int8.onnx")]:
        j = json.loads(run([py, "benches/naive_python.py", str(ROOT / "models" / model), str(clip)]).stdout)
        out[variant] = j["fps"]
    return out


def config(tmp, body):
    path = tmp / "bench.toml"
    path.write_text(f'[model]\ndir = "{ROOT / "models"}"\n{body}')
    return path


def classify(tmp, clip, cameras, variant="fp32"):
    cfg = config(tmp, f'variant = "{variant}"\n')
    proc = subprocess.run([str(VIGIL), "classify", "--config", str(cfg), *[str(clip)] * cameras], check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    m = re.search(r'classified frames=(\d+) seconds="([\d.]+)" fps="([\d.]+)"', proc.stderr)
    assert m and int(m.group(1)) == FRAMES[clip] * cameras, proc.stderr[-2000:]
    return float(m.group(3))


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def live_run(tmp, cameras_toml, seconds, warmup, samples=()):
    """Runs `vigil run` (no broker needed: results wait in the outbox) and reads its figures."""
    cfg = config(tmp, f'[pipeline]\nlog_interval = "5s"\n[mqtt]\nport = 1\noutbox = 100000\n[homeassistant]\ndiscovery = false\n{cameras_toml}')
    logf = open(tmp / "live.log", "w")
    proc = subprocess.Popen([str(VIGIL), "run", "--config", str(cfg)], stderr=logf, stdout=subprocess.DEVNULL,
                            env=ENV, cwd=ROOT)
    time.sleep(warmup)
    cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    rss = {}
    for at in samples:
        time.sleep(max(0, at - (time.perf_counter() - t0)))
        rss[at] = rss_mib(proc.pid)
    time.sleep(max(0, seconds - (time.perf_counter() - t0)))
    cores = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
    since = time.time() - seconds
    proc.send_signal(2)
    proc.wait(timeout=60)
    logf.close()
    text = (tmp / "live.log").read_text()
    # The figures logged during the measured window (timestamps are UTC RFC 3339).
    lines = []
    for line in text.splitlines():
        m = re.match(r"(\S+Z)", line)
        if m:
            t = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            if t >= since:
                lines.append(line)
    pipe = [l for l in lines if "pipeline figures" in l]
    cams = [l for l in lines if "camera figures" in l]

    def field(line, key):
        m = re.search(rf'{key}=("?)([^" ]+)\1', line)
        return m.group(2) if m else None

    def ms(v):
        return float(v[:-2]) if v.endswith("ms") else float(v[:-1]) * 1000 if v.endswith("s") else float(v)

    def worst(key):
        # An interval that published nothing (a still scene, gated) logs no latency.
        values = [ms(v) for v in (field(l, key) for l in pipe) if v]
        return max(values) if values else None

    return {
        "cores": cores,
        "classified_fps": sum(float(field(l, "classified_fps")) for l in pipe) / max(1, len(pipe)),
        "p50_ms": worst("latency_p50"),
        "p99_ms": worst("latency_p99"),
        "input_fps": sum(float(field(l, "input_fps")) for l in cams) / max(1, len(cams)),
        "dropped_behind": sum(int(field(l, "dropped_behind")) for l in cams),
        "rss": rss,
    }


def cameras(n, clip, extra=""):
    return "".join(
        f'[cameras.c{i}]\nsource = "file"\npath = "{clip}"\nloop = true\nrealtime = true\n{extra}\n' for i in range(n)
    )


def criterion():
    out = subprocess.run(["cargo", "bench", "--bench", "stages", "--", "--warm-up-time", "1", "--measurement-time", "2"],
                         check=True, capture_output=True, text=True, env=ENV, cwd=ROOT).stdout
    rows, name = [], None
    for line in out.splitlines():
        m = re.match(r"^(\S.*?)\s+time:\s+\[\S+ \S+ (\S+ \S+) \S+ \S+\]", line)
        if m:
            rows.append((m.group(1).strip(), m.group(2)))
            continue
        m = re.match(r"^\s+time:\s+\[\S+ \S+ (\S+ \S+) \S+ \S+\]", line)
        if m and name:
            rows.append((name, m.group(1)))
        elif line and not line.startswith(" ") and "time:" not in line:
            name = line.strip()
    return rows


def machine():
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return f"{model}, {os.cpu_count()} cores, {mem / 1024 / 1024:.0f} GiB, {platform.system()} {platform.release()}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--soak", action="store_true", help="also run 5 minutes to compare RSS at 1 and 5 minutes")
    args = p.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    log("building")
    subprocess.run(["cargo", "build", "--release", "--workspace"], check=True, cwd=ROOT, env=ENV)
    py = python()
    c = clips()
    c1080, c720 = c["street-1080p"], c["street-720p"]
    for clip in (c1080, c720):
        count_frames(py, clip)
    r = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "frames": FRAMES[c1080]}
    log("reference A: bare ONNX Runtime")
    r["A"] = reference_a(py)
    log("reference B: bare GStreamer decode")
    r["B"] = {"1080p": reference_b(c1080), "720p": reference_b(c720)}
    log("reference C: naive Python loop")
    r["C"] = reference_c(py, c1080)
    log("vigil end to end")
    r["e2e"] = {n: classify(tmp, c1080, n) for n in (1, 4, 16)}
    r["e2e_int8"] = {4: classify(tmp, c1080, 4, "int8")}
    r["e2e_720p"] = {4: classify(tmp, c720, 4)}
    max720 = r["e2e_720p"][4]
    r["latency"] = {}
    for target in (0.5, 0.9):
        n = max(1, round(target * max720 / 25))
        log(f"latency: {n} live 720p cameras at 25 fps ({n * 25 / max720:.0%} of the maximum)")
        res = live_run(tmp, cameras(n, c720), seconds=20, warmup=6)
        res["cameras"], res["load"] = n, n * 25 / max720
        r["latency"][target] = res
    r["many"] = {}
    for mode in ("all", "keyframes"):
        log(f"16 live 720p cameras, analyze_fps 2, decode = {mode}")
        r["many"][mode] = live_run(tmp, cameras(16, c720, f'analyze_fps = 2\ndecode = "{mode}"'), seconds=20, warmup=8)
    r["motion"] = {}
    still = still_clip()
    for scene, clip in (("still", still), ("busy", c720)):
        for gating in (False, True):
            log(f"motion: 4 live 720p cameras, {scene} scene, gating {'on' if gating else 'off'}")
            r["motion"][f"{scene} {'on' if gating else 'off'}"] = live_run(
                tmp, gated_cameras(4, clip, gating), seconds=20, warmup=6)
    if args.soak:
        log("soak: 4 live cameras for 5 minutes")
        r["soak"] = live_run(tmp, cameras(4, c720, "analyze_fps = 10"), seconds=300, warmup=0, samples=(60, 120, 180, 240, 300))
    log("criterion micro benches")
    r["micro"] = criterion()
    log("allocations per frame")
    r["alloc"] = subprocess.run(["cargo", "bench", "--bench", "alloc"], check=True, capture_output=True,
                                text=True, env=ENV, cwd=ROOT).stdout.strip()
    log("teaching: training time, head cost, accuracy against examples")
    r["teach"] = subprocess.run(["cargo", "bench", "--bench", "teach"], check=True, capture_output=True,
                                text=True, env=ENV, cwd=ROOT).stdout.strip()
    (ROOT / "benches" / "results.json").write_text(json.dumps(r, indent=1, default=str))
    report = render(r)
    (ROOT / "benches" / "RESULTS.md").write_text(report)
    print(report)


def memory_line(rss):
    """The soak's RSS samples (minute -> MiB) as one sentence."""
    s = {int(k): v for k, v in rss.items()}
    curve = ", ".join(f"{v:.1f} MiB at {t // 60} min" for t, v in sorted(s.items()))
    return (f"Memory (4 live 720p cameras, analyze_fps 10, for 5 minutes): RSS {curve}; "
            f"{(s[300] - s[60]) / s[60]:+.1%} from minute 1 to minute 5.")


def to_ms(t):
    """A criterion time ("1.23 ms", "456.7 µs") in milliseconds."""
    value, unit = t.split()
    return float(value) * {"s": 1000, "ms": 1, "µs": 0.001, "ns": 1e-6}[unit]


def motion_section(r):
    m, a = r["motion"], r["A"]
    per_frame = 1000 / max(v["rust"] for v in a["fp32"].values())
    micro = dict(r["micro"])
    out = ["", "## Motion gating: 4 live 720p cameras at 5 frames/s, two zones each", "",
           "| scene | gating | CPU cores used | per camera | classified frames/s (all cameras) |",
           "| --- | --- | --- | --- | --- |"]
    for key, res in m.items():
        scene, gating = key.split()
        out.append(f"| {scene} | {gating} | {res['cores']:.2f} | {res['cores'] / 4:.3f} | "
                   f"{res['classified_fps']:.1f} |")
    for scene in ("still", "busy"):
        off, on = m[f"{scene} off"]["cores"], m[f"{scene} on"]["cores"]
        out.append("")
        out.append(f"{scene.capitalize()} scene: gating uses {on / off:.0%} of the CPU it uses without.")
    cost = [f"{name}: {t} ({to_ms(t) / per_frame:.1%} of inference's {per_frame:.2f} ms per frame at its best batch)"
            for name, t in micro.items() if name.startswith("motion")]
    out += ["", "Motion's cost per frame: " + "; ".join(cost) + "."]
    return out


def render(r):
    a, b, c = r["A"], r["B"], r["C"]
    best = {v: max(a[v].items(), key=lambda kv: kv[1]["rust"]) for v in a}
    a32, a8 = best["fp32"][1]["rust"], best["int8"][1]["rust"]
    b1080 = b["1080p"]["decode"]
    ceiling32 = 1 / (1 / a32 + 1 / b1080)
    ceiling8 = 1 / (1 / a8 + 1 / b1080)
    e = r["e2e"]
    out = [
        "# vigil benchmark results",
        "",
        f"Measured by `make bench` (benches/run.py) on {r['date']}: {r['machine']}. One run, every figure",
        "beside its reference. Model: EfficientNet-Lite0 (224x224), ONNX Runtime 1.31.1, CPU execution provider.",
        f"Video: OpenCV's street clip vtest.avi scaled to 1080p and 720p, H.264, 25 fps, {r['frames']} frames.",
        "GPU: none on this machine; `benches/gpu.sh` measures FP32 and FP16 on CUDA where there is one.",
        "",
        "## Reference A: bare ONNX Runtime, images/s",
        "",
        "| batch | FP32 Rust (ort) | FP32 Python | INT8 Rust (ort) | INT8 Python |",
        "| --- | --- | --- | --- | --- |",
    ]
    for batch in sorted(a["fp32"]):
        f, i = a["fp32"][batch], a["int8"][batch]
        out.append(f"| {batch} | {f['rust']:.1f} | {f.get('python', 0):.1f} | {i['rust']:.1f} | {i.get('python', 0):.1f} |")
    out += [
        "",
        f"Best: FP32 {a32:.1f} images/s at batch {best['fp32'][0]}, INT8 {a8:.1f} at batch {best['int8'][0]} "
        f"(INT8 {a8 / a32:.2f}x).",
        "",
        "## Reference B: bare GStreamer decode, frames/s",
        "",
        "| clip | decode (avdec_h264 ! fakesink) | decode + conversion to BGR |",
        "| --- | --- | --- |",
        *[f"| {k} | {v['decode']:.1f} | {v['decode + BGR']:.1f} |" for k, v in b.items()],
        "",
        "## Reference C: naive Python loop (VideoCapture + resize + onnxruntime per frame), 1080p",
        "",
        f"FP32 {c['fp32']:.1f} frames/s, INT8 {c['int8']:.1f} frames/s.",
        "",
        "## vigil end to end: frames classified per second, file cameras at unlimited rate (1080p)",
        "",
        "Ceiling for a saturated CPU (decode and inference share the cores): 1/(1/A + 1/B) =",
        f"{ceiling32:.1f} frames/s FP32, {ceiling8:.1f} INT8.",
        "",
        "| cameras | precision | frames/s | / ceiling | / A (best batch) | / B (decode) | / C (naive, same precision) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, fps in e.items():
        out.append(f"| {n} | FP32 | {fps:.1f} | {fps / ceiling32:.0%} | {fps / a32:.0%} | {fps / b1080:.0%} | {fps / c['fp32']:.2f}x |")
    for n, fps in r["e2e_int8"].items():
        out.append(f"| {n} | INT8 | {fps:.1f} | {fps / ceiling8:.0%} | {fps / a8:.0%} | {fps / b1080:.0%} | {fps / c['int8']:.2f}x |")
    out += [
        f"| 4 (720p) | FP32 | {r['e2e_720p'][4]:.1f} | | | | |",
        "",
        "## Latency, frame arrival to publish (live 720p cameras at 25 fps, every frame analysed)",
        "",
        "| cameras | load (of the 4-camera 720p maximum) | classified frames/s | p50 | p99 | CPU cores used |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for res in r["latency"].values():
        out.append(f"| {res['cameras']} | {res['load']:.0%} | {res['classified_fps']:.1f} | {res['p50_ms']:.1f} ms | "
                   f"{res['p99_ms']:.1f} ms | {res['cores']:.2f} |")
    out += [
        "",
        "## 16 live 720p cameras at 25 fps, analyze_fps = 2 (key frame every 12 frames)",
        "",
        "| decode | CPU cores used | decoded frames/s per camera | classified frames/s (all cameras) | frames dropped behind |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, res in r["many"].items():
        out.append(f"| {mode} | {res['cores']:.2f} | {res['input_fps']:.1f} | {res['classified_fps']:.1f} | {res['dropped_behind']} |")
    if "soak" in r:
        out += ["", memory_line(r["soak"]["rss"])]
    out += motion_section(r)
    out += ["", "## Micro benches (criterion, median)", "", "| bench | time |", "| --- | --- |"]
    out += [f"| {name} | {t} |" for name, t in r["micro"]]
    out += ["", "## Heap allocations per frame (cargo bench --bench alloc)", "", "```", r["alloc"], "```"]
    out += ["", "# Teaching (cargo bench --bench teach)", "", r["teach"].replace("## ", "### ")]
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
