"""StyleGAN-NADA's CLIP losses (Gal et al., "StyleGAN-NADA: CLIP-Guided Domain Adaptation of Image
Generators", SIGGRAPH 2022): directional, global, patch-directional and manifold-angle terms, image-guided
targets, and optional drift regularisers.

All CLIP embeddings here are unit-normalised. With per-model loss weights a_m and term weights lambda_k the
objective is

    L = sum_m a_m * (l_dir * L_dir + l_glob * L_glob + l_patch * L_patch + l_man * L_man + l_id * L_id)
        + l_l2 * L_l2

- L_dir (directional): the text direction is
  dT = normalize(mean_t normalize(E_T(t(target))) - mean_t normalize(E_T(t(source)))) over the 79 ImageNet
  templates t; per sample dI = normalize(normalize(E_I(G_train(w))) - normalize(E_I(G_frozen(w))));
  L_dir = mean_n (1 - cos(dI_n, dT)).
- L_glob (global): mean_n (1 - cos(E_I(G_train(w)), E_T("a {target}"))). The official code computes
  1 - logits / 100 with CLIP's logits = logit_scale * cos; for OpenAI CLIP (logit_scale = 100) that is the
  same number, and 1 - cos keeps the meaning for models with another scale.
- L_patch (patch directional): one random square patch per sample (510 / 1024 of the image side, the same
  crop in both images) is encoded; its edit direction dP is compared with one text direction per part
  prompt p (each built like dT from the prompts t(p(source)) / t(p(target))):
  L_patch = mean_{n,p} (1 - cos(dP_n, dT_p)) * softmax_p(dP_n . dT_p), as in the official implementation.
- L_man (manifold angle): mean_n |cos(E_I(G_frozen), E_I(G_train)) - cos(a_src, a_tgt)| where a_src / a_tgt
  are the normalised template means of the source / target text (an L1 between angle cosines, as the
  official `clip_angle_loss`).
- Image-guided targets: the target anchor is the mean normalised embedding of the style images and the
  source anchor the mean normalised embedding of images from the frozen generator (official), or the source
  text; the direction is normalize(target anchor - source anchor). With a target text as well, directions
  and anchors are blended: normalize((1 - a) * image + a * text).
- Regularisers (ours, default off): L_id = mean_n (1 - cos(E_I(G_train(w)), E_I(G_frozen(w)))) keeps the
  CLIP content (an ArcFace identity loss needs weights we cannot ship); L_l2 = mean((G_train(w) -
  G_frozen(w))^2) in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .clip import ClipBank, ClipEncoder
from .templates import IMAGENET_TEMPLATES, PART_TEMPLATES, compose

PATCH_FRACTION = 510 / 1024  # the official patch side at 1024 px, scaled to other resolutions


@dataclass(frozen=True)
class LossWeights:
    """Weights lambda_k of the loss terms (official defaults: direction 1, the rest 0)."""

    direction: float = 1.0
    global_clip: float = 0.0
    patch: float = 0.0
    manifold: float = 0.0
    identity: float = 0.0
    l2: float = 0.0

    def __post_init__(self) -> None:
        for name, value in self.items():
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value}")
        if not any(v > 0 for _, v in self.items()):
            raise ValueError("all loss weights are 0: nothing to train")

    def items(self) -> list[tuple[str, float]]:
        return [("direction", self.direction), ("global", self.global_clip), ("patch", self.patch),
                ("manifold", self.manifold), ("identity", self.identity), ("l2", self.l2)]


# ----------------------------------------------------------------------------------------------------------
# The formulas, on embeddings


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / ||x|| along the last dim (eps guards exact zeros only)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def text_direction(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """[T, D] source and target template embeddings -> unit direction [D] (mean of normalised differences)."""
    return unit((unit(tgt) - unit(src)).mean(dim=0))


def edit_directions(f_src: torch.Tensor, f_tgt: torch.Tensor) -> torch.Tensor:
    """Per-sample image edit directions [N, D] = normalize(normalize(f_tgt) - normalize(f_src))."""
    return unit(unit(f_tgt) - unit(f_src))


def directional_loss(f_src: torch.Tensor, f_tgt: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """mean_n (1 - cos(normalize(f_tgt_n - f_src_n), direction)); f_* [N, D], direction [D] or [N, D]."""
    return (1.0 - (edit_directions(f_src, f_tgt) * unit(direction)).sum(dim=-1)).mean()


def global_loss(f_img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_n (1 - cos(f_img_n, target)); f_img [N, D], target [D]."""
    return (1.0 - (unit(f_img) * unit(target)).sum(dim=-1)).mean()


