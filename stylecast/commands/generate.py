"""`stylecast generate`: render seeds from any supported checkpoint to PNG files."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Native checkpoint directory, rosinality .pt, NVlabs .pkl, or a serving bundle directory "
                   "(rendered with ONNX Runtime exactly as `stylecast serve` does).")
@click.option("--seeds", default="0-3", help="Seeds, e.g. 0-3,7.")
@click.option("--psi", type=float, default=1.0, help="Truncation psi (1 = none, 0.7 typical).")
@click.option("--cutoff", type=int, default=None, help="Truncate only the first N latents.")
@click.option("--noise-mode", type=click.Choice(["const", "random", "none"]), default="const")
@click.option("--outdir", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--grid/--no-grid", default=False, help="Also write grid.png with all images.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8)
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
def generate(checkpoint: Path, seeds: str, psi: float, cutoff: int | None, noise_mode: str, outdir: Path,
             grid: bool, batch_size: int, device: str) -> None:
    """Generate images for seeds.

    \b
    Example:
      stylecast generate --checkpoint ffhq.pt --seeds 0-3,7 --psi 0.7 --outdir out/
    Writes out/seed0000.png, ... (uint8 from round((img + 1) * 127.5)).
    """
    import math

    import torch

    from common.seeds import parse_seeds
    from training.checkpoints import load_checkpoint
    from training.generate import generate_images, make_grid, save_png

    seed_list = parse_seeds(seeds)
    if not math.isfinite(psi) or not -2.0 <= psi <= 2.0:
        raise ValueError(f"--psi must be a finite number in [-2, 2], got {psi}")
    from serving.offline import BundleRenderer, is_bundle
    if is_bundle(checkpoint):
        # A serving bundle: the server's own pipeline, so the PNGs are byte-identical to `stylecast serve`'s.
        if noise_mode != "const":
            raise ValueError("a bundle renders with its stored noise only (--noise-mode const)")
        renderer = BundleRenderer(checkpoint)
        if cutoff is not None and not 0 <= cutoff <= renderer.model.num_ws:
            raise ValueError(f"--cutoff must be in 0..{renderer.model.num_ws}")
        images = renderer.render_u8(seed_list, psi=psi, cutoff=cutoff, batch_size=batch_size)
    else:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        G = load_checkpoint(checkpoint).G
        if cutoff is not None and not 0 <= cutoff <= G.num_ws:
            raise ValueError(f"--cutoff must be in 0..{G.num_ws}")
        images = generate_images(G, seed_list, psi=psi, cutoff=cutoff, noise_mode=noise_mode,
                                 batch_size=batch_size, device=device, progress=len(seed_list) > batch_size)
    outdir.mkdir(parents=True, exist_ok=True)
    for seed, img in zip(seed_list, images):
        save_png(outdir / f"seed{seed:04d}.png", img)
    if grid:
        save_png(outdir / "grid.png", make_grid(images))
    click.echo(f"wrote {len(seed_list)} image(s) to {outdir}")
