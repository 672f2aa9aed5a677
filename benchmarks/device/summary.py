"""The device check's short markdown summary (summary.md) and the table it prints last, from its JSON records;
benchmarks/report.py renders the same sections into benchmarks/RESULTS.md."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable

from benchmarks.numbers import fmt as _f

FAILING = ("error", "failed", "incomplete")


def _g(x: Any) -> str:
    """A measured error or rate: three significant digits."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    return "∞" if math.isinf(x) else f"{x:.3g}"


def _by_step(records: Iterable[dict], step: str) -> list[dict]:
    return [r for r in records if r.get("step") == step]


def device_line(records: list[dict]) -> str:
    """One line naming the device, driver, CUDA, torch and nvcc of a run (from its facts and env)."""
    env = records[0].get("env", {}) if records else {}
    facts = next((r for r in _by_step(records, "facts") if r.get("name") == "device"), {})
    tf, smi, tools = facts.get("torch") or {}, facts.get("nvidia_smi") or {}, facts.get("tools") or {}
    if env.get("device") != "cuda" and not tf.get("cuda_available"):
        return f"{env.get('device_name', '?')} (CPU only), torch {tf.get('torch') or env.get('torch')}"
    return (f"{tf.get('device_name') or env.get('device_name')} (cc {tf.get('compute_capability')}, "
            f"{tf.get('sm_count')} SMs, {tf.get('memory_gib')} GiB, L2 {tf.get('l2_cache_mib')} MiB), driver "
            f"{smi.get('driver_version') or env.get('driver')}, torch {tf.get('torch')} (CUDA {tf.get('torch_cuda')}, "
            f"cuDNN {tf.get('cudnn')}), {tools.get('nvcc') or 'no nvcc'}")


