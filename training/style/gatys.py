"""Optimisation-based neural style transfer (Gatys, Ecker & Bethge, "Image Style Transfer Using Convolutional
Neural Networks", CVPR 2016), with the defaults and options of jcjohnson/neural-style.

The pixels of the output image are optimised (L-BFGS or Adam) to match the VGG19 activations of the content
image at the content layers and the Gram matrices of one or more style images (blended) at the style layers,
plus a total-variation smoothness term. Options: several style images with blend weights, style scale,
original-colour preservation (luminance transfer), content or seeded-noise initialisation, and coarse-to-fine
multi-scale optimisation (each scale initialised with the upsampled result of the previous one).

Units: images are ``img`` in [-1, 1]; the VGG sees them as ImageNet-normalised [0, 1] images (torchvision's
weights), whereas neural-style feeds Caffe's VGG19 BGR 0..255 mean-subtracted images. The default weights
(content 5, style 100, TV 1e-3) are neural-style's numbers; with torchvision's weights the balance between the
terms is not the same, so expect to tune ``style_weight`` per image pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from training.style.images import (ceil_scale, check_size, resize, resize_max_side, scaled_size,
                                   transfer_original_colors)
from training.style.losses import (LossWeights, NonFiniteLossError, blended_grams, layer_weights,
                                   normalize_blend_weights, total_loss)
from training.style.vgg import VGGFeatures, check_vgg_input, layer_index, min_input_size

GATYS_FORMAT = "stylecast.gatys/v1"
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# neural-style's Adam learning rate is 10 on the 0..255 pixel scale; ours spans 2 units, so 10 * 2 / 255.
ADAM_DEFAULT_LR = 0.08
LBFGS_DEFAULT_LR = 1.0


@dataclass(frozen=True)
class GatysConfig:
    """Resolved settings of one Gatys run (saved as JSON next to its outputs).

    Attributes:
        image_size: longer side of the output in px (the last scale).
        scales: coarse-to-fine longer sides, e.g. (256, 512); empty -> (image_size,). The last must equal
            image_size.
        iterations: optimiser iterations per scale: one value for every scale, or one per scale.
        content_layers / content_weight / content_layer_weights: content loss layers, global weight and
            optional per-layer factors (empty -> 1 each).
        style_layers / style_weight / style_layer_weights: the same for the style loss.
        style_blend_weights: one per style image (empty -> equal), normalised to sum 1.
        style_scale: style images are resized to a longer side of ceil(style_scale * scale).
        tv_weight: total variation weight.
        optimizer: "lbfgs" (neural-style's default) or "adam".
        learning_rate: None -> 1.0 for L-BFGS, 0.08 for Adam (neural-style's 10 on a 0..255 scale).
        lbfgs_history: L-BFGS memory (neural-style's -lbfgs_num_correction, default 100).
        init: "noise" (uniform white noise in [-1, 1], seeded) or "content".
        seed: seed of the noise initialisation.
        original_colors: keep the content's chroma exactly (YIQ), luminance from the stylized image.
        pooling: "max" or "avg" pooling in the VGG.
        max_size: refuse working resolutions (output and style images) above this many px.
        save_every: report intermediate images every N iterations (0 = never).
    """

    image_size: int = 512
    scales: tuple[int, ...] = ()
    iterations: tuple[int, ...] = (1000,)
    content_layers: tuple[str, ...] = ("relu4_2",)
    content_weight: float = 5.0
    content_layer_weights: tuple[float, ...] = ()
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    style_weight: float = 100.0
    style_layer_weights: tuple[float, ...] = ()
    style_blend_weights: tuple[float, ...] = ()
    style_scale: float = 1.0
    tv_weight: float = 1e-3
    optimizer: str = "lbfgs"
    learning_rate: float | None = None
    lbfgs_history: int = 100
    init: str = "noise"
    seed: int = 0
    original_colors: bool = False
    pooling: str = "max"
    max_size: int = 2048
    save_every: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        its = self.iterations
        set_("iterations", (int(its),) if isinstance(its, int) else tuple(int(i) for i in its))
        for k in ("scales", "content_layers", "style_layers", "content_layer_weights", "style_layer_weights",
                  "style_blend_weights"):
            set_(k, tuple(getattr(self, k)))
        set_("scales", tuple(int(s) for s in self.scales))
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.learning_rate is None:
            set_("learning_rate", LBFGS_DEFAULT_LR if self.optimizer == "lbfgs" else ADAM_DEFAULT_LR)
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning rate must be a positive number, got {self.learning_rate}")
        if self.init not in ("noise", "content"):
            raise ValueError(f"init must be 'noise' or 'content', got {self.init!r}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        scales = self.resolved_scales
        if self.scales and self.scales[-1] != self.image_size:
            raise ValueError(f"the last scale ({self.scales[-1]}) must equal the image size ({self.image_size})")
        if any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must increase (coarse to fine), got {list(scales)}")
        for s in scales:
            check_size("image size", s, self.max_size)
            check_size("style image size", ceil_scale(self.style_scale, s), self.max_size)
        if len(self.iterations) not in (1, len(scales)):
            raise ValueError(f"give one iteration count or one per scale ({len(scales)}), got {list(self.iterations)}")
        if any(i < 1 for i in self.iterations):
            raise ValueError(f"iterations must be >= 1, got {list(self.iterations)}")
        if not math.isfinite(self.style_scale) or self.style_scale <= 0:
            raise ValueError(f"style scale must be a positive number, got {self.style_scale}")
        if not self.content_layers and not self.style_layers:
            raise ValueError("need at least one content or style layer")
        for name in (*self.content_layers, *self.style_layers):
            layer_index(name)
        self.loss_weights()  # validates the weights
        if self.style_blend_weights:
            normalize_blend_weights(self.style_blend_weights, len(self.style_blend_weights))
        if self.lbfgs_history < 1 or self.save_every < 0 or not 0 <= self.seed < 2**63:
            raise ValueError("lbfgs_history must be >= 1, save_every >= 0 and seed in 0..2**63-1")

    @property
    def resolved_scales(self) -> tuple[int, ...]:
        """The longer side of each scale, coarse to fine (``scales`` or just ``image_size``)."""
        return self.scales or (self.image_size,)

    def iterations_per_scale(self) -> list[int]:
        """Iterations of each scale (the single value repeated, or the per-scale list)."""
        n = len(self.resolved_scales)
        return list(self.iterations) * n if len(self.iterations) == 1 else list(self.iterations)

    def loss_weights(self) -> LossWeights:
        """The per-layer weights of the total loss."""
        return LossWeights(content=layer_weights(self.content_layers, self.content_weight, self.content_layer_weights),
                           style=layer_weights(self.style_layers, self.style_weight, self.style_layer_weights),
                           tv=_finite_nonneg("tv weight", self.tv_weight))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GatysConfig":
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GatysConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _finite_nonneg(what: str, v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {v}")
    return float(v)


@dataclass
class GatysObjective:
    """The Gatys loss at one scale: targets computed once, then ``objective(img)`` per evaluation.

    Build with GatysObjective.build(content, styles, config, vgg, size).
    """

    vgg: VGGFeatures
    weights: LossWeights
    content: torch.Tensor  # [1, 3, H, W] in [-1, 1] at this scale
    content_targets: dict[str, torch.Tensor] = field(default_factory=dict)
    style_targets: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(cls, content: torch.Tensor, styles: Sequence[torch.Tensor], config: GatysConfig, vgg: VGGFeatures,
              size: int) -> "GatysObjective":
        """Resize the inputs for a scale and compute the content activations and blended style Grams.

        Args:
            content: [1, 3, H, W] in [-1, 1], any size (resized to a longer side of ``size``).
            styles: [1, 3, H_k, W_k] in [-1, 1] each (resized to ceil(style_scale * size)).
            config: the run's settings.
            vgg: a loss network with every content and style layer.
            size: longer side of this scale.
        """
        weights = config.loss_weights()
        missing = [name for name in weights.layers if name not in vgg.layers]
        if missing:
            raise ValueError(f"the VGG network does not compute layers {missing}")
        if weights.style and not styles:
            raise ValueError("style layers are set but no style image was given")
        device = vgg.mean.device
        c = resize_max_side(content.to(device).float(), size)
        check_vgg_input("content image at this scale", c, weights.layers)
        style_targets: dict[str, torch.Tensor] = {}
        if weights.style:
            style_size = ceil_scale(config.style_scale, size)
            resized = [resize_max_side(s.to(device).float(), style_size) for s in styles]
            for k, s in enumerate(resized):
                check_vgg_input(f"style image {k + 1} at style size {style_size}", s, list(weights.style))
            feats = [vgg(s, list(weights.style)) for s in resized]
            style_targets = blended_grams(feats, config.style_blend_weights or None, list(weights.style))
        content_targets = vgg(c, list(weights.content)) if weights.content else {}
        return cls(vgg=vgg, weights=weights, content=c, content_targets=content_targets, style_targets=style_targets)

    def __call__(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"content", "style", "tv", "total"} (scalars) for ``img`` [1, 3, H, W] in [-1, 1]."""
        feats = self.vgg(img, self.weights.layers)
        return total_loss(img, feats, self.content_targets, self.style_targets, self.weights)


def check_inputs(content: torch.Tensor, styles: Sequence[torch.Tensor], config: GatysConfig) -> None:
    """Validate shapes and sizes at every scale before any work (the VGG must reach its deepest layer).

    Args:
        content: [1, 3, H, W]; styles: [1, 3, H_k, W_k] each.
    Raises:
        ValueError: wrong shapes, blend weights that do not match, or an image too small at some scale.
    """
    if content.dim() != 4 or tuple(content.shape[:2]) != (1, 3):
        raise ValueError(f"content must be [1, 3, H, W], got {list(content.shape)}")
    for s in styles:
        if s.dim() != 4 or tuple(s.shape[:2]) != (1, 3):
            raise ValueError(f"style images must be [1, 3, H, W], got {list(s.shape)}")
    if config.style_blend_weights and len(config.style_blend_weights) != len(styles):
        raise ValueError(f"got {len(config.style_blend_weights)} style blend weights for {len(styles)} style images")
    weights = config.loss_weights()
    if weights.style and not styles:
        raise ValueError("style layers are set but no style image was given")
    need_c = min_input_size(weights.layers)
    need_s = min_input_size(list(weights.style)) if weights.style else 1
    for size in config.resolved_scales:
        h, w = scaled_size(content.shape[-2], content.shape[-1], size)
        if min(h, w) < need_c:
            raise ValueError(f"at scale {size} px the content image is {w}x{h}, too small for the VGG layers "
                             f"(each side needs >= {need_c} px); use a larger size or shallower layers")
        style_size = ceil_scale(config.style_scale, size)
        for k, s in enumerate(styles):
            h, w = scaled_size(s.shape[-2], s.shape[-1], style_size)
            if min(h, w) < need_s:
                raise ValueError(f"style image {k + 1} at {style_size} px is {w}x{h}, too small for the VGG "
                                 f"layers (each side needs >= {need_s} px); raise --style-scale or the size")


ProgressCallback = Callable[[int, int, int, torch.Tensor], None]


def initial_image(content: torch.Tensor, config: GatysConfig) -> torch.Tensor:
    """The starting point at the first scale: the content image or seeded uniform noise in [-1, 1].

    Args:
        content: [1, 3, H, W] at the first scale.
    Returns:
        [1, 3, H, W] float32 on content's device (noise is drawn on the CPU, so it is the same on any device).
    """
    if config.init == "content":
        return content.detach().clone()
    g = torch.Generator().manual_seed(config.seed)
    return (torch.rand(content.shape, generator=g) * 2 - 1).to(content.device)


def stylize(content: torch.Tensor, styles: Sequence[torch.Tensor], config: GatysConfig, vgg: VGGFeatures,
            progress: bool = True, callback: ProgressCallback | None = None) -> torch.Tensor:
    """Gatys style transfer: optimise an image's pixels against the VGG content / style / TV losses.

    Args:
        content: [1, 3, H, W] float in [-1, 1] (any size; resized to each scale, longer side = scale).
        styles: one or more [1, 3, H_k, W_k] float in [-1, 1].
        config: settings (layers, weights, scales, optimiser, ...).
        vgg: loss network (load_vgg19 / random_vgg19) with every content and style layer; it sets the device.
        progress: show a tqdm bar per scale with the losses.
        callback: called as ``callback(scale_index, scale_px, iteration, img)`` every ``config.save_every``
            iterations with the current image (clamped, original colours applied when enabled).
    Returns:
        [1, 3, H', W'] float32 in [-1, 1] on the VGG's device, longer side = config.image_size.
    Raises:
        NonFiniteLossError: when the loss becomes NaN or infinite. ValueError: bad inputs.
    """
    check_inputs(content, styles, config)
    img: torch.Tensor | None = None
    for si, (size, iters) in enumerate(zip(config.resolved_scales, config.iterations_per_scale())):
        objective = GatysObjective.build(content, styles, config, vgg, size)
        x0 = initial_image(objective.content, config) if img is None else resize(img, objective.content.shape[-2:])
        x = x0.detach().clone().requires_grad_(True)

        def finish(t: torch.Tensor, obj: GatysObjective = objective) -> torch.Tensor:
            out = t.detach().clamp(-1, 1)
            return transfer_original_colors(out, obj.content) if config.original_colors else out

        _optimize(x, objective, config, iters, desc=f"gatys {size}px", progress=progress,
                  on_save=None if callback is None or not config.save_every else
                  (lambda it, t, si=si, size=size, finish=finish: callback(si, size, it, finish(t))))
        # Later scales start from the clamped result (without the colour transfer, which is applied once).
        img = x.detach().clamp(-1, 1)
    assert img is not None
    final_content = resize(content.to(img.device).float(), img.shape[-2:])
    return transfer_original_colors(img, final_content) if config.original_colors else img


def _optimize(x: torch.Tensor, objective: GatysObjective, config: GatysConfig, iters: int, desc: str,
              progress: bool, on_save: Callable[[int, torch.Tensor], None] | None) -> None:
    """Run ``iters`` optimiser iterations on the leaf tensor x in place."""
    from tqdm import tqdm

    last: dict[str, float] = {}
    state = {"it": 0}

    def evaluate() -> torch.Tensor:
        parts = objective(x)
        loss = parts["total"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at iteration {state['it']} ({desc}); lower --learning-rate or "
                f"the loss weights, and check the VGG weights")
        last.update({k: float(v.detach()) for k, v in parts.items()})
        return loss

    if config.optimizer == "lbfgs":
        # One L-BFGS iteration per step() call (max_iter=1): the optimiser keeps its history between calls,
        # so this is the same algorithm as one long call, with a hook after every iteration. Tolerances of -1
        # disable early stopping, as neural-style does (tolX = tolFun = -1).
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            [x], lr=config.learning_rate, max_iter=1, history_size=config.lbfgs_history,
            tolerance_grad=-1, tolerance_change=-1, line_search_fn=None)
    else:
        opt = torch.optim.Adam([x], lr=config.learning_rate)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = evaluate()
        loss.backward()
        return loss

    bar = tqdm(total=iters, desc=desc, unit="it", disable=not progress, dynamic_ncols=True, leave=True)
    try:
        for it in range(1, iters + 1):
            state["it"] = it
            opt.step(closure)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{last['total']:.4g}", content=f"{last['content']:.3g}",
                                style=f"{last['style']:.3g}", tv=f"{last['tv']:.3g}", refresh=False)
            if on_save is not None and it % config.save_every == 0:
                on_save(it, x)
    finally:
        bar.close()
    if not torch.isfinite(x).all():
        raise NonFiniteLossError(f"the image became NaN/inf ({desc}); lower --learning-rate or the loss weights")


def output_size(content_hw: tuple[int, int], config: GatysConfig) -> tuple[int, int]:
    """(H, W) of stylize's result for a content image of size content_hw."""
    return scaled_size(content_hw[0], content_hw[1], config.image_size)
