#!/usr/bin/env python3
"""Two or more octserve builds (or environment settings) timed side by side by `octserve bench`.

    cp target/release/octserve /tmp/octserve-before     # then change the code and rebuild
    python3 tools/bench/ab_builds.py before=/tmp/octserve-before after=target/release/octserve \\
        --arch resnet50,oct-resnet50 --batches 1,8 --rounds 4

A configuration is NAME=BINARY, optionally followed by environment settings for it:
`gemm=target/release/octserve:OCTSERVE_GEMM=gemm`. Rounds are interleaved (every configuration,
net and batch once per round, so all see the same machine load); each row is the median of the
per-round `latency_ms_p50`, and its ratio to the first configuration's. `--extra` passes flags to
every bench run (for the 28x28 nets: `--extra="--input-size 28 --in-channels 1 --num-classes 10"`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def configuration(spec):
    name, _, rest = spec.partition("=")
    binary, *settings = rest.split(":")
    if not name or not binary:
        raise argparse.ArgumentTypeError(f"NAME=BINARY[:VAR=VALUE...], not {spec!r}")
    return name, binary, dict(s.split("=", 1) for s in settings)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", type=configuration, help="NAME=BINARY[:VAR=VALUE...]")
    p.add_argument("--arch", default="resnet50,oct-resnet50")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=4, help="timed passes per bench run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="more flags for every `bench` run")
    args = p.parse_args()
    archs, batches = args.arch.split(","), [int(b) for b in args.batches.split(",")]

    times = {}
    for round_ in range(args.rounds):
        for arch in archs:
            for batch in batches:
                for name, binary, settings in args.configs:
                    command = [binary, "--threads", str(args.threads), "bench", "--arch", arch,
                               "--batch-size", str(batch), "--iters", str(args.iters), "--json",
                               *args.extra.split()]
                    run = subprocess.run(command, env=dict(os.environ, **settings),
                                         capture_output=True, text=True)
                    if run.returncode:
                        sys.exit(f"{' '.join(command)} failed:\n{run.stderr[-2000:]}")
                    ms = json.loads(run.stdout)["latency_ms_p50"]
                    times.setdefault((arch, batch, name), []).append(ms)
        print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    print("| net | batch | build | ms (median) | / first |")
    print("|---|---|---|---|---|")
    for arch in archs:
        for batch in batches:
            first = statistics.median(times[(arch, batch, args.configs[0][0])])
            for name, _, _ in args.configs:
                ms = statistics.median(times[(arch, batch, name)])
                print(f"| {arch} | {batch} | {name} | {ms:.2f} | {ms / first:.3f} |")


if __name__ == "__main__":
    main()
