"""Network blending of StyleGAN2 generators (Pinkney & Adler, "Resolution Dependent GAN Interpolation for
Controllable Image Synthesis Between Domains", 2020): layer swapping by resolution, the soft sigmoid switch,
whole-model interpolation and per-resolution blends of more than two models.

Layer order and switch semantics (those of Pinkney's `blend_models`, stated for our module names):

* Synthesis layers are ordered by (resolution, level); the position of a layer is
  ``2 * (log2(res) - 2) + level``.
  - level 0: ``synthesis.b4.const`` at 4 px, ``synthesis.b{res}.conv0`` (the upsampling conv) for res >= 8;
  - level 1: ``synthesis.b{res}.conv1`` and ``synthesis.b{res}.torgb`` (to-RGB shares the position of the
    second conv of its resolution).
  So at 1024 px: b4.const = 0, b4.conv1 = b4.torgb = 1, b8.conv0 = 2, b8.conv1 = b8.torgb = 3, ...
* A switch point (res, level) has position ``p = 2 * (log2(res) - 2) + level``; a layer at position q has
  ``x = q - p``.
  - hard switch: the layer comes from `other` iff ``x > 1`` (so every layer of the switch resolution, and
    below it, comes from `base`; with level 1 the next resolution's conv0 also comes from `base`);
  - soft switch (``blend_width = W > 0``): ``y = sigmoid(x / W)`` and the layer is
    ``lerp(base, other, y)`` (y = 0.5 exactly at the switch layer; the official code centres the soft switch
    on x = 0 but the hard one on x > 1, and we keep both as they are).
* `base` is Pinkney's model 1 (``low_res_pkl``): it supplies the low-resolution layers and everything that is
  not a synthesis layer: the mapping network and w_avg (unless ``mapping="other"``), the constant noise
  buffers and the resample filters. `other` is model 2 (``high_res_pkl``). Toonify (REFERENCE.md):
  ``base`` = the cartoon-finetuned model, ``other`` = the FFHQ original, switch at 32 px.
* ``torgb="follow"`` (the official behaviour) blends each to-RGB layer like the conv1 of its resolution;
  ``"base"`` / ``"other"`` take every to-RGB layer from one model.
* One deviation, documented: TF StyleGAN2 names the 4 px conv ``4x4/Conv``, which the official prefix list
  (``Conv1``) does not match, so there that conv always comes from model 1. We give ``b4.conv1`` level 1
  (as the stylegan2-ada-pytorch port of blend_models does). Under the hard switch this never differs
  (x <= 1 for position 1); under the soft switch b4.conv1 gets sigmoid((1 - p) / W) like b4.torgb.

Every parameter of a layer (weight, bias, affine, noise_strength) takes the layer's weight. Weights 0 and 1
copy the tensor bit for bit; other weights use ``torch.lerp``, so blending a model with itself is the
identity for every mode.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from training.networks.stylegan2 import Generator, GeneratorConfig

# Config fields that must match for blending; the others take the base model's value (with a warning).
STRUCTURAL_FIELDS = ("resolution", "z_dim", "w_dim", "mapping_layers", "mapping_lr_mul", "channels",
                     "img_channels", "blur_kernel")
SOFT_FIELDS = ("conv_clamp", "w_avg_beta")
MAPPING_CHOICES = ("base", "other", "interp")
TORGB_CHOICES = ("follow", "base", "other")


@dataclass(frozen=True)
class LayerSlot:
    """One synthesis layer in blending order."""

    name: str  # module prefix, e.g. "synthesis.b32.conv0"
    resolution: int
    level: int  # 0 or 1
    kind: str  # "const" | "conv" | "torgb"

    @property
    def position(self) -> int:
        return layer_position(self.resolution, self.level)


def layer_position(resolution: int, level: int) -> int:
    """Position of (resolution, level) in blending order: 2 * (log2(res) - 2) + level."""
    return 2 * (int(math.log2(resolution)) - 2) + level


def synthesis_layers(cfg: GeneratorConfig) -> list[LayerSlot]:
    """All synthesis layers of cfg in blending order (low resolution first)."""
    out: list[LayerSlot] = []
    for res in cfg.resolutions:
        if res == 4:
            out.append(LayerSlot("synthesis.b4.const", 4, 0, "const"))
        else:
            out.append(LayerSlot(f"synthesis.b{res}.conv0", res, 0, "conv"))
        out.append(LayerSlot(f"synthesis.b{res}.conv1", res, 1, "conv"))
        out.append(LayerSlot(f"synthesis.b{res}.torgb", res, 1, "torgb"))
    return out


def check_switch_point(cfg: GeneratorConfig, resolution: int, level: int) -> None:
    if resolution not in cfg.resolutions:
        raise ValueError(f"switch resolution {resolution} is not one of the model's resolutions "
                         f"{cfg.resolutions}")
    if level not in (0, 1):
        raise ValueError(f"level must be 0 or 1, got {level}")


def switch_weights(cfg: GeneratorConfig, resolution: int, level: int = 0, blend_width: float | None = None,
                   torgb: str = "follow") -> dict[str, float]:
    """Weight of the `other` model for each synthesis layer (module prefix -> y in [0, 1]).

    Args:
        cfg: the (shared) generator config.
        resolution, level: the switch point.
        blend_width: None for the hard switch (y = 1 iff x > 1), else W > 0 for y = sigmoid(x / W).
        torgb: "follow" (official), "base" (y = 0) or "other" (y = 1) for every to-RGB layer.
    """
    check_switch_point(cfg, resolution, level)
    if torgb not in TORGB_CHOICES:
        raise ValueError(f"torgb must be one of {TORGB_CHOICES}, got {torgb!r}")
    if blend_width is not None and not (math.isfinite(blend_width) and blend_width > 0):
        raise ValueError(f"blend width must be a positive number, got {blend_width}")
    p = layer_position(resolution, level)
    out: dict[str, float] = {}
    for slot in synthesis_layers(cfg):
        x = slot.position - p
        if slot.kind == "torgb" and torgb != "follow":
            y = 0.0 if torgb == "base" else 1.0
        elif blend_width is None:
            y = 1.0 if x > 1 else 0.0
        else:
            y = 1.0 / (1.0 + math.exp(-x / blend_width))
        out[slot.name] = y
    return out


# ----------------------------------------------------------------------------------------------------------
# Compatibility


def check_compatible(models: Sequence[Generator], names: Sequence[str] | None = None) -> GeneratorConfig:
    """Raise ValueError naming every differing config field; returns the config of the output (the first's).

    Structural fields (resolution, channels, w_dim, ...) must match. conv_clamp and w_avg_beta may differ:
    the output takes the first model's value, with a warning.
    """
    names = list(names or [f"model {i}" for i in range(len(models))])
    ref = models[0].cfg
    diffs: list[str] = []
    soft: list[str] = []
    for name, G in zip(names[1:], models[1:]):
        for f in STRUCTURAL_FIELDS:
            a, b = getattr(ref, f), getattr(G.cfg, f)
            if a != b:
                diffs.append(f"{f}: {_fmt(a)} ({names[0]}) vs {_fmt(b)} ({name})")
        for f in SOFT_FIELDS:
            a, b = getattr(ref, f), getattr(G.cfg, f)
            if a != b:
                soft.append(f"{f} {_fmt(a)} vs {_fmt(b)} ({name})")
    if diffs:
        raise ValueError("cannot blend: the architectures differ: " + "; ".join(diffs))
    if soft:
        warnings.warn("blend: " + ", ".join(soft) + f"; the output uses the values of {names[0]}",
                      RuntimeWarning, stacklevel=2)
    return ref


def _fmt(v: object) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v)


# ----------------------------------------------------------------------------------------------------------
# Combining state dicts


def _layer_of(key: str, slots: Sequence[LayerSlot]) -> LayerSlot | None:
    for s in slots:
        if key == s.name or key.startswith(s.name + "."):
            return s
    return None


def _mix(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted combination; one-hot weights copy bit for bit, equal tensors give themselves back exactly.

    A running lerp (out = lerp(out, t_i, w_i / (w_0 + ... + w_i))) computes sum_i w_i t_i for normalised
    weights without ever multiplying a kept tensor by a weight that is not exactly 1.
    """
    nz = [(t, float(w)) for t, w in zip(tensors, weights) if w != 0]
    if not nz:
        raise ValueError("all blend weights of a layer are zero")
    if len(nz) == 2 and math.isclose(nz[0][1] + nz[1][1], 1.0, rel_tol=0, abs_tol=1e-12):
        return torch.lerp(nz[0][0], nz[1][0], nz[1][1])
    out, total = nz[0][0].clone(), nz[0][1]
    for t, w in nz[1:]:
        total += w
        out = torch.lerp(out, t, w / total)
    return out


def combine(models: Sequence[Generator], layer_weights: Mapping[str, Sequence[float]], mapping_from: int = 0,
            noise_from: int = 0, mapping_weights: Sequence[float] | None = None,
            names: Sequence[str] | None = None) -> Generator:
    """The general blend: every synthesis layer mixes the models with its own (normalised) weights.

    Args:
        models: generators with compatible configs (see check_compatible).
        layer_weights: module prefix of every synthesis layer (synthesis_layers) -> one weight per model.
        mapping_from: index of the model that supplies the mapping network and w_avg.
        noise_from: index of the model that supplies the constant noise buffers and resample filters.
        mapping_weights: if given, the mapping network is mixed with these weights instead; w_avg is then
            re-estimated from the mixed mapping (unless that equals the mapping_from model's bit for bit).
    Returns:
        A new Generator (eval mode, requires_grad False) with the base model's config.
    """
    if not models:
        raise ValueError("no models to blend")
    cfg = check_compatible(models, names)
    slots = synthesis_layers(cfg)
    missing = [s.name for s in slots if s.name not in layer_weights]
    if missing:
        raise ValueError(f"blend weights missing for layers {missing[:4]}{'...' if len(missing) > 4 else ''}")
    n = len(models)
    norm: dict[str, list[float]] = {}
    for name, ws in layer_weights.items():
        norm[name] = normalise_weights(ws, n, name)
    sds = [G.state_dict() for G in models]
    out_G = Generator(cfg)
    out_sd: dict[str, torch.Tensor] = {}
    for key in out_G.state_dict():
        tensors = [sd[key].detach().cpu() for sd in sds]
        if key.startswith("mapping."):
            if mapping_weights is not None and key != "mapping.w_avg":
                out_sd[key] = _mix(tensors, normalise_weights(mapping_weights, n, "mapping"))
            else:
                out_sd[key] = tensors[mapping_from].clone()
            continue
        if key.endswith(("noise_const", "resample_filter")):
            out_sd[key] = tensors[noise_from].clone()
            continue
        slot = _layer_of(key, slots)
        if slot is None:
            raise RuntimeError(f"blend: {key} belongs to no synthesis layer")  # a network change we missed
        out_sd[key] = _mix(tensors, norm[slot.name])
    if mapping_weights is not None:
        base_map = {k: v for k, v in sds[mapping_from].items() if k.startswith("mapping.fc")}
        if not all(torch.equal(out_sd[k], v.cpu()) for k, v in base_map.items()):
            from training.checkpoints import estimate_w_avg
            out_sd["mapping.w_avg"] = estimate_w_avg(out_G, out_sd)
    out_G.load_state_dict(out_sd)
    return out_G.eval().requires_grad_(False)


def normalise_weights(ws: Sequence[float], n: int, what: str) -> list[float]:
    ws = [float(w) for w in ws]
    if len(ws) != n:
        raise ValueError(f"{what}: {len(ws)} weights given for {n} models")
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"{what}: weights must be finite and >= 0, got {ws}")
    s = math.fsum(ws)
    if s <= 0:
        raise ValueError(f"{what}: weights sum to zero")
    if abs(s - 1.0) <= 1e-12:
        return ws  # already normalised: keep the exact values (e.g. (1 - y, y) of a switch blend)
    return [w / s for w in ws]


