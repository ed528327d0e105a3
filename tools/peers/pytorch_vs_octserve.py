#!/usr/bin/env python3
"""octserve against PyTorch, ONNX Runtime and OpenVINO: same nets, weights, batches and threads.

    pip install -r tools/peers/requirements.txt
    python3 tools/peers/pytorch_vs_octserve.py --json docs/data/peers.json

Rows: ResNet-50 and Oct-ResNet-50 (alpha 0.5, random weights) at 224x224x3, batch 1 and 8, and
the shipped Fashion-MNIST ResNet-20 pair (models/fashion-mnist, 28x28x1) at batch 1 and 32
(`--sets` picks either). Every engine runs f32 on `--threads` threads, on the same weights:

- PyTorch: tools/reference/octnets.py (torchvision's ResNet and d-li14's Oct-ResNet, checked
  equal to octserve by the parity tests) in eval mode under inference_mode, in both memory
  formats (contiguous NCHW and channels_last); its row is the faster format.
- ONNX Runtime: the same modules exported to ONNX (opset 17, static shapes, one file per
  batch), CPU execution provider, graph optimisation ORT_ENABLE_ALL, intra-op threads =
  `--threads`, inter-op 1, sequential execution.
- OpenVINO: the same ONNX files compiled for its CPU plugin with PERFORMANCE_HINT LATENCY,
  NUM_STREAMS 1, INFERENCE_NUM_THREADS = `--threads` and INFERENCE_PRECISION_HINT f32 (on
  CPUs with AMX or AVX-512 BF16 it would otherwise run bf16).
- octserve: `octserve bench` on the same safetensors file.

Before timing, each engine's logits are checked against octserve's on the same input (written
by `octserve bench --logits-out`): within 1e-3 of the largest logit, or the script fails.

Timing: rounds are interleaved (every engine and batch once per round, so all rows see the same
machine load) and each row reports the median of its per-round medians. Within a round, each
engine times the octave net and its vanilla twin pass for pass, alternating which goes first,
and the median per-pass ratio is that engine's octave/vanilla figure (for octserve, `bench
--versus`, whose vanilla twin has random weights of the same shapes; timing does not depend on
the values). Needs target/release/octserve.
"""
import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "reference"))
import octnets  # noqa: E402

BIN = ROOT / "target" / "release" / "octserve"
SHIPPED = ROOT / "models" / "fashion-mnist"
ENGINES = ["octserve", "pytorch", "onnxruntime", "openvino"]
PEERS = ENGINES[1:]
NAMES = {"octserve": "octserve", "pytorch": "PyTorch", "onnxruntime": "ONNX Runtime",
         "openvino": "OpenVINO"}
# Logits of every engine within this fraction of the largest one of octserve's.
TOLERANCE = 1e-3

# name: (vanilla, octave, alpha, input side, channels, classes, batches, shipped weights or None)
SETS = {
    "imagenet": ("resnet50", "oct-resnet50", 0.5, 224, 3, 1000, [1, 8], None),
    "fashion-mnist": ("resnet20", "oct-resnet20", 0.5, 28, 1, 10, [1, 32],
                      {"resnet20": SHIPPED / "resnet20.safetensors",
                       "oct-resnet20": SHIPPED / "oct-resnet20-a0.50.safetensors"}),
}


class Net:
    """One architecture of a set: its weights file and the PyTorch module holding them."""

    def __init__(self, arch, spec, scratch):
        _, _, alpha, side, channels, classes, _, shipped = spec
        self.arch, self.alpha, self.side, self.channels, self.classes = (
            arch, alpha, side, channels, classes)
        self.model = octnets.build(arch, alpha=alpha, in_channels=channels,
                                   num_classes=classes).eval()
        if shipped:
            self.weights = shipped[arch]
            self.model.load_state_dict(load_file(self.weights), strict=False)
        else:
            self.weights = scratch / f"{arch}-a{alpha}.safetensors"
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()
                       if not k.endswith("num_batches_tracked")}, str(self.weights))
        self.scratch = scratch

    def octserve(self, threads, batch, iters, *extra):
        cmd = [str(BIN), "--threads", str(threads), "bench", "--arch", self.arch,
               "--alpha", str(self.alpha), "--input-size", str(self.side),
               "--in-channels", str(self.channels), "--num-classes", str(self.classes),
               "--weights", str(self.weights), "--batch-size", str(batch),
               "--iters", str(iters), "--json", *extra]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    def onnx(self, batch):
        """The module exported for one batch size (static shapes)."""
        path = self.scratch / f"{self.arch}-a{self.alpha}-b{batch}.onnx"
        if not path.exists():
            x = torch.randn(batch, self.channels, self.side, self.side)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.model, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"])
        return path


def runners(net, batch, threads):
    """Per engine but octserve: a callable running one pass on a given NCHW float32 array.
    PyTorch gives two (NCHW and channels_last), kept apart so the faster one is reported."""
    onnx = str(net.onnx(batch))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    ort_model = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(onnx, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    channels_last = copy.deepcopy(net.model).to(memory_format=torch.channels_last)

    def torch_pass(model, fmt):
        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x).contiguous(memory_format=fmt)).numpy()
        return run

    return {
        "pytorch_nchw": torch_pass(net.model, torch.contiguous_format),
        "pytorch_channels_last": torch_pass(channels_last, torch.channels_last),
        "onnxruntime": lambda x: ort_model.run(None, {"input": x})[0],
        "openvino": lambda x: request.infer({0: x})[0].copy(),
    }


