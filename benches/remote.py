#!/usr/bin/env python3
"""Remote inference against local, in one run: images/s, batch latency p50/p99 and bytes per
image on the wire, at batch 1, 8 and 16.

Local: vigil's engine running the model with ONNX Runtime in the process (one session).
Remote: the same engine sending each batch to a real NVIDIA Triton Inference Server over
loopback (tests/triton/serve.py: pytriton's tritonserver, a Python function running the same
model with onnxruntime), with 1 and 2 requests in flight. On one machine the server shares the
cores with the client, so remote pays for the protocol, the copies and the server's Python
backend, and gains nothing from a bigger machine.

    python3 benches/remote.py [--seconds 5]      (after `make setup`; writes benches/REMOTE_RESULTS.md)
"""

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_BENCH = ROOT / "target" / "release" / "engine-bench"
PYTHON = ROOT / ".deps" / "triton" / "bin" / "python"
BATCHES = [1, 8, 16]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_times(metrics_port):
    """Triton's own counters: (requests, total request µs, total compute-infer µs)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("nv_inference_request_success", "nv_inference_request_duration_us",
                     "nv_inference_compute_infer_duration_us"):
            if line.startswith(name + "{"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return (values.get("nv_inference_request_success", 0.0),
            values.get("nv_inference_request_duration_us", 0.0),
            values.get("nv_inference_compute_infer_duration_us", 0.0))


def start_server():
    ports = [free_port() for _ in range(3)]
    server = subprocess.Popen(
        [str(PYTHON), str(ROOT / "tests/triton/serve.py"),
         "--model", str(ROOT / "models/efficientnet-lite0.onnx"),
         "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ready = f"http://127.0.0.1:{ports[1]}/v2/models/efficientnet-lite0/ready"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(ready, timeout=2).status == 200:
                return server, f"grpc://127.0.0.1:{ports[0]}", ports[2]
        except OSError:
            pass
        if server.poll() is not None:
            sys.exit("the Triton server exited before its model was ready")
        time.sleep(0.5)
    sys.exit("the Triton server was not ready within 120 s")


def bench(seconds, *args):
    cmd = [str(ENGINE_BENCH), "--batches", ",".join(map(str, BATCHES)), "--seconds", str(seconds),
           "--spinning", "false", *args]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) == 8 and f[0] == "fp32":
            rows[int(f[1])] = {"ips": float(f[3]), "p50": float(f[5]), "p99": float(f[6]),
                               "bytes": None if f[7] == "-" else int(f[7])}
    if len(rows) != len(BATCHES):
        sys.exit(f"engine-bench printed no table:\n{out}")
    return rows


def bench_one(seconds, url):
    """The client's mean time per batch of 8, one in flight (comparable with Triton's mean)."""
    cmd = [str(ENGINE_BENCH), "--batches", "8", "--seconds", str(seconds), "--provider", "remote",
           "--remote", url]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return float(out.splitlines()[-1].split()[4])


def render(results, seconds):
    server = results.pop("_server")
    local = results["local"]
    lines = [
        "# Remote inference against local",
        "",
        f"`python3 benches/remote.py --seconds {seconds}` on this machine: "
        f"{os.cpu_count()} cores, {platform.machine()}. EfficientNet-Lite0 FP32, 224x224, "
        "the same input every batch.",
        "",
        "- **local**: vigil's engine with ONNX Runtime in the process, one session.",
        "- **remote xK**: the same engine sending batches over loopback gRPC (the Open Inference "
        "Protocol) to NVIDIA Triton (pytriton's tritonserver serving the model with onnxruntime "
        "in Python), K requests in flight. The server shares this machine's cores.",
        "",
        "| batch | setup | images/s | vs local | batch latency p50 | p99 | bytes/image on the wire |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in BATCHES:
        for name, rows in results.items():
            r = rows[b]
            ratio = r["ips"] / local[b]["ips"]
            lines.append(
                f"| {b} | {name} | {r['ips']:.1f} | {ratio:.2f}x | {r['p50']:.1f} ms | {r['p99']:.1f} ms | "
                f"{r['bytes'] if r['bytes'] is not None else '-'} |")
    best8 = max(rows[8]["ips"] for name, rows in results.items() if name != "local")
    lines += [
        "",
        f"At batch 8 the better remote setup reaches {best8 / local[8]['ips']:.2f}x local throughput "
        "(target: 0.8x). An image is 3x224x224 float32 = 602112 bytes; the rest is the request's "
        "framing, shared by the images of a batch.",
        "",
        f"Where a batch of 8 goes (one in flight, Triton's own counters): {server['client_ms']:.1f} ms "
        f"per batch seen by vigil, of which {server['request_ms']:.1f} ms inside Triton and "
        f"{server['compute_ms']:.1f} ms in the model's compute step (pytriton's Python backend "
        f"running onnxruntime; bare ONNX Runtime takes {1000 * 8 / local[8]['ips']:.1f} ms per batch "
        "here). The rest is the gRPC transfer and decoding on both sides.",
        "",
    ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "benches" / "REMOTE_RESULTS.md"))
    args = p.parse_args()
    if not PYTHON.is_file():
        sys.exit(f"{PYTHON} is missing: run `make setup`")
    subprocess.run(["cargo", "build", "--release", "-p", "vigil-engine", "--bin", "engine-bench"],
                   cwd=ROOT, check=True)
    results = {"local": bench(args.seconds)}
    server, url, metrics_port = start_server()
    try:
        for k in (1, 2):
            name = f"remote x{k}"
            results[name] = bench(args.seconds, "--provider", "remote", "--remote", url,
                                  "--in-flight", str(k))
            if k == 1:
                # Where a batch of 8's time goes on the server, from Triton's own counters.
                before = server_times(metrics_port)
                bench_8 = bench_one(args.seconds, url)
                after = server_times(metrics_port)
                n = after[0] - before[0]
                results["_server"] = {"client_ms": bench_8, "request_ms": (after[1] - before[1]) / n / 1000,
                                      "compute_ms": (after[2] - before[2]) / n / 1000}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    text = render(results, args.seconds)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
