"""The timing harness: percentiles and throughput on fake backends with known delays, correctness flags, JSONL."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from benchmarks import harness
from benchmarks.harness import (PSNR_THRESHOLDS, STATUS_ERROR, STATUS_FAILED, STATUS_OK, JsonlWriter, Timer,
                                cell_record, check_output, environment, latency_stats, measure_cell, percentile,
                                psnr, read_jsonl)

REF = np.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedBackend:
    """Each run() advances the fake clock by the next scripted delay (seconds) and returns `image`."""

    device = "cpu"
    timing = "wall"

    def __init__(self, name: str, delays: list[float], clock: FakeClock, image: np.ndarray = REF,
                 precision: str = "fp32", calls: list[str] | None = None):
        self.name, self.precision = name, precision
        self.delays = list(delays)
        self.clock = clock
        self.image = image
        self.i = 0
        self.calls = calls

    def run(self, x):
        d = self.delays[self.i % len(self.delays)]
        self.i += 1
        self.clock.t += d
        if self.calls is not None:
            self.calls.append(self.name)
        return self.image

    def to_numpy(self, out):
        return out


class SleepBackend:
    """Really sleeps: delays[i % len] seconds per call."""

    device = "cpu"
    timing = "wall"
    precision = "fp32"

    def __init__(self, name: str, delays: list[float], image: np.ndarray = REF):
        self.name, self.delays, self.image, self.i = name, delays, image, 0

    def run(self, x):
        time.sleep(self.delays[self.i % len(self.delays)])
        self.i += 1
        return self.image

    def to_numpy(self, out):
        return out


def test_percentile_definition_is_numpy_linear() -> None:
    xs = list(range(1, 101))  # 1..100
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_exact_stats_with_fake_clock() -> None:
    clock = FakeClock()
    delays = [(i + 1) / 1000 for i in range(100)]  # 1 ms .. 100 ms, one per timed call
    b = ScriptedBackend("fake", [0.5] + delays, clock)  # first call is the (untimed) warm-up
    res = measure_cell([b], {"fake": None}, batch=4, reps=100, warmup=1, timer=Timer(clock), memory=False,
                       reference=REF)["fake"]
    assert res.status == STATUS_OK
    st = res.stats()
    assert st["n"] == 100
    assert st["median_ms"] == pytest.approx(50.5)
    assert st["p95_ms"] == pytest.approx(95.05)
    assert st["p99_ms"] == pytest.approx(99.01)
    assert st["min_ms"] == pytest.approx(1.0) and st["max_ms"] == pytest.approx(100.0)
    assert st["img_per_s"] == pytest.approx(4 / 0.0505)
    assert st["img_per_s_mean"] == pytest.approx(4 * 100 / sum(delays))


def test_real_sleeps_within_tolerance() -> None:
    # 9 fast calls (5 ms) and 1 slow call (80 ms) in every 10: median ~5 ms, p99 near 80 ms.
    b = SleepBackend("sleepy", [0.005] * 9 + [0.080])
    res = measure_cell([b], {"sleepy": None}, batch=2, reps=40, warmup=0, reference=REF)["sleepy"]
    st = res.stats()
    assert st["n"] == 40
    assert 5.0 <= st["median_ms"] < 30.0          # sleep never returns early; generous for loaded machines
    assert st["p99_ms"] >= 70.0
    assert st["p95_ms"] >= st["median_ms"]
    assert st["img_per_s"] == pytest.approx(2 / (st["median_ms"] / 1e3))
    assert 2 * 40 / (sum(res.latencies_s)) == pytest.approx(st["img_per_s_mean"])


def test_interleaved_rotation_and_early_stop() -> None:
    clock = FakeClock()
    calls: list[str] = []
    bs = [ScriptedBackend(n, [0.01], clock, calls=calls) for n in ("a", "b", "c")]
    measure_cell(bs, {n: None for n in "abc"}, batch=1, reps=3, warmup=0, timer=Timer(clock), memory=False,
                 reference=REF)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # max_time stops after min_reps once enough (real) time has passed; here the limit is tiny
    calls.clear()
    measure_cell(bs, {n: None for n in "abc"}, batch=1, reps=50, warmup=0, max_time_s=1e-9, min_reps=2,
                 timer=Timer(clock), memory=False, reference=REF)
    assert len(calls) == 6


@pytest.mark.parametrize("precision,noise,ok", [("fp32", 1e-6, True), ("fp32", 1e-2, False),
                                                 ("fp16", 5e-3, True), ("fp16", 3e-2, False),
                                                 ("bf16", 2e-2, True), ("bf16", 0.2, False)])
def test_thresholds_per_precision(precision: str, noise: float, ok: bool) -> None:
    rng = np.random.default_rng(0)
    out = REF + rng.normal(0, noise, REF.shape).astype(np.float32)
    good, p, why = check_output(out, REF, precision)
    assert good is ok, (p, why)
    assert (p >= PSNR_THRESHOLDS[precision]) is ok


def test_fast_but_wrong_backend_is_failed_not_fast() -> None:
    clock = FakeClock()
    ref = ScriptedBackend("torch-fp32", [0.100], clock)
    wrong = ScriptedBackend("fast-wrong", [0.001], clock, image=REF[:, ::-1].copy())  # channels swapped
    nan = ScriptedBackend("nan", [0.001], clock, image=np.full_like(REF, np.nan))
    shape = ScriptedBackend("shape", [0.001], clock, image=REF.transpose(0, 2, 3, 1).copy())  # NHWC
    right = ScriptedBackend("right", [0.050], clock, image=REF + 1e-7)
    res = measure_cell([ref, wrong, nan, shape, right], {n: None for n in ("torch-fp32", "fast-wrong", "nan", "shape", "right")},
                       batch=2, reps=5, warmup=1, timer=Timer(clock), memory=False, reference_backend="torch-fp32")
    assert res["torch-fp32"].status == STATUS_OK and res["torch-fp32"].psnr_db == math.inf
    assert res["right"].status == STATUS_OK and res["right"].psnr_db > 100
    for name in ("fast-wrong", "nan", "shape"):
        assert res[name].status == STATUS_FAILED, name
    assert "PSNR" in res["fast-wrong"].reason
    assert "non-finite" in res["nan"].reason
    assert "shape" in res["shape"].reason
    ref_med = res["torch-fp32"].stats()["median_ms"]
    rec = cell_record(res["fast-wrong"], 8, "fake", 5, 1, ref_med)
    assert rec["status"] == "failed" and rec["speedup_vs_torch_fp32"] is None
    rec = cell_record(res["right"], 8, "fake", 5, 1, ref_med)
    assert rec["speedup_vs_torch_fp32"] == pytest.approx(2.0)


def test_raising_backend_is_an_error_and_the_rest_go_on() -> None:
    clock = FakeClock()

    class Boom(ScriptedBackend):
        def run(self, x):
            raise RuntimeError("kaboom")

    good = ScriptedBackend("good", [0.01], clock)
    res = measure_cell([Boom("boom", [0.01], clock), good], {"boom": None, "good": None}, batch=1, reps=4,
                       warmup=1, timer=Timer(clock), memory=False, reference=REF)
    assert res["boom"].status == STATUS_ERROR and "kaboom" in res["boom"].reason
    assert res["good"].status == STATUS_OK and len(res["good"].latencies_s) == 4
    # when the reference backend itself fails, nothing can be called correct
    res = measure_cell([Boom("torch-fp32", [0.01], clock), good], {"torch-fp32": None, "good": None}, batch=1,
                       reps=2, warmup=0, timer=Timer(clock), memory=False, reference_backend="torch-fp32")
    assert res["good"].status == "unchecked" and "not checked" in res["good"].reason


def test_psnr_definition() -> None:
    assert psnr(REF, REF) == math.inf
    # MSE 0.01 on a peak of 2: 10 log10(4 / 0.01) = 26.02 dB
    assert psnr(REF + 0.1, REF) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)
    with pytest.raises(ValueError):
        psnr(REF[:1], REF)


def test_cpu_memory_meter_sees_an_allocation() -> None:
    meter = harness.CpuMemoryMeter()
    base = meter.before()
    buf = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    peak = meter.after()
    del buf
    assert peak >= base
    if meter.method == "vmhwm":
        assert (peak - base) / 1024 >= 50


def test_jsonl_schema(tmp_path) -> None:
    env = environment(["stylecast", "bench", "backends", "--quick"])
    for key in ("date", "command", "device", "device_name", "driver", "cpu", "cpu_count", "torch", "onnxruntime",
                "tensorrt", "numpy", "python", "loadavg"):
        assert key in env, key
    assert env["command"] == "stylecast bench backends --quick"
    path = tmp_path / "r" / "out.jsonl"
    w = JsonlWriter(path, env)
    clock = FakeClock()
    res = measure_cell([ScriptedBackend("torch-fp32", [0.02], clock)], {"torch-fp32": None}, batch=2, reps=3,
                       warmup=1, timer=Timer(clock), memory=False, reference_backend="torch-fp32")
    w.write("backends", {"run_id": "x", **cell_record(res["torch-fp32"], 8, "fake", 3, 1, 20.0)})
    w.write("backends", {"run_id": "x", "backend": "trt-fp16", "status": "skipped", "reason": "no GPU"})
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    docs = [json.loads(line) for line in lines]  # strict JSON: inf is written as the string "inf"
    assert docs == read_jsonl([path])
    d = docs[0]
    assert d["schema"] == "stylecast.bench/v1" and d["kind"] == "backends"
    assert d["psnr_db"] == "inf" and d["status"] == "ok"
    for key in ("backend", "precision", "device", "size", "batch", "latency", "img_per_s", "speedup_vs_torch_fp32",
                "psnr_min_db", "memory", "latencies_ms", "env"):
        assert key in d, key
    for key in ("median_ms", "p95_ms", "p99_ms", "n"):
        assert key in d["latency"]
    assert d["latency"]["median_ms"] == pytest.approx(20.0)
    assert docs[1]["reason"] == "no GPU" and docs[1]["env"]["date"] == env["date"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl([bad])


def test_latency_stats_rejects_empty() -> None:
    with pytest.raises(ValueError):
        latency_stats([])
