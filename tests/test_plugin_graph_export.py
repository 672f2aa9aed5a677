"""`export onnx --modconv plugin`: one stylecast::ModulatedConv2d node per synthesis layer, with the attributes
the TensorRT plugin parses (trt_plugins/README.md), and the same numbers as the reference in PyTorch."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.plugin_graph import export_synthesis_plugin, plugin_layers
from training.ops import setup_filter

ROOT = Path(__file__).resolve().parent.parent


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_plugin_nodes_and_attributes(tiny_G, tmp_path):
    path = tmp_path / "synthesis_plugin.onnx"
    export_synthesis_plugin(tiny_G, path)
    m = onnx.load(str(path))
    assert any(o.domain == "stylecast" and o.version == 1 for o in m.opset_import)
    nodes = [n for n in m.graph.node if n.domain == "stylecast"]
    assert all(n.op_type == "ModulatedConv2d" for n in nodes)
    res = tiny_G.cfg.resolutions
    n_conv, n_rgb = 1 + 2 * (len(res) - 1), len(res)
    assert len(nodes) == n_conv + n_rgb
    # No convolution of the synthesis network is left as a standard op.
    assert not [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    f = setup_filter([1, 3, 3, 1]).flatten().tolist()
    ups = [n for n in nodes if _attrs(n)["up"] == 2]
    rgbs = [n for n in nodes if _attrs(n)["demodulate"] == 0]
    assert len(ups) == len(res) - 1 and len(rgbs) == n_rgb
    for n in nodes:
        a = _attrs(n)
        assert a["plugin_namespace"] == b"stylecast" and a["plugin_version"] == b"1"
        expect_inputs = 3 + a["has_noise"] + a["has_bias"] + a["has_skip"]
        assert len(n.input) == expect_inputs
        if a["demodulate"]:
            assert a["act"] == 1 and math.isclose(a["gain"], math.sqrt(2), rel_tol=1e-6) and a["has_noise"] == 1
        else:
            assert a["act"] == 0 and a["gain"] == 1.0 and a["has_noise"] == 0 and a["has_bias"] == 1
        if a["up"] == 2 or a["has_skip"]:
            assert a["filter_size"] == 4 and np.allclose(a["resample_filter"], f)
        assert a["clamp"] == -1.0
    assert sum(_attrs(n)["has_skip"] for n in rgbs) == n_rgb - 1  # every to-RGB but the 4 px one adds the skip


def test_plugin_path_matches_reference_in_torch(tiny_G):
    ws = torch.randn(3, tiny_G.num_ws, tiny_G.w_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_G.synthesis(ws)
        with plugin_layers():
            plug = tiny_G.synthesis(ws)
    assert torch.equal(ref, plug)


def test_cli_modconv_plugin(tiny_G, tmp_path):
    from training.checkpoints import save_native
    save_native(tmp_path / "ck", tiny_G)
    r = subprocess.run([sys.executable, "-m", "stylecast", "export", "onnx", "-c", str(tmp_path / "ck"), "--out",
                        str(tmp_path / "o"), "--graph", "synthesis", "--modconv", "plugin"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = onnx.load(str(tmp_path / "o" / "synthesis.onnx"))
    assert sum(n.domain == "stylecast" for n in m.graph.node) == 2 * len(tiny_G.cfg.resolutions) - 1 + len(tiny_G.cfg.resolutions)
