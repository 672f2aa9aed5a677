"""The StyleGAN2 generator and discriminator (Karras et al., "Analyzing and Improving the Image Quality of
StyleGAN", CVPR 2020), config-f "skip" generator and "resnet" discriminator: the one network definition.

Module names follow the resolution (`synthesis.b64.conv0`, `synthesis.b64.torgb`, ...) so blending can select
layers by resolution; the mapping to rosinality's `convs.N` / `to_rgbs.N` lives in training.checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import seeds as _seeds
from common.seeds import seed_to_z
from training.ops import bias_act, downsample2d, modulated_conv2d, setup_filter, upfirdn2d

NOISE_MODES = ("const", "random", "none")


# ----------------------------------------------------------------------------------------------------------
# Configuration


def rosinality_channels(resolution: int, channel_multiplier: int = 2) -> tuple[int, ...]:
    """Channels per resolution 4, 8, ..., resolution in rosinality's table (512 up to 32 px, then halving)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
             256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier,
             2048: 8 * channel_multiplier}
    return tuple(table[4 * 2**i] for i in range(int(math.log2(resolution)) - 1))


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to rebuild a Generator (saved as config.json next to the weights).

    channels[i] is the number of feature maps at resolution 4 * 2**i.
    """

    resolution: int = 1024
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    channels: tuple[int, ...] = field(default_factory=lambda: rosinality_channels(1024, 2))
    img_channels: int = 3
    blur_kernel: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
    conv_clamp: float | None = None  # NVlabs ADA models clamp activations at 256; rosinality does not.
    w_avg_beta: float = 0.995  # decay of the tracked mean w during training

    def __post_init__(self) -> None:
        res = self.resolution
        if res < 4 or res & (res - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {res}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blur_kernel", tuple(float(k) for k in self.blur_kernel))
        if len(self.channels) != self.log_size - 1:
            raise ValueError(f"channels must list {self.log_size - 1} entries (4..{res} px), "
                             f"got {len(self.channels)}")
        if min(self.channels) < 1 or self.z_dim < 1 or self.w_dim < 1 or self.mapping_layers < 1:
            raise ValueError("channels, z_dim, w_dim and mapping_layers must be positive")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def num_ws(self) -> int:
        """Number of per-layer latents: 2 per resolution from 8 px, plus 2 at 4 px (18 at 1024 px)."""
        return 2 * self.log_size - 2

    @property
    def resolutions(self) -> list[int]:
        return [2**k for k in range(2, self.log_size + 1)]

    def channels_at(self, res: int) -> int:
        return self.channels[int(math.log2(res)) - 2]

    @classmethod
    def rosinality(cls, size: int = 1024, channel_multiplier: int = 2, style_dim: int = 512,
                   n_mlp: int = 8, **kw: Any) -> "GeneratorConfig":
        """Config of rosinality's `Generator(size, style_dim, n_mlp, channel_multiplier)` (config-f at cm=2)."""
        return cls(resolution=size, z_dim=style_dim, w_dim=style_dim, mapping_layers=n_mlp,
                   channels=rosinality_channels(size, channel_multiplier), **kw)

    @classmethod
    def tiny(cls, resolution: int = 32, w_dim: int = 64, max_channels: int = 64, min_channels: int = 32,
             mapping_layers: int = 2, **kw: Any) -> "GeneratorConfig":
        """Small configs for tests and the demo: channels halve from max_channels down to min_channels."""
        n = int(math.log2(resolution)) - 1
        chans = tuple(max(min_channels, max_channels >> max(0, i - 2)) for i in range(n))
        return cls(resolution=resolution, z_dim=w_dim, w_dim=w_dim, mapping_layers=mapping_layers,
                   channels=chans, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["blur_kernel"] = list(self.blur_kernel)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GeneratorConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        if "blur_kernel" in d:
            d["blur_kernel"] = tuple(d["blur_kernel"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Layers


class EqualLinear(nn.Module):
    """Fully connected layer with equalized learning rate: raw weights, runtime gain lr_mul / sqrt(in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, act: str = "linear"):
        super().__init__()
        # Stored weights are N(0, 1) / lr_mul so that the effective weights start at N(0, 1/in) for any lr_mul.
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        if self.act == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x @ w.t(), b, act=self.act, impl="ref")

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, act={self.act}"


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """PixelNorm: x / sqrt(mean(x^2) + eps) along dim."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z -> w: PixelNorm, then `mapping_layers` equalized-lr FC layers with lr_mul 0.01 and leaky ReLU."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.z_dim, self.w_dim = cfg.z_dim, cfg.w_dim
        self.num_layers = cfg.mapping_layers
        self.w_avg_beta = cfg.w_avg_beta
        for i in range(cfg.mapping_layers):
            in_f = cfg.z_dim if i == 0 else cfg.w_dim
            setattr(self, f"fc{i}", EqualLinear(in_f, cfg.w_dim, lr_mul=cfg.mapping_lr_mul, act="lrelu"))
        self.register_buffer("w_avg", torch.zeros([cfg.w_dim]))

    def forward(self, z: torch.Tensor, update_w_avg: bool = False) -> torch.Tensor:  # [N, z_dim] -> [N, w_dim]
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [N, {self.z_dim}], got {tuple(z.shape)}")
        x = normalize_2nd_moment(z.to(torch.float32))
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            # Track the mean w (the truncation centre) as an EMA during training.
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling x2) + noise + bias + leaky ReLU (StyleGAN2 Fig. 2c)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 kernel_size: int = 3, conv_clamp: float | None = None,
                 resample_filter: torch.Tensor | None = None):
        super().__init__()
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        # The affine map's bias starts at 1 so initial styles are ~1 (identity modulation).
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        if up > 1:
            self.register_buffer("resample_filter", resample_filter.clone())
        else:
            self.resample_filter = None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const",
                impl: str = "auto") -> torch.Tensor:  # [N, I, H, W], [N, w_dim] -> [N, O, H*up, W*up]
        styles = self.affine(w)  # [N, I]
        noise = None
        if noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device,
                                dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength  # [H, W], broadcasts over N and C
        return modulated_conv2d(x, self.weight * self.weight_gain, styles, demodulate=True, up=self.up,
                                resample_filter=self.resample_filter, noise=noise, bias=self.bias,
                                act="lrelu", clamp=self.conv_clamp, impl=impl)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation + bias; adds the upsampled skip image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None,
                 resample_filter: torch.Tensor | None = None, has_skip: bool = True):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        if has_skip:
            self.register_buffer("resample_filter", resample_filter.clone())
        else:
            self.resample_filter = None
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None,
                impl: str = "auto") -> torch.Tensor:  # -> [N, img_channels, H, W]
        styles = self.affine(w)
        return modulated_conv2d(x, self.weight * self.weight_gain, styles, demodulate=False, bias=self.bias,
                                act="linear", clamp=self.conv_clamp, skip=skip,
                                resample_filter=self.resample_filter, impl=impl)


