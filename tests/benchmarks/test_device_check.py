"""Pieces of the device check (benchmarks/device) that need no build: its case list against the real generator, its
FLOP count against REFERENCE.md, the roofline arithmetic, background compile jobs with deadlines, TensorRT headers
from a carried wheel, the GPU build plan, and ingesting a run into benchmarks/results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks.device import builds, ingest
from benchmarks.device.generator import CONFIG_F_GFLOP, synthesis_gflop
from benchmarks.device.kernels import config_f_cases
from benchmarks.device.timing import BackgroundJobs, Job, roofline_fields
from training.networks.stylegan2 import Generator, GeneratorConfig, SynthesisLayer, ToRGBLayer

ROOT = Path(__file__).resolve().parents[2]


def test_config_f_cases_are_the_layers_of_a_1024_px_generator():
    """Every (in, out, kernel, input size, up) of the real config-f synthesis network appears among the kernel cases,
    and nothing else (read off the modules, not from the case generator's formula)."""
    G = Generator(GeneratorConfig.rosinality(1024, 2))
    layers = set()
    for block in G.synthesis.blocks():
        for m in block.modules():
            if isinstance(m, (SynthesisLayer, ToRGBLayer)):
                o, i, k, _ = m.weight.shape
                up = getattr(m, "up", 1)
                res = block.resolution // up
                layers.add((i, o, k, res, up, isinstance(m, ToRGBLayer) and block.resolution > 4))
    cases = {(c.i, c.o, c.k, c.h, c.up, c.skip) for c in config_f_cases(1024, (1,))}
    assert cases == layers and len(layers) == 26
    assert {c.n for c in config_f_cases(1024)} == set(range(1, 9))


@pytest.mark.parametrize("res", sorted(CONFIG_F_GFLOP))
def test_synthesis_flops_match_the_reference_table(res):
    assert synthesis_gflop(GeneratorConfig.rosinality(res, 2)) == pytest.approx(CONFIG_F_GFLOP[res], rel=2e-3)


def test_roofline_fields():
    rec = {"status": "ok", "img_per_s": 400.0}
    got = roofline_fields(rec, 150.8, 754.0)
    assert got["achieved_tflops"] == pytest.approx(150.8 * 400 / 1000)
    assert got["pct_of_fp16_tc_peak"] == pytest.approx(100 * 60.32 / 754.0)
    assert roofline_fields({"status": "failed", "img_per_s": 400.0}, 150.8, 754.0)["pct_of_fp16_tc_peak"] is None


def test_background_jobs_keep_their_deadlines():
    ok = Job("ok", [sys.executable, "-c", "print('noise'); print('{\"compile_s\": 1.5}')"], 60)
    slow = Job("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0)
    bad = Job("bad", [sys.executable, "-c", "import sys; sys.exit('no triton here')"], 60)
    never = Job("never", [sys.executable, "-c", "import time; time.sleep(60)"], 60)
    t0 = time.monotonic()
    jobs = BackgroundJobs([ok, slow, bad, never]).start().wait(time.monotonic() + 15)
    assert time.monotonic() - t0 < 30
    assert ok.status == "ok" and ok.result == {"compile_s": 1.5}
    assert slow.status == "timeout" and "within 1 s" in slow.reason
    assert bad.status == "error" and "no triton here" in bad.reason
    assert never.status == "timeout"  # killed at the deadline
    assert jobs == [ok, slow, bad, never]


def test_tensorrt_headers_come_from_a_carried_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(builds, "find_tensorrt_headers", lambda: None)
    wheels = tmp_path / ".whl"
    wheels.mkdir()
    assert builds.tensorrt_headers(tmp_path / "b", wheels)[0] is None
    with zipfile.ZipFile(wheels / "kernel_lens-2.0.1-py3-none-any.whl", "w") as zf:
        zf.writestr("kernel_lens/include/tensorrt/NvInferRuntime.h", "// runtime\n")
        zf.writestr("kernel_lens/include/tensorrt/NvInfer.h", "// infer\n")
        zf.writestr("kernel_lens/__init__.py", "")
    path, source = builds.tensorrt_headers(tmp_path / "b", wheels)
    assert path == tmp_path / "b" / "tensorrt-include" and "kernel_lens-2.0.1" in source
    assert sorted(p.name for p in path.iterdir()) == ["NvInfer.h", "NvInferRuntime.h"]


def test_gpu_build_is_sm_90a_sass_only_on_hopper():
    assert builds.cuda_arch((9, 0)) == "90a" and builds.cuda_arch(None) == "90a" and builds.cuda_arch((8, 9)) == "89"
    assert builds.describe_flags("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    (_, cmake), (_, ext) = builds.build_commands(Path("/b"), "90a", gpu=True, torch_ext=True)
    assert cmake[-5:] == ["--cuda-archs", "90a", "-q", "--no-ptx", "--no-emulation"]
    assert ext[-3:] == ["--no-ptx", "--no-cmake", "--torch-ext"]
    from trt_plugins.build import cmake_archs, torch_arch_list
    assert cmake_archs("90a", ptx=False) == "90a-real" and torch_arch_list("90a", ptx=False) == "9.0a"
    assert cmake_archs("80;90") == "80-real;90" and torch_arch_list("80;90") == "8.0;9.0+PTX"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A dry run of the steps that need no build (facts and the generator)."""
    out = tmp_path_factory.mktemp("dc") / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device", "--out", str(out), "--dry-run", "--steps",
                           "facts,generator", "--seed", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "device-check.jsonl"


def test_ingest_refuses_what_is_not_one_gpu_run(small_run, tmp_path):
    recs = [json.loads(line) for line in small_run.read_text().splitlines()]
    with pytest.raises(ingest.IngestError, match="a dry run"):
        ingest.validate(recs)
    with pytest.raises(ingest.IngestError, match="not device-check records"):
        ingest.validate([{**recs[0], "kind": "backends"}])
    with pytest.raises(ingest.IngestError, match="no records"):
        ingest.validate([])
    gpu = [{**r, "dry_run": False, "env": {**r["env"], "device": "cuda"}} for r in recs]
    with pytest.raises(ingest.IngestError, match="no summary record"):
        ingest.validate([r for r in gpu if r["step"] != "summary"])
    with pytest.raises(ingest.IngestError, match="2 runs"):
        ingest.validate(gpu + [{**gpu[0], "run_id": "other"}])


def test_ingest_copies_a_run_once_and_regenerates_the_report(small_run, tmp_path):
    # The dry run's own records relabelled as a GPU run: this tests the copying and rendering, not any figures.
    recs = [json.loads(line) for line in small_run.read_text().splitlines()]
    relabelled = [{**r, "dry_run": False, "env": {**r["env"], "device": "cuda", "device_name": "Test GPU 80GB"}}
                  for r in recs]
    src = tmp_path / "device-check.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in relabelled))
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    dest = ingest.ingest(src, results, md, plots=False)
    assert dest.name == f"device-check-test-gpu-80gb-{recs[0]['run_id']}.jsonl"
    assert dest.read_bytes() == src.read_bytes()
    text = md.read_text()
    assert f"### Test GPU 80GB — device check {recs[0]['run_id']}" in text
    assert "No GPU device check has been recorded yet" not in text
    gen = next(r for r in recs if r["name"] == "reference_fp32")
    assert f"{gen['rel_l2']:.3g}" in text
    with pytest.raises(ingest.IngestError, match="ingested already"):
        ingest.ingest(src, results, md, plots=False)
    assert sorted(p.name for p in results.iterdir()) == [dest.name]
