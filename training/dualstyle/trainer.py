"""DualStyleGAN progressive fine-tuning (Yang et al., "Pastiche Master: Exemplar-Based High-Resolution Portrait
Style Transfer", CVPR 2022, Sec. 3.2 and the official pretrain_dualstylegan.py / finetune_dualstylegan.py):
Stage I/II pretraining on style-mixed faces of the base generator, Stage III on a style dataset. Only the
extrinsic path (structure mapping, ModRes, colour transforms) trains; the base generator is frozen.

Stage I (colour transfer on the source domain) is the initialisation itself: ModRes blocks start near zero and
colour transforms at the identity (DualStyleGAN.init_extrinsic_path), so the model starts as the base generator.

Stage II (PretrainRun), per step with z1, z2 ~ N(0, I): target = g(w1[:l] ++ w2[l:]) with the injection index
l = r+1, r, r-1 over three phases (official 7 -> 6 -> 5 for iters/10, iters/10, iters steps); the model renders
G(w1, exstyle = w2) (every `subspace_freq`-th step exstyle = E(g(z2)) when an encoder is given) and learns
    0.1 * L_adv + sum_{relu1_1, relu2_1, relu3_1} 0.5 * |VGG19(fake) - VGG19(target)|_1
against a discriminator on real faces (--data) or, without data, on samples of the base generator.

Stage III (DualFinetuneRun) on style images S with their codes (z+_e, z+_i) from destylization: every
`subspace_freq`-th step (official 2) is unpaired (random z with style mixing 0.9, random jittered exstyle), the
others paired (z+_i with colour latents r+2.. resampled, target S); the generator loss is
    L_adv + 0.25 L_FM(relu2_1, relu3_1) + 0.25 L_CX(relu3_1, h 0.2) + 1.0 L_perc (paired only;
    0.5 relu2_1 + 1.0 relu3_1) + 1.0 L_ID(fake, g(w)) + 0.01 sum ||theta_res||.
Extrinsic codes are mapped to W+ once and jittered with N(0, 0.1) in W+, as the official code does.

Both stages: logistic D loss with lazy R1 (gamma 10 every 16), lazy path-length regularisation (weight 2 every
4, on the intrinsic ws), Adam lr 0.002 with the lazy-regularisation ratios, betas (0, 0.99), EMA of the
extrinsic path with decay 0.5 ** (32 / 10000), all extrinsic weights 1 in training (the official forward's own
default; sample grids use the inference default [0.75] * (r+1) + [1] * rest).

Run directory (numbered, never overwritten):

    config.json                          resolved config, input sha256s, where D came from (written first)
    stats.jsonl                          one line of losses per step
    samples/grid-NNNNNN.png              content (rows) x style (columns) grids of the EMA model; row 0 = the
                                         style images, column 0 = the content images
    network-snapshot-NNNNNN/             native DualStyleGAN (EMA)  -> load_dualstylegan, stylize, export
    network-snapshot-NNNNNN.pt           the official generator.pt layout ({"g_ema": ...})
    exstyle_code.npy / .safetensors      (Stage III) the extrinsic codes the model was trained with
    state/                               extrinsic path (train + EMA), D, Adam tensors, step: --resume

Determinism: every random draw of step t comes from a generator seeded with (seed, t), and the draws always cover
the whole global batch, so a resumed run equals an uninterrupted one bit for bit, and under torchrun every
process keeps its slice of the same global batch (training.distributed), so N processes train like one with the
same global batch (up to float reduction order). With --noise-mode random the per-layer noise comes from the
torch RNG instead (resume stays exact; multi-process runs then match single-process ones only in distribution).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.files import atomic_directory, next_run_dir
from training import distributed as dist_utils
from training.finetune.losses import d_logistic_loss, g_nonsaturating_loss, r1_loss
from training.finetune.trainer import load_optimizer_tensors, optimizer_tensors, step_seed
from training.generate import to_uint8
from training.networks.stylegan2 import Discriminator, DiscriminatorConfig, Generator, mix_styles, seeds_to_z

from .checkpoints import load_dualstylegan, load_exstyle_codes, save_dualstylegan, save_exstyle_codes, save_official
from .common import (CodeEncoder, DualStyleDivergedError, LossNets, append_jsonl, check_codes, codes_tensor,
                     colour_start, config_to_dict, grid_with_headers, inject_schedule, load_paired_images,
                     loss_view, read_run_config, truncate_jsonl, write_run_config)
from .destylize import CX_BAND_WIDTH
from .losses import contextual_loss, feature_matching_loss
from .model import DualStyleGAN, default_weights

PRETRAIN_FORMAT = "stylecast.dualstylegan-pretrain/v1"
FINETUNE_FORMAT = "stylecast.dualstylegan-finetune/v1"
STATE_FORMAT = "stylecast.dualstylegan-state/v1"
#: Official EMA decay of the extrinsic path: accumulate(g_ema.res, g.res, 0.5 ** (32 / (10 * 1000))).
EMA_DECAY = 0.5 ** (32 / 10_000)
#: Official per-layer weights of the perceptual losses on VGG19 (relu1_1, relu2_1, relu3_1).
PRETRAIN_PERC_LAYERS = (0.5, 0.5, 0.5)
FINETUNE_PERC_LAYERS = (0.0, 0.5, 1.0)
NOISE_MODES = ("const", "random", "none")


# ----------------------------------------------------------------------------------------------------------
# Configurations


def _check_common(cfg: Any) -> None:
    ints = {"batch": 1, "r1_interval": 1, "pl_interval": 1, "pl_batch_shrink": 1, "subspace_freq": 1,
            "loss_size": 16, "snapshot_every": 1, "sample_every": 0}
    for name, lo in ints.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    for name in ("adv_weight", "perc_weight", "r1_gamma", "pl_weight"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if not 0 <= cfg.mixing <= 1:
        raise ValueError(f"--mixing must be a probability in [0, 1], got {cfg.mixing}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0 < cfg.pl_decay <= 1:
        raise ValueError(f"pl_decay must be in (0, 1], got {cfg.pl_decay}")
    if cfg.noise_mode not in NOISE_MODES:
        raise ValueError(f"--noise-mode must be one of {NOISE_MODES}, got {cfg.noise_mode!r}")
    if not cfg.sample_seeds:
        raise ValueError("at least one sample seed is needed")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError("--seed must be in 0..2**32-1")


@dataclass(frozen=True)
class PretrainConfig:
    """Stage I + II (defaults: the official pretrain_dualstylegan.py; see the module docstring)."""

    checkpoint: str                        # base generator (e.g. FFHQ)
    data: str | None = None                # real faces for D (official: FFHQ); None = base-generator samples
    encoder: str | None = None             # pSp / e4e: every subspace_freq-th step exstyle = E(g(z2))
    encoder_space: str | None = None
    discriminator: str | None = None       # a checkpoint holding D; None = the base checkpoint's D, else fresh
    res_index: int = 6
    phase_iters: tuple[int, ...] = (300, 300, 3000)  # official --iter 3000: iter/10, iter/10, iter
    inject: tuple[int, ...] | None = None  # per phase; None = (r+1, r, r-1)
    batch: int = 4
    lr: float = 0.002
    adv_weight: float = 0.1
    perc_weight: float = 1.0
    r1_gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    mixing: float = 0.9                    # style mixing of the path-length batch
    subspace_freq: int = 4
    ema_decay: float = EMA_DECAY
    noise_mode: str = "const"
    mirror: bool = True                    # x-flip half of the --data images (official RandomHorizontalFlip)
    loss_size: int = 256
    vgg19_weights: str | None = None
    snapshot_every: int = 3000
    sample_every: int = 300
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    style_seeds: tuple[int, ...] = (10, 11, 12, 13)
    invert_steps: int = 300
    outdir: str = "runs"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase_iters", tuple(int(i) for i in self.phase_iters))
        object.__setattr__(self, "sample_seeds", tuple(int(s) for s in self.sample_seeds))
        object.__setattr__(self, "style_seeds", tuple(int(s) for s in self.style_seeds))
        if self.inject is not None:
            object.__setattr__(self, "inject", tuple(int(i) for i in self.inject))
        _check_common(self)
        if not self.phase_iters or any(i < 0 for i in self.phase_iters) or sum(self.phase_iters) < 1:
            raise ValueError(f"phase iterations must be >= 0 with a positive total, got {self.phase_iters}")
        if self.inject is not None and len(self.inject) != len(self.phase_iters):
            raise ValueError(f"one injection index per phase is needed, got {self.inject} for {self.phase_iters}")
        if not self.style_seeds:
            raise ValueError("at least one style seed is needed")

    @property
    def total(self) -> int:
        return sum(self.phase_iters)

    @staticmethod
    def official_phases(iters: int) -> tuple[int, int, int]:
        """The official schedule for --iter N: N // 10 steps at r+1, N // 10 at r, N at r-1."""
        return (iters // 10, iters // 10, iters)


@dataclass(frozen=True)
class DualFinetuneConfig:
    """Stage III (defaults: the official finetune_dualstylegan.py; its README runs 1500 iterations)."""

    checkpoint: str                        # pretrained DualStyleGAN (native dir or official generator.pt)
    data: str                              # the style images
    exstyle: str                           # their extrinsic codes (destylize: exstyle_code.npy / .safetensors)
    instyle: str                           # their intrinsic codes (destylize: instyle_code.*)
    discriminator: str | None = None       # a checkpoint holding D (e.g. the style-finetuned G); else fresh
    iters: int = 1500
    batch: int = 4
    lr: float = 0.002
    adv_weight: float = 1.0
    fm_weight: float = 0.25
    cx_weight: float = 0.25
    perc_weight: float = 1.0
    id_weight: float = 1.0
    reg_weight: float = 0.01
    r1_gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    mixing: float = 0.9
    subspace_freq: int = 2
    jitter: float = 0.1                    # std of the N(code, jitter) noise on extrinsic codes in W+
    ema_decay: float = EMA_DECAY
    noise_mode: str = "const"
    mirror: bool = True
    loss_size: int = 256
    id: str = "dlib"
    vgg19_weights: str | None = None
    snapshot_every: int = 100
    snapshot_begin: int = 1000             # official save_begin (the last step is always saved)
    sample_every: int = 100
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    sample_styles: int = 4
    outdir: str = "runs"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_seeds", tuple(int(s) for s in self.sample_seeds))
        _check_common(self)
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"--iters must be an integer >= 1, got {self.iters!r}")
        for name in ("fm_weight", "cx_weight", "id_weight", "reg_weight", "jitter"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.sample_styles < 1 or self.snapshot_begin < 0:
            raise ValueError("sample_styles must be >= 1 and snapshot_begin >= 0")

    @property
    def total(self) -> int:
        return self.iters


# ----------------------------------------------------------------------------------------------------------
# Small pieces


def d_logits(D: Discriminator, img: torch.Tensor) -> torch.Tensor:
    """D(img) [N, 1] with minibatch-stddev groups made of *contiguous* samples.

    The stock layer groups sample i with i + N/g, i + 2N/g, ...; reordering the batch first makes every group a
    contiguous block of g samples, so when each process holds a contiguous slice whose size is a multiple of g,
    the groups (and so the logits) are the same in one process and in N processes.
    """
    n = img.shape[0]
    g = min(D.cfg.mbstd_group, n)
    while n % g:
        g -= 1
    x = img.reshape(n // g, g, *img.shape[1:]).transpose(0, 1).reshape(img.shape)
    out = D(x)  # row m * (n / g) + j belongs to sample j * g + m
    return out.reshape(g, n // g, -1).transpose(0, 1).reshape(n, -1)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _finite_grads(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


@dataclass
class _Batch:
    """One slice of a global batch: intrinsic ws, extrinsic ws, real or target images (any may be None)."""

    ws: torch.Tensor
    exw: torch.Tensor
    real: torch.Tensor | None = None
    paired: bool = False


# ----------------------------------------------------------------------------------------------------------
# The shared GAN loop


class _GanRun:
    """Extrinsic-path GAN training shared by Stage II and III. Subclasses draw the batches and add losses."""

    FORMAT = ""
    KIND = ""

    def __init__(self, cfg: Any, model: DualStyleGAN, D: Discriminator, nets: LossNets,
                 env: dist_utils.DistEnv, d_source: str):
        self.cfg, self.env, self.d_source = cfg, env, d_source
        self.device = dev = env.device
        self.run_dir: Path | None = None
        self.inputs: dict[str, str | None] = {}
        model.generator.requires_grad_(False).eval()
        self.model = model.to(dev)
        self.G = self.model.generator
        self.dtype = next(self.G.parameters()).dtype  # float32; float64 works too (tests compare exactly)
        # The EMA model shares the frozen base generator and keeps its own extrinsic path.
        with torch.random.fork_rng(devices=[]):
            self.ema = DualStyleGAN(model.cfg, self.G).to(dev, self.dtype)
        self.ema.load_state_dict(self._extrinsic_state(self.model), strict=False)
        self.ema.eval().requires_grad_(False)
        self.ex_named = [(n, p) for n, p in self.model.named_parameters() if not n.startswith("generator.")]
        self.ex_params = [p for _, p in self.ex_named]
        for p in self.ex_params:
            p.requires_grad_(True)
        self.D = D.to(dev).train()
        self.d_named = list(self.D.named_parameters())
        self.d_params = [p for _, p in self.d_named]
        self.opt_G = self._adam(self.ex_params, cfg.pl_interval if cfg.pl_weight > 0 else None)
        self.opt_D = self._adam(self.d_params, cfg.r1_interval if cfg.r1_gamma > 0 else None)
        self.nets = nets.to(dev)
        self.pl_mean = torch.zeros([], dtype=torch.float32)
        self.step = 0
        self.last_snapshot: Path | None = None
        self.ones = torch.ones(model.num_ws, device=dev, dtype=self.dtype)
        self._check_world()

    # ---- construction helpers

    def _adam(self, params: list[torch.nn.Parameter], interval: int | None) -> torch.optim.Adam:
        # Lazy regularisation: lr and the betas' time constants scaled by k / (k + 1) (official g/d_reg_ratio).
        c = interval / (interval + 1) if interval else 1.0
        return torch.optim.Adam(params, lr=self.cfg.lr * c, betas=(0.0, 0.99 ** c), eps=1e-8)

    def _check_world(self) -> None:
        cfg, env = self.cfg, self.env
        if not env.distributed:
            return
        dist_utils.check_batch(cfg.batch, env)
        local = cfg.batch // env.world_size
        if local % self.D.cfg.mbstd_group:
            raise ValueError(f"--batch {cfg.batch} over {env.world_size} processes gives {local} images per process, "
                             f"not a multiple of the discriminator's minibatch-stddev group "
                             f"({self.D.cfg.mbstd_group}); use a larger --batch")
        pl = max(1, cfg.batch // cfg.pl_batch_shrink)
        if cfg.pl_weight > 0 and pl % env.world_size:
            raise ValueError(f"the path-length batch ({pl} = --batch / {cfg.pl_batch_shrink}) must split evenly over "
                             f"{env.world_size} processes")

    @staticmethod
    def _extrinsic_state(model: DualStyleGAN) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if not k.startswith("generator.")}

    @property
    def total(self) -> int:
        return self.cfg.total

    # ---- subclass interface

    def d_batch(self, gen: torch.Generator) -> _Batch:
        raise NotImplementedError

    def g_batch(self, gen: torch.Generator) -> _Batch:
        raise NotImplementedError

    def pl_batch(self, gen: torch.Generator) -> _Batch:
        raise NotImplementedError

    def g_losses(self, batch: _Batch, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generator losses besides the adversarial one (already weighted)."""
        raise NotImplementedError

    def reg_due(self) -> tuple[bool, bool]:
        """(R1 due, path length due) for this step."""
        raise NotImplementedError

    def sample_inputs(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(content ws [C, L, D], style exw [S, L, D], style header images [S, H, W, 3] uint8)."""
        raise NotImplementedError

    # ---- pieces

    def local(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """This process's rows of a tensor drawn for the whole global batch."""
        return x[dist_utils.local_slice(x.shape[0] if batch is None else batch, self.env)].to(self.device)

    def map_z(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, z_dim] -> ws [N, num_ws, w_dim] (no truncation)."""
        return self.G.mapping(z.to(self.device)).to(self.dtype).unsqueeze(1).repeat(1, self.model.num_ws, 1)

    def mixed_ws(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """Global draws of n intrinsic codes with style mixing (probability cfg.mixing, one random crossover per
        batch, as rosinality's mixing_noise) -> this process's ws."""
        z1, z2 = _randn(gen, n, self.G.z_dim), _randn(gen, n, self.G.z_dim)
        mix = bool(torch.rand((), generator=gen) < self.cfg.mixing)
        cross = int(torch.randint(1, self.model.num_ws, (), generator=gen)) if self.model.num_ws > 1 else 1
        with torch.no_grad():
            ws = self.map_z(self.local(z1, n))
            if mix and self.cfg.mixing > 0:
                ws = mix_styles(ws, self.map_z(self.local(z2, n)), cross)
        return ws

    def render(self, model: DualStyleGAN, batch: _Batch) -> torch.Tensor:
        return model(batch.ws, batch.exw, self.ones, noise_mode=self.cfg.noise_mode)

    def _sync(self, params: list[torch.nn.Parameter]) -> None:
        # Parameters a loss does not reach (e.g. D's output bias under R1) get zero gradients rather than None, as
        # with the official zero_grad(): Adam then treats them the same in every update, and whether autograd
        # materialises such a gradient (which can depend on the per-process batch size) does not matter.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dist_utils.all_reduce_grads_mean(params, self.env)

    def _guard(self, parts: dict[str, float], params: list[torch.nn.Parameter], what: str) -> None:
        bad = not all(math.isfinite(v) for v in parts.values()) or not _finite_grads(params)
        if dist_utils.any_true(bad, self.env):
            where = (f"last good snapshot: {self.last_snapshot}" if self.last_snapshot is not None
                     else "no snapshot was saved before it")
            vals = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
            raise DualStyleDivergedError(f"{self.KIND} diverged at step {self.step} in the {what} update ({vals}); "
                                         f"{where}. Try a lower --lr")

    # ---- one step

    def train_step(self) -> dict[str, float]:
        """One D update (+ lazy R1), one G update (+ lazy path length), EMA; returns this step's losses."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step))
        if cfg.noise_mode == "random":
            torch.manual_seed(step_seed(cfg.seed, self.step) ^ self.env.rank)
        r1_due, pl_due = self.reg_due()
        out: dict[str, float] = {}

        # D: logistic loss on reals vs fakes of the current extrinsic path.
        self.D.requires_grad_(True)
        batch = self.d_batch(gen)
        with torch.no_grad():
            fake = self.render(self.model, batch)
        real_logits, fake_logits = d_logits(self.D, batch.real), d_logits(self.D, fake)
        loss_d = self.adv_weight_d * d_logistic_loss(real_logits, fake_logits)
        self.opt_D.zero_grad(set_to_none=True)
        loss_d.backward()
        self._sync(self.d_params)
        out.update(loss_D=float(loss_d.detach()), D_real=float(real_logits.detach().mean()),
                   D_fake=float(fake_logits.detach().mean()))
        self._guard({"loss_D": out["loss_D"]}, self.d_params, "discriminator")
        self.opt_D.step()
        if r1_due:
            real = batch.real.detach().requires_grad_(True)
            loss_r1 = r1_loss(real, d_logits(self.D, real), cfg.r1_gamma, cfg.r1_interval)
            self.opt_D.zero_grad(set_to_none=True)
            loss_r1.backward()
            self._sync(self.d_params)
            out["loss_R1"] = float(loss_r1.detach()) / max(cfg.r1_gamma / 2 * cfg.r1_interval, 1e-12)
            self._guard({"loss_R1": out["loss_R1"]}, self.d_params, "R1")
            self.opt_D.step()

        # G: adversarial + the stage's losses, on the extrinsic path only.
        self.D.requires_grad_(False)
        batch = self.g_batch(gen)
        fake = self.render(self.model, batch)
        terms = {"adv": cfg.adv_weight * g_nonsaturating_loss(d_logits(self.D, fake))}
        terms.update(self.g_losses(batch, fake))
        loss_g = sum(terms.values())
        self.opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        self._sync(self.ex_params)
        out["loss_G"] = float(loss_g.detach())
        out.update({f"G_{k}": float(v.detach()) for k, v in terms.items()})
        self._guard({"loss_G": out["loss_G"]}, self.ex_params, "generator")
        self.opt_G.step()

        if pl_due:
            out.update(self._path_length(gen))

        # EMA of the extrinsic path (official: accumulate(g_ema.res, g.res, decay)).
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                if p.requires_grad:
                    p_ema.copy_(p.detach().lerp(p_ema, cfg.ema_decay))
        self.step += 1
        return out

    @property
    def adv_weight_d(self) -> float:
        return self.cfg.adv_weight

    def _path_length(self, gen: torch.Generator) -> dict[str, float]:
        """Lazy path-length regularisation on the intrinsic ws (official g_path_regularize), with the noise drawn
        for the whole global batch and the running mean updated with the global mean length."""
        cfg = self.cfg
        batch = self.pl_batch(gen)
        n_global = max(1, cfg.batch // cfg.pl_batch_shrink)
        R = self.G.resolution
        pl_noise = self.local(_randn(gen, n_global, self.G.cfg.img_channels, R, R), n_global) / math.sqrt(R * R)
        ws = batch.ws.detach().requires_grad_(True)
        img = self.model(ws, batch.exw, self.ones, noise_mode=cfg.noise_mode)
        (grad,) = torch.autograd.grad((img * pl_noise).sum(), ws, create_graph=True)
        lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()  # [n]
        mean_len = dist_utils.all_reduce_mean({"len": float(lengths.detach().mean())}, self.env)["len"]
        self.pl_mean = self.pl_mean.lerp(torch.tensor(mean_len, dtype=torch.float32), cfg.pl_decay)
        penalty = (lengths - self.pl_mean.to(lengths)).square().mean()
        loss = penalty * cfg.pl_weight * cfg.pl_interval
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self._sync(self.ex_params)
        parts = {"loss_PL": float(penalty.detach()), "pl_mean": float(self.pl_mean)}
        self._guard(parts, self.ex_params, "path-length")
        self.opt_G.step()
        return parts

    # ---- outputs

    @torch.no_grad()
    def sample_grid(self) -> np.ndarray:
        """Content x style grid of the EMA model with the inference default weights."""
        ws_c, exw_s, top = self.sample_inputs()
        weights = default_weights(self.model.cfg)
        left = to_uint8(self.G.synthesis(ws_c, noise_mode="const"))
        cells = []
        for i in range(ws_c.shape[0]):
            ws = ws_c[i: i + 1].expand(exw_s.shape[0], -1, -1)
            cells.append(to_uint8(self.ema(ws, exw_s, weights, noise_mode="const")))
        return grid_with_headers(None, top, left, np.stack(cells))

    def meta(self) -> dict[str, Any]:
        return {"dualstylegan": {"stage": self.KIND, "step": self.step, "run": self.run_dir.name,
                                 "inputs": self.inputs, "discriminator": self.d_source}}

    def save_snapshot(self) -> Path:
        """network-snapshot-NNNNNN/ (native) + .pt (official layout) of the EMA model (rank 0 only)."""
        name = f"network-snapshot-{self.step:06d}"
        ema = copy.deepcopy(self.ema).cpu()
        nat = self.run_dir / name
        if not nat.exists():
            save_dualstylegan(nat, ema, meta=self.meta())
        pt = self.run_dir / f"{name}.pt"
        if not pt.exists():
            save_official(pt, ema)
        self.last_snapshot = nat
        return nat

    def state_doc(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": self.KIND, "step": self.step, "pl_mean": float(self.pl_mean),
                "last_snapshot": self.last_snapshot.name if self.last_snapshot is not None else None,
                "config": config_to_dict(self.cfg)}

    def save_state(self) -> None:
        """Replace run_dir/state atomically with what resume needs (rank 0 only)."""
        ex = {k: v.detach().cpu().contiguous() for k, v in self._extrinsic_state(self.model).items()}
        ex_ema = {k: v.detach().cpu().contiguous() for k, v in self._extrinsic_state(self.ema).items()}
        d = {k: v.detach().cpu().contiguous() for k, v in self.D.state_dict().items()}
        opt = {**optimizer_tensors(self.opt_G, {id(p): n for n, p in self.ex_named}, "G"),
               **optimizer_tensors(self.opt_D, {id(p): n for n, p in self.d_named}, "D")}
        with atomic_directory(self.run_dir / "state", overwrite=True) as tmp:
            save_file(ex, str(tmp / "extrinsic.safetensors"))
            save_file(ex_ema, str(tmp / "extrinsic_ema.safetensors"))
            save_file(d, str(tmp / "discriminator.safetensors"))
            save_file(opt, str(tmp / "optimizers.safetensors"))
            (tmp / "training_state.json").write_text(json.dumps(self.state_doc(), indent=2) + "\n")

    def load_state(self, run_dir: Path) -> None:
        state = run_dir / "state"
        doc_path = state / "training_state.json"
        if not doc_path.is_file():
            raise FileNotFoundError(f"{run_dir} has no resumable state (expected {doc_path})")
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != STATE_FORMAT or doc.get("kind") != self.KIND:
            raise ValueError(f"{doc_path}: not the state of a DualStyleGAN {self.KIND} run")
        with torch.no_grad():
            for module, file in ((self.model, "extrinsic"), (self.ema, "extrinsic_ema")):
                missing, unexpected = module.load_state_dict(load_file(str(state / f"{file}.safetensors")),
                                                             strict=False)
                if unexpected or any(not k.startswith("generator.") for k in missing):
                    raise ValueError(f"{state}/{file}.safetensors does not fit this model")
            self.D.load_state_dict(load_file(str(state / "discriminator.safetensors")))
        opt = load_file(str(state / "optimizers.safetensors"))
        load_optimizer_tensors(self.opt_G, self.ex_named, opt, "G")
        load_optimizer_tensors(self.opt_D, self.d_named, opt, "D")
        self.step = int(doc["step"])
        self.pl_mean = torch.tensor(float(doc["pl_mean"]), dtype=torch.float32)
        if doc.get("last_snapshot"):
            self.last_snapshot = run_dir / doc["last_snapshot"]

    def snapshot_due(self) -> bool:
        return self.step % self.cfg.snapshot_every == 0

    # ---- the loop

    def run(self, progress: bool = True, log: Callable[[str], None] = print, until: int | None = None) -> Path:
        """Train to cfg's total (or stop after step `until`, saving the state, as an interruption would);
        returns the last snapshot directory (rank 0; other ranks get the run directory)."""
        cfg, env = self.cfg, self.env
        stop = self.total if until is None else min(until, self.total)
        main = env.is_main
        samples = self.run_dir / "samples"
        if main:
            samples.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.run_dir / "stats.jsonl", "step", self.step)
            if self.step == 0 and cfg.sample_every:
                from training.generate import save_png
                save_png(samples / "grid-000000.png", self.sample_grid())
        bar = None
        if progress and main:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=self.step, unit="it", desc=self.KIND, dynamic_ncols=True)
        try:
            while self.step < stop:
                t0 = time.perf_counter()
                losses = self.train_step()
                losses = dist_utils.all_reduce_mean(losses, env)
                done = self.step == self.total
                if main:
                    append_jsonl(self.run_dir / "stats.jsonl",
                                 {"step": self.step, **losses, "sec": round(time.perf_counter() - t0, 4)})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()
                                         if k in ("loss_G", "loss_D", "G_perc", "G_cx", "G_fm", "G_id")},
                                        refresh=False)
                    if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                        from training.generate import save_png
                        save_png(samples / f"grid-{self.step:06d}.png", self.sample_grid())
                    if done or self.snapshot_due():
                        snap = self.save_snapshot()
                        if bar is None:
                            log(f"step {self.step}/{self.total}: snapshot {snap.name}")
                if done or self.step == stop or self.step % cfg.snapshot_every == 0:
                    if main:
                        self.save_state()
                    dist_utils.barrier(env)
        finally:
            if bar is not None:
                bar.close()
        if main and self.step == self.total and self.last_snapshot is None:
            self.save_snapshot()  # resumed a run that had already finished
        return self.last_snapshot if self.last_snapshot is not None else self.run_dir

    # ---- run directory

    def create_run_dir(self, name: str, extra: dict[str, Any]) -> Path:
        """Rank 0 creates the numbered run directory and writes config.json; every rank learns its path."""
        run_dir = None
        if self.env.is_main:
            run_dir = next_run_dir(self.cfg.outdir, name)
            write_run_config(run_dir, self.FORMAT, self.cfg, {"inputs": self.inputs, "discriminator": self.d_source,
                                                              "world_size": self.env.world_size, **extra})
        self.run_dir = Path(dist_utils.broadcast_object(str(run_dir) if run_dir else None, self.env))
        return self.run_dir


def _sha(path: str | None) -> str | None:
    from training.checkpoints import checkpoint_sha256

    return checkpoint_sha256(path) if path else None


def _discriminator(path: str | None, fallback: Discriminator | None, G: Generator, seed: int,
                   fallback_name: str) -> tuple[Discriminator, str]:
    """D from `path` (a generator checkpoint holding one), else `fallback`, else fresh (seeded)."""
    from training.checkpoints import load_checkpoint

    if path is not None:
        ck = load_checkpoint(path, with_discriminator=True)
        if ck.D is not None:
            D, source = ck.D, f"{path}"
        else:
            D, source = None, ""
    else:
        D, source = fallback, fallback_name if fallback is not None else ""
    if D is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            D = Discriminator(DiscriminatorConfig.from_generator(G.cfg))
        what = f"{path} has no discriminator" if path is not None else "no discriminator given"
        source = f"fresh ({what})"
    if D.cfg.resolution != G.resolution:
        raise ValueError(f"the discriminator is for {D.cfg.resolution} px images, the generator makes "
                         f"{G.resolution} px")
    return D, source


def _check_inputs(doc: dict[str, Any], current: dict[str, str | None]) -> None:
    saved = doc.get("inputs", {})
    for k, sha in current.items():
        if saved.get(k) != sha:
            raise ValueError(f"--{k} changed since the run started (sha256 differs); start a new run")


# ----------------------------------------------------------------------------------------------------------
# Stage I + II


class PretrainRun(_GanRun):
    """Stage I (the extrinsic path's initialisation) + Stage II (structure transfer on style-mixed targets)."""

    FORMAT = PRETRAIN_FORMAT
    KIND = "pretrain"

    def __init__(self, cfg: PretrainConfig, model: DualStyleGAN, D: Discriminator, nets: LossNets,
                 env: dist_utils.DistEnv, d_source: str, encoder: CodeEncoder | None = None, dataset: Any = None):
        nets.require("vgg19", what="Stage II")
        if cfg.inject is None:
            if len(cfg.phase_iters) != 3:
                raise ValueError(f"{len(cfg.phase_iters)} phases need explicit injection indices (the default "
                                 "schedule r+1, r, r-1 has three)")
            cfg = replace(cfg, inject=inject_schedule(model.res_index, model.num_ws))
        bad = [i for i in cfg.inject if not 1 <= i <= model.num_ws - 1]
        if bad:
            raise ValueError(f"injection indices must be in 1..{model.num_ws - 1}, got {cfg.inject}")
        super().__init__(cfg, model, D, nets, env, d_source)
        self.encoder = encoder.to(self.device) if encoder is not None else None
        self.dataset = dataset
        self.phase_ends = np.cumsum(cfg.phase_iters).tolist()

    @classmethod
    def start(cls, cfg: PretrainConfig, nets: LossNets | None = None, env: dist_utils.DistEnv | None = None,
              progress: bool = False) -> "PretrainRun":
        """Load and validate every input (nothing is written); nets None = load the real VGG19."""
        from training.checkpoints import load_checkpoint
        from training.finetune.dataset import ImageFolderDataset

        from .common import load_code_encoder, load_loss_nets
        env = env or dist_utils.DistEnv()
        ck = load_checkpoint(cfg.checkpoint, with_discriminator=True)
        G = ck.G
        if cfg.res_index > G.num_ws - 2 or cfg.res_index % 2:
            raise ValueError(f"--res-index must be even and at most {G.num_ws - 2} for a {G.resolution} px "
                             f"generator, got {cfg.res_index}")
        D, d_source = _discriminator(cfg.discriminator, ck.D, G, cfg.seed, f"{cfg.checkpoint}")
        dataset = None
        if cfg.data is not None:
            dataset = ImageFolderDataset(cfg.data, G.resolution, mirror=cfg.mirror, seed=cfg.seed, progress=progress)
        encoder = None
        if cfg.encoder is not None:
            encoder = load_code_encoder(cfg.encoder, G, cfg.encoder_space, cfg.invert_steps, env.device)
        if nets is None:
            nets = load_loss_nets(vgg19=True, vgg19_weights=cfg.vgg19_weights, device=env.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the extrinsic path's (Stage I) initialisation
            model = DualStyleGAN.from_generator(G, res_index=cfg.res_index)
        run = cls(cfg, model, D, nets, env, d_source, encoder, dataset)
        run.inputs = {"checkpoint": _sha(cfg.checkpoint), "data": None, "encoder": _sha(cfg.encoder),
                      "discriminator": _sha(cfg.discriminator)}
        return run

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, nets: LossNets | None = None, env: dist_utils.DistEnv | None = None,
               progress: bool = False) -> "PretrainRun":
        cfg, doc = read_run_config(run_dir, PRETRAIN_FORMAT, PretrainConfig, "DualStyleGAN pretrain")
        run = cls.start(cfg, nets, env, progress)
        _check_inputs(doc, run.inputs)
        run.run_dir = Path(run_dir)
        run.load_state(run.run_dir)
        return run

    def create(self) -> Path:
        reals = f"{self.cfg.data}" if self.cfg.data else "samples of the base generator (no --data)"
        return self.create_run_dir("dualstylegan-pretrain", {
            "reals": reals, "inject": list(self.cfg.inject),
            "encoder": "none: exstyle codes are always w(z2)" if self.encoder is None else self.encoder.space})

    # ---- schedule

    def phase(self, step: int | None = None) -> tuple[int, int]:
        """(phase index, step within the phase) of a global step; the official restarts its counter per phase."""
        step = self.step if step is None else step
        start = 0
        for p, end in enumerate(self.phase_ends):
            if step < end:
                return p, step - start
            start = end
        return len(self.phase_ends) - 1, step - start

    def reg_due(self) -> tuple[bool, bool]:
        _, i = self.phase()
        cfg = self.cfg
        return cfg.r1_gamma > 0 and i % cfg.r1_interval == 0, cfg.pl_weight > 0 and i % cfg.pl_interval == 0

    # ---- batches

    def _codes(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's (ws1, exstyle w, target): drawn once, shared by the D and G updates (as the official)."""
        if getattr(self, "_cache_step", None) == self.step:
            return self._cache
        cfg, n = self.cfg, self.cfg.batch
        p, i = self.phase()
        z1, z2 = _randn(gen, n, self.G.z_dim), _randn(gen, n, self.G.z_dim)
        with torch.no_grad():
            ws1, ws2 = self.map_z(self.local(z1)), self.map_z(self.local(z2))
            if self.encoder is not None and i % cfg.subspace_freq == 0:
                exw = self.encoder.ws(self.G.synthesis(ws2, noise_mode=cfg.noise_mode))  # E(g(z2))
            else:
                exw = ws2
            target = self.G.synthesis(mix_styles(ws1, ws2, cfg.inject[p]), noise_mode=cfg.noise_mode)
        self._cache_step, self._cache = self.step, (ws1, exw, target)
        return self._cache

    def reals(self, gen: torch.Generator) -> torch.Tensor:
        n = self.cfg.batch
        sl = dist_utils.local_slice(n, self.env)
        if self.dataset is not None:
            return self.dataset.batch(self.step * n + sl.start, sl.stop - sl.start, self.device).to(self.dtype)
        z = _randn(gen, n, self.G.z_dim)
        with torch.no_grad():
            return self.G.synthesis(self.map_z(self.local(z)), noise_mode=self.cfg.noise_mode)

    def d_batch(self, gen: torch.Generator) -> _Batch:
        ws1, exw, _ = self._codes(gen)
        return _Batch(ws1, exw, self.reals(gen))

    def g_batch(self, gen: torch.Generator) -> _Batch:
        ws1, exw, target = self._codes(gen)
        return _Batch(ws1, exw, target)

    def pl_batch(self, gen: torch.Generator) -> _Batch:
        n = max(1, self.cfg.batch // self.cfg.pl_batch_shrink)
        ws = self.mixed_ws(gen, n)
        ze = _randn(gen, n, self.G.z_dim)
        with torch.no_grad():
            exw = self.map_z(self.local(ze, n))
        return _Batch(ws, exw)

    # ---- losses

    def g_losses(self, batch: _Batch, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, vgg = self.cfg, self.nets.vgg19
        with torch.no_grad():
            target_feats = vgg(loss_view(batch.real, cfg.loss_size))
        fake_feats = vgg(loss_view(fake, cfg.loss_size))
        perc = fake.new_zeros(())
        for w, layer in zip(PRETRAIN_PERC_LAYERS, vgg.layers):
            if w > 0:
                perc = perc + w * F.l1_loss(fake_feats[layer], target_feats[layer])
        return {"perc": cfg.perc_weight * perc}

    # ---- samples

    def sample_inputs(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        cfg = self.cfg
        ws_c = self.map_z(seeds_to_z(list(cfg.sample_seeds), self.G.z_dim))
        ws_s = self.map_z(seeds_to_z(list(cfg.style_seeds), self.G.z_dim))
        style = self.G.synthesis(ws_s, noise_mode="const")
        exw = self.encoder.ws(style) if self.encoder is not None else ws_s
        return ws_c, exw, to_uint8(style)


# ----------------------------------------------------------------------------------------------------------
# Stage III


class DualFinetuneRun(_GanRun):
    """Stage III: the extrinsic path learns a style dataset (paired with its destylized codes)."""

    FORMAT = FINETUNE_FORMAT
    KIND = "finetune"

    def __init__(self, cfg: DualFinetuneConfig, model: DualStyleGAN, D: Discriminator, nets: LossNets,
                 env: dist_utils.DistEnv, d_source: str, names: list[str], images: torch.Tensor,
                 exstyle: torch.Tensor, instyle: torch.Tensor):
        nets.require("vgg19", what="Stage III")
        super().__init__(cfg, model, D, nets, env, d_source)
        self.names = names
        self.images = images.to(self.dtype)  # [K, 3, R, R] on CPU
        with torch.no_grad():  # official: extrinsic z+ -> W+ once through the base mapping
            self.exw_all = model.map_extrinsic(exstyle.to(self.device, self.dtype)).to(self.dtype).cpu()
        self.instyle_all = instyle.to(self.dtype)  # [K, L, z_dim]
        self.colour = colour_start(model.res_index, model.num_ws)
        self.exstyle_codes = exstyle

    @classmethod
    def start(cls, cfg: DualFinetuneConfig, nets: LossNets | None = None, env: dist_utils.DistEnv | None = None,
              progress: bool = False) -> "DualFinetuneRun":
        from .common import load_loss_nets
        env = env or dist_utils.DistEnv()
        model = load_dualstylegan(cfg.checkpoint)
        G = model.generator
        ex = load_exstyle_codes(cfg.exstyle)
        ins = load_exstyle_codes(cfg.instyle)
        check_codes(ex, G, cfg.exstyle)
        check_codes(ins, G, cfg.instyle)
        names = list(ex)
        if sorted(names) != sorted(ins):
            only = sorted(set(names) ^ set(ins))
            raise ValueError(f"{cfg.exstyle} and {cfg.instyle} name different images (e.g. {only[:3]})")
        images = load_paired_images(cfg.data, names, G.resolution)
        D, d_source = _discriminator(cfg.discriminator, None, G, cfg.seed, "")
        if nets is None:
            nets = load_loss_nets(vgg19=True, id_spec=cfg.id, vgg19_weights=cfg.vgg19_weights, device=env.device)
        run = cls(cfg, model, D, nets, env, d_source, names, images, codes_tensor(ex, names), codes_tensor(ins, names))
        run.inputs = {"checkpoint": _sha(cfg.checkpoint), "exstyle": _sha(cfg.exstyle), "instyle": _sha(cfg.instyle),
                      "discriminator": _sha(cfg.discriminator)}
        return run

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, nets: LossNets | None = None, env: dist_utils.DistEnv | None = None,
               iters: int | None = None, progress: bool = False) -> "DualFinetuneRun":
        """Continue a run (optionally to a larger --iters)."""
        cfg, doc = read_run_config(run_dir, FINETUNE_FORMAT, DualFinetuneConfig, "DualStyleGAN finetune")
        if iters is not None:
            cfg = replace(cfg, iters=iters)
        run = cls.start(cfg, nets, env, progress)
        _check_inputs(doc, run.inputs)
        run.run_dir = Path(run_dir)
        run.load_state(run.run_dir)
        if run.step > cfg.iters:
            raise ValueError(f"{run_dir} is already at step {run.step}, past --iters {cfg.iters}")
        if iters is not None and run.env.is_main:
            doc["config"] = config_to_dict(cfg)
            write_run_config(run.run_dir, FINETUNE_FORMAT, cfg, {k: v for k, v in doc.items()
                                                                  if k not in ("format", "config")})
        return run

    def create(self) -> Path:
        run_dir = self.create_run_dir(f"dualstylegan-finetune-{Path(self.cfg.data).resolve().name}", {
            "images": self.names, "colour_start": self.colour,
            "identity_loss": "off (--id none)" if self.nets.identity is None else "on"})
        if self.env.is_main:
            codes = {n: self.exstyle_codes[i: i + 1].numpy() for i, n in enumerate(self.names)}
            save_exstyle_codes(run_dir / "exstyle_code.npy", codes)
            save_exstyle_codes(run_dir / "exstyle_code.safetensors", codes)
        return run_dir

    def reg_due(self) -> tuple[bool, bool]:
        cfg, i = self.cfg, self.step
        return cfg.r1_gamma > 0 and i % cfg.r1_interval == 0, cfg.pl_weight > 0 and i % cfg.pl_interval == 0

    def snapshot_due(self) -> bool:
        return self.step >= self.cfg.snapshot_begin and self.step % self.cfg.snapshot_every == 0

    # ---- batches

    def _exstyle(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global draws of n code indices and their W+ jitter -> (indices [n], this process's exw)."""
        ind = torch.randint(len(self.names), (n,), generator=gen)
        jit = _randn(gen, n, self.model.num_ws, self.model.w_dim) * self.cfg.jitter
        exw = self.exw_all[ind] + jit
        return ind, self.local(exw, n)

    def _paired(self, gen: torch.Generator, n: int) -> _Batch:
        """Official get_paired_data: code i's jittered exstyle, its z+_i with the colour latents resampled, S_i."""
        ind, exw = self._exstyle(gen, n)
        ins = self.instyle_all[ind].clone()
        ins[:, self.colour:] = _randn(gen, n, self.model.num_ws - self.colour, self.G.z_dim)
        with torch.no_grad():
            ws = self.model.map_intrinsic(self.local(ins, n)).to(self.dtype)
        return _Batch(ws, exw, self.local(self.images[ind], n), paired=True)

    def _unpaired(self, gen: torch.Generator, n: int, real: str) -> _Batch:
        ind, exw = self._exstyle(gen, n)
        ws = self.mixed_ws(gen, n)
        if real == "dataset":  # an independent draw from the style dataset (official lmdb loader, x-flips)
            idx = torch.randint(len(self.names), (n,), generator=gen)
            flip = torch.rand(n, generator=gen) < 0.5
            imgs = self.images[idx]
            if self.cfg.mirror:
                imgs = torch.where(flip.view(-1, 1, 1, 1), imgs.flip(3), imgs)
        else:  # the style images of the drawn codes (the targets of the style losses)
            imgs = self.images[ind]
        return _Batch(ws, exw, self.local(imgs, n))

    def _which(self) -> int:
        return self.step % self.cfg.subspace_freq

    def d_batch(self, gen: torch.Generator) -> _Batch:
        n = self.cfg.batch
        return self._unpaired(gen, n, "dataset") if self._which() == 0 else self._paired(gen, n)

    def g_batch(self, gen: torch.Generator) -> _Batch:
        n = self.cfg.batch
        return self._unpaired(gen, n, "codes") if self._which() == 0 else self._paired(gen, n)

    def pl_batch(self, gen: torch.Generator) -> _Batch:
        n = max(1, self.cfg.batch // self.cfg.pl_batch_shrink)
        ws = self.mixed_ws(gen, n)
        _, exw = self._exstyle(gen, n)
        return _Batch(ws, exw)

    # ---- losses

    def _global_mean(self, feat: torch.Tensor) -> torch.Tensor:
        """Channel mean of features over the whole global batch and all positions: [C]."""
        total = feat.detach().sum(dim=(0, 2, 3)).double()
        count = feat.shape[0] * feat.shape[2] * feat.shape[3]
        if self.env.distributed:
            import torch.distributed as tdist
            tdist.all_reduce(total)
            count *= self.env.world_size
        return (total / count).to(feat.dtype)

    def g_losses(self, batch: _Batch, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, nets = self.cfg, self.nets
        vgg = nets.vgg19
        with torch.no_grad():
            real_view = loss_view(batch.real, cfg.loss_size)
            real_feats = vgg(real_view)
        fake_view = loss_view(fake, cfg.loss_size)
        fake_feats = vgg(fake_view)
        zero = fake.new_zeros(())
        out: dict[str, torch.Tensor] = {}
        if cfg.cx_weight > 0:
            y = real_feats["relu3_1"]
            out["cx"] = cfg.cx_weight * contextual_loss(fake_feats["relu3_1"], y, band_width=CX_BAND_WIDTH,
                                                        y_mean=self._global_mean(y))
        if cfg.fm_weight > 0:
            out["fm"] = cfg.fm_weight * feature_matching_loss([fake_feats["relu2_1"], fake_feats["relu3_1"]],
                                                              [real_feats["relu2_1"], real_feats["relu3_1"]])
        if cfg.id_weight > 0 and nets.identity is not None:
            with torch.no_grad():
                content = loss_view(self.G.synthesis(batch.ws, noise_mode=cfg.noise_mode), cfg.loss_size)
            out["id"] = cfg.id_weight * nets.identity(fake_view, content).mean()
        if batch.paired and cfg.perc_weight > 0:
            perc = zero
            for w, layer in zip(FINETUNE_PERC_LAYERS, vgg.layers):
                if w > 0:
                    perc = perc + w * F.l1_loss(fake_feats[layer], real_feats[layer])
            out["perc"] = cfg.perc_weight * perc
        if cfg.reg_weight > 0:
            out["reg"] = cfg.reg_weight * sum(torch.linalg.vector_norm(p) for p in self.model.res_parameters())
        return out

    # ---- samples

    def sample_inputs(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        cfg = self.cfg
        ws_c = self.map_z(seeds_to_z(list(cfg.sample_seeds), self.G.z_dim))
        k = min(cfg.sample_styles, len(self.names))
        exw = self.exw_all[:k].to(self.device)
        return ws_c, exw, to_uint8(self.images[:k])


__all__ = ["DualFinetuneConfig", "DualFinetuneRun", "EMA_DECAY", "FINETUNE_FORMAT", "PRETRAIN_FORMAT",
           "PretrainConfig", "PretrainRun", "d_logits"]
