"""Export pSp / e4e encoders (Richardson et al., CVPR 2021; Tov et al., SIGGRAPH 2021) to ONNX: an FFHQ-aligned
face img [N, 3, S, S] in [-1, 1] -> ws [N, num_ws, w_dim], dynamic batch, latent_avg folded in.

encoder.onnx always outputs W+ ws. A z+ encoder (DualStyleGAN, Yang et al., CVPR 2022) predicts one z per layer;
its graph folds in the bundle generator's mapping network, applied to every row separately without truncation
(training.inversion.encoders.z_plus_to_ws), so serving never needs to know which space the encoder was trained in.

The bundle's golden encoder inputs are faces the bundle's own generator draws (seeds GOLDEN_SEEDS), resized to the
encoder's input size and quantised to uint8 exactly as the server feeds aligned photos, so serving can check the
graph against PyTorch without any photo or face model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from training.inversion.encoders import GradualStyleEncoder, check_encoder_fits, codes_to_ws
from training.networks.stylegan2 import Generator, seeds_to_z

from .onnx_export import DEFAULT_OPSET, GraphInfo, _export, _io_info, img_to_uint8

GOLDEN_SEEDS = (0, 1, 2)


class EncoderGraph(nn.Module):
    """The traced module: img [N, 3, S, S] -> ws [N, num_ws, w_dim] (the encoder's forward without its Python-side
    input checks, followed by the mapping network for a z+ encoder)."""

    def __init__(self, encoder: GradualStyleEncoder, generator: Generator | None = None):
        super().__init__()
        self.encoder = encoder
        self.latent_space = encoder.cfg.latent_space
        if self.latent_space == "z+":
            if generator is None:
                raise ValueError("a z+ encoder needs the bundle's generator: its mapping network turns the z+ "
                                 "codes into the W+ ws that encoder.onnx outputs")
            check_encoder_fits(encoder.cfg, generator)
        self.mapping = generator.mapping if self.latent_space == "z+" else None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return codes_to_ws(self.encoder(img), self.latent_space, self.mapping)


def export_encoder(encoder: GradualStyleEncoder, path: str | Path, opset: int = DEFAULT_OPSET,
                   generator: Generator | None = None) -> GraphInfo:
    """Write encoder.onnx: img [N, 3, S, S] float32 in [-1, 1] (S = encoder.cfg.input_size) -> ws float32
    [N, num_ws, w_dim] (W+).

    Args:
        encoder: a pSp / e4e encoder (w+ or z+).
        path: the .onnx file to write.
        opset: ONNX opset.
        generator: the generator the ws are for; required for a z+ encoder (its mapping is folded into the graph).
    Returns:
        GraphInfo of the written graph.
    Raises:
        ValueError: a z+ encoder without a generator, or an encoder that does not fit the generator.
    """
    path = Path(path)
    encoder = encoder.eval().cpu()
    # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, recursively, and a wrapper left
    # in train mode would switch the caller's encoder (BatchNorm) and generator to train mode.
    graph = EncoderGraph(encoder, generator.eval().cpu() if generator is not None else None).eval()
    s = encoder.cfg.input_size
    img = torch.rand(2, 3, s, s) * 2 - 1
    _export(graph, (img,), path, ["img"], ["ws"], {"img": {0: "N"}, "ws": {0: "N"}}, opset)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)


def u8_to_img(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (x / 127.5 - 1), the server's conversion of aligned crops."""
    return img_u8.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


def encoder_golden(encoder: GradualStyleEncoder, G: Generator) -> dict[str, np.ndarray]:
    """Golden encoder check: `enc_img_u8` [K, S, S, 3] (G's faces at the encoder's size) and `enc_ws` [K, num_ws,
    w_dim] float32 (PyTorch; W+ ws, through G's mapping for a z+ encoder)."""
    encoder = encoder.eval().cpu()
    G = G.eval().cpu()
    with torch.no_grad():
        img = G(seeds_to_z(list(GOLDEN_SEEDS), G.z_dim), psi=0.7, impl="ref")
        faces_u8 = img_to_uint8(encoder.preprocess(img.clamp(-1, 1)))
        ws = codes_to_ws(encoder(u8_to_img(faces_u8)), encoder.cfg.latent_space, G.mapping)
    return {"enc_img_u8": faces_u8.numpy(), "enc_ws": ws.numpy().astype(np.float32)}
