#!/usr/bin/env python3
"""octserve vs PyTorch eager on the same architectures, weights, batch sizes and thread count.

    python3 tools/peers/pytorch_vs_octserve.py                      # resnet50 / oct-resnet50, bs 1 and 8
    python3 tools/peers/pytorch_vs_octserve.py --archs resnet20,oct-resnet20 --size 28 \
        --in-channels 1 --classes 10 --batches 32

PyTorch runs tools/reference/octnets.py (torchvision's ResNet and d-li14's Oct-ResNet, checked
equal to them by the parity tests) in eval mode under inference_mode, in both memory formats
(contiguous NCHW and channels_last). Its random weights are saved as safetensors and octserve
`bench` loads the same file. Rounds are interleaved (every implementation and configuration once
per round) and medians of the per-round medians reported, so all rows saw the same machine load.
Each round also runs `octserve bench --versus` for every octave/vanilla pair: the two models'
passes alternate in one process, and its median per-pass ratio is the octave/vanilla figure
least moved by a noisy machine (the "octserve per pass" column).
Needs target/release/octserve, torch and safetensors.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "reference"))
import octnets  # noqa: E402

BIN = ROOT / "target" / "release" / "octserve"


def torch_ms(model, x, iters):
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def octserve_bench(args, arch, weights, batch, *extra):
    cmd = [str(BIN), "--threads", str(args.threads), "bench", "--arch", arch,
           "--alpha", str(args.alpha), "--input-size", str(args.size),
           "--in-channels", str(args.in_channels), "--num-classes", str(args.classes),
           "--weights", str(weights), "--batch-size", str(batch), "--iters", str(args.iters),
           "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet50,oct-resnet50")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "target" / "peers"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    archs = args.archs.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    models, weights = {}, {}
    for arch in archs:
        model = octnets.build(arch, alpha=args.alpha, in_channels=args.in_channels,
                              num_classes=args.classes).eval()
        weights[arch] = out / f"{arch}-a{args.alpha}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()
                   if not k.endswith("num_batches_tracked")}, str(weights[arch]))
        models[arch] = model

    impls = ["octserve", "torch_nchw", "torch_channels_last"]
    samples = {(a, b, i): [] for a in archs for b in batches for i in impls}
    pairs = [(a, a.removeprefix("oct-")) for a in archs
             if a.startswith("oct-") and a.removeprefix("oct-") in archs]
    per_pass = {(a, b): [] for a, _ in pairs for b in batches}
    for _ in range(args.rounds):
        for oct_arch, vanilla in pairs:
            for batch in batches:
                report = octserve_bench(args, oct_arch, weights[oct_arch], batch,
                                        "--versus", vanilla)
                per_pass[(oct_arch, batch)].append(report["versus"]["ratio_p50"])
        for arch in archs:
            for batch in batches:
                x = torch.randn(batch, args.in_channels, args.size, args.size)
                samples[(arch, batch, "octserve")].append(
                    octserve_bench(args, arch, weights[arch], batch)["latency_ms_p50"])
                samples[(arch, batch, "torch_nchw")].append(
                    torch_ms(models[arch], x, args.iters))
                cl = models[arch].to(memory_format=torch.channels_last)
                samples[(arch, batch, "torch_channels_last")].append(
                    torch_ms(cl, x.to(memory_format=torch.channels_last), args.iters))
                models[arch] = cl.to(memory_format=torch.contiguous_format)
    ms = {k: statistics.median(v) for k, v in samples.items()}

    print(f"{args.size}x{args.size}, {args.threads} threads, f32, random weights (the same file "
          f"for both), torch {torch.__version__}, {args.rounds} interleaved rounds x "
          f"{args.iters} iterations, medians (ms per batch)\n")
    print("| arch | batch | octserve | torch NCHW | torch channels_last | octserve / best torch |")
    print("|---|---|---|---|---|---|")
    for arch in archs:
        for batch in batches:
            o, n, c = (ms[(arch, batch, i)] for i in impls)
            print(f"| {arch} | {batch} | {o:.1f} | {n:.1f} | {c:.1f} | {o / min(n, c):.2f} |")
    for oct_arch, vanilla in pairs:
        print(f"\n{oct_arch} (alpha {args.alpha}) / {vanilla} latency:")
        print("| batch | octserve per pass | octserve | torch NCHW | torch channels_last |")
        print("|---|---|---|---|---|")
        for batch in batches:
            ratios = [statistics.median(per_pass[(oct_arch, batch)])]
            ratios += [ms[(oct_arch, batch, i)] / ms[(vanilla, batch, i)] for i in impls]
            print(f"| {batch} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
