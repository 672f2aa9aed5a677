"""`stylecast train finetune`: GAN finetuning of a pretrained StyleGAN2 on an image folder (StyleGAN2 / ADA)."""

from __future__ import annotations

from pathlib import Path

import click

from ._training import dataset_warnings, resume_changes

# CLI option -> FinetuneConfig field (None: not a config field).
_FIELDS = {
    "checkpoint": "checkpoint", "data": "data", "kimg": "kimg", "batch": "batch", "lr": "lr",
    "r1_gamma": "r1_gamma", "r1_interval": "r1_interval", "pl_weight": "pl_weight", "pl_interval": "pl_interval",
    "mixing": "mixing", "ema_kimg": "ema_kimg", "ema_rampup": "ema_rampup", "freeze_d": "freeze_d",
    "augment": "augment", "augment_p": "augment_p", "ada_target": "ada_target", "ada_kimg": "ada_kimg",
    "mirror": "mirror", "snapshot_kimg": "snapshot_kimg", "sample_seeds": "sample_seeds", "seed": "seed",
}
# Options that may change when a run is resumed.
_RESUME_MUTABLE = {"kimg", "snapshot_kimg"}


@click.command(context_settings={"show_default": True})
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="Base model: native dir, rosinality .pt (its D is used when present) or NVlabs .pkl.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Image folder (recursive jpg/png/webp/bmp), resized + centre-cropped to the model's resolution.")
@click.option("--kimg", type=float, default=None, help="Train until this many thousand images were shown "
              "(required for a new run; on --resume the new total).")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("runs"), help="Parent of numbered run dirs.")
@click.option("--batch", type=click.IntRange(1, 4096), default=4, help="Batch size.")
@click.option("--lr", type=float, default=0.002, help="Adam learning rate (G and D; betas 0, 0.99).")
@click.option("--r1-gamma", type=float, default=10.0, help="R1 weight gamma (0 = off).")
@click.option("--r1-interval", type=click.IntRange(1, None), default=16, help="Lazy R1 every N steps.")
@click.option("--pl-weight", type=float, default=2.0, help="Path-length regularisation weight (0 = off).")
@click.option("--pl-interval", type=click.IntRange(1, None), default=4, help="Lazy path length every N steps.")
@click.option("--mixing", type=float, default=0.9, help="Style-mixing probability.")
@click.option("--ema-kimg", type=float, default=10.0, help="G EMA half-life in thousand images.")
@click.option("--ema-rampup", type=float, default=0.05, help="EMA ramp-up ratio (0 = off, as NVlabs for transfer).")
@click.option("--freeze-d", type=click.IntRange(0, None), default=0,
              help="Freeze-D: freeze fromrgb + the first K discriminator blocks (highest resolutions).")
@click.option("--augment", type=click.Choice(["none", "ada", "fixed"]), default="none",
              help="Differentiable augmentation (flip, translation, colour) before D: adaptive p or fixed p.")
