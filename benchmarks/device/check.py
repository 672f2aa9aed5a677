"""The device check: one command that builds, checks and times stylecast's CUDA path (the fused StyleGAN2 kernels,
Karras et al., 2020) on a bare GPU machine, writing JSON lines and a markdown summary into one folder.

    python3 -m benchmarks.device --out DIR                       # on a GPU: every step, about 6-8 minutes
    python3 -m benchmarks.device --out DIR --dry-run             # on a CPU: tiny shapes, the plan, no CUDA
    python3 -m benchmarks.device --out DIR --steps kernels,timing  # only some steps (a rerun of what failed)

Steps (in this order): facts, build, kernels, sanitizer, generator, ceilings, timing. A step that fails or
raises is recorded and the check goes on; the exit code is 1 when anything failed, errored or was cut by a time
budget, 2 for bad arguments. It needs only the machine's own python3 with torch and numpy, nvcc, cmake and
(for the plugin) TensorRT headers, which a carried kernel-lens wheel provides.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import JsonlWriter, environment
from common.files import atomic_write_bytes, sha256_file

from . import builds, kernels
from .summary import console_table, render_summary

ROOT = Path(__file__).resolve().parents[2]
JSONL_NAME = "device-check.jsonl"
SUMMARY_NAME = "summary.md"
BUILD_LOG = "build.log"
SANITIZER_LOG = "sanitizer.log"
RECORD_KIND = "device-check"

#: step -> (what it does, default time budget in seconds)
STEPS: dict[str, tuple[str, float]] = {
    "facts": ("nvidia-smi, driver, torch / CUDA / cuDNN versions, SM count, tool versions", 30),
    "build": ("nvcc builds of the TensorRT plugin library (+ GPU harness) and the PyTorch extension for this GPU "
              "(sm_90a on H100/H200), concurrently; cuobjdump of what they hold", 240),
    "kernels": ("every kernel variant vs the reference op in float64 at config-f shapes (fp32, fp16; up=1, up=2, "
                "to-RGB; batch 1..8) and odd shapes, poisoned outputs and workspace, STYLECAST_STRICT_OPS=1; "
                "the dispatcher and DualStyleGAN under strict ops", 150),
    "sanitizer": ("compute-sanitizer memcheck of the plugin's enqueue() on small cases (GPU harness)", 90),
    "generator": ("the whole 1024 px generator, fused vs reference, both vs float64: max abs, rel L2, PSNR", 60),
    "ceilings": ("measured peaks: 8192^3 matmul in fp16 / bf16 / fp32 and a 4 GiB device copy", 30),
    "timing": ("1024 and 256 px synthesis at batch 1, 8, 32: eager fp32 (TF32 off), fp16, bf16 autocast, "
               "torch.compile, fused kernels (eager and CUDA graphs): ms, img/s, speed-up, % of the fp16 "
               "tensor-core peak", 200),
}
STEP_ORDER = tuple(STEPS)
NEEDS_BUILD = {"kernels", "sanitizer", "generator", "timing"}
# Worst first: a step's status is the worst of its records.
STATUS_ORDER = ("error", "failed", "incomplete", "ok", "skipped", "planned", "info")
FAILING = {"error", "failed", "incomplete"}


@dataclass
class Options:
    """What one device check runs (see the CLI help for each)."""

    out: Path
    dry_run: bool = False
    steps: list[str] = field(default_factory=lambda: list(STEP_ORDER))
    budget_s: float = 450.0
    tolerance_scale: float = 1.0
    seed: int | None = None
    build_dir: Path | None = None
    cuda_arch: str | None = None
    wheel_dir: Path = ROOT / ".whl"
    sizes: list[int] = field(default_factory=lambda: [1024, 256])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    kernel_batches: list[int] = field(default_factory=lambda: list(range(1, 9)))
    kernel_cases: list[str] = field(default_factory=list)
    sanitizer_tools: list[str] = field(default_factory=lambda: ["memcheck"])
    cell_time_s: float = 1.0
    compile: bool = True


def source_digest() -> str:
    """sha256 over the sources the check exercises (kernels, bindings, ops, networks, this package), so a
    recorded result can be matched to the code it ran."""
    patterns = ["trt_plugins/src/*", "trt_plugins/include/**/*.h", "trt_plugins/harness/*",
                "trt_plugins/CMakeLists.txt", "trt_plugins/build.py", "training/ops/*.py", "training/networks/*.py",
                "benchmarks/device/*.py", "benchmarks/harness.py", "benchmarks/backends.py", "benchmarks/sweep.py"]
    files = sorted({p for pat in patterns for p in ROOT.glob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(ROOT)}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


class DeviceCheck:
    """Runs the selected steps under their budgets and records every result (see the module docstring)."""

    def __init__(self, opts: Options, command: list[str]):
        import torch

        self.opts = opts
        self.t0 = time.monotonic()
        self.deadline = self.t0 + opts.budget_s
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
        self.cuda = torch.cuda.is_available() and not opts.dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.build_dir = Path(opts.build_dir or builds.DEFAULT_BUILD_DIR).resolve()
        self.digest = source_digest()
        env = environment(command)
        env.update(run_id=self.run_id, dry_run=opts.dry_run, source_digest=self.digest, seed=self.seed)
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = JsonlWriter(self.out / JSONL_NAME, env)
        self.records: list[dict[str, Any]] = []
        self.artifacts: dict[str, str] = {}
        self.ran: set[str] = set()
        self.step_info: dict[str, dict[str, Any]] = {}
        self.ceilings: dict[str, dict[str, Any]] = {}
        self.compile_jobs = None
        self.compile_deadline = 0.0
        self.background = None

    # ------------------------------------------------------------------------------------------------------
    # Records and output

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {msg}", flush=True)

    def record(self, step: str, name: str, status: str, **fields: Any) -> dict[str, Any]:
        """One JSON line: {schema, kind, run_id, dry_run, step, name, status, reason, ..., env}."""
        reason = fields.pop("reason", "") or ""
        fields.pop("status", None)
        doc = self.writer.write(RECORD_KIND, {"run_id": self.run_id, "dry_run": self.opts.dry_run, "step": step,
                                              "name": name, "status": status, "reason": reason, **fields})
        self.records.append(doc)
        if status in FAILING:
            self.log(f"{step}/{name}: {status.upper()} {reason}")
        return doc

    def plan(self) -> list[dict[str, Any]]:
        """What a GPU run of the selected steps does: commands, case counts, the timing matrix, budgets."""
        arch = self._gpu_arch()
        steps = []
        for step in self.opts.steps:
            entry: dict[str, Any] = {"step": step, "what": STEPS[step][0], "budget_s": STEPS[step][1]}
            if step == "build":
                entry["commands"] = [" ".join(argv) for _, argv in
                                     builds.build_commands(self.build_dir, arch, gpu=True, torch_ext=True)]
                entry["gencode"] = builds.describe_flags(arch)
            elif step == "kernels":
                cases = kernels.odd_cases() + kernels.config_f_cases(1024, tuple(self.opts.kernel_batches))
                entry["cases"] = 2 * len(cases)
                entry["layers"] = sorted({c.name.rsplit("_b", 1)[0] for c in cases if "_b" in c.name})
            elif step == "sanitizer":
                entry["commands"] = [f"compute-sanitizer --tool {t} --error-exitcode 99 "
                                     f"{self.build_dir}/stylecast_plugin_harness_gpu "
                                     f"{self.build_dir}/libstylecast_trt_plugins.so --enqueue"
                                     for t in self.opts.sanitizer_tools]
            elif step == "timing":
                from .timing import TIMED
                entry["matrix"] = {"sizes": self.opts.sizes, "batches": self.opts.batches, "backends": list(TIMED)}
            steps.append(entry)
        return steps

    # ------------------------------------------------------------------------------------------------------
    # Running

    def run(self) -> int:
        """Every selected step in order; returns the exit code (0 all good, 1 anything failed)."""
        os.environ["STYLECAST_STRICT_OPS"] = "1"
        if self.cuda:
            _no_tf32()  # fp32 means fp32 in every reference and fp32 backend (cuDNN defaults to TF32 convolutions)
        plan = self.plan()
        self.record("plan", "plan", "info", steps=plan, device=self.device, tolerance_scale=self.opts.tolerance_scale)
        if self.opts.dry_run:
            self.log("dry run: CPU only, tiny shapes. On a GPU this check would run:")
            for entry in plan:
                print(_describe_plan(entry), flush=True)
        if "timing" in self.opts.steps and self.cuda and self.opts.compile:
            self._start_compile_jobs()
        for step in STEP_ORDER:
            if step in self.opts.steps and step not in self.ran:
                self._run_step(step)
        if self.background is not None:
            self.background.wait(time.monotonic())  # kills what is still compiling
        return self._finish()

    def _run_step(self, step: str, why: str = "") -> None:
        self.ran.add(step)
        left = self.deadline - time.monotonic()
        start = len(self.records)
        t0 = time.monotonic()
        if left < 5:
            self.record(step, step, "incomplete", reason=f"not run: the check's {self.opts.budget_s:.0f} s budget "
                                                         "was used up")
        else:
            budget = min(STEPS[step][1], left)
            self.log(f"step {step}{f' ({why})' if why else ''}: budget {budget:.0f} s")
            try:
                getattr(self, f"step_{step}")(time.monotonic() + budget)
            except Exception as exc:  # noqa: BLE001 - a broken step is a result; the check goes on
                tb = traceback.format_exc().strip().splitlines()
                self.record(step, f"{step}_raised", "error", reason=f"{type(exc).__name__}: {exc}"[:500],
                            traceback=tb[-12:])
        recs = self.records[start:]
        status = min((r["status"] for r in recs), key=STATUS_ORDER.index, default="ok")
        self.step_info[step] = {"status": status, "seconds": time.monotonic() - t0, "records": len(recs)}
        self.log(f"step {step}: {status} in {time.monotonic() - t0:.1f} s")

    def _finish(self) -> int:
        wall = time.monotonic() - self.t0
        failing = [r for r in self.records if r["status"] in FAILING]
        self.record("summary", "summary", "failed" if failing else "ok", wall_s=wall, steps=self.step_info,
                    failing=[f"{r['step']}/{r['name']}" for r in failing][:200])
        text = render_summary(self.records, self.step_info, wall, self.opts.dry_run)
        atomic_write_bytes(self.out / SUMMARY_NAME, text.encode())
        print(console_table(self.records, self.step_info, wall), flush=True)
        return 1 if failing else 0

    def _ensure_built(self, step: str, needed: list[str]) -> bool:
        """Artifacts for `step`: reuse the build dir's when they match these sources, else run the build step."""
        self._adopt_artifacts()
        if all(k in self.artifacts for k in needed):
            return True
        if "build" not in self.ran:
            self._run_step("build", why=f"needed by {step}")
        missing = [k for k in needed if k not in self.artifacts]
        if missing:
            self.record(step, f"{step}_artifacts", "error", reason=f"the build did not produce {', '.join(missing)}")
            return False
        return True

    def _adopt_artifacts(self) -> None:
        import json
        stamp = self.build_dir / "device-build.json"
        if self.artifacts or not stamp.is_file():
            return
        info = json.loads(stamp.read_text())
        if info.get("source_digest") == self.digest and info.get("dry_run") == self.opts.dry_run:
            self.artifacts = {k: v for k, v in info.get("artifacts", {}).items() if Path(v).exists()}
            if "torch_ext" in self.artifacts:
                self._use_extension(self.artifacts["torch_ext"])

    def _use_extension(self, path: str) -> None:
        from training.ops import _dispatch
        os.environ["STYLECAST_OPS_LIBRARY"] = path
        _dispatch.reset_extension()

    # ------------------------------------------------------------------------------------------------------
    # Steps

    def step_facts(self, deadline: float) -> None:
        from .facts import nvidia_smi, tool_versions, torch_facts
        tf = torch_facts()
        smi = nvidia_smi()
        tools = tool_versions()
        if self.opts.dry_run or tf.get("cuda_available"):
            status, reason = "ok", ""
        else:
            status, reason = "error", ("no CUDA device visible (torch.cuda.is_available() is False): run it on a "
                                       "GPU machine, or use --dry-run")
        self.record("facts", "device", status, reason=reason, torch=tf, nvidia_smi=smi, tools=tools)

    def step_build(self, deadline: float) -> None:
        import json
        from trt_plugins.build import find_nvcc
        dry = self.opts.dry_run
        arch = self.opts.cuda_arch or builds.cuda_arch(_capability() if self.cuda else None)
        if not dry and find_nvcc() is None:
            self.record("build", "nvcc", "error", reason="nvcc not found (CUDACXX, CUDA_HOME, PATH, /usr/local/cuda)")
            return
        self.build_dir.mkdir(parents=True, exist_ok=True)
        headers, source = builds.tensorrt_headers(self.build_dir, self.opts.wheel_dir)
        self.record("build", "tensorrt_headers", "ok" if headers else "error", reason="" if headers else source,
                    path=str(headers) if headers else None, source=source)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   MAX_JOBS=str(os.cpu_count() or 2))
        if headers:
            env["TENSORRT_INCLUDE_DIR"] = str(headers)
        cmds = builds.build_commands(self.build_dir, arch, gpu=not dry, torch_ext=not dry)
        if not headers:
            cmds = [c for c in cmds if c[0] != "cmake"]
        if dry:
            gpu_arch = self._gpu_arch()
            for name, argv in builds.build_commands(self.build_dir, gpu_arch, gpu=True, torch_ext=True):
                self.record("build", f"gpu_{name}", "planned", command=" ".join(argv),
                            gencode=builds.describe_flags(gpu_arch))
        results = builds.run_builds(cmds, env, self.out / BUILD_LOG, deadline - time.monotonic())
        artifacts: dict[str, str] = {}
        for name, res in results.items():
            artifacts.update({k: v for k, v in res["artifacts"].items() if k != "seconds"})
            self.record("build", name, "ok" if res["status"] == "ok" else res["status"].replace("timeout", "failed"),
                        reason=res["reason"], seconds=res["seconds"], artifacts=res["artifacts"], arch=arch,
                        gencode=builds.describe_flags(arch) if not dry else None)
        for lib in ("plugin", "torch_ext"):
            if lib in artifacts and not dry:
                info = builds.inspect_binary(artifacts[lib])
                from trt_plugins.build import parse_archs
                missing = [f"sm_{a}" for a in parse_archs(arch) if f"sm_{a}" not in info.get("sass", [])]
                if "error" in info:
                    status, reason = "skipped", info["error"]
                else:
                    status = "failed" if missing else "ok"
                    reason = f"no {', '.join(missing)} SASS in {Path(artifacts[lib]).name}: {info['sass']}" \
                        if missing else ""
                self.record("build", f"sass_{lib}", status, reason=reason, **info)
        self.artifacts = artifacts
        if "torch_ext" in artifacts:
            self._use_extension(artifacts["torch_ext"])
            from training.ops import _dispatch
            ok = _dispatch.load_extension() is not None
            self.record("build", "torch_ext_import", "ok" if ok else "error",
                        reason="" if ok else f"cannot import the extension: {_dispatch._ext_error}")
        stamp = {"source_digest": self.digest, "dry_run": dry, "arch": arch, "artifacts": artifacts}
        atomic_write_bytes(self.build_dir / "device-build.json", json.dumps(stamp, indent=1).encode())

    def step_kernels(self, deadline: float) -> None:
        scale = self.opts.tolerance_scale
        if self.opts.dry_run:
            if not self._ensure_built("kernels", ["emulator"]):
                return
            lib = kernels.load_emulator(self.artifacts["emulator"])
            paths = [("fp32", kernels.emulated_runner(lib), ""), ("fp16", kernels.emulated_runner(lib, True), ""),
                     ("fp16", kernels.emulated_runner(lib, False), "_simt")]
            cases = [(c, p, run, suffix) for c in kernels.EMULATED_CASES for p, run, suffix in paths]
            device = "cpu"
            self.record("kernels", "gpu_cases", "planned", reason="the CUDA extension needs a GPU; the same kernel "
                        "source ran through the CPU emulation instead", count=self.plan_count("kernels"))
        else:
            if not self._require_cuda("kernels") or not self._ensure_built("kernels", ["torch_ext"]):
                return
            from training.ops import _dispatch
            ext = _dispatch.load_extension()
            run = kernels.cuda_runner(ext)
            all_cases = kernels.odd_cases() + kernels.config_f_cases(1024, tuple(self.opts.kernel_batches))
            cases = [(c, p, run, "") for c in all_cases for p in ("fp32", "fp16")]
            device = "cuda"
        for idx, (case, precision, runner, suffix) in enumerate(cases):
            name = f"{case.name}_{precision}{suffix}"
            if self.opts.kernel_cases and not any(sel in name for sel in self.opts.kernel_cases):
                continue
            if time.monotonic() > deadline:
                self.record("kernels", name, "incomplete", reason="the kernels step ran out of its time budget",
                            precision=precision)
                continue
            seed = self.seed + idx
            try:
                rec = kernels.check_case(case, precision, seed, runner, device, scale)
            except Exception as exc:  # noqa: BLE001 - one broken case does not stop the others
                self.record("kernels", name, "error", reason=f"{type(exc).__name__}: {exc}"[:500], precision=precision,
                            seed=seed, case=case.describe())
                continue
            rec.pop("name")
            self.record("kernels", name, rec.pop("status"), path="cuda" if device == "cuda" else
                        f"emulated{suffix or ('_wmma' if precision == 'fp16' else '')}", **rec)
        if not self.opts.dry_run and time.monotonic() < deadline and not self.opts.kernel_cases:
            self._dispatch_checks(scale)

    def plan_count(self, step: str) -> int | None:
        return next((e.get("cases") for e in self.plan() if e["step"] == step), None)

    def _dispatch_checks(self, scale: float) -> None:
        """training.ops reaches the kernel under STYLECAST_STRICT_OPS=1, and DualStyleGAN (whose ModRes blocks
        call bias_act, an op with no kernel) runs on CUDA under strict ops."""
        import torch

        from training.ops import _dispatch
        from training.ops.modulated_conv2d import modulated_conv2d
        case = kernels.LayerCase("dispatch", 2, 64, 48, 16, 16, 3, 2, True, 1, True, "lrelu", None, False)
        t = kernels.make_inputs(case, torch.float32, self.seed, "cuda")
        kw = dict(demodulate=True, up=2, resample_filter=t["filter"], noise=t["noise"], bias=t["bias"], act="lrelu")
        try:
            with torch.no_grad():
                auto = modulated_conv2d(t["x"], t["weight"], t["styles"], impl="auto", **kw)
            direct = _dispatch.extension().modulated_conv2d(t["x"], t["weight"], t["styles"], True, 2, t["filter"],
                                                            t["noise"], t["bias"], "lrelu", -1.0, -1.0, None)
            same = bool(torch.equal(auto, direct))
            self.record("kernels", "dispatch_auto_strict", "ok" if same else "failed",
                        reason="" if same else "impl='auto' did not run the kernel (its output differs from a "
                                               "direct call)")
        except Exception as exc:  # noqa: BLE001
            self.record("kernels", "dispatch_auto_strict", "error", reason=f"{type(exc).__name__}: {exc}"[:500])
        try:
            from training.dualstyle.model import DualStyleGAN
            from training.networks.stylegan2 import Generator, GeneratorConfig
            torch.manual_seed(self.seed)
            G = Generator(GeneratorConfig.tiny(resolution=32, w_dim=64, max_channels=64, min_channels=32))
            D = DualStyleGAN.from_generator(G, res_index=4).cuda().eval()
            ws = torch.randn(2, D.num_ws, D.w_dim, device="cuda")
            ex = torch.randn(2, D.num_ws, D.w_dim, device="cuda")
            with torch.no_grad():
                fast = D(ws, ex, impl="auto")
                ref = D(ws, ex, impl="ref")
            rel = float((fast.double() - ref.double()).norm() / ref.double().norm())
            tol = kernels.TOLERANCES["fp32"]["rel_l2"] * 10 * scale  # 8 modulated layers, each within 1e-5
            self.record("kernels", "dualstylegan_strict", "ok" if rel <= tol else "failed", rel_l2=rel, tolerance=tol,
                        reason="" if rel <= tol else f"rel_l2 {rel:.3g} > {tol:.3g} against impl='ref'")
        except Exception as exc:  # noqa: BLE001
            self.record("kernels", "dualstylegan_strict", "error", reason=f"{type(exc).__name__}: {exc}"[:500])

    def step_sanitizer(self, deadline: float) -> None:
        import re
        import subprocess
        log = self.out / SANITIZER_LOG
        if self.opts.dry_run:
            if not self._ensure_built("sanitizer", ["harness", "plugin_emulated"]):
                return
            for entry in self.plan():
                if entry["step"] == "sanitizer":
                    for cmd in entry["commands"]:
                        self.record("sanitizer", "gpu_sanitizer", "planned", command=cmd)
            argv = [self.artifacts["harness"], self.artifacts["plugin_emulated"], "--enqueue"]
            runs = [("harness_emulated", argv)]
        else:
            if not self._require_cuda("sanitizer") or not self._ensure_built("sanitizer", ["harness_gpu", "plugin"]):
                return
            tool = builds.cuda_tool("compute-sanitizer")
            if tool is None:
                self.record("sanitizer", "compute-sanitizer", "error", reason="compute-sanitizer not found")
                return
            runs = [(t, [tool, "--tool", t, "--error-exitcode", "99", self.artifacts["harness_gpu"],
                         self.artifacts["plugin"], "--enqueue"]) for t in self.opts.sanitizer_tools]
        for name, argv in runs:
            left = deadline - time.monotonic()
            if left < 5:
                self.record("sanitizer", name, "incomplete", reason="out of the step's time budget")
                continue
            t0 = time.monotonic()
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=left)
                text, rc = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                text, rc = f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {left:.0f} s)", None
            with open(log, "a") as f:
                f.write(f"===== {' '.join(argv)}\n{text}\n")
            errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
            counts = re.search(r"(\d+) passed, (\d+) failed", text)
            failed_checks = [ln for ln in text.splitlines() if ln.startswith("FAIL")]
            ok = rc == 0 and counts is not None and counts.group(2) == "0" and \
                (name == "harness_emulated" or (errors is not None and errors.group(1) == "0"))
            self.record("sanitizer", name, "ok" if ok else "failed", seconds=time.monotonic() - t0, exit_code=rc,
                        sanitizer_errors=int(errors.group(1)) if errors else None,
                        harness_passed=int(counts.group(1)) if counts else None,
                        harness_failed=int(counts.group(2)) if counts else None, failed_checks=failed_checks[:20],
                        reason="" if ok else (f"exit code {rc}; " + "; ".join(failed_checks[:3]))[:500])

    def step_generator(self, deadline: float) -> None:
        from training.networks.stylegan2 import GeneratorConfig

        from .generator import run_generator_check
        if self.opts.dry_run:
            cfg = GeneratorConfig.tiny(resolution=32, w_dim=32, max_channels=32, min_channels=16)
            self.record("generator", "gpu_generator", "planned", reason="the fused path needs a GPU",
                        resolution=1024, batch=2)
            fused = False
        else:
            if not self._require_cuda("generator") or not self._ensure_built("generator", ["torch_ext"]):
                return
            cfg = GeneratorConfig.rosinality(1024, 2)
            fused = True
        for rec in run_generator_check(cfg, 2, self.seed, self.device, fused, self.opts.tolerance_scale):
            self.record("generator", rec.pop("name"), rec.pop("status"), **rec)

    def step_ceilings(self, deadline: float) -> None:
        from .timing import measure_ceilings
        if not self.opts.dry_run and not self._require_cuda("ceilings"):
            return
        for rec in measure_ceilings(self.device):
            self.ceilings[rec["name"]] = rec
            self.record("ceilings", rec.pop("name"), "info", device=self.device, **rec)

    def step_timing(self, deadline: float) -> None:
        from benchmarks.backends import BenchContext

        from .timing import run_timings
        if not self.opts.dry_run:
            if not self._require_cuda("timing") or not self._ensure_built("timing", ["torch_ext"]):
                return
            import torch
            torch.backends.cudnn.benchmark = True
        if "matmul_fp16" not in self.ceilings and self.cuda:
            self.step_ceilings(deadline)
        # % of the fp16 tensor-core peak measured in this run; a dry run has no tensor cores, so its CPU fp32
        # matmul stands in (recorded as such) to exercise the arithmetic.
        peak_rec = self.ceilings.get("matmul_fp16") or (self.ceilings.get("matmul_fp32") if self.opts.dry_run else None)
        peak = (peak_rec or {}).get("tflops")
        self.record("timing", "peak", "info" if peak else "skipped", tflops=peak,
                    source=(peak_rec or {}).get("name"), reason="" if peak else "no ceilings measured in this run")
        if self.background is not None:
            # Leave at least half of the step for the cells; a compile still running then is given up.
            now = time.monotonic()
            jobs = self.background.wait(min(self.compile_deadline, now + 0.5 * (deadline - now)))
            for job in jobs:
                # The process's wall time, and inductor's compile time of the first call as it measured it.
                self.record("timing", job.name, "ok" if job.status == "ok" else "failed", reason=job.reason,
                            seconds=job.seconds, compile_s=job.result.get("compile_s"))
        model, sizes, batches = ("config-f", self.opts.sizes, self.opts.batches) if not self.opts.dry_run \
            else ("small", [16], [1, 2])
        exclude = {}
        if not self.cuda:
            exclude["torch-compile"] = ("dry run: inductor compiles for minutes on a CPU; on a GPU it compiles in "
                                        "the background from the start")
        elif not self.opts.compile:
            exclude["torch-compile"] = "left out (--no-compile)"

        def write(name: str, status: str, fields: dict[str, Any]) -> None:
            self.record("timing", name, status, **_without(fields, "status"))

        with tempfile.TemporaryDirectory(prefix="stylecast-device-") as work:
            # A size without a background compilation compiles in TorchCompile's own probe, bounded by what is left.
            ctx = BenchContext(work_dir=Path(work), device="auto" if self.cuda else "cpu", log=self.log,
                               compile_timeout_s=max(10.0, 0.5 * (deadline - time.monotonic())))
            run_timings(ctx, model, sizes, batches, peak, write, deadline,
                        cell_time_s=self.opts.cell_time_s, seed=self.seed % 1000, compiled=self.compile_jobs,
                        exclude=exclude)

    # ------------------------------------------------------------------------------------------------------

    def _gpu_arch(self) -> str:
        """The nvcc target of a GPU run: --cuda-arch, else the GPU's; a dry run plans for Hopper (90a)."""
        if self.opts.dry_run:
            return "90a"
        return self.opts.cuda_arch or builds.cuda_arch(_capability() if self.cuda else None)

    def _require_cuda(self, step: str) -> bool:
        if self.cuda:
            return True
        self.record(step, f"{step}_needs_cuda", "error", reason="no CUDA device: this step needs a GPU "
                                                                "(--dry-run runs its CPU version)")
        return False

    def _start_compile_jobs(self) -> None:
        from .timing import BackgroundJobs, compile_jobs
        budget = min(STEPS["timing"][1] + STEPS["build"][1], self.opts.budget_s * 0.7)
        self.compile_deadline = time.monotonic() + budget
        self.compile_jobs = compile_jobs("config-f", self.opts.sizes, self.opts.batches, "cuda", budget)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        jobs = [j for size in self.opts.sizes for j in self.compile_jobs.get(size, [])]
        self.background = BackgroundJobs(jobs, env=env).start()
        self.log(f"torch.compile: {len(jobs)} compilations started in the background (deadline {budget:.0f} s)")


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _capability() -> tuple[int, int] | None:
    import torch
    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None  # type: ignore


