"""Fast stylizer -> ONNX (dynamic N, H, W) -> fast_style bundle: parity with PyTorch at two sizes, the manifest,
argument and parity checks before anything is published, the command. (Verify, tampering and atomicity of every kind:
test_bundle_kinds.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("hw", [(37, 53), (64, 48)])
def test_onnx_matches_pytorch_at_two_sizes(style_bundle, style_ckpt, run_graph, hw):
    """One graph (exported from a 36x44 batch-2 dummy) runs other sizes and batches, within 1e-4 of PyTorch."""
    from training.style.fast_style import load_fast_style
    net = load_fast_style(style_ckpt)
    x = np.tanh(np.random.RandomState(hw[0]).randn(3, 3, *hw) * 1.5).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    out = run_graph(style_bundle / "stylizer.onnx", img=x)["img_out"]
    assert out.shape == (3, 3, *hw)
    assert float(np.abs(out - ref).max()) <= 1e-4


def test_graph_axes_are_dynamic(style_bundle):
    import onnx
    m = onnx.load(str(style_bundle / "stylizer.onnx"))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert m.opset_import[0].version == 17


def test_manifest_and_verify(style_bundle):
    from protos.manifest import load_manifest
    from serving.verify import verify_bundle
    m = load_manifest(style_bundle)
    assert m["kind"] == "fast_style" and m["model"]["max_size"] == 256 and "stylizer" in m["graphs"]
    assert set(m["files"]) == {"stylizer.onnx", "golden.npz"}
    with np.load(style_bundle / "golden.npz") as g:
        assert g["img_0"].shape == (1, 3, 37, 53) and g["img_1"].shape == (1, 3, 64, 48)
    report = verify_bundle(style_bundle)
    assert report.ok, report
    assert [c.note for c in report.checks] == ["37x53; tolerance 0.0001", "64x48; tolerance 0.0001"]


def test_manifest_rules(style_bundle):
    from protos.manifest import validate_manifest
    doc = json.loads((style_bundle / "manifest.json").read_text())
    assert validate_manifest(doc) == []
    no_graph = json.loads(json.dumps(doc))
    no_graph["graphs"] = {}
    assert "manifest.graphs: missing 'stylizer'" in validate_manifest(no_graph)
    no_max = json.loads(json.dumps(doc))
    del no_max["model"]["max_size"]
    assert any("max_size" in e for e in validate_manifest(no_max))
    jsonschema = pytest.importorskip("jsonschema")
    from protos.manifest import SCHEMA_PATH
    v = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    assert list(v.iter_errors(doc)) == []
    assert list(v.iter_errors(no_graph)) and list(v.iter_errors(no_max))


def test_build_checks_arguments_and_parity_before_publishing(style_ckpt, tmp_path):
    from export import fast_style_bundle as fsb
    with pytest.raises(ValueError, match="name"):
        fsb.build_fast_style_bundle(style_ckpt, tmp_path / "x", "Bad Name")
    with pytest.raises(ValueError, match="max_size"):
        fsb.build_fast_style_bundle(style_ckpt, tmp_path / "x", "x", max_size=8)
    with pytest.raises(ValueError, match="differs from PyTorch"):  # any difference fails the parity check
        fsb.build_fast_style_bundle(style_ckpt, tmp_path / "x", "x", max_abs=-1.0)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]


def test_cli_fast_style_bundle(style_ckpt, tmp_path):
    from click.testing import CliRunner
    from stylecast.cli import cli
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["export", "fast-style-bundle", "-c", str(style_ckpt), "-o", str(out), "--name", "b",
                                 "--max-size", "128"])
    assert r.exit_code == 0, r.output
    assert "verified" in r.output and (out / "stylizer.onnx").is_file()
