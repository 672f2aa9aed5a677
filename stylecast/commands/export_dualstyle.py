"""`stylecast export dualstyle-bundle`: a DualStyleGAN checkpoint + its exstyle codes -> a verified `dualstylegan`
serving bundle (DualStyleGAN: Yang et al., CVPR 2022)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def parse_weights(spec: str | None) -> list[float] | None:
    """'0.75,0.75,1' -> [0.75, 0.75, 1.0]; '0.75*7,1*11' repeats a value; None / '' -> None."""
    if not spec:
        return None
    out: list[float] = []
    for part in spec.replace(" ", "").split(","):
        value, _, count = part.partition("*")
        try:
            v, n = float(value), int(count) if count else 1
        except ValueError:
            raise ValueError(f"invalid weights {spec!r}: use e.g. 0.75,0.75,1 or 0.75*7,1*11") from None
        if n < 1:
            raise ValueError(f"invalid weights {spec!r}: a repeat count must be at least 1")
        out += [v] * n
    return out


@click.command("dualstyle-bundle", context_settings={"show_default": True})
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="DualStyleGAN checkpoint: official generator.pt or a stylecast DualStyleGAN directory.")
@click.option("--styles", "-s", required=True, type=click.Path(path_type=Path),
              help="Exstyle codes: official (refined_)exstyle_code.npy or stylecast .safetensors; their order gives "
                   "the style ids.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (must not exist: bundles are immutable).")
@click.option("--name", required=True, help="Model name served (lowercase letters, digits, '.', '_', '-').")
@click.option("--default-psi", type=float, default=0.75,
              help="Truncation of the content code towards 0 when a request gives none (official --truncation).")
@click.option("--default-weights", default=None,
              help="Per-layer extrinsic weights when a request gives none, e.g. 0.75*7,1*11 (default: the model's "
                   "[0.75] * (res_index + 1) + [1] * rest).")
@click.option("--encoder", type=click.Path(path_type=Path), default=None,
              help="pSp / e4e encoder (official .pt or stylecast dir; W+ or z+) for the base generator: adds "
                   "encoder.onnx so the server can Stylize photos and encode exemplar style images.")
@click.option("--encoder-space", type=click.Choice(["w+", "z+"]), default=None,
              help="Latent space of an official encoder checkpoint that does not record it (the official "
                   "DualStyleGAN encoder.pt is z+).")
@click.option("--encoder-from", type=click.Path(path_type=Path), default=None,
              help="A bundle with an encoder for this model's base generator (e.g. the FFHQ stylegan2 bundle); the "
                   "server then stylizes photos with that bundle's encoder.")
@click.option("--latent-space", default=None,
              help="Id of the W+ space of the intrinsic path (default with --encoder: the bundle name).")
@click.option("--description", default="", help="Shown by ListModels.")
@click.option("--verify/--no-verify", default=True, help="Run `export verify` on the result.")
def cmd(checkpoint: Path, styles: Path, out: Path, name: str, default_psi: float, default_weights: str | None,
        encoder: Path | None, encoder_space: str | None, encoder_from: Path | None, latent_space: str | None,
        description: str, verify: bool) -> None:
    """Export a DualStyleGAN as a dualstylegan bundle: mapping, synthesis (content ws + extrinsic codes + per-layer
    weights), the style library (styles.npz), golden outputs and an optional photo encoder.

    \b
    Examples:
      stylecast export dualstyle-bundle -c cartoon/generator.pt -s cartoon/refined_exstyle_code.npy \\
          -o models/cartoon --name cartoon --encoder encoder.pt --encoder-space z+
      stylecast export dualstyle-bundle -c runs/00003-dualstylegan-finetune-toons/network-snapshot-001500 \\
          -s runs/00004-dualstylegan-refine-toons/refined_exstyle_code.npy -o models/toon --name toon \\
          --encoder-from models/ffhq --default-weights 0.6*7,1*11
    """
    from export.dualstyle_bundle import DualStyleBundleOptions, build_dualstyle_bundle

    from .export import verify_and_report

    opts = DualStyleBundleOptions(name=name, default_psi=default_psi, default_weights=parse_weights(default_weights),
                                  encoder=encoder, encoder_space=encoder_space, encoder_from=encoder_from,
                                  latent_space=latent_space, description=description)
    path = build_dualstyle_bundle(checkpoint, styles, out, opts, progress=sys.stderr.isatty())
    click.echo(f"wrote bundle {path}")
    if verify:
        verify_and_report(path)
