"""GAN finetuning of a pretrained StyleGAN2 on an image folder (Karras et al. 2020, StyleGAN2 / ADA), the step
before network blending (Pinkney & Adler 2020): non-saturating logistic loss, lazy R1 and path-length
regularisation, style mixing, generator EMA with ramp-up, Freeze-D (Mo et al. 2020) and optional ADA-style
augmentation.

Run directory (numbered, never overwritten; written by `run_finetune`):

    config.json                        the resolved FinetuneConfig (written first)
    stats.jsonl                        one line of mean losses / timing per tick
    samples/reals.png, fakes_init.png, fakes{nimg:09d}.png   grids of fixed seeds (G_ema, psi 1, const noise)
    network-snapshot-{nimg:09d}/       native checkpoint: G (EMA), G_train, D
    network-snapshot-{nimg:09d}.pt     the same in rosinality layout (g_ema, g, d, latent_avg)
    state/                             latest resumable state: networks/ (native), optimizers.safetensors,
                                       training_state.json (step, images shown, pl_mean, ADA p, ...)

Determinism: every step reseeds torch's RNGs from (seed, step) and the data order is a pure function of
(seed, image index), so `--resume` continues exactly like an uninterrupted run without saving RNG states.

Data parallel (`torchrun --nproc_per_node K -m stylecast train finetune ...`, training/distributed.py): the global
batch is split into K equal slices. Every rank draws the batch-level randomness (latents, mixing decisions) of the
whole global batch from the step seed and keeps its slice, and reads its slice of the data stream; the per-sample
randomness inside the networks (noise maps, augmentation, path-length directions) comes from a per-rank stream,
so a K-process run is statistically, not bitwise, the same as one process with the same global batch. Gradients
are averaged over the ranks in one flattened all-reduce after every backward pass (as NVlabs' stylegan2-ada does
for its several G and D phases), and the running statistics (w_avg, pl_mean, ADA's sign counts) are averaged or
summed, so all ranks hold bit-identical networks after every step. Only rank 0 writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_directory, atomic_write_json
from training import distributed as dist
from training.checkpoints import load_checkpoint, save_native, save_rosinality
from training.generate import generate_images, make_grid, save_png, to_uint8
from training.networks.stylegan2 import Discriminator, DiscriminatorConfig, Generator, mix_styles

from .augment import AdaController, AugmentPipe
from .dataset import ImageFolderDataset
from .losses import PathLengthRegularizer, d_logistic_loss, g_nonsaturating_loss, r1_loss

CONFIG_FORMAT = "stylecast.finetune-config/v1"
STATE_FORMAT = "stylecast.finetune-state/v1"
AUGMENT_MODES = ("none", "ada", "fixed")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a finetuning run depends on (saved as config.json; defaults = REFERENCE.md / StyleGAN2)."""

    checkpoint: str
    data: str
    kimg: float
    batch: int = 4
    lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    mixing: float = 0.9
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05  # None: no ramp-up (NVlabs disables it when resuming a pretrained model)
    freeze_d: int = 0
    augment: str = "none"  # none | ada | fixed
    augment_p: float = 0.0  # initial p (ada) or the constant p (fixed)
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 500.0
    mirror: bool = False
    snapshot_kimg: float = 10.0
    tick_kimg: float = 1.0
    sample_seeds: tuple[int, ...] = tuple(range(16))
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "sample_seeds", tuple(int(s) for s in self.sample_seeds))
        checks = [
            (math.isfinite(self.kimg) and self.kimg > 0, f"kimg must be > 0, got {self.kimg}"),
            (self.batch >= 1, f"batch must be >= 1, got {self.batch}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}"),
            (self.r1_gamma >= 0 and self.pl_weight >= 0, "r1_gamma and pl_weight must be >= 0"),
            (self.r1_interval >= 1 and self.pl_interval >= 1 and self.ada_interval >= 1, "intervals must be >= 1"),
            (self.pl_batch_shrink >= 1, "pl_batch_shrink must be >= 1"),
            (0 < self.pl_decay <= 1, "pl_decay must be in (0, 1]"),
            (0 <= self.mixing <= 1, f"mixing probability must be in [0, 1], got {self.mixing}"),
            (self.ema_kimg >= 0, "ema_kimg must be >= 0"),
            (self.ema_rampup is None or self.ema_rampup > 0, "ema_rampup must be > 0 or None"),
            (self.freeze_d >= 0, f"freeze_d must be >= 0, got {self.freeze_d}"),
            (self.augment in AUGMENT_MODES, f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}"),
            (0 <= self.augment_p <= 1, f"augment p must be in [0, 1], got {self.augment_p}"),
            (self.augment != "none" or self.augment_p == 0, "an augment p needs augment 'ada' or 'fixed'"),
            (0 < self.ada_target < 1, f"ada target must be in (0, 1), got {self.ada_target}"),
            (self.ada_kimg > 0, "ada_kimg must be > 0"),
            (self.snapshot_kimg > 0 and self.tick_kimg > 0, "snapshot_kimg and tick_kimg must be > 0"),
            (0 <= self.seed < 2**32, "seed must be in 0..2**32-1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def total_nimg(self) -> int:
        return int(round(self.kimg * 1000))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["sample_seeds"] = list(self.betas), list(self.sample_seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Small pieces with their own tests


def ema_beta(batch: int, ema_kimg: float, ema_rampup: float | None, cur_nimg: int) -> float:
    """Per-step EMA decay (NVlabs): half-life ema_nimg = ema_kimg * 1000 images, ramped up as
    min(ema_nimg, cur_nimg * rampup); beta = 0.5 ** (batch / max(ema_nimg, 1e-8))."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """p_ema <- p + beta * (p_ema - p) (= lerp(p, p_ema, beta)) for parameters; buffers are copied."""
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def freeze_discriminator(D: Discriminator, k: int) -> list[str]:
    """Freeze-D: fromrgb and the first k blocks (highest resolutions) stop training. Returns frozen names."""
    blocks = D.blocks()
    if k > len(blocks):
        raise ValueError(f"--freeze-d {k} exceeds the discriminator's {len(blocks)} blocks "
                         f"({', '.join(f'b{r}' for r in D.resolutions)})")
    if k == 0:
        return []
    frozen = ["fromrgb"] + [f"b{r}" for r in D.resolutions[:k]]
    return [n for n, _ in D.named_parameters() if n.split(".")[0] in frozen]


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of one training step: a pure function of (run seed, step)."""
    return int(np.random.SeedSequence([seed, step, 0xF1E7]).generate_state(1, np.uint64)[0] >> 1)


def phase_seed(seed: int, step: int, phase: int, rank: int | None = None) -> int:
    """Seed of one phase of a step: shared by all ranks (rank None: batch-level draws of the global batch) or
    private to a rank (per-sample randomness inside the networks)."""
    key = [seed, step, 0xF1E7, phase] + ([] if rank is None else [0x5EED, rank])
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)


def _set_requires_grad(module: torch.nn.Module, flag: bool, frozen: set[str] = frozenset()) -> None:
    for n, p in module.named_parameters():
        p.requires_grad_(flag and n not in frozen)


def _lazy_adam(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
               interval: int | None) -> torch.optim.Adam:
    # Lazy regularisation runs the optimizer interval+1 times per interval steps; the paper compensates by
    # scaling lr and the betas' time constants by c = k / (k + 1).
    c = interval / (interval + 1) if interval else 1.0
    return torch.optim.Adam(params, lr=lr * c, betas=(betas[0] ** c, betas[1] ** c), eps=1e-8)


# ----------------------------------------------------------------------------------------------------------
# Optimizer state <-> safetensors (no pickles)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str], prefix: str) -> dict[str, torch.Tensor]:
    """Adam state -> flat {prefix/param_name/exp_avg: tensor, ...} (step as a [1] tensor)."""
    out: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                out[f"{prefix}/{names[id(p)]}/{k}"] = t.detach().cpu().reshape(-1).clone() if t.ndim == 0 else \
                    t.detach().cpu().contiguous().clone()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]],
                           tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Inverse of optimizer_tensors (states go to each parameter's device; 'step' back to a scalar)."""
    by_name = dict(named)
    for key, t in tensors.items():
        if not key.startswith(prefix + "/"):
            continue
        pname, _, field_name = key[len(prefix) + 1:].rpartition("/")
        if pname not in by_name:
            raise ValueError(f"optimizer state for unknown parameter {pname!r}")
        p = by_name[pname]
        st = opt.state.setdefault(p, {})
        if field_name == "step":
            st["step"] = t.reshape([]).clone()
        elif t.numel() == p.numel():
            st[field_name] = t.reshape(p.shape).to(p.device).clone()  # 0-dim states were stored as [1]
        else:
            raise ValueError(f"optimizer state {key} has {t.numel()} elements, parameter has {p.numel()}")


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Stats:
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class FinetuneRun:
    """One finetuning run: networks, optimizers, regularisers and the loop. Build with `start` or `resume`."""

    def __init__(self, cfg: FinetuneConfig, run_dir: Path | None, device: torch.device, G: Generator, G_ema: Generator,
                 D: Discriminator, dataset: ImageFolderDataset, env: dist.DistEnv | None = None):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.env = env or dist.DistEnv(device=device)
        self.local_batch = dist.check_batch(cfg.batch, self.env)
        self.G, self.G_ema, self.D, self.dataset = G.to(device), G_ema.to(device), D.to(device), dataset
        self.G.train()
        self.D.train()
        self.G_ema.eval().requires_grad_(False)
        self.frozen = set(freeze_discriminator(self.D, cfg.freeze_d))
        self.g_named = list(self.G.named_parameters())
        self.d_named = [(n, p) for n, p in self.D.named_parameters() if n not in self.frozen]
        for n, p in self.D.named_parameters():
            p.requires_grad_(n not in self.frozen)
        self.opt_G = _lazy_adam([p for _, p in self.g_named], cfg.lr, cfg.betas,
                                cfg.pl_interval if cfg.pl_weight > 0 else None)
        self.opt_D = _lazy_adam([p for _, p in self.d_named], cfg.lr, cfg.betas,
                                cfg.r1_interval if cfg.r1_gamma > 0 else None)
        self.pl = PathLengthRegularizer(cfg.pl_decay, device)
        self.augment = AugmentPipe(cfg.augment_p if cfg.augment != "none" else 0.0)
        self.ada = AdaController(self.augment, cfg.ada_target, cfg.ada_interval, cfg.ada_kimg, cfg.batch) \
            if cfg.augment == "ada" else None
        if self.env.distributed:  # ranks load the same files; make sure they start bit-identical anyway
            for m in (self.G, self.G_ema, self.D):
                for t in list(m.parameters()) + list(m.buffers()):
                    torch.distributed.broadcast(t.data, src=0)
        self.step = 0
        self.cur_nimg = 0
        self.stats = _Stats()
        self.d_source = "checkpoint"  # or "fresh": where D's weights came from (for logs and metadata)
        self.base_sha256 = ""

    # ---- construction

    @classmethod
    def start(cls, cfg: FinetuneConfig, run_dir: Path | None = None, device: str | torch.device = "cpu",
              progress: bool = False, env: dist.DistEnv | None = None) -> "FinetuneRun":
        """Load the base checkpoint (D from it when present, else a fresh seeded D) and the dataset."""
        ck = load_checkpoint(cfg.checkpoint, with_discriminator=True, with_train_generator=True)
        G_ema = ck.G
        G = copy.deepcopy(ck.G_train if ck.G_train is not None else ck.G)
        if ck.D is not None:
            D = ck.D
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                D = Discriminator(DiscriminatorConfig.from_generator(G.cfg))
        _check_freeze(cfg, D)
        dataset = ImageFolderDataset(cfg.data, G.cfg.resolution, mirror=cfg.mirror, seed=cfg.seed, progress=progress)
        run = cls(cfg, Path(run_dir) if run_dir else None, torch.device(device), G, G_ema, D, dataset, env)
        run.d_source = "checkpoint" if ck.D is not None else "fresh"
        run.base_sha256 = ck.sha256
        return run

    @classmethod
    def resume(cls, run_dir: Path, cfg: FinetuneConfig | None = None, device: str | torch.device = "cpu",
               progress: bool = False, env: dist.DistEnv | None = None) -> "FinetuneRun":
        """Rebuild a run from run_dir/state (cfg: the run's config, possibly with a larger kimg)."""
        run_dir = Path(run_dir)
        state_dir = run_dir / "state"
        if not (state_dir / "training_state.json").is_file():
            raise FileNotFoundError(f"{run_dir} has no resumable state (expected {state_dir}/training_state.json)")
        st = json.loads((state_dir / "training_state.json").read_text())
        if st.get("format") != STATE_FORMAT:
            raise ValueError(f"{state_dir}: unknown state format {st.get('format')!r}")
        if cfg is None:
            cfg = FinetuneConfig.from_dict(st["config"])
        ck = load_checkpoint(state_dir / "networks", with_discriminator=True, with_train_generator=True)
        if ck.D is None or ck.G_train is None:
            raise ValueError(f"{state_dir}/networks lacks the discriminator or the training generator")
        _check_freeze(cfg, ck.D)
        dataset = ImageFolderDataset(cfg.data, ck.G.cfg.resolution, mirror=cfg.mirror, seed=cfg.seed,
                                     progress=progress)
        run = cls(cfg, run_dir, torch.device(device), ck.G_train, ck.G, ck.D, dataset, env)
        run.step, run.cur_nimg = int(st["step"]), int(st["cur_nimg"])
        run.pl.pl_mean.fill_(float(st["pl_mean"]))
        run.augment.p = float(st["augment_p"])
        if run.ada is not None:
            run.ada.sign_sum, run.ada.count = float(st["ada_sign_sum"]), int(st["ada_count"])
        opt = load_file(str(state_dir / "optimizers.safetensors"))
        load_optimizer_tensors(run.opt_G, run.g_named, opt, "G")
        load_optimizer_tensors(run.opt_D, run.d_named, opt, "D")
        run.d_source = st.get("d_source", "checkpoint")
        run.base_sha256 = st.get("base_sha256", "")
        return run

    # ---- one step

    def _map(self, z: torch.Tensor, update_w_avg: bool) -> torch.Tensor:
        """Global-batch z [B, z_dim] -> this rank's ws [B / K, num_ws, w_dim] with style mixing: with probability
        `mixing` the latents from a random cutoff come from a second z (one decision per batch, as NVlabs). The
        draws are made for the whole global batch (identical on every rank) before slicing."""
        sl = dist.local_slice(z.shape[0], self.env)
        num_ws = self.G.num_ws
        u = float(torch.rand([]))
        cutoff = int(torch.randint(1, num_ws, [])) if num_ws > 1 else num_ws
        z2 = torch.randn_like(z)
        ws = self.G.map(z[sl], update_w_avg=update_w_avg)
        if self.cfg.mixing > 0 and u < self.cfg.mixing and num_ws > 1:
            ws = mix_styles(ws, self.G.map(z2[sl]), cutoff)
        return ws

    def _seed(self, phase: int, local: bool) -> None:
        torch.manual_seed(phase_seed(self.cfg.seed, self.step, phase, self.env.rank if local else None))

    def _step(self, opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        dist.all_reduce_grads_mean([p for _, p in named], self.env)
        opt.step()

    def train_step(self) -> dict[str, float]:
        """One G step, one D step, and the lazy regularisers when due; returns this step's losses (averaged over
        the ranks)."""
        cfg, G, D, aug = self.cfg, self.G, self.D, self.augment
        dev = self.device
        bs = cfg.batch
        sl = dist.local_slice(bs, self.env)
        real = self.dataset.batch(self.cur_nimg + sl.start, self.local_batch, dev)
        out: dict[str, float] = {}

        # G main: non-saturating logistic loss through the augmentation.
        _set_requires_grad(D, False)
        _set_requires_grad(G, True)
        self._seed(0, local=False)
        z = torch.randn([bs, G.z_dim], device=dev)
        ws = self._map(z, update_w_avg=True)
        self._seed(1, local=True)
        fake = G.synthesis(ws, noise_mode="random")
        loss_g = g_nonsaturating_loss(D(aug(fake)))
        self.opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        self._step(self.opt_G, self.g_named)
        out["loss_G"] = float(loss_g.detach())

        # G reg: lazy path-length regularisation on a smaller batch.
        if cfg.pl_weight > 0 and self.step % cfg.pl_interval == 0:
            pl_bs = max(self.env.world_size, bs // cfg.pl_batch_shrink // self.env.world_size * self.env.world_size)
            self._seed(2, local=False)
            z = torch.randn([pl_bs, G.z_dim], device=dev)
            ws = self._map(z, update_w_avg=False)
            self._seed(3, local=True)
            img = G.synthesis(ws, noise_mode="random")
            penalty, lengths = self.pl.penalty(img, ws)
            loss_pl = penalty.mean() * cfg.pl_weight * cfg.pl_interval
            self.opt_G.zero_grad(set_to_none=True)
            loss_pl.backward()
            self._step(self.opt_G, self.g_named)
            dist.all_reduce_tensor_mean_(self.pl.pl_mean, self.env)  # linear in the batch mean: exact
            out["loss_PL"] = float(penalty.detach().mean())
            out["pl_mean"] = float(self.pl.pl_mean)

        # D main: logistic loss on fresh fakes and the reals.
        _set_requires_grad(G, False)
        _set_requires_grad(D, True, self.frozen)
        with torch.no_grad():
            self._seed(4, local=False)
            z = torch.randn([bs, G.z_dim], device=dev)
            ws = self._map(z, update_w_avg=True)
            self._seed(5, local=True)
            fake = G.synthesis(ws, noise_mode="random")
        fake_logits = D(aug(fake))
        real_logits = D(aug(real))
        loss_d = d_logistic_loss(real_logits, fake_logits)
        self.opt_D.zero_grad(set_to_none=True)
        loss_d.backward()
        self._step(self.opt_D, self.d_named)
        if self.ada is not None:
            before = (self.ada.sign_sum, self.ada.count)
            self.ada.accumulate(real_logits)
            if self.env.distributed:  # this step's signs summed over the ranks (the earlier ones already are)
                d = dist.all_reduce_sum({"s": self.ada.sign_sum - before[0], "n": self.ada.count - before[1]},
                                        self.env)
                self.ada.sign_sum, self.ada.count = before[0] + d["s"], before[1] + int(round(d["n"]))
        out["loss_D"] = float(loss_d.detach())
        out["D_real"] = float(real_logits.detach().mean())
        out["D_fake"] = float(fake_logits.detach().mean())

        # D reg: lazy R1 on the reals (the gradient is taken w.r.t. the un-augmented image).
        if cfg.r1_gamma > 0 and self.step % cfg.r1_interval == 0:
            self._seed(6, local=True)
            real_req = real.detach().requires_grad_(True)
            logits = D(aug(real_req))
            loss_r1 = r1_loss(real_req, logits, cfg.r1_gamma, cfg.r1_interval)
            self.opt_D.zero_grad(set_to_none=True)
            loss_r1.backward()
            self._step(self.opt_D, self.d_named)
            out["loss_R1"] = float(loss_r1.detach()) / (cfg.r1_gamma / 2 * cfg.r1_interval)

        # w_avg, which the ranks updated from their own slices, is an EMA of batch means: linear, so the mean
        # over equal slices is exactly the global-batch update.
        dist.all_reduce_tensor_mean_(G.mapping.w_avg, self.env)

        # G EMA (ramp-up from the images shown before this step, as NVlabs), counters, ADA.
        update_ema(self.G_ema, G, ema_beta(bs, cfg.ema_kimg, cfg.ema_rampup, self.cur_nimg))
        self.step += 1
        self.cur_nimg += bs
        if self.ada is not None:
            self.ada.step(self.step)
        out["augment_p"] = self.augment.p
        return dist.all_reduce_mean(out, self.env)

    # ---- outputs

    def sample_grid(self) -> np.ndarray:
        imgs = generate_images(self.G_ema, list(self.cfg.sample_seeds), noise_mode="const",
                               batch_size=max(1, self.cfg.batch), device=self.device)
        return make_grid(imgs)

    def real_grid(self) -> np.ndarray:
        n = len(self.cfg.sample_seeds)
        return make_grid(to_uint8(self.dataset.batch(0, n, "cpu")))

    def snapshot_name(self) -> str:
        return f"network-snapshot-{self.cur_nimg:09d}"

    def meta(self) -> dict[str, Any]:
        return {"finetune": {"cur_nimg": self.cur_nimg, "kimg": self.cur_nimg / 1000, "step": self.step,
                             "base_checkpoint": self.cfg.checkpoint, "base_sha256": self.base_sha256,
                             "data": self.cfg.data, "augment_p": self.augment.p}}

    def save_snapshot(self) -> Path:
        """Native checkpoint dir + rosinality .pt of G_ema / G_train / D at the current image count."""
        name = self.snapshot_name()
        nat = self.run_dir / name
        G_ema, G, D = (copy.deepcopy(m).cpu() for m in (self.G_ema, self.G, self.D))
        if not nat.exists():
            save_native(nat, G_ema, D=D, G_train=G, meta=self.meta())
        pt = self.run_dir / f"{name}.pt"
        if not pt.exists():
            save_rosinality(pt, G_ema, D=D, G_train=G)
        return nat

    def save_state(self) -> None:
        """Replace run_dir/state atomically with everything `resume` needs."""
        G_ema, G, D = (copy.deepcopy(m).cpu() for m in (self.G_ema, self.G, self.D))
        names_g = {id(p): n for n, p in self.g_named}
        names_d = {id(p): n for n, p in self.d_named}
        tensors = {**optimizer_tensors(self.opt_G, names_g, "G"), **optimizer_tensors(self.opt_D, names_d, "D")}
        doc = {"format": STATE_FORMAT, "step": self.step, "cur_nimg": self.cur_nimg,
               "pl_mean": float(self.pl.pl_mean), "augment_p": self.augment.p,
               "ada_sign_sum": self.ada.sign_sum if self.ada else 0.0, "ada_count": self.ada.count if self.ada else 0,
               "d_source": self.d_source, "base_sha256": self.base_sha256, "config": self.cfg.to_dict()}
        with atomic_directory(self.run_dir / "state", overwrite=True) as tmp:
            save_native(tmp / "networks", G_ema, D=D, G_train=G, meta=self.meta())
            save_file(tensors, str(tmp / "optimizers.safetensors"))
            (tmp / "training_state.json").write_text(json.dumps(doc, indent=2) + "\n")

    # ---- the loop

    def run(self, progress: bool = True, log: Callable[[str], None] = print, tensorboard: bool = False) -> Path:
        """Train until cfg.kimg thousand images have been shown; returns the last snapshot directory. Under torchrun
        every rank calls this; only rank 0 writes (samples, stats, snapshots, state) and shows progress."""
        cfg = self.cfg
        main = self.env.is_main
        total = cfg.total_nimg
        samples = self.run_dir / "samples"
        if main:
            samples.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                save_png(samples / "reals.png", self.real_grid())
                save_png(samples / "fakes_init.png", self.sample_grid())
        writer = _tensorboard_writer(self.run_dir) if tensorboard and main else None
        snap_every = max(1, int(round(cfg.snapshot_kimg * 1000)))
        tick_every = max(1, int(round(cfg.tick_kimg * 1000)))
        bar = None
        if progress and main:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=min(self.cur_nimg, total), unit="img", desc="finetune",
                       dynamic_ncols=True)
        last = None
        t_tick, nimg_tick = time.perf_counter(), self.cur_nimg
        try:
            while self.cur_nimg < total:
                prev = self.cur_nimg
                losses = self.train_step()
                for k, v in losses.items():
                    self.stats.add(k, v)
                if writer is not None:
                    for k, v in losses.items():
                        writer.add_scalar(f"finetune/{k}", v, self.cur_nimg)
                if bar is not None:
                    bar.update(self.cur_nimg - prev)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()
                                     if k in ("loss_G", "loss_D", "loss_R1", "loss_PL", "augment_p")}, refresh=False)
                done = self.cur_nimg >= total
                if done or self.cur_nimg // tick_every != prev // tick_every:
                    now = time.perf_counter()
                    dt, dn = now - t_tick, self.cur_nimg - nimg_tick
                    line = {"kimg": self.cur_nimg / 1000, "step": self.step, **self.stats.means(),
                            "sec_per_kimg": dt / max(dn, 1) * 1000,
                            "kimg_per_hour": dn / 1000 / max(dt, 1e-9) * 3600, "processes": self.env.world_size}
                    if self.ada is not None and self.ada.last_rt is not None:
                        line["ada_rt"] = self.ada.last_rt
                    if main:
                        _append_jsonl(self.run_dir / "stats.jsonl", line)
                    self.stats.reset()
                    t_tick, nimg_tick = now, self.cur_nimg
                if done or self.cur_nimg // snap_every != prev // snap_every:
                    last = self.snapshot_name()
                    if main:
                        last = self.save_snapshot()
                        self.save_state()
                        save_png(samples / f"fakes{self.cur_nimg:09d}.png", self.sample_grid())
                        if bar is None:
                            log(f"kimg {self.cur_nimg / 1000:.3f}: snapshot {last.name}")
                    dist.barrier(self.env)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if last is None and main:  # resumed a run that was already complete
            last = self.save_snapshot()
        return self.run_dir / self.snapshot_name()


def _check_freeze(cfg: FinetuneConfig, D: Discriminator) -> None:
    if cfg.freeze_d > len(D.blocks()):
        raise ValueError(f"--freeze-d {cfg.freeze_d} exceeds the discriminator's {len(D.blocks())} blocks")


def _append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run_dir))


def write_config(run_dir: Path, cfg: FinetuneConfig) -> None:
    """config.json of a run (written before any work)."""
    atomic_write_json(run_dir / "config.json", {"format": CONFIG_FORMAT, "config": cfg.to_dict()})


def read_config(run_dir: Path) -> FinetuneConfig:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finetune run directory (no config.json)")
    doc = json.loads(p.read_text())
    if doc.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{p}: not a finetune run config (format {doc.get('format')!r})")
    return FinetuneConfig.from_dict(doc["config"])


__all__ = ["FinetuneConfig", "FinetuneRun", "ema_beta", "freeze_discriminator", "read_config", "step_seed",
           "update_ema", "write_config"]
