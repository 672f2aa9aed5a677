"""Facial destylization and extrinsic-code refinement for DualStyleGAN (Yang et al., "Pastiche Master:
Exemplar-Based High-Resolution Portrait Style Transfer", CVPR 2022, Sec. 3.3 and the official destylize.py /
refine_exstyle.py): per style image, latent optimisation that yields its extrinsic code z+_e and the intrinsic
code z+_i of its destylized (photo-like) face.

Destylization of a style image S (batch 1, as the official default):

    z+_e  = E(S)                                   pSp z+ code (a W+ encoder's ws are inverted through the
                                                   base mapping; without an encoder: the mean face's z)
    z^+   = argmin LPIPS(g'(z), S) + 0.1 ID(g'(z), S) + std_layers(z) + 1e5 noise_reg      on the finetuned g'
            (Adam lr 0.1 with the projector's ramp up 5% / down 25%, 300 steps, z and the noise maps)
    z^+[c:] = z+_e[c:]                             colour latents c = res_index + 2 .. (official 8:18)
    S_d   = g(0.7 * w(z^+))                        the base generator, truncated towards 0, optimised noise
    z+_i  = E(S_d) with [c:] from z+_e             (without an encoder: z^+ itself)

exstyle_code = {name: z+_e} and instyle_code = {name: z+_i}, as the official scripts write them.

Refinement of z+_e for a Stage III model (official refine_exstyle.py): Adam on the structure part (latents
0..res_index, lr 0.005), the colour part (res_index+1.., lr 0.01) and the noise maps (lr 0.1), 100 steps of
LPIPS(G(z+_i, z+_e), S) + CX(VGG19 relu3_1, h 0.2) + 1e5 noise_reg with all extrinsic weights 1.

Run directory (numbered, never overwritten; --resume continues after the last finished image):

    config.json                          the resolved config and the sha256 of every input (written first)
    log.jsonl                            one line per image: first / last losses
    destylized/<name>.png | refined/<name>.png    per-image strip: S, reconstruction, destylized, re-encoded
                                         (refine: S, before, after)
    exstyle_code.npy + .safetensors      official pickled dict + native format (destylize)
    instyle_code.npy + .safetensors
    refined_exstyle_code.npy + .safetensors       (refine)
    state/codes.safetensors              the codes of the images done so far (resume)

Determinism: image k is processed with seeds derived from (seed, k) only, so a resumed run writes the same codes
as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.files import atomic_directory, next_run_dir
from training.finetune.trainer import step_seed
from training.generate import make_grid, save_png, to_uint8
from training.inversion.encoders import z_plus_to_ws
from training.inversion.projector import ProjectorConfig, learning_rate, noise_regularization
from training.networks.stylegan2 import Generator

from .checkpoints import load_dualstylegan, load_exstyle_codes, save_exstyle_codes
from .common import (LOSS_SIZE, CodeEncoder, DualStyleDivergedError, LossNets, append_jsonl, check_codes, colour_start, finite, image_tensor, invert_mapping, list_style_images,
                     load_style_image, loss_view, read_run_config, style_key, truncate_jsonl, write_run_config)
from .losses import contextual_loss
from .model import DualStyleGAN

#: (style image files, R) -> their FFHQ-aligned crops, img_u8 [R, R, 3] each (the CLI builds one on common.faces).
Aligner = Callable[[list[Path], int], list[np.ndarray]]

DESTYLIZE_FORMAT = "stylecast.dualstylegan-destylize/v1"
REFINE_FORMAT = "stylecast.dualstylegan-refine/v1"
STATE_FORMAT = "stylecast.dualstylegan-codes-state/v1"
#: Official contextual-loss bandwidth of DualStyleGAN (finetune_dualstylegan.py, refine_exstyle.py).
CX_BAND_WIDTH = 0.2


# ----------------------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class DestylizeConfig:
    """Facial destylization (defaults: the official destylize.py; see the module docstring)."""

    base: str                      # base (e.g. FFHQ) generator checkpoint
    finetuned: str                 # the base finetuned on the style images (e.g. `stylecast train finetune`)
    data: str                      # folder of style images
    encoder: str | None = None     # pSp / e4e checkpoint; None = start from the mean face
    encoder_space: str | None = None  # None = from the checkpoint; "z+" for the official DualStyleGAN encoder
    align: bool = False            # FFHQ-align the style images with dlib first
    iters: int = 300
    lr: float = 0.1
    id_weight: float = 0.1
    reg_weight: float = 1.0        # std of z+ over the layers
    noise_weight: float = 1e5
    truncation: float = 0.7        # towards 0, for the destylized faces
    res_index: int = 6             # of the DualStyleGAN these codes are for (colour latents from res_index + 2)
    invert_steps: int = 300        # L-BFGS steps of the W+ -> z+ inversion (W+ encoders only)
    loss_size: int = LOSS_SIZE
    id: str = "dlib"
    vgg16_weights: str | None = None
    lpips_weights: str | None = None
    outdir: str = "runs"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive_int(self, "iters", 0)
        _check_positive_int(self, "invert_steps", 0)
        _check_positive_int(self, "loss_size", 16)
        for name in ("lr",):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("id_weight", "reg_weight", "noise_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.truncation <= 1:
            raise ValueError(f"--truncation must be in [0, 1], got {self.truncation}")
        if self.res_index < 0 or self.res_index % 2:
            raise ValueError(f"--res-index must be an even integer >= 0, got {self.res_index}")
        if self.encoder_space not in (None, "w+", "z+"):
            raise ValueError(f"--encoder-space must be auto, w+ or z+, got {self.encoder_space!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError("--seed must be in 0..2**32-1")


@dataclass(frozen=True)
class RefineConfig:
    """Extrinsic-code refinement (defaults: the official refine_exstyle.py; its README example uses
    lr_colour 0.1)."""

    checkpoint: str                # DualStyleGAN after Stage III
    data: str                      # the style images the codes were made from
    exstyle: str                   # their exstyle codes (.npy official or .safetensors)
    instyle: str                   # their instyle codes
    iters: int = 100
    lr_colour: float = 0.01
    lr_structure: float = 0.005
    lr_noise: float = 0.1
    cx_weight: float = 1.0
    noise_weight: float = 1e5
    loss_size: int = LOSS_SIZE
    vgg19_weights: str | None = None
    vgg16_weights: str | None = None
    lpips_weights: str | None = None
    outdir: str = "runs"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive_int(self, "iters", 0)
        _check_positive_int(self, "loss_size", 16)
        for name in ("lr_colour", "lr_structure", "lr_noise"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("cx_weight", "noise_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError("--seed must be in 0..2**32-1")


def _check_positive_int(cfg: Any, name: str, lo: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")


# ----------------------------------------------------------------------------------------------------------
# Noise maps as optimisation variables


def optimisable_noise(G: Generator, gen: torch.Generator) -> list[torch.Tensor]:
    """Turn G's constant noise buffers into fresh N(0, 1) leaf tensors that require grad (G is modified: pass
    a copy). Returns them in layer order."""
    noises = []
    for name, buf in G.named_buffers():
        if name.endswith("noise_const"):
            with torch.no_grad():
                buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.device))
            buf.requires_grad_(True)
            noises.append(buf)
    return noises


def set_noise(G: Generator, noises: list[torch.Tensor]) -> None:
    """Copy noise maps (in layer order, as optimisable_noise returns them) into G's noise buffers."""
    bufs = [b for n, b in G.named_buffers() if n.endswith("noise_const")]
    if len(bufs) != len(noises):
        raise ValueError("noise maps do not fit the generator")
    with torch.no_grad():
        for b, n in zip(bufs, noises):
            b.copy_(n.detach())


