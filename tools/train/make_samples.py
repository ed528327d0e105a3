#!/usr/bin/env python3
"""Save the first 10 test images of each Fashion-MNIST class (t10k order) as 8-bit
grayscale PNGs in models/fashion-mnist/samples/<index>_<label-slug>.png plus labels.csv."""
import re
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import LABELS, ROOT, load_idx  # noqa: E402

PER_CLASS = 10


def slug(label):
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def write_png_gray8(path, img):
    """Minimal PNG writer (8-bit grayscale, no interlace), no PIL needed."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def main():
    images, labels = load_idx("t10k")
    out = ROOT / "models" / "fashion-mnist" / "samples"
    out.mkdir(parents=True, exist_ok=True)
    counts = [0] * len(LABELS)
    rows = []
    for i, lab in enumerate(labels.tolist()):
        if counts[lab] >= PER_CLASS:
            continue
        counts[lab] += 1
        name = f"{i:04d}_{slug(LABELS[lab])}.png"
        write_png_gray8(out / name, images[i])
        rows.append((name, lab, LABELS[lab]))
        if min(counts) == PER_CLASS:
            break
    with open(out / "labels.csv", "w", newline="\n") as f:
        f.write("file,label_index,label\n")
        for name, lab, text in rows:
            f.write(f"{name},{lab},{text}\n")
    print(f"wrote {len(rows)} samples to {out}")


if __name__ == "__main__":
    main()
