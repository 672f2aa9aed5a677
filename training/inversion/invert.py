"""Photo -> latent inversion of one aligned face: an optional pSp / e4e encoder guess (Richardson et al., CVPR 2021;
Tov et al., SIGGRAPH 2021; z+ encoders as DualStyleGAN, Yang et al., CVPR 2022) refined by the optimisation
projector (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020, Sec. 5), plus the
artefacts `stylecast invert` writes for it (latents, noise maps, images, metrics, progress grid and GIF).

Torch-only: face detection and alignment happen before (common.faces, in the command), so this module receives
an aligned crop at the generator's resolution.

Per face, `write_face_outputs` builds one directory atomically:

    latent.npy            ws float32 [1, num_ws, w_dim] (what the synthesis network takes)
    w.npy                 the single W code float32 [1, w_dim] (space "w" only)
    noise.npz             optimised noise maps, name -> float32 [r, r] (absent with optimize_noise off)
    target.png            the aligned crop the projection fitted
    reconstruction.png    G.synthesis(ws) with those noise maps
    encoder.png           the encoder's reconstruction (with an encoder)
    history.jsonl         one line per step: loss, perceptual, mse, noise_reg, lr
    metrics.json          initial / final perceptual loss, PSNR and MSE of the reconstruction, timings
    progress.png, progress.gif   optional snapshot grid and animation
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.files import atomic_directory
from training.networks.stylegan2 import Generator

from .encoders import GradualStyleEncoder, check_encoder_fits, codes_to_ws
from .projector import LossFn, Projection, ProjectorConfig, apply_noise, project

CONFIG_FORMAT = "stylecast.invert-config/v1"
#: At most this many snapshots make the progress grid (evenly spaced, the last one included).
GRID_SNAPSHOTS = 16
#: Snapshots kept for the animation (evenly spaced over the run).
VIDEO_FRAMES = 60
GIF_FRAME_MS = 80


@dataclass(frozen=True)
class InvertConfig:
    """Everything one `stylecast invert` run depends on (saved as the run's config.json)."""

    photo: str
    checkpoint: str
    encoder: str | None = None
    encoder_space: str | None = None  # None: from the encoder checkpoint; "w+" | "z+" to state it
    face: str = "largest"  # "largest" | "all" | an index into the faces sorted by size
    align: bool = True
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    vgg16_weights: str | None = None
    lpips_weights: str | None = None
    paste_back: bool = False
    progress_grid: bool = False
    video: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.face not in ("largest", "all") and not (isinstance(self.face, str) and self.face.isdigit()):
            raise ValueError(f"--face must be 'largest', 'all' or a face index, got {self.face!r}")
        if self.paste_back and not self.align:
            raise ValueError("--paste-back needs a face found in the photo; it cannot be used with --no-align")
        if self.encoder_space not in (None, "w+", "z+"):
            raise ValueError(f"encoder space must be 'w+' or 'z+', got {self.encoder_space!r}")

    @property
    def snapshot_every(self) -> int:
        """Steps between kept snapshots (0 = none) for the progress grid / animation."""
        if not (self.progress_grid or self.video) or self.projector.steps == 0:
            return 0
        return max(1, self.projector.steps // VIDEO_FRAMES)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["projector"] = self.projector.to_dict()
        return d


# ----------------------------------------------------------------------------------------------------------
# Pieces


def u8_to_img(img_u8: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    if img_u8.ndim != 3 or img_u8.shape[2] != 3 or img_u8.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {img_u8.shape} {img_u8.dtype}")
    return torch.from_numpy(np.array(img_u8, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def img_to_u8(img: torch.Tensor) -> np.ndarray:
    """float [1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3] (round((x + 1) * 127.5), clamped)."""
    x = ((img.detach().float().cpu()[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def resize_square_u8(img_u8: np.ndarray, size: int) -> np.ndarray:
    """An already aligned image -> [size, size, 3]: centre-crop to a square, then Lanczos resize."""
    from PIL import Image

    h, w = img_u8.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(np.ascontiguousarray(img_u8[top:top + s, left:left + s]))
    if s != size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.ascontiguousarray(np.asarray(im))


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of one shape (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def loss_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """What the projector's loss sees: img area-downsampled to size when larger."""
    return F.interpolate(img, size=(size, size), mode="area") if img.shape[-1] > size else img


@torch.no_grad()
def encoder_init(encoder: GradualStyleEncoder, G: Generator, target: torch.Tensor) -> torch.Tensor:
    """The encoder's guess for an aligned target: ws [1, num_ws, w_dim] (z+ codes go through G's mapping).

    Args:
        encoder: pSp / e4e encoder (eval mode), w+ or z+.
        G: the generator the projection runs in (its mapping turns z+ codes into ws).
        target: img [1, 3, R, R] in [-1, 1]; resized to the encoder's input size here.
    """
    check_encoder_fits(encoder.cfg, G, "the encoder")
    device = next(G.parameters()).device
    codes = encoder.to(device)(encoder.preprocess(target.to(device)))  # [1, num_ws, D]
    return codes_to_ws(codes, encoder.cfg.latent_space, G.mapping).float()


@dataclass
class FaceInversion:
    """One inverted face: the projection, its start latent and rendering, and the metrics."""

    projection: Projection
    target: torch.Tensor  # [1, 3, R, R]
    start_ws: torch.Tensor  # [1, num_ws, w_dim]: w_avg or the encoder's guess
    start_img: torch.Tensor  # [1, 3, R, R]: G.synthesis(start_ws) with the generator's own noise
    metrics: dict[str, float]
    encoder_img: torch.Tensor | None = None


def invert_face(G: Generator, target: torch.Tensor, loss_fn: LossFn, cfg: ProjectorConfig,
                encoder: GradualStyleEncoder | None = None, snapshot_every: int = 0,
                progress: Callable[[int, dict[str, float]], None] | None = None) -> FaceInversion:
    """Invert one aligned face: encoder guess (optional), projector, final metrics.

    Args:
        G: the generator (unchanged; the projector works on a copy).
        target: img [1, 3, R, R] float32 in [-1, 1], R = G.resolution.
        loss_fn: (img, target) -> [N] perceptual distance (the projector's loss).
        cfg: projector settings (space "w": the encoder's W+ guess is averaged over layers).
        encoder: optional pSp / e4e encoder whose output starts the optimisation.
        snapshot_every / progress: passed to the projector.
    Returns:
        FaceInversion; metrics hold perceptual_init / perceptual_final (loss_fn on the loss view, without
        exploration noise), psnr / mse (uint8 reconstruction vs uint8 target), and seconds.
    """
    t0 = time.perf_counter()
    device = next(G.parameters()).device
    target = target.to(device, torch.float32)
    start = encoder_init(encoder, G, target) if encoder is not None else None
    proj = project(G, target, loss_fn, cfg, init_ws=start, snapshot_every=snapshot_every, progress=progress)
    with torch.no_grad():
        start_ws = start if start is not None else G.w_avg.detach().reshape(1, 1, -1).repeat(1, G.num_ws, 1)
        start_img = G.synthesis(start_ws.to(device), noise_mode="const").cpu()
        size = cfg.loss_size
        t_view = loss_view(target, size)
        p_init = float(loss_fn(loss_view(start_img.to(device), size), t_view).sum())
        p_final = float(loss_fn(loss_view(proj.img.to(device), size), t_view).sum())
    tgt_u8, rec_u8 = img_to_u8(target), img_to_u8(proj.img.clamp(-1, 1))
    mse = float(np.mean((tgt_u8.astype(np.float64) - rec_u8.astype(np.float64)) ** 2))
    metrics = {"perceptual_init": p_init, "perceptual_final": p_final, "psnr": psnr_u8(tgt_u8, rec_u8),
               "mse": mse, "steps": cfg.steps, "seconds": time.perf_counter() - t0}
    if encoder is not None:
        metrics["encoder_psnr"] = psnr_u8(tgt_u8, img_to_u8(start_img.clamp(-1, 1)))
    return FaceInversion(projection=proj, target=target.cpu(), start_ws=start_ws.cpu(), start_img=start_img,
                         metrics=metrics, encoder_img=start_img if encoder is not None else None)


def snapshot_frames(proj: Projection, target: torch.Tensor, limit: int) -> list[np.ndarray]:
    """Up to `limit` evenly spaced snapshots (the last always included) as uint8 [R, R, 3] frames."""
    snaps = proj.snapshots
    if not snaps:
        return [img_to_u8(proj.img.clamp(-1, 1))]
    idx = sorted({round(i * (len(snaps) - 1) / max(limit - 1, 1)) for i in range(min(limit, len(snaps)))})
    return [img_to_u8(snaps[i][1]) for i in idx]


def progress_grid(proj: Projection, target: torch.Tensor) -> np.ndarray:
    """Snapshots of the run (at most GRID_SNAPSHOTS) followed by the target, tiled in one uint8 image."""
    from training.generate import make_grid

    frames = snapshot_frames(proj, target, GRID_SNAPSHOTS) + [img_to_u8(target)]
    return make_grid(np.stack(frames), cols=min(len(frames), 6), pad=2)


def gif_bytes(frames: list[np.ndarray], frame_ms: int = GIF_FRAME_MS) -> bytes:
    """An endlessly looping animated GIF (Pillow) of uint8 [H, W, 3] frames; the last frame is held longer."""
    from PIL import Image

    ims = [Image.fromarray(f) for f in frames]
    durations = [frame_ms] * (len(ims) - 1) + [frame_ms * 10]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0,
                optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Output


def write_face_outputs(out_dir: Path, result: FaceInversion, cfg: InvertConfig,
                       extra_metrics: dict[str, Any] | None = None) -> Path:
    """Write one face's directory atomically (see the module docstring); never overwrites.

    Returns:
        out_dir.
    """
    from training.generate import encode_png

    proj = result.projection
    ws = proj.ws.detach().cpu().float().numpy().astype(np.float32)  # [1, num_ws, w_dim]
    metrics = dict(result.metrics)
    metrics.update(extra_metrics or {})
    with atomic_directory(out_dir) as tmp:
        np.save(tmp / "latent.npy", ws)
        if cfg.projector.space == "w":
            np.save(tmp / "w.npy", ws[:, 0].copy())
        if proj.noise:
            np.savez(tmp / "noise.npz", **{k: v.float().numpy() for k, v in proj.noise.items()})
        (tmp / "target.png").write_bytes(encode_png(img_to_u8(result.target)))
        (tmp / "reconstruction.png").write_bytes(encode_png(img_to_u8(proj.img.clamp(-1, 1))))
        if result.encoder_img is not None:
            (tmp / "encoder.png").write_bytes(encode_png(img_to_u8(result.encoder_img.clamp(-1, 1))))
        (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in proj.history))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if cfg.progress_grid:
            (tmp / "progress.png").write_bytes(encode_png(progress_grid(proj, result.target)))
        if cfg.video:
            (tmp / "progress.gif").write_bytes(gif_bytes(snapshot_frames(proj, result.target, VIDEO_FRAMES)))
    return out_dir


def rerender(G: Generator, out_dir: Path) -> torch.Tensor:
    """Render a written face directory again from latent.npy + noise.npz: img [1, 3, R, R] (for checks)."""
    ws = torch.from_numpy(np.load(Path(out_dir) / "latent.npy"))
    noise_file = Path(out_dir) / "noise.npz"
    if noise_file.is_file():
        with np.load(noise_file) as z:
            G = apply_noise(G, {k: torch.from_numpy(z[k]) for k in z.files})
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const")


__all__ = ["CONFIG_FORMAT", "FaceInversion", "InvertConfig", "encoder_init", "gif_bytes", "img_to_u8",
           "invert_face", "progress_grid", "psnr_u8", "rerender", "resize_square_u8", "snapshot_frames",
           "u8_to_img", "write_face_outputs"]
