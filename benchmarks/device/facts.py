"""Device facts for the device check: what nvidia-smi, PyTorch and the CUDA tools report (read-only queries: the
card's clocks, power limit and modes are only read, never set)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from typing import Any

from trt_plugins.build import find_nvcc

from .builds import cuobjdump

NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap", "clocks.sm", "clocks.max.sm",
                     "clocks.mem", "power.draw", "power.limit", "temperature.gpu", "pstate", "persistence_mode",
                     "mig.mode.current", "ecc.mode.current")
PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "triton", "tensorrt", "tensorrt_rtx_cu13")


def tool_output(argv: list[str], timeout: float = 30.0) -> tuple[int | None, str]:
    """(exit code, stdout + stderr) of a command; (None, why) when it cannot run."""
    if shutil.which(argv[0]) is None and "/" not in argv[0]:
        return None, f"{argv[0]} not found"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def nvidia_smi() -> dict[str, Any]:
    """The GPU as nvidia-smi reports it (first GPU), or {"error": why}."""
    rc, text = tool_output(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"])
    if rc != 0:
        return {"error": text[:300]}
    values = [v.strip() for v in text.splitlines()[0].split(",")]
    out: dict[str, Any] = dict(zip(NVIDIA_SMI_FIELDS, values))
    _, listing = tool_output(["nvidia-smi", "-L"])
    out["gpus"] = listing.splitlines()
    return out


def torch_facts() -> dict[str, Any]:
    """torch / CUDA / cuDNN versions and the properties of CUDA device 0 (None fields without a GPU)."""
    import torch
    out: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        return out
    props = torch.cuda.get_device_properties(0)
    out.update({
        "device_name": props.name, "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 2),
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        "shared_memory_per_block_optin_kib": (getattr(props, "shared_memory_per_block_optin", 0) // 1024) or None,
        "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported(),
    })
    return out


def tool_versions() -> dict[str, str | None]:
    """First line of each CUDA / build tool's version output, and the Python packages' versions."""
    nvcc = find_nvcc()
    tools = {"nvcc": [str(nvcc), "--version"] if nvcc else ["nvcc", "--version"],
             "compute-sanitizer": ["compute-sanitizer", "--version"], "cmake": ["cmake", "--version"],
             "ninja": ["ninja", "--version"], "g++": ["g++", "--version"]}
    obj = cuobjdump()
    tools["cuobjdump"] = [obj or "cuobjdump", "--version"]
    out: dict[str, str | None] = {}
    for name, argv in tools.items():
        rc, text = tool_output(argv)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if rc == 0 and lines:
            # nvcc and friends print the release on the last line, cmake and g++ on the first.
            out[name] = lines[-1].strip() if name in ("nvcc", "cuobjdump", "compute-sanitizer") else lines[0].strip()
        else:
            out[name] = None
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
