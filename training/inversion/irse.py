"""IR / IR-SE ResNets of InsightFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", CVPR 2019; squeeze-excitation gates of Hu et al., CVPR 2018) in the TreB1eN InsightFace_Pytorch
layout that pSp, e4e and their ArcFace ``model_ir_se50.pth`` use.

Module and parameter names are the official ones (``input_layer.{0,1,2}``, ``body.{i}.shortcut_layer.*``,
``body.{i}.res_layer.*`` with the SE gate at ``res_layer.5.fc1/fc2``, ``output_layer.{0,3,4}``), so official state
dicts load without renaming. Widths and unit counts are a frozen IRSEConfig, inferred from a state dict's shapes
when loading, so tests can build tiny networks with the real topology.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.checkpoints import CheckpointError, _torch_load_safe

MODES = ("ir", "ir_se")
#: Units per stage of the official depths (get_blocks of InsightFace_Pytorch).
UNITS_BY_LAYERS: dict[int, tuple[int, ...]] = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)  # absent from state dicts saved by PyTorch < 0.4.1


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class IRSEConfig:
    """Topology of an IR / IR-SE ResNet body (the 50-layer IR-SE of pSp / e4e / ArcFace by default).

    Stage s has ``units[s]`` bottleneck units of output width ``widths[s]``; the first unit of every stage
    has stride 2, so the body divides the input size by ``2 ** len(widths)``.
    """

    mode: str = "ir_se"  # "ir_se": with the squeeze-excitation gate; "ir": without
    stem_channels: int = 64  # width of input_layer (3x3 conv, BN, PReLU)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    units: tuple[int, ...] = UNITS_BY_LAYERS[50]
    se_reduction: int = 16
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(c) for c in self.widths))
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        if self.mode not in MODES:
            raise ValueError(f"IR-SE mode must be one of {MODES}, got {self.mode!r}")
        if not self.widths or len(self.widths) != len(self.units):
            raise ValueError(f"widths {self.widths} and units {self.units} must be non-empty and of equal length")
        if min(self.widths) < 1 or min(self.units) < 1 or self.stem_channels < 1 or self.in_channels < 1:
            raise ValueError("widths, units, stem_channels and in_channels must be positive")
        if any(a == b for a, b in zip(self.widths, self.widths[1:])):
            # Stages are recovered from a state dict as runs of equal width, so neighbours must differ.
            raise ValueError(f"consecutive stage widths must differ, got {self.widths}")
        if self.mode == "ir_se" and (self.se_reduction < 1 or min(self.widths) < self.se_reduction):
            raise ValueError(f"se_reduction {self.se_reduction} must be >= 1 and <= every width {self.widths}")

    @classmethod
    def resnet(cls, num_layers: int = 50, mode: str = "ir_se") -> "IRSEConfig":
        """The official 50 / 100 / 152-layer configurations."""
        if num_layers not in UNITS_BY_LAYERS:
            raise ValueError(f"num_layers must be one of {sorted(UNITS_BY_LAYERS)}, got {num_layers}")
        return cls(mode=mode, units=UNITS_BY_LAYERS[num_layers])

    @property
    def num_units(self) -> int:
        return sum(self.units)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Index in ``body`` of the last unit of every stage (6, 20, 23 are the pSp taps of stages 2..4)."""
        ends, total = [], 0
        for u in self.units:
            total += u
            ends.append(total - 1)
        return tuple(ends)

    @property
    def reduction_factor(self) -> int:
        """How much the body shrinks the input (each stage halves it)."""
        return 2 ** len(self.widths)

    def unit_specs(self) -> list[tuple[int, int, int]]:
        """(in_channels, depth, stride) of every body unit, in order."""
        specs, c_in = [], self.stem_channels
        for depth, n in zip(self.widths, self.units):
            specs.append((c_in, depth, 2))
            specs += [(depth, depth, 1)] * (n - 1)
            c_in = depth
        return specs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"], d["units"] = list(self.widths), list(self.units)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IRSEConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown IRSEConfig fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("widths", "units"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Layers


