#!/usr/bin/env python3
"""Interop check: tritonclient's model repository calls against octserve, over gRPC or HTTP.

    python3 tools/interop/repository_tritonclient.py --url 127.0.0.1:50051 --model NAME
    python3 tools/interop/repository_tritonclient.py --http --url 127.0.0.1:8000 --model NAME

The server must run with `--model-control explicit` and serve MODEL. Checks, as a Triton user
would run them: the repository index lists the model's variants READY; unload_model takes it out
(inference then fails, the model is not ready, the index says UNAVAILABLE); load_model brings it
back and it classifies again. Exits non-zero on the first failed check. `tests/repository.rs`
runs it against a real server.
"""
import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def infer(protocol, client, model):
    tensor = protocol.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    result = client.infer(model, [tensor])
    return result.as_numpy("probabilities")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--http", action="store_true", help="tritonclient.http, not grpc")
    args = parser.parse_args()
    protocol = httpclient if args.http else grpcclient
    client = protocol.InferenceServerClient(args.url)
    model = args.model

    def repository_index():
        if args.http:
            return client.get_model_repository_index()
        return client.get_model_repository_index(as_json=True)["models"]

    def not_found(e):
        return str(e.status()) in ("404", "StatusCode.NOT_FOUND")

    index = repository_index()
    ready = [m for m in index if m["name"] == model and m.get("state") == "READY"]
    check(len(ready) >= 1 and all(m.get("version") for m in ready),
          f"index lists {model}'s variants READY: {index}")
    check(infer(protocol, client, model).shape == (1, 10), "the model answers before the unload")

    client.unload_model(model)
    check(not client.is_model_ready(model), "unloaded: not ready")
    try:
        infer(protocol, client, model)
        check(False, "unloaded: inference refused")
    except InferenceServerException as e:
        check(not_found(e) and "unknown model" in str(e), f"unloaded: inference refused ({e.status()})")
    index = repository_index()
    check([m.get("state") for m in index if m["name"] == model] == ["UNAVAILABLE"],
          f"unloaded: index says UNAVAILABLE: {index}")

    client.load_model(model)
    check(client.is_model_ready(model), "loaded again: ready")
    check(infer(protocol, client, model).shape == (1, 10), "loaded again: answers")
    try:
        client.load_model("no-such-model")
        check(False, "loading an unknown model is refused")
    except InferenceServerException as e:
        check(not_found(e), f"loading an unknown model is refused ({e.status()})")
    print("all repository checks passed")


if __name__ == "__main__":
    main()
