"""Serving bundles: an immutable directory of ONNX graphs, optional TensorRT engines, a validated manifest and
golden reference outputs, written atomically and verified against PyTorch before anyone serves it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protos.manifest import (BUNDLE_FORMAT, GOLDEN_NAME, MANIFEST_NAME, NAME_RE, ManifestError, check_bundle_files,
                             load_manifest)
from common.files import atomic_directory, sha256_file
from training.checkpoints import Checkpoint, load_checkpoint
from training.networks.stylegan2 import Generator, seeds_to_z

from .encoder_export import declare_bundle_encoder, resolve_bundle_encoder, write_bundle_encoder
from .onnx_export import DEFAULT_OPSET, export_mapping, export_synthesis, reference_outputs

GOLDEN_SEEDS = (0, 1)
GOLDEN_PSI = (1.0, 0.7)
# Tolerances for ONNX Runtime (fp32) against the PyTorch reference on [-1, 1] images.
FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR = 40.0
# The encoder is ~100 layers deep: fp32 rounding differences between ONNX Runtime and PyTorch accumulate.
ENCODER_MAX_ABS = 1e-3


@dataclass
class BundleOptions:
    name: str | None = None
    default_psi: float = 0.7
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    simplify: bool = False
    engines: list[str] = field(default_factory=list)  # precisions: "fp32", "fp16"
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16
    # Photos: an encoder (pSp / e4e checkpoint or native dir) to ship as encoder.onnx, and/or the id of the W+
    # space the synthesis accepts (default: the bundle name when it ships an encoder). `encoder_from` = a bundle
    # directory with an encoder whose latent space this (adapted) model shares.
    encoder: str | Path | None = None
    latent_space: str | None = None
    encoder_from: str | Path | None = None
    encoder_space: str | None = None  # "w+" | "z+" for an official encoder checkpoint that does not record it


def default_name(path: str | Path) -> str:
    stem = Path(path).name
    for suffix in (".pt", ".pth", ".pkl"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return name[:64]


def build_bundle(checkpoint: str | Path | Checkpoint, out: str | Path, options: BundleOptions | None = None,
                 progress: bool = False) -> Path:
    """Export a checkpoint to a bundle directory `out` (must not exist); atomic: all or nothing.

    Returns:
        the bundle path.
    """
    opts = options or BundleOptions()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    name = opts.name or default_name(ckpt.path)
    if not NAME_RE.match(name):
        raise ValueError(f"bundle name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    if not math.isfinite(opts.default_psi):
        raise ValueError("default psi must be finite")
    out = Path(out)
    G = ckpt.G.eval().cpu()
    photo = resolve_bundle_encoder(name, G, encoder=opts.encoder, encoder_from=opts.encoder_from,
                                   latent_space=opts.latent_space, encoder_space=opts.encoder_space)
    steps = (["mapping", "synthesis"] + (["synthesis_fp16"] if opts.fp16 else [])
             + (["encoder"] if photo.checkpoint else []) + ["golden"])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(steps) + len(opts.engines), desc="bundle", unit="step")
    with atomic_directory(out) as tmp:
        graphs: dict[str, Any] = {}
        info = export_mapping(G, tmp / "mapping.onnx", opset=opts.opset)
        graphs["mapping"] = {"file": "mapping.onnx", "inputs": info.inputs, "outputs": info.outputs,
                             "nodes": info.nodes, "precision": "fp32"}
        bar and bar.update()
        info = export_synthesis(G, tmp / "synthesis.onnx", opset=opts.opset, do_simplify=opts.simplify)
        graphs["synthesis"] = {"file": "synthesis.onnx", "inputs": info.inputs, "outputs": info.outputs,
                               "nodes": info.nodes, "precision": "fp32"}
        bar and bar.update()
        if opts.fp16:
            info = export_synthesis(G, tmp / "synthesis_fp16.onnx", fp16=True, opset=opts.opset,
                                    do_simplify=opts.simplify)
            graphs["synthesis_fp16"] = {"file": "synthesis_fp16.onnx", "inputs": info.inputs,
                                        "outputs": info.outputs, "nodes": info.nodes, "precision": "fp16"}
            bar and bar.update()
        extra_golden: dict[str, np.ndarray] = {}
        encoder_doc = None
        if photo.checkpoint is not None:
            graphs["encoder"], extra_golden, encoder_doc = write_bundle_encoder(photo, G, tmp, opts.opset)
            bar and bar.update()
        z = seeds_to_z(list(GOLDEN_SEEDS), G.z_dim)
        psi = torch.tensor(GOLDEN_PSI, dtype=torch.float32)
        ref = reference_outputs(G, z, psi)
        np.savez(tmp / GOLDEN_NAME, seeds=np.array(GOLDEN_SEEDS, dtype=np.int64), z=z.numpy(), psi=psi.numpy(),
                 **{k: v.numpy() for k, v in ref.items()}, **extra_golden)
        bar and bar.update()
        engines = []
        for precision in opts.engines:
            from .engine import build_engine
            eng = build_engine(tmp / "synthesis.onnx", tmp, precision=precision, min_batch=opts.min_batch,
                               opt_batch=opts.opt_batch, max_batch=opts.max_batch)
            engines.append(eng)
            bar and bar.update()
        manifest = _manifest(name, ckpt, G, opts, graphs, engines, tmp)
        declare_bundle_encoder(manifest, photo, encoder_doc)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        load_manifest(tmp)  # never publish a bundle whose manifest does not validate
    bar and bar.close()
    return out


def _manifest(name: str, ckpt: Checkpoint, G: Generator, opts: BundleOptions, graphs: dict, engines: list,
              tmp: Path) -> dict[str, Any]:
    from common.version import stylecast_version
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    return {
        "format": BUNDLE_FORMAT,
        "name": name,
        "kind": "stylegan2",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stylecast_version": stylecast_version(),
        "opset": opts.opset,
        "model": {
            "resolution": G.resolution, "z_dim": G.z_dim, "w_dim": G.w_dim, "num_ws": G.num_ws,
            "img_channels": G.cfg.img_channels, "default_psi": float(opts.default_psi),
            "w_avg": [float(x) for x in G.w_avg.detach().cpu().numpy().tolist()],
            "config": G.cfg.to_dict(),
        },
        "source": {"file": Path(ckpt.path).name, "format": ckpt.format, "sha256": ckpt.sha256},
        "files": files,
        "graphs": graphs,
        "engines": engines,
        "golden": {"file": GOLDEN_NAME, "seeds": list(GOLDEN_SEEDS), "psi": list(GOLDEN_PSI),
                   "tolerance": {"max_abs_fp32": FP32_MAX_ABS, "min_psnr_fp16": FP16_MIN_PSNR}},
    }


# ----------------------------------------------------------------------------------------------------------
# Verification


class BundleError(ValueError):
    """A bundle failed validation or verification."""


@dataclass
class GraphCheck:
    graph: str
    output: str
    max_abs: float
    psnr: float
    ok: bool
    note: str = ""
    skipped: bool = False  # not run (e.g. an engine without a GPU/TensorRT here); ok stays True, the note says why


@dataclass
class VerifyReport:
    bundle: Path
    checks: list[GraphCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    @property
    def skipped(self) -> list[GraphCheck]:
        """Checks that did not run; they do not fail the report unless verify_bundle(require_engines=True)."""
        return [c for c in self.checks if c.skipped]


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 2.0) -> float:
    """PSNR in dB of a against b for images in a range of width `peak` ([-1, 1] -> 2)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def compare_output(graph: str, output: str, val: np.ndarray, ref: np.ndarray, precision: str) -> GraphCheck:
    """One output against its golden reference with the bundle's tolerances (ONNX Runtime and engines alike).

    img: fp32 max abs <= FP32_MAX_ABS, fp16 PSNR >= FP16_MIN_PSNR; img_u8: off by at most 1 in at most 1% of
    the values (fp32), 8 in 25% (fp16); any other output (w, ws) as fp32 img.
    """
    if val.shape != ref.shape:
        return GraphCheck(graph, output, math.nan, math.nan, False, f"shape {val.shape} != golden {ref.shape}")
    if output == "img_u8":
        diff = np.abs(val.astype(np.int16) - ref.astype(np.int16))
        frac = float((diff > 0).mean())
        fp32 = precision == "fp32"
        ok = diff.max() <= (1 if fp32 else 8) and frac <= (0.01 if fp32 else 0.25)
        return GraphCheck(graph, output, float(diff.max()), psnr(val, ref, 255.0), bool(ok),
                          f"{frac:.2%} of values differ")
    err = float(np.abs(val.astype(np.float64) - ref.astype(np.float64)).max())
    p = psnr(val, ref)
    ok = err <= FP32_MAX_ABS if precision == "fp32" else p >= FP16_MIN_PSNR
    return GraphCheck(graph, output, err, p, bool(ok))


