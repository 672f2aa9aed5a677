"""Serving bundles of kind "dualstylegan" (DualStyleGAN: Yang et al., "Pastiche Master: Exemplar-Based
High-Resolution Portrait Style Transfer", CVPR 2022): the model, its style library and an optional photo encoder,
exported, checked against PyTorch and published as one immutable directory.

    manifest.json   kind "dualstylegan"; model dims, res_index, default_psi (truncation towards 0), default_weights,
                    latent_space; the style table (styles.names in id order); files with sha256
    mapping.onnx    z [N, z_dim], psi [N] -> w [N, w_dim], ws = psi * w [N, num_ws, w_dim] (towards 0, not w_avg)
    synthesis.onnx  ws, exstyle_w [N, num_ws, w_dim], weights [N, num_ws] -> img, img_u8 (export.dualstyle_export)
    styles.npz      exstyle_w [S, num_ws, w_dim] (the codes through the mapping network, untruncated, as the
                    official style_transfer.py feeds them), z_plus [S, num_ws, z_dim] (the codes as given), names [S]
    encoder.onnx    optional: aligned face -> W+ ws of the base generator (export.encoder_export)
    golden.npz      PyTorch outputs for (seed, psi, style, weights) rows, including colour-only and all-zero weights

Style ids are positions in the exstyle code file (the official `list(exstyles.keys())[style_id]`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from protos.manifest import (BUNDLE_FORMAT, DUALSTYLE_TRUNCATION, GOLDEN_NAME, MANIFEST_NAME, NAME_RE,
                             load_manifest)
from common.files import atomic_directory, sha256_file
from training.checkpoints import checkpoint_sha256
from training.dualstyle import (DualStyleGAN, colour_only_weights, load_dualstylegan, load_exstyle_codes)
from training.networks.stylegan2 import seeds_to_z

from .bundle import ENCODER_MAX_ABS, FP16_MIN_PSNR, FP32_MAX_ABS, GraphCheck, compare_output, psnr
from .dualstyle_export import export_dualstyle_synthesis
from .encoder_export import declare_bundle_encoder, resolve_bundle_encoder, write_bundle_encoder
from .onnx_export import DEFAULT_OPSET, GraphInfo, _export, _io_info, img_to_uint8

STYLES_NAME = "styles.npz"
# Golden rows: (seed, psi, style index (taken modulo the library size; -1 = the last style), weights kind).
GOLDEN_ROWS = ((0, 1.0, 0, "default"), (1, 0.75, 1, "colour_only"), (2, 0.5, 2, "zeros"), (3, 1.0, -1, "ones"))
DEFAULT_PSI = 0.75  # official style_transfer.py --truncation


@dataclass
class DualStyleBundleOptions:
    """Options of build_dualstyle_bundle.

    Attributes:
        name: the served model name.
        default_psi: truncation of intrinsic codes towards 0 when a request gives none (official 0.75).
        default_weights: num_ws per-layer extrinsic weights when a request gives none (None = the model's
            default_weights(): [0.75] * (res_index + 1) + [1] * rest).
        opset: ONNX opset.
        encoder: a pSp / e4e checkpoint (official .pt or native dir; W+ or z+) to ship as encoder.onnx.
        encoder_space: "w+" | "z+" for an official encoder checkpoint that does not record its space (the official
            DualStyleGAN encoder.pt is z+); None = what the checkpoint says (default w+).
        encoder_from: a bundle with an encoder whose latent space this model's base generator shares.
        latent_space: id of the W+ space of the intrinsic path (default with an encoder: the bundle name).
        description: shown by ListModels.
    """

    name: str | None = None
    default_psi: float = DEFAULT_PSI
    default_weights: Sequence[float] | None = None
    opset: int = DEFAULT_OPSET
    encoder: str | Path | None = None
    encoder_space: str | None = None
    encoder_from: str | Path | None = None
    latent_space: str | None = None
    description: str = ""


# ----------------------------------------------------------------------------------------------------------
# Graphs


class DualStyleMappingGraph(nn.Module):
    """z [N, z_dim], psi [N] -> w [N, w_dim] (untruncated), ws [N, num_ws, w_dim] = psi * w (DualStyleGAN's truncation
    towards 0; the stylegan2 mapping graph truncates towards w_avg instead)."""

    def __init__(self, model: DualStyleGAN):
        super().__init__()
        self.mapping = model.generator.mapping
        self.num_ws = model.num_ws

    def forward(self, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.mapping(z)  # [N, w_dim]
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1) * psi.reshape(-1, 1, 1)
        return w, ws


def export_dualstyle_mapping(model: DualStyleGAN, path: str | Path, opset: int = DEFAULT_OPSET) -> GraphInfo:
    """Write mapping.onnx: z float32 [N, z_dim], psi float32 [N] -> w float32 [N, w_dim], ws float32
    [N, num_ws, w_dim] (ws = psi * w)."""
    path = Path(path)
    model = model.eval().cpu()
    args = (torch.randn(2, model.z_dim, generator=torch.Generator().manual_seed(0)), torch.ones(2))
    _export(DualStyleMappingGraph(model).eval(), args, path, ["z", "psi"], ["w", "ws"],
            {"z": {0: "N"}, "psi": {0: "N"}, "w": {0: "N"}, "ws": {0: "N"}}, opset)
    ins, outs, nodes = _io_info(path)
    return GraphInfo(path, ins, outs, nodes, path.stat().st_size)


# ----------------------------------------------------------------------------------------------------------
# Style library and golden outputs


def style_library(model: DualStyleGAN, codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of styles.npz from {name: z+ [1, num_ws, z_dim]} (in id order).

    Returns:
        exstyle_w float32 [S, num_ws, w_dim] (map_extrinsic: the base mapping layer by layer, untruncated),
        z_plus float32 [S, num_ws, z_dim], names unicode [S].
    """
    names = list(codes)
    z_plus = np.concatenate([np.asarray(codes[n], np.float32).reshape(1, model.num_ws, model.z_dim) for n in names])
    with torch.no_grad():
        exstyle_w = model.eval().cpu().map_extrinsic(torch.from_numpy(z_plus)).numpy().astype(np.float32)
    return {"exstyle_w": exstyle_w, "z_plus": z_plus, "names": np.array(names, dtype=str)}


