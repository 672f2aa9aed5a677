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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------------------------------------------------
# The photo encoder of a bundle (shared by stylegan2 and dualstylegan bundles)


@dataclass
class BundleEncoder:
    """What a bundle being built declares about photos: the encoder it ships (a loaded checkpoint, or None), the id
    of the W+ space its synthesis accepts (None: none declared), and the bundle whose encoder it shares instead."""

    checkpoint: Any | None = None   # training.inversion.encoders.EncoderCheckpoint
    latent_space: str | None = None
    shared_from: str | None = None  # the name of the --encoder-from bundle

    def model_fields(self) -> dict[str, str]:
        """What the manifest's `model` records of photos: latent_space and encoder_from (the shared encoder)."""
        out = {}
        if self.latent_space is not None:
            out["latent_space"] = self.latent_space
        if self.shared_from is not None:
            out["encoder_from"] = self.shared_from
        return out


def resolve_bundle_encoder(name: str, G: Generator, *, encoder: str | Path | None = None,
                           encoder_from: str | Path | None = None, latent_space: str | None = None,
                           encoder_space: str | None = None) -> BundleEncoder:
    """Load and check a bundle's photo encoder options before anything is written.

    Args:
        name: the bundle's name (the default latent space id of a bundle shipping its own encoder).
        G: the bundle's generator (the encoder must output its [num_ws, w_dim] ws; z+ codes go through its mapping).
        encoder: a pSp / e4e checkpoint (official .pt or native dir) to ship as encoder.onnx.
        encoder_from: a bundle with an encoder whose latent space this (adapted) model shares.
        latent_space: the space id to declare (default: `name` with an encoder, the base bundle's with encoder_from).
        encoder_space: "w+" | "z+" for an official checkpoint that does not record its space.
    Raises:
        ValueError / FileNotFoundError: one line naming the conflict.
    """
    from protos.manifest import NAME_RE, load_manifest
    if encoder is not None and encoder_from is not None:
        raise ValueError("give either an encoder or encoder_from (a bundle whose encoder this model shares), not both")
    if encoder_space is not None and encoder is None:
        raise ValueError("an encoder latent space (w+ / z+) only applies together with an encoder")
    if latent_space is not None and not NAME_RE.match(latent_space):
        raise ValueError(f"latent space {latent_space!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    if encoder is not None:
        from training.inversion.encoders import load_encoder
        enc = load_encoder(encoder, with_decoder=False, latent_space=encoder_space)
        check_encoder_fits(enc.config, G, f"encoder {encoder}")
        return BundleEncoder(enc, latent_space or name)
    if encoder_from is not None:
        base = load_manifest(encoder_from)
        if "encoder" not in base.get("graphs", {}):
            raise ValueError(f"bundle {encoder_from} has no encoder to share")
        bm = base["model"]
        if (bm["num_ws"], bm["w_dim"]) != (G.num_ws, G.w_dim):
            raise ValueError(f"bundle {encoder_from} encodes [N, {bm['num_ws']}, {bm['w_dim']}] latents but this "
                             f"generator takes [N, {G.num_ws}, {G.w_dim}]")
        if latent_space is not None and latent_space != bm["latent_space"]:
            raise ValueError(f"latent space {latent_space!r} differs from {bm['latent_space']!r} of {encoder_from}")
        return BundleEncoder(None, bm["latent_space"], base["name"])
    return BundleEncoder(None, latent_space)


def write_bundle_encoder(be: BundleEncoder, G: Generator, directory: Path,
                         opset: int = DEFAULT_OPSET) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Export be.checkpoint's encoder.onnx into a bundle directory.

    Returns:
        (the graphs["encoder"] entry, the golden.npz arrays of the encoder check, the manifest's "encoder" object).
    """
    enc = be.checkpoint
    info = export_encoder(enc.encoder, Path(directory) / "encoder.onnx", opset=opset, generator=G)
    graph = {"file": "encoder.onnx", "inputs": info.inputs, "outputs": info.outputs, "nodes": info.nodes,
             "precision": "fp32"}
    ecfg = enc.config
    doc = {"kind": ecfg.kind, "input_size": ecfg.input_size, "align": "ffhq", "latent_space": be.latent_space,
           "golden": {"img_u8": "enc_img_u8", "ws": "enc_ws"},
           "source": {"file": Path(enc.path).name, "format": enc.format, "sha256": enc.sha256,
                      "codes": ecfg.latent_space}}
    return graph, encoder_golden(enc.encoder, G), doc
