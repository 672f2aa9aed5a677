"""Synthesis graphs whose layers are `stylecast::ModulatedConv2d` nodes for the TensorRT plugin (trt_plugins/).

Each StyleGAN2 synthesis layer (modulated conv + its epilogue, and to-RGB with the skip upsample) becomes one
custom node with the attributes the plugin parses (trt_plugins/README.md, "The ONNX / TensorRT contract");
the affine (style) maps and everything else stay standard ONNX. Such a graph runs only where the plugin
library is loaded (TensorRT); ONNX Runtime cannot run it.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Iterator

import torch

import training.networks.stylegan2 as sg2
from training.networks.stylegan2 import Generator
from training.ops import modulated_conv2d as ref_modulated_conv2d

from .onnx_export import DEFAULT_OPSET, GraphInfo, SynthesisGraph, _io_info, half_generator

PLUGIN_DOMAIN = "stylecast"
PLUGIN_OP = "ModulatedConv2d"
PLUGIN_VERSION = "1"
ACT_CODES = {"linear": 0, "lrelu": 1}


class _ModulatedConv2dOp(torch.autograd.Function):
    """Runs the reference op in PyTorch; exports as one stylecast::ModulatedConv2d node.

    Attributes travel as Python primitives (filt: the flattened filter taps, () when unused) so the tracer
    records them as constants.
    """

    @staticmethod
    def forward(ctx, x, weight, styles, noise, bias, skip, demodulate, up, act, gain, clamp, filt):  # type: ignore[override]
        f = None
        if filt:
            n = int(round(math.sqrt(len(filt))))
            f = torch.tensor(filt, dtype=torch.float32, device=x.device).reshape(n, n)
        return ref_modulated_conv2d(
            x, weight, styles, demodulate=bool(demodulate), up=up, resample_filter=f, noise=noise, bias=bias,
            act="lrelu" if act == 1 else "linear", gain=gain, clamp=None if clamp < 0 else clamp, skip=skip,
            impl="ref")

    @staticmethod
    def symbolic(g, x, weight, styles, noise, bias, skip, demodulate, up, act, gain, clamp, filt):  # type: ignore[override]
        present = [t for t in (noise, bias, skip) if t is not None]
        kwargs = dict(
            demodulate_i=int(demodulate), up_i=int(up), act_i=int(act), alpha_f=0.2, gain_f=float(gain),
            clamp_f=float(clamp), has_noise_i=int(noise is not None), has_bias_i=int(bias is not None),
            has_skip_i=int(skip is not None), filter_size_i=int(round(math.sqrt(len(filt)))) if filt else 0,
            # Older TensorRT ONNX parsers find plugins by these attributes rather than by the domain.
            plugin_namespace_s=PLUGIN_DOMAIN, plugin_version_s=PLUGIN_VERSION,
        )
        if filt:
            kwargs["resample_filter_f"] = [float(v) for v in filt]
        return g.op(f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", x, weight, styles, *present, **kwargs)


def plugin_modulated_conv2d(x, weight, styles, *, demodulate=True, up=1, resample_filter=None, noise=None,
                            bias=None, act="linear", gain=None, clamp=None, skip=None, impl="auto"):
    """Drop-in for training.ops.modulated_conv2d that records a plugin node when traced."""
    if act not in ACT_CODES:
        raise ValueError(f"the ModulatedConv2d plugin supports activations {sorted(ACT_CODES)}, not {act!r}")
    if noise is not None and noise.ndim == 2:
        noise = noise.reshape(1, 1, *noise.shape)  # stored [H, W] noise -> [1, 1, H, W] as the plugin expects
    gain_v = (math.sqrt(2.0) if act == "lrelu" else 1.0) if gain is None else float(gain)
    filt: tuple[float, ...] = ()
    if resample_filter is not None and (up == 2 or skip is not None):
        filt = tuple(float(v) for v in resample_filter.detach().flatten().cpu().tolist())
    return _ModulatedConv2dOp.apply(x, weight, styles, noise, bias, skip, int(demodulate), int(up), ACT_CODES[act],
                                    gain_v, -1.0 if clamp is None else float(clamp), filt)


@contextlib.contextmanager
def plugin_layers() -> Iterator[None]:
    """Within the block, synthesis layers use plugin_modulated_conv2d."""
    original = sg2.modulated_conv2d
    sg2.modulated_conv2d = plugin_modulated_conv2d
    try:
        yield
    finally:
        sg2.modulated_conv2d = original


def export_synthesis_plugin(G: Generator, path: str | Path, outputs: tuple[str, ...] = ("img", "img_u8"),
                            fp16: bool = False, opset: int = DEFAULT_OPSET) -> GraphInfo:
    """Write a synthesis graph with one stylecast::ModulatedConv2d node per layer (dynamic batch)."""
    import onnx

    path = Path(path)
    G = half_generator(G) if fp16 else G.eval().cpu()
    module = SynthesisGraph(G, outputs=outputs, half=fp16)
    ws = torch.randn(2, G.num_ws, G.w_dim)
    dynamic = {"ws": {0: "N"}, **{o: {0: "N"} for o in outputs}}
    buf = io.BytesIO()
    with plugin_layers(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ws,), buf, input_names=["ws"], output_names=list(outputs), dynamic_axes=dynamic,
                          opset_version=opset, do_constant_folding=True, dynamo=False,
                          custom_opsets={PLUGIN_DOMAIN: 1})
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = "stylecast"
    onnx.checker.check_model(model)  # custom-domain nodes are not schema-checked, the rest is
    path.write_bytes(model.SerializeToString(deterministic=True))
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)