def golden_rows(model: DualStyleGAN, exstyle_w: np.ndarray, default_weights: Sequence[float]) -> dict[str, np.ndarray]:
    """PyTorch reference of the bundle (GOLDEN_ROWS): the mapping (z, psi -> w, ws = psi * w), the library styles
    used (style_ids, exstyle_w) and the synthesis with per-row weights (default, colour-only, all 0, all 1).

    Returns:
        seeds int64 [K], z [K, z_dim], psi [K], w [K, w_dim], ws [K, num_ws, w_dim], style_ids int64 [K],
        exstyle_w [K, num_ws, w_dim], weights [K, num_ws], img [K, 3, R, R] float32, img_u8 [K, R, R, 3] uint8.
    """
    model = model.eval().cpu()
    s = exstyle_w.shape[0]
    seeds = [r[0] for r in GOLDEN_ROWS]
    psi = torch.tensor([r[1] for r in GOLDEN_ROWS], dtype=torch.float32)
    style_ids = np.array([r[2] % s for r in GOLDEN_ROWS], dtype=np.int64)
    rows = {"default": list(default_weights), "colour_only": colour_only_weights(model.cfg, default_weights),
            "zeros": [0.0] * model.num_ws, "ones": [1.0] * model.num_ws}
    weights = torch.tensor([rows[r[3]] for r in GOLDEN_ROWS], dtype=torch.float32)
    z = seeds_to_z(seeds, model.z_dim)
    ex = torch.from_numpy(exstyle_w[style_ids])
    with torch.no_grad():
        w = model.generator.mapping(z)
        ws = model.map_intrinsic(z, psi)
        img = model(ws, ex, weights, noise_mode="const", impl="ref")
    return {"seeds": np.array(seeds, np.int64), "z": z.numpy(), "psi": psi.numpy(), "w": w.numpy(), "ws": ws.numpy(),
            "style_ids": style_ids, "exstyle_w": ex.numpy(), "weights": weights.numpy(), "img": img.numpy(),
            "img_u8": img_to_uint8(img).numpy()}


def check_weights(weights: Sequence[float], num_ws: int, what: str = "weights") -> list[float]:
    """num_ws finite floats, else ValueError."""
    try:
        out = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers") from None
    if len(out) != num_ws:
        raise ValueError(f"{what}: {len(out)} values given; the model has {num_ws} layers")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite")
    return out


# ----------------------------------------------------------------------------------------------------------
# Building