def check_logits(net, batch, threads, run):
    """Every engine's logits against octserve's on octserve's own benchmark input."""
    path = net.scratch / f"{net.arch}-b{batch}-logits.safetensors"
    net.octserve(threads, batch, 1, "--logits-out", str(path))
    saved = load_numpy(str(path))
    x, want = saved["input"], saved["logits"]
    scale = float(np.abs(want).max())
    for name, engine in run.items():
        diff = float(np.abs(engine(x) - want).max())
        print(f"logits {net.arch} batch {batch}: {name} max |diff| {diff:.2e} "
              f"(octserve's up to {scale:.2f})", file=sys.stderr)
        if diff > TOLERANCE * max(scale, 1.0):
            sys.exit(f"{name} disagrees with octserve on {net.arch}: max |diff| {diff}")


def paired(octave, vanilla, x, iters):
    """Median ms of each of two passes timed alternately, and the median per-pass ratio."""
    for _ in range(2):
        octave(x), vanilla(x)
    times = {"octave": [], "vanilla": [], "ratio": []}
    for i in range(iters):
        order = [("octave", octave), ("vanilla", vanilla)]
        pass_ms = {}
        for name, run in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run(x)
            pass_ms[name] = (time.perf_counter() - start) * 1e3
        times["octave"].append(pass_ms["octave"])
        times["vanilla"].append(pass_ms["vanilla"])
        times["ratio"].append(pass_ms["octave"] / pass_ms["vanilla"])
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commit():
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="imagenet,fashion-mnist",
                   help=f"comma-separated, of: {', '.join(SETS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=8, help="timed passes per net, round and row")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the medians here (docs/data/peers.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scratch = Path(tempfile.mkdtemp(prefix="octserve-peers-"))

    # (set, batch) -> {"x": input, "octave": {engine: run}, "vanilla": {...}}
    cases, nets = {}, {}
    for name in args.sets.split(","):
        spec = SETS[name]
        vanilla, octave = (Net(arch, spec, scratch) for arch in spec[:2])
        nets[name] = (vanilla, octave)
        for batch in spec[6]:
            case = {"x": np.random.default_rng(0).standard_normal(
                (batch, spec[4], spec[3], spec[3]), dtype=np.float32)}
            for role, net in (("vanilla", vanilla), ("octave", octave)):
                case[role] = runners(net, batch, args.threads)
                check_logits(net, batch, args.threads, case[role])
            cases[(name, batch)] = case

    engines = ["octserve", "pytorch_nchw", "pytorch_channels_last", "onnxruntime", "openvino"]
    samples = {(c, e): {"octave": [], "vanilla": [], "ratio": []} for c in cases for e in engines}
    for _ in range(args.rounds):
        for (name, batch), case in cases.items():
            vanilla, octave = nets[name]
            report = octave.octserve(args.threads, batch, args.iters, "--versus", vanilla.arch)
            got = samples[((name, batch), "octserve")]
            got["octave"].append(report["latency_ms_p50"])
            got["vanilla"].append(report["versus"]["latency_ms_p50"])
            got["ratio"].append(report["versus"]["ratio_p50"])
            for engine in engines[1:]:
                medians = paired(case["octave"][engine], case["vanilla"][engine], case["x"],
                                 args.iters)
                for k, v in medians.items():
                    samples[((name, batch), engine)][k].append(v)
                time.sleep(0.1)  # let the previous engine's spinning threads go idle
    med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in samples.items()}

    def row(case, engine):
        """ms of both nets and the ratio for an engine; PyTorch's from its faster format."""
        if engine != "pytorch":
            return med[(case, engine)]
        fmts = [med[(case, f"pytorch_{f}")] for f in ("nchw", "channels_last")]
        return min(fmts, key=lambda m: m["octave"] + m["vanilla"])

    print(f"{cpu_name()}, {args.threads} threads, f32; octserve {commit()}, torch "
          f"{torch.__version__}, onnxruntime {ort.__version__}, openvino {ov.__version__}; "
          f"{args.rounds} interleaved rounds x {args.iters} passes per net, medians (ms per "
          f"batch; PyTorch: the faster of NCHW and channels_last)\n")
    print("| net | input | batch | octserve | PyTorch | ONNX Runtime | OpenVINO "
          "| octserve / best peer |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for (name, batch) in cases:
        vanilla, octave = nets[name]
        for role, net in (("vanilla", vanilla), ("octave", octave)):
            ms = {e: row((name, batch), e)[role] for e in ENGINES}
            best = min(ms[e] for e in PEERS)
            side = f"{net.side}x{net.side}x{net.channels}"
            cells = " | ".join(f"{ms[e]:.1f}" if ms[e] >= 10 else f"{ms[e]:.2f}" for e in ENGINES)
            print(f"| {net.arch} | {side} | {batch} | {cells} | **{ms['octserve'] / best:.2f}** |")
            rows += [{"net": net.arch, "input": net.side, "batch": batch, "engine": e,
                      "ms_median": round(ms[e], 3)} for e in ENGINES]
    print("\nOctave / vanilla, median per-pass ratio:\n")
    print("| pair | batch | " + " | ".join(NAMES[e] for e in ENGINES) + " |")
    print("|---|---|" + "---|" * len(ENGINES))
    for (name, batch) in cases:
        vanilla, octave = nets[name]
        ratios = " | ".join(f"{row((name, batch), e)['ratio']:.2f}" for e in ENGINES)
        print(f"| {octave.arch} / {vanilla.arch} | {batch} | {ratios} |")

    if args.json:
        out = {"cpu": cpu_name(), "date": datetime.datetime.now(datetime.timezone.utc)
               .strftime("%Y-%m-%d"), "commit": commit(), "threads": args.threads, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
