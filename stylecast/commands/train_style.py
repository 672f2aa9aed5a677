"""`stylecast train gatys` and `stylecast train fast-style`: neural style transfer (Gatys et al. 2016) and fast
feed-forward stylizers (Johnson et al. 2016) with VGG19 losses."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

CTX = {"show_default": True}
VGG_HELP = ("torchvision VGG19 ImageNet state dict (vgg19-dcbb9e9d.pth, full or features-only); default: "
            "$STYLECAST_VGG19_WEIGHTS, then the torch hub cache, then a download unless STYLECAST_OFFLINE=1.")


def _csv(value: str | None, kind: Callable[[str], Any], what: str) -> tuple:
    """"a,b,c" -> (kind(a), kind(b), kind(c)); empty -> ()."""
    if value is None or not value.strip():
        return ()
    try:
        return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what}: expected a comma-separated list, got {value!r}") from None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


@contextlib.contextmanager
def _one_line_warnings(show: bool = True) -> Iterator[None]:
    """Show Python warnings as `warning: ...` lines that do not break the progress bar (none where not `show`:
    the other processes of a torchrun job)."""
    import warnings

    from tqdm import tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("default" if show else "ignore")
        warnings.showwarning = lambda message, *a, **k: tqdm.write(f"warning: {message}", file=sys.stderr)
        yield


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


# ----------------------------------------------------------------------------------------------------------
# gatys


@click.command("gatys", context_settings=CTX)
@click.option("--content", "-c", required=True, type=click.Path(path_type=Path), help="Content image.")
@click.option("--style", "-s", "styles", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Style image (repeat for several, blended).")
@click.option("--style-blend-weights", "--style-weights", "style_blend_weights", default="",
              help="One blend weight per --style, e.g. 3,1 (normalised to sum 1; empty = equal).")
@click.option("--out", "-o", default=Path("runs"), type=click.Path(path_type=Path),
              help="Root folder; each run goes to a new numbered folder OUT/NNNNN-gatys-<content>-<style>.")
@click.option("--image-size", type=click.IntRange(1), default=512, help="Longer side of the output (px).")
@click.option("--scales", default="", help="Coarse-to-fine longer sides, e.g. 256,512 (last = output size).")
@click.option("--iterations", default="1000", help="Iterations per scale: one value or one per scale (500,200).")
@click.option("--content-layers", default="relu4_2", help="VGG19 layers of the content loss.")
@click.option("--content-weight", type=float, default=5.0, help="Content loss weight.")
@click.option("--content-layer-weights", default="", help="Per-content-layer factors (empty = 1 each).")
@click.option("--style-layers", default="relu1_1,relu2_1,relu3_1,relu4_1,relu5_1",
              help="VGG19 layers of the style loss.")
@click.option("--style-weight", type=float, default=100.0, help="Style loss weight.")
@click.option("--style-layer-weights", default="", help="Per-style-layer factors (empty = 1 each).")
@click.option("--style-scale", type=float, default=1.0, help="Style images are resized to style-scale x each scale.")
@click.option("--tv-weight", type=float, default=1e-3, help="Total variation weight.")
@click.option("--optimizer", type=click.Choice(["lbfgs", "adam"]), default="lbfgs")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=None,
              help="Step size [default: 1.0 for L-BFGS, 0.08 for Adam].")
@click.option("--lbfgs-history", type=click.IntRange(1), default=100, help="L-BFGS memory size.")
@click.option("--init", type=click.Choice(["noise", "content"]), default="noise",
              help="Start from seeded white noise or from the content image.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of the noise initialisation.")
@click.option("--original-colors/--no-original-colors", default=False,
              help="Keep the content's colours exactly (style transfers luminance only).")
@click.option("--pooling", type=click.Choice(["max", "avg"]), default="max", help="VGG pooling.")
@click.option("--max-size", type=click.IntRange(1), default=2048, help="Refuse working sizes above this (px).")
@click.option("--save-every", type=click.IntRange(0), default=100,
              help="Save an intermediate image every N iterations (0 = never).")
@click.option("--vgg-weights", type=click.Path(path_type=Path), default=None, help=VGG_HELP)
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
def gatys(content: Path, styles: tuple[Path, ...], style_blend_weights: str, out: Path, image_size: int,
          scales: str, iterations: str, content_layers: str, content_weight: float, content_layer_weights: str,
          style_layers: str, style_weight: float, style_layer_weights: str, style_scale: float, tv_weight: float,
          optimizer: str, learning_rate: float | None, lbfgs_history: int, init: str, seed: int,
          original_colors: bool, pooling: str, max_size: int, save_every: int, vgg_weights: Path | None,
          device: str) -> None:
    """Gatys et al. neural style transfer: optimise the output's pixels with VGG19 losses (L-BFGS or Adam).

    Defaults follow jcjohnson/neural-style (content relu4_2 x5, style relu1_1..relu5_1 x100, TV 1e-3,
    L-BFGS, 1000 iterations, 512 px). Writes config.json first, then intermediate/*.png and result.png.

    \b
    Example:
      stylecast train gatys --content me.jpg --style starry_night.jpg --vgg-weights vgg19-dcbb9e9d.pth \\
          --scales 256,512 --iterations 500,200 --original-colors --out runs/
    """
    from common.files import atomic_write_json, next_run_dir
    from training.style.gatys import GATYS_FORMAT, GatysConfig, check_inputs, stylize
    from training.style.images import load_image, save_image
    from training.style.vgg import load_vgg19

    scale_list = _csv(scales, int, "--scales")
    ctx = click.get_current_context()
    if scale_list:
        explicit = ctx.get_parameter_source("image_size") == click.core.ParameterSource.COMMANDLINE
        if explicit and image_size != scale_list[-1]:
            raise ValueError(f"--image-size {image_size} differs from the last of --scales {scales}")
        image_size = scale_list[-1]
    config = GatysConfig(
        image_size=image_size, scales=scale_list, iterations=_csv(iterations, int, "--iterations"),
        content_layers=_csv(content_layers, str, "--content-layers"), content_weight=content_weight,
        content_layer_weights=_csv(content_layer_weights, float, "--content-layer-weights"),
        style_layers=_csv(style_layers, str, "--style-layers"), style_weight=style_weight,
        style_layer_weights=_csv(style_layer_weights, float, "--style-layer-weights"),
        style_blend_weights=_csv(style_blend_weights, float, "--style-blend-weights"), style_scale=style_scale,
        tv_weight=tv_weight, optimizer=optimizer, learning_rate=learning_rate, lbfgs_history=lbfgs_history,
        init=init, seed=seed, original_colors=original_colors, pooling=pooling, max_size=max_size,
        save_every=save_every)
    if config.style_blend_weights and len(config.style_blend_weights) != len(styles):
        raise ValueError(f"--style-blend-weights has {len(config.style_blend_weights)} values for "
                         f"{len(styles)} --style image(s)")  # checked before the images are read
    # Everything that can fail on bad input happens before the run folder exists.
    content_img = load_image(content)
    style_imgs = [load_image(s) for s in styles]
    check_inputs(content_img, style_imgs, config)
    dev = _device(device)
    vgg = load_vgg19(config.loss_weights().layers, weights=vgg_weights, pooling=pooling, device=dev)

    run = next_run_dir(out, f"gatys-{content.stem}-{'-'.join(s.stem for s in styles)}")
    atomic_write_json(run / "config.json", {
        "format": GATYS_FORMAT, "config": config.to_dict(),
        "inputs": {"content": str(content), "styles": [str(s) for s in styles],
                   "vgg_weights": str(vgg_weights) if vgg_weights else None, "device": dev}})

    def save_intermediate(scale_index: int, size: int, it: int, img) -> None:
        save_image(run / "intermediate" / f"scale{scale_index}-{size}px-iter{it:05d}.png", img)

    result = stylize(content_img, style_imgs, config, vgg, progress=True, callback=save_intermediate)
    save_image(run / "result.png", result)
    click.echo(f"wrote {run / 'result.png'} ({result.shape[-1]}x{result.shape[-2]})")


# ----------------------------------------------------------------------------------------------------------
# fast-style

# Options that define a run; with --resume they come from the run's config.json instead.
_RUN_OPTIONS = ("style", "data", "image_size", "style_size", "batch_size", "learning_rate", "iterations", "epochs",
                "content_layers", "content_weight", "content_layer_weights", "style_layers", "style_weight",
                "style_layer_weights", "tv_weight", "pooling", "seed", "checkpoint_every", "keep_checkpoints",
                "preview_every", "previews", "preview_count", "channels", "res_blocks", "output", "out", "name")


@click.command("fast-style", context_settings=CTX)
@click.option("--style", "-s", type=click.Path(path_type=Path), default=None,
              help="Style image (required unless --resume).")
@click.option("--data", "-d", type=click.Path(path_type=Path), default=None,
              help="Folder of content images, searched recursively for jpg/png/webp (required unless --resume).")
@click.option("--out", "-o", default=Path("runs"), type=click.Path(path_type=Path),
              help="Root folder; the run goes to a new numbered folder OUT/NNNNN-fast-style-<style>.")
@click.option("--name", default=None, help="Run name suffix [default: fast-style-<style file stem>].")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue this run folder from its latest checkpoint (settings come from its config.json).")
@click.option("--image-size", type=click.IntRange(16), default=256, help="Square training crop side (px).")
@click.option("--style-size", type=click.IntRange(0), default=256, help="Style image longer side (px; 0 = as is).")
@click.option("--batch-size", type=click.IntRange(1), default=4)
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=1e-3, help="Adam learning rate.")
@click.option("--iterations", type=click.IntRange(1), default=40000, help="Optimizer steps.")
@click.option("--epochs", type=float, default=None, help="Instead of --iterations: passes over the data.")
@click.option("--content-layers", default="relu2_2", help="VGG19 layers of the content loss.")
@click.option("--content-weight", type=float, default=1.0)
@click.option("--content-layer-weights", default="", help="Per-content-layer factors (empty = 1 each).")
@click.option("--style-layers", default="relu1_2,relu2_2,relu3_3,relu4_3", help="VGG19 layers of the style loss.")
@click.option("--style-weight", type=float, default=5.0)
@click.option("--style-layer-weights", default="", help="Per-style-layer factors (empty = 1 each).")
@click.option("--tv-weight", type=float, default=1e-6)
@click.option("--pooling", type=click.Choice(["max", "avg"]), default="max", help="VGG pooling.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Network init and data order.")
@click.option("--checkpoint-every", type=click.IntRange(0), default=1000,
              help="Steps between checkpoints (0 = end only).")
@click.option("--keep-checkpoints", type=click.IntRange(1), default=3, help="How many recent checkpoints to keep.")
@click.option("--preview-every", type=click.IntRange(0), default=500, help="Steps between previews (0 = end only).")
@click.option("--preview", "previews", multiple=True, type=click.Path(path_type=Path),
              help="Fixed preview image (repeatable) [default: the first --preview-count training images].")
@click.option("--preview-count", type=click.IntRange(0), default=4)
@click.option("--channels", type=click.IntRange(1), default=32, help="Width of the first layer.")
@click.option("--res-blocks", type=click.IntRange(0), default=5, help="Residual blocks.")
@click.option("--output", type=click.Choice(["tanh", "clamp"]), default="tanh", help="Output activation.")
@click.option("--vgg-weights", type=click.Path(path_type=Path), default=None, help=VGG_HELP)
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--workers", type=click.IntRange(0, 64), default=2, help="Image decoding threads.")
def fast_style(style: Path | None, data: Path | None, out: Path, name: str | None, resume: Path | None,
               image_size: int, style_size: int, batch_size: int, learning_rate: float, iterations: int,
               epochs: float | None, content_layers: str, content_weight: float, content_layer_weights: str,
               style_layers: str, style_weight: float, style_layer_weights: str, tv_weight: float, pooling: str,
               seed: int, checkpoint_every: int, keep_checkpoints: int, preview_every: int,
               previews: tuple[Path, ...], preview_count: int, channels: int, res_blocks: int, output: str,
               vgg_weights: Path | None, device: str, workers: int) -> None:
    """Train a Johnson et al. fast stylizer (feed-forward network) for one style on a folder of photos.

    Defaults follow Johnson et al. / fast-neural-style (Adam 1e-3, batch 4, 256 px, 40k steps, content
    relu2_2 x1, style relu1_2/relu2_2/relu3_3/relu4_3 x5, TV 1e-6; VGG19 instead of the paper's VGG16). Writes config.json first, then previews/, checkpoints/ and
    final/ (config.json + model.safetensors). Interrupted runs continue exactly with --resume.

    Data parallel: start the same command with `torchrun --nproc_per_node K -m stylecast ...`; --batch-size is
    the global batch, split evenly over the processes; only the first one writes.
    \b
    Example:
      stylecast train fast-style --style starry_night.jpg --data coco/train2014 --vgg-weights vgg19.pth \\
          --epochs 2 --out runs/
      stylecast train fast-style --resume runs/00004-fast-style-starry_night
    """
    from common.files import next_run_dir
    from training import distributed as dist
    from training.style.data import find_images
    from training.style.fast_style import (FastStyleConfig, iterations_for_epochs, read_run_config,
                                           train_fast_style)
    from training.style.images import load_image
    from training.style.vgg import load_vgg19

    ctx = click.get_current_context()
    given = {p for p in _RUN_OPTIONS if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE}
    if resume is not None:
        if given:
            flags = ", ".join("--" + g.replace("_", "-") for g in sorted(given))
            raise ValueError(f"with --resume the settings come from {resume / 'config.json'}; drop {flags}")
        if not resume.is_dir():
            raise FileNotFoundError(f"{resume}: no such run folder")
        config, _ = read_run_config(resume)
        env = dist.init(_device(device))
        try:
            vgg = load_vgg19(config.loss_weights().layers, weights=vgg_weights, pooling=config.pooling,
                             device=env.device)
            with _one_line_warnings(env.is_main):
                train_fast_style(config, resume, vgg, resume=True, progress=True, workers=workers, env=env)
        finally:
            dist.shutdown()
        if env.is_main:
            click.echo(f"wrote {resume / 'final'}")
        return

    if style is None or data is None:
        raise ValueError("--style and --data are required (or --resume RUN_FOLDER)")
    if epochs is not None and "iterations" in given:
        raise ValueError("give --iterations or --epochs, not both")
    files = find_images(data)  # empty / missing folder: a clear error before anything is written
    load_image(style)          # unreadable style image: the same
    if epochs is not None:
        iterations = iterations_for_epochs(epochs, len(files), batch_size)
    config = FastStyleConfig(
        style=str(style.resolve()), data=str(data.resolve()), image_size=image_size, style_size=style_size,
        batch_size=batch_size,
        learning_rate=learning_rate, iterations=iterations, epochs=epochs,
        content_layers=_csv(content_layers, str, "--content-layers"), content_weight=content_weight,
        content_layer_weights=_csv(content_layer_weights, float, "--content-layer-weights"),
        style_layers=_csv(style_layers, str, "--style-layers"), style_weight=style_weight,
        style_layer_weights=_csv(style_layer_weights, float, "--style-layer-weights"), tv_weight=tv_weight,
        pooling=pooling, seed=seed, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        preview_every=preview_every, preview_images=tuple(str(p.resolve()) for p in previews),
        preview_count=preview_count,
        channels=channels, res_blocks=res_blocks, output=output)
    for p in config.preview_images:
        load_image(p)
    env = dist.init(_device(device))  # a world of one unless started by torchrun
    try:
        dist.check_batch(batch_size, env, "batch-size")
        vgg = load_vgg19(config.loss_weights().layers, weights=vgg_weights, pooling=pooling, device=env.device)
        run = dist.broadcast_object(next_run_dir(out, name or f"fast-style-{style.stem}") if env.is_main else None,
                                    env)
        try:
            with _one_line_warnings(env.is_main):
                train_fast_style(config, run, vgg, resume=False, progress=True, workers=workers, env=env)
        except BaseException:
            if env.is_main:
                _remove_if_empty(run)
            raise
    finally:
        dist.shutdown()
    if env.is_main:
        click.echo(f"wrote {run / 'final'} ({config.iterations} steps)")
