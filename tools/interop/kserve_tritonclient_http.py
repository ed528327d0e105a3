#!/usr/bin/env python3
"""Interop check: NVIDIA's own Python client (tritonclient[http]) against octserve's HTTP/REST port.

    python3 tools/interop/kserve_tritonclient_http.py --url 127.0.0.1:8000

Exercises the KServe v2 / Open Inference Protocol over HTTP as a Triton user would: server live
and ready, server and model metadata, FP32 and BYTES requests on the shipped sample images with
the tensors sent as JSON and as binary data, outputs read as JSON and as binary data and through
the classification extension, a pinned version, an N=8 request, the client's timeout, and a
wrong-shape request that must be refused. Exits non-zero on the first failed check.
`tests/http.rs` runs it against a real server.
"""
import base64
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kserve_tritonclient import MODEL, check, connect, normalised, samples  # noqa: E402


def top1_labels(result, n):
    strings = result.as_numpy("probabilities")
    check(strings.shape == (n, 1), f"classification output has shape ({n}, 1): {strings.shape}")
    # Binary outputs come back as bytes, JSON ones as str.
    return [(s.decode() if isinstance(s, bytes) else s).split(":", 2)[2] for s in strings[:, 0]]


def main():
    client, model_dir, manifest, variants = connect(httpclient, __doc__, "HTTP")

    server = client.get_server_metadata()
    check(server["name"] == "octserve" and "classification" in server["extensions"]
          and "binary_tensor_data" in server["extensions"],
          f"server metadata names octserve and its extensions: {server['extensions']}")
    meta = client.get_model_metadata(MODEL)
    check(sorted(meta["versions"]) == sorted(variants), f"versions are the variants: {meta['versions']}")
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    check(inputs == {"input": ("FP32", [-1, 1, 28, 28]), "image": ("BYTES", [-1])}, f"inputs: {inputs}")
    check(client.get_model_metadata(MODEL, "octave")["name"] == MODEL, "a version's metadata")

    eight = samples(model_dir, 8)
    labels = [label for _, label in eight]
    png, label = eight[0]

    for binary in (True, False):
        form = "binary" if binary else "JSON"
        top1 = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=1)]

        # FP32, normalised by the client, one image, on a pinned version.
        tensor = httpclient.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(normalised(png, manifest)[None], binary_data=binary)
        result = client.infer(MODEL, [tensor], model_version="octave", outputs=top1)
        check(result.get_response()["model_version"] == "octave",
              f"{form}: the answer names the version asked for")
        check(top1_labels(result, 1) == [label], f"{form}: FP32 request classified as {label}")

        # BYTES: PNGs, raw in binary data, base64 strings in JSON; the router picks the variant.
        tensor = httpclient.InferInput("image", [8], "BYTES")
        pngs = [p if binary else base64.b64encode(p) for p, _ in eight]
        tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=binary)
        result = client.infer(MODEL, [tensor], outputs=top1)
        check(result.get_response()["model_version"] in variants,
              f"{form}: the router's variant is named: {result.get_response()['model_version']}")
        check(top1_labels(result, 8) == labels, f"{form}: N=8 BYTES request classified in order")

        # N=8 FP32 with the probabilities themselves, as JSON or binary data.
        batch = np.stack([normalised(p, manifest) for p, _ in eight])
        tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        output = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        probabilities = client.infer(MODEL, [tensor], model_version="vanilla",
                                     outputs=[output]).as_numpy("probabilities")
        check(probabilities.shape == (8, 10) and probabilities.dtype == np.float32,
              f"{form}: N=8 FP32 request gives FP32 [8, 10]: {probabilities.shape}")
        check(np.allclose(probabilities.sum(axis=1), 1, atol=1e-4), f"{form}: rows sum to 1")
        label_names = manifest["labels"]
        check([label_names[i] for i in probabilities.argmax(axis=1)] == labels,
              f"{form}: N=8 FP32 argmax matches the labels")

    # No outputs named: tritonclient asks for all of them in binary.
    tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    default = client.infer(MODEL, [tensor], model_version="vanilla").as_numpy("probabilities")
    check(np.allclose(default, probabilities, atol=1e-6), "default outputs equal the named ones")

    # The client's timeout (microseconds) is the request's deadline: ample, then already past.
    timed = client.infer(MODEL, [tensor], model_version="vanilla", timeout=60_000_000)
    check(np.allclose(timed.as_numpy("probabilities"), probabilities, atol=1e-6),
          "a request with an ample timeout is answered")
    try:
        client.infer(MODEL, [tensor], timeout=0)
        check(False, "a request whose timeout has passed is refused")
    except InferenceServerException as e:
        check(e.status() == "504" and "deadline" in e.message(),
              f"a request whose timeout has passed gets 504: {e.status()} {e.message()}")

    # A wrong shape is refused with 400 and says what the model takes.
    tensor = httpclient.InferInput("input", [1, 1, 27, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 27, 28), dtype=np.float32))
    try:
        client.infer(MODEL, [tensor])
        check(False, "a wrong-shape request is refused")
    except InferenceServerException as e:
        check(e.status() == "400" and "[N, 1, 28, 28]" in e.message(),
              f"a wrong-shape request is refused: {e.status()} {e.message()}")
    print("all tritonclient.http checks passed")


if __name__ == "__main__":
    main()
