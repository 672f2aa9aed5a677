"""benchmarks/RESULTS.md (markdown tables) and PNG plots from the JSON-lines records of `stylecast bench`.

For each kind (backends, server) and device, the latest run is shown (records are grouped by `run_id`); older
runs stay in their JSON-lines files.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .harness import PERCENTILE_METHOD, PSNR_PEAK, PSNR_THRESHOLDS, read_jsonl

from .numbers import fmt as _f

NOTES_NAME = "RESULTS_NOTES.md"  # hand-written commentary next to RESULTS.md, included verbatim
GPU_SWEEP = "stylecast bench backends --sizes 256,512,1024 --batches 1,2,4,8,16,32 --backends all"
GPU_SERVER = ("stylecast bench server --model config-f --size 1024 --concurrency 1,2,4,8,16,32,64 --duration 30 "
              "--max-batch 16")
DEVICE_CHECK = "python3 -m benchmarks.device --out $OUT"
DEVICE_INGEST = "python -m benchmarks.device.ingest DIR/device-check.jsonl"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "device"


def _run_slug(key: tuple[str, str, str]) -> str:
    """Plot-name suffix of one run: device ('cpu' or the GPU name), then 'quick' or a hash of the command."""
    import hashlib
    dev = _slug(key[1]) if key[0] == "cuda" else "cpu"
    tag = "quick" if re.search(r"\s--quick\b", key[2]) else hashlib.sha1(key[2].encode()).hexdigest()[:6]
    return f"{dev}-{tag}"


def _device_key(rec: dict) -> tuple[str, str]:
    env = rec.get("env") or {}
    return env.get("device", "cpu"), env.get("device_name") or "?"


def latest_runs(records: Iterable[dict], kind: str) -> dict[tuple[str, str, str], list[dict]]:
    """{(device, device_name, command): records of the most recent run of `kind` with that command on that
    device}, ordered by device, then by date."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == kind:
            runs[r.get("run_id") or "?"].append(r)
    best: dict[tuple[str, str, str], tuple[str, list[dict]]] = {}
    for rid, rs in runs.items():
        env = rs[0].get("env") or {}
        key = (*_device_key(rs[0]), _normalise_command(env.get("command", "")))
        date = env.get("date", "")
        if key not in best or date > best[key][0]:
            best[key] = (date, rs)
    # per device: the default (--quick) run first, then the others by date
    order = sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], not re.search(r"\s--quick\b", kv[0][2]),
                                                 kv[1][0]))
    return {k: v[1] for k, v in order}


def _normalise_command(cmd: str) -> str:
    """The command without --out / --work-dir values (runs that differ only there are the same experiment)."""
    return re.sub(r"\s--(out|work-dir)(=|\s+)\S+", "", cmd)


def _env_lines(env: dict) -> list[str]:
    lines = [
        f"- date (UTC): {env.get('date')}",
        f"- device: **{env.get('device_name')}**" + (f" (GPU, driver {env.get('driver')}, CUDA {env.get('cuda')}, "
                                                      f"cc {env.get('compute_capability')})"
                                                      if env.get("device") == "cuda" else
                                                      f" (CPU only, {env.get('cpu_count')} logical cores)"),
        f"- CPU: {env.get('cpu')}, {env.get('cpu_count')} logical cores; torch threads {env.get('torch_threads')}",
        f"- libraries: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, onnx {env.get('onnx')}, "
        f"tensorrt {env.get('tensorrt') or 'not installed'}"
        + (f" (tensorrt_rtx {env['tensorrt_rtx']})" if env.get("tensorrt_rtx") else "")
        + f", numpy {env.get('numpy')}, Python {env.get('python')}",
        f"- platform: {env.get('platform')}",
        f"- load average at start (1/5/15 min): {env.get('loadavg')}",
        f"- command: `{env.get('command')}`",
    ]
    return lines


