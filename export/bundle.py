"""Serving bundles of kind "stylegan2" (StyleGAN2: Karras et al., "Analyzing and Improving the Image Quality of
StyleGAN", CVPR 2020): mapping and synthesis graphs (fp32, optionally fp16), optional TensorRT engines of the
synthesis, an optional photo encoder, and golden PyTorch outputs, written by the one bundle writer
(export.writer) as an immutable directory.

    manifest.json        kind "stylegan2"; model dims, default_psi, w_avg (the truncation centre), latent_space
    mapping.onnx         z [N, z_dim], psi [N] -> w [N, w_dim], ws [N, num_ws, w_dim] (truncated towards w_avg)
    synthesis.onnx       ws [N, num_ws, w_dim] -> img [N, 3, R, R] in [-1, 1], img_u8 [N, R, R, 3]
    synthesis_fp16.onnx  optional: the same in fp16 (demodulation in fp32, activations clamped)
    *.plan               optional TensorRT engines of the synthesis (export.engine)
    encoder.onnx         optional: aligned face -> W+ ws (export.encoder_export)
    golden.npz           seeds GOLDEN_SEEDS at psi GOLDEN_PSI: z, psi, w, ws, img, img_u8 (+ the encoder's)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.checkpoints import Checkpoint, load_checkpoint
from training.networks.stylegan2 import seeds_to_z

from .encoder_export import resolve_bundle_encoder, write_bundle_encoder
from .onnx_export import DEFAULT_OPSET, export_mapping, export_synthesis, reference_outputs
from .writer import BundleWriter, check_name, check_psi

KIND = "stylegan2"
GOLDEN_SEEDS = (0, 1)
GOLDEN_PSI = (1.0, 0.7)


@dataclass
class BundleOptions:
    """Options of build_bundle.

    Attributes:
        name: the served model name (default: from the checkpoint's file name).
        default_psi: truncation towards w_avg when a request gives none.
        fp16: also write synthesis_fp16.onnx.
        engines: TensorRT engine precisions to build ("fp32", "fp16") with the batch profile min/opt/max_batch.
        encoder: a pSp / e4e checkpoint (official .pt or native dir) to ship as encoder.onnx.
        latent_space: the id of the W+ space the synthesis accepts (default: the bundle name with an encoder).
        encoder_from: a bundle with an encoder whose latent space this (adapted) model shares.
        encoder_space: "w+" | "z+" for an official encoder checkpoint that does not record it.
        description: shown by ListModels.
    """

    name: str | None = None
    default_psi: float = 0.7
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    simplify: bool = False
    engines: list[str] = field(default_factory=list)
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16
    encoder: str | Path | None = None
    latent_space: str | None = None
    encoder_from: str | Path | None = None
    encoder_space: str | None = None
    description: str = ""


def default_name(path: str | Path) -> str:
    stem = Path(path).name
    for suffix in (".pt", ".pth", ".pkl"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return name[:64]


def build_bundle(checkpoint: str | Path | Checkpoint, out: str | Path, options: BundleOptions | None = None,
                 progress: bool = False) -> Path:
    """Export a generator checkpoint to a stylegan2 bundle directory `out` (must not exist); atomic: all or nothing.

    Args:
        checkpoint: a native directory, rosinality .pt or NVlabs .pkl (training.checkpoints), or a loaded one.
        out: the bundle directory to create.
        options: see BundleOptions.
        progress: show a progress bar.
    Returns:
        the bundle path.
    Raises:
        ValueError / FileNotFoundError / FileExistsError (nothing is written then), EngineError.
    """
    opts = options or BundleOptions()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    name = check_name(opts.name or default_name(ckpt.path))
    default_psi = check_psi(opts.default_psi)
    G = ckpt.G.eval().cpu()
    photo = resolve_bundle_encoder(name, G, encoder=opts.encoder, encoder_from=opts.encoder_from,
                                   latent_space=opts.latent_space, encoder_space=opts.encoder_space)
    steps = (["mapping", "synthesis"] + (["synthesis_fp16"] if opts.fp16 else [])
             + (["encoder"] if photo.checkpoint else []) + ["golden"] + list(opts.engines))
    with BundleWriter(out, KIND, name, opts.opset, steps, progress) as w:
        w.graph("mapping", export_mapping(G, w.dir / "mapping.onnx", opset=opts.opset))
        w.graph("synthesis", export_synthesis(G, w.dir / "synthesis.onnx", opset=opts.opset,
                                              do_simplify=opts.simplify))
        if opts.fp16:
            w.graph("synthesis_fp16", export_synthesis(G, w.dir / "synthesis_fp16.onnx", fp16=True,
                                                       opset=opts.opset, do_simplify=opts.simplify), "fp16")
        extra_golden: dict[str, np.ndarray] = {}
        encoder_doc = None
        if photo.checkpoint is not None:
            w.graphs["encoder"], extra_golden, encoder_doc = write_bundle_encoder(photo, G, w.dir, opts.opset)
            w.step()
        z = seeds_to_z(list(GOLDEN_SEEDS), G.z_dim)
        psi = torch.tensor(GOLDEN_PSI, dtype=torch.float32)
        ref = reference_outputs(G, z, psi)
        w.golden({"seeds": np.array(GOLDEN_SEEDS, dtype=np.int64), "z": z.numpy(), "psi": psi.numpy(),
                  **{k: v.numpy() for k, v in ref.items()}, **extra_golden},
                 seeds=list(GOLDEN_SEEDS), psi=list(GOLDEN_PSI))
        for precision in opts.engines:
            from .engine import build_engine
            w.engines.append(build_engine(w.dir / "synthesis.onnx", w.dir, precision=precision,
                                          min_batch=opts.min_batch, opt_batch=opts.opt_batch,
                                          max_batch=opts.max_batch))
            w.step()
        w.publish(
            model={"resolution": G.resolution, "z_dim": G.z_dim, "w_dim": G.w_dim, "num_ws": G.num_ws,
                   "img_channels": G.cfg.img_channels, "default_psi": default_psi,
                   "w_avg": [float(x) for x in G.w_avg.detach().cpu().numpy().tolist()],
                   "config": G.cfg.to_dict(), **photo.model_fields()},
            source={"file": Path(ckpt.path).name, "format": ckpt.format, "sha256": ckpt.sha256},
            encoder=encoder_doc, description=opts.description or None)
    return Path(out)
