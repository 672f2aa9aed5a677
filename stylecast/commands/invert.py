"""`stylecast invert`: project the faces of a photo into a generator's W / W+ space (StyleGAN2 projector, Karras et
al. 2020), optionally starting from a pSp / e4e encoder's guess (Richardson et al. 2021; Tov et al. 2021)."""

from __future__ import annotations

from pathlib import Path

import click

ENV_VGG16 = "STYLECAST_VGG16_WEIGHTS"


def _face_choice(value: str) -> str:
    v = value.strip().lower()
    if v in ("largest", "all") or v.isdigit():
        return v
    raise click.BadParameter(f"must be 'largest', 'all' or a face index (0 = largest), got {value!r}")


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@click.argument("photo", type=click.Path(path_type=Path))
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Generator: native checkpoint dir, rosinality .pt or NVlabs .pkl.")
@click.option("--outdir", "-o", type=click.Path(path_type=Path), default=Path("runs"),
              help="Parent of the numbered run directory.")
@click.option("--face", default="largest", callback=lambda _c, _p, v: _face_choice(v),
              help="Which face: largest, all, or an index (0 = largest).")
@click.option("--align/--no-align", default=True,
              help="FFHQ-align faces found with dlib (--no-align: PHOTO is already an aligned face; it is "
                   "centre-cropped and resized to the generator's resolution).")
@click.option("--encoder", type=click.Path(path_type=Path), default=None,
              help="pSp / e4e encoder (official .pt or native dir) whose output starts the optimisation.")
@click.option("--encoder-space", type=click.Choice(["auto", "w+", "z+"]), default="auto",
              help="Latent space of --encoder (auto: what the checkpoint records; DualStyleGAN's encoder.pt is "
                   "z+ but may not record it).")
@click.option("--space", type=click.Choice(["w", "w+"]), default="w+", help="Optimise one W code or one per layer.")
@click.option("--steps", type=click.IntRange(0), default=1000, help="Optimisation steps.")
@click.option("--lr", type=float, default=0.1, help="Peak Adam learning rate (ramped up and down).")
@click.option("--noise-reg", type=float, default=1e5, help="Weight of the noise-map regularisation.")
@click.option("--optimize-noise/--no-optimize-noise", default=True, help="Also optimise the per-layer noise maps.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of noise init and latent noise.")
@click.option("--vgg16-weights", type=click.Path(path_type=Path), default=None, envvar=ENV_VGG16,
              help=f"torchvision VGG16 ImageNet state dict (vgg16-397923af.pth); env {ENV_VGG16}.")
@click.option("--lpips-weights", type=click.Path(path_type=Path), default=None,
              help="LPIPS' learned VGG linear layers (lpips package weights/v0.1/vgg.pth); default uniform.")
@click.option("--paste-back", is_flag=True, default=False,
              help="Also write paste_back.png: the reconstructions blended back into the photo.")
