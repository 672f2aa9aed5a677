"""StyleGAN-NADA training (Gal et al., "StyleGAN-NADA: CLIP-Guided Domain Adaptation of Image Generators",
SIGGRAPH 2022): a frozen and a trainable copy of a StyleGAN2 generator, CLIP losses, phase or adaptive layer
selection, previews, checkpoints and exact resume.

Run directory (numbered, never overwritten; resume continues inside it):

    config.json                       the resolved NadaConfig, written before training starts
    log.jsonl                         one line of losses per step
    samples/NNNNNN.png                preview grid: frozen generator (top row), trained generator (bottom)
    checkpoints/NNNNNN/               native checkpoint (stylecast generate / blend / export read it)
    checkpoints/NNNNNN.pt             the same generator in rosinality layout (g_ema + latent_avg)
    checkpoints/NNNNNN.state.safetensors   optimizer + RNG state for exact resume (no pickles)
    tb/                               TensorBoard scalars (optional)

Differences from the official code, all deliberate: frozen and trainable generator share one style-mixing
crossover per batch (the official rosinality generators each draw their own); previews truncate towards the
checkpoint's w_avg (the official code re-estimates the mean from 4096 samples); the mapping network never
trains; the adaptive layer mapping is corrected (see training.nada.layers).

Data parallel (`torchrun --nproc_per_node K -m stylecast train nada ...`, training/distributed.py): --batch is
the global batch, split evenly over the K processes. Every rank draws the whole batch's codes (and the mixing
decision) from the shared generator and keeps its slice; the adaptive layer choice is rank 0's, broadcast; the
per-sample randomness (noise maps, frozen-image jitter, patch crops) comes from streams seeded per (step, rank), so
resume stays exact; gradients are averaged over the ranks in one flattened all-reduce; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.files import atomic_write_bytes, atomic_write_json, next_run_dir
from training import distributed as dist
from training.checkpoints import load_checkpoint, save_native, save_rosinality
from training.generate import make_grid, save_png, to_uint8
from training.networks.stylegan2 import Generator, mix_styles, seeds_to_z

from .clip import ClipBank, parse_clip_specs
from .layers import (PHASES, latent_candidates, phase_units, select_latents, unit_of, unit_parameters,
                     units_for_latents)
from .losses import LossWeights, NadaLoss

RUN_FORMAT = "stylecast.nada-run/v1"
STATE_FORMAT = "stylecast.nada-state/v1"
OFFICIAL_LR = 0.002 * 4 / 5  # lr * g_reg_ratio with g_reg_every = 4, as the official code
OFFICIAL_BETA2 = 0.99 ** (4 / 5)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FROZEN_JITTER = 5e-4  # pixel noise on frozen images when both generators would render identical images
NOISE_MODES = ("random", "const", "none")
AMP_MODES = ("off", "bf16", "fp16")


class NadaDivergedError(RuntimeError):
    """A loss or gradient became NaN / Inf; the message names the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class NadaConfig:
    """Every option of a NADA run (defaults: the official implementation; see REFERENCE.md).

    auto_layer_k = 0 disables adaptive layer selection (the phase's layers all train every step).
    improve_shape applies the official Colab preset at resolve time: k = int(2 * (2 log2 R - 2) / 3) latents,
    1 selection step and style mixing 0.9 (unless k / mixing were set explicitly).
    """

    checkpoint: str
    outdir: str = "runs"
    source: str = "photo"
    target: str | None = None
    style_images: str | None = None
    style_text_weight: float = 0.0
    style_source: str = "generator"
    img2img_batch: int = 16
    clip: tuple[str, ...] = ("ViT-B-32:openai=1", "ViT-B-16:openai=1")
    clip_cache_dir: str | None = None
    lambda_direction: float = 1.0
    lambda_global: float = 0.0
    lambda_patch: float = 0.0
    lambda_manifold: float = 0.0
    lambda_id: float = 0.0
    lambda_l2: float = 0.0
    phase: str = "all"
    train_torgb: bool = False
    auto_layer_k: int = 0
    auto_layer_iters: int = 1
    auto_layer_batch: int = 8
    improve_shape: bool = False
    iters: int = 300
    batch: int = 2
    lr: float = OFFICIAL_LR
    beta1: float = 0.0
    beta2: float = OFFICIAL_BETA2
    mixing: float = 0.0
    noise_mode: str = "random"
    sample_truncation: float = 0.7
    preview_seeds: tuple[int, ...] = (0, 1, 2, 3)
    output_interval: int = 50
    save_interval: int = 100
    seed: int = 2
    device: str = "auto"
    frozen_device: str | None = None
    amp: str = "off"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", tuple(str(s) for s in self.clip))
        object.__setattr__(self, "preview_seeds", tuple(int(s) for s in self.preview_seeds))
        if not str(self.checkpoint):
            raise ValueError("a source checkpoint is required (--checkpoint)")
        if not self.source or not str(self.source).strip():
            raise ValueError("--source must be a non-empty text such as 'photo'")
        if self.target is not None and not str(self.target).strip():
            raise ValueError("--target must be a non-empty text such as 'pencil sketch'")
        if self.target is None and self.style_images is None:
            raise ValueError("give a target text (--target) or a folder of style images (--style-images)")
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; choose one of {', '.join(PHASES)}")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {', '.join(NOISE_MODES)}, got {self.noise_mode!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.style_source not in ("generator", "text"):
            raise ValueError(f"style source must be 'generator' or 'text', got {self.style_source!r}")
        ints = {"iters": (self.iters, 1), "batch": (self.batch, 1), "auto_layer_k": (self.auto_layer_k, 0),
                "auto_layer_iters": (self.auto_layer_iters, 0), "auto_layer_batch": (self.auto_layer_batch, 1),
                "img2img_batch": (self.img2img_batch, 1), "output_interval": (self.output_interval, 0),
                "save_interval": (self.save_interval, 0), "seed": (self.seed, 0)}
        for name, (value, lo) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= {lo}, got {value!r}")
        if self.auto_layer_k > 0 and self.auto_layer_iters < 1:
            raise ValueError("--auto-layer-iters must be >= 1 when --auto-layer-k is set")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not 0 <= self.mixing <= 1:
            raise ValueError(f"--mixing must be a probability in [0, 1], got {self.mixing}")
        if not 0 <= self.style_text_weight <= 1:
            raise ValueError(f"--style-text-weight must be in [0, 1], got {self.style_text_weight}")
        if not (math.isfinite(self.sample_truncation) and -2 <= self.sample_truncation <= 2):
            raise ValueError(f"--sample-truncation must be in [-2, 2], got {self.sample_truncation}")
        if not self.preview_seeds:
            raise ValueError("at least one preview seed is needed")
        self.loss_weights()  # validates the lambdas
        # Canonical CLIP specs ("ViT-B/32" -> "ViT-B-32:openai=1"); duplicates merged.
        object.__setattr__(self, "clip", tuple(str(s) for s in parse_clip_specs(self.clip)))

    def loss_weights(self) -> LossWeights:
        return LossWeights(direction=self.lambda_direction, global_clip=self.lambda_global, patch=self.lambda_patch,
                           manifold=self.lambda_manifold, identity=self.lambda_id, l2=self.lambda_l2)

    def resolved(self, resolution: int) -> "NadaConfig":
        """Apply the improve-shape preset for a generator resolution."""
        if not self.improve_shape:
            return self
        k = self.auto_layer_k or int(2 * (2 * math.log2(resolution) - 2) / 3)
        return dataclasses.replace(self, auto_layer_k=k, auto_layer_iters=max(1, self.auto_layer_iters),
                                   mixing=self.mixing if self.mixing > 0 else 0.9)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clip"], d["preview_seeds"] = list(self.clip), list(self.preview_seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NadaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown NadaConfig fields: {unknown}")
        d = dict(d)
        for k in ("clip", "preview_seeds"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class NadaResult:
    """Where a run wrote its outputs."""

    run_dir: Path
    checkpoint: Path  # native directory of the last step
    rosinality: Path
    step: int
    losses: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _resolve_device(name: str | None, default: torch.device | None = None) -> torch.device:
    if name is None:
        return default if default is not None else torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid device {name!r}: use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return dev


def load_style_images(folder: str | Path) -> tuple[list[Any], list[str]]:
    """PIL images (RGB, fully read) and their file names from a folder (png, jpg, jpeg, webp, bmp)."""
    from PIL import Image, UnidentifiedImageError
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"style image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"--style-images must be a folder of images, got the file {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read style image {p}: {exc}") from None
    return images, [p.name for p in files]


def _has_noise(G: Generator) -> bool:
    return any(n.endswith("noise_strength") and bool(p.detach().abs().max() > 0) for n, p in G.named_parameters())


def _finite_params(params: list[tuple[str, torch.nn.Parameter]]) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for _, p in params)


def _finite_grads(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _step_dirs(run_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (native dir + resume state), ascending."""
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    steps = []
    for p in ck.iterdir():
        if p.is_dir() and p.name.isdigit() and (p / "config.json").is_file() \
                and (ck / f"{p.name}.state.safetensors").is_file():
            steps.append(int(p.name))
    return sorted(steps)


# ----------------------------------------------------------------------------------------------------------
# The trainer


class NadaTrainer:
    """Builds everything a run needs, validates it, then trains (fresh or resumed).

    Nothing is written to disk until every input (checkpoint, CLIP weights, style images, options) is known to
    be good; the run directory and its config.json come first after that.
    """

    def __init__(self, cfg: NadaConfig, *, progress: bool = True,
                 callback: Callable[[int, dict[str, Any]], None] | None = None,
                 resume_dir: Path | None = None, resume_step: int | None = None, env: dist.DistEnv | None = None):
        self.progress, self.callback = progress, callback
        self.device = _resolve_device(cfg.device)
        if env is not None and env.distributed:
            self.device = env.device  # torchrun: this rank's device (cuda:LOCAL_RANK or cpu)
        self.env = env or dist.DistEnv(device=self.device)
        self.local = dist.local_slice(cfg.batch, self.env)
        self.frozen_device = _resolve_device(cfg.frozen_device, self.device)
        if cfg.amp != "off" and self.device.type != "cuda":
            raise ValueError(f"--amp {cfg.amp} needs a CUDA device (mixed precision is GPU-only)")

        # Generators: the frozen copy and the trainable one from the same source checkpoint.
        ck = load_checkpoint(cfg.checkpoint)
        self.source_sha256, self.source_format = ck.sha256, ck.format
        G = ck.G
        cfg = cfg.resolved(G.resolution)
        self.cfg = cfg
        self.G_frozen = copy.deepcopy(G).to(self.frozen_device).eval().requires_grad_(False)
        self.G_train = copy.deepcopy(G).to(self.device).eval().requires_grad_(False)
        if resume_dir is not None:
            state = load_checkpoint(resume_dir / "checkpoints" / f"{resume_step:06d}").G.state_dict()
            with torch.no_grad():
                for k, v in self.G_train.state_dict().items():
                    v.copy_(state[k])
        gcfg = G.cfg

        # Layers: the units this run may train, and the adaptive-selection candidates.
        self.adaptive = cfg.auto_layer_k > 0
        if self.adaptive:
            self.candidates = latent_candidates(gcfg, cfg.phase, cfg.train_torgb)
            if cfg.auto_layer_k > len(self.candidates):
                raise ValueError(f"--auto-layer-k {cfg.auto_layer_k} exceeds the {len(self.candidates)} W+ latents "
                                 f"that drive trainable layers (phase {cfg.phase!r}, {G.resolution} px)")
            self.units = units_for_latents(gcfg, self.candidates, cfg.phase, cfg.train_torgb)
        else:
            self.candidates = []
            self.units = phase_units(gcfg, cfg.phase, cfg.train_torgb)
        self.params = unit_parameters(self.G_train, self.units)
        self.param_list = [p for _, p in self.params]
        self.param_units = [unit_of(n, self.units) for n, _ in self.params]

        # Style images (cheap to validate, so before CLIP), CLIP (loaded once, shared by every loss), targets.
        self.style_names: list[str] = []
        style_pil = None
        if cfg.style_images is not None:
            style_pil, self.style_names = load_style_images(cfg.style_images)
        self.bank = ClipBank.load(cfg.clip, self.device, cfg.clip_cache_dir)
        source_images = None
        if style_pil and cfg.style_source == "generator":
            source_images = self._source_samples(cfg.img2img_batch)
        self.loss_fn = NadaLoss.build(self.bank, cfg.source, cfg.target, cfg.loss_weights(), G.resolution,
                                      style_images=style_pil, source_images=source_images,
                                      style_text_weight=cfg.style_text_weight, style_source=cfg.style_source)

        # With identical noise (or none) both generators render the same image at step 0 and the image
        # direction is 0/0; a little pixel noise on the frozen image (as the official StyleGAN3 path) avoids it.
        self.jitter = 0.0
        if self.cfg.lambda_direction > 0 and (cfg.noise_mode != "random" or not _has_noise(G)):
            self.jitter = FROZEN_JITTER
            warnings.warn(f"noise mode {cfg.noise_mode!r} (or a generator without noise inputs): adding "
                          f"{FROZEN_JITTER:g} pixel noise to frozen images so the first image directions are "
                          "defined; the official setting is --noise-mode random", RuntimeWarning, stacklevel=2)

        self.optimizer = torch.optim.Adam(self.param_list, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # Per-sample randomness: the shared stream in one process (as before), a per-(step, rank) one under torchrun.
        self.gen_local = torch.Generator().manual_seed(cfg.seed) if self.env.distributed else self.gen
        self.run_dir = resume_dir
        self.start_step = resume_step or 0
        self.last_saved = resume_step
        self.last_losses: dict[str, float] = {}
        self._preview_frozen: np.ndarray | None = None
        if resume_dir is not None:
            self._load_state(resume_dir / "checkpoints" / f"{resume_step:06d}.state.safetensors")
        else:
            torch.manual_seed(cfg.seed)  # the generators' random noise; seeded after all networks are built

    # ------------------------------------------------------------------------------------------------------
    # Pieces

    @torch.no_grad()
    def _source_samples(self, n: int) -> torch.Tensor:
        """Frozen-generator images [n, 3, R, R] for the image-guided source anchor (own seed, const noise)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        z = torch.randn(n, self.G_frozen.z_dim, generator=g)
        out = []
        for i in range(0, n, 8):
            zz = z[i: i + 8].to(self.frozen_device)
            out.append(self.G_frozen(zz, noise_mode="const").to(self.device))
        return torch.cat(out)

    def _autocast(self):
        if self.cfg.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16)

    def _sample_ws(self) -> torch.Tensor:
        """Training codes [batch, num_ws, w_dim] (no truncation; style mixing with probability `mixing`)."""
        cfg, G = self.cfg, self.G_train
        z = torch.randn(cfg.batch, G.z_dim, generator=self.gen)
        mix = bool(torch.rand((), generator=self.gen) < cfg.mixing) if cfg.mixing > 0 else False
        sl = self.local  # the global batch's codes are drawn on every rank; this rank maps its slice
        with torch.no_grad():
            ws = G.broadcast(G.mapping(z[sl].to(self.device)))
            if mix:
                z2 = torch.randn(cfg.batch, G.z_dim, generator=self.gen)
                crossover = int(torch.randint(1, G.num_ws, (), generator=self.gen))
                ws = mix_styles(ws, G.broadcast(G.mapping(z2[sl].to(self.device))), crossover)
        return ws

    def _choose_units(self) -> list[str]:
        """Adaptive layer selection for this step (official: every step, from fresh samples)."""
        cfg, G = self.cfg, self.G_train
        z = torch.randn(cfg.auto_layer_batch, G.z_dim, generator=self.gen)
        with torch.no_grad():
            ws = G.broadcast(G.mapping(z.to(self.device)))
        G.requires_grad_(False)
        with self._autocast():
            latents = select_latents(G, ws, self.loss_fn.global_objective, cfg.auto_layer_iters, cfg.auto_layer_k,
                                     self.candidates, noise_mode=cfg.noise_mode)
        latents = dist.broadcast_object(latents, self.env)  # every rank trains rank 0's choice
        self.last_latents = latents
        return units_for_latents(G.cfg, latents, cfg.phase, cfg.train_torgb)

    def _set_trainable(self, units: list[str]) -> None:
        chosen = set(units)
        for p, u in zip(self.param_list, self.param_units):
            p.requires_grad_(u in chosen)

    # ------------------------------------------------------------------------------------------------------
    # State

    def _state_path(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"{step:06d}.state.safetensors"

    def _save(self, step: int) -> None:
        """Native checkpoint + rosinality .pt + resume state for `step` (each written atomically)."""
        from safetensors.torch import save as st_save
        ck_dir = self.run_dir / "checkpoints" / f"{step:06d}"
        meta = {"method": "stylegan-nada", "step": step, "source_checkpoint": str(self.cfg.checkpoint),
                "source_sha256": self.source_sha256, "source": self.cfg.source, "target": self.cfg.target,
                "style_images": self.style_names, "clip": list(self.cfg.clip), "run": self.run_dir.name}
        # A directory without its resume state is the remains of an interrupted save: replace it.
        save_native(ck_dir, self.G_train, meta=meta, overwrite=not self._state_path(step).is_file())
        save_rosinality(self.run_dir / "checkpoints" / f"{step:06d}.pt", self.G_train)

        tensors: dict[str, torch.Tensor] = {"rng/cpu": torch.get_rng_state(), "rng/gen": self.gen.get_state()}
        for dev in {self.device, self.frozen_device}:
            if dev.type == "cuda":
                tensors[f"rng/cuda{dev.index or 0}"] = torch.cuda.get_rng_state(dev).cpu()
        names = [n for n, _ in self.params]
        for idx, st in self.optimizer.state_dict()["state"].items():
            for key, value in st.items():
                t = value if torch.is_tensor(value) else torch.tensor(float(value))
                tensors[f"adam/{names[idx]}/{key}"] = t.detach().cpu().contiguous()
        info = {"format": STATE_FORMAT, "step": step, "params": names,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        atomic_write_bytes(self._state_path(step), st_save(tensors, metadata={"info": json.dumps(info)}))
        self.last_saved = step

    def _load_state(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
        if info.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a stylecast NADA resume state")
        tensors = load_file(str(path))
        names = [n for n, _ in self.params]
        if info.get("params") != names:
            raise ValueError(f"{path}: the trainable parameters differ from this run's configuration")
        sd = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for idx, name in enumerate(names):
            entry = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam/{name}/")}
            if entry:
                state[idx] = entry
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        torch.set_rng_state(tensors["rng/cpu"])
        self.gen.set_state(tensors["rng/gen"])
        for dev in {self.device, self.frozen_device}:
            key = f"rng/cuda{dev.index or 0}"
            if dev.type == "cuda" and key in tensors:
                torch.cuda.set_rng_state(tensors[key], dev)
        if self.scaler is not None and info.get("scaler"):
            self.scaler.load_state_dict(info["scaler"])

    # ------------------------------------------------------------------------------------------------------
    # Previews and logs

    @torch.no_grad()
    def _preview(self, step: int) -> None:
        cfg = self.cfg
        z = seeds_to_z(list(cfg.preview_seeds), self.G_train.z_dim)
        if self._preview_frozen is None:
            self._preview_frozen = to_uint8(self.G_frozen(z.to(self.frozen_device), psi=cfg.sample_truncation,
                                                          noise_mode="const"))
        trained = to_uint8(self.G_train(z.to(self.device), psi=cfg.sample_truncation, noise_mode="const"))
        grid = make_grid(np.concatenate([self._preview_frozen, trained]), cols=len(cfg.preview_seeds))
        save_png(self.run_dir / "samples" / f"{step:06d}.png", grid)

    def run_document(self) -> dict[str, Any]:
        """config.json: the resolved configuration and what it resolved to."""
        return {"format": RUN_FORMAT, "config": self.cfg.to_dict(),
                "source": {"path": str(self.cfg.checkpoint), "sha256": self.source_sha256,
                           "format": self.source_format, "resolution": self.G_train.resolution,
                           "num_ws": self.G_train.num_ws},
                "devices": {"device": str(self.device), "frozen_device": str(self.frozen_device)},
                "clip": self.bank.describe(), "style_images": self.style_names,
                "layers": {"adaptive": self.adaptive, "units": self.units, "candidate_latents": self.candidates}}

    # ------------------------------------------------------------------------------------------------------
    # Training

    def train(self) -> NadaResult:
        """Run (or continue) the loop up to cfg.iters; returns where the outputs are."""
        cfg = self.cfg
        main = self.env.is_main
        if self.run_dir is None:
            if main:
                name = f"nada-{cfg.source}-to-{cfg.target or 'style'}"
                self.run_dir = next_run_dir(cfg.outdir, name[:80])
                atomic_write_json(self.run_dir / "config.json", self.run_document())
                (self.run_dir / "log.jsonl").write_text("")
                if cfg.output_interval:
                    self._preview(0)
            self.run_dir = dist.broadcast_object(self.run_dir, self.env)
        elif main:
            self._truncate_log(self.start_step)
        writer = self._tensorboard() if main else None
        bar = None
        if self.progress and main:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iters, initial=self.start_step, desc="nada", unit="it", dynamic_ncols=True)
        if not self.adaptive:
            self._set_trainable(self.units)
        try:
            for step in range(self.start_step, cfg.iters):
                self._one_step(step + 1, writer, bar)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        final = self.run_dir / "checkpoints" / f"{cfg.iters:06d}"
        return NadaResult(self.run_dir, final, final.with_suffix(".pt"), cfg.iters, self.last_losses)

    def _one_step(self, step: int, writer: Any, bar: Any) -> None:
        cfg = self.cfg
        main = self.env.is_main
        t0 = time.perf_counter()
        if self.env.distributed:  # per-sample randomness of this rank and step (resume stays exact)
            torch.manual_seed(dist.seed_for(cfg.seed, step, 0xA7A, 0, self.env.rank))
            self.gen_local.manual_seed(dist.seed_for(cfg.seed, step, 0xA7A, 1, self.env.rank))
        units = self._choose_units() if self.adaptive else self.units
        if self.adaptive:
            self._set_trainable(units)
        ws = self._sample_ws()
        with self._autocast():
            with torch.no_grad():
                img_frozen = self.G_frozen.synthesis(ws.to(self.frozen_device), noise_mode=cfg.noise_mode)
                img_frozen = img_frozen.to(self.device).float()
                if self.jitter:
                    img_frozen = img_frozen + self.jitter * torch.randn(img_frozen.shape,
                                                                        generator=self.gen_local).to(self.device)
            img_train = self.G_train.synthesis(ws, noise_mode=cfg.noise_mode)
            loss, parts = self.loss_fn(img_frozen, img_train.float(), self.gen_local)
        parts = dist.all_reduce_mean(parts, self.env)  # the global batch's losses (equal slices)
        if not math.isfinite(parts["loss"]):
            self._diverged(step, f"loss is {parts['loss']} ({_fmt(parts)})")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            dist.all_reduce_grads_mean(self.param_list, self.env)  # before unscale_: every rank sees any inf
            self.scaler.unscale_(self.optimizer)  # inf grads here are fp16 overflow: the scaler skips the step
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            dist.all_reduce_grads_mean(self.param_list, self.env)
            if not _finite_grads(self.param_list):
                self._diverged(step, f"gradients are NaN/Inf (loss {_fmt(parts)})")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_losses = parts
        dt = time.perf_counter() - t0
        record = {"step": step, **parts, "sec": round(dt, 4)}
        if self.adaptive:
            record["latents"] = self.last_latents
        if main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in parts.items():
                writer.add_scalar(f"loss/{k}", v, step)
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()}, refresh=False)
            bar.update(1)
        if self.callback is not None:
            self.callback(step, {"losses": parts, "units": list(units), "G": self.G_train, "sec": dt})
        if main and cfg.output_interval and (step % cfg.output_interval == 0 or step == cfg.iters):
            self._preview(step)
        if (cfg.save_interval and step % cfg.save_interval == 0) or step == cfg.iters:
            if main:
                self._save(step)
            else:
                self.last_saved = step
            dist.barrier(self.env)

    def _diverged(self, step: int, what: str) -> None:
        """Stop: keep every good checkpoint, save the pre-step weights if they are good and unsaved."""
        good = step - 1
        if self.env.is_main and good > 0 and good != self.last_saved and not self._state_path(good).is_file() \
                and _finite_params(self.params):
            self._save(good)
        last = self.last_saved
        where = (f"last good checkpoint: {self.run_dir / 'checkpoints' / f'{last:06d}'}" if last
                 else "no checkpoint was saved before it")
        raise NadaDivergedError(f"training diverged at step {step}: {what}; {where}. Try a lower --lr, fewer "
                                "trainable layers or --amp off")

    def _truncate_log(self, step: int) -> None:
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())

    def _tensorboard(self) -> Any:
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("--tensorboard requested but the tensorboard package is not installed "
                          "(pip install tensorboard); continuing without it", RuntimeWarning, stacklevel=2)
            return None
        return SummaryWriter(str(self.run_dir / "tb"))


def _fmt(parts: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in parts.items())


# ----------------------------------------------------------------------------------------------------------
# Entry points


def train_nada(cfg: NadaConfig, *, progress: bool = True,
               callback: Callable[[int, dict[str, Any]], None] | None = None,
               env: dist.DistEnv | None = None) -> NadaResult:
    """Train a fresh run into a new numbered directory under cfg.outdir.

    Args:
        env: the torchrun job (training.distributed.init); None = one process.
    Raises:
        ValueError / FileNotFoundError: bad inputs (before anything is written).
        NadaDivergedError: NaN / Inf during training (earlier checkpoints stay).
    """
    return NadaTrainer(cfg, progress=progress, callback=callback, env=env).train()


def read_run_config(run_dir: str | Path) -> NadaConfig:
    """The resolved NadaConfig of a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a NADA run directory (no config.json)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != RUN_FORMAT:
        raise ValueError(f"{path}: not a stylecast NADA run (format {fmt!r}, expected {RUN_FORMAT!r})")
    return NadaConfig.from_dict(doc["config"])


def resume_nada(run_dir: str | Path, *, iters: int | None = None, device: str | None = None,
                frozen_device: str | None = None, amp: str | None = None, tensorboard: bool | None = None,
                progress: bool = True, callback: Callable[[int, dict[str, Any]], None] | None = None,
                env: dist.DistEnv | None = None) -> NadaResult:
    """Continue a run from its latest complete checkpoint (same losses and weights as an uninterrupted run).

    Args:
        iters: a new total number of steps (to extend a finished run); default: the run's own.
        device, frozen_device, amp, tensorboard: override where / how it runs (not what it computes).
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    doc = json.loads((run_dir / "config.json").read_text())
    changes: dict[str, Any] = {}
    if iters is not None:
        changes["iters"] = iters
    if device is not None:
        changes["device"] = device
    if frozen_device is not None:
        changes["frozen_device"] = frozen_device
    if amp is not None:
        changes["amp"] = amp
    if tensorboard is not None:
        changes["tensorboard"] = tensorboard
    cfg = dataclasses.replace(cfg, **changes)
    steps = _step_dirs(run_dir)
    if not steps:
        raise ValueError(f"{run_dir} has no complete checkpoint to resume from")
    step = steps[-1]
    if step > cfg.iters:
        raise ValueError(f"{run_dir} is already at step {step}, past --iters {cfg.iters}")
    from training.checkpoints import checkpoint_sha256
    sha = checkpoint_sha256(cfg.checkpoint) if Path(cfg.checkpoint).exists() else None
    if sha is None:
        raise FileNotFoundError(f"the run's source checkpoint is gone: {cfg.checkpoint}")
    if sha != doc.get("source", {}).get("sha256"):
        raise ValueError(f"the source checkpoint {cfg.checkpoint} changed since the run started (sha256 differs)")
    if step == cfg.iters:
        final = run_dir / "checkpoints" / f"{step:06d}"
        return NadaResult(run_dir, final, final.with_suffix(".pt"), step, {})
    trainer = NadaTrainer(cfg, progress=progress, callback=callback, resume_dir=run_dir, resume_step=step, env=env)
    if changes and (env is None or env.is_main):
        doc["config"] = trainer.cfg.to_dict()
        atomic_write_json(run_dir / "config.json", doc)
    return trainer.train()


__all__ = ["NadaConfig", "NadaDivergedError", "NadaResult", "NadaTrainer", "OFFICIAL_BETA2", "OFFICIAL_LR",
           "load_style_images", "read_run_config", "resume_nada", "train_nada"]
