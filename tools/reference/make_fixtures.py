#!/usr/bin/env python3
"""Generate the PyTorch parity fixtures loaded by octserve's Rust tests.

    python3 tools/reference/make_fixtures.py              # -> tests/fixtures/parity/
    python3 tools/reference/make_fixtures.py --big DIR    # full-size resnet50 / oct-resnet50 at 224x224
    python3 tools/reference/make_fixtures.py --dli14 DIR  # also check octnets.py against d-li14's code

--dli14 DIR (or OCTSERVE_DLI14=DIR) names a checkout of https://github.com/d-li14/octconv.pytorch:
the fixtures are then written only after octnets.py's oct-resnet26/50 match its `oct_resnet.py`
(keys, shapes, outputs). Without it that check is skipped and said so.

Per configuration <name>:
  <name>.safetensors     state dict, f32, PyTorch key names, num_batches_tracked dropped
  <name>.io.safetensors  `input` [N,C,H,W] and `output` [N,classes] (eval mode)
and index.json listing every configuration.  Vanilla nets are listed with alpha 0.0.

Widths are shrunk (base_channels) so that tests/fixtures stays well under 5 MiB; the
structure (block counts, channel splits, odd sizes) is what the fixtures exercise.
"""
import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.models import resnet as tvr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import octnets  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(REPO, "tests", "fixtures", "parity")

# arch, alpha, in_channels, base_channels, (H, W).  Batch 2, 10 classes.
# Widths halved from the first plan (base 16 small nets, base 8 ImageNet-style nets) to fit;
# oct-resnet32 is quartered (base 4: 3 low / 1 high channel in layer1 at alpha 0.75).
CONFIGS = [
    ("resnet20", 0.0, 1, 8, (28, 28)),
    ("oct-resnet20", 0.5, 1, 8, (28, 28)),
    ("oct-resnet20", 0.5, 3, 8, (29, 33)),
    ("oct-resnet20", 0.25, 1, 8, (32, 32)),
    ("oct-resnet32", 0.75, 1, 4, (28, 28)),
    ("resnet18", 0.0, 3, 4, (64, 64)),
    ("resnet50", 0.0, 3, 4, (65, 47)),
    ("resnet26", 0.0, 3, 4, (64, 64)),
    ("oct-resnet26", 0.5, 3, 4, (64, 64)),
    ("oct-resnet26", 0.5, 3, 4, (75, 53)),
    ("oct-resnet50", 0.5, 3, 4, (96, 96)),
    ("oct-resnet50", 0.25, 3, 4, (57, 57)),
]
BATCH, CLASSES = 2, 10


def randomise_bn(model):
    """Non-trivial BatchNorm statistics so that folding/ordering errors show up."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def rescale_convs(model):
    """Variance-preserving conv weights (std 1/sqrt(fan_in)) so eval outputs stay O(1).

    The training init (kaiming fan_out per octave sub-conv, as d-li14) roughly doubles the
    variance at every octave conv; train-mode BN hides that, but with random running
    statistics deep nets reach |y| ~ 1e5, which would make parity tolerances meaningless.
    An octave output branch sums two sub-convs, so their fans are added.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, m.weight[0].numel() ** -0.5)
    for m in model.modules():
        if isinstance(m, octnets.OctaveConv):
            for branch in ((m.conv_h2h, m.conv_l2h), (m.conv_h2l, m.conv_l2l)):
                branch = [c for c in branch if c is not None]
                fan = sum(c.weight[0].numel() for c in branch)
                for c in branch:
                    nn.init.normal_(c.weight, 0, fan ** -0.5)


