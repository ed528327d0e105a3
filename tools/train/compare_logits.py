#!/usr/bin/env python3
"""Rust vs PyTorch on a shipped model: same top-1 on every test image, logits within 1e-3.

    cargo run --release -- eval --model fashion-mnist --variant octave --logits-out /tmp/rust.safetensors
    python3 tools/train/compare_logits.py --variant octave --rust /tmp/rust.safetensors
"""
import argparse
import gzip
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "reference"))
import octnets  # noqa: E402


def test_images(data):
    raw = gzip.open(Path(data) / "t10k-images-idx3-ubyte.gz").read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True)
    p.add_argument("--rust", required=True, help="safetensors from `octserve eval --logits-out`")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()

    model_dir = ROOT / "models" / "fashion-mnist"
    manifest = tomllib.loads((model_dir / "manifest.toml").read_text())
    v = next(v for v in manifest["variants"] if v["name"] == args.variant)
    net = octnets.build(v["arch"], v.get("alpha", 0.0), 1, len(manifest["labels"]))
    net.load_state_dict(load_file(model_dir / v["weights"]), strict=False)
    net.eval()
    mean, std = manifest["input"]["mean"][0], manifest["input"]["std"][0]
    x = torch.from_numpy(test_images(args.data).astype(np.float32) / 255.0)
    with torch.no_grad():
        torch_logits = torch.cat([net((b - mean) / std) for b in x.split(500)])
    rust_logits = load_file(args.rust)["logits"]
    diff = (torch_logits - rust_logits).abs().max().item()
    same = (torch_logits.argmax(1) == rust_logits.argmax(1))
    # A differing top-1 counts only where PyTorch's own top two are not (nearly) tied.
    top2 = torch_logits.topk(2, dim=1).values
    tied = (top2[:, 0] - top2[:, 1]) < 1e-3
    real_mismatches = int((~same & ~tied).sum())
    print(f"{args.variant}: n={len(same)}, top-1 equal {int(same.sum())}, "
          f"mismatches outside ties {real_mismatches}, max |logit diff| {diff:.2e}")
    sys.exit(0 if real_mismatches == 0 and diff <= 1e-3 else 1)


if __name__ == "__main__":
    main()