def build_dualstyle_bundle(checkpoint: str | Path, styles: str | Path, out: str | Path,
                           options: DualStyleBundleOptions | None = None, progress: bool = False) -> Path:
    """Export a DualStyleGAN checkpoint and its exstyle codes to a bundle directory `out` (must not exist); atomic.

    Args:
        checkpoint: official generator.pt or a native DualStyleGAN directory (training.dualstyle).
        styles: the exstyle codes: official `*exstyle_code.npy` (read without executing its pickle) or native
            `.safetensors`; {name: z+ [1, num_ws, z_dim]}, the order giving the style ids.
        out: the bundle directory to create.
        options: see DualStyleBundleOptions.
        progress: show a progress bar.
    Returns:
        the bundle path.
    Raises:
        ValueError / FileNotFoundError / FileExistsError (nothing is written then).
    """
    opts = options or DualStyleBundleOptions()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists (bundles are never overwritten)")
    name = opts.name or "dualstylegan"
    if not NAME_RE.match(name):
        raise ValueError(f"bundle name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    if not isinstance(opts.default_psi, (int, float)) or not math.isfinite(opts.default_psi):
        raise ValueError("default psi must be a finite number")
    model = load_dualstylegan(checkpoint).eval().requires_grad_(False)
    weights = check_weights(model.default_weights() if opts.default_weights is None else opts.default_weights,
                            model.num_ws, "default weights")
    codes = load_exstyle_codes(styles, num_ws=model.num_ws, w_dim=model.z_dim)
    photo = resolve_bundle_encoder(name, model.generator, encoder=opts.encoder, encoder_from=opts.encoder_from,
                                   latent_space=opts.latent_space, encoder_space=opts.encoder_space)
    steps = ["mapping", "synthesis", "styles"] + (["encoder"] if photo.checkpoint is not None else []) + ["golden"]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(steps), desc="dualstyle bundle", unit="step")
    G = model.generator
    with atomic_directory(out) as tmp:
        graphs: dict[str, Any] = {}

        def graph_doc(info: GraphInfo) -> dict[str, Any]:
            return {"file": info.path.name, "inputs": info.inputs, "outputs": info.outputs, "nodes": info.nodes,
                    "precision": "fp32"}

        graphs["mapping"] = graph_doc(export_dualstyle_mapping(model, tmp / "mapping.onnx", opts.opset))
        bar and bar.update()
        graphs["synthesis"] = graph_doc(export_dualstyle_synthesis(model, tmp / "synthesis.onnx", opts.opset))
        bar and bar.update()
        lib = style_library(model, codes)
        np.savez(tmp / STYLES_NAME, **lib)
        bar and bar.update()
        extra_golden: dict[str, np.ndarray] = {}
        encoder_doc = None
        if photo.checkpoint is not None:
            graphs["encoder"], extra_golden, encoder_doc = write_bundle_encoder(photo, G, tmp, opts.opset)
            bar and bar.update()
        gold = golden_rows(model, lib["exstyle_w"], weights)
        np.savez(tmp / GOLDEN_NAME, **gold, **extra_golden)
        bar and bar.update()
        manifest = _manifest(name, checkpoint, styles, model, opts, weights, graphs, list(lib["names"]), tmp)
        declare_bundle_encoder(manifest, photo, encoder_doc)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        load_manifest(tmp)  # never publish a bundle whose manifest does not validate
    bar and bar.close()
    return out


def _manifest(name: str, checkpoint: str | Path, styles: str | Path, model: DualStyleGAN,
              opts: DualStyleBundleOptions, weights: list[float], graphs: dict, names: list[str],
              tmp: Path) -> dict[str, Any]:
    from common.version import stylecast_version
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    ckpt, styles = Path(checkpoint), Path(styles)
    g = model.generator
    doc = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "kind": "dualstylegan",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stylecast_version": stylecast_version(),
        "opset": opts.opset,
        "model": {
            "resolution": g.resolution, "z_dim": g.z_dim, "w_dim": g.w_dim, "num_ws": g.num_ws,
            "img_channels": g.cfg.img_channels, "res_index": model.res_index,
            "default_psi": float(opts.default_psi), "truncation": DUALSTYLE_TRUNCATION,
            "default_weights": weights, "config": model.cfg.to_dict(),
        },
        "source": {"file": ckpt.name, "format": "native" if ckpt.is_dir() else "official",
                   "sha256": checkpoint_sha256(ckpt)},
        "styles": {"file": STYLES_NAME, "count": len(names), "names": names,
                   "source": {"file": styles.name,
                              "format": "official" if styles.read_bytes()[:6] == b"\x93NUMPY" else "native",
                              "sha256": sha256_file(styles)}},
        "files": files,
        "graphs": graphs,
        "engines": [],
        "golden": {"file": GOLDEN_NAME, "seeds": [r[0] for r in GOLDEN_ROWS], "psi": [r[1] for r in GOLDEN_ROWS],
                   "weights": [r[3] for r in GOLDEN_ROWS],
                   "tolerance": {"max_abs_fp32": FP32_MAX_ABS, "min_psnr_fp16": FP16_MIN_PSNR}},
    }
    if opts.description:
        doc["description"] = opts.description
    return doc


