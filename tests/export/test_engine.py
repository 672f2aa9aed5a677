"""TensorRT engines: an ahead-of-time TensorRT-RTX build of our synthesis graphs on this CPU-only machine (it
catches ops TensorRT cannot take), clear errors, and verify's handling of engines it cannot run here (never a silent
pass: it says what it did not check, and NOT VERIFIED when engine checks were asked for)."""

from __future__ import annotations

import json
import os
import re

import pytest

import export.engine as engine_mod
from export.engine import EngineError, build_engine, parse_compute_capabilities
from serving.backends import SystemProbe

HAVE_RTX = engine_mod._import_flavour("tensorrt_rtx") is not None

needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
ENTRY_KEYS = {"file", "graph", "onnx_file", "precision", "trt_flavour", "trt_version", "compute_capability",
              "profile", "plugins"}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(engine_mod, "_cuda_capability", lambda: None)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time builds with TensorRT-RTX (no GPU needed)


@needs_rtx
@pytest.mark.parametrize("precision, cc, label", [
    ("fp32", "8.6", "aot:8.6"),
    ("fp16", "sm89,12.0", "aot:8.9,12.0"),
])
def test_rtx_builds_engine_from_our_synthesis_graph(graphs, tmp_path, no_gpu, precision, cc, label):
    import tensorrt_rtx as trt
    entry = build_engine(graphs["synthesis"], tmp_path, precision=precision, min_batch=1, opt_batch=2,
                         max_batch=8, compute_capability=cc, flavour="tensorrt_rtx")
    assert set(entry) == ENTRY_KEYS | {"target_note"}  # TensorRT-RTX: not for Hopper (test_engine_hopper.py)
    assert entry["trt_flavour"] == "tensorrt_rtx" and entry["trt_version"] == trt.__version__
    assert entry["compute_capability"] == label
    assert entry["precision"] == precision and entry["graph"] == "synthesis"
    # fp16 engines come from the fp16 graph (demodulation in fp32), found next to synthesis.onnx.
    assert entry["onnx_file"] == ("synthesis_fp16.onnx" if precision == "fp16" else "synthesis.onnx")
    assert entry["profile"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 8} and entry["plugins"] == []
    tag = label[4:].replace(".", "").replace(",", "-sm")
    assert entry["file"] == f"synthesis.{precision}.tensorrt_rtx-{trt.__version__}.aot-sm{tag}.plan"
    plan = tmp_path / entry["file"]
    assert plan.stat().st_size > 100_000 and plan.stat().st_mode & 0o044 == 0o044
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry["file"]]  # no temporary files left
    with pytest.raises(FileExistsError):
        build_engine(graphs["synthesis"], tmp_path, precision=precision, compute_capability=cc,
                     flavour="tensorrt_rtx")


@needs_rtx
def test_rtx_default_targets_are_every_supported_gpu_from_ampere(graphs, tmp_path, no_gpu):
    entry = build_engine(graphs["synthesis_fp16"], tmp_path, precision="fp16", flavour="tensorrt_rtx")
    targets = parse_compute_capabilities(entry["compute_capability"][4:])
    assert targets[0] == (8, 0) and (8, 9) in targets and (12, 0) in targets


@needs_rtx
def test_rtx_rejects_targets_it_does_not_support(graphs, tmp_path, no_gpu):
    with pytest.raises(EngineError, match=r"cannot target compute capability 9\.0 \(supported: .*8\.9"):
        build_engine(graphs["synthesis"], tmp_path, precision="fp32", compute_capability="9.0",
                     flavour="tensorrt_rtx")
    # Turing is listed, but TensorRT-RTX cannot compile our fp32 GEMMs (the affine layers) for it.
    with pytest.raises(EngineError, match=r"failed to build .* for aot:7\.5: .*Turing"):
        build_engine(graphs["synthesis"], tmp_path, precision="fp32", compute_capability="7.5",
                     flavour="tensorrt_rtx")
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_unloadable_plugin_library_is_a_clear_error(graphs, tmp_path, no_gpu):
    lib = tmp_path / "libbroken.so"
    lib.write_bytes(b"not a shared library")
    out = tmp_path / "out"
    with pytest.raises(EngineError, match="cannot load plugin library .*libbroken.so"):
        build_engine(graphs["synthesis"], out, precision="fp32", plugin_library=lib, compute_capability="8.9",
                     flavour="tensorrt_rtx")
    assert not out.exists()


