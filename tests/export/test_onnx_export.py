"""ONNX export of the StyleGAN2 generator: valid, dynamic-batch graphs of reference ops that match PyTorch."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

from training.generate import to_uint8
from training.networks.stylegan2 import seeds_to_z, truncate

FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR = 40.0
RUN_BATCHES = (1, 3, 8)  # every graph is exported with a batch-2 dummy input


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook PSNR (dB) of images in [-1, 1] (peak-to-peak 2), in float64."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))


def _ws(G, n: int, seed: int) -> torch.Tensor:
    """Realistic per-sample ws: mapped from random z, truncated with per-sample psi."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=g)
    psi = torch.rand(n, generator=g) * 0.5 + 0.5
    with torch.no_grad():
        return truncate(G.broadcast(G.mapping(z)), G.w_avg, psi)


def _torch_img(G, ws: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const", impl="ref").numpy()


# ----------------------------------------------------------------------------------------------------------
# Graph structure


@pytest.mark.parametrize("name", ["mapping", "synthesis", "synthesis_fp16", "synthesis_noise", "generator"])
def test_graph_is_valid_dynamic_and_uses_reference_ops(graphs, tiny_G, name):
    model = onnx.load(str(graphs[name]))
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets.get("ai.onnx", 0) >= 17, opsets
    assert set(opsets) == {"ai.onnx"}, f"custom op domains in a reference graph: {opsets}"
    for v in list(model.graph.input) + list(model.graph.output):
        dim0 = v.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), f"{v.name}: batch axis is not dynamic"

    # No grouped convolution except the depthwise blur, whose group is a (static) channel count.
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs or name == "mapping"
    depthwise_groups = set(tiny_G.cfg.channels) | {tiny_G.cfg.img_channels}
    for n, group in _groups(model).items():
        assert group == 1 or (n.startswith("Conv:") and group in depthwise_groups), f"{n}: group={group}"


def _groups(model: onnx.ModelProto) -> dict[str, int]:
    return {f"{n.op_type}:{n.name}": next((a.i for a in n.attribute if a.name == "group"), 1)
            for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")}


def test_graphs_are_deterministic_and_independent_of_the_export_batch(graphs, tiny_G, tmp_path):
    """Exporting again (here from tiny_G itself, the bundle's came from its saved checkpoint) gives the same
    bytes, also with a batch-3 dummy input: the grouped-conv form would bake N into `group`, ours does not."""
    from export.onnx_export import SynthesisGraph, _export, export_mapping
    assert export_mapping(tiny_G, tmp_path / "m.onnx").path.read_bytes() == graphs["mapping"].read_bytes()
    path = tmp_path / "synthesis_b3.onnx"
    _export(SynthesisGraph(tiny_G), (torch.randn(3, tiny_G.num_ws, tiny_G.w_dim),), path, ["ws"], ["img", "img_u8"],
            {"ws": {0: "N"}, "img": {0: "N"}, "img_u8": {0: "N"}}, 17)
    assert _groups(onnx.load(str(path))) == _groups(onnx.load(str(graphs["synthesis"])))
    assert path.read_bytes() == graphs["synthesis"].read_bytes()


def test_fp16_graph_keeps_demodulation_in_fp32_and_clamps(graphs, tiny_G):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(graphs["synthesis_fp16"])))
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs and all(types[n.output[0]] == f16 for n in convs), "convolutions must run in fp16"
    sqrts = [n for n in model.graph.node if n.op_type in ("Sqrt", "Rsqrt", "Reciprocal")]
    assert sqrts and all(types[n.output[0]] == f32 for n in sqrts), "demodulation must stay in fp32"
    n_layers = sum(1 for name, _ in tiny_G.synthesis.named_modules() if name.endswith(("conv0", "conv1")))
    fp16_clips = [n for n in model.graph.node if n.op_type == "Clip" and types[n.output[0]] == f16]
    assert len(fp16_clips) >= n_layers, "every fp16 synthesis layer clamps its activations"


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime vs PyTorch, exported at batch 2, run at 1, 3 and 8


