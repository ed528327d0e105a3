#!/usr/bin/env python3
"""Train a small (Octave-)ResNet on Fashion-MNIST on CPU and export safetensors.

Example (from the repository root):

    nice -n 15 python3 tools/train/train.py --arch oct-resnet20 --alpha 0.5 --epochs 30 \
        --out models/fashion-mnist/oct-resnet20-a0.50.safetensors \
        --run-dir tools/train/runs/oct-resnet20-a0.50 --seed 0

Recipe: normalise (0.2860, 0.3530); random crop 28 from 2 px zero padding + horizontal
flip (on whole batches, as tensors); SGD momentum 0.9 nesterov, weight decay 5e-4 (not on
BN / biases), lr 0.1 * batch/128 with a linear warm-up and cosine decay to 0 (per step),
batch 128, label smoothing 0.1.  CPU: channels_last, 1 thread by default (on this 2-core
machine shared with a Rust build, 1 thread measured as fast or faster than 2: 155-220 vs
170-830 ms/step, because OpenMP workers stall whenever one core is taken).

Resumable: after every epoch the model, optimizer, scheduler, epoch and RNG state are
saved to <run-dir>/last.pt; if that file exists the run continues from it.  Each epoch's
shuffling and augmentation come from a generator seeded with (seed, epoch), so a resumed
run is identical to an uninterrupted one.
"""
import argparse
import gzip
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

# libgomp's default active wait makes multi-threaded runs collapse (3-10x slower) when the
# cores are shared with other work; passive waiting must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "reference"))
import octnets  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# --------------------------------------------------------------------------- data


def load_idx(split, data_dir=DATA_DIR):
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' or 't10k'."""
    with gzip.open(data_dir / f"{split}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(data_dir / f"{split}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    assert len(images) == len(labels)
    return images, labels


def to_tensor(images):
    """uint8 [N, 28, 28] -> normalised float32 [N, 1, 28, 28]."""
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return x.sub_(MEAN).div_(STD)


def augment(x, gen, pad=2):
    """Random crop (zero padding in pixel space) + horizontal flip, per sample."""
    n, c, h, w = x.shape
    # Pixel value 0 (the black background) is -MEAN/STD after normalisation.
    xp = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(n)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- utilities


def param_groups(model, wd):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)  # BN weights/biases and biases
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda_factory(total_steps, warmup_steps):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def evaluate(model, x, y, batch=1000, channels_last=False):
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def export_safetensors(model, path, metadata):
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(torch.float32).contiguous().clone()
               for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", required=True, choices=["resnet20", "oct-resnet20", "resnet32",
                                                      "oct-resnet32", "resnet56", "oct-resnet56"])
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default 0.1 * batch / 128")
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 measured fastest on a shared 2-core CPU)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="keep NCHW (channels_last, the default, trains faster on CPU)")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="timing only: stop after this many training steps, save nothing")
    ap.add_argument("--train-subset", type=int, default=0,
                    help="smoke tests only: train on the first N training images")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    alpha = args.alpha if args.arch.startswith("oct-") else 0.0
    lr = args.lr if args.lr is not None else 0.1 * args.batch / 128
    command = "python3 tools/train/train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    xtr_np, ytr_np = load_idx("train")
    xte_np, yte_np = load_idx("t10k")
    if args.train_subset:
        xtr_np, ytr_np = xtr_np[:args.train_subset], ytr_np[:args.train_subset]
    xtr, ytr = to_tensor(xtr_np), torch.from_numpy(ytr_np)
    xte, yte = to_tensor(xte_np), torch.from_numpy(yte_np)

    model = octnets.build(args.arch, alpha, in_channels=1, num_classes=10)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, args.wd), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(xtr) // args.batch  # drop the last partial batch
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(total_steps, warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    start_epoch, train_seconds = 0, 0.0
    if ckpt_path.exists() and not args.max_steps:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if (ck["arch"], ck["alpha"], ck["epochs"]) != (args.arch, alpha, args.epochs):
            sys.exit(f"{ckpt_path} is for {ck['arch']} alpha {ck['alpha']} "
                     f"epochs {ck['epochs']}; remove it or use another --run-dir")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        start_epoch, train_seconds = ck["epoch"], ck["train_seconds"]
        print(f"resuming from {ckpt_path} after epoch {start_epoch}", flush=True)

    log = open(run_dir / "log.txt", "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    if start_epoch == 0 and not args.max_steps:
        say(f"# {command}")
        say(f"# params {sum(p.numel() for p in model.parameters())}, lr {lr}, "
            f"{steps_per_epoch} steps/epoch, warm-up {warmup} steps, threads {args.threads}, "
            f"channels_last {args.channels_last}")

    for epoch in range(start_epoch, args.epochs):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(xtr), generator=gen)
        model.train()
        t0 = time.time()
        loss_sum, n_seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch:(step + 1) * args.batch]
            xb = augment(xtr[idx], gen)
            if args.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = criterion(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            n_seen += len(idx)
            if args.max_steps and step + 1 >= args.max_steps:
                dt = time.time() - t0
                print(f"timing: {step + 1} steps in {dt:.1f}s = {dt / (step + 1) * 1000:.1f} ms/step"
                      f" -> {dt / (step + 1) * steps_per_epoch:.0f} s/epoch (train only), "
                      f"loss {loss_sum / n_seen:.4f}", flush=True)
                t1 = time.time()
                acc = evaluate(model, xte, yte, channels_last=args.channels_last)
                print(f"timing: eval 10k in {time.time() - t1:.1f}s (acc {acc:.4f})", flush=True)
                return
        train_dt = time.time() - t0
        acc = evaluate(model, xte, yte, channels_last=args.channels_last)
        dt = time.time() - t0
        train_seconds += dt
        say(f"epoch {epoch + 1:3d}/{args.epochs} loss {loss_sum / n_seen:.4f} "
            f"test_acc {acc:.4f} lr {sched.get_last_lr()[0]:.5f} "
            f"sec {dt:.1f} (train {train_dt:.1f}) total {train_seconds:.0f}")
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save({"arch": args.arch, "alpha": alpha, "epochs": args.epochs,
                    "epoch": epoch + 1, "train_seconds": train_seconds,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng_state(), "test_acc": acc}, tmp)
        os.replace(tmp, ckpt_path)

    # Final evaluation on all 10,000 test images, eval mode, no augmentation.
    model = model.to(memory_format=torch.contiguous_format)
    acc = evaluate(model, xte, yte)
    export_safetensors(model, args.out, {"arch": args.arch, "alpha": f"{alpha}",
                                         "dataset": "fashion-mnist",
                                         "test_accuracy": f"{acc:.4f}"})
    result = {"arch": args.arch, "alpha": alpha, "epochs": args.epochs,
              "test_accuracy": acc, "train_seconds": round(train_seconds, 1),
              "seed": args.seed, "weights": str(args.out), "command": command}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"done: test_accuracy {acc:.4f} ({round(acc * 10000)}/10000), "
        f"train_seconds {train_seconds:.0f}, wrote {args.out}")


if __name__ == "__main__":
    main()
