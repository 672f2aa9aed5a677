"""Fast stylizer (Johnson TransformerNet) -> a `fast_style` serving bundle.

The bundle holds `stylizer.onnx` (img [N, 3, H, W] float in [-1, 1] -> img, dynamic N, H and W, opset 17),
`golden.npz` (two small inputs of different sizes and the PyTorch outputs) and the manifest (kind "fast_style",
model.max_size = the largest side serving accepts). Written atomically and checked in ONNX Runtime against
PyTorch before it is published.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protos.manifest import BUNDLE_FORMAT, GOLDEN_NAME, MANIFEST_NAME, NAME_RE, load_manifest
from common.files import atomic_directory, sha256_file
from training.style.fast_style import MIN_SIZE, TransformerNet, load_fast_style

STYLIZER_FILE = "stylizer.onnx"
DEFAULT_OPSET = 17
# Golden inputs: two sizes (H, W), neither a multiple of 4 in both sides, so the pad / crop path is covered.
GOLDEN_SIZES = ((37, 53), (64, 48))
GOLDEN_SEED = 0
FP32_MAX_ABS = 1e-4


def golden_inputs(sizes=GOLDEN_SIZES, seed: int = GOLDEN_SEED) -> list[np.ndarray]:
    """Smooth-ish random images in [-1, 1], one [1, 3, H, W] float32 array per size."""
    rs = np.random.RandomState(seed)
    return [np.tanh(rs.randn(1, 3, h, w)).astype(np.float32) for h, w in sizes]


def export_stylizer(net: TransformerNet, path: str | Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write the stylizer graph with dynamic N, H, W; returns its manifest entry (inputs, outputs, nodes)."""
    import onnx

    net = net.eval().cpu()
    dummy = torch.zeros(2, 3, 36, 44)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Known benign: constant folding of Slice, instance_norm exported with train=True (it uses input stats
        # in eval too), the tracer's size checks in InstanceNorm / F.pad.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as export/onnx_export.py
        torch.onnx.export(net, (dummy,), buf, input_names=["img"], output_names=["img_out"],
                          dynamic_axes={"img": {0: "N", 2: "H", 3: "W"}, "img_out": {0: "N", 2: "H", 3: "W"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    # The house name of a float image is `img`; ONNX forbids one name for input and output, so the output is
    # `img_out` (same layout and range).
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = "stylecast"
    model.doc_string = ""
    onnx.checker.check_model(model, full_check=True)
    Path(path).write_bytes(model.SerializeToString(deterministic=True))
    return {"file": Path(path).name,
            "inputs": {"img": {"dtype": "float32", "shape": ["N", 3, "H", "W"], "range": [-1, 1]}},
            "outputs": {"img_out": {"dtype": "float32", "shape": ["N", 3, "H", "W"], "range": [-1, 1]}},
            "nodes": len(model.graph.node), "precision": "fp32"}


def run_stylizer_ort(path: str | Path, img: np.ndarray, threads: int = 0) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"img": img})[0]


def check_fast_style_golden(run, golden) -> list:
    """Each golden input through `run` (img [1, 3, H, W] -> output) against its PyTorch output (max abs)."""
    from .bundle import GraphCheck, psnr
    checks = []
    i = 0
    while f"img_{i}" in golden and f"out_{i}" in golden:
        ref = golden[f"out_{i}"]
        val = run(golden[f"img_{i}"])
        if val.shape != ref.shape:
            checks.append(GraphCheck("stylizer", f"out_{i}", float("nan"), float("nan"), False,
                                     f"shape {val.shape} != golden {ref.shape}"))
        else:
            err = float(np.abs(val.astype(np.float64) - ref.astype(np.float64)).max())
            checks.append(GraphCheck("stylizer", f"out_{i}", err, psnr(val, ref), err <= FP32_MAX_ABS,
                                     f"{ref.shape[2]}x{ref.shape[3]}"))
        i += 1
    if not checks:
        checks.append(GraphCheck("stylizer", "golden", float("nan"), float("nan"), False, "golden.npz has no inputs"))
    return checks


def _source(path: Path) -> dict[str, Any]:
    """Identify the checkpoint: sha256 of its safetensors (of the final / latest one for a run directory)."""
    import hashlib
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return {"file": path.name, "format": "stylecast.fast_style/v1", "sha256": h.hexdigest()}


def build_fast_style_bundle(checkpoint_or_run_dir: str | Path, out: str | Path, name: str, max_size: int = 1024,
                            opset: int = DEFAULT_OPSET, description: str = "") -> Path:
    """Export a fast stylizer checkpoint (or training run directory) to a bundle at `out` (must not exist).

    Args:
        checkpoint_or_run_dir: what `load_fast_style` accepts.
        name: model name (lowercase, NAME_RE).
        max_size: the largest image side serving will accept (>= MIN_SIZE).
    Raises:
        ValueError: bad name / max_size, or ONNX Runtime disagrees with PyTorch beyond FP32_MAX_ABS.
    """
    if not NAME_RE.match(name or ""):
        raise ValueError(f"bundle name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    if not isinstance(max_size, int) or max_size < max(MIN_SIZE, *[max(s) for s in GOLDEN_SIZES]):
        raise ValueError(f"max_size must be an integer >= {max(max(s) for s in GOLDEN_SIZES)}, got {max_size}")
    src = Path(checkpoint_or_run_dir)
    net = load_fast_style(src)
    out = Path(out)
    with atomic_directory(out) as tmp:
        graph = export_stylizer(net, tmp / STYLIZER_FILE, opset)
        inputs = golden_inputs()
        feeds: dict[str, np.ndarray] = {}
        errs = []
        for i, x in enumerate(inputs):
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            got = run_stylizer_ort(tmp / STYLIZER_FILE, x)
            err = float(np.abs(got.astype(np.float64) - ref).max()) if got.shape == ref.shape else float("inf")
            errs.append(err)
            if not err <= FP32_MAX_ABS:
                raise ValueError(f"ONNX Runtime differs from PyTorch at {x.shape[2]}x{x.shape[3]}: max abs {err:.3g} "
                                 f"> {FP32_MAX_ABS}")
            feeds[f"img_{i}"], feeds[f"out_{i}"] = x, ref
        np.savez(tmp / GOLDEN_NAME, **feeds)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
        from common.version import stylecast_version
        manifest = {
            "format": BUNDLE_FORMAT, "name": name, "kind": "fast_style",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stylecast_version": stylecast_version(), "opset": opset,
            "description": description,
            "model": {"max_size": max_size, "min_size": MIN_SIZE, "config": net.cfg.to_dict()},
            "source": _source(src), "files": files, "graphs": {"stylizer": graph}, "engines": [],
            "golden": {"file": GOLDEN_NAME, "sizes": [list(s) for s in GOLDEN_SIZES], "count": len(inputs),
                       "export_max_abs": max(errs), "tolerance": {"max_abs_fp32": FP32_MAX_ABS}},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        load_manifest(tmp)  # never publish a bundle whose manifest does not validate
    return out
