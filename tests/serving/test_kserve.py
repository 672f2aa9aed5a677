"""inference.GRPCInferenceService (KServe v2 / Triton) on the StyleService port, driven by the stock tritonclient[grpc].

The server runs in-process (ServerThread); tritonclient runs in a subprocess (CLIENT_SCRIPT). They cannot share a
process: both register the proto package `inference` in protobuf's default descriptor pool. The subprocess runs
every client scenario once (module fixture) and writes its results; the tests below check them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protos.stylecast.v1 import style_pb2 as pb
from serving.client import latents, output_options

# find_spec, not importorskip: importing tritonclient here would clash with the server's protos.
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                 reason="tritonclient[grpc] not installed")]

NUM_WS, W_DIM, Z_DIM, RES = 8, 64, 64, 32
SEEDS = [3, 1, 4]

CLIENT_SCRIPT = r'''
import json, queue, sys, time
from functools import partial
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

target, out_dir = sys.argv[1], sys.argv[2]
inp = np.load(f"{out_dir}/inputs.npz")
c = g.InferenceServerClient(target)
res, arrays = {}, {}

def tensor(name, arr, dtype):
    t = g.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t

def error(fn):
    try:
        fn()
    except InferenceServerException as e:
        return [e.status(), e.message()]
    return None

res["live"], res["ready"] = c.is_server_live(), c.is_server_ready()
res["model_ready"] = {m: c.is_model_ready(m) for m in ("tiny", "tiny.synthesis", "nope")}
res["server_metadata"] = c.get_server_metadata(as_json=True)
res["metadata"] = {m: c.get_model_metadata(m, as_json=True) for m in ("tiny", "tiny.synthesis")}
res["config"] = {m: c.get_model_config(m, as_json=True) for m in ("tiny", "tiny.synthesis")}

seeds = inp["seeds"].reshape(-1, 1)
out = [g.InferRequestedOutput("IMAGE")]
r = c.infer("tiny", [tensor("SEED", seeds, "INT64")], outputs=out, request_id="req-seed")
arrays["seed"] = r.as_numpy("IMAGE")
res["seed_response"] = r.get_response(as_json=True)
arrays["seed_psi"] = c.infer("tiny", [tensor("SEED", seeds, "INT64"),
                                      tensor("PSI", np.full((len(seeds), 1), 0.6, np.float32), "FP32")]).as_numpy("IMAGE")
arrays["z"] = c.infer("tiny", [tensor("Z", inp["z"], "FP32")], outputs=out).as_numpy("IMAGE")
arrays["ws"] = c.infer("tiny.synthesis", [tensor("WS", inp["ws"], "FP32")]).as_numpy("IMAGE")

res["errors"] = {
    "datatype": error(lambda: c.infer("tiny", [tensor("SEED", seeds.astype(np.float32), "FP32")])),
    "shape": error(lambda: c.infer("tiny.synthesis", [tensor("WS", inp["ws"][:, :3], "FP32")])),
    "unknown_model": error(lambda: c.infer("nope", [tensor("SEED", seeds, "INT64")])),
    "unknown_input": error(lambda: c.infer("tiny", [tensor("SEEDS", seeds, "INT64")])),
    "seed_and_z": error(lambda: c.infer("tiny", [tensor("SEED", seeds, "INT64"), tensor("Z", inp["z"], "FP32")])),
    "nan": error(lambda: c.infer("tiny", [tensor("Z", np.full((1, 64), np.nan, np.float32), "FP32")])),
    "unimplemented": error(lambda: c.get_inference_statistics("tiny")),
}

# Streaming: five requests, the third one bad; then one more after the error (the stream stays open).
results = queue.Queue()
def callback(result, error):
    results.put((result, error))
c.start_stream(callback=callback)
for i in range(5):
    s = np.array([[int(inp["seeds"][i % 3])]], np.int64)
    if i == 2:
        c.async_stream_infer("tiny", [tensor("SEED", s.astype(np.float32), "FP32")], request_id=f"s{i}")
    else:
        c.async_stream_infer("tiny", [tensor("SEED", s, "INT64")], request_id=f"s{i}")
got = [results.get(timeout=30) for _ in range(5)]
c.async_stream_infer("tiny.synthesis", [tensor("WS", inp["ws"][:1], "FP32")], request_id="s5")
got.append(results.get(timeout=30))
c.stop_stream()
stream = []
for result, err in got:
    if err is not None:
        stream.append({"error": str(err)})
    else:
        resp = result.get_response()
        rid = resp.id
        arrays["stream_" + rid] = result.as_numpy("IMAGE")
        stream.append({"id": rid, "final": resp.parameters["triton_final_response"].bool_param})
res["stream"] = stream
c.close()
np.savez(f"{out_dir}/arrays.npz", **arrays)
with open(f"{out_dir}/results.json", "w") as f:
    json.dump(res, f)
'''


@pytest.fixture(scope="module")
def kserve_run(shared_server, tiny_bundle, tmp_path_factory):
    """Run CLIENT_SCRIPT (tritonclient in a subprocess) against the shared in-process server once."""
    import onnxruntime as ort

    from serving import latents as L
    out = tmp_path_factory.mktemp("kserve")
    m = json.loads((tiny_bundle / "manifest.json").read_text())["model"]
    z = L.seeds_to_z(SEEDS, Z_DIM)
    mp = ort.InferenceSession(str(tiny_bundle / "mapping.onnx"), providers=["CPUExecutionProvider"])
    w = mp.run(["w"], {"z": z, "psi": np.ones(len(z), np.float32)})[0]
    ws = L.truncate(L.broadcast(w, NUM_WS), np.asarray(m["w_avg"], np.float32), 0.5)
    np.savez(out / "inputs.npz", seeds=np.array(SEEDS, np.int64), z=z, ws=ws)
    proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, shared_server.target, str(out)],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "results.json").read_text())
    with np.load(out / "arrays.npz") as a:
        arrays = {k: a[k] for k in a.files}
    return res, arrays, ws


def generate(server, psi: float | None = None, token: str | None = None, **lat) -> np.ndarray:
    """StyleService Generate with RAW_RGB8 output -> uint8 [N, R, R, 3]."""
    req = pb.GenerateRequest(model="tiny", latents=latents(**lat), output=output_options("raw"))
    if psi is not None:
        req.psi = psi
    with server.client(token=token) as c:
        resp = c.generate_raw(req)
    return np.stack([np.frombuffer(im.data, np.uint8).reshape(RES, RES, 3) for im in resp.images])


def test_health_and_server_metadata(kserve_run):
    res, _, _ = kserve_run
    assert res["live"] is True and res["ready"] is True
    assert res["model_ready"] == {"tiny": True, "tiny.synthesis": True, "nope": False}
    assert res["server_metadata"]["name"] == "stylecast"
    assert res["server_metadata"].get("extensions", []) == ["model_configuration"]


def test_model_metadata_and_config(kserve_run, shared_server):
    res, _, _ = kserve_run
    version = shared_server.call(lambda: shared_server.repository.models["tiny"].version)
    md = res["metadata"]["tiny"]
    assert md["name"] == "tiny" and md["versions"] == [version] and md["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]] == [
        ("SEED", "INT64", [-1, 1]), ("Z", "FP32", [-1, Z_DIM]), ("PSI", "FP32", [-1, 1])]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]] == [
        ("IMAGE", "UINT8", [-1, RES, RES, 3])]
    ms = res["metadata"]["tiny.synthesis"]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in ms["inputs"]] == [("WS", [-1, NUM_WS, W_DIM])]

    cfg = res["config"]["tiny"]["config"]
    assert cfg["name"] == "tiny" and cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert cfg["max_batch_size"] == 64  # Limits.max_seeds: rows one request may carry
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]], i.get("optional", False))
            for i in cfg["input"]] == [("SEED", "TYPE_INT64", [1], False), ("Z", "TYPE_FP32", [Z_DIM], True),
                                       ("PSI", "TYPE_FP32", [1], True)]
    assert [(o["name"], o["data_type"], [int(d) for d in o["dims"]]) for o in cfg["output"]] == [
        ("IMAGE", "TYPE_UINT8", [RES, RES, 3])]
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [8]
    assert int(cfg["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000
    assert cfg.get("model_transaction_policy", {}).get("decoupled", False) is False
    scfg = res["config"]["tiny.synthesis"]["config"]
    assert [(i["name"], [int(d) for d in i["dims"]]) for i in scfg["input"]] == [("WS", [NUM_WS, W_DIM])]


def test_infer_matches_style_service(kserve_run, shared_server):
    res, arrays, ws = kserve_run
    assert res["seed_response"]["id"] == "req-seed" and res["seed_response"]["model_name"] == "tiny"
    assert res["seed_response"]["outputs"][0]["datatype"] == "UINT8"
    default = generate(shared_server, seeds=SEEDS)          # psi unset -> the bundle's default_psi, both ways
    assert arrays["seed"].shape == (3, RES, RES, 3) and arrays["seed"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["seed"], default)
    np.testing.assert_array_equal(arrays["seed_psi"], generate(shared_server, psi=0.6, seeds=SEEDS))
    assert not np.array_equal(arrays["seed_psi"], arrays["seed"])
    np.testing.assert_array_equal(arrays["z"], default)     # Z = RandomState(seed).randn: same images
    np.testing.assert_array_equal(arrays["ws"], generate(shared_server, psi=1.0, ws=ws))  # psi 1: no re-truncation
    np.testing.assert_array_equal(arrays["ws"], generate(shared_server, psi=0.5, seeds=SEEDS))


def test_errors_name_the_tensor(kserve_run):
    errors = kserve_run[0]["errors"]
    code, msg = errors["datatype"]
    assert code == "StatusCode.INVALID_ARGUMENT" and "'SEED'" in msg and "INT64" in msg
    code, msg = errors["shape"]
    assert code == "StatusCode.INVALID_ARGUMENT" and "'WS'" in msg and "shape" in msg
    code, msg = errors["unknown_model"]
    assert code == "StatusCode.NOT_FOUND" and "nope" in msg
    code, msg = errors["unknown_input"]
    assert code == "StatusCode.INVALID_ARGUMENT" and "'SEEDS'" in msg
    assert errors["seed_and_z"][0] == "StatusCode.INVALID_ARGUMENT"
    code, msg = errors["nan"]
    assert code == "StatusCode.INVALID_ARGUMENT" and "'Z'" in msg and "NaN" in msg
    assert errors["unimplemented"][0] == "StatusCode.UNIMPLEMENTED"


def test_stream_errors_in_band_and_stays_open(kserve_run, shared_server):
    res, arrays, ws = kserve_run
    stream = res["stream"]
    errs = [s for s in stream if "error" in s]
    oks = sorted(s["id"] for s in stream if "id" in s)
    assert len(errs) == 1 and "INVALID_ARGUMENT" in errs[0]["error"] and "'SEED'" in errs[0]["error"]
    assert oks == ["s0", "s1", "s3", "s4", "s5"]  # s5 was sent after the error: the stream stayed open
    assert all(s["final"] for s in stream if "id" in s)
    default = generate(shared_server, seeds=SEEDS)
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(arrays[f"stream_s{i}"][0], default[i % 3])
    np.testing.assert_array_equal(arrays["stream_s5"], generate(shared_server, psi=1.0, ws=ws[:1]))


def test_requests_and_errors_are_counted(kserve_run, shared_server):
    assert shared_server.metric("stylecast_requests_total", method="ModelInfer", model="tiny") >= 4
    assert shared_server.metric("stylecast_errors_total", method="ModelInfer", code="INVALID_ARGUMENT") >= 4
    assert shared_server.metric("stylecast_errors_total", method="ModelInfer", model="_unknown", code="NOT_FOUND") == 1
    assert shared_server.metric("stylecast_requests_total", method="ModelStreamInfer") == 6
    assert shared_server.metric("stylecast_errors_total", method="ModelStreamInfer", code="INVALID_ARGUMENT") == 1


def test_auth_applies_to_inference_service(server_factory, tmp_path, tiny_bundle, copy_bundle, auth_token):
    """Our own stubs in-process (no tritonclient here): the bearer-token interceptor guards inference.* too."""
    import grpc

    from protos.inference import grpc_service_pb2 as ipb
    from protos.inference import grpc_service_pb2_grpc as ipb_grpc
    copy_bundle(tiny_bundle, tmp_path / "tiny")
    srv = server_factory(tmp_path, auth_tokens=(auth_token,))
    req = ipb.ModelInferRequest(model_name="tiny", id="a1")
    t = req.inputs.add(name="SEED", datatype="INT64", shape=[2, 1])
    t.contents.int64_contents.extend([3, 1])  # typed contents instead of raw bytes
    with grpc.insecure_channel(srv.target) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ServerLive(ipb.ServerLiveRequest(), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {auth_token}"),)
        assert stub.ServerLive(ipb.ServerLiveRequest(), metadata=md, timeout=10).live
        resp = stub.ModelInfer(req, metadata=md, timeout=30)
    assert resp.id == "a1" and list(resp.outputs[0].shape) == [2, RES, RES, 3]
    img = np.frombuffer(resp.raw_output_contents[0], np.uint8).reshape(2, RES, RES, 3)
    np.testing.assert_array_equal(img, generate(srv, seeds=[3, 1], token=auth_token))
