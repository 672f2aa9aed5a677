"""`stylecast bench backends`: the StyleGAN2 (Karras et al., 2020) synthesis network through every available
backend at several resolutions and batch sizes, timed side by side and checked against the fp32 reference.

For each resolution one generator is built (config-f by default, random weights: speed does not depend on
their values), its latents come from seeds 0.. through the mapping network with psi 0.7, and for each batch
size all backends are timed interleaved in one loop (benchmarks.harness.measure_cell), so load from other
processes hits them alike and the speed ratio against torch-fp32 comes from one run.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import (BACKENDS, NOT_IMPLEMENTED, QUICK_BACKENDS, REFERENCE_BACKEND, BenchContext, TorchEager,
                       default_work_dir)
from .harness import (STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, CellResult, JsonlWriter, cell_record,
                      measure_cell)

MODELS = ("config-f", "small")


@dataclass
class SweepOptions:
    sizes: list[int] = field(default_factory=lambda: [256, 512, 1024])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    reps: int = 50
    warmup: int = 3
    max_time_s: float = 60.0     # timed seconds per cell before stopping early (after min_reps rounds)
    min_reps: int = 3
    cell_budget_s: float = 0.0   # skip a cell whose estimated time exceeds this; 0 = 4 * max_time_s
    model: str = "config-f"
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    psi: float = 0.7
    compile_timeout_s: float = 900.0
    work_dir: Path | None = None


QUICK = dict(sizes=[256], batches=[1, 2, 4, 8], backends=list(QUICK_BACKENDS), reps=5, warmup=1, max_time_s=30.0)


def make_generator(model: str, size: int, seed: int = 0):
    """A random-initialised generator: 'config-f' (rosinality size, channel multiplier 2) or 'small'."""
    import torch

    from training.networks.stylegan2 import Generator, GeneratorConfig
    if model == "config-f":
        cfg = GeneratorConfig.rosinality(size, 2)
    elif model == "small":
        cfg = GeneratorConfig.tiny(resolution=size, w_dim=512, max_channels=64, min_channels=16, mapping_layers=8)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return Generator(cfg).eval().requires_grad_(False)


def latents(G, n: int, psi: float) -> np.ndarray:
    """ws [n, num_ws, w_dim] float32 for seeds 0..n-1 (the NVlabs seed rule), truncated with psi."""
    import torch

    from training.networks.stylegan2 import seeds_to_z
    with torch.no_grad():
        return G.map(seeds_to_z(list(range(n)), G.z_dim), psi=psi).numpy()


def run_backend_sweep(opts: SweepOptions, writer: JsonlWriter, log: Callable[[str], None] = print) -> list[dict]:
    """Time every requested backend; writes one record per (backend, size, batch) plus one per skipped backend.

    Returns:
        the records written.
    """
    import torch
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    if opts.model not in MODELS:
        raise ValueError(f"unknown model {opts.model!r}; choose from {', '.join(MODELS)}")
    if torch.cuda.is_available() and opts.device != "cpu":
        # fp32 means fp32: no TF32 in the reference or in the fp32 backends.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    work = Path(opts.work_dir) if opts.work_dir else default_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _sweep(opts, writer, log, work)
    finally:
        if opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _sweep(opts: SweepOptions, writer: JsonlWriter, log: Callable[[str], None], work: Path) -> list[dict]:
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    ctx = BenchContext(work_dir=work, device=opts.device, threads=opts.threads,
                       compile_timeout_s=opts.compile_timeout_s, trt_max_batch=max(opts.batches), log=log)
    budget = opts.cell_budget_s or 4 * opts.max_time_s
    base = {"run_id": run_id, "model": opts.model}
    out: list[dict] = []

    def write(rec: dict) -> None:
        out.append(writer.write("backends", {**base, **rec}))

    backends = []
    for name in opts.backends:
        if name in NOT_IMPLEMENTED:
            write({"backend": name, "status": STATUS_SKIPPED, "reason": NOT_IMPLEMENTED[name]})
            log(f"skip {name}: {NOT_IMPLEMENTED[name]}")
            continue
        b = BACKENDS[name](ctx)
        ok, why = b.available()
        if not ok:
            write({"backend": name, "precision": b.precision, "device": b.device, "status": STATUS_SKIPPED,
                   "reason": why})
            log(f"skip {name}: {why}")
            continue
        backends.append(b)
    if not backends:
        log("no backend available")
        return out
    names = [b.name for b in backends]
    ref_backend = None if REFERENCE_BACKEND in names else TorchEager(ctx, "fp32", name="reference")

    for size in opts.sizes:
        G = make_generator(opts.model, size, opts.seed)
        ws_all = latents(G, max(opts.batches), opts.psi)
        live = []
        for b in backends:
            try:
                b.setup(G, min(opts.batches))
                live.append(b)
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                reason = f"setup failed: {type(exc).__name__}: {exc}"[:500]
                log(f"{size}px {b.name}: {reason}")
                for batch in opts.batches:
                    write({"backend": b.name, "precision": b.precision, "device": b.device, "size": size,
                           "batch": batch, "status": STATUS_ERROR, "reason": reason})
        per_img_s: dict[str, float] = {}
        for batch in opts.batches:
            cell = []
            for b in live:
                est = per_img_s.get(b.name, 0.0) * batch * (opts.warmup + opts.min_reps)
                if est > budget:
                    reason = (f"estimated {est:.0f} s for {opts.warmup} warm-up + {opts.min_reps} timed calls "
                              f"exceeds the cell budget of {budget:.0f} s")
                    write({"backend": b.name, "precision": b.precision, "device": b.device, "size": size,
                           "batch": batch, "status": STATUS_SKIPPED, "reason": reason})
                    log(f"{size}px b={batch} {b.name}: skipped ({reason})")
                    continue
                cell.append(b)
            if not cell:
                continue
            x = ws_all[:batch]
            xs, ready = {}, []
            for b in cell:
                try:
                    b.setup(G, batch)
                    xs[b.name] = b.prepare(x)
                    ready.append(b)
                except Exception as exc:  # noqa: BLE001
                    write({"backend": b.name, "precision": b.precision, "device": b.device, "size": size,
                           "batch": batch, "status": STATUS_ERROR, "reason": f"{type(exc).__name__}: {exc}"[:500]})
            reference = None
            if ref_backend is not None:
                ref_backend.setup(G, batch)
                reference = ref_backend.to_numpy(ref_backend.run(ref_backend.prepare(x)))
            t0 = time.perf_counter()
            results = measure_cell(ready, xs, batch, opts.reps, opts.warmup, opts.max_time_s, opts.min_reps,
                                   reference=reference,
                                   reference_backend=REFERENCE_BACKEND if ref_backend is None else None)
            wall = time.perf_counter() - t0
            ref = results.get(REFERENCE_BACKEND)
            ref_med = ref.stats()["median_ms"] if ref is not None and ref.status == STATUS_OK and ref.latencies_s \
                else None
            for b in ready:
                res: CellResult = results[b.name]
                res.setup_s = b.setup_s
                res.output = None
                rec = cell_record(res, size, opts.model, opts.reps, opts.warmup, ref_med, b.timing)
                write(rec)
                st = rec["latency"]
                if st:
                    per_img_s[b.name] = st["median_ms"] / 1e3 / batch
                log(_line(size, batch, rec))
            log(f"{size}px b={batch}: cell took {wall:.1f} s")
        for b in backends:
            b.close()
        if ref_backend is not None:
            ref_backend.close()
        del G
    return out


def _line(size: int, batch: int, rec: dict) -> str:
    st = rec.get("latency")
    head = f"{size}px b={batch:<3d} {rec['backend']:<14s}"
    if not st:
        return f"{head} {rec['status']}: {rec['reason']}"
    p = rec.get("psnr_db")
    ptxt = "-" if p is None else ("inf" if p == "inf" or (isinstance(p, float) and math.isinf(p)) else f"{p:.1f}")
    sp = rec.get("speedup_vs_torch_fp32")
    return (f"{head} median {st['median_ms']:9.1f} ms  p95 {st['p95_ms']:9.1f}  p99 {st['p99_ms']:9.1f}  "
            f"n={st['n']:<3d} {st['img_per_s']:8.2f} img/s  x{(sp or 0):.2f} vs torch-fp32  PSNR {ptxt} dB  "
            f"{rec['status']}{(': ' + rec['reason']) if rec['reason'] else ''}")
