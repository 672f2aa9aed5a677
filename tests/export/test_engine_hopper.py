"""TensorRT-RTX engines and Hopper: TensorRT-RTX builds no sm90 code, so an engine it builds never runs on an
H100/H200. The build says so in one line on stderr and records it in the manifest engine entry (target_note)."""

from __future__ import annotations

import copy
import json

import pytest

import export.engine as engine_mod
from export.engine import build_engine, hopper_note

needs_rtx = pytest.mark.skipif(engine_mod._import_flavour("tensorrt_rtx") is None,
                               reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")


def test_hopper_note_names_the_targets_and_the_way_out():
    note = hopper_note("tensorrt_rtx", "1.7.1.116", "aot:8.0,8.6,8.9,12.0,12.1")
    assert note.startswith("TensorRT-RTX 1.7.1.116 engines target 8.0,8.6,8.9,12.0,12.1 only")
    assert "does not run on Hopper (H100/H200, compute capability 9.0)" in note and "full TensorRT" in note
    assert hopper_note("tensorrt", "10.14", "9.0") is None        # full TensorRT, built on the H100 itself
    assert hopper_note("tensorrt", "10.14", "8.9") is None        # only TensorRT-RTX engines carry the note
    assert hopper_note("tensorrt_rtx", "1.7", "9.0") is None      # built on a Hopper GPU (if the builder can)


@needs_rtx
def test_rtx_build_says_it_will_not_run_on_hopper(graphs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_mod, "_cuda_capability", lambda: None)
    entry = build_engine(graphs["synthesis"], tmp_path, precision="fp32", max_batch=4, compute_capability="8.6",
                         flavour="tensorrt_rtx")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "Hopper" in ln]
    assert lines == [f"stylecast: note: {entry['target_note']}"]
    assert "8.6 only" in entry["target_note"] and "H100/H200" in entry["target_note"]


def test_manifest_accepts_a_target_note_and_only_as_text(bundle):
    import jsonschema

    from protos.manifest import SCHEMA_PATH, load_manifest, validate_manifest
    doc = copy.deepcopy(load_manifest(bundle))
    graph = next(iter(doc["files"]))
    doc["engines"] = [{"file": graph, "graph": "synthesis", "precision": "fp32", "trt_flavour": "tensorrt_rtx",
                       "trt_version": "1.7.1.116", "compute_capability": "aot:8.6",
                       "target_note": hopper_note("tensorrt_rtx", "1.7.1.116", "aot:8.6")}]
    schema = json.loads(SCHEMA_PATH.read_text())
    assert validate_manifest(doc) == []
    jsonschema.validate(doc, schema)
    doc["engines"][0]["target_note"] = 9.0
    assert validate_manifest(doc) == ["manifest.engines[0].target_note: expected a string"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
