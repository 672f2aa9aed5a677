"""The device check's CPU dry run (`python3 -m benchmarks.device --dry-run`), end to end in a subprocess as CI runs
it: the plan it would follow on a GPU, the CI build, every kernel variant through the CPU emulation against the
float64 reference, the plugin harness on emulated kernels, the generator and timing steps at tiny shapes, its
records and summary; a deliberately broken tolerance makes it fail; bad arguments are one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.device.kernels import EMULATED_CASES

ROOT = Path(__file__).resolve().parents[2]

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
EMULATED_NAMES = [f"{c.name}_{p}" for c in EMULATED_CASES for p in ("fp32", "fp16", "fp16_simt")]


def run_check(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("STYLECAST_OPS_LIBRARY", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.device", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "device-check.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dry_run(ci_build_args, tmp_path_factory):
    """One full dry run over the CI build (the plugin_build fixture built it with the same arguments)."""
    out = tmp_path_factory.mktemp("device-check") / "out"
    proc = run_check(out, "--dry-run", *ci_build_args, "--cell-time-s", "0.05", "--seed", "7")
    return proc, out, records_of(out)


def test_dry_run_passes_prints_the_plan_and_writes_returnable_files(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    # The GPU plan: Hopper's arch-specific target for both libraries, the sanitizer command, the timing matrix.
    assert "On a GPU this check would run" in proc.stdout
    assert "-gencode=arch=compute_90a,code=sm_90a" in proc.stdout
    assert "compute-sanitizer --tool memcheck" in proc.stdout
    assert "sizes [1024, 256] x batches [1, 8, 32]" in proc.stdout
    assert proc.stdout.rstrip().endswith("all ok")
    # What the device tool brings back: at most 8 files, no sub-folders, plain names.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["build.log", "device-check.jsonl", "sanitizer.log", "summary.md"]
    assert all(SAFE_NAME.match(f) for f in files)


def test_dry_run_records_carry_device_date_command_and_versions(dry_run):
    _, out, recs = dry_run
    assert {r["kind"] for r in recs} == {"device-check"} and len({r["run_id"] for r in recs}) == 1
    for r in recs:
        env = r["env"]
        assert r["dry_run"] is True and env["device"] == "cpu" and env["seed"] == 7
        assert env["date"] and "--dry-run" in env["command"] and env["torch"] and len(env["source_digest"]) == 64
    summary = recs[-1]
    assert summary["step"] == "summary" and summary["status"] == "ok"
    assert list(summary["steps"]) == ["facts", "build", "kernels", "sanitizer", "generator", "ceilings", "timing"]
    text = (out / "summary.md").read_text()
    assert "(CPU dry run)" in text and "## Kernels vs the reference (float64)" in text and "## Timings" in text


@pytest.mark.parametrize("name", EMULATED_NAMES)
def test_dry_run_kernel_case_matches_the_float64_reference(dry_run, name):
    """Every kernel variant (fp32, fp16 on tensor cores, fp16 SIMT) through the emulation, poisoned output and
    workspace, against impl='ref' in float64 (tolerances: benchmarks/device/kernels.py)."""
    rec = next(r for r in dry_run[2] if r["step"] == "kernels" and r["name"] == name)
    assert rec["status"] == "ok", rec["reason"]
    assert rec["finite"] is True
    assert rec["rel_l2"] <= rec["tolerances"]["rel_l2"] and rec["max_rel"] <= rec["tolerances"]["max_rel"]


def test_dry_run_other_steps(dry_run):
    recs = dry_run[2]
    by = {(r["step"], r["name"]): r for r in recs}
    # The CPU harness ran the plugin's enqueue() on emulated kernels; the GPU sanitizer run is planned.
    harness = by[("sanitizer", "harness_emulated")]
    assert harness["status"] == "ok" and harness["harness_failed"] == 0 and harness["harness_passed"] > 20
    assert by[("sanitizer", "gpu_sanitizer")]["status"] == "planned"
    # The reference generator against float64 (a real check on the CPU); the fused one is planned.
    gen = by[("generator", "reference_fp32")]
    assert gen["status"] == "ok" and 0 < gen["rel_l2"] <= gen["tolerance_rel_l2"]
    assert by[("generator", "gpu_generator")]["status"] == "planned"
    # Timings went through the benchmark harness (CUDA-only backends say why they were not run).
    cell = by[("timing", "16px_b2_torch-fp32")]
    assert cell["status"] == "ok" and cell["latency"]["n"] >= 5 and cell["pct_of_fp16_tc_peak"] > 0
    assert by[("timing", "torch-plugin-graph")]["status"] == "skipped"
    assert by[("timing", "torch-compile")]["status"] == "planned"
    planned_build = by[("build", "gpu_torch_ext")]
    assert planned_build["status"] == "planned" and "--torch-ext" in planned_build["command"]


def test_a_broken_tolerance_fails_the_check(ci_build_args, tmp_path):
    """A check of the check: tolerances scaled by 1e-9 must turn real, small errors into failures (exit 1)."""
    out = tmp_path / "out"
    proc = run_check(out, "--dry-run", "--steps", "kernels,generator", "--kernel-cases", "up1_plain", *ci_build_args,
                     "--tolerance-scale", "1e-9")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    recs = records_of(out)
    failed = {r["name"] for r in recs if r["status"] == "failed"}
    assert {"up1_plain_fp32", "up1_plain_fp16", "up1_plain_fp16_simt", "reference_fp32", "summary"} <= failed
    assert "rel_l2" in next(r for r in recs if r["name"] == "up1_plain_fp32")["reason"]
    assert "FAILED" in proc.stdout and "up1_plain_fp32" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--steps", "kernels,nope"], "unknown step(s) nope"),
    (["--cuda-arch", "sm90"], "--cuda-arch must look like"),
    (["--tolerance-scale", "0"], "must be positive"),
    (["--sanitizer-tools", "leakcheck"], "unknown --sanitizer-tools leakcheck"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = run_check(tmp_path / "out", "--dry-run", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "device-check.jsonl").exists()


def test_an_output_folder_with_results_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "device-check.jsonl").write_text("{}\n")
    proc = run_check(out, "--dry-run", timeout=120)
    assert proc.returncode == 2 and "give an empty --out folder" in proc.stderr
    assert (out / "device-check.jsonl").read_text() == "{}\n"


def test_ingest_refuses_a_dry_run(dry_run, tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device.ingest", str(dry_run[1] / "device-check.jsonl"),
                           "--results-dir", str(results), "--results-md", str(tmp_path / "RESULTS.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "a dry run" in proc.stderr and "Traceback" not in proc.stderr
    assert not results.exists() and not (tmp_path / "RESULTS.md").exists()


def test_report_renders_a_device_check_and_leaves_dry_runs_out(dry_run, tmp_path):
    from benchmarks.report import device_check_section, write_report

    recs = dry_run[2]
    worst = max((r for r in recs if r["step"] == "kernels" and r.get("path") == "emulated"), key=lambda r: r["rel_l2"])
    section = "\n".join(device_check_section(recs))
    assert "(CPU dry run)" in section and f"{worst['rel_l2']:.3g} ({worst['name']})" in section
    md = tmp_path / "RESULTS.md"
    write_report([dry_run[1] / "device-check.jsonl"], md, tmp_path / "plots", make_plots=False)
    text = md.read_text()
    assert "No GPU device check has been recorded yet" in text and "python3 -m benchmarks.device --out $OUT" in text
    assert worst["name"] not in text
