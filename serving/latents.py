"""Latent arithmetic in numpy, bit-for-bit the rules of training.networks.stylegan2 (which serving cannot import):
seed -> z, truncation towards w_avg with a layer cutoff, style mixing, and linear / spherical interpolation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from common import seeds as _seeds
from common.seeds import MAX_SEED  # noqa: F401  (front ends check seed ranges against it)

from .errors import InvalidArgument


def seeds_to_z(seeds: Sequence[int], z_dim: int) -> np.ndarray:
    """[len(seeds), z_dim] float32 by the project's one rule (`common.seeds.seed_to_z`); a bad seed is
    INVALID_ARGUMENT."""
    try:
        return _seeds.seeds_to_z(seeds, z_dim)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def broadcast(w: np.ndarray, num_ws: int) -> np.ndarray:
    """w [N, w_dim] -> ws [N, num_ws, w_dim] (ws passes through)."""
    if w.ndim == 3:
        return w
    return np.repeat(w[:, None, :], num_ws, axis=1)


def truncate(ws: np.ndarray, w_avg: np.ndarray, psi: float, cutoff: int | None = None) -> np.ndarray:
    """ws' = w_avg + psi * (ws - w_avg) on layers [0, cutoff) (all when None), in float32 like torch.

    psi == 1 returns ws untouched (as training's `truncate`), so untruncated images match bit for bit.
    """
    if psi == 1:
        return ws
    w_avg = w_avg.astype(np.float32)
    truncated = w_avg + np.float32(psi) * (ws - w_avg)
    if cutoff is None or cutoff >= ws.shape[1]:
        return truncated.astype(np.float32, copy=False)
    out = ws.copy()
    out[:, :cutoff] = truncated[:, :cutoff]
    return out


def mix(ws_coarse: np.ndarray, ws_fine: np.ndarray, crossover: int) -> np.ndarray:
    """Layers [0, crossover) from ws_coarse, [crossover, num_ws) from ws_fine."""
    out = ws_coarse.copy()
    out[:, crossover:] = ws_fine[:, crossover:]
    return out


def lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return (a + np.float32(t) * (b - a)).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: float, eps: float = 1e-7) -> np.ndarray:
    """Spherical interpolation along the last axis (per latent vector); lerp where a and b are (anti)parallel."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na = np.linalg.norm(a64, axis=-1, keepdims=True)
    nb = np.linalg.norm(b64, axis=-1, keepdims=True)
    cos = np.clip(np.sum(a64 * b64, axis=-1, keepdims=True) / np.maximum(na * nb, eps), -1.0, 1.0)
    omega = np.arccos(cos)
    so = np.sin(omega)
    safe = so > 1e-6
    so_safe = np.where(safe, so, 1.0)
    s = np.where(safe, np.sin((1 - t) * omega) / so_safe, 1 - t) * a64 + \
        np.where(safe, np.sin(t * omega) / so_safe, t) * b64
    return s.astype(np.float32)


def path_points(waypoints: np.ndarray, steps: int, mode: str) -> tuple[np.ndarray, list[float]]:
    """Sample `steps` points evenly along the path through waypoints [K, ...] (first and last included).

    Returns:
        (points [steps, ...] float32, t in [0, 1] of each point along the whole path).
    """
    k = waypoints.shape[0]
    fn = slerp if mode == "slerp" else lerp
    pts, ts = [], []
    for i in range(steps):
        t = i / (steps - 1)
        pos = t * (k - 1)
        seg = min(int(math.floor(pos)), k - 2)
        pts.append(fn(waypoints[seg: seg + 1], waypoints[seg + 1: seg + 2], pos - seg)[0])
        ts.append(t)
    return np.stack(pts).astype(np.float32), ts


def tensor(shape: Sequence[int], values: Sequence[float], what: str, expect: tuple[int | None, ...],
           max_rows: int) -> np.ndarray:
    """A FloatTensor message's fields -> float32 array, checked: rank, dims, size, row count and finiteness.

    `expect` gives the required shape with None for the batch axis.
    """
    shape = tuple(int(s) for s in shape)
    want = "[" + ", ".join("N" if d is None else str(d) for d in expect) + "]"
    if len(shape) != len(expect):
        raise InvalidArgument(f"{what}: shape {list(shape)} has the wrong rank, expected {want}")
    for got, exp in zip(shape, expect):
        if got < 0 or (exp is not None and got != exp):
            raise InvalidArgument(f"{what}: shape {list(shape)} does not match {want}")
    n = shape[0]
    if n < 1:
        raise InvalidArgument(f"{what}: no latents")
    if n > max_rows:
        raise InvalidArgument(f"{what}: {n} latents, more than the limit of {max_rows}")
    if len(values) != math.prod(shape):
        raise InvalidArgument(f"{what}: {len(values)} values do not fill shape {list(shape)}")
    arr = np.asarray(values, dtype=np.float32).reshape(shape)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{what}: NaN or Inf values")
    return arr