# ----------------------------------------------------------------------------------------------------------
# The three public blends


def blend_models(base: Generator, other: Generator, resolution: int, level: int = 0,
                 blend_width: float | None = None, mapping: str = "base", torgb: str = "follow",
                 names: Sequence[str] = ("base", "other")) -> Generator:
    """Pinkney's layer swap: low resolutions from `base`, high resolutions from `other` (module docstring).

    Args:
        base: model 1: layers up to the switch point, noise buffers, and the mapping network + w_avg unless
            mapping="other". Toonify: the cartoon-finetuned model.
        other: model 2: layers past the switch point. Toonify: the FFHQ original.
        resolution, level: switch point (level 0 = const/conv0, 1 = conv1 + to-RGB).
        blend_width: None = hard switch, W > 0 = soft switch y = sigmoid(x / W).
        mapping: "base" (official) or "other".
        torgb: "follow" (official), "base" or "other".
    Returns:
        A new eval-mode Generator.
    """
    if mapping not in ("base", "other"):
        raise ValueError(f"mapping must be 'base' or 'other' for a switch blend, got {mapping!r}")
    check_compatible([base, other], names)
    ys = switch_weights(base.cfg, resolution, level, blend_width, torgb)
    # (1 - y, y) pairs; _mix turns them into lerp(base, other, y), exact copies at y = 0 and 1.
    return combine([base, other], {k: (1.0 - y, y) for k, y in ys.items()},
                   mapping_from=0 if mapping == "base" else 1, noise_from=0, names=names)


