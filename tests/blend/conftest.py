"""Fixtures for the blending tests: tiny random generators that differ in every tensor."""

from __future__ import annotations

import pytest
import torch

from training.networks import Generator, GeneratorConfig


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread avoids oversubscription on small shared CI machines.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_generator(cfg: GeneratorConfig, seed: int) -> Generator:
    """A random generator whose every parameter and buffer (w_avg, noise strengths, biases) is seed-specific."""
    torch.manual_seed(seed)
    G = Generator(cfg).eval()
    with torch.no_grad():
        G.mapping.w_avg.normal_(0, 0.5)
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.uniform_(0.05, 0.2)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return G.requires_grad_(False)


@pytest.fixture(scope="session")
def make_gen():
    """The make_generator factory (seeded random generators of any config)."""
    return make_generator


@pytest.fixture(scope="session")
def blend_cfg() -> GeneratorConfig:
    return GeneratorConfig.tiny(resolution=32, w_dim=32, max_channels=32, min_channels=16, mapping_layers=2)


@pytest.fixture(scope="session")
def model_a(blend_cfg) -> Generator:
    return make_generator(blend_cfg, 1)


@pytest.fixture(scope="session")
def model_b(blend_cfg) -> Generator:
    return make_generator(blend_cfg, 2)


@pytest.fixture(scope="session")
def model_c(blend_cfg) -> Generator:
    return make_generator(blend_cfg, 3)