def _backend_section(key: tuple[str, str], recs: list[dict], plots: dict[str, Path], md_dir: Path) -> list[str]:
    env = recs[0].get("env") or {}
    model = next((r.get("model") for r in recs if r.get("model")), "config-f")
    out = [f"### {env.get('device_name')} — {model}, run {recs[0].get('run_id')}", ""]
    out += _env_lines(env) + [""]
    skipped = [r for r in recs if r.get("size") is None]
    cells = [r for r in recs if r.get("size") is not None]
    for size in sorted({r["size"] for r in cells}):
        out += [f"**{size}×{size} px** (latency per call of `batch` images; speed-up = torch-fp32 median / "
                "this median, same interleaved run)", "",
                "| backend | batch | median ms | p95 ms | p99 ms | n | img/s | speed-up vs torch-fp32 | "
                "PSNR dB (min) | peak mem MiB (call Δ) | load 1m | status |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        rows = sorted((r for r in cells if r["size"] == size), key=lambda r: (r["batch"], _order(r["backend"])))
        for r in rows:
            st = r.get("latency") or {}
            mem = r.get("memory") or {}
            status = r["status"] if not r.get("reason") else f"{r['status']}: {r['reason']}"
            if r["status"] == "failed":
                status = f"**FAILED** ({r.get('reason')})"
            fast = r["status"] == "ok"
            out.append(
                f"| {r['backend']} | {r['batch']} | {_f(st.get('median_ms'))} | {_f(st.get('p95_ms'))} | "
                f"{_f(st.get('p99_ms'))} | {st.get('n', '–')} | "
                f"{_f(r.get('img_per_s'), 2) if fast else '–'} | "
                f"{('×' + _f(r.get('speedup_vs_torch_fp32'), 2)) if fast and r.get('speedup_vs_torch_fp32') else '–'} | "
                f"{_f(r.get('psnr_db'))} ({_f(r.get('psnr_min_db'), 0)}) | "
                f"{_f(mem.get('peak_mib'), 0)} ({_f(mem.get('delta_mib'), 0)}) | {_f(r.get('loadavg_1m'))} | "
                f"{status} |")
        out.append("")
    if skipped:
        out += ["Skipped on this machine:", ""]
        out += [f"- `{r['backend']}`: {r.get('reason')}" for r in sorted(skipped, key=lambda r: _order(r["backend"]))]
        out.append("")
    for title, p in plots.items():
        out += [f"![{title}]({_rel(p, md_dir)})", ""]
    return out


def _order(name: str) -> int:
    from .backends import BACKENDS, NOT_IMPLEMENTED
    order = list(BACKENDS) + list(NOT_IMPLEMENTED)
    return order.index(name) if name in order else len(order)


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p)


