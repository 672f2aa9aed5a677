"""`stylecast bench`: the backend sweep end to end on a tiny generator with an injected wrong backend, the report
(RESULTS.md tables, plots) and the CLI's argument errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from benchmarks import backends as bk
from benchmarks.harness import JsonlWriter, environment, read_jsonl


class WrongBackend(bk.TorchEager):
    """Runs the real network, then returns the image upside down: fast enough, but wrong."""

    def __init__(self, ctx):
        super().__init__(ctx, "fp32", name="fake-wrong")

    def run(self, x):
        return super().run(x).flip(-2)


class UnavailableBackend(bk.Backend):
    name = "fake-missing"

    def available(self):
        return False, "needs hardware this machine lacks"


@pytest.fixture
def one_thread():
    """Tiny networks run in ~ms on one thread; OpenMP barriers on a loaded 2-core machine take far longer."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_registry(monkeypatch):
    reg = {"torch-fp32": bk.BACKENDS["torch-fp32"], "fake-wrong": WrongBackend, "fake-missing": UnavailableBackend}
    monkeypatch.setattr(bk, "BACKENDS", reg)
    import benchmarks.sweep as sweep
    monkeypatch.setattr(sweep, "BACKENDS", reg)
    return reg


def test_sweep_flags_a_wrong_backend_and_records_skips(tmp_path, fake_registry, one_thread) -> None:
    from benchmarks.sweep import SweepOptions, run_backend_sweep
    out = tmp_path / "b.jsonl"
    w = JsonlWriter(out, environment(["stylecast", "bench", "backends"]))
    opts = SweepOptions(sizes=[8], batches=[1, 2], backends=["torch-fp32", "fake-wrong", "fake-missing"], reps=3,
                        warmup=1, max_time_s=5, model="small", device="cpu", work_dir=tmp_path / "work")
    recs = run_backend_sweep(opts, w, log=lambda m: None)
    assert recs == read_jsonl([out])
    by = {(r["backend"], r.get("batch")): r for r in recs}
    assert by[("fake-missing", None)]["status"] == "skipped"
    assert "lacks" in by[("fake-missing", None)]["reason"]
    for b in (1, 2):
        ref, wrong = by[("torch-fp32", b)], by[("fake-wrong", b)]
        assert ref["status"] == "ok" and ref["psnr_db"] == "inf" and ref["speedup_vs_torch_fp32"] == 1.0
        assert wrong["status"] == "failed" and "PSNR" in wrong["reason"]
        assert wrong["speedup_vs_torch_fp32"] is None
        assert ref["latency"]["n"] == 3 and ref["size"] == 8 and ref["model"] == "small"
        assert ref["memory"]["peak_mib"] > 0
    assert len({r["run_id"] for r in recs}) == 1


def _records(tmp_path, device="cpu", name="AMD EPYC"):
    env = environment(["stylecast", "bench", "backends", "--quick"])
    env.update(device=device, device_name=name)
    path = tmp_path / f"{device}.jsonl"
    w = JsonlWriter(path, env)
    for backend, med, status in (("torch-fp32", 100.0, "ok"), ("ort-cpu", 50.0, "ok"), ("torch-bf16", 10.0, "failed")):
        for batch in (1, 2):
            m = med * batch
            w.write("backends", {"run_id": f"r-{device}", "model": "config-f", "backend": backend, "precision": "fp32",
                                 "device": device, "size": 256, "batch": batch, "status": status,
                                 "reason": "PSNR 12.0 dB < 30 dB" if status == "failed" else "",
                                 "latency": {"n": 5, "median_ms": m, "p95_ms": m * 1.1, "p99_ms": m * 1.2},
                                 "img_per_s": batch / m * 1e3, "speedup_vs_torch_fp32": 100 * batch / m,
                                 "psnr_db": 12.0 if status == "failed" else "inf", "psnr_min_db": 60.0,
                                 "memory": {"method": "vmhwm", "peak_mib": 900.0, "delta_mib": 12.0}})
    w.write("backends", {"run_id": f"r-{device}", "backend": "trt-fp16", "status": "skipped", "reason": "no GPU"})
    for c in (1, 2, 4):
        for side in ("server", "in-process"):
            w.write("server", {"run_id": f"s-{device}", "model": "small", "size": 128, "test": "load", "side": side,
                               "concurrency": c, "throughput_img_per_s": 10.0 * c, "p50_ms": 100.0,
                               "p95_ms": 120.0, "p99_ms": 130.0, "error_count": 0, "errors": {},
                               "avg_batch_size": float(c), "p50_ratio_server_vs_inprocess": 1.1,
                               "throughput_ratio_server_vs_inprocess": 0.9})
    w.write("server", {"run_id": f"s-{device}", "test": "stream", "side": "server", "frames": 16,
                       "frames_per_s": 20.0, "first_frame_ms": 50.0})
    return path


