"""DualStyleGAN (Yang et al., "Pastiche Master: Exemplar-Based High-Resolution Portrait Style Transfer", CVPR
2022): stylecast's one StyleGAN2 Generator plus the extrinsic style path (ModRes blocks and colour transforms).

Layer indices are latent indices j = 0..num_ws-1 in rosinality's order, which is also ours:

    j = 0            b4.conv1                  (the to-RGB of 4 px, b4.torgb, reads latent 1)
    j = 2b-1, 2b     b{4*2^b}.conv0, .conv1    (b = 1 for 8 px, ...), and b{4*2^b}.torgb reads latent 2b+1

Structure layers are the convolutions j <= res_index: each is followed by a ModRes block (an AdaIN residual
block driven by the extrinsic code) that adds `weight_j * residual`. Colour layers j > res_index modulate with
`weight_j * T_j(exstyle_w_j) + (1 - weight_j) * ws_j`, T_j an identity-initialised linear map; the to-RGB layer
reading latent j > res_index uses the same blend (and the same T_j) as the next block's first convolution.
The 4 px to-RGB (latent 1) never uses the extrinsic path, as in the official code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.networks.stylegan2 import EqualLinear, Generator, GeneratorConfig, normalize_2nd_moment
from training.ops import bias_act

# Official defaults: ModRes convolutions start at 1% of their random init so the residual is negligible, and
# colour transforms start at the identity plus N(0, 0.01) noise on the raw (equalized-lr) weights.
MODRES_INIT_SCALE = 0.01
COLOUR_INIT_NOISE = 0.01
# nn.InstanceNorm2d's default epsilon, used by the official AdaptiveInstanceNorm.
INSTANCE_NORM_EPS = 1e-5
# Extrinsic weights of the official style_transfer.py / generate.py: 0.75 for structure, 1 for colour.
STRUCTURE_WEIGHT = 0.75
COLOUR_WEIGHT = 1.0


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DualStyleConfig:
    """Everything needed to rebuild a DualStyleGAN (saved as config.json next to the weights).

    Attributes:
        generator: the base StyleGAN2 configuration.
        res_index: the last latent index with a ModRes block (official `res_index`, default 6 = latents 0..6:
            4, 8, 16, 32 px). Must be even (the official code rounds it down with `res_index // 2 * 2`; here
            an odd value is an error instead) and at most num_ws - 2 (the last to-RGB always keeps a colour
            transform).
        structure_layers: FC layers of the shared extrinsic mapping in front of the ModRes blocks (official
            `self.style`: PixelNorm then `n_mlp - 6` = 2 EqualLinear with lr_mul 0.01 and leaky ReLU).
        structure_lr_mul: their equalized-lr multiplier.

    The official constructor's `twoRes` flag is unused in the official code and therefore not represented.
    """

    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig.rosinality(1024, 2))
    res_index: int = 6
    structure_layers: int = 2
    structure_lr_mul: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.generator, GeneratorConfig):
            raise ValueError("DualStyleConfig.generator must be a GeneratorConfig")
        n = self.generator.num_ws
        if not isinstance(self.res_index, int) or self.res_index % 2 or not 0 <= self.res_index <= n - 2:
            raise ValueError(f"res_index must be an even integer in 0..{n - 2} for {n} latents, got {self.res_index!r}")
        if not isinstance(self.structure_layers, int) or self.structure_layers < 0:
            raise ValueError(f"structure_layers must be a non-negative integer, got {self.structure_layers!r}")
        if not self.structure_lr_mul > 0:
            raise ValueError(f"structure_lr_mul must be positive, got {self.structure_lr_mul}")

    @property
    def num_ws(self) -> int:
        return self.generator.num_ws

    @property
    def w_dim(self) -> int:
        return self.generator.w_dim

    @property
    def z_dim(self) -> int:
        return self.generator.z_dim

    @property
    def structure_indices(self) -> range:
        """Latent indices with a ModRes block: 0..res_index."""
        return range(0, self.res_index + 1)

    @property
    def colour_indices(self) -> range:
        """Latent indices with a colour transform: res_index+1..num_ws-1."""
        return range(self.res_index + 1, self.num_ws)

    def modres_channels(self, j: int) -> int:
        """Feature maps at structure layer j (the output of the convolution it follows)."""
        res = 4 if j == 0 else 2 ** ((j + 1) // 2 + 2)
        return self.generator.channels_at(res)

    @classmethod
    def official(cls, size: int = 1024, channel_multiplier: int = 2, res_index: int = 6) -> "DualStyleConfig":
        """Config of the official `DualStyleGAN(size, 512, 8, channel_multiplier, res_index=res_index)`."""
        return cls(generator=GeneratorConfig.rosinality(size, channel_multiplier), res_index=res_index)

    def to_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.to_dict(), "res_index": self.res_index,
                "structure_layers": self.structure_layers, "structure_lr_mul": self.structure_lr_mul}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DualStyleConfig":
        if not isinstance(d, dict):
            raise ValueError("DualStyleConfig must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DualStyleConfig fields: {sorted(unknown)}")
        if "generator" not in d:
            raise ValueError("DualStyleConfig lacks 'generator'")
        d = dict(d)
        d["generator"] = GeneratorConfig.from_dict(d["generator"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Extrinsic path layers


class StructureMapping(nn.Module):
    """The shared extrinsic mapping in front of the ModRes blocks (official `style`): PixelNorm, then
    `structure_layers` EqualLinear(w_dim, w_dim, lr_mul 0.01) each followed by the fused leaky ReLU
    leaky_relu(x + b * lr_mul, 0.2) * sqrt(2). [N, w_dim] -> [N, w_dim]."""

    def __init__(self, w_dim: int, num_layers: int, lr_mul: float):
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", EqualLinear(w_dim, w_dim, lr_mul=lr_mul, act="lrelu"))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = normalize_2nd_moment(w)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x


class AdaptiveInstanceNorm(nn.Module):
    """Instance norm (no affine, eps 1e-5) followed by gamma * x + beta with (gamma, beta) = affine(s).

    `affine` is a plain nn.Linear(w_dim, 2 * C) as in the official code (no equalized learning rate); its bias
    starts at gamma = 1, beta = 0.
    """

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.channels = channels
        self.affine = nn.Linear(w_dim, 2 * channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.affine.reset_parameters()
        with torch.no_grad():
            self.affine.bias[: self.channels] = 1.0
            self.affine.bias[self.channels:] = 0.0

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # [N, C, H, W], [N, w_dim]
        gamma, beta = self.affine(s.to(x.dtype)).unsqueeze(2).unsqueeze(3).chunk(2, dim=1)  # [N, C, 1, 1] each
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = x - mean
        # Biased variance over the pixels, as nn.InstanceNorm2d.
        x = x * (x.square().mean(dim=(2, 3), keepdim=True) + INSTANCE_NORM_EPS).rsqrt()
        return gamma * x + beta


class ConvLayer(nn.Module):
    """rosinality ConvLayer(C, C, 3): equalized-lr 3x3 conv (zero padding 1, no conv bias) + fused leaky ReLU
    with its own bias: leaky_relu(conv(x) + b, 0.2) * sqrt(2)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.weight_gain = 1.0 / math.sqrt(channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:  # [N, C, H, W] -> [N, C, H, W]
        x = F.conv2d(x, (self.weight * self.weight_gain).to(x.dtype), padding=self.padding)
        return bias_act(x, self.bias.to(x.dtype), act="lrelu", impl=impl)


class AdaResBlock(nn.Module):
    """ModRes: out = conv1(norm1(conv0(norm0(x, s)), s)); return x + weight * out.

    This follows the official AdaResBlock exactly: there is no activation between a norm and the following
    conv (each ConvLayer ends in its own fused leaky ReLU). The official `if w == 0: return skip` shortcut is
    a data-dependent branch; here `x + 0 * out` gives the same bits for finite activations (the branch-free
    form keeps exported graphs static).
    """

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.channels = channels
        self.norm0 = AdaptiveInstanceNorm(channels, w_dim)
        self.conv0 = ConvLayer(channels)
        self.norm1 = AdaptiveInstanceNorm(channels, w_dim)
        self.conv1 = ConvLayer(channels)

    def forward(self, x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor | float = 1.0,
                impl: str = "auto") -> torch.Tensor:
        """x [N, C, H, W], s [N, w_dim] (the structure-mapped extrinsic latent), weight [N] or float."""
        out = self.conv0(self.norm0(x, s), impl)
        out = self.conv1(self.norm1(out, s), impl)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(x.dtype).reshape(-1, 1, 1, 1)
        return out * weight + x


# ----------------------------------------------------------------------------------------------------------
# The model


class DualStyleGAN(nn.Module):
    """The base Generator (`generator`) plus the extrinsic style path.

    Submodules:
        generator: training.networks.Generator (any config; rosinality-converted generators included).
        structure_mapping: StructureMapping, extrinsic W -> the latent that drives the ModRes AdaINs.
        modres: ModuleList of AdaResBlock, entry j for structure latent j = 0..res_index.
        colour_transform: ModuleList of EqualLinear(w_dim, w_dim) (lr_mul 1, no activation), entry k for
            colour latent j = res_index + 1 + k.

    In the official checkpoint these are `generator.*`, `style.*` and `res.{j}` (one list for both kinds);
    the key mapping lives in training.dualstyle.checkpoints.
    """

    def __init__(self, cfg: DualStyleConfig, generator: Generator | None = None):
        super().__init__()
        if generator is not None and generator.cfg != cfg.generator:
            raise ValueError("the given generator's config differs from DualStyleConfig.generator")
        self.cfg = cfg
        self.num_ws, self.w_dim, self.z_dim = cfg.num_ws, cfg.w_dim, cfg.z_dim
        self.res_index = cfg.res_index
        self.generator = generator if generator is not None else Generator(cfg.generator)
        self.structure_mapping = StructureMapping(cfg.w_dim, cfg.structure_layers, cfg.structure_lr_mul)
        self.modres = nn.ModuleList([AdaResBlock(cfg.modres_channels(j), cfg.w_dim) for j in cfg.structure_indices])
        self.colour_transform = nn.ModuleList([EqualLinear(cfg.w_dim, cfg.w_dim) for _ in cfg.colour_indices])
        self.init_extrinsic_path()

    @classmethod
    def from_generator(cls, generator: Generator, res_index: int = 6, structure_layers: int = 2,
                       structure_lr_mul: float = 0.01) -> "DualStyleGAN":
        """Wrap an existing (e.g. pretrained FFHQ) generator, used as is (not copied); the extrinsic path gets
        the official init from the torch global RNG."""
        cfg = DualStyleConfig(generator=generator.cfg, res_index=res_index, structure_layers=structure_layers,
                              structure_lr_mul=structure_lr_mul)
        return cls(cfg, generator)

    # ------------------------------------------------------------------------------------------------------
    # Initialisation and parameter groups

    @torch.no_grad()
    def init_extrinsic_path(self, modres_scale: float = MODRES_INIT_SCALE,
                            colour_noise: float = COLOUR_INIT_NOISE) -> None:
        """(Re)initialise the extrinsic path as the official constructor does, with adjustable scales.

        ModRes convolution weights become randn * modres_scale (official 0.01; 0 makes every ModRes block an
        exact identity), their biases 0; the AdaIN affines get nn.Linear's default init with gamma bias 1,
        beta bias 0. Colour transforms get raw weights eye * sqrt(w_dim) + randn * colour_noise (the runtime
        gain 1/sqrt(w_dim) makes eye * sqrt(w_dim) the identity; official noise 0.01) and zero bias. The
        structure mapping gets EqualLinear's init (raw N(0, 1) / lr_mul weights, zero bias). Uses the torch
        global RNG; the base generator is not touched.
        """
        for i in range(self.structure_mapping.num_layers):
            fc = getattr(self.structure_mapping, f"fc{i}")
            fc.weight.copy_(torch.randn_like(fc.weight) / fc.bias_gain)
            fc.bias.zero_()
        for block in self.modres:
            for conv in (block.conv0, block.conv1):
                conv.weight.copy_(torch.randn_like(conv.weight) * modres_scale)
                conv.bias.zero_()
            block.norm0.reset_parameters()
            block.norm1.reset_parameters()
        for t in self.colour_transform:
            eye = torch.eye(self.w_dim, dtype=t.weight.dtype, device=t.weight.device)
            t.weight.copy_(eye * math.sqrt(self.w_dim) + torch.randn_like(t.weight) * colour_noise)
            t.bias.zero_()

    def extrinsic_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the extrinsic path (structure mapping, ModRes, colour transforms): what the official
        Stage II / III optimisers train while the generator stays frozen."""
        for m in (self.structure_mapping, self.modres, self.colour_transform):
            yield from m.parameters()

    def res_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the official `res` list (ModRes + colour transforms; what its L2 regulariser sums)."""
        yield from self.modres.parameters()
        yield from self.colour_transform.parameters()

    # ------------------------------------------------------------------------------------------------------
    # Codes

    def map_intrinsic(self, z: torch.Tensor, psi: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Intrinsic code -> ws, truncated towards 0 as the official scripts do (`truncation_latent=0`).

        The official forward computes `truncation_latent + psi * (w - truncation_latent)` with
        truncation_latent = 0, i.e. ws = psi * w, never towards w_avg.

        Args:
            z: [N, z_dim] (one z for every layer) or z+ [N, num_ws, z_dim] (mapped layer by layer).
            psi: float or [N] tensor.
        Returns:
            ws [N, num_ws, w_dim] float32.
        """
        ws = self._map(z, "intrinsic code")
        if isinstance(psi, (int, float)):
            return ws if psi == 1 else ws * psi
        return ws * psi.to(ws.dtype).reshape(-1, 1, 1)

    def map_extrinsic(self, exstyle: torch.Tensor) -> torch.Tensor:
        """Extrinsic z+ code (e.g. an `exstyle_code.npy` entry) -> exstyle_w through the base mapping network
        layer by layer, without truncation (what the official style_transfer.py does before calling the model).

        Args:
            exstyle: [N, num_ws, z_dim] (or [N, z_dim]).
        Returns:
            exstyle_w [N, num_ws, w_dim] float32.
        """
        return self._map(exstyle, "extrinsic code")

    def _map(self, z: torch.Tensor, what: str) -> torch.Tensor:
        if z.ndim == 2 and z.shape[1] == self.z_dim:
            w = self.generator.mapping(z)  # [N, w_dim]
            return w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if z.ndim == 3 and z.shape[1:] == (self.num_ws, self.z_dim):
            n = z.shape[0]
            return self.generator.mapping(z.reshape(n * self.num_ws, self.z_dim)).reshape(n, self.num_ws, self.w_dim)
        raise ValueError(f"{what} must have shape [N, {self.z_dim}] or [N, {self.num_ws}, {self.z_dim}], "
                         f"got {tuple(z.shape)}")

    def default_weights(self) -> list[float]:
        return default_weights(self.cfg)

    # ------------------------------------------------------------------------------------------------------
    # Forward

    def forward(self, ws: torch.Tensor, exstyle_w: torch.Tensor | None = None,
                weights: torch.Tensor | Sequence[float] | None = None, *, use_res: bool = True,
                fuse_index: int | None = None, noise_mode: str = "const", impl: str = "auto") -> torch.Tensor:
        """Synthesise with both style paths (official DualStyleGAN.forward after mapping and truncation).

        Args:
            ws: [N, num_ws, w_dim] intrinsic latents, already mapped and truncated (see map_intrinsic).
            exstyle_w: [N or 1, num_ws, w_dim] (or [N or 1, w_dim]) extrinsic latents in W (map_extrinsic);
                required when use_res.
            weights: per-layer extrinsic weights, [num_ws] or [N, num_ws] tensor or a sequence of num_ws
                floats; None = default_weights ([0.75] * (res_index + 1) + [1] * rest, the official inference
                scripts' default). The official forward's own default, which its training scripts use, is all
                ones: pass torch.ones(num_ws) to reproduce training.
            use_res: False gives exactly the base generator on ws.
            fuse_index: layers j > fuse_index skip the extrinsic path (None = num_ws, all). As in the official
                code layer 0 needs fuse_index >= 1.
            noise_mode: "const" (stored noise buffers, the default here; the official scripts draw random
                noise), "random" or "none".
            impl: ops implementation, "ref" | "cuda" | "auto".
        Returns:
            img [N, img_channels, R, R] in ws's dtype, nominally in [-1, 1].
        """
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        if not use_res:
            return self.generator.synthesis(ws, noise_mode=noise_mode, impl=impl)
        if exstyle_w is None:
            raise ValueError("exstyle_w is required when use_res=True")
        exstyle_w = self._check_exstyle(exstyle_w).to(ws.dtype)
        weights = self._check_weights(weights, ws)  # [N or 1, num_ws]
        fuse = self.num_ws if fuse_index is None else int(fuse_index)
        r = self.res_index

        # The structure-mapped extrinsic latents drive the ModRes AdaINs: [N, res_index + 1, w_dim].
        n_ex = exstyle_w.shape[0]
        structure = self.structure_mapping(exstyle_w[:, : r + 1].reshape(n_ex * (r + 1), self.w_dim))
        structure = structure.reshape(n_ex, r + 1, self.w_dim)

        def fused(j: int) -> bool:
            return fuse >= j if j > 0 else fuse > 0

        def latent(j: int) -> torch.Tensor:
            # Colour layers blend the transformed extrinsic latent with the intrinsic one.
            if j > r and fused(j):
                wj = weights[:, j: j + 1]  # [N, 1]
                return wj * self.colour_transform[j - r - 1](exstyle_w[:, j]) + (1 - wj) * ws[:, j]
            return ws[:, j]

        def modres(x: torch.Tensor, j: int) -> torch.Tensor:
            if j <= r and fused(j):
                return self.modres[j](x, structure[:, j], weights[:, j], impl)
            return x

        blocks = self.generator.synthesis.blocks()
        b4 = blocks[0]
        x = b4.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)  # [N, C4, 4, 4]
        x = modres(b4.conv1(x, ws[:, 0], noise_mode, impl), 0)
        img = b4.torgb(x, ws[:, 1], skip=None, impl=impl)  # the official to_rgb1 never reads the extrinsic path
        j = 1
        for block in blocks[1:]:
            x = modres(block.conv0(x, latent(j), noise_mode, impl), j)
            x = modres(block.conv1(x, latent(j + 1), noise_mode, impl), j + 1)
            img = block.torgb(x, latent(j + 2), skip=img, impl=impl)
            j += 2
        return img

    def stylize(self, instyle: torch.Tensor, exstyle: torch.Tensor, psi: float | torch.Tensor = 1.0,
                weights: torch.Tensor | Sequence[float] | None = None, preserve_colour: bool = False,
                **kw: Any) -> torch.Tensor:
        """The official style_transfer.py pipeline: codes in Z/Z+ -> image.

        Args:
            instyle: intrinsic [N, z_dim] or z+ [N, num_ws, z_dim] (e.g. from a pSp encoder).
            exstyle: extrinsic z+ [N or 1, num_ws, z_dim] (an exstyle_code.npy entry).
            psi: truncation of the intrinsic code towards 0.
            weights: see forward.
            preserve_colour: take the colour latents (> res_index) of the extrinsic code from the intrinsic z+
                (the official --preserve_color; instyle must be z+).
            **kw: use_res, fuse_index, noise_mode, impl (see forward).
        Returns:
            img [N, img_channels, R, R].
        """
        if preserve_colour:
            exstyle = preserve_colour_codes(exstyle, instyle, self.cfg)
        return self(self.map_intrinsic(instyle, psi), self.map_extrinsic(exstyle), weights, **kw)

    def _check_exstyle(self, exstyle_w: torch.Tensor) -> torch.Tensor:
        if exstyle_w.ndim == 2 and exstyle_w.shape[1] == self.w_dim:
            return exstyle_w.unsqueeze(1).expand(-1, self.num_ws, -1)
        if exstyle_w.ndim != 3 or exstyle_w.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"exstyle_w must have shape [N, {self.num_ws}, {self.w_dim}] or [N, {self.w_dim}], "
                             f"got {tuple(exstyle_w.shape)}")
        return exstyle_w

    def _check_weights(self, weights: torch.Tensor | Sequence[float] | None, ws: torch.Tensor) -> torch.Tensor:
        if weights is None:
            weights = default_weights(self.cfg)
        t = torch.as_tensor(weights, dtype=ws.dtype, device=ws.device)
        if t.ndim == 1 and t.shape[0] == self.num_ws:
            return t.unsqueeze(0)
        if t.ndim == 2 and t.shape[1] == self.num_ws and t.shape[0] in (1, ws.shape[0]):
            return t
        raise ValueError(f"weights must have shape [{self.num_ws}] or [N, {self.num_ws}], got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Weight and code helpers


def default_weights(cfg: DualStyleConfig) -> list[float]:
    """[0.75] * (res_index + 1) + [1.0] * (num_ws - res_index - 1): the official [0.75]*7 + [1]*11 at 1024 px."""
    return [STRUCTURE_WEIGHT] * (cfg.res_index + 1) + [COLOUR_WEIGHT] * (cfg.num_ws - cfg.res_index - 1)


def colour_only_weights(cfg: DualStyleConfig, weights: Sequence[float] | None = None) -> list[float]:
    """Colour-only transfer: the structure weights (latents 0..res_index) set to 0, colour ones kept."""
    w = list(default_weights(cfg) if weights is None else weights)
    if len(w) != cfg.num_ws:
        raise ValueError(f"weights must list {cfg.num_ws} values, got {len(w)}")
    return [0.0] * (cfg.res_index + 1) + [float(v) for v in w[cfg.res_index + 1:]]


def structure_only_weights(cfg: DualStyleConfig, weights: Sequence[float] | None = None) -> list[float]:
    """Structure-only by weights: the colour weights set to 0 (colour layers read the truncated intrinsic
    latents). The official --preserve_color instead swaps codes, see preserve_colour_codes."""
    w = list(default_weights(cfg) if weights is None else weights)
    if len(w) != cfg.num_ws:
        raise ValueError(f"weights must list {cfg.num_ws} values, got {len(w)}")
    return [float(v) for v in w[: cfg.res_index + 1]] + [0.0] * (cfg.num_ws - cfg.res_index - 1)


def preserve_colour_codes(exstyle: torch.Tensor, instyle: torch.Tensor, cfg: DualStyleConfig) -> torch.Tensor:
    """Structure-only transfer as the official style_transfer.py --preserve_color: the extrinsic code's colour
    latents (res_index + 1 .. num_ws - 1; 7..17 at 1024 px) replaced by the intrinsic ones.

    Args:
        exstyle: [N or 1, num_ws, D] extrinsic code.
        instyle: [N, num_ws, D] intrinsic code in the same space (both z+, or both untruncated W+).
    Returns:
        [N, num_ws, D] new tensor (the inputs are not modified).
    """
    if exstyle.ndim != 3 or instyle.ndim != 3 or exstyle.shape[1:] != instyle.shape[1:] \
            or exstyle.shape[1] != cfg.num_ws:
        raise ValueError(f"preserve_colour needs [N, {cfg.num_ws}, D] codes of one shape, got "
                         f"{tuple(exstyle.shape)} and {tuple(instyle.shape)}")
    c = cfg.res_index + 1
    return torch.cat([exstyle[:, :c].expand(instyle.shape[0], -1, -1), instyle[:, c:].to(exstyle.dtype)], dim=1)
