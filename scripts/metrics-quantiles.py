#!/usr/bin/env python3
"""Prints p50/p99 of vigil's histograms from a running vigil's /metrics.

    scripts/metrics-quantiles.py [http://127.0.0.1:8080] [--token TOKEN]

Quantiles are interpolated within buckets, as Prometheus's histogram_quantile() does, so they
are as fine as the buckets (a few ms for vigil_latency_seconds under 100 ms).
"""

import argparse
import re
import urllib.request

HISTOGRAMS = ["vigil_latency_seconds", "vigil_inference_seconds", "vigil_batch_size"]
LINE = re.compile(r'^(\w+)_bucket\{le="([^"]+)"\} (\S+)$')


def buckets(text, name):
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m.group(1) == name:
            le = float("inf") if m.group(2) == "+Inf" else float(m.group(2))
            out.append((le, float(m.group(3))))
    return sorted(out)


def quantile(q, bs):
    total = bs[-1][1] if bs else 0
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in bs:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = le, count
    return lower


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8080")
    p.add_argument("--token")
    a = p.parse_args()
    req = urllib.request.Request(a.url.rstrip("/") + "/metrics")
    if a.token:
        req.add_header("Authorization", f"Bearer {a.token}")
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    for name in HISTOGRAMS:
        bs = buckets(text, name)
        n = int(bs[-1][1]) if bs else 0
        p50, p99 = quantile(0.5, bs), quantile(0.99, bs)
        if p50 is None:
            print(f"{name}: no samples")
        elif name.endswith("_seconds"):
            print(f"{name}: count {n}  p50 {p50 * 1000:.1f} ms  p99 {p99 * 1000:.1f} ms")
        else:
            m = re.search(rf"^{name}_sum (\S+)$", text, re.M)
            mean = float(m.group(1)) / n if m and n else 0
            print(f"{name}: count {n}  mean {mean:.2f}  p99 at most {next(le for le, c in bs if c >= 0.99 * n):g}")


if __name__ == "__main__":
    main()
