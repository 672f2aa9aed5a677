"""Fast feed-forward style transfer (Johnson, Alahi & Fei-Fei, "Perceptual Losses for Real-Time Style Transfer
and Super-Resolution", ECCV 2016), with instance normalisation (Ulyanov et al., 2016) and resize-convolution
upsampling (Odena et al., 2016) instead of transposed convolutions.

The transformation network maps an image to its stylized version in one pass and is trained on a folder of
content images with the VGG19 content / style (Gram) / TV losses of training.style.losses against one style
image. It is export-friendly: only convolutions, instance norm, ReLU, nearest upsampling, reflection padding,
slicing and tanh; any H and W (>= 5), dynamic in the graph; ``img`` in [-1, 1] in and out.

Run directory (``stylecast train fast-style``)::

    NNNNN-fast-style-<style>/
      config.json                 {"format": "stylecast.fast_style_run/v1", "config": FastStyleConfig, "meta"}
      files.txt                   the training files in stream order (used again on resume)
      previews/step0000500.png    top row the fixed content images, bottom row their stylization
      checkpoints/step0001000/    config.json + model.safetensors (a loadable stylizer) and
                                  train_state.safetensors (Adam state, RNG) + train_state.json (step, data
                                  stream position, optimizer hyper-parameters), written atomically
      final/                      config.json + model.safetensors of the finished network

Checkpoints hold tensors in safetensors and plain data in JSON only (no pickles). A resumed run restores the
network, the optimizer, the data stream position (seeded order) and the RNG, so it continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.files import atomic_directory, atomic_write_bytes, atomic_write_json, sha256_file
from training import distributed as dist
from training.style.data import ContentStream, find_images, load_training_image
from training.style.images import load_image, resize_max_side, to_uint8
from training.style.losses import LossWeights, NonFiniteLossError, blended_grams, layer_weights, total_loss
from training.style.vgg import VGGFeatures, check_vgg_input, layer_index, min_input_size

MODEL_FORMAT = "stylecast.fast_style/v1"
RUN_FORMAT = "stylecast.fast_style_run/v1"
MIN_SIZE = 5  # the 9x9 reflection padding (4 px) needs at least 5 px after padding to a multiple of 4


# ----------------------------------------------------------------------------------------------------------
# The transformation network


@dataclass(frozen=True)
class TransformerNetConfig:
    """Architecture of the transformation network.

    Attributes:
        channels: width of the first layer (Johnson: 32); the downsampled layers have 2x and 4x.
        res_blocks: residual blocks at 1/4 resolution (Johnson: 5).
        output: "tanh" (output = tanh(conv), in (-1, 1)) or "clamp" (output = conv clamped to [-1, 1]).
    """

    channels: int = 32
    res_blocks: int = 5
    output: str = "tanh"

    def __post_init__(self) -> None:
        if self.channels < 1 or self.res_blocks < 0:
            raise ValueError(f"channels must be >= 1 and res_blocks >= 0, got {self.channels}, {self.res_blocks}")
        if self.output not in ("tanh", "clamp"):
            raise ValueError(f"output must be 'tanh' or 'clamp', got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerNetConfig":
        return cls(**_known_fields(cls, d))


class ConvLayer(nn.Module):
    """Reflection padding (k // 2) then a convolution: border pixels see mirrored content, not zeros."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))  # [N, out_ch, ceil(H / stride), ceil(W / stride)]


class ConvNormReLU(nn.Module):
    """ConvLayer -> InstanceNorm (affine) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.conv = ConvLayer(in_ch, out_ch, kernel, stride)
        self.norm = nn.InstanceNorm2d(out_ch, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            # Nearest x2 then convolution: no checkerboard artefacts of transposed convolutions.
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """x + IN(conv(ReLU(IN(conv(x))))), 3x3 convolutions, no ReLU after the sum (Gross & Wilber)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = ConvLayer(ch, ch, 3)
        self.norm1 = nn.InstanceNorm2d(ch, affine=True)
        self.conv2 = ConvLayer(ch, ch, 3)
        self.norm2 = nn.InstanceNorm2d(ch, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return x + self.norm2(self.conv2(y))


class TransformerNet(nn.Module):
    """Johnson et al.'s image transformation network.

    conv 9x9 (c) -> conv 3x3 /2 (2c) -> conv 3x3 /2 (4c) -> res_blocks x residual(4c) -> nearest x2 + conv 3x3
    (2c) -> nearest x2 + conv 3x3 (c) -> conv 9x9 (3) -> tanh; instance norm + ReLU after every conv but the
    last; reflection padding everywhere. Inputs are reflection-padded on the bottom / right to a multiple of
    4 and the output is cropped back, so output size == input size for any H, W >= 5.

    Args:
        cfg: architecture.
    """

    def __init__(self, cfg: TransformerNetConfig = TransformerNetConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.stem = ConvNormReLU(3, c, 9)
        self.down1 = ConvNormReLU(c, 2 * c, 3, stride=2)
        self.down2 = ConvNormReLU(2 * c, 4 * c, 3, stride=2)
        self.res = nn.Sequential(*[ResidualBlock(4 * c) for _ in range(cfg.res_blocks)])
        self.up1 = ConvNormReLU(4 * c, 2 * c, 3, upsample=True)
        self.up2 = ConvNormReLU(2 * c, c, 3, upsample=True)
        self.out = ConvLayer(c, 3, 9)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Stylize.

        Args:
            img: [N, 3, H, W] float in [-1, 1], H, W >= 5.
        Returns:
            [N, 3, H, W] float in [-1, 1].
        """
        h, w = img.shape[-2], img.shape[-1]
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and min(h, w) < MIN_SIZE:
            raise ValueError(f"fast stylizer input must be at least {MIN_SIZE}x{MIN_SIZE} px, got {h}x{w}")
        # Pad to a multiple of 4 so that the two stride-2 convs and the two x2 upsamplings round-trip exactly.
        # Always pad (possibly by 0) rather than branch on the size, so exported graphs stay shape-generic.
        x = F.pad(img, (0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4), mode="reflect")
        x = self.down2(self.down1(self.stem(x)))  # [N, 4c, H'/4, W'/4]
        x = self.up2(self.up1(self.res(x)))       # [N, c, H', W']
        x = self.out(x)[:, :, :h, :w]             # [N, 3, H, W]
        return torch.tanh(x) if self.cfg.output == "tanh" else x.clamp(-1, 1)


def build_transformer_net(cfg: TransformerNetConfig, seed: int = 0) -> TransformerNet:
    """A TransformerNet with PyTorch's default initialisation drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerNet(cfg)


# ----------------------------------------------------------------------------------------------------------
# Training configuration


@dataclass(frozen=True)
class FastStyleConfig:
    """Resolved settings of one fast-stylizer training run (saved as the run's config.json).

    Defaults: the paper's layers (Johnson et al. 2016, sec. 4.1: content relu2_2, style relu1_2, relu2_2,
    relu3_3, relu4_3) and jcjohnson/fast-neural-style's numbers (content weight 1, style weight 5, TV 1e-6,
    Adam lr 1e-3, batch 4, 256 px, 40k iterations), on VGG19 (the paper used VGG16) with torchvision weights,
    so the balance of the terms may need tuning.

    Attributes:
        style: style image path.  data: content image folder (recursive).
        image_size: side of the square training crops.  style_size: longer side the style image is resized
            to (0 = as is).
        batch_size, learning_rate, iterations: Adam training; iterations = optimizer steps in total.
        epochs: informational: set when iterations were derived from --epochs (ceil(epochs * files / batch)).
        content_* / style_* / tv_weight: loss layers and weights (see training.style.losses).
        pooling: VGG pooling, "max" or "avg".
        seed: network initialisation and data order.
        checkpoint_every / keep_checkpoints: checkpoint interval (0 = only at the end) and how many to keep.
        preview_every / preview_images / preview_count: preview interval (0 = only at the end), fixed preview
            images (empty = the first preview_count readable training images).
        channels / res_blocks / output: the TransformerNetConfig.
    """

    style: str
    data: str
    image_size: int = 256
    style_size: int = 256
    batch_size: int = 4
    learning_rate: float = 1e-3
    iterations: int = 40000
    epochs: float | None = None
    content_layers: tuple[str, ...] = ("relu2_2",)
    content_weight: float = 1.0
    content_layer_weights: tuple[float, ...] = ()
    style_layers: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
    style_weight: float = 5.0
    style_layer_weights: tuple[float, ...] = ()
    tv_weight: float = 1e-6
    pooling: str = "max"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    preview_every: int = 500
    preview_images: tuple[str, ...] = ()
    preview_count: int = 4
    channels: int = 32
    res_blocks: int = 5
    output: str = "tanh"

    def __post_init__(self) -> None:
        for k in ("content_layers", "style_layers", "content_layer_weights", "style_layer_weights",
                  "preview_images"):
            object.__setattr__(self, k, tuple(getattr(self, k)))
        if self.image_size < 16 or self.batch_size < 1 or self.iterations < 1:
            raise ValueError("image size must be >= 16, batch size and iterations >= 1")
        if self.style_size < 0:
            raise ValueError("style size must be >= 0")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning rate must be a positive number, got {self.learning_rate}")
        if min(self.checkpoint_every, self.preview_every, self.preview_count) < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint/preview intervals and preview count must be >= 0, keep-checkpoints >= 1")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if not self.content_layers and not self.style_layers:
            raise ValueError("need at least one content or style layer")
        for name in (*self.content_layers, *self.style_layers):
            layer_index(name)
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        need = min_input_size(self.loss_weights().layers)
        if self.image_size < need:
            raise ValueError(f"image size {self.image_size} is too small for the VGG layers (needs >= {need})")
        self.net_config()

    def net_config(self) -> TransformerNetConfig:
        """The architecture part."""
        return TransformerNetConfig(channels=self.channels, res_blocks=self.res_blocks, output=self.output)

    def loss_weights(self) -> LossWeights:
        """Per-layer weights of the total loss."""
        if not math.isfinite(self.tv_weight) or self.tv_weight < 0:
            raise ValueError(f"tv weight must be finite and >= 0, got {self.tv_weight}")
        return LossWeights(content=layer_weights(self.content_layers, self.content_weight, self.content_layer_weights),
                           style=layer_weights(self.style_layers, self.style_weight, self.style_layer_weights),
                           tv=float(self.tv_weight))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FastStyleConfig":
        """Inverse of to_dict; unknown keys are an error."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in _known_fields(cls, d).items()})


def iterations_for_epochs(epochs: float, num_files: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_files`` images: ceil(epochs * num_files / batch_size)."""
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"epochs must be a positive number, got {epochs}")
    return max(1, math.ceil(epochs * num_files / batch_size))


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return dict(d)


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


def save_fast_style(path: str | os.PathLike, net: TransformerNet, meta: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write a stylizer checkpoint directory atomically: config.json + model.safetensors.

    Args:
        path: directory to create (must not exist unless overwrite).
        net: the network.
        meta: extra JSON-ready information stored in config.json["meta"].
    Returns:
        path.
    """
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _write_model(tmp, net, meta or {})
    return Path(path)


def _write_model(directory: Path, net: TransformerNet, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              str(directory / "model.safetensors"))
    doc = {"format": MODEL_FORMAT, "config": net.cfg.to_dict(), "meta": meta}
    (directory / "config.json").write_text(json.dumps(doc, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "format" not in doc:
        raise ValueError(f"{path}: missing 'format'")
    return doc


def load_fast_style(path: str | os.PathLike, device: str | torch.device = "cpu") -> TransformerNet:
    """Load a trained stylizer in eval mode.

    Args:
        path: a stylizer checkpoint directory (config.json + model.safetensors), or a training run directory
            (its final/ network, else its latest checkpoint).
        device: where to put it.
    Returns:
        TransformerNet (eval mode, requires_grad off).
    Raises:
        FileNotFoundError / ValueError: missing, wrong format, corrupt or mismatching files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such stylizer directory")
    doc = _read_json(path / "config.json")
    if doc["format"] == RUN_FORMAT:
        if (path / "final" / "config.json").is_file():
            return load_fast_style(path / "final", device)
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: training run has no checkpoint yet")
        return load_fast_style(latest, device)
    if doc["format"] != MODEL_FORMAT:
        raise ValueError(f"{path}: format {doc['format']!r} is not a fast stylizer ({MODEL_FORMAT!r})")
    try:
        cfg = TransformerNetConfig.from_dict(doc["config"])
    except (TypeError, KeyError) as exc:
        raise ValueError(f"{path}: invalid stylizer config ({exc})") from None
    try:
        sd = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path / 'model.safetensors'}: corrupt or missing ({exc})") from None
    net = TransformerNet(cfg)
    own = net.state_dict()
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in own):
        raise ValueError(f"{path}: model.safetensors does not match its config (keys or shapes differ)")
    net.load_state_dict(sd)
    return net.to(device).eval().requires_grad_(False)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run (checkpoints/stepNNNNNNN), or None."""
    steps = _checkpoints(Path(run_dir))
    return steps[-1][1] if steps else None


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir()
           if (m := re.fullmatch(r"step(\d+)", p.name)) and (p / "train_state.json").is_file()]
    return sorted(out)


def _save_training_checkpoint(run_dir: Path, step: int, net: TransformerNet, opt: torch.optim.Optimizer,
                              stream: ContentStream, losses: dict[str, float], keep: int) -> Path:
    from safetensors.torch import save_file

    dest = run_dir / "checkpoints" / f"step{step:07d}"
    with atomic_directory(dest, overwrite=True) as tmp:
        _write_model(tmp, net, {"step": step})
        osd = opt.state_dict()
        tensors: dict[str, torch.Tensor] = {"rng.torch_cpu": torch.get_rng_state()}
        plain_state: dict[str, dict[str, Any]] = {}
        for idx, st in osd["state"].items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optimizer.state.{idx}.{name}"] = v.detach().cpu().contiguous()
                else:
                    plain_state.setdefault(str(idx), {})[name] = v
        save_file(tensors, str(tmp / "train_state.safetensors"))
        doc = {"step": step, "data": stream.state_dict(), "losses": losses,
               "optimizer": {"param_groups": osd["param_groups"], "plain_state": plain_state}}
        (tmp / "train_state.json").write_text(json.dumps(doc, indent=2) + "\n")
    for _, old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _load_training_checkpoint(ckpt: Path, net: TransformerNet, opt: torch.optim.Optimizer,
                              stream: ContentStream) -> int:
    from safetensors.torch import load_file

    loaded = load_fast_style(ckpt)
    if loaded.cfg != net.cfg:
        raise ValueError(f"{ckpt}: network config {loaded.cfg} differs from the run's {net.cfg}")
    net.load_state_dict(loaded.state_dict())
    doc = json.loads((ckpt / "train_state.json").read_text())
    tensors = load_file(str(ckpt / "train_state.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer.state."):
            idx, name = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in doc["optimizer"].get("plain_state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in doc["optimizer"]["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    stream.load_state_dict(doc["data"])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    return int(doc["step"])


# ----------------------------------------------------------------------------------------------------------
# Training


def read_run_config(run_dir: str | os.PathLike) -> tuple[FastStyleConfig, dict[str, Any]]:
    """(config, meta) of a fast-style training run directory."""
    doc = _read_json(Path(run_dir) / "config.json")
    if doc["format"] != RUN_FORMAT:
        raise ValueError(f"{run_dir}: not a fast-style training run (format {doc['format']!r})")
    return FastStyleConfig.from_dict(doc["config"]), doc.get("meta", {})


StepCallback = Callable[[int, dict[str, float]], None]


def style_targets(config: FastStyleConfig, vgg: VGGFeatures) -> dict[str, torch.Tensor]:
    """Gram matrices of the style image (resized to a longer side of style_size) at the style layers.

    Returns:
        {layer: [1, C, C]} on the VGG's device.
    """
    weights = config.loss_weights()
    if not weights.style:
        return {}
    style = load_image(config.style).to(vgg.mean.device)
    if config.style_size:
        style = resize_max_side(style, config.style_size)
    check_vgg_input(f"style image {config.style}", style, list(weights.style))
    with torch.no_grad():
        return blended_grams([vgg(style, list(weights.style))], None, list(weights.style))


def train_fast_style(config: FastStyleConfig, run_dir: str | os.PathLike, vgg: VGGFeatures,
                     resume: bool = False, progress: bool = True, workers: int = 0,
                     on_step: StepCallback | None = None, env: dist.DistEnv | None = None) -> TransformerNet:
    """Train (or resume training) a fast stylizer into a run directory.

    A new run writes config.json and files.txt first; a resumed run re-reads them and continues from the
    latest checkpoint (or from the start if there is none). On the CPU the result is bit-identical to an
    uninterrupted run; on CUDA too when ``torch.use_deterministic_algorithms(True)`` (cuDNN's default
    convolution backward kernels are not deterministic). Training itself draws no random numbers after the
    seeded initialisation; the torch CPU RNG state is saved anyway.

    Args:
        config: the run's settings (on resume, must equal the run's config.json).
        run_dir: an empty directory for a new run (e.g. from common.files.next_run_dir), or the run to resume.
        vgg: loss network with every content and style layer; it sets the device.
        resume: continue the run in run_dir.
        progress: tqdm bar with the losses.
        workers: image decoding threads (does not change the result).
        on_step: called as ``on_step(step, losses)`` after every optimizer step.
        env: the torchrun job (training.distributed.init); None = one process. Every rank reads the whole
            global batch from the (deterministic) data stream and trains on its slice through
            DistributedDataParallel (the network's instance norms are per sample, so K processes compute what one
            process computes with the same global batch); only rank 0 writes.
    Returns:
        The trained TransformerNet (eval mode), also saved to run_dir/final.
    Raises:
        ValueError / FileNotFoundError: bad inputs (empty folder, unreadable style, finished run, ...).
        NonFiniteLossError: NaN / inf loss.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    device = vgg.mean.device
    env = env or dist.DistEnv(device=device)
    local = dist.local_slice(config.batch_size, env)
    main = env.is_main
    weights = config.loss_weights()
    missing = [n for n in weights.layers if n not in vgg.layers]
    if missing:
        raise ValueError(f"the VGG network does not compute layers {missing}")
    if resume:
        saved, meta = read_run_config(run_dir)
        if saved != config:
            raise ValueError(f"{run_dir}: the config differs from the run's config.json")
        if (run_dir / "final").exists():
            raise ValueError(f"{run_dir}: this run has already finished (final/ exists)")
        if sha256_file(config.style) != meta.get("style_sha256"):
            raise ValueError(f"{config.style}: the style image changed since the run started")
        root = Path(config.data)
        files = [root / line for line in (run_dir / "files.txt").read_text().splitlines() if line]
    else:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if any(run_dir.iterdir()):
                raise FileExistsError(f"{run_dir}: a new run needs an empty directory")
        files = find_images(config.data)
        targets = style_targets(config, vgg)  # reads the style image: a bad one fails before anything is written
        if main:
            style_sha = sha256_file(config.style)
            atomic_write_json(run_dir / "config.json", {"format": RUN_FORMAT, "config": config.to_dict(),
                                                        "meta": {"style_sha256": style_sha,
                                                                 "num_files": len(files)}})
            root = Path(config.data)
            atomic_write_bytes(run_dir / "files.txt",
                               "".join(f"{p.relative_to(root).as_posix()}\n" for p in files).encode())

    if resume:
        targets = style_targets(config, vgg)
    net = build_transformer_net(config.net_config(), seed=config.seed).to(device)
    model = dist.wrap(net, env)  # DistributedDataParallel under torchrun, the network itself otherwise
    opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    stream = ContentStream(files, config.image_size, config.batch_size, seed=config.seed, workers=workers)
    step = 0
    try:
        ckpt = latest_checkpoint(run_dir) if resume else None
        if ckpt is not None:
            step = _load_training_checkpoint(ckpt, net, opt, stream)
        preview = _preview_batch(config, stream).to(device)
        net.train()
        losses: dict[str, float] = {}
        bar = tqdm(total=config.iterations, initial=step, desc="fast-style", unit="step",
                   disable=not (progress and main), dynamic_ncols=True)
        try:
            while step < config.iterations:
                batch = stream.next_batch()[local].to(device)  # [B / K, 3, S, S]: this rank's slice
                out = model(batch)
                with torch.no_grad():
                    content_feats = vgg(batch, list(weights.content)) if weights.content else {}
                parts = total_loss(out, vgg(out, weights.layers), content_feats, targets, weights)
                losses = dist.all_reduce_mean({k: float(v.detach()) for k, v in parts.items()}, env)
                if not math.isfinite(losses["total"]):  # the same verdict on every rank
                    raise NonFiniteLossError(f"the loss became {losses['total']} at step {step + 1}; lower "
                                             "--learning-rate or the loss weights, and check the VGG weights")
                opt.zero_grad(set_to_none=True)
                parts["total"].backward()  # DDP averages the gradients over the ranks here
                opt.step()
                step += 1
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{losses['total']:.4g}", content=f"{losses['content']:.3g}",
                                    style=f"{losses['style']:.3g}", tv=f"{losses['tv']:.3g}",
                                    bad=len(stream.bad), refresh=False)
                last = step == config.iterations
                if main and ((config.preview_every and step % config.preview_every == 0) or last):
                    _save_preview(run_dir / "previews" / f"step{step:07d}.png", net, preview)
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
                    if main:
                        _save_training_checkpoint(run_dir, step, net, opt, stream, losses, config.keep_checkpoints)
                    dist.barrier(env)
                if on_step is not None:
                    on_step(step, losses)
        finally:
            bar.close()
    finally:
        stream.close()
    net.eval()
    if main:
        save_fast_style(run_dir / "final", net, meta={"step": step, "losses": losses,
                                                       "bad_files": len(stream.bad), "run": run_dir.name})
    dist.barrier(env)
    return net.requires_grad_(False)