class SynthesisBlock(nn.Module):
    """One resolution: (const at 4 px | up-conv) -> conv -> to-RGB (skip architecture)."""

    def __init__(self, cfg: GeneratorConfig, resolution: int, resample_filter: torch.Tensor):
        super().__init__()
        self.resolution = resolution
        out_ch = cfg.channels_at(resolution)
        if resolution == 4:
            self.const = nn.Parameter(torch.randn([out_ch, 4, 4]))
        else:
            in_ch = cfg.channels_at(resolution // 2)
            self.conv0 = SynthesisLayer(in_ch, out_ch, cfg.w_dim, resolution, up=2,
                                        conv_clamp=cfg.conv_clamp, resample_filter=resample_filter)
        self.conv1 = SynthesisLayer(out_ch, out_ch, cfg.w_dim, resolution, conv_clamp=cfg.conv_clamp)
        self.torgb = ToRGBLayer(out_ch, cfg.img_channels, cfg.w_dim, conv_clamp=cfg.conv_clamp,
                                resample_filter=resample_filter, has_skip=resolution > 4)
        self.num_conv = 1 if resolution == 4 else 2

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_mode: str = "const", impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        # ws: [N, num_conv + 1, w_dim]; the to-RGB latent is shared with the next block's first conv.
        if self.resolution == 4:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0], noise_mode, impl)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, impl)
            x = self.conv1(x, ws[:, 1], noise_mode, impl)
        img = self.torgb(x, ws[:, self.num_conv], skip=img, impl=impl)
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> img [N, img_channels, R, R] in about [-1, 1]."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.num_ws = cfg.num_ws
        self.resolutions = cfg.resolutions
        f = setup_filter(list(cfg.blur_kernel))
        for res in self.resolutions:
            setattr(self, f"b{res}", SynthesisBlock(cfg, res, f))

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.resolutions]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", impl: str = "auto") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.cfg.w_dim:
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.cfg.w_dim}], got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        x = img = None
        w_idx = 0
        for block in self.blocks():
            x, img = block(x, img, ws[:, w_idx: w_idx + block.num_conv + 1], noise_mode, impl)
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: mapping (z -> w, tracked w_avg) + synthesis (ws -> image).

    Args of forward:
        z: [N, z_dim] float32 latents.
        psi: truncation strength (1 = none, 0 = the mean face w_avg).
        cutoff: truncate only the first `cutoff` of the num_ws latents (None = all).
        noise_mode: "const" (the stored noise buffers), "random" or "none".
    Returns:
        img [N, 3, R, R] float32, nominally in [-1, 1].
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.w_dim, self.num_ws = cfg.z_dim, cfg.w_dim, cfg.num_ws
        self.resolution = cfg.resolution
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def map(self, z: torch.Tensor, psi: float = 1.0, cutoff: int | None = None,
            update_w_avg: bool = False) -> torch.Tensor:
        """z [N, z_dim] -> ws [N, num_ws, w_dim] with truncation towards w_avg."""
        w = self.mapping(z, update_w_avg=update_w_avg)
        return self.broadcast(w, psi=psi, cutoff=cutoff)

    def broadcast(self, w: torch.Tensor, psi: float = 1.0, cutoff: int | None = None) -> torch.Tensor:
        """w [N, w_dim] (or ws [N, num_ws, w_dim]) -> truncated ws [N, num_ws, w_dim]."""
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1) if w.ndim == 2 else w
        return truncate(ws, self.w_avg, psi, cutoff)

    def forward(self, z: torch.Tensor, psi: float = 1.0, cutoff: int | None = None,
                noise_mode: str = "const", impl: str = "auto") -> torch.Tensor:
        return self.synthesis(self.map(z, psi, cutoff), noise_mode=noise_mode, impl=impl)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi: float | torch.Tensor = 1.0,
             cutoff: int | None = None) -> torch.Tensor:
    """ws' = w_avg + psi * (ws - w_avg) on the first `cutoff` latents (all when None).

    Args:
        ws: [N, num_ws, w_dim].
        w_avg: [w_dim].
        psi: float or [N] tensor (per-sample psi).
    """
    if isinstance(psi, (int, float)) and psi == 1:
        return ws
    psi_t = torch.as_tensor(psi, dtype=ws.dtype, device=ws.device)
    if psi_t.ndim == 1:
        psi_t = psi_t.reshape(-1, 1, 1)
    truncated = w_avg.to(ws.dtype) + psi_t * (ws - w_avg.to(ws.dtype))
    if cutoff is None or cutoff >= ws.shape[1]:
        return truncated
    return torch.cat([truncated[:, :cutoff], ws[:, cutoff:]], dim=1)


