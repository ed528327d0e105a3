#!/usr/bin/env python3
"""Draws the figures of the README and docs/ from the JSON the benchmark commands write.

    pip install -r tools/plots/requirements.txt
    python3 tools/plots/make_plots.py          # docs/data/*.json -> docs/img/*.svg

| figure                    | data                        | written by                          |
|---------------------------|-----------------------------|-------------------------------------|
| docs/img/ablation.svg     | docs/data/ablation.json     | tools/train/ablation.py --json      |
| docs/img/peers.svg        | docs/data/peers.json        | tools/peers/pytorch_vs_octserve.py --json |
| docs/img/ab_timeline.svg  | docs/data/ab_timeline.json  | tools/plots/ab_timeline.py          |

A figure whose data file is missing is skipped with a note. The SVGs carry no timestamp, so a rerun
on the same data changes nothing.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["octserve", "pytorch", "onnxruntime", "openvino"]
ENGINE_NAMES = {"octserve": "octserve", "pytorch": "PyTorch eager", "onnxruntime": "ONNX Runtime",
                "openvino": "OpenVINO"}
plt.rcParams.update({"svg.hashsalt": "octserve", "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})


def source_line(doc, extra=""):
    threads = f"{doc['threads']} thread{'' if doc['threads'] == 1 else 's'}"
    return f"{doc['cpu']}, {threads}, {doc['date']}, commit {doc['commit']}{extra}"


def save(fig, path):
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")


def ablation(doc, out):
    rows = sorted(doc["rows"], key=lambda r: r["alpha"])
    base = rows[0]
    alphas = [r["alpha"] for r in rows]
    fig, (acc, rel) = plt.subplots(1, 2, figsize=(9, 3.4))
    acc.plot(alphas, [100 * r["accuracy"] for r in rows], "o-", color="tab:green")
    for r in rows:
        acc.annotate(f"{100 * r['accuracy']:.2f}%", (r["alpha"], 100 * r["accuracy"]),
                     textcoords="offset points", xytext=(0, 6), ha="center")
    acc.set(xlabel="alpha (share of low-frequency channels)", ylabel="top-1 accuracy (%)",
            title="Fashion-MNIST test accuracy (10,000 images)", xticks=alphas)
    lo = min(100 * r["accuracy"] for r in rows)
    acc.set_ylim(lo - 0.4, 100 * max(r["accuracy"] for r in rows) + 0.3)
    series = [
        ("MACs", "macs", False, "tab:blue"),
        ("activation bytes", "activation_bytes", False, "tab:purple"),
        ("latency, batch 1", "latency_ms_bs1", False, "tab:red"),
        ("time per image, batch 32", "images_per_sec_bs32", True, "tab:orange"),
    ]
    for label, key, inverse, color in series:
        ratio = [(base[key] / r[key]) if inverse else (r[key] / base[key]) for r in rows]
        rel.plot(alphas, ratio, "o-", label=label, color=color)
    rel.axhline(1.0, color="grey", lw=0.8, ls=":")
    rel.set(xlabel="alpha", ylabel="relative to vanilla ResNet-20 (alpha 0)",
            title="cost of oct-resnet20 against resnet20, 28x28x1", xticks=alphas)
    rel.legend(frameon=False, fontsize=8)
    fig.suptitle(source_line(doc, f", medians of {doc['rounds']} rounds"), fontsize=7,
                 y=0.02, va="bottom")
    save(fig, out)


def peers(doc, out):
    configs = []
    for r in doc["rows"]:
        c = (r["net"], r["input"], r["batch"])
        if c not in configs:
            configs.append(c)
    ms = {(r["net"], r["input"], r["batch"], r["engine"]): r["ms_median"] for r in doc["rows"]}
    engines = [e for e in ENGINES if any(k[3] == e for k in ms)]
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(max(6, 1.25 * len(configs)), 4))
    for i, engine in enumerate(engines):
        xs, ys, labels = [], [], []
        for j, (net, size, batch) in enumerate(configs):
            reference = ms.get((net, size, batch, "pytorch")) or ms[(net, size, batch, "octserve")]
            value = ms.get((net, size, batch, engine))
            if value is not None:
                xs.append(j + (i - (len(engines) - 1) / 2) * width)
                ys.append(value / reference)
                labels.append(f"{value:.1f}" if value >= 1 else f"{value:.2f}")
        bars = ax.bar(xs, ys, width, label=ENGINE_NAMES.get(engine, engine))
        ax.bar_label(bars, labels, fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(configs)),
                  [f"{net}\n{size}\nbatch {batch}" for net, size, batch in configs], fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("time per batch, relative to PyTorch\n(lower is faster; bars labelled in ms)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_title("octserve against its peers, same weights, f32, CPU")
    ax.legend(frameon=False, fontsize=8, ncol=len(engines))
    fig.suptitle(source_line(doc, ", medians"), fontsize=7, y=0.01, va="bottom")
    save(fig, out)


def ab_timeline(doc, out):
    samples = doc["samples"]
    names = [n for n in samples[-1]["variants"] if samples[-1]["variants"][n]["requests"] > 0]
    t = [s["t_s"] for s in samples]
    fig, (rate, lat, sav) = plt.subplots(1, 3, figsize=(11, 3.4))
    for name in names:
        reqs = [s["variants"][name]["requests"] for s in samples]
        rps = [(b - a) / (tb - ta) for a, b, ta, tb in zip(reqs, reqs[1:], t, t[1:])]
        rate.plot(t[1:], rps, label=name)
        line, = lat.plot(t, [s["variants"][name]["p50_ms"] for s in samples], label=f"{name} p50")
        lat.plot(t, [s["variants"][name]["p99_ms"] for s in samples], ls="--",
                 color=line.get_color(), label=f"{name} p99")
    rate.set(xlabel="seconds", ylabel="requests / s", title="traffic per variant")
    lat.set(xlabel="seconds", ylabel="ms", title="latency per variant")
    for name in names:
        if samples[-1]["variants"][name]["baseline"]:
            continue
        for key, style in (("compute_savings", "-"), ("memory_savings", "--"),
                           ("latency_savings", ":")):
            sav.plot(t, [100 * s["variants"][name][key] for s in samples], ls=style,
                     label=f"{name}: {key.split('_')[0]}")
    sav.axhline(0, color="grey", lw=0.8)
    sav.set(xlabel="seconds", ylabel="% saved against the baseline", title="savings gauges")
    for ax in (rate, lat, sav):
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(f"{doc['command']}\n{doc['cpu']}, {doc['cores']} cores shared with the load "
                 f"generator, {doc['date']}, commit {doc['commit']}", fontsize=7, y=0.01,
                 va="bottom")
    save(fig, out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "docs" / "data"))
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in (("ablation", ablation), ("peers", peers), ("ab_timeline", ab_timeline)):
        source = data / f"{name}.json"
        if source.exists():
            draw(json.loads(source.read_text()), out / f"{name}.svg")
        else:
            print(f"skipped {name}: no {source}")


if __name__ == "__main__":
    main()
