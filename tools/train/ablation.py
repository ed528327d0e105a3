#!/usr/bin/env python3
"""The alpha ablation table, every figure measured by octserve's own commands.

    python3 tools/train/ablation.py [--rounds 3] [--json docs/data/ablation.json]
    # needs target/release/octserve

For each variant of models/fashion-mnist/manifest.toml: `eval` (all 10,000 test images),
`inspect` (MACs, params, activation bytes at 28x28), and `bench` at batch 1 and batch 32 with the
shipped weights. Benchmarks are interleaved across variants for several rounds and the medians
reported, so every row saw the same machine load. `--json FILE` also writes the rows (the input of
tools/plots/make_plots.py).
"""
import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "plots"))
from machine import commit, cpu_name  # noqa: E402

BIN = ROOT / "target" / "release" / "octserve"
MODEL_DIR = ROOT / "models" / "fashion-mnist"


def octserve(*args):
    out = subprocess.run([str(BIN), *args, "--json"], check=True, capture_output=True, text=True,
                         cwd=ROOT)
    return json.loads(out.stdout)


def model_args(variant):
    return ["--arch", variant["arch"], "--alpha", str(variant.get("alpha", 0.0)),
            "--input-size", "28", "--in-channels", "1", "--num-classes", "10"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = parser.parse_args()
    manifest = tomllib.loads((MODEL_DIR / "manifest.toml").read_text())
    variants = sorted(manifest["variants"], key=lambda v: v.get("alpha", 0.0))
    rows = {}
    for v in variants:
        cost = octserve("inspect", *model_args(v))
        acc = octserve("eval", "--model", "fashion-mnist", "--variant", v["name"])
        rows[v["name"]] = {"cost": cost, "accuracy": acc["accuracy"], "bs1": [], "bs32": []}
    for _ in range(args.rounds):
        for v in variants:
            weights = str(MODEL_DIR / v["weights"])
            for batch, iters, key in [(1, 300, "bs1"), (32, 40, "bs32")]:
                r = octserve("bench", *model_args(v), "--weights", weights,
                             "--batch-size", str(batch), "--iters", str(iters))
                rows[v["name"]][key].append(r)
    base = rows[variants[0]["name"]]
    base_lat = statistics.median(r["latency_ms_p50"] for r in base["bs1"])
    base_tput = statistics.median(r["images_per_sec"] for r in base["bs32"])
    print("| variant | alpha | accuracy | MMACs | params | activation bytes | latency bs1 (ms) | "
          "throughput bs32 (img/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        row = rows[v["name"]]
        c = row["cost"]
        lat = statistics.median(r["latency_ms_p50"] for r in row["bs1"])
        tput = statistics.median(r["images_per_sec"] for r in row["bs32"])
        macs_ratio = c["macs"] / base["cost"]["macs"]
        act_ratio = c["activation_bytes"] / base["cost"]["activation_bytes"]
        print(f"| {v['name']} ({v['arch']}) | {v.get('alpha', 0.0):g} | {row['accuracy']:.2%} | "
              f"{c['macs'] / 1e6:.1f} ({macs_ratio:.2f}x) | {c['params']:,} | "
              f"{c['activation_bytes'] / 1e3:.0f} kB ({act_ratio:.2f}x) | "
              f"{lat:.3f} ({lat / base_lat:.2f}x) | {tput:.0f} ({tput / base_tput:.2f}x) |")
    threads = base["bs1"][0]["threads"]
    print(f"\n{args.rounds} interleaved rounds, medians; {threads} threads, f32, CPU.")
    if args.json:
        write_json(args, variants, rows, threads)


def write_json(args, variants, rows, threads):
    out = {
        "cpu": cpu_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "threads": threads,
        "rounds": args.rounds,
        "rows": [{
            "variant": v["name"],
            "arch": v["arch"],
            "alpha": v.get("alpha", 0.0),
            "accuracy": rows[v["name"]]["accuracy"],
            "macs": rows[v["name"]]["cost"]["macs"],
            "params": rows[v["name"]]["cost"]["params"],
            "activation_bytes": rows[v["name"]]["cost"]["activation_bytes"],
            "latency_ms_bs1": statistics.median(r["latency_ms_p50"] for r in rows[v["name"]]["bs1"]),
            "images_per_sec_bs32": statistics.median(
                r["images_per_sec"] for r in rows[v["name"]]["bs32"]),
        } for v in variants],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
