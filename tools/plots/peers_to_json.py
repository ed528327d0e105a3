#!/usr/bin/env python3
"""Turns the table that tools/peers/pytorch_vs_octserve.py prints into docs/data/peers.json rows.

    python3 tools/peers/pytorch_vs_octserve.py --iters 8 --rounds 5 > big.md
    python3 tools/peers/pytorch_vs_octserve.py --archs resnet20,oct-resnet20 --size 28 \
        --in-channels 1 --classes 10 --batches 1,32 --rounds 5 > small.md
    python3 tools/plots/peers_to_json.py --in-channels 3 big.md --in-channels 1 small.md \
        --out docs/data/peers.json

Each table row gives one `octserve` row and one `pytorch` row: PyTorch eager in the faster of its
two memory formats (NCHW or channels_last) for that net and batch. The input size comes from the
table's header line, the channel count from the `--in-channels` before each file (the table does
not print it). Rows from other engines already in --out (ONNX Runtime, OpenVINO) are kept; rows
of the same net, input, batch and engine are replaced.

Output schema: {"cpu", "date", "commit", "threads",
                "rows": [{"net", "input", "batch", "engine", "ms_median"}]}.
"""
import argparse
import datetime
import json
import re
from pathlib import Path

from machine import commit, cpu_name

ROOT = Path(__file__).resolve().parents[2]
HEADER = re.compile(r"^(\d+)x(\d+), (\d+) threads")
ROW = re.compile(r"^\| ([a-z0-9-]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \|$")



def parse(text, channels):
    """Returns (threads, rows) of one printed peer table."""
    threads, size, rows = None, None, []
    for line in text.splitlines():
        if m := HEADER.match(line):
            size, threads = f"{m[1]}x{m[2]}x{channels}", int(m[3])
        elif m := ROW.match(line.strip()):
            if size is None:
                raise SystemExit("table row before the header line: not the peer script's output")
            net, batch = m[1], int(m[2])
            octserve, nchw, channels_last = (float(m[i]) for i in (3, 4, 5))
            rows.append({"net": net, "input": size, "batch": batch, "engine": "octserve",
                         "ms_median": octserve})
            rows.append({"net": net, "input": size, "batch": batch, "engine": "pytorch",
                         "ms_median": min(nchw, channels_last)})
    if not rows:
        raise SystemExit("no table rows found: not the peer script's output")
    return threads, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in-channels", type=int, action="append", default=[],
                   help="channels of the next file's input (repeat once per file)")
    p.add_argument("tables", nargs="+", help="files holding the peer script's stdout")
    p.add_argument("--out", default=str(ROOT / "docs" / "data" / "peers.json"))
    p.add_argument("--cpu", default=cpu_name())
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--commit", default=commit())
    args = p.parse_intermixed_args()
    if len(args.in_channels) != len(args.tables):
        raise SystemExit("give one --in-channels per table file")

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    new, threads = [], None
    for channels, path in zip(args.in_channels, args.tables):
        threads, rows = parse(Path(path).read_text(), channels)
        new += rows
    key = lambda r: (r["net"], r["input"], r["batch"], r["engine"])  # noqa: E731
    replaced = {key(r) for r in new}
    doc["rows"] = [r for r in doc["rows"] if key(r) not in replaced] + new
    doc.update(cpu=args.cpu, date=args.date, commit=args.commit, threads=threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: doc[k] for k in ("cpu", "date", "commit", "threads", "rows")},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
