"""The closed-loop load generator of `stylecast bench server` on fake async backends with known delays, and the
batch-size figure read from Prometheus metrics."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.server import LoadResult, avg_batch_size, closed_loop, metric_total


def test_throughput_and_latency_of_a_fixed_delay() -> None:
    delay, c, window = 0.02, 4, 0.8

    async def call(i: int) -> int:
        await asyncio.sleep(delay)
        return 2  # images per request

    res = asyncio.run(closed_loop(call, c, window, drain_timeout_s=5))
    s = res.summary()
    assert s["error_count"] == 0 and s["concurrency"] == c
    # each client completes at most window / delay requests; scheduling can only make it fewer
    ideal = c * 2 / delay  # 400 images/s
    assert 0.5 * ideal <= s["throughput_img_per_s"] <= 1.02 * ideal
    assert delay * 1e3 <= s["p50_ms"] < delay * 1e3 + 25
    assert s["p99_ms"] >= s["p95_ms"] >= s["p50_ms"]
    assert res.images_in_window <= res.images_total
    assert res.images_in_window / window == pytest.approx(s["throughput_img_per_s"])


def test_concurrency_scales_a_parallel_backend_but_not_a_serial_one() -> None:
    lock = asyncio.Lock

    async def run(c: int, serial: bool) -> float:
        guard = lock()

        async def call(i: int) -> int:
            if serial:
                async with guard:
                    await asyncio.sleep(0.01)
            else:
                await asyncio.sleep(0.01)
            return 1

        return (await closed_loop(call, c, 0.3)).summary()["throughput_img_per_s"]

    par1, par8 = asyncio.run(run(1, False)), asyncio.run(run(8, False))
    ser1, ser8 = asyncio.run(run(1, True)), asyncio.run(run(8, True))
    assert par8 > 4 * par1
    assert ser8 < 1.5 * ser1


def test_errors_are_counted_by_code_and_not_as_throughput() -> None:
    class FakeRpcError(Exception):
        def code(self):
            class C:
                name = "RESOURCE_EXHAUSTED"
            return C()

    async def call(i: int) -> int:
        await asyncio.sleep(0.005)
        if i % 3 == 0:
            raise FakeRpcError()
        if i % 3 == 1:
            raise ValueError("bad")
        return 1

    res = asyncio.run(closed_loop(call, 2, 0.3))
    s = res.summary()
    assert s["errors"]["RESOURCE_EXHAUSTED"] > 0 and s["errors"]["ValueError"] > 0
    assert s["error_count"] == sum(s["errors"].values())
    assert res.requests_ok == len(res.latencies_s) > 0
    assert abs(res.requests_ok - s["errors"]["ValueError"]) <= 2


def test_requests_in_flight_at_the_deadline_are_drained_or_cancelled() -> None:
    async def slow(i: int) -> int:
        await asyncio.sleep(0.3)
        return 1

    # window 0.1 s: the first request of each client finishes during the drain -> latency counted, no throughput
    res = asyncio.run(closed_loop(slow, 3, 0.1, drain_timeout_s=2))
    assert res.requests_ok == 3 and res.images_in_window == 0 and res.summary()["throughput_img_per_s"] == 0
    assert all(lat >= 0.3 for lat in res.latencies_s)
    # a drain timeout shorter than the request: cancelled and counted
    res = asyncio.run(closed_loop(slow, 3, 0.05, drain_timeout_s=0.05))
    assert res.errors == {"DRAIN_TIMEOUT": 3} and res.requests_ok == 0
    assert LoadResult(1, 1.0).summary()["p50_ms"] is None


def test_average_batch_size_from_metrics_deltas() -> None:
    before = {'stylecast_batch_size_sum{model="m"}': 10.0, 'stylecast_batch_size_count{model="m"}': 5.0,
              'stylecast_batch_size_sum{model="other"}': 100.0, 'stylecast_batch_size_count{model="other"}': 1.0,
              'stylecast_batch_size_bucket{le="1.0",model="m"}': 3.0}
    after = dict(before)
    after['stylecast_batch_size_sum{model="m"}'] = 10.0 + 24.0
    after['stylecast_batch_size_count{model="m"}'] = 5.0 + 4.0
    assert avg_batch_size(before, after, "m") == pytest.approx(6.0)
    assert avg_batch_size(before, before, "m") is None
    assert metric_total(after, "stylecast_batch_size_count") == 10.0


@pytest.mark.slow
def test_server_bench_end_to_end(tmp_path) -> None:
    """A real `stylecast serve` subprocess on loopback over a tiny exported bundle, next to in-process calls."""
    from benchmarks.harness import JsonlWriter, environment
    from benchmarks.server import ServerBenchOptions, run_server_bench
    w = JsonlWriter(tmp_path / "s.jsonl", environment())
    opts = ServerBenchOptions(concurrency=[1, 4], duration_s=1.0, model="small", size=16, stream_frames=4,
                              work_dir=tmp_path / "work")
    recs = run_server_bench(opts, w, log=lambda m: None)
    load = [r for r in recs if r["test"] == "load"]
    assert {(r["side"], r["concurrency"]) for r in load} == {(s, c) for s in ("server", "in-process") for c in (1, 4)}
    for r in load:
        assert r["error_count"] == 0 and r["requests_ok"] > 0 and r["throughput_img_per_s"] > 0
    srv = {r["concurrency"]: r for r in load if r["side"] == "server"}
    assert srv[1]["avg_batch_size"] == pytest.approx(1.0)
    assert 1.0 <= srv[4]["avg_batch_size"] <= 4.0
    assert srv[4]["p50_ratio_server_vs_inprocess"] > 0
    stream = [r for r in recs if r["test"] == "stream" and r["side"] == "server"]
    assert stream and stream[0]["frames"] == 4 and stream[0]["frames_per_s"] > 0
    info = next(r for r in recs if r["test"] == "model")
    assert info["ready"] and info["backend"].startswith("onnxruntime")
