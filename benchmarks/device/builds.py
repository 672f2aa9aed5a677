"""The build step of the device check: the TensorRT plugin library with its GPU harness (CMake) and the PyTorch
extension (torch.utils.cpp_extension), both compiled by nvcc for the GPU found, side by side; then what nvcc
put in them (cuobjdump: SASS architectures, registers, spills).

The TensorRT headers the plugin needs come from trt_plugins.build.find_tensorrt_headers, else from a
kernel-lens wheel carried to the machine (it ships the public TensorRT 10.14 headers; no install needed).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from trt_plugins.build import find_tensorrt_headers, gencode_flags

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = ROOT / "trt_plugins" / "build" / "device"
KERNEL_LENS_HEADERS = "kernel_lens/include/tensorrt/"


def cuda_arch(capability: tuple[int, int] | None) -> str:
    """nvcc target for a compute capability: '90a' on Hopper (9.0: the arch-specific target, whose SASS may use
    wgmma and setmaxnreg), plain 'MN' elsewhere, '90a' when there is no GPU to ask."""
    if capability is None or tuple(capability) == (9, 0):
        return "90a"
    return f"{capability[0]}{capability[1]}"


def tensorrt_headers(build_dir: Path, wheel_dir: Path | None) -> tuple[Path | None, str]:
    """(directory with NvInferRuntime.h, where it came from); extracts a kernel-lens wheel's headers into
    build_dir when nothing is installed."""
    found = find_tensorrt_headers()
    if found is not None:
        return found, f"found at {found}"
    wheels = sorted(wheel_dir.glob("kernel_lens-*.whl")) if wheel_dir is not None and wheel_dir.is_dir() else []
    if not wheels:
        return None, (f"no TensorRT headers: no TensorRT, no kernel_lens package and no kernel_lens-*.whl in "
                      f"{wheel_dir} (pip download kernel-lens==2.0.1 there)")
    dest = build_dir / "tensorrt-include"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name in zf.namelist():
            if name.startswith(KERNEL_LENS_HEADERS) and name.endswith(".h"):
                (dest / Path(name).name).write_bytes(zf.read(name))
    if not (dest / "NvInferRuntime.h").is_file():
        return None, f"{wheels[-1].name} holds no {KERNEL_LENS_HEADERS}NvInferRuntime.h"
    return dest, f"extracted from {wheels[-1].name}"


def build_commands(build_dir: Path, arch: str, gpu: bool, torch_ext: bool) -> list[tuple[str, list[str]]]:
    """The trt_plugins.build invocations: (name, argv).

    gpu: the plugin library + GPU harness for `arch` only, SASS only (-gencode=arch=compute_90a,code=sm_90a on
    Hopper), no CPU emulation targets; else the CI build (CPU emulation + harness, and the CUDA library when
    nvcc is present). torch_ext: also the PyTorch extension, in its own process, concurrently.
    """
    base = [sys.executable, "-m", "trt_plugins.build", "--build-dir", str(build_dir), "--cuda-archs", arch, "-q"]
    cmds = [("cmake", base + (["--no-ptx", "--no-emulation"] if gpu else []))]
    if torch_ext:
        cmds.append(("torch_ext", base + ["--no-ptx", "--no-cmake", "--torch-ext"]))
    return cmds


def run_builds(cmds: list[tuple[str, list[str]]], env: dict[str, str], log_path: Path,
               timeout_s: float) -> dict[str, dict[str, Any]]:
    """Run the build commands concurrently (each in its own process group), appending their output to log_path.

    Returns:
        {name: {"status": ok|error|timeout, "seconds", "artifacts" (trt_plugins.build's JSON line), "reason"}}.
    """
    import json

    procs = {}
    logs = {}
    for name, argv in cmds:
        logs[name] = log_path.with_name(f".{log_path.name}.{name}")
        procs[name] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(logs[name], "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True), time.monotonic())
    deadline = time.monotonic() + timeout_s
    out: dict[str, dict[str, Any]] = {}
    for name, (proc, t0) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - t0
        text = logs[name].read_text(errors="replace")
        logs[name].unlink()
        with open(log_path, "a") as f:
            f.write(f"===== {name}: {' '.join(dict(cmds)[name])}\n{text}\n")
        lines = text.strip().splitlines()
        if proc.returncode == 0 and lines:
            try:
                out[name] = {"status": "ok", "seconds": seconds, "artifacts": json.loads(lines[-1]), "reason": ""}
                continue
            except json.JSONDecodeError:
                pass
        reason = "timed out" if proc.returncode == -signal.SIGKILL else f"exit code {proc.returncode}"
        tail = " | ".join(line.strip() for line in lines[-3:])[:600]
        out[name] = {"status": "timeout" if proc.returncode == -signal.SIGKILL else "error", "seconds": seconds,
                     "artifacts": {}, "reason": f"{reason}: {tail}"}
    return out


def cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program (cuobjdump, compute-sanitizer) from PATH, next to nvcc, or in $CUDA_HOME/bin or
    /usr/local/cuda/bin."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    dirs = [Path(nvcc).resolve().parent] if nvcc else []
    dirs += [Path(home) / "bin" for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if home]
    return next((str(d / name) for d in dirs if (d / name).is_file()), None)


def cuobjdump() -> str | None:
    """cuobjdump, wherever cuda_tool finds it."""
    return cuda_tool("cuobjdump")


_RES_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def inspect_binary(path: str) -> dict[str, Any]:
    """SASS architectures in a library and each kernel's registers / stack / shared memory (cuobjdump).

    Returns:
        {"sass": ["sm_90a", ...], "kernels": {short name: {reg, stack, shared, local}}, "spilling": [names]}
        or {"error": why}.
    """
    tool = cuobjdump()
    if tool is None:
        return {"error": "cuobjdump not found (it ships with the CUDA toolkit)"}
    try:
        elf = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True, timeout=60)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"cuobjdump failed: {exc}"}
    sass = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", elf.stdout)))
    kernels = {}
    for mangled, reg, stack, shared, local in _RES_RE.findall(res.stdout):
        m = re.search(r"(weightSquareKernel|demodKernel|convKernelWmma|convKernel|blurEpilogueKernel|toRgbKernel)",
                      mangled)
        # Template arguments from the mangled name: the I/O type and convKernel*'s kRAW flag (Lb1E: up = 2 scratch).
        key = (f"{m.group(1)}{'_raw' if 'Lb1E' in mangled else ''}<{'half' if '6__half' in mangled else 'float'}>"
               if m else mangled[:60])
        kernels[key] = {"reg": int(reg), "stack": int(stack), "shared": int(shared), "local": int(local)}
    return {"sass": sass, "kernels": kernels, "spilling": sorted(k for k, v in kernels.items() if v["local"] or
                                                                 v["stack"])}


def describe_flags(arch: str) -> list[str]:
    """The -gencode flags both libraries are built with (SASS only)."""
    return gencode_flags(arch, ptx=False)