def _server_section(key: tuple[str, str], recs: list[dict], plots: dict[str, Path], md_dir: Path) -> list[str]:
    env = recs[0].get("env") or {}
    r0 = recs[0]
    out = [f"### {env.get('device_name')} — run {r0.get('run_id')}", ""]
    out += _env_lines(env)
    out += [f"- model: {r0.get('model') or 'given bundle'} at {r0.get('size')} px; {r0.get('seeds_per_request')} "
            f"image(s) per request, format {r0.get('format')}; server --max-batch {r0.get('max_batch')}, "
            f"--max-queue-delay-ms {r0.get('max_queue_delay_ms')}"]
    info = next((r for r in recs if r.get("test") == "model"), None)
    if info:
        out.append(f"- server backend: {info.get('backend')} (max batch {info.get('max_batch')}); in-process: "
                   f"{info.get('in_process_backend') or 'not run'}")
    out.append("")
    load = [r for r in recs if r.get("test") == "load"]
    by_c: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in load:
        by_c[r["concurrency"]][r["side"]] = r
    out += ["| concurrency | server p50 ms | p95 ms | p99 ms | img/s | errors | avg batch (metrics) | "
            "in-process p50 ms | in-process img/s | p50 server/in-process | img/s server/in-process |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(by_c):
        s = by_c[c].get("server", {})
        i = by_c[c].get("in-process", {})
        out.append(f"| {c} | {_f(s.get('p50_ms'))} | {_f(s.get('p95_ms'))} | {_f(s.get('p99_ms'))} | "
                   f"{_f(s.get('throughput_img_per_s'), 2)} | {s.get('error_count', '–')}"
                   f"{(' ' + str(s.get('errors'))) if s.get('error_count') else ''} | "
                   f"{_f(s.get('avg_batch_size'), 2)} | {_f(i.get('p50_ms'))} | "
                   f"{_f(i.get('throughput_img_per_s'), 2)} | "
                   f"{('×' + _f(s.get('p50_ratio_server_vs_inprocess'), 2)) if s.get('p50_ratio_server_vs_inprocess') else '–'} | "
                   f"{('×' + _f(s.get('throughput_ratio_server_vs_inprocess'), 2)) if s.get('throughput_ratio_server_vs_inprocess') else '–'} |")
    out.append("")
    for r in recs:
        if r.get("test") == "stream":
            extra = ""
            if r.get("frames_per_s_ratio_server_vs_inprocess"):
                extra = f" (×{_f(r['frames_per_s_ratio_server_vs_inprocess'], 2)} of in-process sequential calls)"
            out.append(f"- streaming ({r['side']}): {r.get('frames')} frames, {_f(r.get('frames_per_s'), 2)} frames/s, "
                       f"first frame after {_f(r.get('first_frame_ms'), 0)} ms{extra if r['side'] == 'server' else ''}")
    out.append("")
    for title, p in plots.items():
        out += [f"![{title}]({_rel(p, md_dir)})", ""]
    return out


def latest_device_checks(records: Iterable[dict]) -> dict[str, list[dict]]:
    """{GPU name: records of its most recent device-check run}; dry runs are not results and are left out."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "device-check" and not r.get("dry_run"):
            runs[r.get("run_id") or "?"].append(r)
    best: dict[str, tuple[str, list[dict]]] = {}
    for rs in runs.values():
        env = rs[0].get("env") or {}
        name, date = env.get("device_name") or "?", env.get("date", "")
        if name not in best or date > best[name][0]:
            best[name] = (date, rs)
    return {k: v[1] for k, v in sorted(best.items())}


def device_check_section(recs: list[dict]) -> list[str]:
    """One device-check run: device, command and date, then its steps, kernels, generator, ceilings and timings."""
    from .device.summary import (ceiling_lines, device_line, failure_lines, generator_lines, kernel_lines,
                                 timing_lines)
    env = recs[0].get("env") or {}
    summary = next((r for r in recs if r.get("step") == "summary"), {})
    out = [f"### {env.get('device_name')} — device check {env.get('run_id')}"
           + (" (CPU dry run)" if recs[0].get("dry_run") else ""), "",
           f"- date (UTC): {env.get('date')}; wall time {_f(summary.get('wall_s'), 0)} s; seed {env.get('seed')}; "
           f"sources sha256 {str(env.get('source_digest', '?'))[:16]}",
           f"- device: {device_line(recs)}",
           f"- command: `{env.get('command')}`",
           f"- result: **{'all checks passed' if summary.get('status') == 'ok' else 'FAILED'}**", "",
           "| step | status | seconds |", "|---|---|---:|"]
    out += [f"| {step} | {info.get('status')} | {_f(info.get('seconds'))} |"
            for step, info in (summary.get("steps") or {}).items()]
    for title, body in (("Kernels vs the reference (float64)", kernel_lines(recs)),
                        ("Whole generator", generator_lines(recs)), ("Measured ceilings", ceiling_lines(recs)),
                        ("Synthesis timings (CUDA events, median)", timing_lines(recs)),
                        ("Failures", failure_lines(recs))):
        if body:
            out += ["", f"**{title}**", "", *body]
    return out + [""]


# ----------------------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log2_ticks(ax, values) -> None:
    """Log-2 x axis labelled with the plain values (1, 2, 4, ...)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())


