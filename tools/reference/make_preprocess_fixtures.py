#!/usr/bin/env python3
"""Generate the image-preprocessing fixtures loaded by tests/preprocess.rs.

    python3 tools/reference/make_preprocess_fixtures.py   # -> tests/fixtures/preprocess/

Writes a few small images (PNG gray, RGB and RGBA, JPEG gray and RGB, non-square, down- and
upscaled, one already at the model's size) and `expected.json`: for each (image, input spec),
the normalised CHW floats octserve's preprocessing must produce, computed here with Pillow
(decoding) and numpy (everything else). Needs `numpy` and `Pillow`. Deterministic.

What src/preprocess.rs documents, reproduced independently:
- Channels: RGBA to RGB drops alpha; gray to RGB repeats the gray value; RGB to gray is the
  `image` crate's luma of sRGB's (BT.709) primaries on the encoded values, no linearisation:
  0.2126 R + 0.7152 G + 0.0722 B, rounded.
- Resize: antialiased bilinear convolution (`fast_image_resize`'s Convolution(Bilinear), the
  algorithm of Pillow's BILINEAR): output pixel i of a side scaled by s = in / out samples
  around source position (i + 0.5) s with the triangle filter widened to max(s, 1) source
  pixels, weights normalised to sum 1; rows then columns, rounded to u8 at the end. Computed
  here in float64 with one final rounding. Pillow's own resize rounds to u8 between its two
  passes and so may differ from this by 1; the script reports how far it is.
- Normalisation: (v / 255 - mean[c]) / std[c].

The Rust test allows `tolerance_lsb` u8 steps (scaled by 1 / (255 std)): 1 for PNGs, the
fast_image_resize fixed-point passes' own rounding (half a step between passes, half at the
end); 2 for JPEGs, where the decoders (libjpeg-turbo here, zune-jpeg in `image`) may also
differ by a step in the IDCT.
"""
import json
import os

import numpy as np
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(REPO, "tests", "fixtures", "preprocess")

GRAY_SPEC = {"channels": 1, "height": 28, "width": 28, "mean": [0.5], "std": [0.25]}
# Non-square, with ImageNet's normalisation.
RGB_SPEC = {
    "channels": 3,
    "height": 24,
    "width": 32,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def pattern(width, height, channels, seed):
    """Smooth gradients, stripes and noise: survives JPEG, shows a wrong offset or scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for c in range(channels):
        v = (
            90 * (0.5 + 0.5 * np.sin(x / (3.0 + 2 * c) + y / 7.0))
            + 80 * (x / width * 0.6 + y / height * 0.4)
            + rng.normal(0, 12, (height, width))
        )
        planes.append(np.clip(v, 0, 255))
    return np.stack(planes, axis=-1).round().astype(np.uint8)


def write_images():
    """(file name, PIL image) of every fixture image."""
    images = {
        "gray_40x30.png": Image.fromarray(pattern(40, 30, 1, 1)[..., 0], "L"),
        "gray_20x17.png": Image.fromarray(pattern(20, 17, 1, 2)[..., 0], "L"),
        "gray_28x28.png": Image.fromarray(pattern(28, 28, 1, 3)[..., 0], "L"),
        "rgb_50x37.png": Image.fromarray(pattern(50, 37, 3, 4), "RGB"),
        "rgba_33x45.png": Image.fromarray(pattern(33, 45, 4, 5), "RGBA"),
        "rgb_45x40.jpg": Image.fromarray(pattern(45, 40, 3, 6), "RGB"),
        "gray_50x41.jpg": Image.fromarray(pattern(50, 41, 1, 7)[..., 0], "L"),
    }
    os.makedirs(OUT, exist_ok=True)
    for name, image in images.items():
        path = os.path.join(OUT, name)
        if name.endswith(".jpg"):
            # 4:4:4: no chroma subsampling, whose upsampling differs between decoders.
            image.save(path, quality=95, subsampling=0)
        else:
            image.save(path, optimize=False)


def decoded(name):
    """The file decoded by Pillow, as HxWxC uint8 with its own channel count."""
    with Image.open(os.path.join(OUT, name)) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def to_channels(pixels, channels):
    if channels == 3:
        if pixels.shape[2] == 1:
            return np.repeat(pixels, 3, axis=2)
        return pixels[..., :3]
    if pixels.shape[2] == 1:
        return pixels
    rgb = pixels[..., :3].astype(np.float64)
    luma = np.floor(0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2] + 0.5)
    return np.clip(luma, 0, 255)[..., None].astype(np.uint8)


def resize_weights(in_size, out_size):
    """out_size x in_size matrix of the antialiased bilinear filter's normalised weights."""
    scale = in_size / out_size
    width = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale
    sources = np.arange(in_size) + 0.5
    w = np.clip(1 - np.abs((sources[None, :] - centers[:, None]) / width), 0, None)
    return w / w.sum(axis=1, keepdims=True)


def resize(pixels, height, width):
    in_h, in_w, _ = pixels.shape
    if (in_h, in_w) == (height, width):
        return pixels.astype(np.float64)
    rows, cols = resize_weights(in_h, height), resize_weights(in_w, width)
    out = np.einsum("ij,jkc,lk->ilc", rows, pixels.astype(np.float64), cols)
    return np.clip(np.floor(out + 0.5), 0, 255)


def expected(name, spec):
    pixels = to_channels(decoded(name), spec["channels"])
    resized = resize(pixels, spec["height"], spec["width"])
    mean = np.array(spec["mean"])
    std = np.array(spec["std"])
    values = (resized / 255.0 - mean) / std
    # Cross-check against Pillow's own resize (u8 between its passes).
    mode = "L" if spec["channels"] == 1 else "RGB"
    pil = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    pil = np.asarray(pil.resize((spec["width"], spec["height"]), Image.BILINEAR), np.float64)
    pil = pil[..., None] if pil.ndim == 2 else pil
    print(f"{name} -> {spec['channels']}x{spec['height']}x{spec['width']}: "
          f"Pillow's resize differs by at most {np.abs(pil - resized).max():.0f}")
    return values.transpose(2, 0, 1).reshape(-1)


def main():
    write_images()
    cases = [
        ("gray_40x30.png", GRAY_SPEC),
        ("gray_20x17.png", GRAY_SPEC),
        ("gray_28x28.png", GRAY_SPEC),
        ("gray_40x30.png", RGB_SPEC),
        ("rgb_50x37.png", RGB_SPEC),
        ("rgb_50x37.png", GRAY_SPEC),
        ("rgba_33x45.png", RGB_SPEC),
        ("rgb_45x40.jpg", RGB_SPEC),
        ("gray_50x41.jpg", GRAY_SPEC),
    ]
    fixtures = []
    for name, spec in cases:
        fixtures.append({
            "image": name,
            "spec": spec,
            "tolerance_lsb": 2 if name.endswith(".jpg") else 1,
            "values": [round(float(v), 6) for v in expected(name, spec)],
        })
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(fixtures, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