def interpolate_models(base: Generator, other: Generator, alpha: float, mapping: str = "base",
                       names: Sequence[str] = ("base", "other")) -> Generator:
    """Whole-model interpolation: every synthesis parameter is lerp(base, other, alpha).

    mapping: "base" / "other" take that model's mapping network and w_avg; "interp" interpolates the mapping
    weights too (w_avg then re-estimated over 10,000 fixed seeds). Noise buffers come from base.
    """
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if mapping not in MAPPING_CHOICES:
        raise ValueError(f"mapping must be one of {MAPPING_CHOICES}, got {mapping!r}")
    check_compatible([base, other], names)
    ws = {s.name: (1.0 - alpha, alpha) for s in synthesis_layers(base.cfg)}
    return combine([base, other], ws, mapping_from=1 if mapping == "other" else 0, noise_from=0,
                   mapping_weights=(1.0 - alpha, alpha) if mapping == "interp" else None, names=names)


def blend_many(models: Sequence[Generator], resolution_weights: Mapping[int, Sequence[float]],
               mapping_from: int = 0, names: Sequence[str] | None = None) -> Generator:
    """Blend N models with one weight vector per resolution (all layers of a resolution share it).

    Weights are normalised per layer; the mapping network, w_avg and noise buffers come from
    models[mapping_from].
    """
    if len(models) < 2:
        raise ValueError("blending by weights needs at least two models")
    if not 0 <= mapping_from < len(models):
        raise ValueError(f"mapping model index must be in 0..{len(models) - 1}")
    cfg = check_compatible(models, names)
    missing = [r for r in cfg.resolutions if r not in resolution_weights]
    if missing:
        raise ValueError(f"blend weights missing for resolutions {missing} (give every resolution "
                         f"{cfg.resolutions} or a '*' default)")
    extra = sorted(set(resolution_weights) - set(cfg.resolutions))
    if extra:
        raise ValueError(f"blend weights given for resolutions {extra} the models do not have "
                         f"({cfg.resolutions})")
    ws = {s.name: resolution_weights[s.resolution] for s in synthesis_layers(cfg)}
    return combine(models, ws, mapping_from=mapping_from, noise_from=mapping_from, names=names)


