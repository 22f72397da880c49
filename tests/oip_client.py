"""The real Open Inference Protocol client against a running flowserve (tests/oip.rs runs it).

Usage: oip_client.py HOST:PORT CASES.json [HOST:GRPC_PORT]

For every case (a bundled model, rows — with their context tensor for a conditional model — and
what its graphs compute for them) it checks,
with tritonclient.http: server and model liveness, readiness and metadata; inference with
binary tensors (the client's default) and with JSON tensors, each output equal to the graphs
within 1e-5; the decode view; and that bad tensors (wrong datatype, wrong shape, an unknown
input) get protocol errors while the server keeps serving. With a gRPC address it checks the
same over tritonclient.grpc (raw tensors both ways), and gRPC health and reflection. Exits
non-zero on the first failure.
"""

import json
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def close(got, want, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    bad = np.abs(got - want) > 1e-5 * (1 + np.abs(want))
    assert not bad.any(), f"{what}: {got[bad][:5]} vs {want[bad][:5]}"


def datatype(array):
    return "FP32" if array.dtype == np.float32 else "FP64"


def context_of(case):
    """A conditional model's FP32 context tensor (graph values, one row per example), or None."""
    if "context" not in case:
        return None
    n = case["shape"][0]
    return np.asarray(case["context"], dtype=np.float32).reshape(n, -1)


def infer(client, model, name, array, binary, outputs=None, context=None):
    inputs = []
    for n, a in [(name, array)] + ([("context", context)] if context is not None else []):
        inp = httpclient.InferInput(n, list(a.shape), datatype(a))
        inp.set_data_from_numpy(a, binary_data=binary)
        inputs.append(inp)
    wanted = None
    if outputs is not None:
        wanted = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return client.infer(model, inputs, outputs=wanted)


def infer_grpc(client, model, name, array, context=None):
    inputs = []
    for n, a in [(name, array)] + ([("context", context)] if context is not None else []):
        inp = grpcclient.InferInput(n, list(a.shape), datatype(a))
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    return client.infer(model, inputs)


def check_grpc(address, cases):
    client = grpcclient.InferenceServerClient(url=address)
    assert client.is_server_live() and client.is_server_ready()
    for case in cases:
        model, shape = case["model"], case["shape"]
        assert client.is_model_ready(model), model
        md = client.get_model_metadata(model)
        assert md.platform == "onnx_onnxv1" and md.inputs[0].name == "x", md
        assert list(md.inputs[0].shape)[0] == -1, md
        x = np.asarray(case["x"], dtype=np.float32).reshape(shape)
        c = context_of(case)
        assert (c is None) == (len(md.inputs) == 1), md
        result = infer_grpc(client, model, "x", x, c)
        for name, want in case["expected"].items():
            close(result.as_numpy(name).reshape(-1), want, f"{model} gRPC {name}")
        z = np.asarray(case["expected"]["z"], dtype=np.float32).reshape(shape)
        dec = infer_grpc(client, model + ".decode", "z", z, c)
        close(dec.as_numpy("x").reshape(-1), case["decoded"], f"{model} gRPC decode")
    case = cases[0]
    x = np.asarray(case["x"], dtype=np.float32).reshape(case["shape"])
    expect_error("gRPC FP64", lambda: infer_grpc(client, case["model"], "x", x.astype(np.float64)),
                 "datatype FP64")
    expect_error("gRPC unknown input", lambda: infer_grpc(client, case["model"], "q", x),
                 'unknown input "q"')
    expect_error("gRPC unknown model", lambda: infer_grpc(client, "no_such_model", "x", x),
                 "no_such_model")
    again = infer_grpc(client, case["model"], "x", x)
    close(again.as_numpy("log_prob"), case["expected"]["log_prob"], "gRPC after the errors")

    # Health (grpc.health.v1) and reflection, as raw protobuf bytes: an empty
    # HealthCheckRequest answers status SERVING (field 1 = 1); listing services names ours.
    channel = grpc.insecure_channel(address)
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    assert check(b"") == b"\x08\x01", "health: SERVING"
    reflect = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    listing = b"".join(reflect(iter([b"\x3a\x00"])))
    assert b"inference.GRPCInferenceService" in listing, listing


def expect_error(what, fn, needle):
    try:
        fn()
    except InferenceServerException as e:
        assert needle in str(e), f"{what}: {e} lacks {needle!r}"
        return
    raise AssertionError(f"{what}: no error")


def main():
    host, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        cases = json.load(f)
    client = httpclient.InferenceServerClient(url=host)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"], meta
    for case in cases:
        model, shape = case["model"], case["shape"]
        x = np.asarray(case["x"], dtype=np.float32).reshape(shape)
        assert client.is_model_ready(model), model
        md = client.get_model_metadata(model)
        assert md["inputs"][0]["name"] == "x" and md["inputs"][0]["shape"][0] == -1, md
        c = context_of(case)
        if c is not None:
            assert md["inputs"][1]["name"] == "context", md
            assert md["inputs"][1]["shape"] == [-1, c.shape[1]], md
        expected = case["expected"]
        for binary in (True, False):
            how = "binary" if binary else "JSON"
            # No outputs named: the client asks for them all (as binary by default).
            result = infer(client, model, "x", x, binary,
                           None if binary else list(expected) + ["tail_probability"], c)
            for name, want in expected.items():
                got = result.as_numpy(name)
                assert got is not None, f"{model} {how}: no output {name}"
                close(got.reshape(-1), want, f"{model} {how} {name}")
            tails = result.as_numpy("tail_probability")
            assert tails is not None and tails.dtype == np.float64, f"{model}: tail_probability"
            assert ((tails > 0) & (tails <= 1)).all(), tails
        z = np.asarray(expected["z"], dtype=np.float32).reshape(shape)
        dec = infer(client, model + ".decode", "z", z, True, context=c)
        close(dec.as_numpy("x").reshape(-1), case["decoded"], f"{model} decode")
        if c is not None:
            expect_error(f"{model} without its context", lambda: infer(client, model, "x", x, True),
                         "conditional")

    # Bad tensors: protocol errors, and the server keeps serving.
    case = cases[0]
    model, shape = case["model"], case["shape"]
    x = np.asarray(case["x"], dtype=np.float32).reshape(shape)
    expect_error("FP64", lambda: infer(client, model, "x", x.astype(np.float64), True), "datatype FP64")
    wrong = np.zeros((2, case["features"] + 1), dtype=np.float32)
    expect_error("shape", lambda: infer(client, model, "x", wrong, True), "the model takes [N")
    expect_error("unknown input", lambda: infer(client, model, "q", x, True), 'unknown input "q"')
    expect_error("unknown model", lambda: infer(client, "no_such_model", "x", x, True), "no_such_model")
    again = infer(client, model, "x", x, True)
    close(again.as_numpy("log_prob"), case["expected"]["log_prob"], "after the errors")
    if len(sys.argv) > 3:
        check_grpc(sys.argv[3], cases)
    print("tritonclient: all checks passed")


if __name__ == "__main__":
    main()
