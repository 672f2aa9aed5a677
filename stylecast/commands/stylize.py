"""`stylecast stylize`: exemplar-based portrait style transfer of face photos with a DualStyleGAN (Yang et al.,
"Pastiche Master: Exemplar-Based High-Resolution Portrait Style Transfer", CVPR 2022), locally.

Two pipelines with one interface, each in its package (FFHQ alignment with common.faces at the encoder's size,
encoder -> W+, psi towards 0, the extrinsic style, synthesis, paste-back); this command only checks the options,
aligns the photos and writes the results:

- `--model` a DualStyleGAN checkpoint (official generator.pt or a stylecast directory): PyTorch
  (training.dualstyle.stylize.CheckpointStyleTransfer), with `--styles` (exstyle codes) and `--encoder` (pSp / e4e,
  W+ or z+).
- `--model` a dualstylegan bundle directory: ONNX Runtime through the server's own torch-free code
  (serving.offline.BundleStyleTransfer), so the images equal what `stylecast serve` returns for the same request.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

FORMAT = "stylecast.stylize/v1"


def _weights(spec: str | None) -> list[float] | None:
    from .export_dualstyle import parse_weights
    return parse_weights(spec)


def final_weights(base: list[float], res_index: int, structure_only: bool, colour_only: bool) -> list[float]:
    """--structure-only zeroes the colour weights (layers > res_index), --colour-only the structure ones."""
    if structure_only:
        return base[: res_index + 1] + [0.0] * (len(base) - res_index - 1)
    if colour_only:
        return [0.0] * (res_index + 1) + base[res_index + 1:]
    return base


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _face_spec(face: str) -> str | int:
    if face in ("largest", "all"):
        return face
    if face.isdigit():
        return int(face)
    raise ValueError(f"--face must be 'largest', 'all' or an index (largest first), got {face!r}")


@click.command(context_settings={"show_default": True})
@click.option("--model", "-m", "model_path", required=True, type=click.Path(path_type=Path),
              help="DualStyleGAN checkpoint (official generator.pt or a stylecast directory), or a dualstylegan "
                   "bundle directory (rendered torch-free through the server's own pipeline).")
@click.option("--content", "-i", "contents", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Content photo(s) with a face (repeatable).")
@click.option("--style-id", default=None,
              help="Library style: its index (position in the exstyle code file, as the official --style_id) or its "
                   "name.")
@click.option("--style-image", type=click.Path(path_type=Path), default=None,
              help="An exemplar portrait instead of a library style: its largest face is aligned and encoded, and "
                   "that W+ code is the extrinsic style (no destylization optimisation).")
@click.option("--styles", type=click.Path(path_type=Path), default=None,
              help="Checkpoints: the exstyle codes (official exstyle_code.npy or stylecast .safetensors). A bundle "
                   "carries its own.")
@click.option("--encoder", type=click.Path(path_type=Path), default=None,
              help="Checkpoints: pSp / e4e encoder for the base generator (required). Bundles: a bundle with an "
                   "encoder for the model's latent space, when the model bundle has none.")
@click.option("--encoder-space", type=click.Choice(["w+", "z+"]), default=None,
              help="Latent space of an official encoder checkpoint that does not record it (DualStyleGAN's is z+).")
@click.option("--weights", default=None,
              help="Per-layer extrinsic weights, num_ws values, e.g. 0.75*7,1*11 (default: the model's).")
@click.option("--structure-only", is_flag=True, default=False,
              help="Zero the colour weights (layers after res_index): transfer only the style's structure.")
@click.option("--colour-only", "--color-only", "colour_only", is_flag=True, default=False,
              help="Zero the structure weights (layers 0..res_index): transfer only the style's colours.")
@click.option("--preserve-color", "--preserve-colour", "preserve_color", is_flag=True, default=False,
              help="The official --preserve_color: the style's colour latents replaced by the content's own.")
@click.option("--psi", type=float, default=None,
              help="Truncation of the content code towards 0 (default: the bundle's default_psi; 0.75, the official "
                   "--truncation, for checkpoints).")
@click.option("--face", default="largest", help="Which faces: largest, all, or an index (largest first).")
@click.option("--composite", type=click.Choice(["paste", "crop"]), default="paste",
              help="Paste the stylized face(s) back into the photo, or write the aligned stylized crop(s).")
@click.option("--feather", type=click.FloatRange(0.001, 0.5), default=0.08, help="Paste-back seam width (of the crop).")
@click.option("--outdir", "-o", type=click.Path(path_type=Path), default=None,
              help="Root of the numbered run directory (NNNNN-stylize/ with config.json and <photo>.png).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the single content photo's result to this PNG file instead (atomically).")
@click.option("--device", default="auto", help="Checkpoints: cpu, cuda, cuda:1 or auto.")
def stylize(model_path: Path, contents: tuple[Path, ...], style_id: str | None, style_image: Path | None,
            styles: Path | None, encoder: Path | None, encoder_space: str | None, weights: str | None,
            structure_only: bool, colour_only: bool, preserve_color: bool, psi: float | None, face: str,
            composite: str, feather: float, outdir: Path | None, out: Path | None, device: str) -> None:
    """Stylize the faces of photos with a DualStyleGAN and a style from its library (or an exemplar portrait).

    \b
    Examples:
      stylecast stylize -m cartoon/generator.pt --styles cartoon/refined_exstyle_code.npy \\
          --encoder encoder.pt --encoder-space z+ -i me.jpg --style-id 53 -o out/
      stylecast stylize -m models/cartoon -i me.jpg -i you.jpg --style-id Cartoons_00038_07.jpg \\
          --preserve-color --face all -o out/
      stylecast stylize -m models/cartoon -i me.jpg --style-image painting.png --out me-painted.png
    """
    from common import faces as F
    from common.files import atomic_write_bytes, atomic_write_json, next_run_dir

    # -- everything the user gave is checked before any model loads or file is written --------------------------
    if (outdir is None) == (out is None):
        raise ValueError("give exactly one of --outdir (a numbered run directory) or --out (one PNG file)")
    if out is not None and len(contents) != 1:
        raise ValueError("--out writes one image: give a single --content (or use --outdir)")
    if out is not None and out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the output is a PNG file (name it *.png)")
    if (style_id is None) == (style_image is None):
        raise ValueError("give exactly one of --style-id (a library style) or --style-image (an exemplar portrait)")
    if structure_only and colour_only:
        raise ValueError("--structure-only and --colour-only exclude each other")
    if psi is not None and not (math.isfinite(psi) and -2.0 <= psi <= 2.0):
        raise ValueError(f"--psi must be a finite number in [-2, 2], got {psi}")
    which = _face_spec(face)
    stems = [p.stem for p in contents]
    if len(set(stems)) != len(stems):
        raise ValueError("two content photos have the same file name stem; their outputs would collide")
    for p in (*contents, *([style_image] if style_image else [])):
        if not p.is_file():
            raise FileNotFoundError(f"photo not found: {p}")
    base_weights = _weights(weights)
    from serving.offline import is_bundle
    bundle_mode = is_bundle(model_path)
    if bundle_mode and styles is not None:
        raise ValueError("--styles applies to checkpoints; a bundle carries its own style library")
    if bundle_mode and encoder_space is not None:
        raise ValueError("--encoder-space applies to checkpoints; a bundle's encoder.onnx always outputs W+")
    if not bundle_mode and styles is None and style_id is not None:
        raise ValueError("--style-id with a checkpoint needs --styles (the exstyle code file)")
    if not model_path.exists():
        raise FileNotFoundError(f"model not found: {model_path}")

    if bundle_mode:
        from serving.offline import BundleStyleTransfer
        backend: Any = BundleStyleTransfer(model_path, encoder_bundle=encoder)
    else:
        from training.dualstyle.stylize import CheckpointStyleTransfer
        backend = CheckpointStyleTransfer(model_path, styles, encoder, encoder_space, device)
    try:
        sid = None
        if style_id is not None:
            if style_id.isdigit():
                sid = int(style_id)
                if sid >= len(backend.names):
                    raise ValueError(f"--style-id {sid}: the library has {len(backend.names)} styles "
                                     f"(0..{len(backend.names) - 1})")
            elif style_id in backend.names:
                sid = backend.names.index(style_id)
            else:
                raise ValueError(f"--style-id {style_id!r}: no style of that name in the library")
        w = backend.default_weights if base_weights is None else base_weights
        if len(w) != backend.num_ws:
            raise ValueError(f"--weights: {len(w)} values given; the model has {backend.num_ws} layers")
        if not all(math.isfinite(v) and -2.0 <= v <= 2.0 for v in w):
            raise ValueError("--weights must be finite numbers in [-2, 2]")
        w = final_weights(list(w), backend.res_index, structure_only, colour_only)
        psi_used = backend.default_psi if psi is None else psi

        # Faces first: a photo without one stops the run before anything is written.
        size = backend.encoder_size
        jobs = []
        for p in contents:
            img = F.read_image(p)
            jobs.append((p, img, F.align_photo(img, size=size, which=which, what=str(p))))
        exemplar_ws = None
        if style_image is not None:
            ex_face = F.align_photo(F.read_image(style_image), size=size, what=f"the style image {style_image}")
            exemplar_ws = backend.encode(ex_face[0].img_u8[None])

        config = {"format": FORMAT, "mode": backend.mode, "model": str(model_path), "styles": str(styles or ""),
                  "encoder": str(encoder or ""), "encoder_space": encoder_space,
                  "style": ({"id": sid, "name": backend.names[sid]} if sid is not None
                            else {"image": str(style_image)}),
                  "weights": w, "preserve_color": preserve_color, "psi": psi_used, "face": which,
                  "composite": composite, "feather": feather, "contents": [str(p) for p in contents]}
        if out is None:
            run = next_run_dir(outdir, "stylize")
            atomic_write_json(run / "config.json", config)
        from tqdm import tqdm
        written = []
        for p, img, aligned in tqdm(jobs, desc="stylize", unit="photo", disable=len(jobs) < 2, file=sys.stderr):
            result, crops = backend.render(img, aligned, psi_used, sid, exemplar_ws, w, preserve_color, composite,
                                           feather)
            if out is not None:
                atomic_write_bytes(out, _png(result))
                written.append(out)
                continue
            targets = [(run / f"{p.stem}.png", result)]
            if composite == "crop":
                targets += [(run / f"{p.stem}.face{k}.png", c) for k, c in enumerate(crops) if k > 0]
            for path, arr in targets:
                atomic_write_bytes(path, _png(arr))
                written.append(path)
    finally:
        backend.close()
    where = out if out is not None else run
    click.echo(f"wrote {len(written)} image(s) to {where}")