# ----------------------------------------------------------------------------------------------------------
# Verification (export verify)


def check_dualstyle_golden(bundle: Path, manifest: dict, golden: Any,
                           run: Callable[[str, dict], list[np.ndarray]]) -> tuple[list[GraphCheck], list[str]]:
    """Run a dualstylegan bundle's graphs against golden.npz and check its style library.

    Checks: mapping (w, ws = psi * w), encoder (when present), styles.npz (names equal the manifest's table; the
    golden rows' exstyle_w are the library's rows; exstyle_w equals mapping.onnx on z_plus), synthesis (img fp32 max
    abs, img_u8 levels).

    Args:
        run: (graph file name, feeds) -> outputs in graph order (an ONNX Runtime session).
    Returns:
        (checks, problems).
    """
    checks: list[GraphCheck] = []
    problems: list[str] = []
    graphs = manifest["graphs"]
    try:
        gold = {k: golden[k] for k in ("z", "psi", "w", "ws", "style_ids", "exstyle_w", "weights", "img", "img_u8")}
    except KeyError as exc:
        return checks, [f"golden.npz lacks {exc}"]

    def close(graph: str, output: str, val: np.ndarray, ref: np.ndarray, tol: float = FP32_MAX_ABS,
              note: str = "") -> None:
        if val.shape != ref.shape:
            checks.append(GraphCheck(graph, output, math.nan, math.nan, False, f"shape {val.shape} != {ref.shape}"))
            return
        err = float(np.abs(val.astype(np.float64) - ref.astype(np.float64)).max())
        checks.append(GraphCheck(graph, output, err, psnr(val, ref), err <= tol, note))

    w, ws = run(graphs["mapping"]["file"], {"z": gold["z"], "psi": gold["psi"]})
    close("mapping", "w", w, gold["w"])
    close("mapping", "ws", ws, gold["ws"], note="ws = psi * w")
    if "encoder" in graphs:
        keys = manifest["encoder"]["golden"]
        img = golden[keys["img_u8"]].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
        (val,) = run(graphs["encoder"]["file"], {"img": img})
        close("encoder", "ws", val, golden[keys["ws"]], ENCODER_MAX_ABS, f"tolerance {ENCODER_MAX_ABS}")
    problems += _check_styles(bundle, manifest, gold, run, close)
    outs = run(graphs["synthesis"]["file"], {"ws": gold["ws"], "exstyle_w": gold["exstyle_w"],
                                             "weights": gold["weights"]})
    for out_name, val in zip(list(graphs["synthesis"]["outputs"]), outs):
        checks.append(compare_output("synthesis", out_name, val, gold[out_name], "fp32"))
    return checks, problems


def _check_styles(bundle: Path, manifest: dict, gold: dict, run: Callable, close: Callable) -> list[str]:
    m, table = manifest["model"], manifest["styles"]
    try:
        with np.load(bundle / table["file"], allow_pickle=False) as f:
            lib = {k: f[k] for k in ("exstyle_w", "z_plus", "names")}
    except (OSError, KeyError, ValueError) as exc:
        return [f"{table['file']} unreadable: {exc}"]
    s = table["count"]
    problems = []
    if lib["exstyle_w"].shape != (s, m["num_ws"], m["w_dim"]) or lib["z_plus"].shape != (s, m["num_ws"], m["z_dim"]):
        return [f"{table['file']}: exstyle_w {lib['exstyle_w'].shape} / z_plus {lib['z_plus'].shape} do not match "
                f"{s} styles of [{m['num_ws']}, {m['w_dim']}] / [{m['num_ws']}, {m['z_dim']}]"]
    if [str(n) for n in lib["names"]] != list(table["names"]):
        problems.append(f"{table['file']}: style names differ from the manifest's style table")
    ids = gold["style_ids"]
    if ids.min() < 0 or ids.max() >= s or not np.array_equal(lib["exstyle_w"][ids], gold["exstyle_w"]):
        problems.append(f"{table['file']}: the golden rows' extrinsic codes are not the library's styles {list(ids)}")
    z = lib["z_plus"].reshape(-1, m["z_dim"]).astype(np.float32)
    w, _ = run(manifest["graphs"]["mapping"]["file"], {"z": z, "psi": np.ones(len(z), np.float32)})
    close("styles", "exstyle_w", w.reshape(lib["exstyle_w"].shape), lib["exstyle_w"],
          note="mapping.onnx(z_plus)")
    return problems