def _preview_batch(config: FastStyleConfig, stream: ContentStream) -> torch.Tensor:
    """The fixed preview images: config.preview_images, else the first readable training images. [K, 3, S, S]."""
    if config.preview_images:
        imgs = []
        for p in config.preview_images:
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p}: no such preview image")
            try:
                imgs.append(load_training_image(p, config.image_size))
            except Exception as exc:
                if isinstance(exc, (MemoryError, KeyboardInterrupt)):
                    raise
                raise ValueError(f"{p}: cannot read preview image ({exc})") from None
    else:
        imgs = stream.peek_readable(config.preview_count)
    if not imgs:
        return torch.zeros(0, 3, config.image_size, config.image_size)
    return torch.stack(imgs)


@torch.no_grad()
def _save_preview(path: Path, net: TransformerNet, preview: torch.Tensor) -> None:
    """Top row: the content images; bottom row: their stylization."""
    from training.generate import make_grid, save_png

    if preview.shape[0] == 0:
        return
    was_training = net.training
    net.eval()
    out = net(preview)
    net.train(was_training)
    grid = make_grid(to_uint8(torch.cat([preview, out])), cols=preview.shape[0])
    save_png(path, grid)


@torch.no_grad()
def stylize_fast(net: TransformerNet, img: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Run a stylizer on images in batches.

    Args:
        net: a TransformerNet (e.g. from load_fast_style).
        img: [N, 3, H, W] float in [-1, 1].
    Returns:
        [N, 3, H, W] float in [-1, 1] on img's device.
    """
    device = next(net.parameters()).device
    return torch.cat([net(img[i: i + batch_size].to(device)).to(img.device)
                      for i in range(0, img.shape[0], batch_size)])
