"""`stylecast blend`: network blending of StyleGAN2 generators (Pinkney & Adler 2020; Toonify)."""

from __future__ import annotations

from pathlib import Path

import click


def _out_format(out: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "rosinality" if out.suffix in (".pt", ".pth") else "native"


def _sibling(out: Path, suffix: str) -> Path:
    stem = out.name[: -len(out.suffix)] if out.suffix in (".pt", ".pth") else out.name.rstrip("/")
    return out.with_name(f"{stem}{suffix}")


@click.command(context_settings={"show_default": True})
@click.option("--base", "base_path", type=click.Path(path_type=Path), default=None,
              help="Model 1 (Pinkney's low_res_pkl): supplies the layers up to the switch point, the noise "
                   "buffers and (by default) the mapping network + w_avg. Toonify: the cartoon-finetuned model.")
@click.option("--other", "other_path", type=click.Path(path_type=Path), default=None,
              help="Model 2 (high_res_pkl): supplies the layers past the switch point. Toonify: the FFHQ "
                   "original.")
@click.option("--resolution", type=int, default=None,
              help="Switch resolution (4, 8, ..., R): layers more than one position past (resolution, "
                   "level) come from --other.")
@click.option("--level", type=click.IntRange(0, 1), default=0,
              help="Switch level inside the resolution: 0 = const/conv0, 1 = conv1 + to-RGB.")
@click.option("--blend-width", type=float, default=None,
              help="Soft switch: layer weight of --other = sigmoid((position - switch position) / W). "
                   "Omit for the hard switch.")
@click.option("--mapping", type=click.Choice(["base", "other", "interp"]), default="base",
              help="Which model the mapping network and w_avg come from (interp: only with --alpha).")
@click.option("--torgb", type=click.Choice(["follow", "base", "other"]), default="follow",
              help="to-RGB layers: follow the conv1 of their resolution (official), or all from one model.")
@click.option("--alpha", type=float, default=None,
              help="Whole-model interpolation instead of a switch: base * (1 - alpha) + other * alpha.")
@click.option("--model", "model_paths", type=click.Path(path_type=Path), multiple=True,
              help="Blend more than two models by per-resolution --weights (repeat; the first one supplies "
                   "the mapping network, w_avg and noise buffers).")
@click.option("--weights", default=None,
              help='Per-resolution weights for --model: "4:1,0,0;8:1,0,0;16:0,1,0;*:0,0,1" or a JSON file '
                   '{"4": [1,0,0], ...}; normalised per layer; * = every resolution not listed.')
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output checkpoint: a native directory, or a rosinality .pt (see --format).")
@click.option("--format", "fmt", type=click.Choice(["auto", "native", "rosinality"]), default="auto",
              help="auto: rosinality for .pt/.pth, native otherwise.")
@click.option("--preview-seeds", default=None,
              help="Write OUT_preview.png: one row per seed, columns base | other | blended.")
@click.option("--sweep", default=None,
              help="Switch resolutions, e.g. 8,16,32,64,128: write OUT_sweep.png with columns base | other | "
                   "one blend per switch point (uses --preview-seeds, default 0-3).")
@click.option("--psi", type=float, default=0.7, help="Truncation psi of the previews.")
@click.option("--device", default="auto", help="Device for the previews: cpu, cuda, cuda:1 or auto.")
def blend(base_path: Path | None, other_path: Path | None, resolution: int | None, level: int,
          blend_width: float | None, mapping: str, torgb: str, alpha: float | None, model_paths: tuple[Path, ...],
          weights: str | None, out: Path, fmt: str, preview_seeds: str | None, sweep: str | None, psi: float,
          device: str) -> None:
    """Blend generators by resolution (layer swapping), interpolate them, or mix several by weights.

    \b
    Semantics (Pinkney's blend_models): layers are ordered by (resolution, level), position
    2*(log2(res)-2)+level; level 0 = const (4 px) / conv0, level 1 = conv1 and to-RGB. With switch point
    (R, L) a layer comes from --other when its position is more than 1 past the switch position (hard),
    or with weight sigmoid(x / W) for --blend-width W (x = position - switch position).
    \b
    Examples:
      # Toonify: structure from the cartoon model, textures from FFHQ, previews of 4 seeds and a sweep
      stylecast blend --base toon.pt --other ffhq.pt --resolution 32 --out toonify.pt \\
          --preview-seeds 0-3 --sweep 8,16,32,64,128
      stylecast blend --base a.pt --other b.pt --resolution 16 --blend-width 1.5 --out soft/
      stylecast blend --base a.pt --other b.pt --alpha 0.5 --out mid/
      stylecast blend --model a.pt --model b.pt --model c.pt --weights "4:1,0,0;8:1,0,0;16:0,1,0;*:0,0,1" --out abc/
    """
    import math

    import numpy as np
    import torch

    from common.seeds import parse_seeds
    from training import blend as B
    from training.checkpoints import load_checkpoint, save_native, save_rosinality
    from training.generate import generate_images, make_grid, save_png

    # ---- validate the options before loading anything
    multi = bool(model_paths)
    if multi:
        if base_path or other_path:
            raise ValueError("use either --base/--other or --model (repeated), not both")
        if len(model_paths) < 2:
            raise ValueError("--model needs at least two models")
        if weights is None:
            raise ValueError("--model needs --weights (per-resolution weights)")
        if resolution is not None or alpha is not None or blend_width is not None or sweep:
            raise ValueError("--resolution/--blend-width/--alpha/--sweep do not apply to --model blends")
        if mapping != "base" or torgb != "follow":
            raise ValueError("--mapping/--torgb do not apply to --model blends (the first model supplies the "
                             "mapping network)")
    else:
        if base_path is None or other_path is None:
            raise ValueError("give --base and --other (or --model ... --weights ...)")
        if weights is not None:
            raise ValueError("--weights needs --model (repeated) instead of --base/--other")
        if alpha is not None:
            if resolution is not None or blend_width is not None or sweep or torgb != "follow":
                raise ValueError("--alpha is whole-model interpolation: drop --resolution/--blend-width/"
                                 "--sweep/--torgb")
            if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
                raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
        else:
            if resolution is None:
                raise ValueError("give --resolution (switch point), --alpha (interpolation) or --model/--weights")
            if mapping == "interp":
                raise ValueError("--mapping interp needs --alpha")
            if blend_width is not None and not (math.isfinite(blend_width) and blend_width > 0):
                raise ValueError(f"--blend-width must be > 0, got {blend_width}")
    if not math.isfinite(psi) or not -2.0 <= psi <= 2.0:
        raise ValueError(f"--psi must be a finite number in [-2, 2], got {psi}")
    out_fmt = _out_format(out, fmt)
    seeds = parse_seeds(preview_seeds) if preview_seeds else (parse_seeds("0-3") if sweep else None)
    sweep_res = _parse_sweep(sweep) if sweep else None
    preview_path = _sibling(out, "_preview.png") if preview_seeds else None
    sweep_path = _sibling(out, "_sweep.png") if sweep_res else None
    for p in (out, preview_path, sweep_path):
        if p is not None and p.exists():
            raise FileExistsError(f"{p} already exists; choose a new --out (outputs are never overwritten)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    # ---- load and blend
    paths = list(model_paths) if multi else [base_path, other_path]
    ckpts = [load_checkpoint(p) for p in paths]
    models = [c.G for c in ckpts]
    names = [str(p) for p in paths]
    meta: dict = {"sources": [{"path": str(p), "format": c.format, "sha256": c.sha256} for p, c in zip(paths, ckpts)]}
    if multi:
        cfg = B.check_compatible(models, names)
        res_w = B.parse_resolution_weights(weights, len(models), cfg.resolutions)
        G = B.blend_many(models, res_w, mapping_from=0, names=names)
        meta["blend"] = {"mode": "weights", "weights": {str(r): res_w[r] for r in sorted(res_w)},
                         "mapping": 0}
        summary = f"blended {len(models)} models by per-resolution weights"
    elif alpha is not None:
        G = B.interpolate_models(models[0], models[1], alpha, mapping=mapping, names=names)
        meta["blend"] = {"mode": "interpolate", "alpha": alpha, "mapping": mapping}
        summary = f"interpolated base/other with alpha {alpha}"
    else:
        G = B.blend_models(models[0], models[1], resolution, level, blend_width, mapping, torgb, names)
        ys = B.switch_weights(models[0].cfg, resolution, level, blend_width, torgb)
        meta["blend"] = {"mode": "switch", "resolution": resolution, "level": level, "blend_width": blend_width,
                         "mapping": mapping, "torgb": torgb, "other_weight": ys}
        summary = (f"blended at ({resolution} px, level {level}), "
                   + ("hard switch" if blend_width is None else f"soft switch width {blend_width}"))
    if sweep_res:
        bad = [r for r in sweep_res if r not in G.cfg.resolutions]
        if bad:
            raise ValueError(f"--sweep resolutions {bad} are not among the model's {G.cfg.resolutions}")

    # ---- previews (rendered before anything is written)
    def render(model: torch.nn.Module) -> np.ndarray:
        return generate_images(model, seeds, psi=psi, device=device)

    grids: list[tuple[Path, np.ndarray]] = []
    if seeds is not None:
        cols_src = [render(m) for m in models]
        if preview_path is not None:
            cols = cols_src + [render(G)]
            grids.append((preview_path, _grid(cols, make_grid)))
        if sweep_path is not None:
            cols = list(cols_src)
            for r in sweep_res:
                cols.append(render(B.blend_models(models[0], models[1], r, level, blend_width, mapping, torgb,
                                                  names)))
            grids.append((sweep_path, _grid(cols, make_grid)))

    # ---- write
    G = G.cpu()
    if out_fmt == "native":
        save_native(out, G, meta=meta)
    else:
        save_rosinality(out, G, extra={"stylecast_meta": meta})
    for path, img in grids:
        save_png(path, img)
    click.echo(f"{summary}; wrote {out_fmt} checkpoint {out}")
    for path, _ in grids:
        click.echo(f"wrote {path}")


def _grid(columns: list, make_grid) -> "object":
    """columns: list of [S, H, W, 3] arrays -> one image, rows = seeds, one column per array."""
    import numpy as np
    stacked = np.stack(columns, axis=1)  # [S, C, H, W, 3]
    s, c = stacked.shape[:2]
    return make_grid(stacked.reshape(s * c, *stacked.shape[2:]), cols=c)


def _parse_sweep(spec: str) -> list[int]:
    try:
        vals = [int(v) for v in spec.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"invalid --sweep {spec!r}: use resolutions like 8,16,32,64,128") from None
    if not vals:
        raise ValueError("--sweep lists no resolutions")
    return vals
