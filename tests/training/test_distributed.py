"""training.distributed under a real `torchrun` with 2 CPU processes (gloo): the slice rule makes DDP's averaged
gradient equal to the single-process gradient of the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training import distributed as D

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys, torch
    from training import distributed as D
    env = D.init("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    if env.rank == 1:  # a different init on rank 1: DDP must broadcast rank 0's weights
        torch.nn.init.zeros_(model.weight)
    ddp = D.wrap(model, env)
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)  # the global batch, on every rank
    sl = D.local_slice(8, env)
    loss = ((ddp(x[sl]) - y[sl]) ** 2).mean()
    loss.backward()
    stats = D.all_reduce_mean({"loss": float(loss), "rank": float(env.rank)}, env)
    obj = D.broadcast_object({"run": "dir-from-rank0"} if env.is_main else None, env)
    stop = D.any_true(env.rank == 1, env)
    out = {"rank": env.rank, "world": env.world_size, "grad": model.weight.grad.tolist(),
           "bias_grad": model.bias.grad.tolist(), "weight": model.weight.detach().tolist(), "stats": stats,
           "obj": obj, "stop": stop}
    D.barrier(env)
    with open(sys.argv[1] + f".{env.rank}.json", "w") as f:
        json.dump(out, f)
    D.shutdown()
""")


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_process_gradients_equal_the_full_batch_gradient(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_torchrun() + [str(script), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads(Path(f"{out}.{k}.json").read_text()) for k in (0, 1)]

    # The same global batch in one process.
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    ((model(x) - y) ** 2).mean().backward()
    for r_ in res:
        assert r_["world"] == 2
        assert torch.allclose(torch.tensor(r_["weight"]), model.weight.detach())  # rank 0's init everywhere
        assert torch.allclose(torch.tensor(r_["grad"]), model.weight.grad, atol=1e-6)
        assert torch.allclose(torch.tensor(r_["bias_grad"]), model.bias.grad, atol=1e-6)
        assert r_["stats"]["rank"] == 0.5
        assert r_["obj"] == {"run": "dir-from-rank0"}
        assert r_["stop"] is True
    # Each rank's loss is its own half; their mean is the full-batch loss.
    full = float(((model(x) - y) ** 2).mean().detach())
    assert res[0]["stats"]["loss"] == pytest.approx(full, rel=1e-6)


def test_world_of_one_is_free_and_checks():
    env = D.init("cpu")
    assert not env.distributed and env.is_main
    m = torch.nn.Linear(2, 2)
    assert D.wrap(m, env) is m and D.unwrap(m) is m
    assert D.local_slice(6, env) == slice(0, 6)
    assert D.all_reduce_mean({"a": 1.5}, env) == {"a": 1.5}
    assert D.any_true(False, env) is False
    two = D.DistEnv(rank=1, world_size=2)
    assert D.local_slice(6, two) == slice(3, 6)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        D.check_batch(5, two)


def test_bad_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ValueError, match="start multi-process runs with torchrun"):
        D.init("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="not an integer"):
        D.init("cpu")
