"""`stylecast train nada`: StyleGAN-NADA (Gal et al., SIGGRAPH 2022), text- or image-guided adaptation of a
StyleGAN2 generator with frozen CLIP models."""

from __future__ import annotations

from pathlib import Path

import click

from common.seeds import parse_seeds

# Literal copies of training.nada's defaults, so `stylecast train --help` does not import torch.
OFFICIAL_LR = 0.002 * 4 / 5
OFFICIAL_BETA2 = 0.99 ** (4 / 5)
PHASES = ("all", "texture", "shape", "no-fine", "shape-expanded")
DEFAULT_CLIP = ("ViT-B-32:openai=1", "ViT-B-16:openai=1")
RESUME_OPTIONS = {"resume", "iters", "device", "frozen_device", "amp", "tensorboard", "progress"}


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path),
              help="Source generator: native checkpoint dir, rosinality .pt or NVlabs .pkl.")
@click.option("--source", default="photo", help="Text describing the source domain.")
@click.option("--target", default=None, help="Text describing the target domain, e.g. 'pencil sketch'.")
@click.option("--style-images", type=click.Path(path_type=Path), default=None,
              help="Folder of style images: their mean CLIP embedding is the target (image-guided).")
@click.option("--style-text-weight", type=click.FloatRange(0, 1), default=0.0,
              help="With --style-images and --target: share of the text target in the blend.")
@click.option("--style-source", type=click.Choice(["generator", "text"]), default="generator",
              help="What style images are compared against: frozen-generator samples (official) or --source.")
@click.option("--img2img-batch", type=click.IntRange(1), default=16,
              help="Frozen-generator samples for the image-guided source embedding.")
@click.option("--clip", "clip_specs", multiple=True, default=DEFAULT_CLIP,
              help="CLIP model MODEL[:TAG|:/path/weights][=WEIGHT]; repeat for several "
                   "(stylecast-tiny-clip:random is a test model).")
@click.option("--clip-cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where open_clip looks for / stores downloaded weights.")
@click.option("--lambda-direction", type=float, default=1.0, help="Directional CLIP loss weight.")
@click.option("--lambda-global", type=float, default=0.0, help="Global CLIP loss weight.")
@click.option("--lambda-patch", type=float, default=0.0, help="Patch-level directional loss weight.")
@click.option("--lambda-manifold", type=float, default=0.0, help="Manifold-angle loss weight.")
@click.option("--lambda-id", type=float, default=0.0, help="CLIP-identity regulariser (keep content).")
@click.option("--lambda-l2", type=float, default=0.0, help="Pixel L2 to the frozen generator's image.")
@click.option("--phase", type=click.Choice(PHASES), default="all", help="Which conv layers train.")
@click.option("--train-torgb", is_flag=True, default=False, help="Also train to-RGB layers (frozen by default).")
@click.option("--auto-layer-k", type=click.IntRange(0), default=0,
              help="Adaptive layer selection: W+ latents (= conv layers) trained per step; 0 = off.")
@click.option("--auto-layer-iters", type=click.IntRange(0), default=1, help="W+ optimisation steps per selection.")
@click.option("--auto-layer-batch", type=click.IntRange(1), default=8, help="Samples per selection.")
@click.option("--improve-shape", is_flag=True, default=False,
              help="Official Colab preset: k = int(2(2 log2 R - 2)/3) adaptive layers and mixing 0.9.")
@click.option("--iters", type=click.IntRange(1), default=300, help="Training steps (with --resume: new total).")
@click.option("--batch", type=click.IntRange(1), default=2, help="Batch size.")
@click.option("--lr", type=float, default=OFFICIAL_LR, help="Adam learning rate (official 0.002 * 4/5).")
@click.option("--beta1", type=float, default=0.0, help="Adam beta1.")
@click.option("--beta2", type=float, default=OFFICIAL_BETA2, help="Adam beta2 (official 0.99 ** (4/5)).")
@click.option("--mixing", type=click.FloatRange(0, 1), default=0.0, help="Style-mixing probability.")
@click.option("--noise-mode", type=click.Choice(["random", "const", "none"]), default="random",
              help="Noise inputs while training (official: random).")
@click.option("--sample-truncation", type=float, default=0.7, help="Truncation psi of the preview grids.")
@click.option("--preview-seeds", default="0-3", help="Fixed seeds of the preview grids, e.g. 0-3,7.")
@click.option("--output-interval", type=click.IntRange(0), default=50, help="Preview grid every N steps (0: off).")
@click.option("--save-interval", type=click.IntRange(0), default=100,
              help="Checkpoint every N steps (the last step is always saved).")
@click.option("--outdir", "-o", type=click.Path(path_type=Path), default=None,
              help="Parent of the numbered run directories.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a run directory from its latest checkpoint.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--frozen-device", default=None, help="Device of the frozen generator (default: --device).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", help="Mixed precision (CUDA).")
