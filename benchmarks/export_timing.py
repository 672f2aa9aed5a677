"""Export cost of a StyleGAN2 config-f generator (Karras et al., 2020): ONNX graph sizes and node counts, and
ONNX Runtime (CPU) vs PyTorch eager synthesis time, measured side by side in one process.

Random weights (sizes and timings do not depend on their values). Runs are interleaved (ORT, torch, ORT, ...)
so that load from other processes hits both alike; each figure is the median of `--reps` timed runs after
`--warmup` untimed ones. Writes result.json and result.md into a new numbered run directory.

Example:
    python -m benchmarks.export_timing --resolution 256 --batches 1,8 --threads 2 --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _graph_stats(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path))
    return {"file": path.name, "mb": round(path.stat().st_size / 1e6, 2), "nodes": len(m.graph.node),
            "initializers": len(m.graph.initializer)}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per runtime and batch (median reported)")
    ap.add_argument("--simplify", action="store_true", help="also report onnxsim-simplified graph sizes")
    ap.add_argument("--no-fp16", dest="fp16", action="store_false",
                    help="skip the fp16 graph (tracing it runs the model in half precision on the CPU: slow)")
    ap.add_argument("--out", default="runs/bench", help="parent of the numbered run directory")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from export.onnx_export import export_mapping, export_synthesis, img_to_uint8, simplify
    from common.files import next_run_dir
    from training.networks import Generator, GeneratorConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GeneratorConfig.rosinality(args.resolution, args.channel_multiplier)
    G = Generator(cfg).eval().requires_grad_(False)
    result: dict = {
        "config": {"resolution": cfg.resolution, "channel_multiplier": args.channel_multiplier,
                   "params_total": G.num_params(),
                   "params_synthesis": sum(p.numel() for p in G.synthesis.parameters())},
        "env": {"torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads,
                "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                "load_before": _load()},
        "graphs": {}, "timing": [],
    }

    # Graphs: sizes, node counts, export time.
    tmp = Path(tempfile.mkdtemp(prefix="export_timing."))
    exports = {
        "mapping": lambda p: export_mapping(G, p),
        "synthesis": lambda p: export_synthesis(G, p),
    }
    if args.fp16:
        exports["synthesis_fp16"] = lambda p: export_synthesis(G, p, fp16=True)
    for name, fn in exports.items():
        path = tmp / f"{name}.onnx"
        t0 = time.perf_counter()
        fn(path)
        stats = _graph_stats(path)
        stats["export_s"] = round(time.perf_counter() - t0, 1)
        if args.simplify:
            simple = tmp / f"{name}.simplified.onnx"
            simple.write_bytes(path.read_bytes())
            if simplify(simple):
                stats["simplified"] = _graph_stats(simple)
        result["graphs"][name] = stats
        print(f"{name}: {stats}", flush=True)

    # Timing: the same ws through ORT (the exported synthesis.onnx) and PyTorch eager (reference ops).
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(tmp / "synthesis.onnx"), so, providers=["CPUExecutionProvider"])
    result["env"]["ort_session_s"] = round(time.perf_counter() - t0, 2)

    def run_torch(ws: torch.Tensor):
        with torch.inference_mode():
            img = G.synthesis(ws, noise_mode="const", impl="ref")
            return img, img_to_uint8(img)

    for n in [int(b) for b in args.batches.split(",")]:
        ws = G.map(torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(n)), psi=0.7)
        ws_np = ws.numpy()
        times: dict[str, list[float]] = {"onnxruntime": [], "torch": []}
        for i in range(args.warmup + args.reps):
            for rt in ("onnxruntime", "torch"):
                t0 = time.perf_counter()
                if rt == "onnxruntime":
                    img_ort, _ = sess.run(None, {"ws": ws_np})
                else:
                    img_t, _ = run_torch(ws)
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[rt].append(dt)
        row = {"batch": n, "max_abs_diff": float(np.abs(img_ort - img_t.numpy()).max())}
        for rt, ts in times.items():
            med = statistics.median(ts)
            row[rt] = {"median_ms": round(med * 1e3, 1), "min_ms": round(min(ts) * 1e3, 1),
                       "max_ms": round(max(ts) * 1e3, 1), "ms_per_img": round(med * 1e3 / n, 1)}
        row["ort_speedup"] = round(row["torch"]["median_ms"] / row["onnxruntime"]["median_ms"], 2)
        result["timing"].append(row)
        print(f"batch {n}: {row}", flush=True)
    result["env"]["load_after"] = _load()

    out = next_run_dir(args.out, f"export_timing-{cfg.resolution}")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result, args.reps)
    (out / "result.md").write_text(md)
    print(md)
    print(f"wrote {out}")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return result


def _markdown(r: dict, reps: int) -> str:
    c, e = r["config"], r["env"]
    lines = [f"# Export timing: {c['resolution']} px config-f (cm {c['channel_multiplier']}), "
             f"{c['params_total'] / 1e6:.2f} M params ({c['params_synthesis'] / 1e6:.2f} M synthesis)", "",
             "| graph | size (MB) | nodes | export (s) | simplified size (MB) | simplified nodes |",
             "|---|---|---|---|---|---|"]
    for name, g in r["graphs"].items():
        s = g.get("simplified", {})
        lines.append(f"| {name} | {g['mb']} | {g['nodes']} | {g['export_s']} | {s.get('mb', '-')} | "
                     f"{s.get('nodes', '-')} |")
    lines += ["", f"Synthesis, CPU, {e['threads']} threads, median of {reps} interleaved runs "
              f"(load average before {e['load_before']}, after {e['load_after']}):", "",
              "| batch | ONNX Runtime (ms) | PyTorch eager (ms) | ORT ms/img | torch ms/img | ORT speed-up | "
              "max abs diff |", "|---|---|---|---|---|---|---|"]
    for t in r["timing"]:
        o, p = t["onnxruntime"], t["torch"]
        lines.append(f"| {t['batch']} | {o['median_ms']} | {p['median_ms']} | {o['ms_per_img']} | {p['ms_per_img']} "
                     f"| {t['ort_speedup']}x | {t['max_abs_diff']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
