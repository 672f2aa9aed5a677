"""Bring a device check's JSON lines into benchmarks/results/ and regenerate benchmarks/RESULTS.md (with the device,
date and command of the run), after checking that they are one real GPU run of the device check.

    python -m benchmarks.device.ingest /work/.device/<call>/out/device-check.jsonl
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from benchmarks.harness import read_jsonl
from common.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


class IngestError(ValueError):
    """The file is not one complete GPU run of the device check."""


def validate(records: list[dict]) -> dict:
    """The run's env when `records` are one GPU run of the device check (not a dry run), else IngestError."""
    if not records:
        raise IngestError("no records")
    kinds = {r.get("kind") for r in records}
    if kinds != {"device-check"}:
        raise IngestError(f"not device-check records (kinds {sorted(map(str, kinds))})")
    runs = {r.get("run_id") for r in records}
    if len(runs) != 1:
        raise IngestError(f"{len(runs)} runs in one file; ingest them one at a time")
    if any(r.get("dry_run") for r in records):
        raise IngestError("a dry run (CPU, tiny shapes): its records are not results")
    env = records[0].get("env") or {}
    if env.get("device") != "cuda":
        raise IngestError(f"recorded on {env.get('device_name') or '?'} without a CUDA device")
    if not any(r.get("step") == "summary" for r in records):
        raise IngestError("the run has no summary record (it was cut off); rerun the check")
    return env


def result_name(env: dict) -> str:
    """device-check-<gpu>-<run id>.jsonl"""
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env.get("device_name", "gpu")).lower()).strip("-") or "gpu"
    return f"device-check-{gpu}-{env.get('run_id', 'run')}.jsonl"


def ingest(path: Path, results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD,
           plots: bool = True) -> Path:
    """Copy the run into results_dir (never overwriting) and regenerate results_md from every results file.

    Returns:
        the new results file.
    """
    from benchmarks.report import write_report

    records = read_jsonl([path])
    env = validate(records)
    dest = results_dir / result_name(env)
    if dest.exists():
        raise IngestError(f"{dest} exists: this run was ingested already")
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, Path(path).read_bytes())
    write_report(sorted(results_dir.glob("*.jsonl")), results_md, results_md.parent / "plots", make_plots=plots)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.device.ingest", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python -m benchmarks.device.ingest /work/.device/out/device-check.jsonl")
    p.add_argument("jsonl", type=Path, help="device-check.jsonl of one GPU run")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where benchmark records live")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the markdown report to regenerate")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib)")
    args = p.parse_args(argv)
    try:
        dest = ingest(args.jsonl, args.results_dir, args.results_md, plots=not args.no_plots)
    except (IngestError, OSError, ValueError) as exc:
        print(f"benchmarks.device.ingest: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dest} and regenerated {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