def parse_resolution_weights(spec: str, n_models: int, resolutions: Sequence[int]) -> dict[int, list[float]]:
    """Parse "4:1,0,0;8:1,0,0;16:0,1,0;*:0,0,1" or a JSON file {"4": [1,0,0], ..., "*": [...]}.

    Returns a weight list per resolution in `resolutions` ('*' fills the unlisted ones). Weights are checked
    (count, finite, >= 0, non-zero sum) but not normalised here.
    """
    raw: dict[str, list[float]]
    p = Path(spec)
    if spec.strip().endswith(".json") or (len(spec) < 4096 and p.is_file()):
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"weights file not found: {p}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: not a valid JSON weights file ({exc})") from None
        if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
            raise ValueError(f"{p}: expected an object mapping resolution -> list of weights")
        raw = {str(k): v for k, v in doc.items()}
    else:
        raw = {}
        for part in spec.replace(" ", "").split(";"):
            if not part:
                continue
            key, sep, vals = part.partition(":")
            if not sep:
                raise ValueError(f"invalid weights entry {part!r}: use RES:w1,w2,... e.g. 16:0,1,0")
            if key in raw:
                raise ValueError(f"resolution {key} listed twice in weights")
            try:
                raw[key] = [float(v) for v in vals.split(",")]
            except ValueError:
                raise ValueError(f"invalid weights entry {part!r}: weights must be numbers") from None
    out: dict[int, list[float]] = {}
    default = raw.pop("*", None)
    for key, vals in raw.items():
        try:
            res = int(key)
        except ValueError:
            raise ValueError(f"invalid resolution {key!r} in weights (use e.g. 16, or * for the rest)") from None
        if res in out:
            raise ValueError(f"resolution {res} listed twice in weights")
        out[res] = vals
    if default is not None:
        for r in resolutions:
            out.setdefault(r, default)
    for res, vals in out.items():
        normalise_weights(vals, n_models, f"weights at {res} px")
    return out


__all__ = ["LayerSlot", "MAPPING_CHOICES", "STRUCTURAL_FIELDS", "TORGB_CHOICES", "blend_many", "blend_models",
           "check_compatible", "check_switch_point", "combine",
           "interpolate_models", "layer_position", "normalise_weights", "parse_resolution_weights",
           "switch_weights", "synthesis_layers"]