@click.option("--tensorboard", is_flag=True, default=False, help="Write TensorBoard scalars (needs tensorboard).")
@click.option("--seed", type=click.IntRange(0), default=2, help="Seed of the training samples.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def nada(ctx: click.Context, checkpoint: Path | None, source: str, target: str | None, style_images: Path | None,
         style_text_weight: float, style_source: str, img2img_batch: int, clip_specs: tuple[str, ...],
         clip_cache_dir: Path | None, lambda_direction: float, lambda_global: float, lambda_patch: float,
         lambda_manifold: float, lambda_id: float, lambda_l2: float, phase: str, train_torgb: bool,
         auto_layer_k: int, auto_layer_iters: int, auto_layer_batch: int, improve_shape: bool, iters: int,
         batch: int, lr: float, beta1: float, beta2: float, mixing: float, noise_mode: str, sample_truncation: float,
         preview_seeds: str, output_interval: int, save_interval: int, outdir: Path | None, resume: Path | None,
         device: str, frozen_device: str | None, amp: str, tensorboard: bool, seed: int, progress: bool) -> None:
    """Adapt a generator to a text (or style-image) target with StyleGAN-NADA.

    \b
    Examples:
      stylecast train nada --checkpoint ffhq.pt --source photo --target "pencil sketch" --iters 300 --outdir runs/
      stylecast train nada --checkpoint ffhq.pt --style-images styles/ --outdir runs/
      stylecast train nada --resume runs/00003-nada-photo-to-pencil-sketch --iters 600
      torchrun --nproc_per_node 4 -m stylecast train nada --checkpoint ffhq.pt --target sketch --batch 8 -o runs/
    Under torchrun --batch is the global batch, split evenly over the processes; only the first one writes.
    The run directory holds config.json, log.jsonl, samples/*.png and checkpoints/NNNNNN/ (native; feed it to
    stylecast generate, blend or export) with checkpoints/NNNNNN.pt (rosinality layout).
    CLIP weights are loaded through open_clip; offline, point --clip at a local file
    (e.g. ViT-B-32-quickgelu:/path/open_clip_pytorch_model.bin) or set --clip-cache-dir.
    """
    from training import distributed as dist

    env = dist.init(None if device == "auto" else device)  # a world of one unless started by torchrun
    try:
        _nada(ctx, env, **ctx.params)
    finally:
        dist.shutdown()


def _nada(ctx: click.Context, env, *, checkpoint: Path | None, source: str, target: str | None, style_images: Path | None,
          style_text_weight: float, style_source: str, img2img_batch: int, clip_specs: tuple[str, ...],
          clip_cache_dir: Path | None, lambda_direction: float, lambda_global: float, lambda_patch: float,
          lambda_manifold: float, lambda_id: float, lambda_l2: float, phase: str, train_torgb: bool,
          auto_layer_k: int, auto_layer_iters: int, auto_layer_batch: int, improve_shape: bool, iters: int,
          batch: int, lr: float, beta1: float, beta2: float, mixing: float, noise_mode: str,
          sample_truncation: float, preview_seeds: str, output_interval: int, save_interval: int,
          outdir: Path | None, resume: Path | None, device: str, frozen_device: str | None, amp: str,
          tensorboard: bool, seed: int, progress: bool) -> None:
    """The command's body; every torchrun rank runs it, only the first one speaks."""
    from training.nada.trainer import NadaConfig, NadaDivergedError, resume_nada, train_nada

    say = click.echo if env.is_main else (lambda *a, **k: None)
    progress = progress and env.is_main

    if resume is not None:
        given = sorted(name for name in ctx.params
                       if name not in RESUME_OPTIONS
                       and ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None))
        if given:
            opts = ", ".join("--" + g.replace("_", "-") for g in given)
            raise click.UsageError(f"--resume continues a run with its saved configuration; {opts} cannot be "
                                   "changed (only --iters, --device, --frozen-device, --amp, --tensorboard)")
        explicit = {name: ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
                    for name in ("iters", "device", "frozen_device", "amp", "tensorboard")}
        try:
            result = resume_nada(resume, iters=iters if explicit["iters"] else None,
                                 device=device if explicit["device"] else None,
                                 frozen_device=frozen_device if explicit["frozen_device"] else None,
                                 amp=amp if explicit["amp"] else None,
                                 tensorboard=True if explicit["tensorboard"] else None, progress=progress, env=env)
        except NadaDivergedError as exc:
            say(f"error: {exc}", err=True)
            raise click.exceptions.Exit(2) from None
        say(f"resumed {result.run_dir}: step {result.step}, checkpoint {result.checkpoint} "
            f"(rosinality: {result.rosinality})")
        return

    if checkpoint is None:
        raise click.UsageError("--checkpoint is required (or --resume RUN_DIR)")
    if outdir is None:
        raise click.UsageError("--outdir is required (or --resume RUN_DIR)")
    cfg = NadaConfig(
        checkpoint=str(checkpoint), outdir=str(outdir), source=source, target=target,
        style_images=str(style_images) if style_images is not None else None, style_text_weight=style_text_weight,
        style_source=style_source, img2img_batch=img2img_batch, clip=tuple(clip_specs),
        clip_cache_dir=str(clip_cache_dir) if clip_cache_dir is not None else None,
        lambda_direction=lambda_direction, lambda_global=lambda_global, lambda_patch=lambda_patch,
        lambda_manifold=lambda_manifold, lambda_id=lambda_id, lambda_l2=lambda_l2, phase=phase,
        train_torgb=train_torgb, auto_layer_k=auto_layer_k, auto_layer_iters=auto_layer_iters,
        auto_layer_batch=auto_layer_batch, improve_shape=improve_shape, iters=iters, batch=batch, lr=lr,
        beta1=beta1, beta2=beta2, mixing=mixing, noise_mode=noise_mode, sample_truncation=sample_truncation,
        preview_seeds=tuple(parse_seeds(preview_seeds, max_count=64)), output_interval=output_interval,
        save_interval=save_interval, seed=seed, device=device, frozen_device=frozen_device, amp=amp,
        tensorboard=tensorboard)
    try:
        result = train_nada(cfg, progress=progress, env=env)
    except NadaDivergedError as exc:
        say(f"error: {exc}", err=True)
        raise click.exceptions.Exit(2) from None
    say(f"wrote {result.run_dir}: checkpoint {result.checkpoint} (rosinality: {result.rosinality})")