def _normalize_noise(noises: list[torch.Tensor]) -> None:
    # Official noise_normalize_: zero mean, unit std (torch.std's unbiased estimate) after every step.
    with torch.no_grad():
        for n in noises:
            n.sub_(n.mean()).div_(n.std())


# ----------------------------------------------------------------------------------------------------------
# The per-image loop shared by both runs


class _CodeRun:
    """A run that optimises codes image by image, saving them after each image."""

    FORMAT = ""
    KIND = ""
    OUTPUTS: tuple[str, ...] = ()

    def __init__(self, cfg: Any, run_dir: Path | None, device: torch.device, names: list[str], files: list[Path]):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.names, self.files = names, files
        self.done: dict[str, dict[str, np.ndarray]] = {k: {} for k in self.OUTPUTS}
        self.inputs: dict[str, str] = {}
        self.history: dict[str, list[dict[str, float]]] = {}

    # ---- subclass interface

    def process(self, k: int) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict[str, float]]]:
        """Image k -> ({output: code [1, L, D]}, strip image [h, w, 3] uint8, per-step losses)."""
        raise NotImplementedError

    # ---- state

    @property
    def num_done(self) -> int:
        return len(self.done[self.OUTPUTS[0]])

    def _state_bytes(self) -> bytes:
        from safetensors.numpy import save as st_save

        names = self.names[: self.num_done]
        tensors = {out: np.ascontiguousarray(np.concatenate([self.done[out][n] for n in names]))
                   for out in self.OUTPUTS if names}
        meta = {"format": STATE_FORMAT, "names": json.dumps(names)}
        return st_save(tensors, metadata=meta)

    def load_state(self) -> None:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = self.run_dir / "state" / "codes.safetensors"
        if not path.is_file():
            return
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a stylecast code state")
        names = json.loads(meta["names"])
        if names != self.names[: len(names)]:
            raise ValueError(f"{path}: the style folder changed since the run started (images differ)")
        arrays = load_file(str(path)) if names else {}
        for out in self.OUTPUTS:
            for i, n in enumerate(names):
                self.done[out][n] = arrays[out][i: i + 1].copy()

    # ---- the loop

    def run(self, progress: bool = True, log: Callable[[str], None] = print, max_images: int | None = None) -> Path:
        """Process the remaining images (at most max_images of them, for an interruptible run); returns the
        run directory. Final code files are written once every image is done."""
        folder = self.run_dir / self.KIND
        folder.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.run_dir / "log.jsonl", "index", self.num_done - 1)
        todo = list(range(self.num_done, len(self.names)))
        if max_images is not None:
            todo = todo[:max_images]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(self.names), initial=self.num_done, unit="img", desc=self.KIND, dynamic_ncols=True)
        try:
            for k in todo:
                t0 = time.perf_counter()
                name = self.names[k]
                codes, strip, hist = self.process(k)
                for out, code in codes.items():
                    self.done[out][name] = code
                self.history[name] = hist
                save_png(folder / (Path(name).with_suffix("").as_posix().replace("/", "__") + ".png"), strip)
                line = {"index": k, "name": name, "first": hist[0] if hist else {}, "last": hist[-1] if hist else {},
                        "sec": round(time.perf_counter() - t0, 3)}
                append_jsonl(self.run_dir / "log.jsonl", line)
                with atomic_directory(self.run_dir / "state", overwrite=True) as tmp:
                    (tmp / "codes.safetensors").write_bytes(self._state_bytes())
                if bar is not None:
                    bar.update(1)
                    if hist:
                        bar.set_postfix({k2: f"{v:.3f}" for k2, v in hist[-1].items() if k2 != "lr"}, refresh=False)
                else:
                    log(f"[{k + 1}/{len(self.names)}] {name}: " + ", ".join(
                        f"{k2} {v:.4g}" for k2, v in (hist[-1] if hist else {}).items()))
        finally:
            if bar is not None:
                bar.close()
        if self.num_done == len(self.names):
            self.write_outputs()
        return self.run_dir

    def write_outputs(self) -> None:
        for out in self.OUTPUTS:
            codes = {n: self.done[out][n] for n in self.names}
            save_exstyle_codes(self.run_dir / f"{out}.npy", codes)
            save_exstyle_codes(self.run_dir / f"{out}.safetensors", codes)

    def codes(self, out: str) -> dict[str, np.ndarray]:
        return {n: self.done[out][n] for n in self.names if n in self.done[out]}

    def _diverged(self, name: str, step: int, parts: dict[str, float]) -> None:
        what = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
        raise DualStyleDivergedError(f"{self.KIND} of {name} diverged at step {step} ({what}); the codes of the "
                                     f"{self.num_done} earlier images are kept in {self.run_dir / 'state'}; "
                                     "try a lower --lr")