class SEModule(nn.Module):
    """Squeeze-excitation gate: x * sigmoid(fc2(relu(fc1(mean_hw(x))))) with bias-free 1x1 convolutions."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C, H, W]
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))  # [N, C, 1, 1]
        return x * gate


class BottleneckIR(nn.Module):
    """InsightFace's improved residual unit (bottleneck_IR / bottleneck_IR_SE): BN-conv-PReLU-conv-BN(-SE).

    The stride sits on the second 3x3 convolution; the shortcut is a strided 1x1 max pool (pure subsampling)
    when the width is unchanged, else a strided 1x1 convolution + BN.
    """

    def __init__(self, in_channels: int, depth: int, stride: int, se_reduction: int | None):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(depth))
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if se_reduction is not None:
            layers.append(SEModule(depth, se_reduction))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C_in, H, W] -> [N, depth, H/s, W/s]
        return self.res_layer(x) + self.shortcut_layer(x)


def build_input_layer(cfg: IRSEConfig) -> nn.Sequential:
    """``input_layer``: Conv2d(in, stem, 3x3, s1, p1, no bias), BatchNorm2d, PReLU (keys input_layer.{0,1,2})."""
    conv = nn.Conv2d(cfg.in_channels, cfg.stem_channels, kernel_size=3, stride=1, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cfg.stem_channels), nn.PReLU(cfg.stem_channels))


def build_body(cfg: IRSEConfig) -> nn.Sequential:
    """``body``: the bottleneck units of every stage, flattened into one Sequential (keys body.{i}.*)."""
    se = cfg.se_reduction if cfg.mode == "ir_se" else None
    return nn.Sequential(*[BottleneckIR(c_in, depth, stride, se) for c_in, depth, stride in cfg.unit_specs()])


# ----------------------------------------------------------------------------------------------------------
# ArcFace


@dataclass(frozen=True)
class ArcFaceConfig:
    """The ArcFace ``Backbone`` of InsightFace_Pytorch: IR-SE body + BN, dropout, linear, BN1d -> unit vector."""

    backbone: IRSEConfig = field(default_factory=IRSEConfig)
    input_size: int = 112  # 112 (7x7 output map) or 224 (14x14) in the official code
    emb_dim: int = 512
    drop_ratio: float = 0.6  # pSp's IDLoss value; dropout is inactive in eval mode anyway

    def __post_init__(self) -> None:
        r = self.backbone.reduction_factor
        if self.input_size < r or self.input_size % r:
            raise ValueError(f"ArcFace input_size {self.input_size} must be a positive multiple of {r}")
        if self.emb_dim < 1 or not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError("emb_dim must be positive and drop_ratio in [0, 1)")

    @property
    def out_spatial(self) -> int:
        return self.input_size // self.backbone.reduction_factor

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.to_dict(), "input_size": self.input_size, "emb_dim": self.emb_dim,
                "drop_ratio": self.drop_ratio}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArcFaceConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ArcFaceConfig fields: {sorted(unknown)}")
        if "backbone" in d:
            d["backbone"] = IRSEConfig.from_dict(d["backbone"])
        return cls(**d)


class Backbone(nn.Module):
    """ArcFace face-recognition network: aligned face crop [N, 3, S, S] in [-1, 1] -> l2-normalised embedding.

    ``output_layer`` = Sequential(BatchNorm2d, Dropout, Flatten, Linear(C * s * s, emb_dim), BatchNorm1d).
    """

    def __init__(self, cfg: ArcFaceConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ArcFaceConfig()
        c = cfg.backbone.widths[-1]
        self.input_layer = build_input_layer(cfg.backbone)
        self.body = build_body(cfg.backbone)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(c), nn.Dropout(cfg.drop_ratio), nn.Flatten(),
                                          nn.Linear(c * cfg.out_spatial**2, cfg.emb_dim), nn.BatchNorm1d(cfg.emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [N, 3, S, S] float (S = cfg.input_size, an aligned 112 px face in [-1, 1] for the official
        weights). Returns: [N, emb_dim] float, unit l2 norm per row."""
        x = self.output_layer(self.body(self.input_layer(x)))  # [N, emb_dim]
        return F.normalize(x, dim=1)


