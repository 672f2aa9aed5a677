"""Golden checks: a bundle's graphs against the PyTorch outputs export stored in golden.npz, within the tolerances its
manifest records (protos.manifest.golden_tolerance). Torch-free: numpy plus whatever runs the graphs.

Every kind's model (serving.models.LoadedModel.golden_checks) builds its checks from these comparisons; the server
runs them before a bundle is READY and `stylecast export verify` (serving.verify) runs the same ones, so what verify
accepts is what the server accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protos.manifest import GOLDEN_NAME, golden_tolerance

from .errors import BundleRefused, ServingError


@dataclass
class Check:
    """One compared output: `max_abs` (levels for uint8 images), `psnr` in dB, whether it is within tolerance.

    A check that could not run here (an engine without its GPU / TensorRT) is `skipped`, with ok=True and the reason
    in `note`; callers decide whether a skip is acceptable (serving.verify).
    """

    graph: str
    output: str
    max_abs: float
    psnr: float
    ok: bool
    note: str = ""
    skipped: bool = False

    def message(self) -> str:
        """One line for a refusal or a report."""
        return f"{self.graph} {self.output}: max abs {self.max_abs:.3g}, PSNR {self.psnr:.1f} dB; {self.note}".rstrip("; ")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 2.0) -> float:
    """PSNR in dB of a against b for values in a range of width `peak` ([-1, 1] -> 2, uint8 -> 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def shape_mismatch(graph: str, output: str, val: np.ndarray, ref: np.ndarray) -> Check | None:
    if val.shape == ref.shape:
        return None
    return Check(graph, output, math.nan, math.nan, False, f"shape {list(val.shape)} != golden {list(ref.shape)}")


def close(graph: str, output: str, val: np.ndarray, ref: np.ndarray, max_abs: float, note: str = "") -> Check:
    """A float output against its golden value: largest |val - ref| (float64) <= max_abs."""
    bad = shape_mismatch(graph, output, val, ref)
    if bad is not None:
        return bad
    err = float(np.abs(val.astype(np.float64) - ref.astype(np.float64)).max())
    note = f"{note}; tolerance {max_abs:g}" if note else f"tolerance {max_abs:g}"
    return Check(graph, output, err, psnr(val, ref), bool(err <= max_abs), note)


def image(graph: str, output: str, val: np.ndarray, ref: np.ndarray, precision: str, tol: dict[str, float]) -> Check:
    """A synthesis image against its golden image with the tolerances of the graph's precision.

    `img` (float in [-1, 1]): fp32 max abs <= max_abs_fp32, fp16 PSNR >= min_psnr_fp16. `img_u8`: at most
    u8_max_diff_<p> levels off in at most u8_max_frac_<p> of the values.
    """
    bad = shape_mismatch(graph, output, val, ref)
    if bad is not None:
        return bad
    p = "fp32" if precision == "fp32" else "fp16"
    if val.dtype == np.uint8 or output == "img_u8":
        diff = np.abs(val.astype(np.int16) - ref.astype(np.int16))
        frac = float((diff > 0).mean())
        max_diff, max_frac = tol[f"u8_max_diff_{p}"], tol[f"u8_max_frac_{p}"]
        ok = int(diff.max()) <= max_diff and frac <= max_frac
        return Check(graph, output, float(diff.max()), psnr(val, ref, 255.0), bool(ok),
                     f"{frac:.2%} of values differ (tolerance {max_diff:g} levels in {max_frac:.0%})")
    if p == "fp32":
        return close(graph, output, val, ref, tol["max_abs_fp32"])
    err = float(np.abs(val.astype(np.float64) - ref.astype(np.float64)).max())
    q = psnr(val, ref)
    return Check(graph, output, err, q, bool(q >= tol["min_psnr_fp16"]), f"tolerance PSNR >= {tol['min_psnr_fp16']:g} dB")


class Golden:
    """golden.npz of a bundle (read without pickles) and its manifest's tolerances."""

    def __init__(self, bundle: Path, manifest: dict):
        gold = manifest.get("golden")
        if not gold:
            raise BundleRefused("the manifest lists no golden outputs (golden.npz); refusing an unchecked bundle")
        self.tolerance = golden_tolerance(manifest)
        try:
            with np.load(Path(bundle) / gold.get("file", GOLDEN_NAME), allow_pickle=False) as g:
                self.arrays: dict[str, np.ndarray] = {k: g[k] for k in g.files}
        except (OSError, ValueError, EOFError) as exc:
            raise BundleRefused(f"golden.npz unreadable: {exc}") from exc

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            raise BundleRefused(f"golden.npz lacks {key!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.arrays.get(key, default)


def require(checks: list[Check]) -> None:
    """Raise BundleRefused naming the first failed check (skipped checks pass)."""
    for c in checks:
        if not c.ok:
            raise BundleRefused(f"golden check failed: {c.message()}")


def run_checks(fn, *args: Any, graph: str = "golden") -> list[Check]:
    """fn(*args) -> checks, with a refusal turned into one failed check (verify reports it instead of raising)."""
    try:
        return fn(*args)
    except (BundleRefused, ServingError) as exc:
        return [Check(graph, "*", math.nan, math.nan, False, str(exc))]
