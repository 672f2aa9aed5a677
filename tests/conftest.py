"""Shared pytest setup: markers (`gpu` auto-skipped without CUDA, `slow` opt-in) and tiny fixtures."""

from __future__ import annotations

import os

import pytest

# Tiny test models run fastest on one thread; torch's OpenMP pool spin-waits badly on a shared 2-core machine.
# Set before torch is imported (subprocesses inherit it); STYLECAST_TEST_THREADS overrides.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("STYLECAST_TEST_THREADS", "1"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow") or os.environ.get("STYLECAST_RUN_SLOW") == "1"
    has_gpu = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or STYLECAST_RUN_SLOW=1"))
        if "gpu" in item.keywords:
            if has_gpu is None:
                has_gpu = _cuda_available()
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


@pytest.fixture(scope="session")
def tiny_cfg():
    from training.networks import GeneratorConfig
    return GeneratorConfig.tiny(resolution=32, w_dim=64, max_channels=64, min_channels=32, mapping_layers=2)


@pytest.fixture(scope="session")
def tiny_G(tiny_cfg):
    """A deterministic random-initialised tiny generator with a non-trivial w_avg and noise strengths."""
    import torch

    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(tiny_cfg).eval()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(tiny_cfg.w_dim) * 0.5)
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
            elif name.endswith(".bias") and "synthesis" in name and "affine" not in name:
                p.normal_(0, 0.1)
    return G.requires_grad_(False)
