"""`stylecast export fast-style-bundle`: a fast stylizer checkpoint -> a verified `fast_style` serving bundle."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("fast-style-bundle", context_settings={"show_default": True})
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Fast stylizer directory (config.json + model.safetensors) or a `train style --method fast` run.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (must not exist: bundles are immutable).")
@click.option("--name", required=True, help="Model name served (lowercase letters, digits, '.', '_', '-').")
@click.option("--max-size", type=click.IntRange(64, 16384), default=1024,
              help="Largest image side (px) the server accepts for this model.")
@click.option("--description", default="", help="Shown by ListModels.")
@click.option("--verify/--no-verify", default=True, help="Run `export verify` on the result.")
def cmd(checkpoint: Path, out: Path, name: str, max_size: int, description: str, verify: bool) -> None:
    """Export a fast stylizer to ONNX (dynamic batch, height and width) as a fast_style bundle.

    \b
    Example:
      stylecast export fast-style-bundle -c runs/mosaic -o models/mosaic --name mosaic --max-size 1024
    """
    from export.fast_style_bundle import build_fast_style_bundle

    from .export import verify_and_report

    path = build_fast_style_bundle(checkpoint, out, name, max_size=max_size, description=description)
    click.echo(f"wrote bundle {path}")
    if verify:
        verify_and_report(path)