@needs_rtx
def test_bundle_with_engines_validates_and_verify_says_what_it_did_not_check(export_ckpt, tmp_path, cli, no_gpu,
                                                                             monkeypatch):
    import serving.verify
    from export.bundle import BundleOptions, build_bundle
    from protos.manifest import SCHEMA_PATH, load_manifest
    out = build_bundle(export_ckpt, tmp_path / "tiny", BundleOptions(name="tiny", fp16=True, engines=["fp32", "fp16"],
                                                                     min_batch=1, opt_batch=2, max_batch=8))
    doc = load_manifest(out)
    import jsonschema
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert [e["precision"] for e in doc["engines"]] == ["fp32", "fp16"]
    for e in doc["engines"]:
        assert e["file"] in doc["files"] and (out / e["file"]).is_file()

    monkeypatch.setattr(serving.verify, "probe_system", lambda with_tensorrt=True: SystemProbe())  # no GPU here
    code, text = cli(["export", "verify", out])
    assert code == 0, text
    skipped = [line for line in text.splitlines() if line.startswith("skip") and "no GPU/TensorRT runtime" in line]
    assert len(skipped) == 2, text
    assert text.strip().splitlines()[-1].startswith(
        f"{out}: verified, except 2 TensorRT engine(s) not checked here (no GPU/TensorRT runtime (no CUDA GPU found)"), text
    for mode in ("require", "only"):
        code, text = cli(["export", "verify", out, "--engines", mode])
        assert code == 3 and text.strip().endswith(")") and f"{out}: NOT VERIFIED" in text, text
        assert text.count("was not checked (no GPU/TensorRT runtime") == 4, text  # listed, and in the summary


# ----------------------------------------------------------------------------------------------------------
# Errors that need no TensorRT at all


def test_no_tensorrt_installed_says_how_to_install(graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_mod, "_import_flavour", lambda flavour: None)
    with pytest.raises(EngineError, match=r"needs tensorrt or tensorrt_rtx: install .*pip install tensorrt-rtx-cu13"):
        build_engine(graphs["synthesis"], tmp_path, precision="fp32")
    with pytest.raises(EngineError, match="tensorrt_rtx is not installed"):
        build_engine(graphs["synthesis"], tmp_path, precision="fp32", flavour="tensorrt_rtx")


def test_cli_reports_engine_errors_in_one_line(graphs, tmp_path, monkeypatch, cli):
    monkeypatch.setattr(engine_mod, "_import_flavour", lambda flavour: None)
    code, out = cli(["export", "engine", "--onnx", graphs["synthesis"], "--out", tmp_path, "--precision", "fp32"])
    assert code == 2 and out.startswith("error: ") and "Traceback" not in out and "pip install" in out


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int8"}, "precision must be fp32 or fp16"),
    ({"precision": "fp32", "min_batch": 4, "opt_batch": 2}, "1 <= min <= opt <= max"),
    ({"precision": "fp32", "compute_capability": "ampere"}, "invalid compute capability 'ampere'"),
])
def test_bad_arguments(graphs, tmp_path, kwargs, message):
    if "compute_capability" in kwargs and not HAVE_RTX:
        pytest.skip("target checks need a TensorRT flavour")
    with pytest.raises(EngineError, match=re.escape(message)):
        build_engine(graphs["synthesis"], tmp_path, flavour="tensorrt_rtx" if HAVE_RTX else None, **kwargs)


