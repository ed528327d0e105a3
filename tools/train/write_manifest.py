#!/usr/bin/env python3
"""Write models/fashion-mnist/manifest.toml from the finished runs' result.json files."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "tools" / "train" / "runs"
OUT = ROOT / "models" / "fashion-mnist"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# (variant name, run / weights name, routing weight)
VARIANTS = [
    ("vanilla", "resnet20", 50),
    ("octave", "oct-resnet20-a0.50", 50),
    ("octave-a0.25", "oct-resnet20-a0.25", 0),
    ("octave-a0.75", "oct-resnet20-a0.75", 0),
]

RECIPE = ("SGD momentum 0.9 nesterov, wd 5e-4 (not BN/bias), lr 0.1 (batch 128) with "
          "0.5-epoch linear warm-up + per-step cosine to 0, label smoothing 0.1, "
          "random crop 28 (2 px zero pad) + horizontal flip, seed 0, PyTorch on CPU")


def q(s):
    return json.dumps(s, ensure_ascii=False)  # a valid TOML basic string


def main():
    lines = [
        f'name = {q("fashion-mnist")}',
        'description = ' + q("Fashion-MNIST (28x28 grayscale, 10 classes): ResNet-20 and "
                             "Octave ResNet-20 (16/32/64 channels, 3x3 stem, no max pool)"),
        "labels = [" + ", ".join(q(s) for s in LABELS) + "]",
        f'baseline = {q("vanilla")}',
        "",
        "[input]",
        "channels = 1",
        "height = 28",
        "width = 28",
        "mean = [0.2860]",
        "std = [0.3530]",
        "",
        "[training]",
        f"recipe = {q(RECIPE)}",
        f'command = {q("bash tools/train/train_all.sh")}',
    ]
    found = 0
    for variant, run, weight in VARIANTS:
        res_path = RUNS / run / "result.json"
        weights = OUT / f"{run}.safetensors"
        if not res_path.exists() or not weights.exists():
            print(f"skipping {variant}: no {res_path.relative_to(ROOT)} or weights", file=sys.stderr)
            continue
        r = json.loads(res_path.read_text())
        found += 1
        lines += [
            "",
            "[[variants]]",
            f"name = {q(variant)}",
            f"arch = {q(r['arch'])}",
            f"alpha = {float(r['alpha'])!r}",
            f"weights = {q(weights.name)}",
            f"routing_weight = {weight}",
            f"test_accuracy = {r['test_accuracy']:.4f}",
            f"epochs = {int(r['epochs'])}",
            f"train_seconds = {int(round(r['train_seconds']))}",
        ]
    (OUT / "manifest.toml").write_text("\n".join(lines) + "\n")
    print(f"wrote {(OUT / 'manifest.toml').relative_to(ROOT)} with {found} variants")


if __name__ == "__main__":
    main()
