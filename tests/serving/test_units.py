"""Unit tests of the serving parts that need no server: latent math, codecs, batcher, backend selection, config,
logs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time

import numpy as np
import pytest

from serving import latents as L
from serving.backends import (BackendError, SystemProbe, choose_backend, img_to_u8, matching_engines, normalize_cc,
                              resolve_plugins)
from serving.batcher import DynamicBatcher, cancel_items
from serving.codecs import decode, encode, output_size
from serving.config import BatchConfig, ServerConfig, is_loopback, load_tokens
from serving.errors import DeadlineExceeded, InvalidArgument, QueueFull, ServingError
from serving.logs import JsonFormatter, log

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------------------------------------
# Latents: the same numbers as training's torch implementation


def test_seeds_to_z_matches_training():
    from training.networks.stylegan2 import seeds_to_z
    z = L.seeds_to_z([0, 5, 2**32 - 1], 64)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, seeds_to_z([0, 5, 2**32 - 1], 64).numpy())
    with pytest.raises(InvalidArgument, match="out of range"):
        L.seeds_to_z([2**32], 8)


@pytest.mark.parametrize("psi,cutoff", [(1.0, None), (0.7, None), (0.5, 3), (-1.5, 0), (2.0, 8)])
def test_truncate_matches_training_bit_for_bit(psi, cutoff):
    import torch

    from training.networks.stylegan2 import truncate
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 16)).astype(np.float32)
    w_avg = rng.standard_normal(16).astype(np.float32)
    ws = L.broadcast(w, 6)
    ref = truncate(torch.from_numpy(ws), torch.from_numpy(w_avg), psi, cutoff).numpy()
    np.testing.assert_array_equal(L.truncate(ws, w_avg, psi, cutoff), ref)


def test_mix_and_slerp():
    a = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    b = -a
    m = L.mix(a, b, 1)
    np.testing.assert_array_equal(m[:, :1], a[:, :1])
    np.testing.assert_array_equal(m[:, 1:], b[:, 1:])
    x = np.array([[1.0, 0.0]], np.float32)
    y = np.array([[0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(L.slerp(x, y, 0.0), x)
    np.testing.assert_array_equal(L.slerp(x, y, 1.0), y)
    mid = L.slerp(x, y, 0.5)[0]
    assert np.isclose(np.arctan2(mid[1], mid[0]), np.pi / 4) and np.isclose(np.linalg.norm(mid), 1.0)
    pts, ts = L.path_points(np.stack([x[0], y[0], x[0]]), 5, "linear")
    assert pts.shape == (5, 2) and ts == [0.0, 0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(pts[2], y[0])


@pytest.mark.parametrize("shape,values,msg", [
    ([1, 3], [0.0, 1.0], "do not fill"),
    ([1, 4], [0.0] * 4, "does not match"),
    ([3], [0.0] * 3, "wrong rank"),
    ([0, 3], [], "no latents"),
    ([1, 3], [0.0, float("nan"), 1.0], "NaN or Inf"),
    ([1, 3], [0.0, float("inf"), 1.0], "NaN or Inf"),
    ([5, 3], [0.0] * 15, "more than the limit"),
])
def test_tensor_validation(shape, values, msg):
    with pytest.raises(InvalidArgument, match=msg):
        L.tensor(shape, values, "z", (None, 3), max_rows=4)


# ----------------------------------------------------------------------------------------------------------
# Codecs


def test_png_is_the_generate_encoder():
    from training.generate import encode_png
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert encode(img, "png") == encode_png(img)
    np.testing.assert_array_equal(decode(encode(img, "raw"), "raw", 16, 16), img)
    np.testing.assert_array_equal(decode(encode(img, "png"), "png", 16, 16), img)
    assert encode(img, "jpeg", 50)[:2] == b"\xff\xd8"
    assert encode(img, "webp", 50)[:4] == b"RIFF"
    big = decode(encode(img, "png", size=(40, 24)), "png", 40, 24)
    assert big.shape == (24, 40, 3)
    assert output_size((32, 32), 0, 0) == (32, 32)
    assert output_size((32, 32), 64, 0) == (64, 64)
    with pytest.raises(ValueError):
        encode(img, "gif")


def test_img_to_u8_rule():
    img = np.array([-1.5, -1.0, 0.0, 0.00392, 1.0, 2.0], np.float32).reshape(1, 1, 1, 6)
    img = np.repeat(img, 3, axis=1)  # [1, 3, 1, 6]
    u8 = img_to_u8(img)
    assert u8.shape == (1, 1, 6, 3)
    assert u8[0, 0, :, 0].tolist() == [0, 0, 128, 128, 255, 255]


# ----------------------------------------------------------------------------------------------------------
# Dynamic batcher with a fake model


class FakeModel:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.batches: list[list[float]] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        self.batches.append(x[:, 0].tolist())
        return x * 2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def rows(*vals) -> np.ndarray:
    return np.array([[v] for v in vals], np.float32)


def test_batcher_batches_concurrent_requests():
    async def main():
        model = FakeModel(delay=0.02)
        b = DynamicBatcher("m", model, max_batch=4, max_queue_delay_s=0.05, max_queue=64)
        outs = await asyncio.gather(*[b.submit(rows(i)) for i in range(8)], b.submit(rows(100, 101)))
        await b.close()
        return model, outs
    model, outs = run(main())
    for i in range(8):
        assert outs[i][0].tolist() == [[2 * i]]
    assert outs[8][0].tolist() == [[200], [202]]
    assert all(len(bt) <= 4 for bt in model.batches)
    assert sum(len(bt) for bt in model.batches) == 10
    assert len(model.batches) == 3  # 4 + 4 + 2: rows of different requests share batches


def test_batcher_queue_full_is_all_or_nothing():
    async def main():
        b = DynamicBatcher("m", FakeModel(), max_batch=8, max_queue_delay_s=1.0, max_queue=4)
        first = b.enqueue(rows(1, 2, 3))
        with pytest.raises(QueueFull, match="full"):
            b.enqueue(rows(4, 5))
        with pytest.raises(QueueFull, match="never fit"):
            b.enqueue(rows(*range(5)))
        assert b.depth == 3
        cancel_items(first)
        b.enqueue(rows(4, 5))  # cancelled rows are purged to make room
        await b.close()
    run(main())


def test_batcher_drops_cancelled_and_expired_rows():
    async def main():
        model = FakeModel()
        b = DynamicBatcher("m", model, max_batch=8, max_queue_delay_s=0.1, max_queue=64)
        keep = b.enqueue(rows(1))
        gone = b.enqueue(rows(2, 3))
        late = b.enqueue(rows(4), deadline=time.monotonic() + 0.01)
        cancel_items(gone)
        out = await keep[0].future
        with pytest.raises(DeadlineExceeded):
            await late[0].future
        await b.close()
        return model, out
    model, out = run(main())
    assert out.tolist() == [2]
    assert model.batches == [[1.0]]  # neither the cancelled nor the expired rows reached the model


def test_batcher_drops_rows_as_soon_as_they_are_cancelled_or_expire():
    async def main():
        model = FakeModel()
        b = DynamicBatcher("m", model, max_batch=8, max_queue_delay_s=30.0, max_queue=64)
        gone = b.enqueue(rows(1, 2))
        late = b.enqueue(rows(3), deadline=time.monotonic() + 0.05)
        await asyncio.sleep(0.01)
        assert b.depth == 3
        cancel_items(gone)
        await asyncio.sleep(0.01)
        assert b.depth == 1  # not at the end of the 30 s batch window
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(late[0].future, 1.0)
        assert b.depth == 0
        await b.close()
        return model
    assert run(main()).batches == []


def test_batcher_cancelling_the_waiter_cancels_its_rows():
    async def main():
        model = FakeModel()
        b = DynamicBatcher("m", model, max_batch=8, max_queue_delay_s=0.2, max_queue=64)
        task = asyncio.ensure_future(b.submit(rows(1, 2)))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await b.submit(rows(3))
        await b.close()
        return model
    assert run(main()).batches == [[3.0]]


def test_batcher_model_failure_reaches_every_row_and_close_drains():
    async def main():
        b = DynamicBatcher("m", FakeModel(fail=True), max_batch=8, max_queue_delay_s=0.0, max_queue=64)
        with pytest.raises(ServingError, match="boom"):
            await b.submit(rows(1, 2))
        ok = DynamicBatcher("n", FakeModel(), max_batch=2, max_queue_delay_s=10.0, max_queue=64)
        items = ok.enqueue(rows(1, 2, 3))
        await ok.close()  # closing runs what is queued (without waiting for the queue delay)
        assert [float(it.future.result()[0]) for it in items] == [2, 4, 6]
        with pytest.raises(ServingError):
            ok.enqueue(rows(1))
    run(main())


# ----------------------------------------------------------------------------------------------------------
# Backend selection (TensorRT cannot run here: the rules are tested with fake probes and fake runners)


def manifest_with(*engines) -> dict:
    return {"name": "m", "files": {}, "graphs": {"synthesis": {"file": "synthesis.onnx"}}, "engines": list(engines)}


ENG = {"file": "synthesis.fp16.sm90.plan", "graph": "synthesis", "precision": "fp16", "trt_flavour": "tensorrt",
       "trt_version": "10.14.1.48", "compute_capability": "9.0", "plugins": []}
H100 = SystemProbe(("CUDAExecutionProvider", "CPUExecutionProvider"), "tensorrt", "10.14.1.48", "9.0")
CPU = SystemProbe(("CPUExecutionProvider",))


def test_choose_backend_rules():
    assert normalize_cc("sm_90") == normalize_cc("90") == normalize_cc(9.0) == normalize_cc((9, 0)) == "9.0"
    c = choose_backend("auto", manifest_with(ENG), H100)
    assert c.kind == "tensorrt" and c.engine is ENG
    # different GPU, TensorRT release or flavour: ORT (CUDA EP first when installed), with the reason
    for probe, why in ((SystemProbe(H100.ort_providers, "tensorrt", "10.14.1.48", "8.9"), "compute capability"),
                       (SystemProbe(H100.ort_providers, "tensorrt", "10.14.1.40", "9.0"), "TensorRT 10.14.1.48"),
                       (SystemProbe(H100.ort_providers, "tensorrt_rtx", "10.14.1.48", "9.0"), "built for tensorrt")):
        c = choose_backend("auto", manifest_with(ENG), probe)
        assert c.kind == "onnxruntime" and c.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert why in c.reason
        with pytest.raises(BackendError, match=why):
            choose_backend("tensorrt", manifest_with(ENG), probe)
    c = choose_backend("auto", manifest_with(ENG), CPU)
    assert c.kind == "onnxruntime" and c.providers == ["CPUExecutionProvider"] and "not installed" in c.reason
    assert choose_backend("onnxruntime", manifest_with(ENG), H100).kind == "onnxruntime"
    with pytest.raises(BackendError, match="no TensorRT engines"):
        choose_backend("tensorrt", manifest_with(), H100)
    ok, why = matching_engines(manifest_with(dict(ENG, graph="mapping"), ENG), H100)
    assert ok == [ENG] and why == []
    # TensorRT-RTX engines built ahead of time list several targets
    aot = dict(ENG, trt_flavour="tensorrt_rtx", trt_version="1.2.0.54", compute_capability="aot:8.0,8.6,8.9,12.0")
    rtx = SystemProbe(("CPUExecutionProvider",), "tensorrt_rtx", "1.2.0.54", "8.6")
    assert choose_backend("auto", manifest_with(aot), rtx).engine is aot
    c = choose_backend("auto", manifest_with(aot), SystemProbe(rtx.ort_providers, "tensorrt_rtx", "1.2.0.54", "9.0"))
    assert c.kind == "onnxruntime" and "aot:8.0" in c.reason


def test_plugins_are_checksummed_before_loading(tmp_path, monkeypatch):
    lib = tmp_path / "libstylecast_plugins.so"
    lib.write_bytes(b"not really a library")
    sha = hashlib.sha256(lib.read_bytes()).hexdigest()
    files = {lib.name: {"sha256": sha, "bytes": lib.stat().st_size}}
    eng = dict(ENG, plugins=[{"file": lib.name, "sha256": sha}])
    assert resolve_plugins(tmp_path, eng, files) == [lib]
    with pytest.raises(BackendError, match="sha256"):
        resolve_plugins(tmp_path, dict(ENG, plugins=[{"file": lib.name, "sha256": "0" * 64}]), files)
    with pytest.raises(BackendError, match="not listed"):
        resolve_plugins(tmp_path, eng, {})
    # without a file: found by checksum on STYLECAST_TRT_PLUGIN_PATH
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "libx.so").write_bytes(lib.read_bytes())
    monkeypatch.setenv("STYLECAST_TRT_PLUGIN_PATH", str(other))
    assert resolve_plugins(tmp_path, dict(ENG, plugins=[{"sha256": sha}]), files) == [other / "libx.so"]
    with pytest.raises(BackendError, match="no plugin library"):
        resolve_plugins(tmp_path, dict(ENG, plugins=[{"sha256": "1" * 64}]), files)


def test_create_synthesis_loads_engine_or_falls_back(tiny_bundle, monkeypatch):
    import serving.backends as B

    created = []

    class FakeTRT:
        def __init__(self, path, plugins, flavour, precision):
            created.append((path.name, plugins, flavour, precision))
            self.name, self.max_batch, self.precision = f"{flavour}:{precision}", 4, precision

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["engines"] = [ENG]
    gpu_no_cuda_ep = SystemProbe(("CPUExecutionProvider",), "tensorrt", "10.14.1.48", "9.0")
    monkeypatch.setattr(B, "TensorRTSynthesis", FakeTRT)
    runner = B.create_synthesis(tiny_bundle, manifest, "auto", probe=gpu_no_cuda_ep)
    assert isinstance(runner, FakeTRT) and created == [(ENG["file"], [], "tensorrt", "fp16")]

    class BrokenTRT:
        def __init__(self, *a):
            raise B.BackendError("engine deserialisation failed")

    monkeypatch.setattr(B, "TensorRTSynthesis", BrokenTRT)
    runner = B.create_synthesis(tiny_bundle, manifest, "auto", probe=gpu_no_cuda_ep)
    assert isinstance(runner, B.OrtSynthesis)  # auto falls back, with a log line
    with pytest.raises(BackendError, match="deserialisation"):
        B.create_synthesis(tiny_bundle, manifest, "tensorrt", probe=gpu_no_cuda_ep)


# ----------------------------------------------------------------------------------------------------------
# Config, tokens, logs


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        ServerConfig(models_dir=tmp_path, backend="tvm")
    with pytest.raises(ValueError, match="max queue"):
        ServerConfig(models_dir=tmp_path, batch=BatchConfig(max_batch=8, max_queue=4))
    with pytest.raises(ValueError, match="both"):
        ServerConfig(models_dir=tmp_path, tls_cert=tmp_path / "c.pem")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert ServerConfig(models_dir=tmp_path, host="0.0.0.0").exposed


def test_load_tokens(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nabcdefghijklmnop0123\nsecond-token-4567890\n")
    assert load_tokens(f) == ("abcdefghijklmnop0123", "second-token-4567890")
    f.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_tokens(f)
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no tokens"):
        load_tokens(f)
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing")


def test_json_logs():
    logger = logging.getLogger("serving.test")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log(logger, logging.INFO, "rpc", method="Generate", code="OK", latency_ms=1.5, name="clash")
    finally:
        logger.removeHandler(handler)
    doc = json.loads(stream.getvalue())
    assert doc["event"] == "rpc" and doc["method"] == "Generate" and doc["latency_ms"] == 1.5
    assert doc["level"] == "info" and doc["name_"] == "clash" and "ts" in doc
