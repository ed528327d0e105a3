#!/usr/bin/env python3
"""Sums two `octserve bench --profile --json` runs by ResNet stage, side by side.

    octserve bench --arch resnet50 --batch-size 1 --iters 10 --profile --json > vanilla.json
    octserve bench --arch oct-resnet50 --batch-size 1 --iters 10 --profile --json > octave.json
    python3 tools/peers/profile_stages.py vanilla.json octave.json

Either side may be several runs, comma-separated (`v1.json,v2.json,v3.json`): each layer then
counts with its smallest median over the runs, the least disturbed by a shared machine.

Layer names are PyTorch module paths: `layer3.2.conv1` belongs to `layer3`; the stem is `conv1`
and `maxpool`. Prints one markdown table: time, GFLOP/s, and the octave/vanilla ratios of time
and of MACs per stage; then the octave/vanilla time ratio the octave net would reach if each of
its stages ran at the vanilla stage's GFLOP/s (its MACs at the vanilla speed). The stages the
two nets share (stem, layer4, classifier) cannot save, so below that ratio the octave layers
would have to run faster per MAC than the vanilla ones.
"""
import json
import sys
from collections import OrderedDict


def stages(paths):
    runs = [json.load(open(path)) for path in paths.split(",")]
    fastest = OrderedDict()
    for run in runs:
        for layer in run["layers"]:
            ms, _ = fastest.get(layer["name"], (float("inf"), 0))
            fastest[layer["name"]] = (min(ms, layer["ms"]), layer["macs"])
    sums = OrderedDict()
    for name, (ms, macs) in fastest.items():
        name = name.split(".")[0]
        stage = "stem" if name in ("conv1", "maxpool") else name
        total_ms, total_macs = sums.get(stage, (0.0, 0))
        sums[stage] = (total_ms + ms, total_macs + macs)
    return runs[0], sums, len(runs)


def gflops(ms, macs):
    return 2 * macs / (ms * 1e6) if ms else 0.0


def total(sums):
    return sum(ms for ms, _ in sums.values())


def main():
    (vanilla, v, runs), (octave, o, _) = stages(sys.argv[1]), stages(sys.argv[2])
    fastest = f", the fastest of {runs} runs per layer" if runs > 1 else ""
    print(f"batch {vanilla['batch_size']}: total (sum of layer medians{fastest}) "
          f"{vanilla['arch']} {total(v):.1f} ms, {octave['arch']} {total(o):.1f} ms")
    print("| stage | vanilla ms | vanilla GFLOP/s | octave ms | octave GFLOP/s "
          "| octave/vanilla time | octave/vanilla MACs |")
    print("|---|---|---|---|---|---|---|")
    for stage, (vms, vmacs) in v.items():
        oms, omacs = o.get(stage, (0.0, 0))
        print(f"| {stage} | {vms:.2f} | {gflops(vms, vmacs):.0f} | {oms:.2f} "
              f"| {gflops(oms, omacs):.0f} | {oms / vms:.2f} | {omacs / max(vmacs, 1):.2f} |")
    at_vanilla_speed = sum(vms * o.get(stage, (0.0, 0))[1] / max(vmacs, 1)
                           for stage, (vms, vmacs) in v.items())
    print(f"octave/vanilla with every octave stage at the vanilla stage's GFLOP/s: "
          f"{at_vanilla_speed / total(v):.2f} (now {total(o) / total(v):.2f})")


if __name__ == "__main__":
    main()
