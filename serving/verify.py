"""`stylecast export verify`, torch-free: a bundle's manifest and files, then the golden checks of its kind, run by
the same code the server runs before a bundle is READY (LoadedModel.golden_checks), thoroughly (every graph and
output, graph variants the server does not run) and on every TensorRT engine this machine can run.

Outcomes (VerifyReport.status, and the exit status of `stylecast export verify`):

    verified      0  every check ran here and passed
    FAILED        1  the bundle is invalid or a check is outside its tolerance
    NOT VERIFIED  3  nothing failed, but something that was asked for could not be checked here: a named ONNX Runtime
                     execution provider this onnxruntime does not have, or (engines "require" / "only") an engine
                     without its GPU / TensorRT flavour and version here

With engines "auto" (the default) an engine that cannot run here is reported as not checked, by name and reason,
and the summary says so ("verified, except 2 TensorRT engine(s) not checked here (<why>)").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from protos.manifest import ManifestError, load_manifest

from .backends import BackendError, SystemProbe, matching_engines, ort_available_providers, probe_system
from .errors import BundleRefused, ServingError
from .golden import Check
from .kinds import model_class
from .models import check_bundle_files

ENGINE_MODES = ("auto", "require", "only", "skip")
EXIT_VERIFIED, EXIT_FAILED, EXIT_NOT_VERIFIED = 0, 1, 3


@dataclass
class VerifyReport:
    """What verify found: problems (the bundle is invalid), checks (compared outputs, skipped ones included),
    `unverified` (what was asked for but could not be checked here) and why the skipped checks could not run."""

    bundle: Path
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    skip_reasons: list[str] = field(default_factory=list)  # why each skipped engine could not run here

    @property
    def ok(self) -> bool:
        """Nothing failed and everything asked for was checked."""
        return self.status == "verified"

    @property
    def failed(self) -> bool:
        return bool(self.problems) or any(not c.ok for c in self.checks)

    @property
    def skipped(self) -> list[Check]:
        """Checks that did not run here (engines without their GPU / TensorRT)."""
        return [c for c in self.checks if c.skipped]

    @property
    def status(self) -> str:
        if self.failed:
            return "FAILED"
        return "NOT VERIFIED" if self.unverified or not any(not c.skipped for c in self.checks) else "verified"

    @property
    def exit_code(self) -> int:
        return {"verified": EXIT_VERIFIED, "FAILED": EXIT_FAILED}.get(self.status, EXIT_NOT_VERIFIED)

    def summary(self) -> str:
        """The last line of `export verify`."""
        if self.status == "NOT VERIFIED":
            return f"{self.bundle}: NOT VERIFIED ({'; '.join(self.unverified) or 'nothing was checked'})"
        skipped = self.skipped
        if self.status == "verified" and skipped:
            return (f"{self.bundle}: verified, except {len(skipped)} TensorRT engine(s) not checked here "
                    f"({'; '.join(dict.fromkeys(self.skip_reasons))})")
        return f"{self.bundle}: {self.status}"


def verify_bundle(bundle: str | Path, providers: list[str] | None = None, engines: str = "auto",
                  probe: SystemProbe | None = None) -> VerifyReport:
    """Validate a bundle and run its kind's golden checks in ONNX Runtime and on its TensorRT engines.

    Args:
        providers: ONNX Runtime execution providers of the graph checks (default CPU); one this onnxruntime lacks
            makes the report NOT VERIFIED (ONNX Runtime would silently fall back to another).
        engines: "auto" check the engines that can run here, report the others as not checked; "require" every
            engine must be checked (and the bundle must have one); "only" engines only, as "require"; "skip" none.
        probe: what this machine can run (default: detected, TensorRT included unless engines="skip").
    Returns:
        the report (never raises for a bad bundle).
    """
    if engines not in ENGINE_MODES:
        raise ValueError(f"engines must be one of {ENGINE_MODES}, got {engines!r}")
    bundle = Path(bundle)
    report = VerifyReport(bundle)
    if not bundle.is_dir():
        report.problems.append(f"{bundle} is not a directory")
        return report
    try:
        manifest = load_manifest(bundle)
        cls = model_class(manifest["kind"])
    except (ManifestError, BundleRefused) as exc:
        report.problems.append(str(exc))
        return report
    report.problems += check_bundle_files(bundle, manifest)
    if report.problems:
        return report
    providers = list(providers or ["CPUExecutionProvider"])
    missing = [p for p in providers if p not in ort_available_providers()]
    if missing and engines != "only":
        report.unverified.append(f"execution provider {', '.join(missing)} not available here "
                                 f"(available: {', '.join(ort_available_providers())})")
        providers = [p for p in providers if p not in missing]
    if engines != "only" and providers:
        report.checks += _run(report, lambda: cls.load(bundle, manifest, "verify", backend="onnxruntime",
                                                       golden_check=False, providers=providers, warm=False,
                                                       check_files=False),
                              lambda model: model.golden_checks(thorough=True))
    if engines != "skip":
        _engine_checks(report, bundle, manifest, cls, engines, probe)
    return report


def _run(report: VerifyReport, load, checks) -> list[Check]:
    """Load a model (without its own golden check) and run `checks(model)`; a refusal becomes a problem."""
    try:
        return checks(load())
    except (BundleRefused, ServingError, BackendError) as exc:
        report.problems.append(str(exc))
    except Exception as exc:  # e.g. ONNX Runtime refusing golden arrays of the wrong shape: a bad bundle, one line
        report.problems.append(f"the golden checks could not run: {type(exc).__name__}: {exc}")
    return []


def engine_skip_reason(entry: dict, probe: SystemProbe) -> str | None:
    """Why an engine of a bundle cannot run on this machine (None: it can)."""
    if probe.compute_capability is None:
        return "no GPU/TensorRT runtime (no CUDA GPU found)"
    if probe.trt_flavour is None:
        return "no GPU/TensorRT runtime (TensorRT is not installed)"
    ok, why = matching_engines({"engines": [entry]}, probe, graph=str(entry.get("graph", "")))
    if ok:
        return None
    return why[0].split(": ", 1)[-1] if why else f"an engine of graph {entry.get('graph')!r}, not one this kind runs"


def _engine_checks(report: VerifyReport, bundle: Path, manifest: dict, cls, engines: str,
                   probe: SystemProbe | None) -> None:
    entries = manifest.get("engines") or []
    if not entries:
        if engines in ("require", "only"):
            report.unverified.append("the bundle has no TensorRT engines")
        return
    probe = probe or probe_system(with_tensorrt=True)
    for entry in entries:
        reason = engine_skip_reason(entry, probe)
        if reason is None:
            report.checks += cls.engine_checks(bundle, manifest, entry)
            continue
        report.checks.append(Check(f"engine.{entry.get('precision', '?')}", "*", math.nan, math.nan, True,
                                   f"skipped: {reason}; {entry.get('file')}", skipped=True))
        report.skip_reasons.append(reason)
        if engines in ("require", "only"):
            report.unverified.append(f"engine {entry['file']} was not checked ({reason})")
