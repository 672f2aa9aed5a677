"""Export DualStyleGAN (Yang et al., CVPR 2022) synthesis to ONNX: intrinsic ws + extrinsic exstyle_w + per-layer
weights -> image, with a dynamic batch axis and no data-dependent branches.

The per-layer weights are a graph input ([N, num_ws]), so structure/colour strength, colour-only transfer
(structure weights 0) and the intrinsic-only image (all 0) need no re-export. Mapping (z+ -> W+) and the
truncation towards 0 stay outside, as for StyleGAN2 bundles (`export.onnx_export.export_mapping` maps z).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from export.onnx_export import DEFAULT_OPSET, GraphInfo, _export, _io_info, img_to_uint8
from training.dualstyle.model import DualStyleGAN

OUTPUTS = ("img", "img_u8")


class DualStyleSynthesisGraph(nn.Module):
    """ws [N, num_ws, w_dim], exstyle_w [N, num_ws, w_dim], weights [N, num_ws] -> img and/or img_u8.

    Constant noise comes from the generator's stored buffers (noise_mode "const"); `use_res` and
    `fuse_index` are fixed at export time.
    """

    def __init__(self, model: DualStyleGAN, outputs: tuple[str, ...] = OUTPUTS, fuse_index: int | None = None,
                 impl: str = "ref"):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.fuse_index = fuse_index
        self.impl = impl

    def forward(self, ws: torch.Tensor, exstyle_w: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        img = self.model(ws, exstyle_w, weights, fuse_index=self.fuse_index, noise_mode="const", impl=self.impl)
        return tuple(img if name == "img" else img_to_uint8(img) for name in self.outputs)


def export_dualstyle_synthesis(model: DualStyleGAN, path: str | Path, opset: int = DEFAULT_OPSET,
                               outputs: tuple[str, ...] = OUTPUTS, fuse_index: int | None = None) -> GraphInfo:
    """Write a DualStyleGAN synthesis graph.

    Inputs: `ws` float32 [N, num_ws, w_dim] (intrinsic, already mapped and truncated), `exstyle_w` float32
    [N, num_ws, w_dim] (the extrinsic code in W), `weights` float32 [N, num_ws] (per-sample layer weights).
    Outputs: `img` float32 [N, 3, R, R] in [-1, 1] and/or `img_u8` uint8 [N, R, R, 3].

    Args:
        model: the DualStyleGAN (put in eval mode on CPU, as export_synthesis does with a Generator).
        path: the .onnx file to write.
        opset: ONNX opset.
        outputs: any of "img", "img_u8".
        fuse_index: layers > fuse_index skip the extrinsic path (None = all use it), fixed in the graph.
    Returns:
        GraphInfo (inputs/outputs with dtypes and shapes, node count, size).
    """
    path = Path(path)
    if not outputs or any(o not in OUTPUTS for o in outputs) or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must be distinct names from {OUTPUTS}, got {outputs}")
    model = model.eval().cpu()
    n, num_ws, w_dim = 2, model.num_ws, model.w_dim
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(n, num_ws, w_dim, generator=g), torch.randn(n, num_ws, w_dim, generator=g),
            torch.rand(n, num_ws, generator=g))
    dynamic = {name: {0: "N"} for name in ("ws", "exstyle_w", "weights", *outputs)}
    _export(DualStyleSynthesisGraph(model, outputs, fuse_index), args, path, ["ws", "exstyle_w", "weights"],
            list(outputs), dynamic, opset)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)
