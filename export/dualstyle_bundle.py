"""Serving bundles of kind "dualstylegan" (DualStyleGAN: Yang et al., "Pastiche Master: Exemplar-Based
High-Resolution Portrait Style Transfer", CVPR 2022): the model, its style library and an optional photo encoder,
exported, checked against PyTorch and published as one immutable directory.

    manifest.json   kind "dualstylegan"; model dims, res_index, default_psi (truncation towards 0), default_weights,
                    latent_space; the style table (styles.names in id order); files with sha256
    mapping.onnx    z [N, z_dim], psi [N] -> w [N, w_dim], ws = psi * w [N, num_ws, w_dim] (towards 0, not w_avg)
    synthesis.onnx  ws, exstyle_w [N, num_ws, w_dim], weights [N, num_ws] -> img, img_u8 (export.dualstyle_export)
    styles.npz      exstyle_w [S, num_ws, w_dim] (the codes through the mapping network, untruncated, as the
                    official style_transfer.py feeds them), z_plus [S, num_ws, z_dim] (the codes as given), names [S]
    encoder.onnx    optional: aligned face -> W+ ws of the base generator (export.encoder_export)
    golden.npz      PyTorch outputs for (seed, psi, style, weights) rows, including colour-only and all-zero weights

Style ids are positions in the exstyle code file (the official `list(exstyles.keys())[style_id]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from common.files import sha256_file
from protos.manifest import DUALSTYLE_TRUNCATION
from training.checkpoints import checkpoint_sha256
from training.dualstyle import (DualStyleGAN, colour_only_weights, load_dualstylegan, load_exstyle_codes)
from training.networks.stylegan2 import seeds_to_z

from .dualstyle_export import export_dualstyle_synthesis
from .encoder_export import resolve_bundle_encoder, write_bundle_encoder
from .onnx_export import DEFAULT_OPSET, GraphInfo, _export, _io_info, img_to_uint8
from .writer import BundleWriter, check_name, check_psi

KIND = "dualstylegan"
STYLES_NAME = "styles.npz"
# Golden rows: (seed, psi, style index (taken modulo the library size; -1 = the last style), weights kind).
GOLDEN_ROWS = ((0, 1.0, 0, "default"), (1, 0.75, 1, "colour_only"), (2, 0.5, 2, "zeros"), (3, 1.0, -1, "ones"))
DEFAULT_PSI = 0.75  # official style_transfer.py --truncation


@dataclass
class DualStyleBundleOptions:
    """Options of build_dualstyle_bundle.

    Attributes:
        name: the served model name.
        default_psi: truncation of intrinsic codes towards 0 when a request gives none (official 0.75).
        default_weights: num_ws per-layer extrinsic weights when a request gives none (None = the model's
            default_weights(): [0.75] * (res_index + 1) + [1] * rest).
        opset: ONNX opset.
        encoder: a pSp / e4e checkpoint (official .pt or native dir; W+ or z+) to ship as encoder.onnx.
        encoder_space: "w+" | "z+" for an official encoder checkpoint that does not record its space (the official
            DualStyleGAN encoder.pt is z+); None = what the checkpoint says (default w+).
        encoder_from: a bundle with an encoder whose latent space this model's base generator shares.
        latent_space: id of the W+ space of the intrinsic path (default with an encoder: the bundle name).
        description: shown by ListModels.
    """

    name: str | None = None
    default_psi: float = DEFAULT_PSI
    default_weights: Sequence[float] | None = None
    opset: int = DEFAULT_OPSET
    encoder: str | Path | None = None
    encoder_space: str | None = None
    encoder_from: str | Path | None = None
    latent_space: str | None = None
    description: str = ""


# ----------------------------------------------------------------------------------------------------------
# Graphs


class DualStyleMappingGraph(nn.Module):
    """z [N, z_dim], psi [N] -> w [N, w_dim] (untruncated), ws [N, num_ws, w_dim] = psi * w (DualStyleGAN's truncation
    towards 0; the stylegan2 mapping graph truncates towards w_avg instead)."""

    def __init__(self, model: DualStyleGAN):
        super().__init__()
        self.mapping = model.generator.mapping
        self.num_ws = model.num_ws

    def forward(self, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.mapping(z)  # [N, w_dim]
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1) * psi.reshape(-1, 1, 1)
        return w, ws


def export_dualstyle_mapping(model: DualStyleGAN, path: str | Path, opset: int = DEFAULT_OPSET) -> GraphInfo:
    """Write mapping.onnx: z float32 [N, z_dim], psi float32 [N] -> w float32 [N, w_dim], ws float32
    [N, num_ws, w_dim] (ws = psi * w)."""
    path = Path(path)
    model = model.eval().cpu()
    args = (torch.randn(2, model.z_dim, generator=torch.Generator().manual_seed(0)), torch.ones(2))
    _export(DualStyleMappingGraph(model).eval(), args, path, ["z", "psi"], ["w", "ws"],
            {"z": {0: "N"}, "psi": {0: "N"}, "w": {0: "N"}, "ws": {0: "N"}}, opset)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)


# ----------------------------------------------------------------------------------------------------------
# Style library and golden outputs


def style_library(model: DualStyleGAN, codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of styles.npz from {name: z+ [1, num_ws, z_dim]} (in id order).

    Returns:
        exstyle_w float32 [S, num_ws, w_dim] (map_extrinsic: the base mapping layer by layer, untruncated),
        z_plus float32 [S, num_ws, z_dim], names unicode [S].
    """
    names = list(codes)
    z_plus = np.concatenate([np.asarray(codes[n], np.float32).reshape(1, model.num_ws, model.z_dim) for n in names])
    with torch.no_grad():
        exstyle_w = model.eval().cpu().map_extrinsic(torch.from_numpy(z_plus)).numpy().astype(np.float32)
    return {"exstyle_w": exstyle_w, "z_plus": z_plus, "names": np.array(names, dtype=str)}


