#!/usr/bin/env python3
"""The HTTP server under hostile clients, measured against a real `vigil run`.

    python3 benches/http_soak.py [--vigil target/release/vigil] [--http 'key = value' ...]

Starts its own mosquitto and a vigil with one synthetic live camera and the default [http]
settings (plus any --http lines), then:

1. slow clients: 200 connections that send part of a request head and stop, and 50 keep-alive
   connections left idle after one request; reports how many are still open after --wait
   seconds (40), as the clients see it (the server closed the socket or not), and whether a
   normal request was answered meanwhile;
2. predict flood: --clients (64) clients, each from its own loopback address (127.0.0.x, so
   that the per-address rate limit does not stop them), POST predict requests without pause for
   --seconds (60), each a JSON body of --instances (16) base64 JPEGs; meanwhile /readyz is asked
   every 50 ms. Reports the status codes, vigil's peak RSS (VmHWM) and /readyz latency p50 / p99
   / max.

Prints one JSON object. Needs `make setup` (fixtures, ONNX Runtime) and a built vigil.
"""

import argparse
import base64
import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(f"[http-soak] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, timeout, probe):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def start_broker(tmp):
    port = free_port()
    conf = Path(tmp) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_until("mosquitto", 10, up)
    return broker, port


def start_vigil(binary, tmp, broker_port, http_lines):
    config = Path(tmp) / "vigil.toml"
    http = "\n".join(['listen = "127.0.0.1:0"', *http_lines])
    config.write_text(
        f'[model]\ndir = "{ROOT}/models"\n[mqtt]\nport = {broker_port}\n'
        f'[snapshots]\ndir = "{tmp}/snapshots"\n[http]\n{http}\n'
        '[cameras.live]\nsource = "test"\nwidth = 320\nheight = 240\nfps = 10\nanalyze_fps = 2\n')
    env = dict(os.environ, RUST_LOG="info",
               ORT_DYLIB_PATH=os.environ.get(
                   "ORT_DYLIB_PATH", str(ROOT / ".deps/onnxruntime/libonnxruntime.so")))
    logfile = open(Path(tmp) / "vigil.log", "w+")
    proc = subprocess.Popen([binary, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=logfile, env=env, cwd=ROOT)

    def address():
        text = (Path(tmp) / "vigil.log").read_text()
        m = re.search(r"HTTP server listening on (\d+\.\d+\.\d+\.\d+):(\d+)", text)
        if proc.poll() is not None:
            raise SystemExit(f"vigil exited:\n{text}")
        return m and (m.group(1), int(m.group(2)))

    host, port = wait_until("vigil's HTTP server", 60, address)
    return proc, host, port


def status_of(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) // 1024  # MiB
    return fields


def get(host, port, path, source=None, timeout=30):
    c = http.client.HTTPConnection(host, port, timeout=timeout,
                                   source_address=(source, 0) if source else None)
    started = time.monotonic()
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status, time.monotonic() - started


def is_closed(sock):
    """True once the server has closed the connection (EOF or reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


def slow_clients(host, port, slow, idle, wait):
    """Phase 1: slow request heads and idle keep-alive connections."""
    socks = []
    started = time.monotonic()
    for i in range(slow):
        s = socket.create_connection((host, port))
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow-{i}: ".encode())
        socks.append(("slow", s))
    for _ in range(idle):
        s = socket.create_connection((host, port))
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        socks.append(("idle", s))
    for _, s in socks:
        s.setblocking(False)
    log(f"{slow} slow and {idle} idle connections open in {time.monotonic() - started:.1f} s")
    closed_at = {}
    normal = None
    while time.monotonic() - started < wait:
        for i, (_, s) in enumerate(socks):
            if i not in closed_at and is_closed(s):
                closed_at[i] = time.monotonic() - started
        if normal is None and time.monotonic() - started > 1:
            try:
                normal = get(host, port, "/healthz", timeout=5)
            except OSError as e:
                normal = (f"error: {e}", None)
        time.sleep(0.25)
    still_open = {kind: 0 for kind in ("slow", "idle")}
    for i, (kind, s) in enumerate(socks):
        if i not in closed_at and not is_closed(s):
            still_open[kind] += 1
        s.close()
    times = sorted(closed_at.values())
    return {
        "connections": slow + idle,
        "seconds": wait,
        "still_open": sum(still_open.values()),
        "still_open_by_kind": still_open,
        "still_open_percent": round(100 * sum(still_open.values()) / (slow + idle), 1),
        "closed_median_s": round(times[len(times) // 2], 1) if times else None,
        "normal_request_meanwhile": {"status": normal[0], "seconds": normal[1] and round(normal[1], 3)}
        if normal else None,
    }


def flood(host, port, pid, clients, seconds, instances):
    """Phase 2: predict requests from many addresses, /readyz latency and peak RSS."""
    image = (ROOT / "fixtures" / "baboon.jpg").read_bytes()
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}] * instances}).encode()
    path = "/v1/models/efficientnet-lite0:predict"
    stop = time.monotonic() + seconds
    statuses = {}
    lock = threading.Lock()

    def client(n):
        source = f"127.0.{1 + n // 250}.{1 + n % 250}"
        conn = None
        while time.monotonic() < stop:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=60,
                                                      source_address=(source, 0))
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                key = str(r.status)
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                key = type(e).__name__
                conn = None
            with lock:
                statuses[key] = statuses.get(key, 0) + 1

    ready = []

    def readyz():
        while time.monotonic() < stop:
            try:
                status, took = get(host, port, "/readyz", source="127.0.0.250", timeout=30)
                ready.append((status, took))
            except OSError as e:
                ready.append((type(e).__name__, 30.0))
            time.sleep(0.05)

    rss = []

    def memory():
        while time.monotonic() < stop + 2:
            rss.append(status_of(pid))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads += [threading.Thread(target=readyz), threading.Thread(target=memory)]
    before = status_of(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = status_of(pid)
    lat = sorted(t for _, t in ready)

    def q(p):
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    ready_statuses = {}
    for status, _ in ready:
        ready_statuses[str(status)] = ready_statuses.get(str(status), 0) + 1
    return {
        "clients": clients,
        "seconds": seconds,
        "instances_per_request": instances,
        "body_bytes": len(body),
        "predict_statuses": statuses,
        "vm_hwm_mib_before": before.get("VmHWM"),
        "vm_hwm_mib_after": after.get("VmHWM"),
        "vm_rss_mib_max": max(r.get("VmRSS", 0) for r in rss) if rss else None,
        "readyz": {"requests": len(ready), "statuses": ready_statuses, "p50_ms": q(0.5),
                   "p99_ms": q(0.99), "max_ms": round(1000 * lat[-1], 1) if lat else None},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vigil", default=str(ROOT / "target" / "release" / "vigil"))
    ap.add_argument("--http", action="append", default=[], help="an extra [http] line")
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--idle", type=int, default=50)
    ap.add_argument("--wait", type=float, default=40)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--skip-slow", action="store_true")
    ap.add_argument("--skip-flood", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker, broker_port = start_broker(tmp)
        proc = None
        try:
            proc, host, port = start_vigil(args.vigil, tmp, broker_port, args.http)
            wait_until("/readyz 200", 60, lambda: get(host, port, "/readyz")[0] == 200)
            result = {"vigil": args.vigil, "http": args.http}
            if not args.skip_slow:
                log("phase 1: slow and idle clients")
                result["slow_clients"] = slow_clients(host, port, args.slow, args.idle, args.wait)
            if not args.skip_flood:
                log("phase 2: predict flood")
                result["flood"] = flood(host, port, proc.pid, args.clients, args.seconds,
                                        args.instances)
            result["vigil_alive"] = proc.poll() is None
            print(json.dumps(result, indent=2))
        finally:
            if proc:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.terminate()
            broker.wait()


if __name__ == "__main__":
    main()
