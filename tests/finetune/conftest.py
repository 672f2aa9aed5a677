"""Fixtures for the finetuning tests: a tiny base checkpoint and small synthetic image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.checkpoints import save_native
from training.networks import Generator, GeneratorConfig


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread avoids oversubscription on small shared CI machines.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ft_cfg() -> GeneratorConfig:
    return GeneratorConfig.tiny(resolution=16, w_dim=32, max_channels=32, min_channels=16, mapping_layers=2)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory, ft_cfg) -> Path:
    """A native checkpoint without a discriminator (D starts fresh)."""
    torch.manual_seed(0)
    G = Generator(ft_cfg)
    return save_native(tmp_path_factory.mktemp("base") / "base", G)


def write_red_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """n reddish images of mixed sizes and formats (png / jpg / nested folder), plus one corrupt file."""
    rng = np.random.RandomState(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 18 + rng.randint(0, 10), 18 + rng.randint(0, 10)
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = 190 + rng.randint(0, 60, (h, w))
        a[..., 1] = rng.randint(0, 40, (h, w))
        a[..., 2] = rng.randint(0, 60, (h, w))
        dest = root / ("sub" if i % 3 == 0 else ".") / f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(a).save(dest, quality=95) if i % 2 else Image.fromarray(a).save(dest)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "notes.txt").write_text("not an image, not counted")
    return root


@pytest.fixture(scope="session")
def red_folder(tmp_path_factory) -> Path:
    return write_red_folder(tmp_path_factory.mktemp("red") / "red")