def tensors(model):
    return {k: v.detach().float().contiguous().clone()
            for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def write(out_dir, entry, model, x):
    with torch.no_grad():
        y = model(x)
    name = entry["name"]
    save_file(tensors(model), os.path.join(out_dir, f"{name}.safetensors"))
    save_file({"input": x.contiguous(), "output": y.contiguous()},
              os.path.join(out_dir, f"{name}.io.safetensors"))
    print(f"{name}: out {tuple(y.shape)} max|y|={y.abs().max():.3g}")


def verify(out_dir, e):
    """Round trip: rebuild from the index entry alone, load the files, reproduce the output."""
    sd = load_file(os.path.join(out_dir, f"{e['name']}.safetensors"))
    io = load_file(os.path.join(out_dir, f"{e['name']}.io.safetensors"))
    assert all(t.dtype == torch.float32 for t in [*sd.values(), *io.values()])
    assert list(io["input"].shape) == e["input_shape"]
    model = octnets.build(e["arch"], e["alpha"], e["in_channels"], e["num_classes"], e["base_channels"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    with torch.no_grad():
        assert torch.equal(model.eval()(io["input"]), io["output"]), e["name"]


def make(seed, arch, alpha, in_ch, classes, base, hw, batch):
    torch.manual_seed(seed)
    model = octnets.build(arch, alpha, in_ch, classes, base)
    rescale_convs(model)
    randomise_bn(model)
    model.eval()
    return model, torch.randn(batch, in_ch, *hw)


def entry(name, arch, alpha, in_ch, classes, base, hw, batch):
    return dict(name=name, arch=arch, alpha=alpha, in_channels=in_ch, num_classes=classes,
                base_channels=base, input_shape=[batch, in_ch, *hw])


def shapes(model):
    return {k: tuple(v.shape) for k, v in tensors(model).items()}


def same_output(a, b, x, tol=1e-5):
    """Load a's weights into b and compare eval outputs."""
    b.load_state_dict(a.state_dict(), strict=True)
    b.eval()
    with torch.no_grad():
        d = (a(x) - b(x)).abs().max().item()
    assert d < tol, d
    return d


# --------------------------------------------------------------------------- checks


def load_dli14(checkout):
    """Import d-li14's original octconv.py / oct_resnet.py from a temp copy (outside the repo)."""
    tmp = tempfile.mkdtemp(prefix="dli14-")
    for f in ("octconv.py", "oct_resnet.py"):
        shutil.copy(os.path.join(checkout, f), os.path.join(tmp, f))
    sys.path.insert(0, tmp)
    try:
        return importlib.import_module("oct_resnet")
    finally:
        sys.path.remove(tmp)
        shutil.rmtree(tmp)


def checks(dli14):
    # 1. ceil-mode 2x2 average pool divides an overhanging window by the cells it covers.
    x = torch.arange(9.0).view(1, 1, 3, 3)
    want = torch.tensor([[[[2.0, 3.5], [6.5, 8.0]]]])
    assert torch.equal(F.avg_pool2d(x, 2, 2, ceil_mode=True), want)
    assert torch.equal(nn.AvgPool2d(2, 2, ceil_mode=True)(x), want)
    print("ok: ceil-mode avg pool divides by the valid count")

    # 2. a=0.5, base 64: identical to d-li14's oct_resnet50 (keys, shapes, outputs).
    if dli14:
        dl = load_dli14(dli14)
        torch.manual_seed(1)
        mine = octnets.build("oct-resnet50", 0.5, 3, 1000, 64)
        randomise_bn(mine)
        mine.eval()
        theirs = dl.oct_resnet50()
        assert shapes(mine) == shapes(theirs), "state dict differs from d-li14"
        d = same_output(mine, theirs, torch.randn(2, 3, 64, 64))
        print(f"ok: oct-resnet50 a=0.5 == d-li14 oct_resnet50 (keys/shapes; 64x64 max diff {d:.2e})")
        mine26 = octnets.build("oct-resnet26", 0.5, 3, 1000, 64)
        assert shapes(mine26) == shapes(dl.oct_resnet26())
        print("ok: oct-resnet26 a=0.5 keys/shapes == d-li14 oct_resnet26")
    else:
        print("skipped: the check against d-li14's code (no --dli14 checkout given)")

    # 3. Vanilla nets at base 64 are torchvision's.
    for arch, ctor in (("resnet18", tvr.resnet18), ("resnet50", tvr.resnet50)):
        torch.manual_seed(2)
        mine = octnets.build(arch, 0.0, 3, 1000, 64)
        randomise_bn(mine)
        mine.eval()
        tv = ctor()
        assert shapes(mine) == shapes(tv)
        d = same_output(mine, tv, torch.randn(1, 3, 64, 64))
        print(f"ok: {arch} == torchvision {arch} (keys/shapes; max diff {d:.2e})")

    # 4. Even sizes: a crop after upsampling is a no-op, so odd-size support changes nothing.
    conv = octnets.OctaveConv(8, 8, 3, 0.5, 0.5, padding=1)
    xh, xl = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3)
    yh, _ = conv((xh, xl))
    ref = conv.conv_h2h(xh) + F.interpolate(conv.conv_l2h(xl), scale_factor=2, mode="nearest")
    assert torch.equal(yh, ref)
    print("ok: upsample crop is a no-op at even sizes")


def write_keys(path, model):
    with open(path, "w") as fh:
        for k, s in sorted(shapes(model).items()):
            fh.write(f"{k}\t{','.join(map(str, s))}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", metavar="DIR", help="write full-size 224x224 fixtures to DIR instead")
    ap.add_argument("--dli14", metavar="DIR", default=os.environ.get("OCTSERVE_DLI14"),
                    help="a checkout of d-li14/octconv.pytorch to check octnets.py against")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    if args.big:
        os.makedirs(args.big, exist_ok=True)
        index = []
        for i, (arch, alpha) in enumerate((("oct-resnet50", 0.5), ("resnet50", 0.0))):
            e = entry(f"{arch}_full_224", arch, alpha, 3, 1000, 64, (224, 224), 1)
            model, x = make(100 + i, arch, alpha, 3, 1000, 64, (224, 224), 1)
            write(args.big, e, model, x)
            verify(args.big, e)
            index.append(e)
            print(json.dumps(e))
        with open(os.path.join(args.big, "index.json"), "w") as fh:
            json.dump(index, fh, indent=1)
        return

    checks(args.dli14)
    os.makedirs(OUT, exist_ok=True)
    index = []
    for i, (arch, alpha, in_ch, base, hw) in enumerate(CONFIGS):
        name = f"{arch}{f'_a{alpha}' if arch.startswith('oct-') else ''}_b{base}_c{in_ch}_{hw[0]}x{hw[1]}"
        e = entry(name, arch, alpha, in_ch, CLASSES, base, hw, BATCH)
        model, x = make(i, arch, alpha, in_ch, CLASSES, base, hw, BATCH)
        write(OUT, e, model, x)
        verify(OUT, e)
        index.append(e)
    with open(os.path.join(OUT, "index.json"), "w") as fh:
        json.dump(index, fh, indent=1)
    for arch in ("oct-resnet50", "resnet50"):
        write_keys(os.path.join(OUT, f"keys_{arch}.txt"), octnets.build(arch, 0.5, 3, 1000, 64))
    print(f"wrote {len(index)} configurations to {OUT} (each reloaded and reproduced exactly)")


if __name__ == "__main__":
    main()