def _sha(path: str | None) -> str | None:
    from training.checkpoints import checkpoint_sha256

    return checkpoint_sha256(path) if path else None


def _check_inputs(doc: dict[str, Any], current: dict[str, str | None]) -> None:
    saved = doc.get("inputs", {})
    for k, sha in current.items():
        if saved.get(k) != sha:
            raise ValueError(f"--{k} changed since the run started (sha256 differs); start a new run")


def _style_files(data: str) -> tuple[list[str], list[Path]]:
    root = Path(data)
    files = list_style_images(root)
    return [style_key(root, f) for f in files], files


# ----------------------------------------------------------------------------------------------------------
# Destylization


class DestylizeRun(_CodeRun):
    """Facial destylization of a style folder. Build with `start` / `resume`, then `run()`."""

    FORMAT = DESTYLIZE_FORMAT
    KIND = "destylized"
    OUTPUTS = ("exstyle_code", "instyle_code")

    def __init__(self, cfg: DestylizeConfig, run_dir: Path | None, device: torch.device, G_base: Generator,
                 G_ft: Generator, encoder: CodeEncoder | None, nets: LossNets, names: list[str], files: list[Path],
                 aligner: Aligner | None = None):
        super().__init__(cfg, run_dir, device, names, files)
        if G_base.cfg != G_ft.cfg:
            raise ValueError("the base and finetuned generators have different architectures "
                             f"({G_base.resolution} px / {G_base.w_dim} vs {G_ft.resolution} px / {G_ft.w_dim})")
        nets.require("lpips", what="destylization")
        if cfg.res_index > G_base.num_ws - 2:
            raise ValueError(f"--res-index {cfg.res_index} is too large for {G_base.num_ws} latents "
                             f"(at most {G_base.num_ws - 2})")
        self.G_base = G_base.to(device).eval().requires_grad_(False)
        self.G_ft = G_ft.to(device).eval().requires_grad_(False)
        self.encoder = encoder.to(device) if encoder is not None else None
        self.nets = nets.to(device)
        self.colour = colour_start(cfg.res_index, G_base.num_ws)
        self.resolution = G_base.resolution
        self._mean_z: torch.Tensor | None = None
        # --align: every image is aligned up front, so a folder with faceless images fails before any work.
        # Face detection lives outside training (common.faces, supplied by the command).
        self.aligned = None
        if cfg.align:
            if aligner is None:
                raise ValueError("--align needs a face aligner (the CLI supplies common.faces)")
            self.aligned = aligner(files, self.resolution)

    @classmethod
    def start(cls, cfg: DestylizeConfig, nets: LossNets | None = None, device: str | torch.device = "cpu",
              encoder: CodeEncoder | None = None, aligner: Aligner | None = None) -> "DestylizeRun":
        """Load and validate every input (nothing is written); nets None = load the real loss networks;
        aligner: (files, R) -> img_u8 [R, R, 3] per file, needed with cfg.align."""
        from training.checkpoints import load_checkpoint

        from .common import load_code_encoder, load_loss_nets
        names, files = _style_files(cfg.data)
        device = torch.device(device)
        G_base = load_checkpoint(cfg.base).G
        G_ft = load_checkpoint(cfg.finetuned).G
        if encoder is None and cfg.encoder is not None:
            encoder = load_code_encoder(cfg.encoder, G_base, cfg.encoder_space, cfg.invert_steps, device)
        if nets is None:
            nets = load_loss_nets(lpips=True, id_spec=cfg.id, vgg16_weights=cfg.vgg16_weights,
                                  lpips_weights=cfg.lpips_weights, device=device)
        run = cls(cfg, None, device, G_base, G_ft, encoder, nets, names, files, aligner)
        run.inputs = {"base": _sha(cfg.base), "finetuned": _sha(cfg.finetuned), "encoder": _sha(cfg.encoder)}
        return run

    def create_run_dir(self) -> Path:
        self.run_dir = next_run_dir(self.cfg.outdir, f"dualstylegan-destylize-{Path(self.cfg.data).resolve().name}")
        write_run_config(self.run_dir, self.FORMAT, self.cfg, {
            "inputs": self.inputs, "images": self.names, "colour_start": self.colour,
            "encoder": ("none: codes start from the mean face" if self.encoder is None
                        else f"{self.encoder.space} encoder")})
        return self.run_dir

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, nets: LossNets | None = None, device: str | torch.device = "cpu",
               encoder: CodeEncoder | None = None, aligner: Aligner | None = None) -> "DestylizeRun":
        cfg, doc = read_run_config(run_dir, DESTYLIZE_FORMAT, DestylizeConfig, "destylize")
        run = cls.start(cfg, nets, device, encoder, aligner)
        _check_inputs(doc, run.inputs)
        if doc.get("images") != run.names:
            raise ValueError(f"the style folder {cfg.data} changed since the run started (images differ)")
        run.run_dir = Path(run_dir)
        run.load_state()
        return run

    # ---- pieces

    def mean_z(self) -> torch.Tensor:
        """z+ [1, num_ws, z_dim] of the mean face (w_avg inverted through the mapping), the start without an
        encoder."""
        if self._mean_z is None:
            w = self.G_base.w_avg.detach().reshape(1, 1, -1).to(self.device)
            z, _ = invert_mapping(self.G_base, w, steps=self.cfg.invert_steps, seed=self.cfg.seed)
            self._mean_z = z.expand(1, self.G_base.num_ws, -1).contiguous()
        return self._mean_z

    def _render(self, G: Generator, z_plus: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
        return G.synthesis(z_plus_to_ws(G.mapping, z_plus) * psi, noise_mode="const")

    def process(self, k: int) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict[str, float]]]:
        cfg, nets, dev = self.cfg, self.nets, self.device
        name = self.names[k]
        seed = step_seed(cfg.seed, k)
        gen = torch.Generator().manual_seed(seed)
        S = (image_tensor(self.aligned[k]) if self.aligned is not None
             else load_style_image(self.files[k], self.resolution)).to(dev)  # [1, 3, R, R]
        target = loss_view(S, cfg.loss_size)
        with torch.no_grad():
            z_e = self.encoder.z_plus(S, seed=seed) if self.encoder is not None else self.mean_z().clone()
            rec = self._render(self.G_base, z_e)
        z_e = z_e.to(dev).float()

        # Optimise z+ and the noise maps of the finetuned generator (official Eq. (1)).
        G_ft = copy.deepcopy(self.G_ft)
        noises = optimisable_noise(G_ft, gen)
        z = z_e.clone().requires_grad_(True)
        opt = torch.optim.Adam([z] + noises, lr=cfg.lr)
        ramp = ProjectorConfig(lr=cfg.lr)
        hist: list[dict[str, float]] = []
        for step in range(cfg.iters):
            lr = learning_rate(ramp, step / cfg.iters)
            for group in opt.param_groups:
                group["lr"] = lr
            view = loss_view(self._render(G_ft, z), cfg.loss_size)
            l_perc = nets.lpips(view, target).sum()
            l_id = nets.identity(view, target).mean() if nets.identity is not None else view.new_zeros(())
            l_reg = z.std(dim=1).mean()
            l_noise = noise_regularization(noises)
            loss = l_perc + cfg.id_weight * l_id + cfg.reg_weight * l_reg + cfg.noise_weight * l_noise
            parts = {"loss": float(loss.detach()), "lpips": float(l_perc.detach()), "id": float(l_id.detach()),
                     "reg": float(l_reg.detach()), "noise": float(l_noise.detach()), "lr": lr}
            if not finite(parts["loss"]):
                self._diverged(name, step, parts)
            hist.append(parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _normalize_noise(noises)

        # Destylized face on the base generator (colour latents from the encoder, truncated towards 0), then
        # its intrinsic code.
        with torch.no_grad():
            z_hat = z.detach().clone()
            z_hat[:, self.colour:] = z_e[:, self.colour:]
            G_base = copy.deepcopy(self.G_base)
            set_noise(G_base, noises)
            dsty = self._render(G_base, z_hat, cfg.truncation)
            if self.encoder is not None:
                z_i = self.encoder.z_plus(dsty, seed=seed).to(dev).float()
                z_i[:, self.colour:] = z_e[:, self.colour:]
                refined = self._render(G_base, z_i, cfg.truncation)
            else:
                z_i, refined = z_hat, dsty
        size = min(self.resolution, LOSS_SIZE)
        strip = make_grid(to_uint8(torch.cat([loss_view(x, size) for x in (S, rec, dsty, refined)])), cols=4)
        codes = {"exstyle_code": z_e.detach().cpu().numpy().astype(np.float32),
                 "instyle_code": z_i.detach().cpu().numpy().astype(np.float32)}
        return codes, strip, hist


# ----------------------------------------------------------------------------------------------------------
# Extrinsic-code refinement


class RefineRun(_CodeRun):
    """Refine the extrinsic codes of a style folder for a (Stage III) DualStyleGAN."""

    FORMAT = REFINE_FORMAT
    KIND = "refined"
    OUTPUTS = ("refined_exstyle_code",)

    def __init__(self, cfg: RefineConfig, run_dir: Path | None, device: torch.device, model: DualStyleGAN,
                 exstyle: dict[str, np.ndarray], instyle: dict[str, np.ndarray], nets: LossNets):
        root = Path(cfg.data)
        names = list(exstyle)
        missing = [n for n in names if n not in instyle]
        if missing:
            raise ValueError(f"{cfg.instyle} lacks the instyle codes of {missing[:3]} (named in {cfg.exstyle})")
        files = [root / n for n in names]
        absent = [n for n, f in zip(names, files) if not f.is_file()]
        if not root.is_dir():
            raise FileNotFoundError(f"style image folder not found: {root}")
        if absent:
            raise FileNotFoundError(f"style image {absent[0]!r} named in {cfg.exstyle} is not in {root}")
        super().__init__(cfg, run_dir, device, names, files)
        nets.require("lpips", "vgg19", what="refinement")
        check_codes(exstyle, model.generator, str(cfg.exstyle))
        check_codes(instyle, model.generator, str(cfg.instyle))
        self.model = model.to(device).eval().requires_grad_(False)
        self.exstyle, self.instyle = exstyle, instyle
        self.nets = nets.to(device)
        self.resolution = model.generator.resolution

    @classmethod
    def start(cls, cfg: RefineConfig, nets: LossNets | None = None,
              device: str | torch.device = "cpu") -> "RefineRun":
        from .common import load_loss_nets
        device = torch.device(device)
        model = load_dualstylegan(cfg.checkpoint)
        exstyle = load_exstyle_codes(cfg.exstyle)
        instyle = load_exstyle_codes(cfg.instyle)
        if nets is None:
            nets = load_loss_nets(vgg19=True, lpips=True, vgg19_weights=cfg.vgg19_weights,
                                  vgg16_weights=cfg.vgg16_weights, lpips_weights=cfg.lpips_weights, device=device)
        run = cls(cfg, None, device, model, exstyle, instyle, nets)
        run.inputs = {"checkpoint": _sha(cfg.checkpoint), "exstyle": _sha(cfg.exstyle), "instyle": _sha(cfg.instyle)}
        return run

    def create_run_dir(self) -> Path:
        self.run_dir = next_run_dir(self.cfg.outdir, f"dualstylegan-refine-{Path(self.cfg.data).resolve().name}")
        write_run_config(self.run_dir, self.FORMAT, self.cfg, {"inputs": self.inputs, "images": self.names})
        return self.run_dir

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, nets: LossNets | None = None,
               device: str | torch.device = "cpu") -> "RefineRun":
        cfg, doc = read_run_config(run_dir, REFINE_FORMAT, RefineConfig, "refine")
        run = cls.start(cfg, nets, device)
        _check_inputs(doc, run.inputs)
        run.run_dir = Path(run_dir)
        run.load_state()
        return run

    def process(self, k: int) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict[str, float]]]:
        cfg, nets, dev, model = self.cfg, self.nets, self.device, self.model
        name = self.names[k]
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, k))
        S = load_style_image(self.files[k], self.resolution).to(dev)
        target = loss_view(S, cfg.loss_size)
        with torch.no_grad():
            real_feat = nets.vgg19(target, ["relu3_1"])["relu3_1"]
            ws = model.map_intrinsic(torch.from_numpy(self.instyle[name]).to(dev).float())
        ex = torch.from_numpy(self.exstyle[name]).to(dev).float()
        r = model.res_index
        ex_s = ex[:, : r + 1].clone().requires_grad_(True)
        ex_c = ex[:, r + 1:].clone().requires_grad_(True)
        m = copy.deepcopy(model)
        noises = optimisable_noise(m.generator, gen)
        opt = torch.optim.Adam([{"params": [ex_c], "lr": cfg.lr_colour}, {"params": [ex_s], "lr": cfg.lr_structure},
                                {"params": noises, "lr": cfg.lr_noise}])
        ones = torch.ones(model.num_ws, device=dev)
        hist: list[dict[str, float]] = []
        before = None
        for step in range(cfg.iters):
            exw = m.map_extrinsic(torch.cat([ex_s, ex_c], dim=1))
            view = loss_view(m(ws, exw, ones, noise_mode="const"), cfg.loss_size)
            if before is None:
                before = view.detach().clone()
            l_perc = nets.lpips(view, target).sum()
            l_cx = contextual_loss(nets.vgg19(view, ["relu3_1"])["relu3_1"], real_feat, band_width=CX_BAND_WIDTH)
            l_noise = noise_regularization(noises)
            loss = l_perc + cfg.cx_weight * l_cx + cfg.noise_weight * l_noise
            parts = {"loss": float(loss.detach()), "lpips": float(l_perc.detach()), "cx": float(l_cx.detach()),
                     "noise": float(l_noise.detach())}
            if not finite(parts["loss"]):
                self._diverged(name, step, parts)
            hist.append(parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _normalize_noise(noises)
        with torch.no_grad():
            refined = torch.cat([ex_s, ex_c], dim=1).detach()
            after = loss_view(m(ws, m.map_extrinsic(refined), ones, noise_mode="const"), cfg.loss_size)
            if before is None:
                before = after
        size = min(self.resolution, LOSS_SIZE)
        strip = make_grid(to_uint8(torch.cat([loss_view(x, size) for x in (target, before, after)])), cols=3)
        return {"refined_exstyle_code": refined.cpu().numpy().astype(np.float32)}, strip, hist


__all__ = ["DESTYLIZE_FORMAT", "DestylizeConfig", "DestylizeRun", "REFINE_FORMAT", "RefineConfig", "RefineRun",
           "optimisable_noise", "set_noise"]