def golden_rows(model: DualStyleGAN, exstyle_w: np.ndarray, default_weights: Sequence[float]) -> dict[str, np.ndarray]:
    """PyTorch reference of the bundle (GOLDEN_ROWS): the mapping (z, psi -> w, ws = psi * w), the library styles
    used (style_ids, exstyle_w) and the synthesis with per-row weights (default, colour-only, all 0, all 1).

    Returns:
        seeds int64 [K], z [K, z_dim], psi [K], w [K, w_dim], ws [K, num_ws, w_dim], style_ids int64 [K],
        exstyle_w [K, num_ws, w_dim], weights [K, num_ws], img [K, 3, R, R] float32, img_u8 [K, R, R, 3] uint8.
    """
    model = model.eval().cpu()
    s = exstyle_w.shape[0]
    seeds = [r[0] for r in GOLDEN_ROWS]
    psi = torch.tensor([r[1] for r in GOLDEN_ROWS], dtype=torch.float32)
    style_ids = np.array([r[2] % s for r in GOLDEN_ROWS], dtype=np.int64)
    rows = {"default": list(default_weights), "colour_only": colour_only_weights(model.cfg, default_weights),
            "zeros": [0.0] * model.num_ws, "ones": [1.0] * model.num_ws}
    weights = torch.tensor([rows[r[3]] for r in GOLDEN_ROWS], dtype=torch.float32)
    z = seeds_to_z(seeds, model.z_dim)
    ex = torch.from_numpy(exstyle_w[style_ids])
    with torch.no_grad():
        w = model.generator.mapping(z)
        ws = model.map_intrinsic(z, psi)
        img = model(ws, ex, weights, noise_mode="const", impl="ref")
    return {"seeds": np.array(seeds, np.int64), "z": z.numpy(), "psi": psi.numpy(), "w": w.numpy(), "ws": ws.numpy(),
            "style_ids": style_ids, "exstyle_w": ex.numpy(), "weights": weights.numpy(), "img": img.numpy(),
            "img_u8": img_to_uint8(img).numpy()}