@click.option("--progress-grid", is_flag=True, default=False, help="Write progress.png: snapshots of the run.")
@click.option("--video", is_flag=True, default=False, help="Write progress.gif: the run as an animation.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def invert(photo: Path, checkpoint: Path, outdir: Path, face: str, align: bool, encoder: Path | None,
           encoder_space: str, space: str, steps: int, lr: float, noise_reg: float, optimize_noise: bool, seed: int,
           vgg16_weights: Path | None, lpips_weights: Path | None, paste_back: bool, progress_grid: bool,
           video: bool, device: str, progress: bool) -> None:
    """Invert the face(s) in PHOTO: FFHQ alignment, optional encoder guess, then the projector.

    \b
    Writes OUTDIR/NNNNN-invert-PHOTO/: config.json (first), face0/ (face1/ ...) with latent.npy
    ([1, num_ws, w_dim] float32 ws; w.npy too for --space w), noise.npz, target.png, reconstruction.png,
    history.jsonl, metrics.json (perceptual loss, PSNR), optional progress.png / progress.gif, and with
    --paste-back paste_back.png. Nothing is written when the photo has no face or a weight file is missing.
    \b
    Examples:
      stylecast invert me.jpg --checkpoint ffhq.pt --vgg16-weights vgg16-397923af.pth --outdir runs/
      stylecast invert group.jpg -c ffhq.pt --face all --encoder e4e_ffhq_encode.pt --steps 300 --paste-back
    """
    import math
    import time

    import numpy as np
    import torch

    from common import faces
    from common.files import atomic_write_bytes, atomic_write_json, next_run_dir
    from training.checkpoints import load_checkpoint
    from training.generate import encode_png
    from training.inversion.invert import (CONFIG_FORMAT, InvertConfig, img_to_u8, invert_face, resize_square_u8,
                                           u8_to_img, write_face_outputs)
    from training.inversion.losses import PerceptualLoss
    from training.inversion.projector import ProjectorConfig

    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"--lr must be a positive number, got {lr}")
    if not math.isfinite(noise_reg) or noise_reg < 0:
        raise ValueError(f"--noise-reg must be >= 0, got {noise_reg}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not photo.is_file():
        raise FileNotFoundError(f"photo not found: {photo}")
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    pcfg = ProjectorConfig(space=space, steps=steps, lr=lr, noise_reg=noise_reg, optimize_noise=optimize_noise,
                           seed=seed)
    cfg = InvertConfig(photo=str(photo.resolve()), checkpoint=str(checkpoint.resolve()),
                       encoder=str(encoder.resolve()) if encoder else None,
                       encoder_space=None if encoder_space == "auto" else encoder_space, face=face, align=align,
                       projector=pcfg, vgg16_weights=str(vgg16_weights) if vgg16_weights else None,
                       lpips_weights=str(lpips_weights) if lpips_weights else None, paste_back=paste_back,
                       progress_grid=progress_grid, video=video, device=device)

    # Everything that can fail on the user's inputs happens before the run directory exists.
    G = load_checkpoint(checkpoint).G.to(device)
    R = G.resolution
    loss = PerceptualLoss.load(vgg16_weights, lpips_weights, device=device, progress=progress)
    enc = None
    if encoder is not None:
        from training.inversion.encoders import check_encoder_fits, load_encoder
        enc = load_encoder(encoder, with_decoder=False, device=device, latent_space=cfg.encoder_space).encoder
        check_encoder_fits(enc.cfg, G, f"encoder {encoder}")
    photo_u8 = faces.read_image(photo)
    if align:
        which: str | int = int(face) if face.isdigit() else face
        aligned = faces.align_photo(photo_u8, size=R, which=which, what=str(photo))
        crops = [(a.img_u8, a.quad) for a in aligned]
    else:
        crops = [(resize_square_u8(photo_u8, R), None)]

    run_dir = next_run_dir(outdir, f"invert-{photo.stem}")
    atomic_write_json(run_dir / "config.json", {"format": CONFIG_FORMAT, "config": cfg.to_dict(),
                                                "generator": {"resolution": R, "num_ws": G.num_ws,
                                                              "w_dim": G.w_dim}, "faces": len(crops)})
    click.echo(f"{run_dir}: {len(crops)} face(s) at {R} px, {steps} steps in {space} on {device}", err=True)
    composite = photo_u8.copy() if paste_back else None
    summary = []
    for i, (crop_u8, quad) in enumerate(crops):
        bar = None
        if progress and steps > 0:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"face {i}" if len(crops) > 1 else "invert", unit="step",
                       dynamic_ncols=True)

        def on_step(step: int, rec: dict[str, float], bar=bar) -> None:
            if bar is not None:
                bar.set_postfix({"perceptual": f"{rec['perceptual']:.4f}", "lr": f"{rec['lr']:.4f}"},
                                refresh=False)
                bar.update(1)

        t0 = time.perf_counter()
        try:
            result = invert_face(G, u8_to_img(crop_u8), loss, pcfg, encoder=enc,
                                 snapshot_every=cfg.snapshot_every, progress=on_step)
        finally:
            if bar is not None:
                bar.close()
        extra = {"face": i, "quad": quad.tolist() if quad is not None else None}
        write_face_outputs(run_dir / f"face{i}", result, cfg, extra)
        summary.append({"face": i, **result.metrics})
        if composite is not None:
            composite = faces.paste_back(composite, img_to_u8(result.projection.img.clamp(-1, 1)), quad)
        m = result.metrics
        click.echo(f"face {i}: perceptual {m['perceptual_init']:.4f} -> {m['perceptual_final']:.4f}, "
                   f"PSNR {m['psnr']:.2f} dB ({time.perf_counter() - t0:.1f} s)", err=True)
    if composite is not None:
        atomic_write_bytes(run_dir / "paste_back.png", encode_png(np.ascontiguousarray(composite)))
    atomic_write_json(run_dir / "metrics.json", {"faces": summary})
    click.echo(str(run_dir))
