"""pSp and e4e image -> W+ (or z+) encoders on the IR-SE50 backbone (Richardson et al., "Encoding in Style: a StyleGAN
Encoder for Image-to-Image Translation", CVPR 2021; Tov et al., "Designing an Encoder for StyleGAN Image
Manipulation", SIGGRAPH 2021; the z+ variant of Yang et al., "Pastiche Master: Exemplar-Based High-Resolution
Portrait Style Transfer" (DualStyleGAN), CVPR 2022), loading the official checkpoints and stylecast's native format.

Both encoders share the IR-SE body, a feature pyramid (c3 -> p2 = up(c3) + latlayer1(c2) -> p1 = up(p2) +
latlayer2(c1)) and one GradualStyleBlock per latent: coarse latents (i < 3) read the 16 px map c3, middle ones
(i < 7) the 32 px p2, fine ones the 64 px p1 (for 256 px inputs). pSp predicts every latent independently; e4e
predicts w0 and adds per-latent offsets to it. Both add the checkpoint's mean latent when it was trained with
start_from_latent_avg.

Latent spaces: a "w+" encoder predicts ws directly. A "z+" encoder (DualStyleGAN's ``encoder.pt``) predicts one
z-space code per layer; each row goes through the generator's mapping network separately, without truncation, to
give ws (``z_plus_to_ws``). The forward pass always returns codes in the encoder's own space; ``codes_to_ws`` turns
either into ws.

Formats:
    official  ``torch.load``-able dict ``{"state_dict": {"encoder.*", "decoder.*"}, "opts": {...},
              "latent_avg": [512] | [n_styles, 512]}`` (decoder.* are rosinality g_ema keys), read with
              ``weights_only=True``. The official code passes the z+ switch at call time and does not record it,
              so a z+ checkpoint is recognised from ``opts["z_plus_latent"]`` or ``opts["latent_space"]`` (which
              ``save_official`` writes) or must be named by the caller (``load_encoder(latent_space="z+")``);
    native    a directory with ``config.json`` (``{"format": "stylecast.encoder/v1", "config": EncoderConfig,
              "meta": {...}}``) and ``encoder.safetensors`` (every parameter and buffer, latent_avg included).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.files import atomic_directory, atomic_write_bytes
from training.checkpoints import (CheckpointError, _torch_load_safe, checkpoint_sha256, generator_from_rosinality,
                                  generator_to_rosinality, read_native_config)
from training.inversion.irse import IRSEConfig, build_body, build_input_layer, infer_irse_config, key_list, load_exact
from training.networks.stylegan2 import EqualLinear, Generator

ENCODER_FORMAT = "stylecast.encoder/v1"
KINDS = ("psp", "e4e")
#: "w+": the encoder predicts ws; "z+": one z per layer, mapped to ws row by row (DualStyleGAN).
LATENT_SPACES = ("w+", "z+")
#: opts values that name the z+ space in a checkpoint (``opts["latent_space"]``).
_Z_PLUS_NAMES = ("z+", "zplus", "z_plus")
#: opts["encoder_type"] of the official code for each kind.
OFFICIAL_TYPES = {"psp": "GradualStyleEncoder", "e4e": "Encoder4Editing"}
LRELU_SLOPE = 0.01  # torch.nn.LeakyReLU()'s default, which the official GradualStyleBlock uses
N_STAGES = 4  # the pyramid taps the ends of stages 2, 3 and 4


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild a pSp / e4e encoder (saved as config.json next to the weights).

    Latent i reads pyramid level 0 (c3, input_size / 16 px) for i < coarse_ind, level 1 (p2, / 8) for
    i < middle_ind, else level 2 (p1, / 4); its GradualStyleBlock has log2(level size) stride-2 convolutions.
    """

    kind: str = "psp"  # "psp" (GradualStyleEncoder) | "e4e" (Encoder4Editing)
    backbone: IRSEConfig = field(default_factory=IRSEConfig)
    n_styles: int = 18  # = the generator's num_ws (18 at 1024 px)
    w_dim: int = 512
    input_size: int = 256  # aligned face side in px
    add_latent_avg: bool = True  # official opts.start_from_latent_avg
    latent_space: str = "w+"  # "w+" | "z+" (see LATENT_SPACES)
    coarse_ind: int = 3
    middle_ind: int = 7

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"encoder kind must be one of {KINDS}, got {self.kind!r}")
        if self.latent_space not in LATENT_SPACES:
            raise ValueError(f"encoder latent space must be one of {LATENT_SPACES}, got {self.latent_space!r}")
        if len(self.backbone.widths) != N_STAGES:
            raise ValueError(f"pSp / e4e need a {N_STAGES}-stage IR-SE body, got widths {self.backbone.widths}")
        if self.backbone.in_channels != 3:
            raise ValueError(f"only RGB encoders are supported (backbone in_channels 3, got "
                             f"{self.backbone.in_channels})")
        r = self.backbone.reduction_factor
        if self.input_size < 2 * r or self.input_size & (self.input_size - 1):
            raise ValueError(f"input_size must be a power of two >= {2 * r}, got {self.input_size}")
        if self.n_styles < 1 or self.w_dim < 1:
            raise ValueError("n_styles and w_dim must be positive")
        if not 1 <= self.coarse_ind <= self.middle_ind:
            raise ValueError(f"need 1 <= coarse_ind <= middle_ind, got {self.coarse_ind}, {self.middle_ind}")

    @classmethod
    def official(cls, kind: str = "psp", output_size: int = 1024, **kw: Any) -> "EncoderConfig":
        """The released pSp / e4e architecture (IR-SE50, 256 px input) for a generator of output_size px."""
        return cls(kind=kind, n_styles=2 * int(math.log2(output_size)) - 2, **kw)

    @classmethod
    def tiny(cls, kind: str = "psp", n_styles: int = 8, w_dim: int = 64, input_size: int = 64,
             **kw: Any) -> "EncoderConfig":
        """A few-thousand-parameter encoder with the real topology, for tests and smoke runs."""
        backbone = IRSEConfig(stem_channels=8, widths=(8, 16, 24, 32), units=(2, 2, 2, 1), se_reduction=4)
        return cls(kind=kind, backbone=backbone, n_styles=n_styles, w_dim=w_dim, input_size=input_size, **kw)

    def level(self, i: int) -> int:
        """Pyramid level (0 coarse, 1 middle, 2 fine) that latent i reads."""
        return 0 if i < self.coarse_ind else 1 if i < self.middle_ind else 2

    def level_size(self, level: int) -> int:
        """Side in px of pyramid level 0 / 1 / 2 (16 / 32 / 64 for a 256 px input)."""
        return self.input_size // self.backbone.reduction_factor * 2**level

    @property
    def output_size(self) -> int | None:
        """Resolution of the generator whose num_ws is n_styles (None when n_styles is not 2 log2(R) - 2)."""
        if self.n_styles % 2 or self.n_styles < 2:
            return None
        return 2 ** ((self.n_styles + 2) // 2)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "backbone" in d:
            d["backbone"] = IRSEConfig.from_dict(d["backbone"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """Antialiased bilinear resampling matrix (PIL's BILINEAR filter, torch's ``antialias=True`` bilinear).

    The triangle filter is stretched by the downscale factor (support = max(in / out, 1) px), sampled at
    pixel centres ``(o + 0.5) * in / out``, and every row is normalised to sum 1. For in == out it is the
    identity. Serving can rebuild the same matrix with numpy alone.

    Args:
        in_size: input length in px.
        out_size: output length in px.
    Returns:
        float64 [out_size, in_size]; ``out = weight @ x`` resizes along one axis.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = stretch
    weight = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates like PIL's C cast
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        row = np.clip(1.0 - np.abs((taps - center + 0.5) / stretch), 0.0, None)
        weight[o, lo:hi] = row / row.sum()
    return weight


def resize_faces(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize aligned faces to size x size with resize_weights (computed in float64, returned in img's dtype).

    Args:
        img: [N, C, H, W] float image in [-1, 1], any H and W.
        size: output side in px.
    Returns:
        [N, C, size, size] in img's dtype.
    """
    if img.ndim != 4 or not img.is_floating_point():
        raise ValueError(f"expected a float image batch [N, C, H, W], got {tuple(img.shape)} {img.dtype}")
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    wh = torch.from_numpy(resize_weights(h, size)).to(img.device)  # [size, H]
    ww = torch.from_numpy(resize_weights(w, size)).to(img.device)  # [size, W]
    return (wh @ img.double() @ ww.t()).to(img.dtype)  # [N, C, size, size]


# ----------------------------------------------------------------------------------------------------------
# Networks


class GradualStyleBlock(nn.Module):
    """Feature map [N, C, s, s] -> one latent [N, w_dim]: log2(s) x (3x3 stride-2 conv + LeakyReLU), EqualLinear."""

    def __init__(self, in_channels: int, out_channels: int, spatial: int):
        super().__init__()
        self.out_channels = out_channels
        n = int(math.log2(spatial))
        layers: list[nn.Module] = []
        for j in range(n):
            c_in = in_channels if j == 0 else out_channels
            layers += [nn.Conv2d(c_in, out_channels, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(LRELU_SLOPE)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_channels, out_channels, lr_mul=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, s, s] -> [N, w_dim]
        x = self.convs(x)  # [N, w_dim, 1, 1]
        return self.linear(x.flatten(1))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FPN merge: bilinear (align_corners=True) upsampling of x to y's size, plus y. [N, C, h, w] -> [N, C, H, W]."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class GradualStyleEncoder(nn.Module):
    """pSp's encoder: aligned face img [N, 3, S, S] in [-1, 1] -> ws [N, n_styles, w_dim].

    Parameter names are the official ones (``input_layer``, ``body``, ``styles``, ``latlayer1``, ``latlayer2``);
    the mean latent added when ``cfg.add_latent_avg`` is the buffer ``latent_avg`` [n_styles, w_dim].
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        bb = cfg.backbone
        self.input_layer = build_input_layer(bb)
        self.body = build_body(bb)
        c = bb.widths[3]
        self.styles = nn.ModuleList(GradualStyleBlock(c, cfg.w_dim, cfg.level_size(cfg.level(i)))
                                    for i in range(cfg.n_styles))
        self.latlayer1 = nn.Conv2d(bb.widths[2], c, kernel_size=1, stride=1, padding=0)
        self.latlayer2 = nn.Conv2d(bb.widths[1], c, kernel_size=1, stride=1, padding=0)
        self.register_buffer("latent_avg", torch.zeros(cfg.n_styles, cfg.w_dim))
        self._taps = bb.stage_ends[1:]  # unit indices of c1, c2, c3 (6, 20, 23 for IR-SE50)
        self._levels = 1 + max(cfg.level(i) for i in range(cfg.n_styles))

    def pyramid(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the levels the latents read: [c3, p2, p1][:levels], [N, C, S/16 * 2**l, ...]."""
        x = self.input_layer(img)  # [N, stem, S, S]
        taps: list[torch.Tensor] = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                taps.append(x)
        c1, c2, c3 = taps  # [N, C1, S/4, S/4], [N, C2, S/8, S/8], [N, C3, S/16, S/16]
        feats = [c3]
        if self._levels > 1:
            feats.append(upsample_add(c3, self.latlayer1(c2)))  # p2 [N, C3, S/8, S/8]
        if self._levels > 2:
            feats.append(upsample_add(feats[1], self.latlayer2(c1)))  # p1 [N, C3, S/4, S/4]
        return feats

    def codes(self, img: torch.Tensor) -> torch.Tensor:
        """The network's prediction before latent_avg is added: [N, 3, S, S] -> [N, n_styles, w_dim]."""
        feats = self.pyramid(img)
        return torch.stack([style(feats[self.cfg.level(i)]) for i, style in enumerate(self.styles)], dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Args: img [N, 3, S, S] float in [-1, 1], S = cfg.input_size (see preprocess).
        Returns: codes [N, n_styles, w_dim] float in cfg.latent_space: ws for a "w+" encoder, z+ codes for a
        "z+" one (codes_to_ws maps either to ws)."""
        if not torch.jit.is_tracing():
            self.check_input(img)
        ws = self.codes(img)
        if self.cfg.add_latent_avg:
            ws = ws + self.latent_avg.to(ws.dtype)
        return ws

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """Any-size aligned faces [N, 3, H, W] in [-1, 1] -> [N, 3, S, S] (antialiased, see resize_weights)."""
        return resize_faces(img, self.cfg.input_size)

    def check_input(self, img: torch.Tensor) -> None:
        """Raise ValueError unless img is a float [N, 3, S, S] batch at the encoder's input size."""
        s = self.cfg.input_size
        if img.ndim != 4 or img.shape[1] != 3 or tuple(img.shape[-2:]) != (s, s) or not img.is_floating_point():
            raise ValueError(f"encoder input must be a float [N, 3, {s}, {s}] image in [-1, 1], got "
                             f"{tuple(img.shape)} {img.dtype}; resize aligned faces with preprocess()")


class Encoder4Editing(GradualStyleEncoder):
    """e4e's encoder: w0 from the coarse map, every other latent = w0 + an offset from its pyramid level.

    ``progressive_stage`` (None = all latents, the inference setting) limits the offsets to latents
    1..stage, as e4e's progressive training does; later latents equal w0.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.progressive_stage: int | None = None

    def codes(self, img: torch.Tensor) -> torch.Tensor:
        feats = self.pyramid(img)
        w0 = self.styles[0](feats[0])  # [N, w_dim]
        last = self.cfg.n_styles - 1 if self.progressive_stage is None else min(self.progressive_stage,
                                                                                self.cfg.n_styles - 1)
        ws = [w0]
        for i in range(1, self.cfg.n_styles):
            ws.append(w0 + self.styles[i](feats[self.cfg.level(i)]) if i <= last else w0)
        return torch.stack(ws, dim=1)  # [N, n_styles, w_dim]


def build_encoder(cfg: EncoderConfig) -> GradualStyleEncoder:
    """A randomly initialised pSp or e4e encoder for cfg (train mode, as any new nn.Module)."""
    return (Encoder4Editing if cfg.kind == "e4e" else GradualStyleEncoder)(cfg)


def z_plus_to_ws(mapping: nn.Module, z_plus: torch.Tensor) -> torch.Tensor:
    """Map z+ codes to ws: every row separately through the mapping network, no truncation (DualStyleGAN).

    Args:
        mapping: a generator's mapping network ``G.mapping`` ([M, z_dim] -> [M, w_dim]; gradients flow through).
        z_plus: [N, num_ws, z_dim] float.
    Returns:
        ws [N, num_ws, w_dim] float32.
    """
    if z_plus.ndim != 3:
        raise ValueError(f"z+ codes must be [N, num_ws, z_dim], got {tuple(z_plus.shape)}")
    k, d = int(z_plus.shape[1]), int(z_plus.shape[2])
    # Rows are independent: flattening to [N * num_ws, z_dim] maps each one on its own (the mapping normalises
    # every z over its own z_dim, so no statistics are shared between rows). -1 keeps N dynamic in ONNX graphs.
    w = mapping(z_plus.reshape(-1, d))  # [N * num_ws, w_dim]
    return w.reshape(-1, k, int(w.shape[-1]))


def codes_to_ws(codes: torch.Tensor, latent_space: str, mapping: nn.Module | None = None) -> torch.Tensor:
    """An encoder's output in its latent space -> ws [N, num_ws, w_dim].

    Args:
        codes: [N, num_ws, D] from an encoder's forward.
        latent_space: the encoder's ``cfg.latent_space`` ("w+": returned as is; "z+": see z_plus_to_ws).
        mapping: the generator's mapping network (required for "z+").
    """
    if latent_space == "w+":
        return codes
    if latent_space == "z+":
        if mapping is None:
            raise ValueError("a z+ encoder's codes need the generator's mapping network to become ws")
        return z_plus_to_ws(mapping, codes)
    raise ValueError(f"unknown latent space {latent_space!r}; expected one of {LATENT_SPACES}")


def check_encoder_fits(cfg: EncoderConfig, G: Generator, what: str = "encoder") -> None:
    """Raise ValueError unless the encoder's codes fit G: n_styles == num_ws and w_dim == G.w_dim (w+) or
    G.z_dim (z+)."""
    dim, name = (G.w_dim, "w_dim") if cfg.latent_space == "w+" else (G.z_dim, "z_dim")
    if cfg.n_styles != G.num_ws or cfg.w_dim != dim:
        raise ValueError(f"{what} outputs [N, {cfg.n_styles}, {cfg.w_dim}] latents ({cfg.latent_space}) but the "
                         f"generator takes [N, {G.num_ws}, {dim}] ({name})")


# ----------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class EncoderCheckpoint:
    """A loaded encoder (eval mode, frozen, on the requested device) and the official decoder if present."""

    encoder: GradualStyleEncoder
    decoder: Generator | None
    format: str  # "native" | "official"
    path: Path
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)  # native meta, or the official checkpoint's opts

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.cfg


def load_encoder(path: str | os.PathLike, with_decoder: bool = True, device: str | torch.device = "cpu",
                 latent_space: str | None = None) -> EncoderCheckpoint:
    """Load a native encoder directory or an official pSp / e4e ``.pt`` checkpoint.

    Args:
        path: native directory (config.json + encoder.safetensors) or an official checkpoint file.
        with_decoder: also build the official checkpoint's ``decoder.*`` as our Generator.
        device: where to put the networks.
        latent_space: None = from the checkpoint (native config; official opts ``z_plus_latent`` /
            ``latent_space``, else "w+"); "w+" or "z+" = the caller's statement, needed for official z+
            checkpoints that do not record it (a native config that disagrees is an error).
    Returns:
        EncoderCheckpoint with the encoder (and decoder) in eval mode with requires_grad False.
    Raises:
        FileNotFoundError: nothing at path.
        CheckpointError (a ValueError): with a one-line message naming the file and the problem.
    """
    p = Path(path)
    if latent_space is not None and latent_space not in LATENT_SPACES:
        raise ValueError(f"encoder latent space must be one of {LATENT_SPACES}, got {latent_space!r}")
    if not p.exists():
        raise FileNotFoundError(f"encoder checkpoint not found: {p}")
    if p.is_dir():
        ckpt = _load_native(p)
        if latent_space is not None and latent_space != ckpt.config.latent_space:
            raise CheckpointError(f"{p}: a {ckpt.config.latent_space} encoder, not {latent_space}")
    else:
        if p.stat().st_size == 0:
            raise CheckpointError(f"{p} is empty")
        ckpt = _load_official(p, with_decoder, latent_space)
    ckpt.encoder.eval().requires_grad_(False).to(device)
    if ckpt.decoder is not None:
        ckpt.decoder.eval().requires_grad_(False).to(device)
    return ckpt


def _load_native(path: Path) -> EncoderCheckpoint:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is a directory without config.json (not a stylecast encoder)")
    doc = read_native_config(path)
    if doc["format"] != ENCODER_FORMAT:
        raise CheckpointError(f"{path}: format {doc['format']!r} is not an encoder (expected {ENCODER_FORMAT!r})")
    try:
        cfg = EncoderConfig.from_dict(doc["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: invalid encoder config ({exc})") from None
    weights = path / "encoder.safetensors"
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: missing or corrupt safetensors file ({str(exc)[:200]})") from None
    enc = build_encoder(cfg)
    load_exact(enc, sd, str(weights))
    meta = doc.get("meta", {})
    return EncoderCheckpoint(encoder=enc, decoder=None, format="native", path=path, sha256=checkpoint_sha256(path),
                             meta=meta if isinstance(meta, dict) else {})


def _kind_from_opts(opts: Mapping[str, Any], what: str) -> str:
    etype = opts.get("encoder_type")
    for kind, name in OFFICIAL_TYPES.items():
        if etype == name:
            return kind
    raise CheckpointError(f"{what}: encoder_type {etype!r} is not supported (only pSp's 'GradualStyleEncoder' "
                          "and e4e's 'Encoder4Editing' W+ encoders are)")


def _latent_space_from_opts(opts: Mapping[str, Any], what: str) -> str:
    """"z+" when the opts say so (``z_plus_latent`` true or ``latent_space`` naming z+), else "w+"."""
    named = opts.get("latent_space")
    if named is not None:
        if not isinstance(named, str) or named.lower() not in _Z_PLUS_NAMES + ("w+", "wplus", "w_plus"):
            raise CheckpointError(f"{what}: opts latent_space={named!r} is neither W+ nor z+")
        from_name = "z+" if named.lower() in _Z_PLUS_NAMES else "w+"
    else:
        from_name = None
    flag = opts.get("z_plus_latent")
    from_flag = None if flag is None else ("z+" if bool(flag) else "w+")
    if from_name and from_flag and from_name != from_flag:
        raise CheckpointError(f"{what}: opts latent_space={named!r} contradicts z_plus_latent={flag!r}")
    return from_name or from_flag or "w+"


def _load_official(path: Path, with_decoder: bool, latent_space: str | None = None) -> EncoderCheckpoint:
    what = str(path)
    obj = _torch_load_safe(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: expected a pSp / e4e checkpoint dict, got {type(obj).__name__}")
    if "g_ema" in obj:
        raise CheckpointError(f"{what}: this is a StyleGAN2 generator checkpoint (g_ema), not a pSp / e4e encoder")
    sd = obj.get("state_dict")
    if not isinstance(sd, Mapping) or not any(isinstance(k, str) and k.startswith("encoder.") for k in sd):
        raise CheckpointError(f"{what}: no 'state_dict' with encoder.* keys (not a pSp / e4e checkpoint)")
    opts = obj.get("opts")
    if isinstance(opts, argparse.Namespace):
        opts = vars(opts)
    if not isinstance(opts, Mapping):
        raise CheckpointError(f"{what}: no 'opts' dict (pSp / e4e checkpoints record encoder_type there)")
    opts = dict(opts)
    kind = _kind_from_opts(opts, what)
    input_nc = opts.get("input_nc", 3)
    if input_nc != 3:
        raise CheckpointError(f"{what}: input_nc={input_nc!r}: only RGB face encoders (input_nc=3) are supported, "
                              "not pSp's sketch / segmentation-map models")
    if opts.get("learn_in_w", False):
        raise CheckpointError(f"{what}: learn_in_w models (one W code for all layers) are not supported; "
                              "only W+ encoders are")
    add_avg = bool(opts.get("start_from_latent_avg", False))
    space = latent_space or _latent_space_from_opts(opts, what)

    enc_sd: dict[str, Any] = {}
    dec_sd: dict[str, Any] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        k = str(k)
        if k.startswith("encoder.") and k != "encoder.latent_avg":
            enc_sd[k[len("encoder."):]] = v
        elif k.startswith("decoder."):
            dec_sd[k[len("decoder."):]] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{what}: unknown keys {key_list(sorted(unknown))} (expected encoder.* and decoder.*)")
    cfg = infer_encoder_config(enc_sd, kind, add_avg, what, latent_space=space)
    _check_opts_size(opts, cfg, what)

    latent_avg = obj.get("latent_avg")
    if latent_avg is not None:
        latent_avg = _expand_latent_avg(latent_avg, cfg, what)
    decoder = None
    if dec_sd and (with_decoder or (add_avg and latent_avg is None)):
        # A z+ encoder's latent_avg (if any) lives in its own space, not W: no truncation centre from it.
        w_avg = _generator_w_avg(latent_avg) if space == "w+" else None
        decoder = generator_from_rosinality(dec_sd, w_avg, f"{what} (decoder)")
        try:
            check_encoder_fits(cfg, decoder, "the encoder")
        except ValueError as exc:
            raise CheckpointError(f"{what}: the decoder does not fit: {exc}") from None
    if add_avg and latent_avg is None and space == "z+":
        raise CheckpointError(f"{what}: start_from_latent_avg is set for a z+ encoder but the checkpoint has no "
                              "latent_avg (the decoder's mean W is not a z+ code)")
    if add_avg and latent_avg is None:
        if decoder is None:
            raise CheckpointError(f"{what}: start_from_latent_avg is set but there is neither a latent_avg nor a "
                                  "decoder to take the mean latent from")
        latent_avg = decoder.mapping.w_avg.detach().clone().expand(cfg.n_styles, cfg.w_dim).contiguous()

    enc = build_encoder(cfg)
    enc_sd["latent_avg"] = latent_avg if add_avg else torch.zeros(cfg.n_styles, cfg.w_dim)
    load_exact(enc, enc_sd, what)
    return EncoderCheckpoint(encoder=enc, decoder=decoder if with_decoder else None, format="official", path=path,
                             sha256=checkpoint_sha256(path), meta=opts)


_STYLE_KEY = re.compile(r"^styles\.(\d+)\.")
_CONV_KEY = re.compile(r"^styles\.(\d+)\.convs\.(\d+)\.weight$")


def infer_encoder_config(sd: Mapping[str, Any], kind: str, add_latent_avg: bool, what: str,
                         latent_space: str = "w+") -> EncoderConfig:
    """EncoderConfig from the shapes of an official encoder state dict (keys without the ``encoder.`` prefix).

    The input size follows from the number of convolutions of the coarse GradualStyleBlocks, coarse_ind and
    middle_ind from where that number grows by one.

    Raises:
        CheckpointError: naming the missing key or the inconsistent shape.
    """
    backbone = infer_irse_config(sd, what)
    if backbone.in_channels != 3:
        raise CheckpointError(f"{what}: input_layer.0.weight takes {backbone.in_channels} channels; only RGB "
                              "encoders (3) are supported")
    if len(backbone.widths) != N_STAGES:
        raise CheckpointError(f"{what}: the IR-SE body has {len(backbone.widths)} stages, pSp / e4e use {N_STAGES}")
    indices = {int(m.group(1)) for k in sd if (m := _STYLE_KEY.match(str(k)))}
    if not indices:
        raise CheckpointError(f"{what}: missing key styles.0.linear.weight")
    n_styles = max(indices) + 1
    n_convs = [0] * n_styles
    for k in sd:
        if (m := _CONV_KEY.match(str(k))):
            n_convs[int(m.group(1))] += 1
    lin = sd.get("styles.0.linear.weight")
    if not isinstance(lin, torch.Tensor) or lin.ndim != 2:
        raise CheckpointError(f"{what}: missing key styles.0.linear.weight")
    levels = [n - n_convs[0] for n in n_convs]  # 0 coarse, 1 middle, 2 fine; must be 0..0 1..1 2..2
    for i, level in enumerate(levels):
        prev = levels[i - 1] if i else 0
        if n_convs[0] < 1 or level not in (prev, prev + 1) or level > 2:
            raise CheckpointError(f"{what}: styles.{i} has {n_convs[i]} convolutions, which breaks pSp's "
                                  "coarse / middle / fine pattern")
    coarse = levels.count(0)
    middle = coarse + levels.count(1)
    try:
        return EncoderConfig(kind=kind, backbone=backbone, n_styles=n_styles, w_dim=int(lin.shape[0]),
                             input_size=backbone.reduction_factor * 2 ** n_convs[0], add_latent_avg=add_latent_avg,
                             latent_space=latent_space, coarse_ind=coarse, middle_ind=middle)
    except ValueError as exc:
        raise CheckpointError(f"{what}: unsupported encoder shapes ({exc})") from None


def _check_opts_size(opts: Mapping[str, Any], cfg: EncoderConfig, what: str) -> None:
    """opts n_styles / output_size (pSp) / stylegan_size (e4e), where present, must agree with the state dict."""
    if opts.get("n_styles") is not None and opts["n_styles"] != cfg.n_styles:
        raise CheckpointError(f"{what}: opts n_styles={opts['n_styles']!r} but the state dict has "
                              f"{cfg.n_styles} style blocks")
    for key in ("output_size", "stylegan_size"):
        size = opts.get(key)
        if size is None:
            continue
        if not isinstance(size, int) or size < 4 or size & (size - 1):
            raise CheckpointError(f"{what}: opts {key}={size!r} is not a power-of-two resolution")
        if 2 * int(math.log2(size)) - 2 != cfg.n_styles:
            raise CheckpointError(f"{what}: opts {key}={size} implies {2 * int(math.log2(size)) - 2} latents but "
                                  f"the state dict has {cfg.n_styles} style blocks")


def _expand_latent_avg(latent_avg: Any, cfg: EncoderConfig, what: str) -> torch.Tensor:
    """latent_avg [w_dim] | [1, w_dim] | [n_styles, w_dim] -> float32 [n_styles, w_dim]."""
    if not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"{what}: latent_avg is not a tensor")
    shape = tuple(latent_avg.shape)
    if shape not in ((cfg.w_dim,), (1, cfg.w_dim), (cfg.n_styles, cfg.w_dim)):
        raise CheckpointError(f"{what}: latent_avg has shape {shape}, expected [{cfg.w_dim}] or "
                              f"[{cfg.n_styles}, {cfg.w_dim}]")
    if not latent_avg.is_floating_point() or not torch.isfinite(latent_avg).all():
        raise CheckpointError(f"{what}: latent_avg holds non-finite or non-float values")
    return latent_avg.float().reshape(-1, cfg.w_dim).expand(cfg.n_styles, cfg.w_dim).contiguous()


def _generator_w_avg(latent_avg: torch.Tensor | None) -> torch.Tensor | None:
    """The decoder's truncation centre from an encoder latent_avg [n_styles, w_dim] (rows are normally equal)."""
    if latent_avg is None:
        return None
    if bool((latent_avg == latent_avg[:1]).all()):
        return latent_avg[0].clone()
    return latent_avg.double().mean(dim=0).float()


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_encoder(path: str | os.PathLike, enc: GradualStyleEncoder, meta: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write a native encoder directory atomically: config.json + encoder.safetensors (latent_avg included).

    Args:
        path: directory to create (never overwritten unless overwrite=True).
        enc: a pSp or e4e encoder.
        meta: JSON-serialisable provenance (training config, source checkpoint, ...).
    Returns:
        path.
    """
    path = Path(path)
    doc = {"format": ENCODER_FORMAT, "config": enc.cfg.to_dict(), "meta": meta or {}}
    text = json.dumps(doc, indent=2) + "\n"  # fails before anything is written when meta is not JSON
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()},
                  str(tmp / "encoder.safetensors"))
        (tmp / "config.json").write_text(text)
    return path


def official_state_dict(enc: GradualStyleEncoder, decoder: Generator | None = None) -> dict[str, torch.Tensor]:
    """``{"encoder.*": ..., "decoder.*": rosinality g_ema keys}`` as the official pSp / e4e code names them."""
    sd = {f"encoder.{k}": v.detach().cpu().clone() for k, v in enc.state_dict().items() if k != "latent_avg"}
    if decoder is not None:
        sd.update({f"decoder.{k}": v for k, v in generator_to_rosinality(decoder).items()})
    return sd


def save_official(path: str | os.PathLike, enc: GradualStyleEncoder, decoder: Generator | None = None,
                  overwrite: bool = False) -> Path:
    """Write enc (and decoder) in the official pSp / e4e checkpoint layout, atomically.

    The official inference scripts rebuild IR-SE50 with 512-d latents and 256 px inputs and load the decoder
    strictly, so they accept only such encoders saved together with their decoder; stylecast loads any.

    Args:
        path: the ``.pt`` file to write.
        enc: a pSp or e4e encoder.
        decoder: the generator it inverts into (written as rosinality ``decoder.*`` keys).
        overwrite: replace an existing file.
    Returns:
        path.
    Raises:
        ValueError: n_styles is not 2 log2(R) - 2 for a resolution R, or the decoder does not fit the encoder.
        FileExistsError: path exists and overwrite is False.
    """
    path = Path(path)
    cfg = enc.cfg
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (checkpoints are never overwritten)")
    if cfg.output_size is None:
        raise ValueError(f"n_styles={cfg.n_styles} is not 2 log2(R) - 2 for any resolution R; the official "
                         "format derives n_styles from output_size")
    if decoder is not None:
        check_encoder_fits(cfg, decoder, "the encoder")
    # z_plus_latent / latent_space are stylecast's record of the space (the official code ignores unknown opts).
    opts = {"encoder_type": OFFICIAL_TYPES[cfg.kind], "input_nc": 3, "label_nc": 0, "output_size": cfg.output_size,
            "stylegan_size": cfg.output_size, "n_styles": cfg.n_styles,
            "start_from_latent_avg": cfg.add_latent_avg, "learn_in_w": False,
            "z_plus_latent": cfg.latent_space == "z+", "latent_space": cfg.latent_space}
    obj: dict[str, Any] = {"state_dict": official_state_dict(enc, decoder), "opts": opts}
    if cfg.add_latent_avg:
        obj["latent_avg"] = enc.latent_avg.detach().cpu().clone()
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path
