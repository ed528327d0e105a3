#!/usr/bin/env python3
"""Where OpenVINO and octserve each spend a ResNet pass, stage by stage, on the same weights.

    python3 tools/peers/openvino_stages.py --arch resnet50 --batch 8 [--threads 2 --runs 3]

Builds the net and its weights as tools/peers/pytorch_vs_octserve.py does (same ONNX export,
same OpenVINO settings), then alternates runs of OpenVINO with its per-node profiling on
(`PERF_COUNT`) and of `octserve bench --profile`. Each node's or layer's time is the median over
a run's passes; a stage's time is the sum of its nodes' or layers', counted at its fastest run.
Stages: the stem (first convolution and max pool, plus OpenVINO's input reorder), layer1-4, and
the head (pooling and classifier). Both engines' profiles time each operation on its own, so the
stage sums run above a plain pass. Needs target/release/octserve.
"""
import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov

import pytorch_vs_octserve as peers

STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def stage_of(name):
    """The stage of an OpenVINO node name (`/layer2/layer2.0/conv1/...`) or an octserve layer
    name (`layer2.0.conv1`)."""
    for part in name.replace("/", ".").split("."):
        if part in STAGES[1:5]:
            return part
    if any(k in name for k in ("avgpool", "fc", "logits", "Flatten")):
        return "head"
    return "stem"


def openvino_run(compiled, x, passes):
    request = compiled.create_infer_request()
    times = collections.defaultdict(list)
    for i in range(passes + 2):
        request.infer({0: x})
        if i >= 2:
            for node in request.profiling_info:
                times[node.node_name].append(node.real_time.total_seconds() * 1e3)
    stages = collections.defaultdict(float)
    for name, ms in times.items():
        stages[stage_of(name)] += statistics.median(ms)
    return stages


def octserve_run(net, batch, threads, passes):
    report = net.octserve(threads, batch, passes, "--profile")
    stages = collections.defaultdict(float)
    for layer in report["layers"]:
        stages[stage_of(layer["name"])] += layer["ms"]
    return stages


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "oct-resnet50"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--passes", type=int, default=6)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        net = peers.Net(args.arch, peers.SETS["imagenet"], Path(scratch))
        compiled = ov.Core().compile_model(str(net.onnx(args.batch)), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(args.threads), "INFERENCE_PRECISION_HINT": "f32",
            "PERF_COUNT": "YES"})
        x = np.random.default_rng(0).random((args.batch, 3, 224, 224), dtype=np.float32)
        best = {"openvino": collections.defaultdict(lambda: float("inf")),
                "octserve": collections.defaultdict(lambda: float("inf"))}
        for _ in range(args.runs):
            runs = {"openvino": openvino_run(compiled, x, args.passes),
                    "octserve": octserve_run(net, args.batch, args.threads, args.passes)}
            for engine, stages in runs.items():
                for stage, ms in stages.items():
                    best[engine][stage] = min(best[engine][stage], ms)

    print(f"{args.arch}, batch {args.batch}, {args.threads} threads: ms per stage, the fastest of "
          f"{args.runs} alternating runs")
    print("| stage | OpenVINO | octserve | octserve / OpenVINO |")
    print("|---|---|---|---|")
    for stage in STAGES + ["total"]:
        if stage == "total":
            ov_ms, ours = (sum(best[e][s] for s in STAGES) for e in ("openvino", "octserve"))
        else:
            ov_ms, ours = best["openvino"][stage], best["octserve"][stage]
        print(f"| {stage} | {ov_ms:.2f} | {ours:.2f} | {ours / ov_ms:.2f} |")


if __name__ == "__main__":
    main()
