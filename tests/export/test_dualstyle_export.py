"""export.dualstyle_export: the DualStyleGAN synthesis graph against PyTorch in a real ONNX Runtime session
(exported at batch 2, run at batch 3 with different weights per sample), static graph, input validation."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from export.dualstyle_export import export_dualstyle_synthesis
from training.dualstyle import DualStyleGAN, colour_only_weights, default_weights


@pytest.fixture(scope="module")
def dual(tiny_G) -> DualStyleGAN:
    """tiny_G (32 px, w_dim 64, noise strength 0.1) + an extrinsic path with large random weights."""
    torch.manual_seed(0)
    m = DualStyleGAN.from_generator(copy.deepcopy(tiny_G), res_index=4)
    m.init_extrinsic_path(modres_scale=0.5, colour_noise=0.5)
    with torch.no_grad():
        for p in m.extrinsic_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def graph(dual, tmp_path_factory):
    path = tmp_path_factory.mktemp("dualstyle") / "dualstyle_synthesis.onnx"
    return export_dualstyle_synthesis(dual, path)


def _inputs(dual: DualStyleGAN, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    ws = dual.map_intrinsic(torch.randn(n, dual.num_ws, dual.z_dim, generator=g), psi=0.75)
    ex = dual.map_extrinsic(torch.randn(n, dual.num_ws, dual.z_dim, generator=g))
    weights = torch.tensor([default_weights(dual.cfg), colour_only_weights(dual.cfg), [0.0] * dual.num_ws])
    return ws.detach(), ex.detach(), weights


def test_onnx_matches_torch_at_another_batch_with_per_sample_weights(dual, graph, run_graph):
    ws, ex, weights = _inputs(dual, 3)
    with torch.no_grad():
        ref = dual(ws, ex, weights, noise_mode="const", impl="ref")
        base = dual.generator.synthesis(ws, noise_mode="const", impl="ref")
    out = run_graph(graph.path, ws=ws.numpy(), exstyle_w=ex.numpy(), weights=weights.numpy())
    assert out["img"].shape == (3, 3, 32, 32) and out["img_u8"].shape == (3, 32, 32, 3)
    assert np.abs(out["img"] - ref.numpy()).max() <= 1e-4
    # the three weight rows give three different images; all-zero weights is the base generator's image
    assert np.abs(out["img"][0] - out["img"][1]).max() > 0.05
    assert np.abs(out["img"][2] - base[2].numpy()).max() <= 1e-4
    assert np.abs(out["img"][0] - base[0].numpy()).max() > 0.05
    u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    diff = np.abs(out["img_u8"].astype(np.int32) - u8.astype(np.int32))
    assert out["img_u8"].dtype == np.uint8 and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_graph_is_static_with_dynamic_batch(graph):
    assert graph.inputs == {"ws": {"dtype": "float32", "shape": ["N", 8, 64]},
                            "exstyle_w": {"dtype": "float32", "shape": ["N", 8, 64]},
                            "weights": {"dtype": "float32", "shape": ["N", 8]}}
    assert graph.outputs["img"]["shape"] == ["N", 3, 32, 32]
    assert graph.outputs["img_u8"] == {"dtype": "uint8", "shape": ["N", 32, 32, 3]}
    ops = {node.op_type for node in onnx.load(str(graph.path)).graph.node}
    assert not ops & {"If", "Loop", "Scan", "RandomNormal", "RandomNormalLike", "RandomUniformLike"}


def test_img_only_and_fuse_index(dual, tmp_path, run_graph):
    info = export_dualstyle_synthesis(dual, tmp_path / "img.onnx", outputs=("img",), fuse_index=3)
    assert list(info.outputs) == ["img"]
    ws, ex, weights = _inputs(dual, 2)
    weights = torch.rand(2, dual.num_ws, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dual(ws, ex, weights, fuse_index=3, impl="ref")
    out = run_graph(info.path, ws=ws.numpy(), exstyle_w=ex.numpy(), weights=weights.numpy())
    assert np.abs(out["img"] - ref.numpy()).max() <= 1e-4


def test_bad_outputs_are_rejected(dual, tmp_path):
    with pytest.raises(ValueError, match="outputs must be distinct names"):
        export_dualstyle_synthesis(dual, tmp_path / "x.onnx", outputs=("image",))
    with pytest.raises(ValueError, match="outputs must be distinct names"):
        export_dualstyle_synthesis(dual, tmp_path / "x.onnx", outputs=())
    assert not (tmp_path / "x.onnx").exists()
