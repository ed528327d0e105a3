#!/usr/bin/env python3
"""Convert a PyTorch ResNet / Octave-ResNet checkpoint to safetensors for octserve.

    python3 tools/convert_checkpoint.py IN.pth OUT.safetensors [--check ARCH [--alpha A]]

IN.pth may be a bare state dict (torchvision resnet50, d-li14 oct_resnet50, or a model
from tools/reference/octnets.py), a training checkpoint wrapping it as
{'state_dict': ...} (d-li14's main.py) or {'model': ...}, and keys may carry the
'module.' prefix left by DataParallel / DistributedDataParallel.

Output: plain PyTorch key names, every tensor f32 and contiguous, num_batches_tracked
dropped.  --check ARCH loads the result strictly into octnets.build(ARCH, alpha,
in_channels, num_classes, base_channels) (inferred from conv1.weight / fc.weight), so a wrong
architecture or alpha fails here rather than in the server.

The checkpoint is read with torch.load(weights_only=True); pass --unsafe to allow
arbitrary pickles (only for files you trust).
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file


def unwrap(obj):
    """Find the state dict inside a checkpoint."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return unwrap(obj[key])
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):  # a pickled nn.Module
        return obj.state_dict()
    return obj


def convert(obj):
    sd = unwrap(obj)
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            raise SystemExit(f"{k}: not a tensor ({type(v).__name__}); is this a state dict?")
        while k.startswith("module."):
            k = k[len("module."):]
        if k.endswith("num_batches_tracked"):
            continue
        # clone: safetensors refuses tensors that share storage
        out[k] = v.detach().to(torch.float32).contiguous().clone()
    return out


def check(sd, arch, alpha):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
    import octnets

    conv1 = sd["conv1.weight"]
    model = octnets.build(arch, alpha, conv1.shape[1], sd["fc.weight"].shape[0], conv1.shape[0])
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or unexpected or wrong:
        raise SystemExit(
            f"does not match {arch} alpha={alpha}: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrong shape\n  missing {missing[:4]}\n"
            f"  unexpected {unexpected[:4]}\n"
            f"  wrong {[(k, have[k], want[k]) for k in wrong[:4]]}")
    model.load_state_dict(sd, strict=False)  # only num_batches_tracked is left out
    a = f" alpha={alpha}" if arch.startswith("oct-") else ""
    print(f"ok: loads strictly into {arch}{a} in_channels={conv1.shape[1]} "
          f"base={conv1.shape[0]} classes={sd['fc.weight'].shape[0]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--check", metavar="ARCH", help="verify against tools/reference/octnets.py")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--unsafe", action="store_true", help="torch.load(weights_only=False)")
    args = ap.parse_args()

    obj = torch.load(args.input, map_location="cpu", weights_only=not args.unsafe)
    sd = convert(obj)
    if args.check:
        check(sd, args.check, args.alpha)
    save_file(sd, args.output, metadata={"source": os.path.basename(args.input)})
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {args.output}: {len(sd)} tensors, {n:,} parameters")


if __name__ == "__main__":
    main()
