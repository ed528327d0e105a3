#!/usr/bin/env python3
"""A live A/B run recorded over time: the shipped models served, loaded, and read every few seconds.

    python3 tools/plots/ab_timeline.py [--duration 60] [--concurrency 16] [--interval 2]
    # needs target/release/octserve; writes docs/data/ab_timeline.json

Starts `octserve serve` on the shipped models (loopback ports), runs `octserve loadgen` without a
variant (so the A/B router splits the traffic by its routing weights), and every --interval
seconds records `octserve ab --json`: per variant the requests so far, p50 and p99 latency, and
the compute, memory and latency savings against the baseline. The server is stopped at the end.
The output is the input of the A/B plot of tools/plots/make_plots.py.
"""
import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from machine import commit, cpu_name

ROOT = Path(__file__).resolve().parents[2]
KEPT = ("requests", "p50_ms", "p99_ms", "compute_savings", "memory_savings", "latency_savings",
        "routing_weight", "baseline")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def ab(binary, addr, model):
    """The server's A/B summary, or None while it is not serving yet."""
    out = subprocess.run([binary, "ab", "--addr", addr, "--model", model, "--json"],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default=str(ROOT / "target" / "release" / "octserve"))
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--images", default=str(ROOT / "models" / "fashion-mnist" / "samples"))
    p.add_argument("--duration", type=int, default=60, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between A/B readings")
    p.add_argument("--out", default=str(ROOT / "docs" / "data" / "ab_timeline.json"))
    args = p.parse_args()

    grpc, metrics = free_port(), free_port()
    addr = f"http://127.0.0.1:{grpc}"
    server = subprocess.Popen([args.bin, "serve", "--grpc-addr", f"127.0.0.1:{grpc}",
                               "--metrics-addr", f"127.0.0.1:{metrics}"], cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while ab(args.bin, addr, args.model) is None:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        loadgen_cmd = [args.bin, "loadgen", "--addr", addr, "--model", args.model,
                       "--concurrency", str(args.concurrency), "--duration", str(args.duration),
                       "--images", args.images, "--json"]
        start = time.monotonic()
        loadgen = subprocess.Popen(loadgen_cmd, stdout=subprocess.PIPE, text=True)
        samples = []
        while loadgen.poll() is None:
            time.sleep(args.interval)
            summary = ab(args.bin, addr, args.model)
            if summary:
                samples.append({
                    "t_s": round(time.monotonic() - start, 2),
                    "variants": {v["variant"]: {k: v[k] for k in KEPT}
                                 for v in summary["variants"]},
                })
        load = json.loads(loadgen.stdout.read())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    doc = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "command": " ".join(["octserve"] + loadgen_cmd[1:2] + loadgen_cmd[4:]).replace(
            str(ROOT) + "/", ""),
        "loadgen": {k: load[k] for k in ("requests", "errors", "rps", "p50_ms", "p99_ms",
                                          "mean_batch_size")},
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
