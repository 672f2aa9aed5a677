"""`stylecast convert` and `stylecast info`: move checkpoints between formats and describe them."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to_format", type=click.Choice(["native", "rosinality"]), default="native",
              help="Output format: a native directory or a rosinality .pt.")
@click.option("--with-discriminator/--no-discriminator", default=True, help="Keep D (and the non-EMA G) if present.")
def convert(src: Path, dst: Path, to_format: str, with_discriminator: bool) -> None:
    """Convert a checkpoint (native dir, rosinality .pt, NVlabs .pkl) to native or rosinality format.

    \b
    Example:
      stylecast convert ffhq.pkl ffhq-native/ --to native
      stylecast convert runs/00003-nada/checkpoint ffhq-sketch.pt --to rosinality
    """
    from training.checkpoints import load_checkpoint, save_native, save_rosinality

    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new output path")
    ck = load_checkpoint(src, with_discriminator=with_discriminator, with_train_generator=with_discriminator)
    if to_format == "native":
        save_native(dst, ck.G, D=ck.D, G_train=ck.G_train,
                    meta={"converted_from": ck.format, "source_sha256": ck.sha256})
    else:
        save_rosinality(dst, ck.G, D=ck.D, G_train=ck.G_train)
    click.echo(f"wrote {to_format} checkpoint {dst}")


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(checkpoint: Path, as_json: bool) -> None:
    """Describe a checkpoint: format, config, parameter counts, sha256.

    \b
    Example:
      stylecast info ffhq.pt
    """
    from training.checkpoints import load_checkpoint

    ck = load_checkpoint(checkpoint, with_discriminator=True)
    G = ck.G
    doc = {
        "path": str(checkpoint), "format": ck.format, "sha256": ck.sha256,
        "config": G.cfg.to_dict(), "num_ws": G.num_ws,
        "params": {"total": G.num_params(), "mapping": sum(p.numel() for p in G.mapping.parameters()),
                   "synthesis": sum(p.numel() for p in G.synthesis.parameters())},
        "discriminator_params": sum(p.numel() for p in ck.D.parameters()) if ck.D is not None else None,
        "meta": ck.meta,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    cfg = G.cfg
    click.echo(f"{checkpoint}\n  format      {ck.format}\n  sha256      {ck.sha256}")
    click.echo(f"  resolution  {cfg.resolution}  z_dim {cfg.z_dim}  w_dim {cfg.w_dim}  num_ws {G.num_ws}  "
               f"mapping layers {cfg.mapping_layers}")
    click.echo(f"  channels    {list(cfg.channels)}  conv_clamp {cfg.conv_clamp}")
    p = doc["params"]
    click.echo(f"  params      {p['total']:,} (mapping {p['mapping']:,}, synthesis {p['synthesis']:,})")
    if doc["discriminator_params"]:
        click.echo(f"  D params    {doc['discriminator_params']:,}")