@pytest.mark.parametrize("n", RUN_BATCHES)
def test_mapping_matches_torch(graphs, run_graph, tiny_G, n):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, tiny_G.z_dim, generator=g)
    psi = torch.rand(n, generator=g) * 1.5 - 0.25
    out = run_graph(graphs["mapping"], z=z.numpy(), psi=psi.numpy())
    with torch.no_grad():
        w = tiny_G.mapping(z)
        ws = truncate(tiny_G.broadcast(w), tiny_G.w_avg, psi)
    assert out["w"].shape == (n, tiny_G.w_dim) and out["ws"].shape == (n, tiny_G.num_ws, tiny_G.w_dim)
    assert np.abs(out["w"] - w.numpy()).max() <= FP32_MAX_ABS
    assert np.abs(out["ws"] - ws.numpy()).max() <= FP32_MAX_ABS


@pytest.mark.parametrize("n", RUN_BATCHES)
def test_synthesis_fp32_matches_torch(graphs, run_graph, tiny_G, n):
    ws = _ws(tiny_G, n, seed=10 + n)
    out = run_graph(graphs["synthesis"], ws=ws.numpy())
    ref = _torch_img(tiny_G, ws)
    assert out["img"].shape == ref.shape == (n, 3, tiny_G.resolution, tiny_G.resolution)
    assert np.abs(out["img"] - ref).max() <= FP32_MAX_ABS
    assert out["img_u8"].dtype == np.uint8 and out["img_u8"].shape == (n, tiny_G.resolution, tiny_G.resolution, 3)
    diff = np.abs(out["img_u8"].astype(int) - to_uint8(torch.from_numpy(ref)).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3  # only values within 1e-4 of a rounding edge may flip


@pytest.mark.parametrize("n", RUN_BATCHES)
def test_synthesis_fp16_psnr(graphs, run_graph, tiny_G, n):
    ws = _ws(tiny_G, n, seed=20 + n)
    out = run_graph(graphs["synthesis_fp16"], ws=ws.numpy())
    ref = _torch_img(tiny_G, ws)
    assert out["img"].dtype == np.float32 and np.isfinite(out["img"]).all()
    assert psnr(out["img"], ref) >= FP16_MIN_PSNR


@pytest.mark.parametrize("n", RUN_BATCHES)
def test_generator_graph_matches_torch(graphs, run_graph, tiny_G, n):
    from export.onnx_export import reference_outputs
    g = torch.Generator().manual_seed(30 + n)
    z = torch.randn(n, tiny_G.z_dim, generator=g)
    psi = torch.rand(n, generator=g) * 0.5 + 0.5
    out = run_graph(graphs["generator"], z=z.numpy(), psi=psi.numpy())
    ref = reference_outputs(tiny_G, z, psi)
    assert np.abs(out["img"] - ref["img"].numpy()).max() <= FP32_MAX_ABS
    diff = np.abs(out["img_u8"].astype(int) - ref["img_u8"].numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


# ----------------------------------------------------------------------------------------------------------
# Noise as an input


def _noise_buffers(G) -> list[np.ndarray]:
    from training.networks.stylegan2 import SynthesisLayer
    layers = [m for m in G.synthesis.modules() if isinstance(m, SynthesisLayer)]
    return [m.noise_const.reshape(1, 1, m.resolution, m.resolution).numpy() for m in layers]


def test_noise_input_graph(graphs, run_graph, tiny_G):
    from export.onnx_export import SynthesisGraph
    n = 3
    ws = _ws(tiny_G, n, seed=40)
    buffers = _noise_buffers(tiny_G)
    sess_inputs = [i.name for i in onnx.load(str(graphs["synthesis_noise"])).graph.input]
    assert sess_inputs == ["ws"] + [f"noise_{i}" for i in range(len(buffers))]

    # Fed the checkpoint's buffers it is the constant-noise graph.
    const = run_graph(graphs["synthesis"], ws=ws.numpy())["img"]
    fed = run_graph(graphs["synthesis_noise"], ws=ws.numpy(),
                    **{f"noise_{i}": b for i, b in enumerate(buffers)})["img"]
    assert np.abs(fed - const).max() <= 1e-5

    # Other noise, one map per sample ([N, 1, r, r]), changes the image exactly as in PyTorch.
    g = torch.Generator().manual_seed(41)
    other = [torch.randn(n, 1, b.shape[-2], b.shape[-1], generator=g) for b in buffers]
    out = run_graph(graphs["synthesis_noise"], ws=ws.numpy(),
                    **{f"noise_{i}": t.numpy() for i, t in enumerate(other)})["img"]
    assert np.abs(out - const).max() > 1e-2
    with torch.no_grad():
        ref = SynthesisGraph(tiny_G, outputs=("img",), noise_input=True)(ws, *other)[0].numpy()
    assert np.abs(out - ref).max() <= FP32_MAX_ABS
    # The graph restored the buffers it swapped in.
    assert all(np.array_equal(a, b) for a, b in zip(_noise_buffers(tiny_G), buffers))


# ----------------------------------------------------------------------------------------------------------
# uint8 output == the PNG that `stylecast generate` writes


@pytest.mark.parametrize("psi", [0.7, 1.0])
def test_uint8_output_equals_generate_png(bundle, export_ckpt, run_graph, cli, tiny_G, tmp_path, psi):
    """mapping.onnx + synthesis.onnx img_u8 for a seed is the image `stylecast generate` writes, PNG bytes and all.

    Two float implementations can only round identically away from rounding edges: a value PyTorch puts at
    10.50004 and ONNX Runtime at 10.49999 legitimately becomes 11 vs 10. So pixels must be equal except for
    off-by-one values lying within 1e-3 (of 255) of a .5 edge in the PyTorch image, and equal pixels must give
    the same PNG bytes.
    """
    from PIL import Image
    seeds = [3, 11]
    code, msg = cli(["generate", "--checkpoint", export_ckpt, "--seeds", "3,11", "--psi", str(psi),
                     "--outdir", tmp_path, "--device", "cpu"])
    assert code == 0, msg
    z = seeds_to_z(seeds, tiny_G.z_dim)
    ws = run_graph(bundle / "mapping.onnx", z=z.numpy(), psi=np.full(len(seeds), psi, np.float32))["ws"]
    img_u8 = run_graph(bundle / "synthesis.onnx", ws=ws)["img_u8"]
    with torch.no_grad():
        scaled = ((tiny_G(z, psi=psi, noise_mode="const", impl="ref") + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    for seed, u8, ref in zip(seeds, img_u8, scaled):
        png = (tmp_path / f"seed{seed:04d}.png").read_bytes()
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        diff = u8.astype(int) - pixels.astype(int)
        edge = np.abs(ref - np.floor(ref) - 0.5) < 1e-3
        assert np.abs(diff).max() <= 1 and not (diff != 0)[~edge].any(), f"seed {seed}: pixels differ off an edge"
        assert (diff != 0).mean() <= 1e-3
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, "PNG")
        assert (buf.getvalue() == png) == (not diff.any()), f"seed {seed}: equal pixels but different PNG bytes"


def test_simplified_graph_still_matches(tiny_G, tmp_path, run_graph):
    pytest.importorskip("onnxsim", reason="graph simplification is optional (pip install onnxsim)")
    from export.onnx_export import export_synthesis
    info = export_synthesis(tiny_G, tmp_path / "s.onnx", do_simplify=True)
    ws = _ws(tiny_G, 3, seed=50)
    assert np.abs(run_graph(info.path, ws=ws.numpy())["img"] - _torch_img(tiny_G, ws)).max() <= FP32_MAX_ABS