def test_report_tables_plots_and_gpu_note(tmp_path) -> None:
    from benchmarks.report import write_report
    md = tmp_path / "RESULTS.md"
    plots = write_report([_records(tmp_path)], md, tmp_path / "plots")
    text = md.read_text()
    assert "No GPU was available" in text and "--backends all" in text
    assert "| torch-fp32 | 1 | 100.0 |" in text
    assert "**FAILED**" in text and "PSNR 12.0 dB" in text
    assert "`trt-fp16`: no GPU" in text
    assert "stylecast bench backends --quick" in text
    assert "| 4 | 100.0 | 120.0 | 130.0 | 40.00 | 0 | 4.00 |" in text
    assert "20.00 frames/s" in text
    names = sorted(p.name for p in plots)
    assert names == ["latency_vs_batch_cpu-quick.png", "server_latency_vs_concurrency_cpu-quick.png",
                     "server_throughput_vs_concurrency_cpu-quick.png", "throughput_vs_batch_cpu-quick.png"]
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{p.name}" in text
    # with a GPU run present the note goes away and the GPU gets its own section
    write_report([_records(tmp_path), _records(tmp_path, "cuda", "NVIDIA H100 80GB HBM3")], md, tmp_path / "plots",
                 make_plots=False)
    text = md.read_text()
    assert "No GPU was available" not in text and "### NVIDIA H100 80GB HBM3" in text and "### AMD EPYC" in text


def test_cli_group_and_user_errors(tmp_path) -> None:
    from stylecast.commands.bench import bench
    r = CliRunner().invoke(bench, ["--help"])
    assert r.exit_code == 0
    for sub in ("backends", "server", "report"):
        assert sub in r.output
    r = CliRunner().invoke(bench, ["backends", "--sizes", "300", "--no-report", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "power of two" in r.output
    r = CliRunner().invoke(bench, ["backends", "--batches", "0"])
    assert r.exit_code == 2
    r = CliRunner().invoke(bench, ["backends", "--backends", "nope", "--no-report"])
    assert r.exit_code == 2 and "unknown backend" in r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_parse_backends() -> None:
    assert bk.parse_backends(None, quick=True) == list(bk.QUICK_BACKENDS)
    assert bk.parse_backends("ort-cpu,torch-fp32") == ["torch-fp32", "ort-cpu"]
    allb = bk.parse_backends("all")
    assert "trt-fp16" in allb and "trt-plugin" in allb and len(allb) == len(set(allb))
    with pytest.raises(ValueError):
        bk.parse_backends("torch-fp64")


def test_unavailable_reasons_on_this_machine() -> None:
    """Every registered backend answers available() without raising; without CUDA the GPU ones say why."""
    ctx = bk.BenchContext(work_dir=None, device="cpu")  # type: ignore[arg-type]
    for name, make in bk.BACKENDS.items():
        ok, why = make(ctx).available()
        assert isinstance(ok, bool) and (ok or why), name
    for name in ("ort-cuda", "trt-fp32", "torch-plugin"):
        ok, why = bk.BACKENDS[name](ctx).available()
        if not bk.cuda_available():
            assert not ok and why
