"""Data-parallel training under `torchrun` with PyTorch DistributedDataParallel (Li et al., "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB 2020), shared by stylecast's trainers.

Nothing here is a distributed system of our own: torchrun starts the processes and sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, torch.distributed does the communication (NCCL on CUDA, gloo on the CPU),
DDP averages the gradients. A plain `python` / `stylecast` process is a world of one and pays nothing.

The rule every trainer follows so that N processes train exactly like one process with the same global batch
(up to float reduction order): each step, every rank draws the randomness of the *whole* global batch from the
step's seed (latents, noise, data indices) and keeps only its own contiguous slice (`local_slice`). The loss on
a slice is the mean over that slice; DDP's gradient average over equal slices is then the gradient of the mean
over the global batch. Only rank 0 writes files (run directory, snapshots, state), behind `barrier()`s.

    torchrun --nproc_per_node 2 -m stylecast train encoder --generator ffhq.pt --batch 8 --outdir runs/
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: rank in 0..world_size-1 and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not started by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def init(device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the torchrun job (if any) and pick this rank's device.

    Args:
        device: "cpu", "cuda" or "cuda:K"; None = cuda when available, else cpu. Under torchrun with CUDA each
            rank takes cuda:LOCAL_RANK.
        timeout_s: collective timeout.
    Returns:
        DistEnv. Without torchrun (WORLD_SIZE unset or 1) no process group is created.
    Raises:
        ValueError: inconsistent torchrun variables, or CUDA asked for but absent.
    """
    world = env_world_size()
    want = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    if world == 1:
        return DistEnv(device=want)
    missing = [v for v in ENV_VARS + ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start multi-process runs with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if want.type == "cuda":
        want = torch.device("cuda", local_rank)
        torch.cuda.set_device(want)
    backend = "nccl" if want.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=want)


def seed_for(*keys: int) -> int:
    """A 63-bit RNG seed that is a pure function of integer keys, e.g. (run seed, step, stream, rank)."""
    import numpy as np
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def check_batch(batch: int, env: DistEnv, what: str = "batch") -> int:
    """The per-rank batch; the global batch must split evenly over the ranks (equal slices keep the DDP gradient
    average equal to the full-batch mean)."""
    if batch % env.world_size:
        raise ValueError(f"--{what} {batch} must be divisible by the number of processes ({env.world_size})")
    return batch // env.world_size


def local_slice(batch: int, env: DistEnv) -> slice:
    """This rank's rows of a global batch of `batch` rows (contiguous, equal sizes)."""
    per = check_batch(batch, env)
    return slice(env.rank * per, (env.rank + 1) * per)


def wrap(module: nn.Module, env: DistEnv, **kwargs: Any) -> nn.Module:
    """DistributedDataParallel around a module with trainable parameters (the module itself in a world of one).

    Rank 0's parameters and buffers are broadcast at construction, so every rank starts identical.
    """
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module)."""
    return getattr(module, "module", module)


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Skip DDP's gradient all-reduce inside the block (for extra backward passes that are reduced later)."""
    ctx = module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()
    with ctx:
        yield


def all_reduce_mean(values: Mapping[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar statistics over the ranks (every rank gets the same dict; keys must match on all ranks)."""
    if not env.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= env.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_grads_mean(params: list[nn.Parameter], env: DistEnv) -> None:
    """Average .grad over the ranks by hand, in one flattened all-reduce (for parameters trained outside a DDP
    module: GAN generator/discriminator phases with several backward passes per step, as NVlabs'
    stylegan2-ada-pytorch does it, or latent codes). A parameter without a gradient on this rank counts as zero."""
    if not env.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset: offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def all_reduce_tensor_mean_(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place mean of a tensor (e.g. a running-average buffer) over the ranks; returns t."""
    if env.distributed:
        dist.all_reduce(t)
        t /= env.world_size
    return t


def all_reduce_sum(values: Mapping[str, float], env: DistEnv) -> dict[str, float]:
    """Sum scalar statistics over the ranks (every rank gets the same dict)."""
    if not env.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's picklable Python object on every rank (run directory paths, resolved configs)."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. a non-finite loss must stop all ranks together)."""
    if not env.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


__all__ = ["DistEnv", "all_reduce_grads_mean", "all_reduce_mean", "all_reduce_sum", "all_reduce_tensor_mean_",
           "any_true", "barrier", "broadcast_object", "check_batch", "seed_for", "env_world_size", "init", "local_slice", "no_sync",
           "shutdown", "unwrap", "wrap"]
