#!/usr/bin/env python3
"""Density: how many live cameras one box keeps, at what CPU and memory.

N live 720p25 H.264 cameras, served over RTSP by a server process the bench starts
(examples/rtsp-serve.rs: the file demuxed and packetised in real time, never re-encoded; its CPU
is reported on its own). Each camera watches a still street where an object (an orange, large)
appears for 5 s three times a minute, on a zone (the table) watched for oranges. vigil runs with `analyze_fps = 1`, `decode = "keyframes"`
and motion gating on, as a CCTV box would. For each N: vigil's CPU cores, the server's, vigil's
RSS, frames dropped behind, and events: each camera must start one event per appearance seen
in the window (a missed event is a failure whatever the CPU figure). The reference, in the same
run: N cameras with every key frame decoded (`motion.coded = false`, vigil's behaviour before
still key frames were spared), and N cameras each decoding its key frames with a decoder of its
own (`pipeline.key_frame_decoders = 0`, before decoders were shared). Latency (frame reaching vigil to published: the wait for a shared decoder counts) comes from vigil's own histogram
(`/metrics`), from the end of warm-up to when events are counted, interpolated within its buckets.

In the main rows every camera plays the same clip from about the same moment: all N see the
object at once, the worst case for a box. In a real site the appearances are spread out: the
staggered rows (`--staggered`) split the cameras into four groups whose clips show the object 5 s
apart, so a quarter of them see it at a time; the same three appearances per camera. The clips are
synthetic and noise-free, so their delta frames are tiny; a noisy scene is covered by
tests/zones.rs.

    python3 benches/density.py [--cameras 8,16,32,48,64] [--reference 32] [--own-decoders 64]
                               [--staggered 64]
                                                   (writes benches/DENSITY_RESULTS.md)
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from run import machine

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "fixtures" / "bench"
VIGIL = ROOT / "target" / "release" / "vigil"
SERVER = ROOT / "target" / "release" / "examples" / "rtsp-serve"
LOGS = ROOT / "target" / "density-logs"
ENV = dict(os.environ, ORT_DYLIB_PATH=str(ROOT / ".deps/onnxruntime/libonnxruntime.so"), RUST_LOG="info")
# The object is on screen during these seconds of the clip (key frames every second).
APPEARANCES = [(10, 15), (30, 35), (50, 55)]
CLIP_SECONDS = 70
# Staggered rows: camera i plays the clip shifted by GROUP_SHIFT * (i % GROUPS) seconds.
GROUPS, GROUP_SHIFT = 4, 5
WARMUP, WINDOW = 6.0, 56.0
# When the events are counted: the last appearance ends at 55 s of a stream that starts a few
# seconds after vigil, and is confirmed two analysed frames later.
EVENTS_AT = 66.0


def log(msg):
    print(f"[density] {msg}", file=sys.stderr, flush=True)


def gst(*args):
    subprocess.run(["gst-launch-1.0", "-q", *args], check=True, capture_output=True)


def clip(shift=0):
    """The street's first frame, still, with the orange pasted over it during APPEARANCES
    (later by `shift` seconds, the clip as much longer). Constant quantiser, as a camera's VBR
    encoder codes a still scene: alike key frames, small delta frames (an average-bitrate encoder
    would spend its budget on the still picture in bursts no camera makes)."""
    path = BENCH / ("density-720p.mp4" if shift == 0 else f"density-720p-shift{shift}.mp4")
    if path.exists():
        return path
    BENCH.mkdir(parents=True, exist_ok=True)
    seconds = CLIP_SECONDS + shift
    log(f"making {path.name} ({seconds} s, 720p25, key frame every second)")
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        gst("filesrc", f"location={ROOT / 'fixtures/vtest.avi'}", "!", "decodebin", "!", "identity", "eos-after=1",
            "!", "videoconvert", "!",
            "videoscale", "!", "video/x-raw,width=1280,height=720", "!", "jpegenc", "snapshot=true", "!",
            "filesink", f"location={t / 'still.jpg'}")
        gst("compositor", "name=m", "sink_1::xpos=400", "sink_1::ypos=120", "!", "videoconvert", "!", "jpegenc", "snapshot=true",
            "!", "filesink", f"location={t / 'object.jpg'}",
            "filesrc", f"location={t / 'still.jpg'}", "!", "jpegdec", "!", "videoconvert", "!",
            "imagefreeze", "num-buffers=1", "!", "m.sink_0",
            "filesrc", f"location={ROOT / 'fixtures/orange.jpg'}", "!", "jpegdec", "!", "videoconvert", "!",
            "videoscale", "!", "video/x-raw,width=480,height=480", "!", "imagefreeze", "num-buffers=1", "!", "m.sink_1")
        frames = t / "frames"
        frames.mkdir()
        for i in range(seconds * 25):
            s = i / 25 - shift
            shown = any(a <= s < b for a, b in APPEARANCES)
            (frames / f"{i:05d}.jpg").symlink_to(t / ("object.jpg" if shown else "still.jpg"))
        gst("multifilesrc", f"location={frames}/%05d.jpg", "index=0", "caps=image/jpeg,framerate=25/1", "!",
            "jpegdec", "!", "videoconvert", "!", "x264enc", "speed-preset=fast", "key-int-max=25", "pass=quant",
            "quantizer=24",
            "!", "h264parse", "!", "mp4mux", "!", "filesink", f"location={path}.part")
    os.rename(f"{path}.part", path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def config(n, rtsp_port, http_port, coded=True, groups=1, own=False):
    """Camera i watches mount /cam (groups = 1) or /cam<i % groups> (the shifted clips); `own`:
    each camera decodes its key frames with a decoder of its own (no shared decoders)."""
    mount = (lambda i: "cam") if groups == 1 else (lambda i: f"cam{i % groups}")
    cams = "".join(
        f'[cameras.c{i}]\nsource = "rtsp"\nurl = "rtsp://127.0.0.1:{rtsp_port}/{mount(i)}"\nanalyze_fps = 1\n'
        f'decode = "keyframes"\n[cameras.c{i}.zones.table]\nrect = [0.3125, 0.1667, 0.6875, 0.8333]\n'
        f'[cameras.c{i}.motion]\nenabled = true\ncoded = {"true" if coded else "false"}\n'
        for i in range(n))
    return (f'[model]\ndir = "{ROOT / "models"}"\n[pipeline]\nlog_interval = "5s"\n'
            + ("key_frame_decoders = 0\n" if own else "") +
            f'templates = "{ROOT / "pipelines"}"\n'
            '[decide.thresholds]\norange = 0.25\n[events]\nwatch = ["orange"]\nmin_frames = 2\n'
            '[mqtt]\nport = 1\noutbox = 100000\n[homeassistant]\ndiscovery = false\n'
            f'[http]\nlisten = "127.0.0.1:{http_port}"\n{cams}')


def buckets(text, name):
    """The (bound, cumulative count) buckets of Prometheus histogram `name` in `text` (/metrics)."""
    out = []
    for line in text.splitlines():
        if line.startswith(f'{name}_bucket{{le="'):
            bound = line.split('"')[1]
            out.append((float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1])))
    return out


def quantile(counts, q):
    """The q-quantile of a histogram's (bound, cumulative count) buckets, in ms, interpolated
    linearly within the bucket it falls in; None without observations; inf past the last bound."""
    total = counts[-1][1] if counts else 0
    if not total:
        return None
    lower, below = 0.0, 0.0
    for bound, count in counts:
        if count >= q * total:
            if bound == float("inf"):
                return bound
            return 1000 * (lower + (bound - lower) * (q * total - below) / max(count - below, 1e-9))
        lower, below = bound, count
    return None


def run_n(n, paths, coded=True, own=False):
    """`paths`: one clip (every camera plays it) or one per group (staggered)."""
    rtsp_port, http_port = free_port(), free_port()
    server = subprocess.Popen([str(SERVER), str(rtsp_port), *map(str, paths)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    server.stdout.readline()  # "RTSP server listening on ..."
    groups = len(paths)
    events_at = EVENTS_AT + GROUP_SHIFT * (groups - 1)
    with tempfile.TemporaryDirectory() as t:
        cfg = Path(t) / "vigil.toml"
        cfg.write_text(config(n, rtsp_port, http_port, coded, groups, own))
        logf = open(Path(t) / "vigil.log", "w")
        vigil = subprocess.Popen([str(VIGIL), "run", "--config", str(cfg)], stderr=logf,
                                 stdout=subprocess.DEVNULL, env=ENV, cwd=ROOT)
        started = time.time()
        time.sleep(WARMUP)
        cpu0, scpu0, t0 = cpu_seconds(vigil.pid), cpu_seconds(server.pid), time.perf_counter()
        latency0 = buckets(metrics(http_port), "vigil_latency_seconds")
        time.sleep(WINDOW - WARMUP)
        secs = time.perf_counter() - t0
        cores = (cpu_seconds(vigil.pid) - cpu0) / secs
        server_cores = (cpu_seconds(server.pid) - scpu0) / secs
        rss = rss_mib(vigil.pid)
        # Every stream has shown its last appearance and had it confirmed by now, however late
        # it started (the clip ends at CLIP_SECONDS).
        time.sleep(max(0.0, events_at - (time.time() - started)))
        cams = get(http_port, "/api/cameras")["cameras"]
        events = get(http_port, "/api/events?label=orange&limit=1000")["events"]
        # Latency from the end of warm-up to now (every appearance and departure): the
        # histogram's counts now, less those then.
        latency = [(b, c - c0) for (b, c), (_, c0) in zip(buckets(metrics(http_port), "vigil_latency_seconds"),
                                                          latency0)]
        vigil.send_signal(signal.SIGINT)
        vigil.wait(timeout=60)
        logf.close()
        # The tuner's figure for one image: how fast this machine runs the model, to compare
        # machines by.
        m = re.search(r"measured=1: (\d+) img/s", (Path(t) / "vigil.log").read_text())
        model_speed = int(m.group(1)) if m else None
        # Each row's log is kept (the last run of that row), for a row that does not pass.
        kept = LOGS / f"{n}{'-staggered' if groups > 1 else ''}{'' if coded else '-all-key-frames'}{'-own' if own else ''}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(t) / "vigil.log", kept)
    server.kill()
    server.wait()
    online = sum(1 for c in cams if c.get("state") == "online")
    not_online = [f"{c.get('camera')}: {c.get('state')}" + (f" ({c['last_error']})" if c.get("last_error") else "")
                  for c in cams if c.get("state") != "online"]
    dropped = sum(c["frames"]["dropped_behind"] for c in cams)
    per_camera = {}
    for e in events:
        per_camera.setdefault(e["camera"], set()).add(e["id"])
    expected = len(APPEARANCES)
    missed = sum(max(0, expected - len(per_camera.get(f"c{i}", ()))) for i in range(n))
    return {"cameras": n, "coded": coded, "staggered": groups > 1, "own": own, "online": online,
            "p50_ms": quantile(latency, 0.5), "p99_ms": quantile(latency, 0.99), "cores": cores, "server_cores": server_cores, "rss_mib": rss,
            "dropped_behind": dropped, "events": sum(len(v) for v in per_camera.values()),
            "expected_events": expected * n, "missed": missed, "seconds": time.time() - started,
            "model_img_s": model_speed, "not_online": not_online, "log": str(kept.relative_to(ROOT))}


def passed(r):
    return r["dropped_behind"] == 0 and r["missed"] == 0 and r["online"] == r["cameras"]


def key_frames(r):
    if not r["coded"]:
        return "all decoded (reference)"
    return "still ones spared, a decoder per camera (reference)" if r["own"] else "still ones spared"


def ms(v):
    if v is None:
        return "-"
    return "past the histogram's last bound" if v == float("inf") else f"{v:.0f} ms"


def speed_line(rows):
    speeds = sorted(r["model_img_s"] for r in rows if r.get("model_img_s"))
    if not speeds:
        return "The tuner's measure of the model was not found in the logs."
    return (f"How fast this machine runs the model (vigil's tuner at start, batch 1, the threads `vigil run` gives it): "
            f"{speeds[len(speeds) // 2]} images/s (median of the rows; {speeds[0]}-{speeds[-1]}). Figures of "
            "another machine compare by it.")


def render(rows):
    ok = [r for r in rows if r["coded"] and not r["staggered"] and not r["own"] and passed(r)]
    best = max(ok, key=lambda r: r["cameras"]) if ok else None
    staggered = [r for r in rows if r["staggered"]]
    lines = [
        "# Density: live cameras per box",
        "",
        f"`python3 benches/density.py` on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"N live 720p25 H.264 cameras over RTSP (a server process started by the bench, nothing re-encoded), "
        f"a still street where a large object appears for 5 s at {', '.join(f'{a}-{b} s' for a, b in APPEARANCES)}; "
        "`analyze_fps = 1`, `decode = \"keyframes\"`, motion gating on. "
        f"CPU over {WINDOW - WARMUP:.0f} s after {WARMUP:.0f} s of warm-up, events counted at {EVENTS_AT:.0f} s, "
        "latency (frame reaching vigil to published, the wait for a shared decoder included, from vigil's histogram) from the end of warm-up to then.",
        "",
        speed_line(rows),
        "",
        "| cameras | appearances | key frames | online | vigil CPU cores | per camera | RTSP server CPU cores | vigil RSS | latency p50 / p99 | dropped behind | events (expected) | missed |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['cameras']} | {'staggered' if r['staggered'] else 'all at once'} | {key_frames(r)} | {r['online']} | {r['cores']:.2f} | {r['cores'] / r['cameras']:.3f} | "
            f"{r['server_cores']:.2f} | {r['rss_mib']:.0f} MiB | {ms(r.get('p50_ms'))} / {ms(r.get('p99_ms'))} | "
            f"{r['dropped_behind']} | "
            f"{r['events']} ({r['expected_events']}) | {r['missed']} |")
    for r in rows:
        if not passed(r):
            away = f"; not online at the end: {', '.join(r['not_online'])}" if r.get("not_online") else ""
            lines += ["", f"The {r['cameras']}-camera row ({'staggered' if r['staggered'] else 'all at once'}, "
                          f"{key_frames(r)}) does not pass{away}. vigil's log: `{r['log']}`."]
    lines += ["", (f"Largest N with every camera online, 0 dropped behind and no missed event: **{best['cameras']}**, "
                   f"at {best['cores']:.2f} cores and {best['rss_mib']:.0f} MiB." if best else
                   "No N passed (every camera online, 0 dropped behind, no missed event)."), ""]
    for r in staggered:
        verdict = "passes" if passed(r) else "does not pass"
        lines += [f"Staggered ({GROUPS} groups, {GROUP_SHIFT} s apart), {r['cameras']} cameras {verdict}: "
                  f"{r['cores']:.2f} cores, {r['rss_mib']:.0f} MiB, {r['dropped_behind']} dropped behind, "
                  f"{r['missed']} missed.", ""]
    lines += ["Target (issue): 64 cameras within 1.6 cores.", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cameras", default="8,16,32,48,64")
    p.add_argument("--reference", default="32", help="camera counts also run with every key frame decoded")
    p.add_argument("--own-decoders", default="64",
                   help="camera counts also run with a key-frame decoder per camera (no shared decoders)")
    p.add_argument("--staggered", default="64", help="camera counts also run with the appearances staggered")
    p.add_argument("--out", default=str(ROOT / "benches" / "DENSITY_RESULTS.md"))
    args = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bin", "vigil", "--example", "rtsp-serve"], cwd=ROOT,
                   check=True)
    path = clip()
    rows = []
    for n in map(int, filter(None, args.cameras.split(","))):
        log(f"{n} cameras")
        r = run_n(n, [path])
        log(json.dumps(r))
        rows.append(r)
    for n in map(int, filter(None, args.reference.split(","))):
        log(f"{n} cameras, every key frame decoded (reference)")
        r = run_n(n, [path], coded=False)
        log(json.dumps(r))
        rows.append(r)
    for n in map(int, filter(None, args.own_decoders.split(","))):
        log(f"{n} cameras, a key-frame decoder per camera (reference)")
        r = run_n(n, [path], own=True)
        log(json.dumps(r))
        rows.append(r)
    shifted = [clip(GROUP_SHIFT * g) for g in range(GROUPS)]
    for n in map(int, filter(None, args.staggered.split(","))):
        log(f"{n} cameras, appearances staggered")
        r = run_n(n, shifted)
        log(json.dumps(r))
        rows.append(r)
    text = render(rows)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
