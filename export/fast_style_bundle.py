"""Fast stylizer (Johnson TransformerNet) -> a `fast_style` serving bundle.

The bundle holds `stylizer.onnx` (img [N, 3, H, W] float in [-1, 1] -> img, dynamic N, H and W, opset 17),
`golden.npz` (two small inputs of different sizes and the PyTorch outputs) and the manifest (kind "fast_style",
model.max_size = the largest side serving accepts). Written atomically and checked in ONNX Runtime against
PyTorch before it is published.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import sha256_file
from protos.manifest import GOLDEN_TOLERANCE
from training.style.fast_style import MIN_SIZE, TransformerNet, load_fast_style

from .writer import BundleWriter, check_name

KIND = "fast_style"
STYLIZER_FILE = "stylizer.onnx"
DEFAULT_OPSET = 17
# Golden inputs: two sizes (H, W), neither a multiple of 4 in both sides, so the pad / crop path is covered.
GOLDEN_SIZES = ((37, 53), (64, 48))
GOLDEN_SEED = 0


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


def _source(path: Path) -> dict[str, Any]:
    """Identify the checkpoint: sha256 of its safetensors (of the final / latest one for a run directory)."""
    import hashlib
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return {"file": path.name, "format": "stylecast.fast_style/v1", "sha256": h.hexdigest()}


def build_fast_style_bundle(checkpoint_or_run_dir: str | Path, out: str | Path, name: str, max_size: int = 1024,
                            opset: int = DEFAULT_OPSET, description: str = "",
                            max_abs: float = GOLDEN_TOLERANCE["max_abs_fp32"]) -> Path:
    """Export a fast stylizer checkpoint (or training run directory) to a bundle at `out` (must not exist).

    Args:
        checkpoint_or_run_dir: what `load_fast_style` accepts.
        name: model name (lowercase, NAME_RE).
        max_size: the largest image side serving will accept (>= MIN_SIZE).
        max_abs: ONNX Runtime must match PyTorch within this on the golden inputs before anything is published (the
            fp32 golden tolerance serving applies).
    Raises:
        ValueError: bad name / max_size, or ONNX Runtime disagrees with PyTorch beyond max_abs.
    """
    check_name(name)
    if not isinstance(max_size, int) or max_size < max(MIN_SIZE, *[max(s) for s in GOLDEN_SIZES]):
        raise ValueError(f"max_size must be an integer >= {max(max(s) for s in GOLDEN_SIZES)}, got {max_size}")
    src = Path(checkpoint_or_run_dir)
    net = load_fast_style(src)
    with BundleWriter(out, KIND, name, opset) as w:
        w.graphs["stylizer"] = export_stylizer(net, w.dir / STYLIZER_FILE, opset)
        inputs = golden_inputs()
        feeds: dict[str, np.ndarray] = {}
        errs = []
        for i, x in enumerate(inputs):
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            got = run_stylizer_ort(w.dir / STYLIZER_FILE, x)
            err = float(np.abs(got.astype(np.float64) - ref).max()) if got.shape == ref.shape else float("inf")
            errs.append(err)
            if not err <= max_abs:
                raise ValueError(f"ONNX Runtime differs from PyTorch at {x.shape[2]}x{x.shape[3]}: max abs {err:.3g} "
                                 f"> {max_abs}")
            feeds[f"img_{i}"], feeds[f"out_{i}"] = x, ref
        w.golden(feeds, sizes=[list(s) for s in GOLDEN_SIZES], count=len(inputs), export_max_abs=max(errs))
        w.publish(model={"max_size": max_size, "min_size": MIN_SIZE, "config": net.cfg.to_dict()},
                  source=_source(src), description=description)
    return Path(out)
