"""Shared fixtures of the inversion tests: random VGG16 weights in torchvision's layout, a tiny generator checkpoint,
the astronaut photo, an offline environment, and the `stylecast` CLI run in-process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

# torchvision's vgg16().features: conv widths by block, convs per block, and the indices of the 13 convolutions.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def write_random_vgg16(path: Path, seed: int = 0) -> Path:
    """A full-size random VGG16 state dict in torchvision's layout (features + a classifier entry)."""
    g = torch.Generator().manual_seed(seed)
    sd, c_in, k = {}, 3, 0
    for c, n in VGG16_BLOCKS:
        for _ in range(n):
            i = VGG16_CONV_INDICES[k]
            sd[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c))
            sd[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.01
            c_in, k = c, k + 1
    sd["classifier.6.bias"] = torch.zeros(1000)
    torch.save(sd, path)
    return path


@pytest.fixture(scope="session")
def vgg16_random_file(tmp_path_factory) -> Path:
    return write_random_vgg16(tmp_path_factory.mktemp("vgg-random") / "vgg16-random.pth")


@pytest.fixture(scope="session")
def gen_ckpt(tmp_path_factory, tiny_G) -> Path:
    """tiny_G (32 px, w_dim 64, 8 ws) as a native checkpoint directory."""
    from training.checkpoints import save_native
    return save_native(tmp_path_factory.mktemp("gen") / "tiny-gen", tiny_G)


@pytest.fixture(scope="session")
def tiny_faces_dir(tmp_path_factory, tiny_G) -> Path:
    """Six 32 px 'faces' that tiny_G draws (targets an encoder can reach), plus one corrupt file."""
    from PIL import Image

    from training.generate import generate_images
    root = tmp_path_factory.mktemp("faces")
    for i, img in enumerate(generate_images(tiny_G, list(range(100, 106)), psi=0.7)):
        Image.fromarray(img).save(root / f"face{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="session")
def astronaut_file(tmp_path_factory) -> Path:
    """skimage's astronaut (public domain, one clear face) as a PNG."""
    from PIL import Image
    from skimage import data
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="session")
def gradient_file(tmp_path_factory) -> Path:
    """A plain colour gradient: no face."""
    from PIL import Image
    x = np.linspace(0, 255, 160, dtype=np.float64)
    a = np.stack([np.tile(x, (120, 1)), np.tile(x[::-1], (120, 1)), np.full((120, 160), 90.0)], axis=2)
    path = tmp_path_factory.mktemp("photos") / "gradient.png"
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path_factory):
    """No downloads and no cached VGG16: weights must come from an explicit path."""
    monkeypatch.setenv("STYLECAST_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
    monkeypatch.delenv("STYLECAST_VGG16_WEIGHTS", raising=False)


@pytest.fixture
def cli(capsys):
    """cli(args) -> (exit code, stdout, stderr) of the `stylecast` console entry, run in-process."""
    from stylecast.cli import main

    def run(args: list) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return int(exc.value.code or 0), out.out, out.err
    return run
