"""StyleGAN-NADA data-parallel under a real `torchrun --nproc_per_node 2` (gloo, CPU) with the tiny random CLIP.

- With the global CLIP loss and constant noise no per-rank randomness reaches the gradients, so the averaged
  gradients of the first step equal the single-process gradients of the same global batch.
- With the directional loss, adaptive layer selection and random noise, the ranks stay bit-identical, only rank 0
  writes, and a run resumed under torchrun ends bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = "stylecast-tiny-clip:random"

WORKER = textwrap.dedent("""
    import json, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from training import distributed as dist
    from training.nada import NadaConfig, train_nada

    ckpt, outdir, out = sys.argv[1:4]
    env = dist.init("cpu")
    grads = []
    real = dist.all_reduce_grads_mean

    def recording(params, e):
        real(params, e)
        grads.append([p.grad.clone() for p in params if p.requires_grad and p.grad is not None])
    dist.all_reduce_grads_mean = recording
    cfg = NadaConfig(checkpoint=ckpt, outdir=outdir, source="photo", target="pencil sketch", clip=("%s",),
                     iters=2, batch=4, output_interval=0, save_interval=0, device="cpu", lambda_direction=0.0,
                     lambda_global=1.0, noise_mode="const", phase="texture", mixing=0.9)
    res = train_nada(cfg, progress=False, env=env)
    torch.save(grads, f"{out}.{env.rank}.pt")
    json.dump({"rank": env.rank, "run_dir": str(res.run_dir)}, open(f"{out}.{env.rank}.json", "w"))
    dist.shutdown()
""" % TINY_CLIP)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + args
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_gradients_equal_the_single_process_run(nada_source, tmp_path, monkeypatch):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ckpt = str(nada_source["native"])
    r = _torchrun([str(worker), ckpt, str(tmp_path / "runs_two"), str(tmp_path / "two")], 2)
    assert r.returncode == 0, r.stderr[-4000:]
    # The same configuration in this process (a world of one), recording the same gradients.
    from training import distributed as dist
    from training.nada import NadaConfig, train_nada
    grads: list = []
    real = dist.all_reduce_grads_mean

    def recording(params, env):
        real(params, env)
        grads.append([p.grad.clone() for p in params if p.requires_grad and p.grad is not None])
    monkeypatch.setattr(dist, "all_reduce_grads_mean", recording)
    train_nada(NadaConfig(checkpoint=ckpt, outdir=str(tmp_path / "runs_one"), source="photo", target="pencil sketch",
                          clip=(TINY_CLIP,), iters=2, batch=4, output_interval=0, save_interval=0, device="cpu",
                          lambda_direction=0.0, lambda_global=1.0, noise_mode="const", phase="texture", mixing=0.9),
               progress=False)
    torch.save(grads, tmp_path / "one.0.pt")
    one = torch.load(tmp_path / "one.0.pt", weights_only=True)
    two = [torch.load(tmp_path / f"two.{k}.pt", weights_only=True) for k in (0, 1)]
    assert len(one) == len(two[0]) == 2 and len(one[0]) > 4
    for step in range(2):
        for a, b, c in zip(one[step], two[0][step], two[1][step]):
            assert torch.equal(b, c)  # both ranks hold the same averaged gradient
            if step == 0:
                # Step 1 from identical weights: equal up to float reduction order. (Adam's first update is about
                # lr * sign(g), so at step 2 elements whose gradient was ~0 may have moved differently.)
                assert float((a - b).abs().max()) <= 1e-4 * (float(a.abs().max()) + 1e-12) + 1e-8
    # One run directory per job: the 2-process job wrote one, with one log line per step.
    (run,) = list((tmp_path / "runs_two").iterdir())
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def test_torchrun_cli_run_and_resume_are_exact(nada_source, tmp_path):
    import shutil
    r = _torchrun(["-m", "stylecast", "train", "nada", "--checkpoint", str(nada_source["native"]), "--source", "photo",
                   "--target", "pencil sketch", "--clip", TINY_CLIP, "--batch", "4", "--auto-layer-k", "2",
                   "--auto-layer-batch", "2", "--noise-mode", "random", "--output-interval", "0", "--device", "cpu",
                   "--no-progress", "--iters", "4", "--save-interval", "2", "-o", str(tmp_path / "straight")])
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 speaks
    (straight,) = list((tmp_path / "straight").iterdir())
    # The same run interrupted after step 2 (its step-4 outputs removed), resumed under torchrun.
    split = shutil.copytree(straight, tmp_path / "split")
    for p in (split / "checkpoints").glob("000004*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    r = _torchrun(["-m", "stylecast", "train", "nada", "--resume", str(split), "--iters", "4", "--no-progress"])
    assert r.returncode == 0, r.stderr[-4000:]
    from safetensors.torch import load_file
    a = load_file(str(straight / "checkpoints" / "000004" / "generator.safetensors"))
    b = load_file(str(split / "checkpoints" / "000004" / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert len(log_a) == len(log_b) == 4
    assert [x["latents"] for x in log_a] == [x["latents"] for x in log_b]
    assert [x["loss"] for x in log_a] == [x["loss"] for x in log_b]