def kernel_lines(records: list[dict]) -> list[str]:
    recs = [r for r in _by_step(records, "kernels") if r.get("precision")]
    if not recs:
        return []
    counts = Counter(r["status"] for r in recs)
    out = [f"{len(recs)} kernel cases: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "",
           "| precision | path | cases | worst rel L2 (case) | worst max rel (case) | tolerance rel L2 / max rel |",
           "|---|---|---:|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in recs:
        groups.setdefault((r["precision"], r.get("path", "?")), []).append(r)
    for (prec, path), rs in sorted(groups.items()):
        num = [r for r in rs if r.get("rel_l2") is not None]
        worst_l2 = max(num, key=lambda r: r["rel_l2"], default=None)
        worst_max = max(num, key=lambda r: r["max_rel"], default=None)
        tol = (rs[0].get("tolerances") or {})
        out.append(f"| {prec} | {path} | {len(rs)} | "
                   f"{_g(worst_l2 and worst_l2['rel_l2'])} ({worst_l2['name'] if worst_l2 else '–'}) | "
                   f"{_g(worst_max and worst_max['max_rel'])} ({worst_max['name'] if worst_max else '–'}) | "
                   f"{_g(tol.get('rel_l2'))} / {_g(tol.get('max_rel'))} |")
    others = [r for r in _by_step(records, "kernels") if not r.get("precision") and r["status"] != "planned"]
    out += [""] + [f"- {r['name']}: {r['status']}{(': ' + r['reason']) if r.get('reason') else ''}" for r in others]
    return out


def generator_lines(records: list[dict]) -> list[str]:
    recs = [r for r in _by_step(records, "generator") if r.get("precision")]
    if not recs:
        return []
    r0 = recs[0]
    out = [f"{r0.get('resolution')} px, batch {r0.get('batch')}, against {r0.get('against')}", "",
           "| impl | precision | max abs | rel L2 (tolerance) | PSNR dB (min) | status |",
           "|---|---|---:|---:|---:|---|"]
    for r in recs:
        out.append(f"| {r['impl']} | {r['precision']} | {_g(r.get('max_abs'))} | {_g(r.get('rel_l2'))} "
                   f"({_g(r.get('tolerance_rel_l2'))}) | {_f(r.get('psnr_db'))} ({_f(r.get('psnr_min_db'), 0)}) | "
                   f"{r['status']}{(': ' + r['reason']) if r.get('reason') else ''} |")
    return out


def ceiling_lines(records: list[dict]) -> list[str]:
    recs = _by_step(records, "ceilings")
    if not recs:
        return []
    out = ["| ceiling | size | median ms | rate |", "|---|---:|---:|---:|"]
    for r in recs:
        rate = f"{_g(r['tflops'])} TFLOP/s" if r.get("tflops") else f"{_g(r.get('gb_per_s'))} GB/s"
        size = f"{r['n']}³" if r.get("n") else f"{r.get('bytes', 0) / 2**30:.2f} GiB"
        out.append(f"| {r['name']} | {size} | {_f(r.get('median_ms'), 3)} | {rate} |")
    return out


def timing_lines(records: list[dict]) -> list[str]:
    cells = [r for r in _by_step(records, "timing") if r.get("size") is not None and r.get("latency")]
    other = [r for r in _by_step(records, "timing") if not (r.get("size") is not None and r.get("latency"))]
    out: list[str] = []
    if cells:
        out += ["| size | batch | backend | median ms | img/s | × eager fp32 | % fp16 TC peak | PSNR dB | status |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in sorted(cells, key=lambda r: (-r["size"], r["batch"])):
            sp = r.get("speedup_vs_torch_fp32")
            out.append(f"| {r['size']} | {r['batch']} | {r['backend']} | {_f(r['latency']['median_ms'], 2)} | "
                       f"{_f(r.get('img_per_s'), 1)} | {('×' + _f(sp, 2)) if sp else '–'} | "
                       f"{_f(r.get('pct_of_fp16_tc_peak'), 1)} | {_f(r.get('psnr_db'))} | "
                       f"{r['status']}{(': ' + r['reason']) if r.get('reason') else ''} |")
    for r in other:
        out.append(f"- {r['name']}: {r['status']}{(': ' + r['reason']) if r.get('reason') else ''}"
                   + (f" (compile {r['compile_s']:.0f} s)" if r.get("compile_s") else ""))
    return out


def failure_lines(records: list[dict], limit: int = 40) -> list[str]:
    bad = [r for r in records if r.get("status") in FAILING and r.get("step") != "summary"]
    lines = [f"- {r['step']}/{r['name']}: {r['status']}: {r.get('reason') or ''}" for r in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"- ... and {len(bad) - limit} more (see the JSON lines)")
    return lines


def render_summary(records: list[dict], step_info: dict[str, dict], wall_s: float, dry_run: bool) -> str:
    """summary.md of one run."""
    env = records[0].get("env", {}) if records else {}
    title = "stylecast device check" + (" (CPU dry run)" if dry_run else "")
    lines = [f"# {title}: {env.get('device_name', '?')}", "",
             f"- date (UTC): {env.get('date')}; wall time {wall_s:.0f} s; run {env.get('run_id')}; "
             f"seed {env.get('seed')}",
             f"- device: {device_line(records)}",
             f"- command: `{env.get('command')}`",
             f"- sources: sha256 {env.get('source_digest', '?')[:16]}", "",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s} | {i['status']} | {i['seconds']:.1f} |" for s, i in step_info.items()]
    for title, body in (("Kernels vs the reference (float64)", kernel_lines(records)),
                        ("Sanitizer", [f"- {r['name']}: {r['status']} (sanitizer errors {r.get('sanitizer_errors')}, "
                                       f"harness {r.get('harness_passed')} passed / {r.get('harness_failed')} failed)"
                                       for r in _by_step(records, "sanitizer") if r["status"] != "planned"]),
                        ("Whole generator", generator_lines(records)), ("Ceilings", ceiling_lines(records)),
                        ("Timings", timing_lines(records)), ("Failures", failure_lines(records)),
                        ("Planned on a GPU (not run here)",
                         [f"- {r['step']}/{r['name']}: {r.get('command') or r.get('reason')}"
                          for r in records if r.get("status") == "planned"])):
        if body:
            lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def console_table(records: list[dict], step_info: dict[str, dict], wall_s: float) -> str:
    """The short table printed last (what a device reply's output tail shows)."""
    lines = ["", "=" * 100, f"device check: {device_line(records)}"]
    for step, info in step_info.items():
        recs = _by_step(records, step)
        counts = Counter(r["status"] for r in recs)
        lines.append(f"  {step:<10s} {info['status']:<10s} {info['seconds']:7.1f} s   "
                     + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    cells = [r for r in _by_step(records, "timing") if r.get("size") is not None and r.get("latency")]
    for r in sorted(cells, key=lambda r: (-r["size"], r["batch"])):
        sp = r.get("speedup_vs_torch_fp32")
        lines.append(f"  {r['size']:>5d}px b{r['batch']:<3d} {r['backend']:<24s} {r['latency']['median_ms']:9.2f} ms "
                     f"{r.get('img_per_s') or 0:9.1f} img/s  x{sp or 0:5.2f}  "
                     f"{_f(r.get('pct_of_fp16_tc_peak'), 1):>6s}% peak  {r['status']}")
    lines += failure_lines(records, limit=15)
    lines.append(f"wall time {wall_s:.0f} s; {'FAILED' if any(r['status'] in FAILING for r in records) else 'all ok'}")
    return "\n".join(lines)
