"""Training pSp / e4e encoders for a frozen StyleGAN2 generator (Richardson et al., "Encoding in Style", CVPR 2021;
Tov et al., "Designing an Encoder for StyleGAN Image Manipulation", SIGGRAPH 2021), in W+ or in z+ (DualStyleGAN,
Yang et al., CVPR 2022), on a face folder and / or the generator's own samples, in one process or under torchrun.

Each step: the encoder maps aligned faces y (encoder input size S, 256 px officially) to codes, the generator (frozen,
per-sample random noise as the official ``randomize_noise=True``) renders them, the render is average-pooled to S
(pSp's face_pool) and compared with y:

    loss = lpips_lambda * perceptual + l2_lambda * MSE + id_lambda * (1 - cos identity)
           + w_norm_lambda * ||codes - latent_avg||                       (pSp W-norm, 0 by default)
           + delta_norm_lambda * sum_i ||w_i - w_0||_2                     (e4e, while progressive training)
           + w_discriminator_lambda * mean_i softplus(-D_w(w_i))           (e4e latent discriminator)
           + latent_lambda * MSE(ws, true ws)                              (synthetic rows only)

Defaults are the official ones: Ranger lr 1e-4, LPIPS 0.8, L2 1.0, ID 0.1; e4e: delta 2e-4 (L2 norm), deltas
introduced one latent at a time from ``progressive_start`` every ``progressive_step_every`` steps, and the latent
discriminator of e4e (a 4-layer MLP on single w codes, non-saturating loss, Adam lr 2e-5, R1 10 every 16 steps,
50-code pools of real and fake latents).

Deliberate differences from the official code:
    * perceptual loss is the LPIPS-style VGG16 distance of training.inversion.losses (pSp / e4e use LPIPS-AlexNet);
      identity is ArcFace IR-SE50 as pSp, or the torch port of dlib's face-ID ResNet (offline weights);
    * the discriminator's fake codes are the (detached) codes of the encoder step's own forward pass instead of a
      second forward pass in train mode, so BatchNorm running statistics are updated once per step, not twice;
    * the encoder's BatchNorm layers train in batch-statistics mode as officially (``bn="train"``) or keep their
      running statistics (``bn="eval"``); with torchrun on CUDA, "train" converts them to SyncBatchNorm so every
      rank normalises with the global batch. gloo (CPU) has no SyncBatchNorm: under torchrun on the CPU each rank
      normalises with its own slice, which differs from a single process with the whole batch (see DDP below);
    * a new encoder starts from torch's default initialisation unless ``backbone_weights`` names ArcFace IR-SE50
      weights (pSp initialises the body from ArcFace).

Data-parallel training (training.distributed): every rank draws the randomness of the whole global batch from the
step seed (synthetic latents, noise maps, real-w samples and pool decisions) and keeps only its contiguous slice of
rows; every loss is a mean over the rows of the slice, so DDP's gradient average equals the single-process gradient
of the global batch. The latent discriminator runs identically on every rank on the gathered global batch. With
``bn="eval"`` N processes therefore train like one process with the same global batch (up to float reduction order);
with ``bn="train"`` on gloo they differ by exactly the per-slice BatchNorm statistics.

Run directory (numbered, never overwritten):

    config.json                     the resolved EncoderTrainConfig (written first)
    stats.jsonl                     mean losses every log_every steps
    samples/init.png, NNNNNN.png    validation inputs (top row) and reconstructions (bottom row)
    snapshots/NNNNNN/               native encoder (stylecast.encoder/v1)
    snapshots/NNNNNN.pt             official pSp / e4e layout with the generator as decoder
    state/                          encoder/ (native), optimizers.safetensors, training_state.json for resume
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.files import atomic_directory, atomic_write_json
from training import distributed as D
from training.checkpoints import load_checkpoint
from training.networks.stylegan2 import Generator, SynthesisLayer, seeds_to_z, truncate

from .encoders import (EncoderConfig, GradualStyleEncoder, build_encoder, check_encoder_fits, codes_to_ws,
                       load_encoder, save_encoder, save_official)
from .irse import IRSEConfig, load_arcface
from .losses import IDLoss, PerceptualLoss, delta_loss
from .ranger import Ranger

CONFIG_FORMAT = "stylecast.encoder-train-config/v1"
STATE_FORMAT = "stylecast.encoder-train-state/v1"
ARCHS = ("ir-se50", "ir50", "tiny")
BN_MODES = ("train", "eval")
OPTIMIZERS = ("ranger", "adam")
#: e4e's LatentCodesDiscriminator: this many linear layers (LeakyReLU 0.2 between them).
DISC_LAYERS = 4
DISC_SLOPE = 0.2


class EncoderDivergedError(FloatingPointError):
    """A loss became NaN / Inf; the message names the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Every option of an encoder training run (saved as config.json; defaults: the official pSp / e4e values).

    Either ``data`` or ``synthetic`` (or both: ``synthetic_fraction`` of every batch are generator samples).
    ``progressive_start`` None = all e4e deltas train from the start (no delta regulariser), as e4e without
    progressive steps; e4e's recommended command uses 20000.
    """

    generator: str
    steps: int
    kind: str = "psp"
    latent_space: str = "w+"
    arch: str = "ir-se50"
    input_size: int = 256
    start_from_latent_avg: bool = True
    init: str | None = None
    backbone_weights: str | None = None
    data: str | None = None
    align: bool = False
    synthetic: bool = False
    synthetic_fraction: float = 0.5
    synthetic_psi: float = 0.7
    latent_lambda: float = 0.0
    batch: int = 8
    lr: float = 1e-4
    optimizer: str = "ranger"
    lpips_lambda: float = 0.8
    l2_lambda: float = 1.0
    id_lambda: float = 0.1
    id_loss: str = "none"  # "none" | "dlib" | "arcface:PATH"
    w_norm_lambda: float = 0.0
    delta_norm_lambda: float = 2e-4
    delta_norm: float = 2.0
    progressive_start: int | None = None
    progressive_step_every: int = 2000
    w_discriminator_lambda: float = 0.0
    w_discriminator_lr: float = 2e-5
    r1: float = 10.0
    d_reg_every: int = 16
    w_pool_size: int = 50
    bn: str = "train"
    mirror: bool = True
    vgg16_weights: str | None = None
    lpips_weights: str | None = None
    val_images: int = 4
    snapshot_every: int = 1000
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        finite = [self.lr, self.synthetic_fraction, self.synthetic_psi, self.latent_lambda, self.lpips_lambda,
                  self.l2_lambda, self.id_lambda, self.w_norm_lambda, self.delta_norm_lambda, self.delta_norm,
                  self.w_discriminator_lambda, self.w_discriminator_lr, self.r1]
        checks = [
            (all(math.isfinite(float(v)) for v in finite), "loss weights, rates and psi must be finite"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.kind in ("psp", "e4e"), f"kind must be 'psp' or 'e4e', got {self.kind!r}"),
            (self.latent_space in ("w+", "z+"), f"latent space must be 'w+' or 'z+', got {self.latent_space!r}"),
            (self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}"),
            (self.data is not None or self.synthetic, "give a --data folder and/or --synthetic"),
            (0 < self.synthetic_fraction < 1 or not (self.data and self.synthetic),
             f"synthetic fraction must be in (0, 1), got {self.synthetic_fraction}"),
            (self.batch >= 1, f"batch must be >= 1, got {self.batch}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (min(self.lpips_lambda, self.l2_lambda, self.id_lambda, self.w_norm_lambda, self.delta_norm_lambda,
                 self.latent_lambda, self.w_discriminator_lambda, self.r1) >= 0, "loss weights must be >= 0"),
            (self.delta_norm > 0, "delta norm order must be > 0"),
            (self.id_loss in ("none", "dlib") or self.id_loss.startswith("arcface:"),
             f"identity loss must be 'none', 'dlib' or 'arcface:PATH', got {self.id_loss!r}"),
            (self.id_lambda == 0 or self.id_loss != "none",
             "an identity loss weight needs --id dlib or --id arcface:PATH (or --id-lambda 0)"),
            (self.progressive_start is None or self.progressive_start >= 0, "progressive start must be >= 0"),
            (self.progressive_step_every >= 1, "progressive step interval must be >= 1"),
            (self.kind == "e4e" or (self.progressive_start is None and self.w_discriminator_lambda == 0),
             "progressive training and the latent discriminator are e4e options (--kind e4e)"),
            (self.w_discriminator_lr > 0 and self.d_reg_every >= 1 and self.w_pool_size >= 0,
             "discriminator lr, R1 interval and pool size must be positive"),
            (self.bn in BN_MODES, f"bn must be one of {BN_MODES}, got {self.bn!r}"),
            (self.val_images >= 1 and self.snapshot_every >= 1 and self.log_every >= 1,
             "val_images, snapshot_every and log_every must be >= 1"),
            (0 <= self.seed < 2**32, "seed must be in 0..2**32-1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.input_size < 32 or self.input_size & (self.input_size - 1):
            raise ValueError(f"input size must be a power of two >= 32, got {self.input_size}")

    @property
    def num_synthetic(self) -> int:
        """Synthetic rows of every global batch (the first ones)."""
        if not self.synthetic:
            return 0
        if self.data is None:
            return self.batch
        return min(self.batch - 1, max(1, round(self.batch * self.synthetic_fraction)))

    def progressive_stage(self, step: int, n_styles: int) -> int | None:
        """e4e's stage at a step: the last latent with its own delta (None = no progressive training)."""
        if self.kind != "e4e" or self.progressive_start is None:
            return None
        if step < self.progressive_start:
            return 0
        return min(n_styles - 1, 1 + (step - self.progressive_start) // self.progressive_step_every)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderTrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown EncoderTrainConfig fields: {sorted(unknown)}")
        return cls(**d)


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of one training step: a pure function of (run seed, step)."""
    return int(np.random.SeedSequence([seed, step, 0xE4E]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------------------
# Data


class FaceFolder:
    """Aligned face images of a folder (recursive) at the encoder's input size, uint8 in memory.

    Args:
        root: the folder (jpg / jpeg / png / webp / bmp, sorted by relative path).
        size: output side S.
        loader: (path, S) -> uint8 [S, S, 3]; default: shorter side resized to S (Lanczos) and centre-cropped,
            i.e. the images are FFHQ-aligned already. The CLI passes a loader that FFHQ-aligns with dlib (--align).
        mirror: a random half of the images shown are x-flipped (pSp's RandomHorizontalFlip).
        seed: sampling-order seed (the order is a pure function of (seed, epoch)).
    Raises:
        FileNotFoundError / NotADirectoryError: bad path; ValueError: no readable image.
    Attributes:
        skipped: (path, reason) of files that could not be read (corrupt, no face), each warned about once.
    """

    def __init__(self, root: str | Path, size: int, loader: Callable[[Path, int], np.ndarray] | None = None,
                 mirror: bool = True, seed: int = 0, progress: bool = False):
        from training.finetune.dataset import DatasetWarning, list_image_files, load_image

        self.root, self.size, self.mirror, self.seed = Path(root), int(size), bool(mirror), int(seed)
        loader = loader or load_image
        files = list_image_files(self.root)
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        images = []
        it = files
        if progress and files:
            from tqdm import tqdm
            it = tqdm(files, desc="scan data", unit="img", leave=False)
        for f in it:
            try:
                arr = np.asarray(loader(f, self.size), dtype=np.uint8)
                if arr.shape != (self.size, self.size, 3):
                    raise ValueError(f"decoded to shape {arr.shape}")
            except Exception as exc:  # PIL and the aligner raise many types; the file is skipped either way
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.skipped.append((f, reason))
                warnings.warn(f"skipping {f}: {reason}", DatasetWarning, stacklevel=2)
                continue
            self.files.append(f)
            images.append(arr)
        if not images:
            raise ValueError(f"no readable images in {self.root} ({len(files)} files tried)")
        self.images = np.stack(images)  # [N, S, S, 3] uint8

    def __len__(self) -> int:
        return len(self.files)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation [N], flip flags [N]) of one epoch: a pure function of (seed, epoch)."""
        rng = np.random.RandomState([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0xFACE])
        perm = rng.permutation(len(self))
        flips = rng.rand(len(self)) < 0.5 if self.mirror else np.zeros(len(self), dtype=bool)
        return perm, flips

    def rows(self, positions: Sequence[int]) -> torch.Tensor:
        """Images at these positions of the endless shuffled stream -> float32 [n, 3, S, S] in [-1, 1]."""
        out = np.empty((len(positions), self.size, self.size, 3), dtype=np.uint8)
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for j, pos in enumerate(positions):
            epoch, i = divmod(int(pos), len(self))
            if epoch not in cache:
                cache[epoch] = self.order(epoch)
            perm, flips = cache[epoch]
            img = self.images[int(perm[i])]
            out[j] = img[:, ::-1] if flips[i] else img
        return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def first(self, n: int) -> torch.Tensor:
        """The first n images in file order (never flipped): the fixed validation faces."""
        return torch.from_numpy(self.images[:n].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# Small pieces


def pool_to(img: torch.Tensor, size: int) -> torch.Tensor:
    """pSp's face_pool: adaptive average pooling of a render [N, 3, R, R] to size (bilinear when R < size)."""
    if img.shape[-1] == size:
        return img
    if img.shape[-1] > size:
        return F.adaptive_avg_pool2d(img, size)
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)


def noise_resolutions(G: Generator) -> list[int]:
    """Side of every synthesis layer's noise map, in module order."""
    return [int(m.noise_const.shape[-1]) for m in G.synthesis.modules() if isinstance(m, SynthesisLayer)]


def synthesis_with_noise(G: Generator, ws: torch.Tensor, noises: Sequence[torch.Tensor]) -> torch.Tensor:
    """G.synthesis with explicit per-sample noise maps [N, 1, r, r] (one per synthesis layer, module order).

    The maps temporarily replace the layers' constant buffers ([r, r], shared), exactly as the ONNX export feeds
    noise inputs, so a sample's noise does not depend on which other samples share its batch.
    """
    layers = [m for m in G.synthesis.modules() if isinstance(m, SynthesisLayer)]
    if len(layers) != len(noises):
        raise ValueError(f"need {len(layers)} noise maps, got {len(noises)}")
    originals = [m.noise_const for m in layers]
    try:
        for m, n in zip(layers, noises):
            m.noise_const = n
        return G.synthesis(ws, noise_mode="const")
    finally:
        for m, orig in zip(layers, originals):
            m.noise_const = orig


class LatentDiscriminator(nn.Module):
    """e4e's latent discriminator: w [N, w_dim] -> logit [N, 1]; DISC_LAYERS linear layers, LeakyReLU(0.2)."""

    def __init__(self, w_dim: int, layers: int = DISC_LAYERS):
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(layers - 1):
            mods += [nn.Linear(w_dim, w_dim), nn.LeakyReLU(DISC_SLOPE)]
        mods.append(nn.Linear(w_dim, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.net(w)


class LatentPool:
    """e4e's pool of past latent codes (CycleGAN's image pool for w): until full, codes pass through and are stored;
    then each code is, with probability 1/2, swapped for a random stored one (which is returned instead).

    Randomness comes from the caller's numpy RandomState (the step's), so runs and resumes are reproducible.
    """

    def __init__(self, size: int):
        self.size = int(size)
        self.items: list[torch.Tensor] = []

    def query(self, ws: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        """ws [N, w_dim] or [N, K, w_dim] (one of the K codes per row is picked at random) -> [N, w_dim]."""
        if self.size == 0:
            return ws if ws.ndim == 2 else ws[:, 0]
        out = []
        for w in ws:
            if w.ndim == 2:
                w = w[rng.randint(0, w.shape[0])]
            if len(self.items) < self.size:
                self.items.append(w.detach().clone())
                out.append(w)
            elif rng.uniform(0.0, 1.0) > 0.5:
                j = rng.randint(0, self.size)
                out.append(self.items[j].clone())
                self.items[j] = w.detach().clone()
            else:
                out.append(w)
        return torch.stack(out)

    def tensor(self, w_dim: int) -> torch.Tensor:
        """The stored codes [count, w_dim] on the CPU (for the run state)."""
        return torch.stack(self.items).cpu() if self.items else torch.zeros(0, w_dim)

    def load(self, t: torch.Tensor, device: torch.device | str = "cpu") -> None:
        self.items = [row.clone().to(device) for row in t]


def _gather_rows(t: torch.Tensor, env: D.DistEnv) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (the global batch; equal slices on every rank)."""
    if not env.distributed:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def set_train_mode(enc: nn.Module, bn: str) -> None:
    """Train mode, with BatchNorm in eval mode (running statistics, not updated) when bn == "eval"."""
    enc.train()
    if bn == "eval":
        for m in enc.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def init_backbone_from_arcface(enc: GradualStyleEncoder, path: str | Path) -> None:
    """Copy ArcFace IR-SE weights (model_ir_se50.pth) into the encoder's input layer and body, as pSp does.

    Raises:
        CheckpointError / ValueError: unreadable weights or a body of another topology.
    """
    net = load_arcface(path)
    if net.cfg.backbone != enc.cfg.backbone:
        raise ValueError(f"{path}: the ArcFace body {net.cfg.backbone} differs from the encoder's "
                         f"{enc.cfg.backbone}")
    with torch.no_grad():
        enc.input_layer.load_state_dict(net.input_layer.state_dict())
        enc.body.load_state_dict(net.body.state_dict())


def new_encoder_config(cfg: EncoderTrainConfig, G: Generator) -> EncoderConfig:
    """The EncoderConfig of a new encoder for G (IR-SE50 / IR50 / tiny body)."""
    backbone = {"ir-se50": IRSEConfig.resnet(50, "ir_se"), "ir50": IRSEConfig.resnet(50, "ir"),
                "tiny": EncoderConfig.tiny().backbone}[cfg.arch]
    z_plus = cfg.latent_space == "z+"
    # In z+ the mean of the prior is 0, so "starting from the average latent" adds nothing: no latent_avg.
    return EncoderConfig(kind=cfg.kind, backbone=backbone, n_styles=G.num_ws, w_dim=G.z_dim if z_plus else G.w_dim,
                         input_size=cfg.input_size, add_latent_avg=cfg.start_from_latent_avg and not z_plus,
                         latent_space=cfg.latent_space)


# ----------------------------------------------------------------------------------------------------------
# Optimizer state <-> safetensors + JSON (no pickles)


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON scalars) of an optimizer's per-parameter state, keyed by parameter index."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/{idx}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, scalars


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any],
                         prefix: str) -> None:
    """Inverse of optimizer_state (hyper-parameters stay those of the optimizer as built)."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith(prefix + "/"):
            idx, name = key[len(prefix) + 1:].split("/", 1)
            state.setdefault(int(idx), {})[name] = t
    for key, v in scalars.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Stats:
    """Running means per key (keys such as loss_r1 appear only on some steps)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.steps = 0


class EncoderTrainer:
    """One encoder training run: networks, losses, optimizers and the loop. Build with `start` or `resume`.

    Args:
        cfg: the run's configuration.
        G: the generator (copied, frozen).
        encoder: the encoder to train (moved to device, trained in place).
        perceptual: LPIPS-style loss (img, target) -> [N] (None when lpips_lambda is 0).
        id_loss: identity loss (img, target) -> [N], or None.
        dataset: the face folder, or None (synthetic only).
        env: this process's place in a torchrun job (a world of one by default).
    """

    def __init__(self, cfg: EncoderTrainConfig, G: Generator, encoder: GradualStyleEncoder,
                 perceptual: nn.Module | None, id_loss: nn.Module | None, dataset: FaceFolder | None,
                 env: D.DistEnv | None = None):
        self.cfg, self.env = cfg, env or D.DistEnv()
        self.device = self.env.device
        check_encoder_fits(encoder.cfg, G, "the encoder")
        if cfg.data is not None and dataset is None:
            raise ValueError("the configuration names --data but no dataset was given")
        self.G = copy.deepcopy(G).eval().requires_grad_(False).to(self.device)
        self.noise_res = noise_resolutions(self.G)
        self.perceptual = perceptual.to(self.device) if perceptual is not None else None
        if cfg.lpips_lambda > 0 and self.perceptual is None:
            raise ValueError("lpips_lambda > 0 needs a perceptual loss")
        self.id_loss = id_loss.to(self.device) if id_loss is not None else None
        if cfg.id_lambda > 0 and self.id_loss is None:
            raise ValueError("id_lambda > 0 needs an identity loss (--id dlib | arcface:PATH, or --id-lambda 0)")
        self.dataset = dataset
        self.local_batch = D.check_batch(cfg.batch, self.env)
        self.enc = encoder.to(self.device).requires_grad_(True)
        if self.env.distributed and self.device.type == "cuda" and cfg.bn == "train":
            self.enc = nn.SyncBatchNorm.convert_sync_batchnorm(self.enc)
        set_train_mode(self.enc, cfg.bn)
        # e4e's later style blocks are unused until their progressive stage starts.
        self.ddp = D.wrap(self.enc, self.env, find_unused_parameters=cfg.progressive_start is not None)
        self.params = [(n, p) for n, p in self.enc.named_parameters()]
        if cfg.optimizer == "ranger":
            self.opt: torch.optim.Optimizer = Ranger([p for _, p in self.params], lr=cfg.lr)
        else:
            self.opt = torch.optim.Adam([p for _, p in self.params], lr=cfg.lr)
        self.disc = self.disc_opt = None
        self.pools = (LatentPool(cfg.w_pool_size), LatentPool(cfg.w_pool_size))
        if cfg.w_discriminator_lambda > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.disc = LatentDiscriminator(self.G.w_dim).to(self.device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.w_discriminator_lr)
        self.step = 0
        self.stats = _Stats()
        self.last_snapshot: Path | None = None
        self.run_dir: Path | None = None
        self.val_inputs = self._validation_inputs()

    # ---- construction

    @classmethod
    def start(cls, cfg: EncoderTrainConfig, env: D.DistEnv | None = None, perceptual: nn.Module | None = None,
              id_loss: nn.Module | None = None, loader: Callable[[Path, int], np.ndarray] | None = None,
              progress: bool = False) -> "EncoderTrainer":
        """Load the generator, build or load the encoder, the losses and the data (nothing is written)."""
        env = env or D.DistEnv()
        G = load_checkpoint(cfg.generator).G
        if cfg.init is not None:
            # An explicit z+ is the caller's statement (official z+ checkpoints may not record it); w+ is checked.
            stated = cfg.latent_space if cfg.latent_space == "z+" else None
            enc = load_encoder(cfg.init, with_decoder=False, latent_space=stated).encoder
            if enc.cfg.kind != cfg.kind or enc.cfg.latent_space != cfg.latent_space:
                raise ValueError(f"--init {cfg.init} is a {enc.cfg.kind} {enc.cfg.latent_space} encoder, but "
                                 f"--kind {cfg.kind} / --latent-space {cfg.latent_space} were asked for")
            check_encoder_fits(enc.cfg, G, f"--init {cfg.init}")
        else:
            ecfg = new_encoder_config(cfg, G)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                enc = build_encoder(ecfg)
            if ecfg.add_latent_avg:
                with torch.no_grad():
                    enc.latent_avg.copy_(G.w_avg.detach().reshape(1, -1).expand_as(enc.latent_avg))
            if cfg.backbone_weights is not None:
                init_backbone_from_arcface(enc, cfg.backbone_weights)
        return cls(cfg, G, enc, *cls._losses(cfg, env, perceptual, id_loss, progress),
                   cls._dataset(cfg, enc.cfg.input_size, loader, progress), env)

    @classmethod
    def resume(cls, run_dir: str | Path, cfg: EncoderTrainConfig | None = None, env: D.DistEnv | None = None,
               perceptual: nn.Module | None = None, id_loss: nn.Module | None = None,
               loader: Callable[[Path, int], np.ndarray] | None = None, progress: bool = False) -> "EncoderTrainer":
        """Rebuild a run from run_dir/state (cfg: the run's config, possibly with more steps)."""
        env = env or D.DistEnv()
        run_dir = Path(run_dir)
        state_dir = run_dir / "state"
        doc_path = state_dir / "training_state.json"
        if not doc_path.is_file():
            raise FileNotFoundError(f"{run_dir} has no resumable state (expected {doc_path})")
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"{doc_path}: unknown state format {doc.get('format')!r}")
        cfg = cfg or EncoderTrainConfig.from_dict(doc["config"])
        G = load_checkpoint(cfg.generator).G
        enc = load_encoder(state_dir / "encoder", with_decoder=False).encoder
        run = cls(cfg, G, enc, *cls._losses(cfg, env, perceptual, id_loss, progress),
                  cls._dataset(cfg, enc.cfg.input_size, loader, progress), env)
        run.step = int(doc["step"])
        run.run_dir = run_dir
        run.last_snapshot = Path(doc["last_snapshot"]) if doc.get("last_snapshot") else None
        tensors = load_file(str(state_dir / "optimizers.safetensors"))
        load_optimizer_state(run.opt, tensors, doc["optimizer_scalars"], "opt")
        if run.disc is not None:
            run.disc.load_state_dict({k[len("disc/"):]: v for k, v in tensors.items() if k.startswith("disc/")})
            load_optimizer_state(run.disc_opt, tensors, doc["disc_optimizer_scalars"], "disc_opt")
            run.pools[0].load(tensors["pool/real"], run.device)
            run.pools[1].load(tensors["pool/fake"], run.device)
        return run

    @staticmethod
    def _losses(cfg: EncoderTrainConfig, env: D.DistEnv, perceptual: nn.Module | None, id_loss: nn.Module | None,
                progress: bool) -> tuple[nn.Module | None, nn.Module | None]:
        if perceptual is None and cfg.lpips_lambda > 0:
            perceptual = PerceptualLoss.load(cfg.vgg16_weights, cfg.lpips_weights, progress=progress and env.is_main)
        if id_loss is None and cfg.id_lambda > 0:
            if cfg.id_loss == "dlib":
                id_loss = IDLoss.dlib()
            elif cfg.id_loss.startswith("arcface:"):
                id_loss = IDLoss.arcface(cfg.id_loss[len("arcface:"):])
        return perceptual, id_loss

    @staticmethod
    def _dataset(cfg: EncoderTrainConfig, size: int, loader: Callable[[Path, int], np.ndarray] | None,
                 progress: bool) -> FaceFolder | None:
        if cfg.data is None:
            return None
        if cfg.align and loader is None:
            raise ValueError("--align needs a face-aligning loader (the CLI supplies common.faces)")
        return FaceFolder(cfg.data, size, loader=loader, mirror=cfg.mirror, seed=cfg.seed, progress=progress)

    # ---- pieces

    @property
    def input_size(self) -> int:
        return self.enc.cfg.input_size

    def _validation_inputs(self) -> torch.Tensor:
        """The fixed validation faces [K, 3, S, S]: the first dataset images, else generator seeds 0..K-1."""
        k = self.cfg.val_images
        if self.dataset is not None:
            return self.dataset.first(min(k, len(self.dataset)))
        with torch.no_grad():
            G = self.G
            ws = truncate(G.mapping(seeds_to_z(list(range(k)), G.z_dim).to(self.device))
                          .unsqueeze(1).repeat(1, G.num_ws, 1), G.w_avg, self.cfg.synthetic_psi)
            return pool_to(G.synthesis(ws, noise_mode="const").clamp(-1, 1), self.input_size).cpu()

    def stage(self) -> int | None:
        return self.cfg.progressive_stage(self.step, self.enc.cfg.n_styles)

    def _encode(self, module: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = module(y)  # [n, num_ws, D] in the encoder's space
        return codes, codes_to_ws(codes, self.enc.cfg.latent_space, self.G.mapping)

    @torch.no_grad()
    def sample_grid(self) -> np.ndarray:
        """Validation inputs (top row) and their reconstructions (bottom row, encoder in eval mode, const noise)."""
        from training.generate import make_grid, to_uint8

        self.enc.eval()
        try:
            x = self.val_inputs.to(self.device)
            _, ws = self._encode(self.enc, x)
            rec = pool_to(self.G.synthesis(ws, noise_mode="const"), self.input_size).clamp(-1, 1)
        finally:
            set_train_mode(self.enc, self.cfg.bn)
        return make_grid(np.concatenate([to_uint8(x), to_uint8(rec)]), cols=x.shape[0], pad=2)

    # ---- one step

    def train_step(self) -> dict[str, float]:
        """One optimisation step on the global batch (this rank's slice); returns global mean losses."""
        cfg, env, G = self.cfg, self.env, self.G
        B, n_syn = cfg.batch, cfg.num_synthetic
        n_real = B - n_syn
        seed = step_seed(cfg.seed, self.step)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        # The randomness of the whole global batch, drawn in a fixed order on every rank.
        z_syn = torch.randn(n_syn, G.z_dim, generator=gen)
        syn_noise = [torch.randn(n_syn, 1, r, r, generator=gen) for r in self.noise_res]
        rec_noise = [torch.randn(B, 1, r, r, generator=gen) for r in self.noise_res]
        z_disc = torch.randn(B, G.z_dim, generator=gen) if self.disc is not None else None
        rng = np.random.RandomState(seed % 2**32)

        sl = D.local_slice(B, env)
        rows = list(range(sl.start, sl.stop))
        syn_rows = [r for r in rows if r < n_syn]
        real_pos = [self.step * n_real + (r - n_syn) for r in rows if r >= n_syn]
        dev = self.device
        parts, ws_true = [], None
        with torch.no_grad():
            if syn_rows:
                w = G.mapping(z_syn[syn_rows].to(dev))
                ws_true = truncate(w.unsqueeze(1).repeat(1, G.num_ws, 1), G.w_avg, cfg.synthetic_psi)
                img = synthesis_with_noise(G, ws_true, [n[syn_rows].to(dev) for n in syn_noise])
                parts.append(pool_to(img.clamp(-1, 1), self.input_size))
            if real_pos:
                parts.append(self.dataset.rows(real_pos).to(dev))
        y = torch.cat(parts)  # [n, 3, S, S]: synthetic rows first, as in the global batch
        n = y.shape[0]

        stage = self.stage()
        if cfg.kind == "e4e":
            self.enc.progressive_stage = stage
        codes, ws = self._encode(self.ddp, y)
        img = synthesis_with_noise(G, ws, [t[sl].to(dev) for t in rec_noise])
        y_hat = pool_to(img, self.input_size)

        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        terms["l2"] = (y_hat - y).square().flatten(1).mean(1).mean()
        weights["l2"] = cfg.l2_lambda
        if cfg.lpips_lambda > 0:
            terms["lpips"] = self.perceptual(y_hat, y).mean()
            weights["lpips"] = cfg.lpips_lambda
        if cfg.id_lambda > 0:
            terms["id"] = self.id_loss(y_hat, y).mean()
            weights["id"] = cfg.id_lambda
        if cfg.w_norm_lambda > 0:
            raw = codes - self.enc.latent_avg.to(codes.dtype) if self.enc.cfg.add_latent_avg else codes
            terms["w_norm"] = raw.flatten(1).norm(dim=1).mean()
            weights["w_norm"] = cfg.w_norm_lambda
        if stage is not None and cfg.delta_norm_lambda > 0:
            terms["delta"] = delta_loss(codes, p=cfg.delta_norm, stage=stage)
            weights["delta"] = cfg.delta_norm_lambda
        if cfg.latent_lambda > 0 and n_syn > 0:
            per_row = torch.zeros(n, device=dev)
            if syn_rows:  # synthetic rows come first in y
                per_row = torch.cat([(ws[:len(syn_rows)] - ws_true).square().flatten(1).mean(1),
                                     per_row[len(syn_rows):]])
            terms["latent"] = per_row.mean()
            weights["latent"] = cfg.latent_lambda
        extra: dict[str, float] = {}
        if self.disc is not None:
            self._check_finite(terms, ws)  # before the discriminator learns from broken codes
            extra = self._discriminator_step(ws.detach(), z_disc, stage, rng)
            dims = list(range(stage + 1)) if stage is not None else list(range(ws.shape[1]))
            self.disc.requires_grad_(False)
            terms["adv"] = torch.stack([F.softplus(-self.disc(ws[:, i])).mean() for i in dims]).mean()
            weights["adv"] = cfg.w_discriminator_lambda
        self._check_finite(terms, ws)
        total = sum(weights[k] * terms[k] for k in terms)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if stage is not None:
            # Latents beyond the stage carry no signal; DDP may hand them zero gradients, a single process none.
            for i in range(stage + 1, self.enc.cfg.n_styles):
                for p in self.enc.styles[i].parameters():
                    p.grad = None
        self.opt.step()
        self.step += 1
        out = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        out["loss"] = float(total.detach())
        out = D.all_reduce_mean(out, env)
        out.update(extra)
        if stage is not None:
            out["stage"] = float(stage)
        return out

    def _check_finite(self, terms: dict[str, torch.Tensor], ws: torch.Tensor) -> None:
        """Stop every rank together when a loss term or the codes are NaN / Inf (nothing of the step is applied
        to the encoder; the message names the last good checkpoint)."""
        bad = sorted(k for k, v in terms.items() if not bool(torch.isfinite(v)))
        if not bool(torch.isfinite(ws).all()):
            bad.append("codes")
        if D.any_true(bool(bad), self.env):
            where = f"the last good checkpoint is {self.last_snapshot}" if self.last_snapshot else \
                "no checkpoint was saved yet"
            raise EncoderDivergedError(f"non-finite loss at step {self.step} ({', '.join(bad) or 'on another rank'})"
                                       f"; stopped, {where}; lower --lr or check the data")

    def _discriminator_step(self, ws: torch.Tensor, z_disc: torch.Tensor, stage: int | None,
                            rng: np.random.RandomState) -> dict[str, float]:
        """e4e's latent discriminator update on the global batch (identical on every rank)."""
        cfg, G = self.cfg, self.G
        fake = ws[:, :stage + 1] if stage is not None else ws  # codes the encoder produces on its own
        fake = _gather_rows(fake, self.env)
        with torch.no_grad():
            real = G.mapping(z_disc.to(self.device))
        real = self.pools[0].query(real, rng)
        fake = self.pools[1].query(fake, rng) if cfg.w_pool_size > 0 else fake[:, 0]
        self.disc.requires_grad_(True)
        loss = F.softplus(-self.disc(real)).mean() + F.softplus(self.disc(fake)).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        out = {"loss_disc": float(loss.detach())}
        if self.step % cfg.d_reg_every == 0:
            real = real.detach().requires_grad_(True)
            pred = self.disc(real)
            (grad,) = torch.autograd.grad(pred.sum(), real, create_graph=True)
            r1 = grad.square().flatten(1).sum(1).mean()
            self.disc_opt.zero_grad(set_to_none=True)
            # Lazy R1 (every d_reg_every steps) is scaled by the interval, as StyleGAN2 and e4e do.
            (cfg.r1 / 2 * r1 * cfg.d_reg_every + 0 * pred[0, 0]).backward()
            self.disc_opt.step()
            out["loss_r1"] = float(r1.detach())
        return out

    # ---- saving

    def meta(self) -> dict[str, Any]:
        return {"encoder_training": {"step": self.step, "config": self.cfg.to_dict()}}

    def save_snapshot(self) -> Path:
        """snapshots/NNNNNN/ (native) + snapshots/NNNNNN.pt (official layout with the generator); rank 0 only."""
        snaps = self.run_dir / "snapshots"
        snaps.mkdir(parents=True, exist_ok=True)
        path = snaps / f"{self.step:06d}"
        enc = self.enc.eval()
        try:
            save_encoder(path, enc, meta=self.meta(), overwrite=True)
            if enc.cfg.output_size is not None:
                save_official(snaps / f"{self.step:06d}.pt", enc, self.G, overwrite=True)
        finally:
            set_train_mode(self.enc, self.cfg.bn)
        self.last_snapshot = path
        return path

    def save_state(self) -> None:
        """state/: the encoder, optimizer / discriminator / pool tensors and the step (rank 0 only)."""
        tensors, scalars = optimizer_state(self.opt, "opt")
        doc: dict[str, Any] = {"format": STATE_FORMAT, "step": self.step, "config": self.cfg.to_dict(),
                               "optimizer_scalars": scalars,
                               "last_snapshot": str(self.last_snapshot) if self.last_snapshot else None}
        if self.disc is not None:
            t, s = optimizer_state(self.disc_opt, "disc_opt")
            tensors.update(t)
            doc["disc_optimizer_scalars"] = s
            tensors.update({f"disc/{k}": v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()})
            tensors["pool/real"] = self.pools[0].tensor(self.G.w_dim)
            tensors["pool/fake"] = self.pools[1].tensor(self.G.w_dim)
        with atomic_directory(self.run_dir / "state", overwrite=True) as tmp:
            save_encoder(tmp / "encoder", self.enc, meta=self.meta())
            save_file(tensors, str(tmp / "optimizers.safetensors"))
            (tmp / "training_state.json").write_text(json.dumps(doc, indent=2) + "\n")

    # ---- the loop

    def run(self, progress: bool = True, log: Callable[[str], None] = print) -> Path | None:
        """Train until cfg.steps; returns the last snapshot directory (None on ranks other than 0)."""
        from training.generate import save_png

        cfg, env = self.cfg, self.env
        main = env.is_main
        samples = self.run_dir / "samples"
        if main:
            samples.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                save_png(samples / "init.png", self.sample_grid())
        bar = None
        if progress and main:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), unit="step", desc=f"{cfg.kind} encoder",
                       dynamic_ncols=True)
        t_log = time.perf_counter()
        last = None
        try:
            while self.step < cfg.steps:
                losses = self.train_step()
                self.stats.add(losses)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in losses.items()
                                     if k.startswith("loss")}, refresh=False)
                done = self.step >= cfg.steps
                if main and (done or self.step % cfg.log_every == 0):
                    now = time.perf_counter()
                    line = {"step": self.step, **self.stats.means(),
                            "sec_per_step": (now - t_log) / max(self.stats.steps, 1)}
                    with open(self.run_dir / "stats.jsonl", "a") as f:
                        f.write(json.dumps(line) + "\n")
                    self.stats.reset()
                    t_log = now
                if done or self.step % cfg.snapshot_every == 0:
                    if main:
                        last = self.save_snapshot()
                        self.save_state()
                        save_png(samples / f"{self.step:06d}.png", self.sample_grid())
                        if bar is None:
                            log(f"step {self.step}: snapshot {last}")
                    D.barrier(env)
        finally:
            if bar is not None:
                bar.close()
        if last is None and main:  # resumed a run that was already complete
            last = self.last_snapshot
        return last


def write_config(run_dir: Path, cfg: EncoderTrainConfig) -> None:
    """config.json of a run (written before any work)."""
    atomic_write_json(Path(run_dir) / "config.json", {"format": CONFIG_FORMAT, "config": cfg.to_dict()})


def read_config(run_dir: str | Path) -> EncoderTrainConfig:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not an encoder training run (no config.json)")
    doc = json.loads(p.read_text())
    if doc.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{p}: not an encoder training config (format {doc.get('format')!r})")
    return EncoderTrainConfig.from_dict(doc["config"])


__all__ = ["CONFIG_FORMAT", "EncoderDivergedError", "EncoderTrainConfig", "EncoderTrainer", "FaceFolder",
           "LatentDiscriminator", "LatentPool", "init_backbone_from_arcface", "load_optimizer_state",
           "new_encoder_config", "optimizer_state", "pool_to", "read_config", "set_train_mode", "step_seed",
           "synthesis_with_noise", "write_config"]
