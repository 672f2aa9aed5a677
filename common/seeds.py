"""Seeds: "0-3,7" ranges and the project's one seed -> z rule, `numpy.random.RandomState(seed).randn(1, z_dim)`.

The rule is NVlabs' (stylegan2-ada-pytorch `generate.py`), so a seed gives the same face in `stylecast generate`,
training previews, exported golden rows and the server. numpy only.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

#: Seeds are the 32-bit range numpy's RandomState accepts.
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> int:
    """The seed as an int; ValueError outside 0..MAX_SEED."""
    s = int(seed)
    if not 0 <= s <= MAX_SEED:
        raise ValueError(f"seed {s} out of range 0..{MAX_SEED}")
    return s


def parse_seeds(spec: str | int | list[int], max_count: int = 100_000) -> list[int]:
    """Parse "0-3,7" into [0, 1, 2, 3, 7] (order kept, duplicates kept).

    Raises:
        ValueError: on malformed ranges, negative or > 2**32-1 seeds, or more than max_count seeds.
    """
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        seeds = [int(s) for s in spec]
    else:
        seeds = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"invalid seed range {part!r}: use e.g. 0-3,7")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"invalid seed range {part!r}: end is before start")
            if len(seeds) + hi - lo + 1 > max_count:
                raise ValueError(f"too many seeds (more than {max_count})")
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError("no seeds given")
    for s in seeds:
        check_seed(s)
    if len(seeds) > max_count:
        raise ValueError(f"too many seeds (more than {max_count})")
    return seeds


def seed_to_z(seed: int, z_dim: int) -> np.ndarray:
    """The seed -> z rule: RandomState(seed).randn(1, z_dim) as float32 [1, z_dim]. ValueError on a bad seed."""
    return np.random.RandomState(check_seed(seed)).randn(1, z_dim).astype(np.float32)


def seeds_to_z(seeds: Sequence[int], z_dim: int) -> np.ndarray:
    """[len(seeds), z_dim] float32, one `seed_to_z` row per seed (empty input: [0, z_dim])."""
    if not len(seeds):
        return np.zeros((0, z_dim), np.float32)
    return np.concatenate([seed_to_z(s, z_dim) for s in seeds], axis=0)
