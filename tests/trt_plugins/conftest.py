"""Fixtures for the trt_plugins tests: one cached CMake build per session, the ctypes emulator, the torch extension.

The CMake build lives in trt_plugins/build/ci (git-ignored) and is incremental: the first run compiles the CUDA
plugin for one architecture (about a minute on 2 cores; STYLECAST_CUDA_ARCHS overrides the default: the local GPU's
compute capability, else 90), later runs only relink what changed (seconds).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI_BUILD_DIR = ROOT / "trt_plugins" / "build" / "ci"


def _cuda_archs() -> str:
    """$STYLECAST_CUDA_ARCHS, else the local GPU's compute capability, else 90 (H100/H200): one arch keeps the
    compile short."""
    if os.environ.get("STYLECAST_CUDA_ARCHS"):
        return os.environ["STYLECAST_CUDA_ARCHS"]
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}{minor}"
    except Exception:  # no usable torch/CUDA: fall through to the default
        pass
    return "90"


def _run_build(extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "trt_plugins.build", "--build-dir", str(CI_BUILD_DIR), "--cuda-archs",
           _cuda_archs(), "-q", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"trt_plugins build failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def plugin_build() -> dict:
    """Artifacts of the CMake build: plugin (needs nvcc), plugin_emulated, emulator, harness (CPU only)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found on PATH: cannot build trt_plugins")
    spec_ok = importlib.util.find_spec("kernel_lens") is not None or os.environ.get("TENSORRT_INCLUDE_DIR") \
        or Path("/usr/include/x86_64-linux-gnu/NvInferRuntime.h").exists()
    if not spec_ok:
        pytest.skip("no TensorRT headers: `pip install kernel-lens==2.0.1` or set TENSORRT_INCLUDE_DIR")
    return _run_build([], timeout=900)


@pytest.fixture(scope="session")
def ci_build_args(plugin_build) -> list[str]:
    """The device check's --build-dir / --cuda-arch for the CI build above (a dry run then rebuilds nothing)."""
    return ["--build-dir", str(CI_BUILD_DIR), "--cuda-arch", _cuda_archs()]


@pytest.fixture(scope="session")
def emulator(plugin_build):
    """ctypes handle on libstylecast_emu.so (the real kernel source running on the CPU)."""
    from benchmarks.device.kernels import load_emulator

    return load_emulator(plugin_build["emulator"])


@pytest.fixture(scope="session")
def torch_ext(plugin_build):
    """The compiled `stylecast_ops_cuda` module: $STYLECAST_OPS_LIBRARY, else built here (minutes the first time;
    later an up-to-date check by ninja)."""
    path = os.environ.get("STYLECAST_OPS_LIBRARY")
    if not path:
        path = _run_build(["--torch-ext"], timeout=1800)["torch_ext"]
    loader = importlib.machinery.ExtensionFileLoader("stylecast_ops_cuda", path)
    spec = importlib.util.spec_from_file_location("stylecast_ops_cuda", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules.setdefault("stylecast_ops_cuda", module)
    return module
