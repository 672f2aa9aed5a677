"""Seconds per NADA iteration: the tiny CPU setup (`slow`) and 1024 px config-f + ViT-B/32 on a GPU (`gpu`).

Random weights everywhere: the cost does not depend on them. Print the figures with
    pytest tests/nada/test_nada_timing.py --run-slow -s
"""

from __future__ import annotations

import time

import pytest
import torch

from training.checkpoints import save_native
from training.nada import NadaConfig, train_nada


def _seconds_per_iteration(cfg: NadaConfig, warmup: int = 2) -> float:
    marks: dict[int, float] = {}

    def callback(step, info):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks[step] = time.perf_counter()

    train_nada(cfg, progress=False, callback=callback)
    return (marks[cfg.iters] - marks[warmup]) / (cfg.iters - warmup)


@pytest.mark.slow
def test_cpu_tiny_seconds_per_iteration(nada_source, tmp_path):
    cfg = NadaConfig(checkpoint=str(nada_source["native"]), outdir=str(tmp_path), target="pencil sketch",
                     clip=("stylecast-tiny-clip:random",), iters=22, batch=2, device="cpu", output_interval=0,
                     save_interval=0)
    sec = _seconds_per_iteration(cfg)
    print(f"\nNADA tiny (32 px generator, tiny CLIP, batch 2) on CPU, {torch.get_num_threads()} thread(s): "
          f"{sec:.4f} s/it")
    assert sec < 5


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gpu_1024_vit_b32_seconds_per_iteration(tmp_path, amp):
    from training.networks import Generator, GeneratorConfig
    torch.manual_seed(0)
    G = Generator(GeneratorConfig())  # config-f 1024 px
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.05)
    src = save_native(tmp_path / "src", G)
    cfg = NadaConfig(checkpoint=str(src), outdir=str(tmp_path / "runs"), target="pencil sketch",
                     clip=("ViT-B-32:random",), iters=12, batch=2, device="cuda", amp=amp, output_interval=0,
                     save_interval=0)
    sec = _seconds_per_iteration(cfg)
    print(f"\nNADA 1024 px config-f + ViT-B/32 (random weights), batch 2, amp {amp}, "
          f"{torch.cuda.get_device_name()}: {sec:.4f} s/it")
    assert sec < 10
