"""Export StyleGAN2 generators (Karras et al., 2020) to ONNX: mapping, synthesis and the whole generator.

Graphs use the reference ops (activation-scaling modulated conv, no grouped conv) so the batch axis stays
dynamic; constant noise comes from the checkpoint's buffers unless `noise_input` makes it an input.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from training.networks.stylegan2 import Generator, SynthesisLayer, truncate

DEFAULT_OPSET = 17
# NVlabs clamps fp16 activations at 256; without it fp16 StyleGAN decoders overflow to inf/NaN.
FP16_CLAMP = 256.0


def img_to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> uint8 NHWC, the same rule as training.generate.to_uint8."""
    # Transpose before the cast: TensorRT accepts uint8 only as a graph input/output, never in between.
    x = ((img.float() + 1) * 127.5).round().clamp(0, 255)
    return x.permute(0, 2, 3, 1).to(torch.uint8)


class MappingGraph(nn.Module):
    """z [N, z_dim], psi [N] -> w [N, w_dim] (untruncated), ws [N, num_ws, w_dim] (truncated towards w_avg)."""

    def __init__(self, G: Generator):
        super().__init__()
        self.mapping = G.mapping
        self.num_ws = G.num_ws

    def forward(self, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.mapping(z)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        ws = self.mapping.w_avg + psi.reshape(-1, 1, 1) * (ws - self.mapping.w_avg)
        return w, ws


class SynthesisGraph(nn.Module):
    """ws [N, num_ws, w_dim] (+ optional noise inputs) -> img [N, 3, R, R] float and/or img_u8 [N, R, R, 3]."""

    def __init__(self, G: Generator, outputs: tuple[str, ...] = ("img", "img_u8"), noise_input: bool = False,
                 half: bool = False, impl: str = "ref"):
        super().__init__()
        self.synthesis = G.synthesis
        self.outputs = outputs
        self.noise_input = noise_input
        self.half = half
        self.impl = impl
        self.layers = [m for m in G.synthesis.modules() if isinstance(m, SynthesisLayer)]

    def forward(self, ws: torch.Tensor, *noises: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.noise_input:
            # Noise inputs replace the stored buffers: [N or 1, 1, r, r] each, in layer order.
            originals = [layer.noise_const for layer in self.layers]
            for layer, n in zip(self.layers, noises):
                layer.noise_const = n  # [N or 1, 1, r, r] broadcasts like the stored [r, r] buffer
        try:
            x = ws.half() if self.half else ws
            img = self.synthesis(x, noise_mode="const", impl=self.impl).float()
        finally:
            if self.noise_input:
                for layer, orig in zip(self.layers, originals):
                    layer.noise_const = orig
        out = []
        for name in self.outputs:
            out.append(img if name == "img" else img_to_uint8(img))
        return tuple(out)


class GeneratorGraph(nn.Module):
    """z [N, z_dim], psi [N] -> img, img_u8: mapping + truncation + synthesis in one graph."""

    def __init__(self, G: Generator, half: bool = False):
        super().__init__()
        self.mapping = MappingGraph(G)
        self.synthesis = SynthesisGraph(G, half=half)

    def forward(self, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, ws = self.mapping(z, psi)
        return self.synthesis(ws)


def half_generator(G: Generator) -> Generator:
    """A copy of G for fp16 synthesis: weights in half, activations clamped at 256 in every layer.

    Demodulation is still computed in float32 (training.ops.demod_coefficients casts up), and the mapping
    network stays in float32.
    """
    Gh = copy.deepcopy(G).eval()
    for m in Gh.synthesis.modules():
        if hasattr(m, "conv_clamp") and m.conv_clamp is None:
            m.conv_clamp = FP16_CLAMP
    Gh.synthesis.half()
    return Gh


@dataclass
class GraphInfo:
    path: Path
    inputs: dict[str, dict]
    outputs: dict[str, dict]
    nodes: int
    bytes: int


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic: dict[str, dict[int, str]], opset: int) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about static channel counts are expected
        torch.onnx.export(module, args, buf, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    import onnx
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name, model.producer_version = "stylecast", _version()
    model.doc_string = ""
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def _version() -> str:
    from common.version import stylecast_version
    return stylecast_version()


def simplify(path: Path) -> bool:
    """Run onnxsim on a graph in place when onnxsim is installed; returns True if it ran."""
    try:
        import onnx
        from onnxsim import simplify as onnxsim_simplify
    except ImportError:
        return False
    model, ok = onnxsim_simplify(onnx.load(str(path)))
    if ok:
        path.write_bytes(model.SerializeToString(deterministic=True))
    return bool(ok)


def _io_info(path: Path) -> tuple[dict, dict, int]:
    import onnx
    m = onnx.load(str(path), load_external_data=False)

    def desc(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return ({v.name: desc(v) for v in m.graph.input}, {v.name: desc(v) for v in m.graph.output}, len(m.graph.node))


def export_mapping(G: Generator, path: str | Path, opset: int = DEFAULT_OPSET) -> GraphInfo:
    """Write mapping.onnx: z [N, z_dim] float32, psi [N] float32 -> w [N, w_dim], ws [N, num_ws, w_dim]."""
    path = Path(path)
    G = G.eval().cpu()
    z = torch.randn(2, G.z_dim)
    psi = torch.ones(2)
    _export(MappingGraph(G), (z, psi), path, ["z", "psi"], ["w", "ws"],
            {"z": {0: "N"}, "psi": {0: "N"}, "w": {0: "N"}, "ws": {0: "N"}}, opset)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)


def export_synthesis(G: Generator, path: str | Path, outputs: tuple[str, ...] = ("img", "img_u8"),
                     noise_input: bool = False, fp16: bool = False, opset: int = DEFAULT_OPSET,
                     do_simplify: bool = False) -> GraphInfo:
    """Write synthesis.onnx: ws [N, num_ws, w_dim] float32 -> img [N, 3, R, R] float32 / img_u8 [N, R, R, 3].

    Args:
        outputs: any of "img" (float [-1, 1] NCHW) and "img_u8" (uint8 NHWC).
        noise_input: expose per-layer noise as inputs noise_0.. ([N or 1, 1, r, r]) instead of constants.
        fp16: half-precision weights/activations with fp32 demodulation and activations clamped at 256.
    """
    path = Path(path)
    for o in outputs:
        if o not in ("img", "img_u8"):
            raise ValueError(f"unknown synthesis output {o!r}")
    G = half_generator(G) if fp16 else G.eval().cpu()
    module = SynthesisGraph(G, outputs=outputs, noise_input=noise_input, half=fp16)
    ws = torch.randn(2, G.num_ws, G.w_dim)
    args: tuple = (ws,)
    names = ["ws"]
    dynamic: dict[str, dict[int, str]] = {"ws": {0: "N"}}
    if noise_input:
        for i, layer in enumerate(module.layers):
            r = layer.resolution
            args += (torch.randn(1, 1, r, r, dtype=torch.float16 if fp16 else torch.float32),)
            names.append(f"noise_{i}")
            dynamic[f"noise_{i}"] = {0: "N_noise"}
    for o in outputs:
        dynamic[o] = {0: "N"}
    _export(module, args, path, names, list(outputs), dynamic, opset)
    if do_simplify:
        simplify(path)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)


def export_generator(G: Generator, path: str | Path, fp16: bool = False, opset: int = DEFAULT_OPSET) -> GraphInfo:
    """Write generator.onnx: z [N, z_dim], psi [N] -> img, img_u8 (mapping + truncation + synthesis)."""
    path = Path(path)
    G = G.eval().cpu()
    module = GeneratorGraph(half_generator(G) if fp16 else G, half=fp16)
    if fp16:
        module.mapping = MappingGraph(G)
    _export(module, (torch.randn(2, G.z_dim), torch.ones(2)), path, ["z", "psi"], ["img", "img_u8"],
            {"z": {0: "N"}, "psi": {0: "N"}, "img": {0: "N"}, "img_u8": {0: "N"}}, opset)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)


def reference_outputs(G: Generator, z: torch.Tensor, psi: torch.Tensor) -> dict[str, torch.Tensor]:
    """PyTorch reference for golden files: w, ws (per-sample psi), img and img_u8."""
    G = G.eval().cpu()
    with torch.no_grad():
        w = G.mapping(z)
        ws = truncate(G.broadcast(w), G.w_avg, psi)
        img = G.synthesis(ws, noise_mode="const", impl="ref")
    return {"w": w, "ws": ws, "img": img, "img_u8": img_to_uint8(img)}