def mix_styles(ws_a: torch.Tensor, ws_b: torch.Tensor, crossover: int) -> torch.Tensor:
    """Style mixing: latents [0, crossover) from ws_a (coarse), [crossover, num_ws) from ws_b (fine)."""
    if ws_a.shape != ws_b.shape:
        raise ValueError(f"style mixing needs equal shapes, got {tuple(ws_a.shape)} and {tuple(ws_b.shape)}")
    if not 0 <= crossover <= ws_a.shape[1]:
        raise ValueError(f"crossover must be in 0..{ws_a.shape[1]}, got {crossover}")
    return torch.cat([ws_a[:, :crossover], ws_b[:, crossover:]], dim=1)


def seeds_to_z(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """[len(seeds), z_dim] float32 tensor, one row per seed, by the project's one rule (`common.seeds.seed_to_z`)."""
    return torch.from_numpy(_seeds.seeds_to_z(list(seeds), z_dim))


# ----------------------------------------------------------------------------------------------------------
# Discriminator


@dataclass(frozen=True)
class DiscriminatorConfig:
    """StyleGAN2 residual discriminator; channels[i] at resolution 4 * 2**i (as for the generator)."""

    resolution: int = 1024
    channels: tuple[int, ...] = field(default_factory=lambda: rosinality_channels(1024, 2))
    img_channels: int = 3
    blur_kernel: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
    mbstd_group: int = 4
    mbstd_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blur_kernel", tuple(float(k) for k in self.blur_kernel))
        if len(self.channels) != int(math.log2(self.resolution)) - 1:
            raise ValueError("channels must list one entry per resolution 4..resolution")

    def channels_at(self, res: int) -> int:
        return self.channels[int(math.log2(res)) - 2]

    @classmethod
    def from_generator(cls, g: GeneratorConfig) -> "DiscriminatorConfig":
        return cls(resolution=g.resolution, channels=g.channels, img_channels=g.img_channels,
                   blur_kernel=g.blur_kernel)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"], d["blur_kernel"] = list(self.channels), list(self.blur_kernel)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiscriminatorConfig":
        d = dict(d)
        d["channels"], d["blur_kernel"] = tuple(d["channels"]), tuple(d["blur_kernel"])
        return cls(**d)


class EqualConv2d(nn.Module):
    """Conv with equalized lr, optional blur + stride-2 downsampling, bias + leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, down: bool = False, bias: bool = True,
                 act: str = "lrelu", blur: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel_size * kernel_size)
        self.down, self.act, self.k = down, act, kernel_size
        if down:
            self.register_buffer("resample_filter", blur.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if self.down:
            # Blur before the strided conv (anti-aliasing), padding as rosinality's ConvLayer.
            p = (self.resample_filter.shape[-1] - 2) + (self.k - 1)
            x = upfirdn2d(x, self.resample_filter, padding=((p + 1) // 2, p // 2, (p + 1) // 2, p // 2), impl="ref")
            x = F.conv2d(x, w, stride=2)
        else:
            x = F.conv2d(x, w, padding=self.k // 2)
        return bias_act(x, self.bias, act=self.act, impl="ref")


class DiscriminatorBlock(nn.Module):
    """Residual block: conv3x3 -> conv3x3 down, plus a 1x1 down skip; the sum is scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, blur: torch.Tensor):
        super().__init__()
        self.conv0 = EqualConv2d(in_ch, in_ch, 3)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3, down=True, blur=blur)
        self.skip = EqualConv2d(in_ch, out_ch, 1, down=True, bias=False, act="linear", blur=blur)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(x)
        x = self.conv1(self.conv0(x))
        return (x + y) / math.sqrt(2)