def check_weights(weights: Sequence[float], num_ws: int, what: str = "weights") -> list[float]:
    """num_ws finite floats, else ValueError."""
    try:
        out = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers") from None
    if len(out) != num_ws:
        raise ValueError(f"{what}: {len(out)} values given; the model has {num_ws} layers")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite")
    return out


# ----------------------------------------------------------------------------------------------------------
# Building


def build_dualstyle_bundle(checkpoint: str | Path, styles: str | Path, out: str | Path,
                           options: DualStyleBundleOptions | None = None, progress: bool = False) -> Path:
    """Export a DualStyleGAN checkpoint and its exstyle codes to a bundle directory `out` (must not exist); atomic.

    Args:
        checkpoint: official generator.pt or a native DualStyleGAN directory (training.dualstyle).
        styles: the exstyle codes: official `*exstyle_code.npy` (read without executing its pickle) or native
            `.safetensors`; {name: z+ [1, num_ws, z_dim]}, the order giving the style ids.
        out: the bundle directory to create.
        options: see DualStyleBundleOptions.
        progress: show a progress bar.
    Returns:
        the bundle path.
    Raises:
        ValueError / FileNotFoundError / FileExistsError (nothing is written then).
    """
    opts = options or DualStyleBundleOptions()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists (bundles are never overwritten)")
    name = check_name(opts.name or "dualstylegan")
    default_psi = check_psi(opts.default_psi)
    model = load_dualstylegan(checkpoint).eval().requires_grad_(False)
    weights = check_weights(model.default_weights() if opts.default_weights is None else opts.default_weights,
                            model.num_ws, "default weights")
    codes = load_exstyle_codes(styles, num_ws=model.num_ws, w_dim=model.z_dim)
    photo = resolve_bundle_encoder(name, model.generator, encoder=opts.encoder, encoder_from=opts.encoder_from,
                                   latent_space=opts.latent_space, encoder_space=opts.encoder_space)
    steps = ["mapping", "synthesis", "styles"] + (["encoder"] if photo.checkpoint is not None else []) + ["golden"]
    G = model.generator
    ckpt, styles = Path(checkpoint), Path(styles)
    with BundleWriter(out, KIND, name, opts.opset, steps, progress) as w:
        w.graph("mapping", export_dualstyle_mapping(model, w.dir / "mapping.onnx", opts.opset))
        w.graph("synthesis", export_dualstyle_synthesis(model, w.dir / "synthesis.onnx", opts.opset))
        lib = style_library(model, codes)
        np.savez(w.dir / STYLES_NAME, **lib)
        w.step()
        extra_golden: dict[str, np.ndarray] = {}
        encoder_doc = None
        if photo.checkpoint is not None:
            w.graphs["encoder"], extra_golden, encoder_doc = write_bundle_encoder(photo, G, w.dir, opts.opset)
            w.step()
        w.golden({**golden_rows(model, lib["exstyle_w"], weights), **extra_golden},
                 seeds=[r[0] for r in GOLDEN_ROWS], psi=[r[1] for r in GOLDEN_ROWS], weights=[r[3] for r in GOLDEN_ROWS])
        names = [str(n) for n in lib["names"]]
        w.publish(
            model={"resolution": G.resolution, "z_dim": G.z_dim, "w_dim": G.w_dim, "num_ws": G.num_ws,
                   "img_channels": G.cfg.img_channels, "res_index": model.res_index, "default_psi": default_psi,
                   "truncation": DUALSTYLE_TRUNCATION, "default_weights": weights, "config": model.cfg.to_dict(),
                   **photo.model_fields()},
            source={"file": ckpt.name, "format": "native" if ckpt.is_dir() else "official",
                    "sha256": checkpoint_sha256(ckpt)},
            styles={"file": STYLES_NAME, "count": len(names), "names": names,
                    "source": {"file": styles.name,
                               "format": "official" if styles.read_bytes()[:6] == b"\x93NUMPY" else "native",
                               "sha256": sha256_file(styles)}},
            encoder=encoder_doc, description=opts.description or None)
    return out
