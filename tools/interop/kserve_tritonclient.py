#!/usr/bin/env python3
"""Interop check: NVIDIA's own Python client (tritonclient[grpc]) against a running octserve.

    python3 tools/interop/kserve_tritonclient.py --url 127.0.0.1:50051

Exercises the KServe v2 / Open Inference Protocol as a Triton user would: server live/ready,
server and model metadata, FP32 and BYTES requests on the shipped sample images read through the
classification extension, an N=8 request, and a wrong-shape request that must be refused.
Exits non-zero on the first failed check. `tests/kserve.rs` runs it against a real server.
"""
import argparse
import csv
import io
import sys
import tomllib
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
MODEL = "fashion-mnist"


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def samples(model_dir, count):
    """The first `count` sample images as (png bytes, label), one per class where possible."""
    rows = list(csv.DictReader(open(model_dir / "samples" / "labels.csv")))
    chosen, seen = [], set()
    for row in rows:
        if row["label"] not in seen:
            seen.add(row["label"])
            chosen.append(row)
    chosen += [r for r in rows if r not in chosen]
    return [((model_dir / "samples" / r["file"]).read_bytes(), r["label"]) for r in chosen[:count]]


def normalised(png, manifest):
    """The model input a user computes themselves: pixels / 255, minus mean, over std."""
    spec = manifest["input"]
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return ((pixels / 255.0 - spec["mean"][0]) / spec["std"][0])[None, :, :]


def top1_labels(result, n):
    strings = result.as_numpy("probabilities")
    check(strings.shape == (n, 1), f"classification output has shape ({n}, 1): {strings.shape}")
    return [s.decode().split(":", 2)[2] for s in strings[:, 0]]


def connect(client_module, doc, listener):
    """Parses `--url` and `--models`, connects `client_module`'s client (tritonclient.grpc or
    .http) and checks the health calls both protocols share. Returns (client, model_dir,
    manifest, variant names)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--url", required=True, help=f"host:port of octserve's {listener} listener")
    parser.add_argument("--models", default=str(ROOT / "models" / MODEL))
    args = parser.parse_args()
    model_dir = Path(args.models)
    manifest = tomllib.loads((model_dir / "manifest.toml").read_text())
    variants = [v["name"] for v in manifest["variants"]]

    client = client_module.InferenceServerClient(url=args.url)
    check(client.is_server_live(), "server is live")
    check(client.is_server_ready(), "server is ready")
    check(client.is_model_ready(MODEL), f"model {MODEL} is ready")
    check(client.is_model_ready(MODEL, "octave"), "variant octave is ready as a version")
    check(not client.is_model_ready("no-such-model"), "an unknown model is not ready")
    return client, model_dir, manifest, variants


def main():
    client, model_dir, manifest, variants = connect(grpcclient, __doc__, "gRPC")

    server = client.get_server_metadata()
    check(server.name == "octserve" and "classification" in server.extensions,
          f"server metadata names octserve and the classification extension: {list(server.extensions)}")
    meta = client.get_model_metadata(MODEL)
    check(sorted(meta.versions) == sorted(variants), f"versions are the variants: {list(meta.versions)}")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    check(inputs == {"input": ("FP32", [-1, 1, 28, 28]), "image": ("BYTES", [-1])},
          f"inputs: {inputs}")
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    check(outputs == {"probabilities": ("FP32", [-1, 10])}, f"outputs: {outputs}")

    top1 = [grpcclient.InferRequestedOutput("probabilities", class_count=1)]
    eight = samples(model_dir, 8)
    png, label = eight[0]

    # FP32, normalised by the client, one image, on a named variant.
    tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(normalised(png, manifest)[None])
    result = client.infer(MODEL, [tensor], model_version="octave", outputs=top1)
    check(result.get_response().model_version == "octave", "the answer names the variant asked for")
    check(top1_labels(result, 1) == [label], f"FP32 request classified as {label}")

    # BYTES: the encoded PNG, the router picks the variant.
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png], dtype=np.object_))
    result = client.infer(MODEL, [tensor], outputs=top1)
    check(result.get_response().model_version in variants,
          f"the router's variant is named: {result.get_response().model_version}")
    check(top1_labels(result, 1) == [label], f"BYTES request classified as {label}")

    # N=8 both ways, on the vanilla variant: labels in order, and the same probabilities.
    labels = [lbl for _, lbl in eight]
    tensor = grpcclient.InferInput("image", [8], "BYTES")
    tensor.set_data_from_numpy(np.array([p for p, _ in eight], dtype=np.object_))
    result = client.infer(MODEL, [tensor], model_version="vanilla", outputs=top1)
    check(top1_labels(result, 8) == labels, f"N=8 BYTES request classified in order: {labels}")
    batch = np.stack([normalised(p, manifest) for p, _ in eight])
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    probabilities = client.infer(MODEL, [tensor], model_version="vanilla").as_numpy("probabilities")
    check(probabilities.shape == (8, 10) and probabilities.dtype == np.float32,
          f"N=8 FP32 request gives FP32 [8, 10]: {probabilities.shape} {probabilities.dtype}")
    check(np.allclose(probabilities.sum(axis=1), 1, atol=1e-4), "each row of probabilities sums to 1")
    label_names = manifest["labels"]
    check([label_names[i] for i in probabilities.argmax(axis=1)] == labels,
          "N=8 FP32 argmax matches the labels")

    # A wrong shape is refused with INVALID_ARGUMENT and says what the model takes.
    tensor = grpcclient.InferInput("input", [1, 1, 27, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 27, 28), dtype=np.float32))
    try:
        client.infer(MODEL, [tensor])
        check(False, "a wrong-shape request is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and "[N, 1, 28, 28]" in e.message(),
              f"a wrong-shape request is refused: {e.status()} {e.message()}")
    print("all tritonclient checks passed")


if __name__ == "__main__":
    main()
