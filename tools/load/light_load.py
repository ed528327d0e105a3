#!/usr/bin/env python3
"""Light and heavy load, side by side: per-request latency of octserve builds on the shipped models.

For each round and each build (`--bin NAME=PATH`, in turn, so they never share the CPU), starts
`serve` on the shipped models with the default config, runs `loadgen` at concurrency 1 (a lone
client: the light load most services see most of the time) and at concurrency 64 against each
variant, then stops it. Prints the median over rounds of each figure, the server's own timing
split (decode, queue, compute, overhead) at concurrency 1, and the `ab` table after the last
light-load run of the first build.

    python3 tools/load/light_load.py --bin new=target/release/octserve \
        --bin old=/path/to/previous/octserve --rounds 3 --duration 6
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

VARIANTS = ["vanilla", "octave"]
CONCURRENCIES = [1, 64]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary):
    grpc, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--models-dir", "models",
         "--grpc-addr", f"127.0.0.1:{grpc}", "--metrics-addr", f"127.0.0.1:{metrics}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    addr = f"http://127.0.0.1:{grpc}"
    for _ in range(300):
        probe = subprocess.run(
            [binary, "classify", "--addr", addr, "--model", "fashion-mnist",
             "models/fashion-mnist/samples/0002_trouser.png"],
            capture_output=True)
        if probe.returncode == 0:
            return proc, addr
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"{binary} did not start serving")


def loadgen(binary, addr, variant, concurrency, duration):
    out = subprocess.run(
        [binary, "loadgen", "--addr", addr, "--model", "fashion-mnist", "--variant", variant,
         "--concurrency", str(concurrency), "--duration", str(duration),
         "--images", "models/fashion-mnist/samples", "--json"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", action="append", required=True, help="NAME=PATH of a build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6)
    args = parser.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    builds = [b.split("=", 1) for b in args.bin]
    runs = {}  # (build, variant, concurrency) -> [report]
    ab_table = None
    for round_ in range(args.rounds):
        for name, binary in builds:
            proc, addr = start(binary)
            try:
                for concurrency in CONCURRENCIES:
                    for variant in VARIANTS:
                        report = loadgen(binary, addr, variant, concurrency, args.duration)
                        runs.setdefault((name, variant, concurrency), []).append(report)
                    if concurrency == 1 and name == builds[0][0] and round_ == args.rounds - 1:
                        ab_table = subprocess.run(
                            [binary, "ab", "--addr", addr, "--model", "fashion-mnist"],
                            capture_output=True, text=True).stdout
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr)

    med = lambda reports, key: statistics.median(r[key] for r in reports)
    print(f"medians of {args.rounds} rounds, {args.duration:g} s each, shipped models, default config\n")
    print("| build | variant | concurrency | req/s | p50 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for (name, variant, concurrency), reports in runs.items():
        print(f"| {name} | {variant} | {concurrency} | {med(reports, 'ok_rps'):.0f} | "
              f"{med(reports, 'p50_ms'):.2f} | {med(reports, 'p99_ms'):.2f} | "
              f"{med(reports, 'mean_batch_size'):.1f} |")
    split = [(k, r) for k, r in runs.items() if k[2] == 1 and "server_ms" in r[0]]
    if split:
        print("\nserver-side medians at concurrency 1, ms (overhead: total less decode, queue, compute)\n")
        print("| build | variant | decode | queue | compute | overhead | server total | client p50 |")
        print("|---|---|---|---|---|---|---|---|")
        for (name, variant, _), reports in split:
            t = lambda key: statistics.median(r["server_ms"][key] for r in reports)
            print(f"| {name} | {variant} | {t('decode'):.3f} | {t('queue'):.3f} | "
                  f"{t('compute'):.3f} | {t('overhead'):.3f} | {t('total'):.3f} | "
                  f"{med(reports, 'p50_ms'):.2f} |")
    if ab_table:
        print(f"\n`octserve ab` on {builds[0][0]} after its last light-load run:\n")
        print(ab_table)


if __name__ == "__main__":
    main()