def _plain_log_y(ax) -> None:
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_backends(recs: list[dict], plots_dir: Path, slug: str) -> dict[str, Path]:
    plt = _plt()
    cells = [r for r in recs if r.get("size") is not None and r.get("latency")]
    if not cells:
        return {}
    sizes = sorted({r["size"] for r in cells})
    if len({r["batch"] for r in cells}) == 1:
        return _plot_backend_bars(cells, sizes, recs[0].get("env") or {}, plots_dir, slug)
    out = {}
    for what, ylabel, fname in (("latency", "median latency per call (ms), bar to p95", "latency_vs_batch"),
                                ("throughput", "images / s (batch / median)", "throughput_vs_batch")):
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            rs = [r for r in cells if r["size"] == size]
            for name in sorted({r["backend"] for r in rs}, key=_order):
                pts = sorted((r for r in rs if r["backend"] == name), key=lambda r: r["batch"])
                ok = [r for r in pts if r["status"] == "ok"]
                bad = [r for r in pts if r["status"] != "ok"]
                if ok:
                    x = [r["batch"] for r in ok]
                    if what == "latency":
                        y = [r["latency"]["median_ms"] for r in ok]
                        err = [[0] * len(ok), [r["latency"]["p95_ms"] - r["latency"]["median_ms"] for r in ok]]
                        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
                        color = line[0].get_color()
                    else:
                        y = [r["img_per_s"] for r in ok]
                        color = ax.plot(x, y, marker="o", label=name)[0].get_color()
                else:
                    color = None
                if bad:
                    xb = [r["batch"] for r in bad]
                    yb = [r["latency"]["median_ms"] if what == "latency" else r["batch"] / r["latency"]["median_ms"] * 1e3
                          for r in bad]
                    ax.scatter(xb, yb, marker="x", s=60, color=color or "red",
                               label=f"{name} (FAILED check)" if not ok else None)
            _log2_ticks(ax, [r["batch"] for r in rs])
            ax.set_yscale("log")
            _plain_log_y(ax)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{size}×{size} px")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        env = recs[0].get("env") or {}
        fig.suptitle(f"StyleGAN2 synthesis — {env.get('device_name')} ({env.get('date', '')[:10]})", fontsize=10)
        fig.tight_layout()
        path = plots_dir / f"{fname}_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[f"{what} vs batch ({env.get('device_name')})"] = path
    return out