def check_files(bundle: Path, manifest: dict) -> list[str]:
    """Every listed file exists with its sha256; no unlisted files (see protos.manifest.check_bundle_files)."""
    return check_bundle_files(bundle, manifest)


def verify_bundle(bundle: str | Path, providers: list[str] | None = None,
                  require_engines: bool = False) -> VerifyReport:
    """Validate a bundle and run its graphs in ONNX Runtime against golden.npz (and engines where possible).

    Engines run only where a GPU and the engine's TensorRT flavour/version exist; elsewhere their check is
    marked skipped (ok, with a note), or is a problem with require_engines=True.
    """
    bundle = Path(bundle)
    report = VerifyReport(bundle)
    if not bundle.is_dir():
        report.problems.append(f"{bundle} is not a directory")
        return report
    try:
        manifest = load_manifest(bundle)
    except ManifestError as exc:
        report.problems.append(str(exc))
        return report
    report.problems += check_files(bundle, manifest)
    if report.problems:
        return report
    import onnxruntime as ort
    providers = providers or ["CPUExecutionProvider"]
    golden = np.load(bundle / GOLDEN_NAME)
    graphs = manifest["graphs"]

    def run(fname: str, feeds: dict) -> list[np.ndarray]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(bundle / fname), so, providers=providers)
        return sess.run(None, feeds)

    if manifest["kind"] == "fast_style":
        from .fast_style_bundle import check_fast_style_golden
        report.checks += check_fast_style_golden(lambda x: run(graphs["stylizer"]["file"], {"img": x})[0], golden)
        return report
    if manifest["kind"] == "dualstylegan":
        from .dualstyle_bundle import check_dualstyle_golden
        checks, problems = check_dualstyle_golden(bundle, manifest, golden, run)
        report.checks += checks
        report.problems += problems
        return report
    w, ws = run(graphs["mapping"]["file"], {"z": golden["z"], "psi": golden["psi"]})
    for out_name, val in (("w", w), ("ws", ws)):
        err = float(np.abs(val - golden[out_name]).max())
        report.checks.append(GraphCheck("mapping", out_name, err, psnr(val, golden[out_name]), err <= FP32_MAX_ABS))
    if "encoder" in graphs:
        keys = manifest["encoder"]["golden"]
        img = golden[keys["img_u8"]].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
        (val,) = run(graphs["encoder"]["file"], {"img": img})
        ref = golden[keys["ws"]]
        err = float(np.abs(val.astype(np.float64) - ref).max()) if val.shape == ref.shape else math.nan
        report.checks.append(GraphCheck("encoder", "ws", err, psnr(val, ref) if val.shape == ref.shape else math.nan,
                                        err <= ENCODER_MAX_ABS, f"tolerance {ENCODER_MAX_ABS}"))
    for gname in ("synthesis", "synthesis_fp16"):
        if gname not in graphs:
            continue
        g = graphs[gname]
        outs = run(g["file"], {"ws": golden["ws"]})
        names = list(g["outputs"])
        for out_name, val in zip(names, outs):
            report.checks.append(compare_output(gname, out_name, val, golden[out_name], g.get("precision", "fp32")))
    for eng in manifest.get("engines") or []:
        from .engine import run_engine_check
        checks = run_engine_check(bundle, eng, golden)
        report.checks.extend(checks)
        if require_engines:
            report.problems += [f"engine {eng['file']} was not checked ({c.note})" for c in checks if c.skipped]
    return report