class Discriminator(nn.Module):
    """img [N, 3, R, R] -> logits [N, 1]; resnet architecture with minibatch standard deviation."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        blur = setup_filter(list(cfg.blur_kernel))
        r = cfg.resolution
        self.fromrgb = EqualConv2d(cfg.img_channels, cfg.channels_at(r), 1)
        self.resolutions = [2**k for k in range(int(math.log2(r)), 2, -1)]  # R, R/2, ..., 8
        for res in self.resolutions:
            setattr(self, f"b{res}", DiscriminatorBlock(cfg.channels_at(res), cfg.channels_at(res // 2), blur))
        c4 = cfg.channels_at(4)
        self.conv = EqualConv2d(c4 + cfg.mbstd_channels, c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, act="lrelu")
        self.out = EqualLinear(c4, 1)

    def blocks(self) -> list[DiscriminatorBlock]:
        return [getattr(self, f"b{res}") for res in self.resolutions]

    def minibatch_stddev(self, x: torch.Tensor) -> torch.Tensor:
        # Std over groups of samples, averaged over channels and pixels, appended as a feature map.
        n, c, h, w = x.shape
        g = min(self.cfg.mbstd_group, n)
        while n % g:
            g -= 1
        f = self.cfg.mbstd_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()
        y = y.mean(dim=(2, 3, 4)).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1:] != (self.cfg.img_channels, self.cfg.resolution, self.cfg.resolution):
            raise ValueError(f"D expects [N, {self.cfg.img_channels}, {self.cfg.resolution}, "
                             f"{self.cfg.resolution}], got {tuple(img.shape)}")
        x = self.fromrgb(img)
        for block in self.blocks():
            x = block(x)
        x = self.conv(self.minibatch_stddev(x))
        x = self.fc(x.flatten(1))
        return self.out(x)