def _plot_backend_bars(cells: list[dict], sizes: list[int], env: dict, plots_dir: Path, slug: str) -> dict[str, Path]:
    """One batch size only: grouped bars of images/s per resolution and backend (failed ones hatched, at 0)."""
    import numpy as np
    plt = _plt()
    batch = cells[0]["batch"]
    names = sorted({r["backend"] for r in cells}, key=_order)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(sizes) * len(names) / 2 + 2), 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(sizes))
    for i, name in enumerate(names):
        vals, hatches = [], []
        for size in sizes:
            r = next((c for c in cells if c["backend"] == name and c["size"] == size), None)
            vals.append(r["img_per_s"] if r and r["status"] == "ok" and r.get("img_per_s") else 0.0)
            hatches.append(r is not None and r["status"] == "failed")
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
        for bar, v, h in zip(bars, vals, hatches):
            if h:
                bar.set_hatch("xx")
            if v:
                ax.annotate(f"{v:.2g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{s}×{s} px" for s in sizes])
    ax.set_ylabel(f"images / s at batch {batch} (batch / median)")
    ax.set_title(f"StyleGAN2 synthesis — {env.get('device_name')} ({env.get('date', '')[:10]})", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = plots_dir / f"throughput_by_backend_{slug}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return {f"throughput by backend, batch {batch} ({env.get('device_name')})": p}


def plot_server(recs: list[dict], plots_dir: Path, slug: str) -> dict[str, Path]:
    plt = _plt()
    load = [r for r in recs if r.get("test") == "load"]
    if not load:
        return {}
    env = recs[0].get("env") or {}
    out = {}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for side, marker in (("server", "o"), ("in-process", "s")):
        rs = sorted((r for r in load if r["side"] == side and r.get("throughput_img_per_s") is not None),
                    key=lambda r: r["concurrency"])
        if rs:
            ax.plot([r["concurrency"] for r in rs], [r["throughput_img_per_s"] for r in rs], marker=marker,
                    label=f"{side} (gRPC, batched)" if side == "server" else "in-process (direct calls)")
    _log2_ticks(ax, [r["concurrency"] for r in load])
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"throughput vs concurrency — {env.get('device_name')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = plots_dir / f"server_throughput_vs_concurrency_{slug}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["server throughput vs concurrency"] = p

    fig, ax = plt.subplots(figsize=(6, 4.2))
    rs = sorted((r for r in load if r["side"] == "server" and r.get("p50_ms") is not None), key=lambda r: r["concurrency"])
    for q in ("p50", "p95", "p99"):
        ax.plot([r["concurrency"] for r in rs], [r[f"{q}_ms"] for r in rs], marker="o", label=f"server {q}")
    ri = sorted((r for r in load if r["side"] == "in-process" and r.get("p50_ms") is not None),
                key=lambda r: r["concurrency"])
    if ri:
        ax.plot([r["concurrency"] for r in ri], [r["p50_ms"] for r in ri], marker="s", linestyle="--",
                label="in-process p50")
    _log2_ticks(ax, [r["concurrency"] for r in load])
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title(f"latency vs concurrency — {env.get('device_name')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = plots_dir / f"server_latency_vs_concurrency_{slug}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["server latency vs concurrency"] = p
    return out


# ----------------------------------------------------------------------------------------------------------
# The document


def write_report(files: Iterable[str | Path], out_md: str | Path, plots_dir: str | Path,
                 make_plots: bool = True) -> list[Path]:
    """Write RESULTS.md and (unless make_plots is False) the plots; returns the plot paths."""
    records = read_jsonl(files)
    if make_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            make_plots = False  # tables only; `pip install matplotlib` (in the dev extra) for the plots
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    md_dir = out_md.parent
    backends = latest_runs(records, "backends")
    servers = latest_runs(records, "server")
    device_checks = latest_device_checks(records)
    has_gpu = any(k[0] == "cuda" for k in list(backends) + list(servers)) or bool(device_checks)
    written: list[Path] = []

    lines = ["# stylecast benchmark results", "",
             "_Generated by `stylecast bench report` from `benchmarks/results/*.jsonl` (the latest run of each kind "
             "and device); regenerate rather than edit. The raw records, one JSON object per line with the device, "
             "driver, library versions, command and date, are the source of truth._", "",
             "## Reproduce", "",
             "```bash",
             "make bench                                   # the default CPU set, a few minutes on 2 cores:",
             "stylecast bench backends --quick             #   config-f 256 px, batch 1,2,4,8: torch-fp32, torch-bf16, ort-cpu",
             "stylecast bench server --quick               #   small 128 px generator, concurrency 1..64, 6 s per level",
             f"{GPU_SWEEP}   # the full sweep (GPU)",
             f"{GPU_SERVER}",
             f"{DEVICE_CHECK}      # the GPU device check (README: 'GPU device check'), then",
             f"{DEVICE_INGEST}",
             "stylecast bench report                       # this file and benchmarks/plots/*.png",
             "```", "",
             "Useful flags: `--reps N --warmup N --max-time S` (in each cell a backend stops once its timed calls "
             "add up to S seconds, after `--min-reps` rounds), `--device cpu`, `--threads N`, `--compile-timeout S`, `--model small`, "
             "`--out FILE.jsonl`; `stylecast bench server --bundle DIR` serves an existing bundle, "
             "`--server HOST:PORT --model-name NAME --metrics-url URL` measures a running server.", ""]
    if not has_gpu:
        lines += ["> **No GPU was available when these results were recorded**, so the GPU sweep (PyTorch fp16/bf16 "
                  "and torch.compile on CUDA, ONNX Runtime CUDA, TensorRT fp32/fp16, the plugin kernels; H100/H200) "
                  f"is **not recorded yet**. On a GPU machine run the device check first (`{DEVICE_CHECK}`, "
                  f"then `{DEVICE_INGEST}` here), and where time allows `{GPU_SWEEP}` and `{GPU_SERVER}`, then "
                  "`stylecast bench report`; the GPU tables will appear here next to the CPU ones, with the "
                  "device name.", ""]
    notes = md_dir / NOTES_NAME
    if notes.is_file():
        lines += [f"## Notes on these results (hand-written, from `{NOTES_NAME}`)", "",
                  notes.read_text().strip(), ""]
    lines += ["## GPU device check", ""]
    if not device_checks:
        lines += [f"No GPU device check has been recorded yet. On a GPU machine run `{DEVICE_CHECK}` (estimated 4-6 "
                  f"minutes, capped at 7.5: builds, kernel checks, compute-sanitizer, whole generator, timings), then "
                  f"`{DEVICE_INGEST}` here; its tables appear in this section.", ""]
    for recs in device_checks.values():
        lines += device_check_section(recs)
    lines += ["## Backends", ""]
    if not backends:
        lines += ["(no backend results yet)", ""]
    for key, recs in backends.items():
        slug = _run_slug(key)
        plots = plot_backends(recs, plots_dir, slug) if make_plots else {}
        written += list(plots.values())
        lines += _backend_section(key, recs, plots, md_dir)
    lines += ["## Server", ""]
    if not servers:
        lines += ["(no server results yet)", ""]
    for key, recs in servers.items():
        slug = _run_slug(key)
        plots = plot_server(recs, plots_dir, slug) if make_plots else {}
        written += list(plots.values())
        lines += _server_section(key, recs, plots, md_dir)
    thr = ", ".join(f"{k} ≥ {v:.0f} dB" for k, v in PSNR_THRESHOLDS.items())
    lines += [
        "## Definitions", "",
        "- **Interleaving**: within one (resolution, batch) cell every backend runs once per round, each round "
        "starting from the next backend, so that load from other processes hits all of them alike; ratios "
        "(speed-up vs torch-fp32, server vs in-process) come from the same run. Absolute CPU figures on a shared "
        "machine are noisy; compare ratios.",
        "- **Latency**: one `run` call, batch images; `time.perf_counter` on the CPU, CUDA events on the current "
        "stream on a GPU (ONNX Runtime CUDA: wall clock around a synchronous IO-bound run). Inputs are on the "
        "device before the timer starts; outputs are copied back after it stops.",
        f"- **Percentiles**: numpy `{PERCENTILE_METHOD}` (Hyndman–Fan type 7) over the n timed calls; p95/p99 of "
        "a few calls are close to the maximum — n is in every row.",
        "- **img/s**: batch / median latency (steady state of one caller). Server: images of requests completed "
        "inside the window / window.",
        f"- **PSNR**: 10·log10({PSNR_PEAK:g}² / MSE) of the float image against torch-fp32 on the same latents "
        f"in the same run (images nominally in [-1, 1]). Minimum by precision: {thr}. A backend below it, or with "
        "non-finite output, is **FAILED** and gets no speed figure. fp32 backends run with TF32 off.",
        "- **Peak memory**: CPU — the process's resident-set high-water mark (VmHWM, reset before each call via "
        "/proc/self/clear_refs), in parentheses the call's own growth over the RSS before it (the process figure "
        "includes every loaded backend); GPU — `torch.cuda.max_memory_allocated` for PyTorch backends, device "
        "memory in use (cudaMemGetInfo) for ONNX Runtime / TensorRT.",
        "- **Server load**: closed loop, c clients on one gRPC channel over loopback, each waiting for its "
        "answer before sending the next request; no new request after the window; in-flight ones are awaited "
        "and count in the latency percentiles. Average batch size from the server's `stylecast_batch_size` "
        "histogram (delta over the level). In-process: the same bundle graphs through the serving classes, "
        "called from c threads without cross-request batching.",
        "- **Model**: config-f = rosinality `Generator(size, 512, 8, channel_multiplier=2)` with random weights "
        "(speed does not depend on the values; 256 px: 30.0 M parameters, 45 GMAC per image). `small` = "
        "`GeneratorConfig.tiny(resolution, w_dim=512, max_channels=64, min_channels=16, mapping_layers=8)`, used "
        "for the CPU server run so that a 2-core machine can serve 64 concurrent clients within seconds.",
        ""]
    out_md.write_text("\n".join(lines))
    return written
