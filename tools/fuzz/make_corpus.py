#!/usr/bin/env python3
"""Writes the fuzz seed corpus from the shipped sample images (needs pillow and tritonclient),
and the headers target's seeds (its first line is the API key, each further line a header).

    python3 tools/fuzz/make_corpus.py
"""
import io
from pathlib import Path

import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "models" / "fashion-mnist" / "samples"
CORPUS = Path(__file__).resolve().parent / "corpus"


def encoded(image, fmt):
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def classify_request(png):
    # octserve.v1.ClassifyRequest: model = 1 (string), image = 3 (bytes): hand-encoded.
    def field(number, payload):
        key = bytes([number << 3 | 2])
        n, length = len(payload), b""
        while True:
            byte, n = n & 0x7F, n >> 7
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                return key + length + payload
    return field(1, b"fashion-mnist") + field(3, png)


# headers: line 1 the configured API key (empty: no key, every request passes), then one header a line.
HEADERS = {
    "timeout_valid": b"k\ngrpc-timeout: 100m\nauthorization: Bearer k\n",
    "timeout_units": b"k\ngrpc-timeout: 99999999H\ngrpc-timeout: 5S\ngrpc-timeout: 1n\n",
    "timeout_overflow": b"\ngrpc-timeout: 18446744073709551615H\n",
    "timeout_bad": b"\ngrpc-timeout: -1S\ngrpc-timeout: 1.5S\ngrpc-timeout: 123456789S\n",
    "bearer_right": b"k\nauthorization: Bearer k\n",
    "bearer_wrong": b"s3cret-key\nauthorization: Bearer s3cret-kez\nx-api-key: s3cret-keys3cret-key\n",
    "api_key_right": b"s3cret-key\nx-api-key: s3cret-key\ncontent-type: application/grpc\n",
    "api_key_after_bad_bearer": b"k\nauthorization: Basic k\nx-api-key: k\nAuthorization: Bearer k\n",
    "no_key": b"\nauthorization: Bearer k\nx-api-key: \xff\n",
}


def main():
    pngs = sorted(SAMPLES.glob("*.png"))[:4]
    image = Image.open(pngs[0])
    (CORPUS / "preprocess").mkdir(parents=True, exist_ok=True)
    (CORPUS / "requests").mkdir(parents=True, exist_ok=True)
    for choice, fmt in enumerate(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]):
        data = encoded(image.convert("RGB") if choice % 2 else image, fmt)
        (CORPUS / "preprocess" / f"{fmt.lower()}").write_bytes(bytes([choice % 4]) + data)
    for i, png in enumerate(pngs):
        (CORPUS / "preprocess" / f"sample{i}").write_bytes(bytes([i % 4]) + png.read_bytes())

    fp32 = service_pb2.ModelInferRequest(model_name="fashion-mnist")
    fp32.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    fp32.raw_input_contents.append(np.zeros((1, 1, 28, 28), np.float32).tobytes())
    fp32.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    typed = service_pb2.ModelInferRequest(model_name="fashion-mnist", model_version="octave")
    t = typed.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    t.contents.fp32_contents.extend([0.5] * 784)
    images = service_pb2.ModelInferRequest(model_name="fashion-mnist")
    images.inputs.add(name="image", datatype="BYTES", shape=[2])
    raw = b"".join(len(p.read_bytes()).to_bytes(4, "little") + p.read_bytes() for p in pngs[:2])
    images.raw_input_contents.append(raw)
    for name, message in [("fp32_raw", fp32), ("fp32_typed", typed), ("bytes_raw", images)]:
        (CORPUS / "requests" / name).write_bytes(message.SerializeToString())
    (CORPUS / "requests" / "classify").write_bytes(classify_request(pngs[0].read_bytes()))
    (CORPUS / "headers").mkdir(parents=True, exist_ok=True)
    for name, data in HEADERS.items():
        (CORPUS / "headers" / name).write_bytes(data)
    print(f"wrote {len(list(CORPUS.rglob('*')))} corpus entries under {CORPUS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