def test_precision_must_match_the_graph(graphs, tmp_path):
    fp32_only = tmp_path / "g" / "synthesis.onnx"
    fp32_only.parent.mkdir()
    fp32_only.write_bytes(graphs["synthesis"].read_bytes())
    with pytest.raises(EngineError, match="fp16 engines are built from the fp16 graph"):
        build_engine(fp32_only, tmp_path, precision="fp16")
    with pytest.raises(EngineError, match="build fp32 engines from the fp32 graph"):
        build_engine(graphs["synthesis_fp16"], tmp_path, precision="fp32")


@pytest.mark.parametrize("spec, expected", [
    ("8.9", [(8, 9)]), ("sm89", [(8, 9)]), ("SM_120", [(12, 0)]), ("12.0, 8.6,sm86", [(8, 6), (12, 0)]),
    ("90", [(9, 0)]),
])
def test_parse_compute_capabilities(spec, expected):
    assert parse_compute_capabilities(spec) == expected


# ----------------------------------------------------------------------------------------------------------
# Which engines can run here: never a silent pass


ENTRY = {"file": "synthesis.fp16.tensorrt_rtx-1.7.1.116.aot-sm89.plan", "graph": "synthesis", "precision": "fp16",
         "trt_flavour": "tensorrt_rtx", "trt_version": "1.7.1.116", "compute_capability": "aot:8.9",
         "profile": {"min_batch": 1, "opt_batch": 2, "max_batch": 8}, "plugins": []}


@pytest.mark.parametrize("probe, reason", [
    (SystemProbe(), "no GPU/TensorRT runtime (no CUDA GPU found)"),
    (SystemProbe(compute_capability="8.9"), "no GPU/TensorRT runtime (TensorRT is not installed)"),
    (SystemProbe(trt_flavour="tensorrt", trt_version="10.14", compute_capability="8.9"),
     "built for tensorrt_rtx, tensorrt installed"),
    (SystemProbe(trt_flavour="tensorrt_rtx", trt_version="1.8.0.1", compute_capability="8.9"),
     "built with TensorRT 1.7.1.116, 1.8.0.1 installed"),
    (SystemProbe(trt_flavour="tensorrt_rtx", trt_version="1.7.1.116", compute_capability="9.0"),
     "built for compute capability aot:8.9, GPU has 9.0"),
    (SystemProbe(trt_flavour="tensorrt_rtx", trt_version="1.7.1.116", compute_capability="8.9"), None),
], ids=["no-gpu", "no-tensorrt", "other-flavour", "other-version", "other-gpu", "runs"])
def test_engine_skip_reasons(probe, reason):
    from serving.verify import engine_skip_reason
    assert engine_skip_reason(ENTRY, probe) == reason


# ----------------------------------------------------------------------------------------------------------
# On a GPU with TensorRT: build for this GPU and run the engine against the golden outputs


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_runs_and_matches_golden_on_gpu(bundle, tmp_path, precision):
    """The engine check verify and the server run (serving's TensorRT runner, torch-free) on a fresh engine."""
    import shutil

    from protos.manifest import load_manifest
    from serving.stylegan2_model import StyleGAN2Model
    try:
        flavour = engine_mod.select_tensorrt()[1]
    except EngineError as exc:
        pytest.skip(str(exc))
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    try:
        entry = build_engine(b / "synthesis.onnx", b, precision=precision, min_batch=1, opt_batch=2, max_batch=4)
    except EngineError as exc:
        if "officially supports" in str(exc):  # e.g. TensorRT-RTX on Hopper
            pytest.skip(str(exc))
        raise
    assert entry["trt_flavour"] == flavour and not entry["compute_capability"].startswith("aot:")
    checks = StyleGAN2Model.engine_checks(b, load_manifest(b), entry)
    assert [c.output for c in checks] == ["img_u8"]
    assert all(c.ok and not c.skipped for c in checks), checks
    assert os.path.getsize(b / entry["file"]) > 0