def manifold_angle_loss(f_src: torch.Tensor, f_tgt: torch.Tensor, anchor_src: torch.Tensor,
                        anchor_tgt: torch.Tensor) -> torch.Tensor:
    """mean_n |cos(f_src_n, f_tgt_n) - cos(anchor_src, anchor_tgt)| (cosines clamped to [-1, 1])."""
    cos_img = (unit(f_src) * unit(f_tgt)).sum(dim=-1).clamp(-1.0, 1.0)
    cos_txt = (unit(anchor_src) * unit(anchor_tgt)).sum(dim=-1).clamp(-1.0, 1.0)
    return (cos_img - cos_txt).abs().mean()


def patch_directional_loss(f_src: torch.Tensor, f_tgt: torch.Tensor, part_directions: torch.Tensor) -> torch.Tensor:
    """Patch edit directions [N, D] against part text directions [P, D], softmax-weighted (see module doc)."""
    d = edit_directions(f_src, f_tgt)  # [N, D]
    sim = d @ unit(part_directions).t()  # [N, P]
    return ((1.0 - sim) * sim.softmax(dim=-1)).mean()


def identity_loss(f_src: torch.Tensor, f_tgt: torch.Tensor) -> torch.Tensor:
    """mean_n (1 - cos(f_src_n, f_tgt_n))."""
    return (1.0 - (unit(f_src) * unit(f_tgt)).sum(dim=-1)).mean()


