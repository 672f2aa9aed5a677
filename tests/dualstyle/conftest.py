"""Fixtures for the DualStyleGAN training tests: tiny base / "style-finetuned" generators, a folder of style images,
random loss networks, and random-weight files in the real torchvision layouts (for the CLI)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from training.checkpoints import save_native
from training.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

RES_INDEX = 2  # 16 px: 6 latents; ModRes on 0..2, colour transforms on 3..5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ds_cfg() -> GeneratorConfig:
    return GeneratorConfig.tiny(resolution=16, w_dim=32, max_channels=32, min_channels=16, mapping_layers=2)


def _generator(cfg: GeneratorConfig, seed: int) -> Generator:
    torch.manual_seed(seed)
    G = Generator(cfg)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.05)
    return G.eval()


@pytest.fixture(scope="session")
def ds_files(tmp_path_factory, ds_cfg) -> dict[str, Path]:
    """base (native, with a D of minibatch-stddev group 2), finetuned (native, with D), a style folder of four
    images rendered by the finetuned generator, and a folder of three "real faces"."""
    root = tmp_path_factory.mktemp("dualstyle")
    base = _generator(ds_cfg, 0)
    torch.manual_seed(1)
    D = Discriminator(dataclasses.replace(DiscriminatorConfig.from_generator(ds_cfg), mbstd_group=2))
    ft = _generator(ds_cfg, 0)
    with torch.no_grad():  # "finetuned on a style": the same network, perturbed
        g = torch.Generator().manual_seed(5)
        for name, p in ft.named_parameters():
            if name.startswith("synthesis") and p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    files = {"base": save_native(root / "base", base, D=D), "finetuned": save_native(root / "finetuned", ft, D=D)}
    styles = root / "styles"
    styles.mkdir()
    from training.generate import generate_images
    imgs = generate_images(ft, [3, 4, 5, 6], noise_mode="const")
    for i, im in enumerate(imgs):
        Image.fromarray(np.asarray(Image.fromarray(im).resize((24, 24), Image.BICUBIC))).save(styles / f"s{i}.png")
    faces = root / "faces"
    faces.mkdir()
    for i, im in enumerate(generate_images(base, [20, 21, 22], noise_mode="const")):
        Image.fromarray(im).save(faces / f"f{i}.png")
    files.update(styles=styles, faces=faces, root=root)
    return files


class TinyFaceNet(nn.Module):
    """A random stand-in face-ID network: aligned face [N, 3, R, R] -> [N, 16]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(64, 16))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net(img)


@pytest.fixture
def nets():
    """Random loss networks with the real topologies (VGG19 to relu3_1, LPIPS on a narrow VGG16)."""
    from training.dualstyle.common import VGG19_LAYERS, LossNets
    from training.inversion.losses import IDLoss, PerceptualLoss
    from training.style.vgg import random_vgg19

    return LossNets(vgg19=random_vgg19(VGG19_LAYERS, seed=0),
                    lpips=PerceptualLoss.random(seed=0, widths=(8, 16, 16, 32, 32)),
                    identity=IDLoss(TinyFaceNet()))


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """Random weights saved in torchvision's VGG19 / VGG16 state-dict layouts (features only)."""
    from training.inversion.losses import build_vgg16_trunk
    from training.style.vgg import build_vgg19_trunk

    root = tmp_path_factory.mktemp("weights")
    out = {}
    for name, trunk in (("vgg19", build_vgg19_trunk(37)), ("vgg16", build_vgg16_trunk())):
        g = torch.Generator().manual_seed(0)
        sd = {}
        for k, v in trunk.state_dict().items():
            sd[k] = torch.randn(v.shape, generator=g) * (0.0 if k.endswith("bias") else (2.0 / v[0].numel()) ** 0.5)
        torch.save(sd, root / f"{name}.pth")
        out[name] = root / f"{name}.pth"
    return out