@click.option("--augment-p", type=float, default=0.0, help="Initial (ada) or constant (fixed) augmentation p.")
@click.option("--ada-target", type=float, default=0.6, help="ADA target for r_t = E[sign(D(real))].")
@click.option("--ada-kimg", type=float, default=500.0, help="ADA speed: thousand images for p to go 0 -> 1.")
@click.option("--mirror/--no-mirror", default=False, help="Also train on x-flipped dataset images.")
@click.option("--snapshot-kimg", type=float, default=10.0, help="Snapshot + sample grid every N kimg.")
@click.option("--sample-seeds", default="0-15", help="Seeds of the sample grids.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a run directory from its last state (optionally with a larger --kimg).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of data order, noise, D init.")
@click.option("--tensorboard/--no-tensorboard", default=False, help="Also write TensorBoard scalars.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def finetune(ctx: click.Context, checkpoint: Path | None, data: Path | None, kimg: float | None, outdir: Path,
             batch: int, lr: float, r1_gamma: float, r1_interval: int, pl_weight: float, pl_interval: int,
             mixing: float, ema_kimg: float, ema_rampup: float, freeze_d: int, augment: str, augment_p: float,
             ada_target: float, ada_kimg: float, mirror: bool, snapshot_kimg: float, sample_seeds: str,
             resume: Path | None, device: str, seed: int, tensorboard: bool, progress: bool) -> None:
    """Finetune a pretrained StyleGAN2 on an image folder (e.g. before `stylecast blend`).

    \b
    Non-saturating logistic loss, lazy R1 (gamma, interval) and path-length regularisation, style mixing,
    G EMA with ramp-up, Freeze-D, optional ADA-style augmentation; D comes from the checkpoint when it has
    one, otherwise it starts fresh. Writes OUTDIR/NNNNN-finetune-DATA/ with config.json, stats.jsonl,
    samples/*.png, network-snapshot-*/ (native) + .pt (rosinality) and state/ for --resume.
    Data parallel on several GPUs (or CPU processes, gloo): start the same command with torchrun; --batch is the
    global batch, split evenly over the processes; only the first process writes.
    \b
    Examples:
      stylecast train finetune --checkpoint ffhq256.pt --data toons/ --kimg 50 --mirror --augment ada \\
          --freeze-d 2 --outdir runs/
      stylecast train finetune --resume runs/00003-finetune-toons --kimg 80
      torchrun --nproc_per_node 4 -m stylecast train finetune --checkpoint ffhq256.pt --data toons/ --kimg 50 \\
          --batch 32 --outdir runs/
    """
    import time

    import torch

    from common.files import next_run_dir
    from common.seeds import parse_seeds
    from training import distributed as dist
    from training.finetune.trainer import FinetuneConfig, FinetuneRun, read_config, write_config

    if ema_rampup < 0:
        raise ValueError(f"--ema-rampup must be >= 0, got {ema_rampup}")
    if tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    values = {
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
        "data": str(data.resolve()) if data else None, "kimg": kimg, "batch": batch, "lr": lr,
        "r1_gamma": r1_gamma, "r1_interval": r1_interval, "pl_weight": pl_weight, "pl_interval": pl_interval,
        "mixing": mixing, "ema_kimg": ema_kimg, "ema_rampup": ema_rampup if ema_rampup > 0 else None,
        "freeze_d": freeze_d, "augment": augment, "augment_p": augment_p, "ada_target": ada_target,
        "ada_kimg": ada_kimg, "mirror": mirror, "snapshot_kimg": snapshot_kimg,
        "sample_seeds": tuple(parse_seeds(sample_seeds, max_count=256)), "seed": seed,
    }

    env = dist.init(device)  # a world of one unless started by torchrun
    device = str(env.device)
    say = (lambda m: click.echo(m, err=True)) if env.is_main else (lambda m: None)
    try:
        if resume is not None:
            saved = read_config(resume)
            changes = resume_changes(ctx, _FIELDS, _RESUME_MUTABLE, values, saved)
            cfg = FinetuneConfig.from_dict({**saved.to_dict(), **changes})
            with dataset_warnings(env.is_main):
                run = FinetuneRun.resume(resume, cfg, device=device, progress=progress and env.is_main, env=env)
            if run.cur_nimg >= cfg.total_nimg:
                raise ValueError(f"{resume} already reached {run.cur_nimg / 1000:g} kimg; pass a larger --kimg")
            if env.is_main:
                write_config(resume, cfg)
            run_dir = resume
            say(f"resuming {run_dir} at {run.cur_nimg / 1000:g} kimg (step {run.step})")
        else:
            missing = [o for o, v in (("--checkpoint", checkpoint), ("--data", data), ("--kimg", kimg)) if v is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --resume RUN_DIR)")
            if not checkpoint.exists():
                raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
            cfg = FinetuneConfig(**values)
            # Load the model and scan the data before creating the run directory: a bad input leaves nothing.
            with dataset_warnings(env.is_main):
                run = FinetuneRun.start(cfg, device=device, progress=progress and env.is_main, env=env)
            run_dir = next_run_dir(outdir, f"finetune-{data.resolve().name}") if env.is_main else None
            run_dir = dist.broadcast_object(run_dir, env)
            run.run_dir = run_dir
            if env.is_main:
                write_config(run_dir, cfg)
            skipped = f", {run.dataset.num_skipped} unreadable file(s) skipped" if run.dataset.num_skipped else ""
            procs = f" x {env.world_size} processes" if env.distributed else ""
            say(f"{run_dir}: {len(run.dataset)} images at {run.G.cfg.resolution} px{skipped}; D from "
                f"{run.d_source}; {cfg.kimg:g} kimg on {device}{procs}")
        t0, n0 = time.perf_counter(), run.cur_nimg
        last = run.run(progress=progress, log=say, tensorboard=tensorboard)
        dt = time.perf_counter() - t0
        kimg_h = (run.cur_nimg - n0) / 1000 / max(dt, 1e-9) * 3600
        if env.is_main:
            click.echo(f"done: {run.cur_nimg / 1000:g} kimg, {kimg_h:.2f} kimg/h; last snapshot {last}")
    finally:
        dist.shutdown()
