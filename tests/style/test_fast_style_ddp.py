"""Fast-stylizer training data-parallel under a real `torchrun --nproc_per_node 2` (gloo, CPU): every rank reads
the global batch from the deterministic data stream and trains its slice through DistributedDataParallel; the
network's instance norms are per sample, so the first step's averaged gradients equal the single-process ones;
only rank 0 writes, and the CLI's run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore:skipping unreadable training image")]

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from training import distributed as dist
    from training.style.fast_style import FastStyleConfig, train_fast_style
    from training.style.vgg import random_vgg19

    cfg_json, run_dir, out = sys.argv[1:4]
    cfg = FastStyleConfig.from_dict(json.loads(cfg_json))
    env = dist.init("cpu")
    grads = []
    real_step = torch.optim.Adam.step

    def recording(self, *a, **k):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *a, **k)
    torch.optim.Adam.step = recording
    vgg = random_vgg19(cfg.loss_weights().layers, seed=0)
    net = train_fast_style(cfg, run_dir, vgg, progress=False, env=env)
    torch.save({"grads": grads, "weights": net.state_dict()}, f"{out}.{env.rank}.pt")
    dist.shutdown()
""")


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + args
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "STYLECAST_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_like_one(image_files, tmp_path):
    from training.style.fast_style import FastStyleConfig, train_fast_style
    from training.style.vgg import random_vgg19
    cfg = FastStyleConfig(style=str(image_files["style"]), data=str(image_files["data"]), image_size=16,
                          style_size=24, batch_size=4, learning_rate=1e-3, style_weight=3000.0, iterations=3,
                          checkpoint_every=2, preview_every=0, preview_count=2, channels=8, res_blocks=1,
                          content_layers=("relu2_2",), style_layers=("relu1_2", "relu2_2"))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    r = _torchrun([str(worker), json.dumps(cfg.to_dict()), str(tmp_path / "run2"), str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-4000:]
    two = [torch.load(tmp_path / f"two.{k}.pt", weights_only=True) for k in (0, 1)]
    # One process, same global batch, recording the same gradients.
    grads: list = []
    real_step = torch.optim.Adam.step

    def recording(self, *a, **k):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *a, **k)
    torch.optim.Adam.step = recording
    try:
        train_fast_style(cfg, tmp_path / "run1", random_vgg19(cfg.loss_weights().layers, seed=0), progress=False)
    finally:
        torch.optim.Adam.step = real_step
    assert len(grads) == len(two[0]["grads"]) == 3
    for a, b, c in zip(grads[0], two[0]["grads"][0], two[1]["grads"][0]):
        assert torch.equal(b, c)
        assert float((a - b).abs().max()) <= 1e-4 * (float(a.abs().max()) + 1e-12) + 1e-9
    for k, v in two[0]["weights"].items():  # the ranks end bit-identical
        assert torch.equal(v, two[1]["weights"][k]), k
    # Rank 0 wrote the run: config, files list, checkpoints, final model.
    run = tmp_path / "run2"
    assert {p.name for p in run.iterdir()} >= {"config.json", "files.txt", "checkpoints", "final"}


def test_cli_under_torchrun_and_odd_batch(image_files, vgg_weights_file, tmp_path):
    base = ["-m", "stylecast", "train", "fast-style", "--style", str(image_files["style"]), "--data",
            str(image_files["data"]), "--vgg-weights", str(vgg_weights_file), "--image-size", "16",
            "--style-size", "24", "--iterations", "2", "--checkpoint-every", "1", "--preview-every", "0",
            "--channels", "8", "--res-blocks", "1", "--device", "cpu"]
    r = _torchrun(base + ["--batch-size", "4", "--out", str(tmp_path / "runs")])
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("wrote ") == 1
    (run,) = list((tmp_path / "runs").iterdir())
    assert (run / "final" / "config.json").is_file()
    bad = _torchrun(base + ["--batch-size", "3", "--out", str(tmp_path / "bad")])
    assert bad.returncode != 0 and "divisible by the number of processes" in bad.stderr
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())