def infer_arcface_config(sd: Mapping[str, Any], what: str) -> ArcFaceConfig:
    """ArcFaceConfig from the shapes of an official ``Backbone`` state dict (raises CheckpointError)."""
    backbone = infer_irse_config(sd, what)
    lin = sd.get("output_layer.3.weight")
    if not isinstance(lin, torch.Tensor) or lin.ndim != 2:
        raise CheckpointError(f"{what}: missing key output_layer.3.weight (not an ArcFace Backbone state dict)")
    emb_dim, fan_in = (int(s) for s in lin.shape)
    c = backbone.widths[-1]
    spatial = math.isqrt(fan_in // c) if fan_in % c == 0 else 0
    if spatial < 1 or c * spatial * spatial != fan_in:
        raise CheckpointError(f"{what}: output_layer.3.weight has shape {tuple(lin.shape)}, expected "
                              f"[emb_dim, {c} * s * s]")
    try:
        return ArcFaceConfig(backbone=backbone, input_size=spatial * backbone.reduction_factor, emb_dim=emb_dim)
    except ValueError as exc:
        raise CheckpointError(f"{what}: unsupported ArcFace shapes ({exc})") from None


def load_arcface(path: str | os.PathLike, device: str | torch.device = "cpu") -> Backbone:
    """Load the official ArcFace IR-SE50 (``model_ir_se50.pth``, a plain TreB1eN ``Backbone`` state dict).

    Args:
        path: the weights file (read with ``torch.load(weights_only=True)``).
        device: where to put the network.
    Returns:
        A frozen Backbone in eval mode.
    Raises:
        CheckpointError: missing, corrupt or hostile file, unknown / missing keys, wrong shapes.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"ArcFace weights {p} not found: pass the path of model_ir_se50.pth (the IR-SE50 "
                              "ArcFace of TreB1eN/InsightFace_Pytorch, distributed with the pSp / e4e pretrained "
                              "models)")
    sd = _torch_load_safe(p)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{p}: expected an ArcFace state dict, got {type(sd).__name__}")
    net = Backbone(infer_arcface_config(sd, str(p)))
    load_exact(net, sd, str(p))
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------
# State dicts


_UNIT_KEY = re.compile(r"^body\.(\d+)\.")


def infer_irse_config(sd: Mapping[str, Any], what: str, prefix: str = "") -> IRSEConfig:
    """IRSEConfig from the shapes of ``{prefix}input_layer.*`` and ``{prefix}body.*`` entries.

    Stages are runs of units with equal output width; SE is detected from ``res_layer.5.fc1.weight``.

    Raises:
        CheckpointError: naming the missing key or the inconsistent shape.
    """

    def get(key: str) -> torch.Tensor:
        t = sd.get(prefix + key)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{what}: missing key {prefix + key}")
        return t

    stem = get("input_layer.0.weight")
    if stem.ndim != 4 or tuple(stem.shape[2:]) != (3, 3):
        raise CheckpointError(f"{what}: {prefix}input_layer.0.weight has shape {tuple(stem.shape)}, "
                              "expected [C, in_channels, 3, 3]")
    indices = {int(m.group(1)) for k in sd if isinstance(k, str) and k.startswith(prefix)
               and (m := _UNIT_KEY.match(k[len(prefix):]))}
    if not indices:
        raise CheckpointError(f"{what}: no {prefix}body.* keys (not an IR-SE network)")
    se = f"{prefix}body.0.res_layer.5.fc1.weight" in sd
    depths, reduction = [], 16
    c_prev = int(stem.shape[0])
    for i in range(max(indices) + 1):
        conv = get(f"body.{i}.res_layer.1.weight")
        if conv.ndim != 4:
            raise CheckpointError(f"{what}: {prefix}body.{i}.res_layer.1.weight has shape {tuple(conv.shape)}")
        depth, c_in = int(conv.shape[0]), int(conv.shape[1])
        if c_in != c_prev:
            raise CheckpointError(f"{what}: {prefix}body.{i}.res_layer.1.weight has {c_in} input channels, "
                                  f"expected {c_prev} (the previous layer's width)")
        if se:
            fc1 = get(f"body.{i}.res_layer.5.fc1.weight")
            if fc1.ndim != 4 or fc1.shape[0] < 1 or depth % int(fc1.shape[0]):
                raise CheckpointError(f"{what}: {prefix}body.{i}.res_layer.5.fc1.weight has shape "
                                      f"{tuple(fc1.shape)}, expected [{depth} / reduction, {depth}, 1, 1]")
            r = depth // int(fc1.shape[0])
            if i == 0:
                reduction = r
            elif depth // reduction != int(fc1.shape[0]):
                raise CheckpointError(f"{what}: {prefix}body.{i} has SE reduction {r}, unit 0 has {reduction}")
        depths.append(depth)
        c_prev = depth
    widths, units = [], []
    for d in depths:
        if widths and widths[-1] == d:
            units[-1] += 1
        else:
            widths.append(d)
            units.append(1)
    try:
        return IRSEConfig(mode="ir_se" if se else "ir", stem_channels=int(stem.shape[0]), widths=tuple(widths),
                          units=tuple(units), se_reduction=reduction, in_channels=int(stem.shape[1]))
    except ValueError as exc:
        raise CheckpointError(f"{what}: unsupported IR-SE shapes ({exc})") from None


def key_list(keys: list[str], limit: int = 5) -> str:
    """The first few keys of a sorted list for an error message, with a count of the rest."""
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def load_exact(module: nn.Module, sd: Mapping[str, Any], what: str) -> None:
    """Copy sd into module's parameters and buffers, requiring exactly the same keys and shapes.

    ``num_batches_tracked`` counters may be absent (old PyTorch files; they do not affect eval).

    Raises:
        CheckpointError: naming unknown keys, missing keys, a wrong shape or non-finite values.
    """
    own = module.state_dict()
    unknown = sorted(str(k) for k in set(sd) - set(own))
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith(_OPTIONAL_SUFFIXES))
    if unknown:
        raise CheckpointError(f"{what}: unknown keys {key_list(unknown)}")
    if missing:
        raise CheckpointError(f"{what}: missing keys {key_list(missing)}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{what}: {k} is not a tensor")
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{what}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        if own[k].is_floating_point():
            if not v.is_floating_point() or not torch.isfinite(v).all():
                raise CheckpointError(f"{what}: {k} holds non-finite or non-float values")
        elif v.is_floating_point() or v.is_complex():
            raise CheckpointError(f"{what}: {k} should hold integers, got {v.dtype}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