def _no_tf32() -> None:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _describe_plan(entry: dict[str, Any]) -> str:
    lines = [f"  {entry['step']:<9s} (budget {entry['budget_s']:.0f} s) {entry['what']}"]
    for cmd in entry.get("commands", []):
        lines.append(f"      $ {cmd}")
    if entry.get("gencode"):
        lines.append(f"      nvcc {' '.join(entry['gencode'])}")
    if entry.get("cases"):
        lines.append(f"      {entry['cases']} cases; layers {', '.join(entry['layers'])}")
    if entry.get("matrix"):
        m = entry["matrix"]
        lines.append(f"      sizes {m['sizes']} x batches {m['batches']} x {', '.join(m['backends'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _steps(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(bad) or repr(text)}; "
                                         f"choose from {', '.join(STEPS)}")
    return [s for s in STEP_ORDER if s in names]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shown defaults, and the epilog's step list and examples kept as written."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m benchmarks.device", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
        epilog="steps (default budget):\n" + "\n".join(f"  {k:<10s}({v[1]:.0f} s) {v[0]}" for k, v in STEPS.items())
               + "\n\nexamples:\n  python3 -m benchmarks.device --out $OUT\n"
               "  python3 -m benchmarks.device --out /tmp/dc --dry-run\n"
               "  python3 -m benchmarks.device --out $OUT --steps kernels,sanitizer --seed 1234\n"
               "then, where the results came back: python -m benchmarks.device.ingest DIR/device-check.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output folder (JSON lines, summary.md, logs)")
    p.add_argument("--dry-run", action="store_true", help="CPU only: tiny shapes, every step that needs no CUDA, "
                                                          "and the plan a GPU run would follow")
    p.add_argument("--steps", type=_steps, default=",".join(STEP_ORDER), help="comma-separated steps to run")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check in seconds "
                                                                 "(each step also has its own, listed below)")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every error tolerance (a check of the check: 1e-9 must make it fail)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random inputs (None: a fresh one, recorded)")
    p.add_argument("--build-dir", type=Path, default=builds.DEFAULT_BUILD_DIR, help="where the libraries are built")
    p.add_argument("--cuda-arch", default=None, help="nvcc target such as 90a or 89 (None: the GPU's, 90a on "
                                                     "Hopper and where there is no GPU)")
    p.add_argument("--wheel-dir", type=Path, default=ROOT / ".whl", help="folder searched for a kernel-lens wheel "
                                                                        "(TensorRT headers) when none is installed")
    p.add_argument("--sizes", type=_int_list, default="1024,256", help="timing resolutions")
    p.add_argument("--batches", type=_int_list, default="1,8,32", help="timing batch sizes")
    p.add_argument("--kernel-batches", type=_int_list, default="1,2,3,4,5,6,7,8", help="kernel-check batch sizes")
    p.add_argument("--kernel-cases", default="", help="only the kernel cases whose name contains one of these "
                                                      "comma-separated strings, e.g. a rerun of the failed ones: "
                                                      "up_1024_b8_fp16,odd_3")
    p.add_argument("--sanitizer-tools", default="memcheck", help="compute-sanitizer tools, comma-separated "
                                                                 "(memcheck, racecheck, initcheck, synccheck)")
    p.add_argument("--cell-time-s", type=float, default=1.0, help="timed seconds per backend and cell (after at "
                                                                  "least 5 timed calls)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the timings")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    tools = [t.strip() for t in args.sanitizer_tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in ("memcheck", "racecheck", "initcheck", "synccheck")]
    if bad or not tools:
        print(f"python3 -m benchmarks.device: unknown --sanitizer-tools {', '.join(bad) or '(none)'}", file=sys.stderr)
        return 2
    if args.cuda_arch is not None:
        from trt_plugins.build import BuildError, parse_archs
        try:
            parse_archs(args.cuda_arch)
        except BuildError:
            print(f"python3 -m benchmarks.device: --cuda-arch must look like 90a, 89 or 80;90, got "
                  f"{args.cuda_arch!r}", file=sys.stderr)
            return 2
    if not args.tolerance_scale > 0 or not args.budget_s > 0 or not args.cell_time_s > 0:
        print("python3 -m benchmarks.device: --tolerance-scale, --budget-s and --cell-time-s must be positive",
              file=sys.stderr)
        return 2
    if args.out.exists() and (args.out / JSONL_NAME).exists():
        print(f"python3 -m benchmarks.device: {args.out / JSONL_NAME} exists; give an empty --out folder",
              file=sys.stderr)
        return 2
    opts = Options(out=args.out, dry_run=args.dry_run, steps=args.steps, budget_s=args.budget_s,
                   tolerance_scale=args.tolerance_scale, seed=args.seed, build_dir=args.build_dir,
                   cuda_arch=args.cuda_arch, wheel_dir=args.wheel_dir, sizes=args.sizes, batches=args.batches,
                   kernel_batches=args.kernel_batches, sanitizer_tools=tools, cell_time_s=args.cell_time_s,
                   kernel_cases=[c.strip() for c in args.kernel_cases.split(",") if c.strip()],
                   compile=not args.no_compile)
    return DeviceCheck(opts, ["python3", "-m", "benchmarks.device", *argv]).run()

