"""Shared pieces of DualStyleGAN training (Yang et al., "Pastiche Master: Exemplar-Based High-Resolution Portrait
Style Transfer", CVPR 2022): layer-index schedules generalised from the official 1024 px code, the loss networks,
encoder codes in z+, mapping inversion, style-image folders, and run-directory bookkeeping.

Layer indices. The official scripts hard-code indices for 18 latents and res_index 6; here they follow from the
model's res_index r (ModRes on latents 0..r, colour transforms on r+1..num_ws-1), which reproduces them at 1024 px:

    Stage II injection schedule      r+1, r, r-1            (official 7 -> 6 -> 5)
    "colour" latents of z+ codes     r+2 .. num_ws-1        (official 8:18 in destylize.py / get_paired_data)
    refine: structure / colour split 0..r / r+1..num_ws-1   (official 0:7 / 7:)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.files import atomic_write_bytes, atomic_write_json
from training.networks.stylegan2 import Generator

#: VGG19 layers every stage reads (official model/vgg.py slices relu1_1, relu2_1, relu3_1, relu4_1, relu5_1; the
#: losses use only the first three).
VGG19_LAYERS = ("relu1_1", "relu2_1", "relu3_1")
#: Images larger than this are area-averaged to it before the VGG / LPIPS / identity losses (official: 256).
LOSS_SIZE = 256
ID_SPECS = "arcface:PATH | dlib | dlib:PATH | none"


class DualStyleDivergedError(RuntimeError):
    """A loss or gradient became NaN / Inf; the message names the last good snapshot."""


# ----------------------------------------------------------------------------------------------------------
# Layer indices


def inject_schedule(res_index: int, num_ws: int) -> tuple[int, int, int]:
    """Stage II crossover indices r+1, r, r-1 (official 7, 6, 5), clamped to 1..num_ws-1."""
    return tuple(min(max(i, 1), num_ws - 1) for i in (res_index + 1, res_index, res_index - 1))  # type: ignore


def colour_start(res_index: int, num_ws: int) -> int:
    """First "colour" latent of intrinsic z+ codes: r+2 (official 8 of 18), at most num_ws."""
    return min(res_index + 2, num_ws)


# ----------------------------------------------------------------------------------------------------------
# Loss networks


@dataclass
class LossNets:
    """The frozen networks the losses run on (any may be None when a stage does not need it).

    vgg19: training.style.vgg.VGGFeatures returning VGG19_LAYERS (perceptual, feature-matching, contextual).
    lpips: training.inversion.losses.PerceptualLoss (LPIPS-style VGG16; destylization and refinement).
    identity: training.inversion.losses.IDLoss (ArcFace or dlib face-ID; None = identity loss off).
    """

    vgg19: nn.Module | None = None
    lpips: nn.Module | None = None
    identity: nn.Module | None = None

    def to(self, device: torch.device | str) -> "LossNets":
        for name in ("vgg19", "lpips", "identity"):
            net = getattr(self, name)
            if net is not None:
                setattr(self, name, net.to(device).eval().requires_grad_(False))
        return self

    def require(self, *names: str, what: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{what} needs the loss networks {missing}")


def parse_id_spec(spec: str) -> tuple[str, str | None]:
    """"arcface:PATH" | "dlib" | "dlib:PATH" | "none" -> (kind, path)."""
    s = str(spec).strip()
    kind, _, path = s.partition(":")
    kind = kind.lower()
    if kind == "none" and not path:
        return "none", None
    if kind == "dlib":
        return "dlib", path or None
    if kind == "arcface" and path:
        return "arcface", path
    raise ValueError(f"--id must be {ID_SPECS}, got {spec!r}")


def load_identity(spec: str, device: torch.device | str = "cpu") -> nn.Module | None:
    """The identity loss of an --id spec (None for "none"); missing weights raise a one-line error."""
    from training.inversion.losses import IDLoss

    kind, path = parse_id_spec(spec)
    if kind == "none":
        return None
    if kind == "arcface":
        if not Path(path).is_file():
            raise FileNotFoundError(f"ArcFace weights {path} not found: pass pSp's model_ir_se50.pth "
                                    "(--id arcface:PATH), or use --id dlib / --id none")
        return IDLoss.arcface(path, device=device)
    return IDLoss.dlib(path, device=device)


def load_loss_nets(*, vgg19: bool = False, lpips: bool = False, id_spec: str = "none",
                   vgg19_weights: str | None = None, vgg16_weights: str | None = None,
                   lpips_weights: str | None = None, device: torch.device | str = "cpu") -> LossNets:
    """Load the real (ImageNet / face-ID) loss networks a stage needs; nothing is downloaded when
    STYLECAST_OFFLINE=1 and a missing file is a one-line error saying how to supply it."""
    nets = LossNets()
    if vgg19:
        from training.style.vgg import load_vgg19
        nets.vgg19 = load_vgg19(VGG19_LAYERS, weights=vgg19_weights, device=device, progress=False)
    if lpips:
        from training.inversion.losses import PerceptualLoss
        nets.lpips = PerceptualLoss.load(vgg16_weights, lpips_weights, device=device, progress=False)
    nets.identity = load_identity(id_spec, device)
    return nets.to(device)


def loss_view(img: torch.Tensor, size: int = LOSS_SIZE) -> torch.Tensor:
    """img [N, C, R, R] area-averaged to `size` when R > size (official F.adaptive_avg_pool2d(img, 256))."""
    if img.shape[-1] > size:
        return F.adaptive_avg_pool2d(img, size)
    return img


# ----------------------------------------------------------------------------------------------------------
# z+ codes: encoders and mapping inversion


def invert_mapping(G: Generator, ws: torch.Tensor, steps: int = 300, candidates: int = 256,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """z+ codes whose rows map (through G's mapping network) as close as possible to the rows of ws.

    A W+ encoder predicts ws; DualStyleGAN's codes live in z+ (one z per layer). The mapping starts with a
    PixelNorm, so z only matters up to its length: rows are parametrised as z = sqrt(z_dim) * u / |u| and the
    result lies on that sphere. Each row starts from the nearest (in W) of `candidates` seeded random z, then
    L-BFGS (strong Wolfe line search) minimises sum ||mapping(z) - w||^2; rows are independent, so the result
    of a row does not depend on the others.

    Args:
        G: the generator whose mapping defines z -> w (not modified).
        ws: [N, L, w_dim] (or [N, w_dim]) target latents.
        steps: L-BFGS iterations (0 = the nearest candidate).
        candidates: random starting points.
        seed: seed of the candidates.
    Returns:
        (z_plus [N, L, z_dim] float32, residual [N, L] = ||mapping(z) - w|| / ||w - w_avg||, float32).
    """
    squeeze = ws.ndim == 2
    if squeeze:
        ws = ws.unsqueeze(1)
    if ws.ndim != 3 or ws.shape[-1] != G.w_dim:
        raise ValueError(f"ws must be [N, L, {G.w_dim}], got {tuple(ws.shape)}")
    n, layers = ws.shape[:2]
    device = ws.device
    target = ws.detach().reshape(n * layers, G.w_dim).float()
    radius = math.sqrt(G.z_dim)
    mapping = G.mapping

    def on_sphere(u: torch.Tensor) -> torch.Tensor:
        return F.normalize(u, dim=1) * radius

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cand = on_sphere(torch.randn(candidates, G.z_dim, generator=gen)).to(device)
        nearest = torch.cdist(target, mapping(cand)).argmin(dim=1)
    u = cand[nearest].clone()
    if steps > 0:
        requires = [p.requires_grad for p in mapping.parameters()]
        mapping.requires_grad_(False)
        try:
            with torch.enable_grad():
                u.requires_grad_(True)
                opt = torch.optim.LBFGS([u], lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-12,
                                        tolerance_change=1e-14, line_search_fn="strong_wolfe")

                def closure() -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = (mapping(on_sphere(u)) - target).square().sum()
                    loss.backward()
                    return loss

                opt.step(closure)
        finally:
            for p, r in zip(mapping.parameters(), requires):
                p.requires_grad_(r)
    with torch.no_grad():
        z = on_sphere(u.detach())
        err = (mapping(z) - target).norm(dim=1)
        scale = (target - G.w_avg.to(target)).norm(dim=1).clamp_min(1e-8)
    z_plus = z.reshape(n, layers, G.z_dim)
    residual = (err / scale).reshape(n, layers)
    if squeeze:
        return z_plus[:, 0], residual[:, 0]
    return z_plus, residual


class CodeEncoder:
    """A pSp / e4e encoder seen as image -> z+ and image -> ws of a generator.

    z+ encoders (EncoderConfig.latent_space == "z+", the DualStyleGAN pSp) give z+ directly; a W+ encoder's ws are
    turned into z+ by `invert_mapping` (a short optimisation per image).
    """

    def __init__(self, encoder: nn.Module, G: Generator, invert_steps: int = 300):
        from training.inversion.encoders import check_encoder_fits

        self.encoder = encoder.eval().requires_grad_(False)
        self.G = G
        self.space = encoder.cfg.latent_space
        self.invert_steps = invert_steps
        check_encoder_fits(encoder.cfg, G, "--encoder")

    def to(self, device: torch.device | str) -> "CodeEncoder":
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def codes(self, img: torch.Tensor) -> torch.Tensor:
        """The encoder's raw output for img [N, 3, H, W] in [-1, 1] (any size; resized to its input)."""
        return self.encoder(self.encoder.preprocess(img))

    @torch.no_grad()
    def ws(self, img: torch.Tensor) -> torch.Tensor:
        """img -> ws [N, num_ws, w_dim] (z+ codes mapped row by row through G's mapping)."""
        from training.inversion.encoders import codes_to_ws

        return codes_to_ws(self.codes(img), self.space, self.G.mapping)

    @torch.no_grad()
    def z_plus(self, img: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """img -> z+ [N, num_ws, z_dim] (a W+ encoder's ws inverted through G's mapping)."""
        codes = self.codes(img)
        if self.space == "z+":
            return codes.float()
        return invert_mapping(self.G, codes, steps=self.invert_steps, seed=seed)[0]


def load_code_encoder(path: str, G: Generator, latent_space: str | None = None, invert_steps: int = 300,
                      device: torch.device | str = "cpu") -> CodeEncoder:
    """Load a pSp / e4e checkpoint (native or official; see training.inversion.encoders.load_encoder)."""
    from training.inversion.encoders import load_encoder

    ck = load_encoder(path, with_decoder=False, device=device, latent_space=latent_space)
    return CodeEncoder(ck.encoder, G, invert_steps).to(device)


# ----------------------------------------------------------------------------------------------------------
# Style image folders


def list_style_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a style folder (recursive, sorted by relative path); FileNotFoundError / ValueError."""
    from training.finetune.dataset import list_image_files

    files = list_image_files(folder)
    if not files:
        raise ValueError(f"no images (.jpg, .jpeg, .png, .webp, .bmp) in {folder}")
    return files


def style_key(folder: Path, path: Path) -> str:
    """The code-file key of an image: its path relative to the folder (official: the file name)."""
    return path.relative_to(folder).as_posix()


def load_style_image(path: Path, resolution: int) -> torch.Tensor:
    """One style image -> img [1, 3, R, R] float32 in [-1, 1] (resize the shorter side + centre crop).

    Raises:
        ValueError: unreadable file.
    """
    from training.finetune.dataset import load_image

    try:
        arr = load_image(path, resolution)
    except Exception as exc:  # PIL raises many types on corrupt files
        raise ValueError(f"cannot read style image {path}: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from None
    return image_tensor(arr)


def image_tensor(arr: np.ndarray) -> torch.Tensor:
    """img_u8 [R, R, 3] -> img [1, 3, R, R] float32 in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def load_paired_images(folder: str | os.PathLike, names: Sequence[str], resolution: int) -> torch.Tensor:
    """The images a code file names, in its order -> [K, 3, R, R] float32 in [-1, 1].

    Raises:
        FileNotFoundError naming the first missing image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"style image folder not found: {root}")
    out = []
    for name in names:
        p = root / name
        if not p.is_file():
            raise FileNotFoundError(f"style image {name!r} named in the code file is not in {root}")
        out.append(load_style_image(p, resolution))
    return torch.cat(out)


def codes_tensor(codes: dict[str, np.ndarray], names: Iterable[str]) -> torch.Tensor:
    """{name: [1, L, D]} -> [K, L, D] float32 in the order of names."""
    return torch.from_numpy(np.concatenate([codes[n] for n in names], axis=0)).float()


def check_codes(codes: dict[str, np.ndarray], G: Generator, what: str) -> None:
    if not codes:
        raise ValueError(f"{what} holds no codes")
    shape = next(iter(codes.values())).shape
    if tuple(shape[1:]) != (G.num_ws, G.z_dim):
        raise ValueError(f"{what} holds codes of shape {tuple(shape)}, the model needs [1, {G.num_ws}, {G.z_dim}]")


# ----------------------------------------------------------------------------------------------------------
# Run-directory helpers


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A frozen config dataclass -> JSON-able dict (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def write_run_config(run_dir: Path, fmt: str, cfg: Any, extra: dict[str, Any] | None = None) -> None:
    """config.json of a run: {"format": fmt, "config": cfg, ...extra} (written before any work)."""
    atomic_write_json(Path(run_dir) / "config.json", {"format": fmt, "config": config_to_dict(cfg), **(extra or {})})


def read_run_config(run_dir: str | os.PathLike, fmt: str, cls: type, what: str) -> tuple[Any, dict[str, Any]]:
    """(config, whole document) of a run directory; one-line errors for anything else."""
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a {what} run directory (no config.json)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{p}: not a {what} run (format {got!r}, expected {fmt!r})")
    return config_from_dict(cls, doc["config"]), doc


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Keep the lines of a JSON-lines log whose `key` is <= last (the rest came after the resumed state)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get(key, 0) <= last:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def grid_with_headers(corner: np.ndarray | None, top: np.ndarray, left: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """A content x style grid: row 0 = [corner, style images...], rows 1.. = [content image, results...].

    Args:
        corner: [H, W, 3] uint8 or None (black).
        top: [S, H, W, 3] uint8 style images; left: [C, H, W, 3] uint8 content images.
        cells: [C, S, H, W, 3] uint8 results.
    Returns:
        [(C + 1) * H, (S + 1) * W, 3] uint8.
    """
    from training.generate import make_grid

    h, w = top.shape[1:3]
    corner = np.zeros((h, w, 3), np.uint8) if corner is None else corner
    rows = [np.concatenate([corner[None], top])]
    for i in range(left.shape[0]):
        rows.append(np.concatenate([left[i: i + 1], cells[i]]))
    tiles = np.concatenate(rows)
    return make_grid(tiles, cols=top.shape[0] + 1)


def resolve_device(name: str | None) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:K" -> torch.device (ValueError when CUDA is asked for but absent)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid device {name!r}: use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


__all__ = ["CodeEncoder", "DualStyleDivergedError", "ID_SPECS", "LOSS_SIZE", "LossNets", "VGG19_LAYERS",
           "colour_start", "inject_schedule", "invert_mapping", "load_code_encoder", "load_identity",
           "load_loss_nets", "load_paired_images", "load_style_image", "loss_view", "parse_id_spec"]