def random_patch_centers(n: int, height: int, width: int, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """[n, 2] (x, y) centres of size x size patches that lie inside the image."""
    half = size // 2
    xs = torch.randint(half, max(half + 1, width - half + 1), (n,), generator=gen)
    ys = torch.randint(half, max(half + 1, height - half + 1), (n,), generator=gen)
    return torch.stack([xs, ys], dim=1)


def crop_patches(img: torch.Tensor, centers: torch.Tensor, size: int) -> torch.Tensor:
    """img [N, C, H, W], centres [N, 2] -> patches [N, C, 2*(size//2), 2*(size//2)]."""
    half = size // 2
    return torch.cat([img[i: i + 1, :, int(y) - half: int(y) + half, int(x) - half: int(x) + half]
                      for i, (x, y) in enumerate(centers.tolist())], dim=0)


# ----------------------------------------------------------------------------------------------------------
# Targets per CLIP model


@dataclass
class ModelTargets:
    """What one CLIP model compares against: the direction, the anchors, the global target, part directions."""

    direction: torch.Tensor  # [D] unit
    anchor_src: torch.Tensor  # [D] unit
    anchor_tgt: torch.Tensor  # [D] unit
    global_target: torch.Tensor | None  # [D] unit
    part_directions: torch.Tensor | None  # [P, D] unit


def _blend(a: torch.Tensor, b: torch.Tensor, weight_b: float) -> torch.Tensor:
    return unit((1.0 - weight_b) * unit(a) + weight_b * unit(b))


@torch.no_grad()
def text_anchor(enc: ClipEncoder, text: str, templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """Mean of the normalised template embeddings of text, [D] (not re-normalised)."""
    return enc.encode_text(compose(text, tuple(templates))).mean(dim=0)


@torch.no_grad()
def image_anchor(enc: ClipEncoder, pil_images: Sequence[Any], chunk: int = 32) -> torch.Tensor:
    """Mean normalised CLIP embedding of PIL images (CLIP's own PIL preprocessing), [D]."""
    feats = []
    for i in range(0, len(pil_images), chunk):
        x = torch.stack([enc.preprocess_pil(im) for im in pil_images[i: i + chunk]]).to(enc.device)
        feats.append(enc.encode_preprocessed(x))
    return torch.cat(feats).mean(dim=0)


@torch.no_grad()
def generated_anchor(enc: ClipEncoder, images: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Mean normalised CLIP embedding of generator images [K, 3, R, R] in [-1, 1], [D]."""
    return torch.cat([enc.encode_images(images[i: i + chunk]) for i in range(0, len(images), chunk)]).mean(dim=0)


@torch.no_grad()
def build_targets(enc: ClipEncoder, source: str, target: str | None, *, style_images: Sequence[Any] | None = None,
                  source_images: torch.Tensor | None = None, style_text_weight: float = 0.0,
                  style_source: str = "generator", need_parts: bool = False) -> ModelTargets:
    """Directions and anchors for one CLIP model.

    Args:
        source, target: domain texts ("photo", "pencil sketch"); target may be None with style images.
        style_images: PIL images whose mean embedding is the image-guided target.
        source_images: [K, 3, R, R] frozen-generator samples (the image-guided source anchor, official).
        style_text_weight: a in [0, 1], the share of the text target when both text and images are given.
        style_source: "generator" (official) or "text": what the style images are compared against.
        need_parts: also build the part directions of the patch loss (needs target text).
    """
    text_dir = src_txt = tgt_txt = global_txt = None
    if target is not None:
        src_txt, tgt_txt = text_anchor(enc, source), text_anchor(enc, target)
        text_dir = unit(tgt_txt - src_txt)
        global_txt = enc.encode_text([f"a {target}"])[0]
    parts = None
    if need_parts:
        if target is None:
            raise ValueError("the patch loss needs a target text (--target) to build its part directions")
        parts = torch.stack([unit(text_anchor(enc, p.format(target)) - text_anchor(enc, p.format(source)))
                             for p in PART_TEMPLATES])
    if not style_images:
        if target is None:
            raise ValueError("give a target text (--target) or style images (--style-images)")
        return ModelTargets(text_dir, unit(src_txt), unit(tgt_txt), unit(global_txt), parts)

    # Image-guided: mean style embedding against the source anchor.
    style = image_anchor(enc, style_images)
    if style_source == "generator":
        if source_images is None:
            raise ValueError("image-guided targets need frozen-generator samples as the source anchor")
        src_img = generated_anchor(enc, source_images)
    elif style_source == "text":
        src_img = text_anchor(enc, source)
    else:
        raise ValueError(f"style_source must be 'generator' or 'text', got {style_source!r}")
    img_dir = unit(style - src_img)
    a = float(style_text_weight)
    if a > 0 and target is None:
        raise ValueError("--style-text-weight > 0 needs a target text (--target)")
    if a <= 0 or target is None:
        return ModelTargets(img_dir, unit(src_img), unit(style), unit(style), parts)
    return ModelTargets(_blend(img_dir, text_dir, a), _blend(src_img, src_txt, a), _blend(style, tgt_txt, a),
                        _blend(style, global_txt, a), parts)


# ----------------------------------------------------------------------------------------------------------
# The loss module


class NadaLoss:
    """Weighted sum of the NADA terms over the CLIP models of a bank (see the module docstring)."""

    def __init__(self, bank: ClipBank, targets: Sequence[ModelTargets], weights: LossWeights, resolution: int):
        if len(targets) != len(bank):
            raise ValueError("one ModelTargets per CLIP model is needed")
        self.bank, self.targets, self.weights = bank, list(targets), weights
        self.patch_size = max(2, 2 * (int(round(resolution * PATCH_FRACTION)) // 2))
        if weights.global_clip > 0 and any(t.global_target is None for t in self.targets):
            raise ValueError("the global loss needs a target text or style images")

    @classmethod
    def build(cls, bank: ClipBank, source: str, target: str | None, weights: LossWeights, resolution: int, *,
              style_images: Sequence[Any] | None = None, source_images: torch.Tensor | None = None,
              style_text_weight: float = 0.0, style_source: str = "generator") -> "NadaLoss":
        targets = [build_targets(enc, source, target, style_images=style_images, source_images=source_images,
                                 style_text_weight=style_text_weight, style_source=style_source,
                                 need_parts=weights.patch > 0) for enc, _ in bank]
        return cls(bank, targets, weights, resolution)

    def __call__(self, img_frozen: torch.Tensor, img_train: torch.Tensor,
                 gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for a batch.

        Args:
            img_frozen: [N, 3, R, R] frozen-generator images in [-1, 1] (no gradient needed).
            img_train: [N, 3, R, R] trainable-generator images (gradients flow into G_train).
            gen: CPU torch.Generator for the patch positions (reproducible runs).
        Returns:
            (scalar loss, {term: model-weighted value without lambda, "loss": total}).
        """
        w = self.weights
        total = img_train.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor, model_weight: float, lam: float) -> None:
            nonlocal total
            parts[name] = parts.get(name, 0.0) + model_weight * value.detach()
            total = total + (model_weight * lam) * value

        need_img = w.direction > 0 or w.global_clip > 0 or w.manifold > 0 or w.identity > 0
        centers = None
        if w.patch > 0:
            n, _, h, wd = img_train.shape
            centers = random_patch_centers(n, h, wd, self.patch_size, gen)
        for (enc, a), tg in zip(self.bank, self.targets):
            dev = enc.device
            if need_img:
                with torch.no_grad():
                    f_src = enc.encode_images(img_frozen.to(dev))
                f_tgt = enc.encode_images(img_train.to(dev))
                if w.direction > 0:
                    add("direction", directional_loss(f_src, f_tgt, tg.direction.to(dev)), a, w.direction)
                if w.global_clip > 0:
                    add("global", global_loss(f_tgt, tg.global_target.to(dev)), a, w.global_clip)
                if w.manifold > 0:
                    add("manifold", manifold_angle_loss(f_src, f_tgt, tg.anchor_src.to(dev), tg.anchor_tgt.to(dev)),
                        a, w.manifold)
                if w.identity > 0:
                    add("identity", identity_loss(f_src, f_tgt), a, w.identity)
            if w.patch > 0:
                with torch.no_grad():
                    p_src = enc.encode_images(crop_patches(img_frozen.to(dev), centers, self.patch_size))
                p_tgt = enc.encode_images(crop_patches(img_train.to(dev), centers, self.patch_size))
                add("patch", patch_directional_loss(p_src, p_tgt, tg.part_directions.to(dev)), a, w.patch)
        if w.l2 > 0:
            l2 = (img_train.float() - img_frozen.to(img_train.device).float()).square().mean()
            add("l2", l2.to(total.device), 1.0, w.l2)
        out = {k: float(v) for k, v in parts.items()}
        out["loss"] = float(total.detach())
        return total, out

    def global_objective(self, img: torch.Tensor) -> torch.Tensor:
        """sum_m a_m * L_glob(img): what adaptive layer selection minimises over W+ codes."""
        total = None
        for (enc, a), tg in zip(self.bank, self.targets):
            target = tg.global_target if tg.global_target is not None else tg.anchor_tgt
            term = a * global_loss(enc.encode_images(img.to(enc.device)), target.to(enc.device))
            term = term.to(img.device)
            total = term if total is None else total + term
        return total


__all__ = ["LossWeights", "ModelTargets", "NadaLoss", "PATCH_FRACTION", "build_targets", "crop_patches",
           "directional_loss", "edit_directions", "generated_anchor", "global_loss", "identity_loss",
           "image_anchor", "manifold_angle_loss", "patch_directional_loss", "random_patch_centers",
           "text_anchor", "text_direction", "unit"]
