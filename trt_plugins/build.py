"""Build the stylecast TensorRT plugin library (and, optionally, the PyTorch extension) for StyleGAN2 modulated conv.

    python -m trt_plugins.build                      # plugin library + CPU harness + CPU-emulation libs (CMake)
    python -m trt_plugins.build --cuda-archs 90      # one architecture only (CI: about half the compile time)
    python -m trt_plugins.build --torch-ext          # also the `stylecast_ops_cuda` PyTorch extension (slow)

TensorRT headers come from $TENSORRT_INCLUDE_DIR, else an installed TensorRT, else the `kernel-lens` package
(which ships the public TensorRT 10.14 headers). Without nvcc only the CPU targets are built.
Outputs go to trt_plugins/build/<name>/ (git-ignored); the last line printed is a JSON summary of the artifacts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_BUILD_DIR = ROOT / "build" / "release"
TORCH_EXT_NAME = "stylecast_ops_cuda"
DEFAULT_ARCHS = os.environ.get("STYLECAST_CUDA_ARCHS", "80;90")

_SYSTEM_TRT_DIRS = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/local/TensorRT/include",
                    "/usr/include")


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


def find_tensorrt_headers() -> Path | None:
    """Directory with NvInferRuntime.h: $TENSORRT_INCLUDE_DIR, an installed TensorRT, or kernel-lens's copy."""
    candidates: list[Path] = []
    if os.environ.get("TENSORRT_INCLUDE_DIR"):
        candidates.append(Path(os.environ["TENSORRT_INCLUDE_DIR"]))
    if os.environ.get("TENSORRT_ROOT"):
        candidates.append(Path(os.environ["TENSORRT_ROOT"]) / "include")
    candidates += [Path(d) for d in _SYSTEM_TRT_DIRS]
    # find_spec on a top-level package does not execute it (kernel_lens imports triton at import time).
    spec = importlib.util.find_spec("kernel_lens")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "include" / "tensorrt")
    for cand in candidates:
        if (cand / "NvInferRuntime.h").is_file():
            return cand
    return None


def find_nvcc() -> Path | None:
    """nvcc from $CUDACXX, $CUDA_HOME, PATH or /usr/local/cuda."""
    for env in ("CUDACXX",):
        if os.environ.get(env) and Path(os.environ[env]).is_file():
            return Path(os.environ[env])
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    which = shutil.which("nvcc")
    if which:
        return Path(which)
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda/bin/nvcc")
    return None


def find_cuda_home(nvcc: Path | None) -> Path | None:
    """The toolkit root (bin/nvcc + include/cuda_runtime.h); nvcc may be a wrapper script outside it."""
    candidates = [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if p]
    if nvcc is not None:
        candidates.append(nvcc.resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:
        if (cand / "bin" / "nvcc").is_file() and (cand / "include" / "cuda_runtime.h").is_file():
            return cand
    return None


def find_cuda_headers(nvcc: Path | None) -> Path | None:
    """A directory with cuda_fp16.h (the CPU-emulation targets need only headers)."""
    candidates: list[Path] = []
    if nvcc is not None:
        real = nvcc.resolve()
        candidates += [real.parent.parent / "include", Path("/usr/local/cuda/include")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            candidates.append(Path(home) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    site = Path(sysconfig.get_paths()["purelib"])
    candidates += [site / "nvidia" / "cu13" / "include", site / "nvidia" / "cuda_runtime" / "include"]
    for cand in candidates:
        if (cand / "cuda_fp16.h").is_file():
            return cand
    return None


ARCH_RE = re.compile(r"(\d)(\d)(a?)")


def parse_archs(archs: str) -> list[str]:
    """'80;90a' -> ['80', '90a']: compute capabilities without the dot, an optional 'a' for the arch-specific
    target (sm_90a: Hopper-only instructions such as wgmma; its code runs on that exact architecture only).

    Raises:
        BuildError: on anything else.
    """
    items = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not items or not all(ARCH_RE.fullmatch(a) for a in items):
        raise BuildError(f"--cuda-archs must look like '80;90' or '90a', got {archs!r}")
    return items


def cmake_archs(archs: str, ptx: bool = True) -> str:
    """'80;90' -> '80-real;90': SASS for every arch, PTX only for the newest (forward compatibility);
    ptx=False: SASS only ('90a' -> '90a-real', i.e. -gencode=arch=compute_90a,code=sm_90a)."""
    items = parse_archs(archs)
    return ";".join([f"{a}-real" for a in items[:-1]] + [items[-1] if ptx else f"{items[-1]}-real"])


def torch_arch_list(archs: str, ptx: bool = True) -> str:
    """'80;90' -> '8.0;9.0+PTX', '90a' -> '9.0a+PTX' (TORCH_CUDA_ARCH_LIST notation); ptx=False: no PTX."""
    out = []
    for a in parse_archs(archs):
        major, minor, suffix = ARCH_RE.fullmatch(a).groups()
        out.append(f"{major}.{minor}{suffix}")
    if ptx:
        out[-1] += "+PTX"
    return ";".join(out)


def gencode_flags(archs: str, ptx: bool = True) -> list[str]:
    """The nvcc -gencode flags both builds pass for `archs` (what the device check records)."""
    items = parse_archs(archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in items]
    if ptx:
        flags.append(f"-gencode=arch=compute_{items[-1]},code=compute_{items[-1]}")
    return flags


def _run(cmd: list[str], cwd: Path | None = None, quiet: bool = False) -> None:
    if not quiet:
        print("+ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").splitlines()[-40:]) if quiet else ""
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def build_cmake(build_dir: Path, archs: str, cuda: bool = True, emulation: bool = True, jobs: int | None = None,
                quiet: bool = False, ptx: bool = True) -> dict[str, str]:
    """Configure and build with CMake; returns {artifact name: path} for what was built."""
    cuda_archs = cmake_archs(archs, ptx)  # validate before touching the disk
    if shutil.which("cmake") is None:
        raise BuildError("cmake not found on PATH")
    trt = find_tensorrt_headers()
    if trt is None:
        raise BuildError("TensorRT headers not found: install TensorRT, `pip install kernel-lens==2.0.1`, "
                         "or set TENSORRT_INCLUDE_DIR")
    nvcc = find_nvcc() if cuda else None
    if cuda and nvcc is None:
        print("trt_plugins.build: nvcc not found; building the CPU targets only", file=sys.stderr)
    cuda_headers = find_cuda_headers(nvcc)
    build_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
           f"-DTENSORRT_INCLUDE_DIR={trt}", f"-DSTYLECAST_CUDA_ARCHS={cuda_archs}",
           f"-DSTYLECAST_BUILD_CUDA={'ON' if nvcc else 'OFF'}",
           f"-DSTYLECAST_BUILD_EMULATION={'ON' if emulation else 'OFF'}"]
    if nvcc is not None:
        cmd.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    if cuda_headers is not None:
        cmd.append(f"-DCUDA_INCLUDE_DIR={cuda_headers}")
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        cmd += ["-G", "Ninja"]
    _run(cmd, quiet=quiet)
    _run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2)], quiet=quiet)

    artifacts: dict[str, str] = {}
    for name, rel in (("plugin", "libstylecast_trt_plugins.so"), ("plugin_emulated", "libstylecast_trt_plugins_emu.so"),
                      ("emulator", "libstylecast_emu.so"), ("harness", "stylecast_plugin_harness"),
                      ("harness_gpu", "stylecast_plugin_harness_gpu")):
        if (build_dir / rel).exists():
            artifacts[name] = str(build_dir / rel)
    return artifacts


def build_torch_extension(build_dir: Path, archs: str, verbose: bool = True, ptx: bool = True) -> str:
    """Compile `stylecast_ops_cuda` with torch.utils.cpp_extension (ninja); returns the .so path."""
    cuda_home = find_cuda_home(find_nvcc())
    if cuda_home is None:
        raise BuildError("the PyTorch extension needs the CUDA toolkit (nvcc + headers); set CUDA_HOME")
    # cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = str(cuda_home)
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - torch is a project dependency
        raise BuildError(f"the PyTorch extension needs torch: {exc}") from exc
    # Without a GPU torch would guess the archs; pin them (and so the compile time).
    os.environ["TORCH_CUDA_ARCH_LIST"] = torch_arch_list(archs, ptx)
    out_dir = build_dir / "torch_ext"
    out_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=TORCH_EXT_NAME,
        sources=[str(ROOT / "src" / "torchExtension.cpp"), str(ROOT / "src" / "modulatedConv2dKernels.cu")],
        extra_include_paths=[str(ROOT / "include"), str(ROOT / "src")],
        extra_cflags=["-O3", "-std=c++20"],  # recent torch headers require C++20
        extra_cuda_cflags=["-O3", "-std=c++20", "-lineinfo"],
        build_directory=str(out_dir),
        verbose=verbose,
        is_python_module=True,
    )
    so = out_dir / f"{TORCH_EXT_NAME}.so"
    if not so.exists():
        raise BuildError(f"torch extension build produced no {so}")
    return str(so)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trt_plugins.build", description=__doc__.split("\n\n")[0],
        epilog="example: python -m trt_plugins.build --cuda-archs 90 --torch-ext",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help="CMake binary directory")
    parser.add_argument("--cuda-archs", default=DEFAULT_ARCHS,
                        help="compute capabilities without dots, ';'-separated, 'a' for an arch-specific target "
                             "such as 90a ($STYLECAST_CUDA_ARCHS)")
    parser.add_argument("--no-ptx", action="store_true",
                        help="SASS only: no PTX of the newest arch for forward compatibility")
    parser.add_argument("--no-cmake", action="store_true",
                        help="skip the CMake targets (with --torch-ext: the extension alone)")
    parser.add_argument("--no-cuda", action="store_true", help="CPU targets only (harness, emulation)")
    parser.add_argument("--no-emulation", action="store_true", help="skip the CPU harness and emulation libraries")
    parser.add_argument("--torch-ext", action="store_true", help="also build the stylecast_ops_cuda extension")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print compiler output only on failure")
    args = parser.parse_args(argv)

    start = time.monotonic()
    try:
        artifacts: dict[str, str] = {}
        if not args.no_cmake:
            artifacts = build_cmake(args.build_dir.resolve(), args.cuda_archs, cuda=not args.no_cuda,
                                    emulation=not args.no_emulation, jobs=args.jobs, quiet=args.quiet,
                                    ptx=not args.no_ptx)
        if args.torch_ext:
            artifacts["torch_ext"] = build_torch_extension(args.build_dir.resolve(), args.cuda_archs,
                                                           verbose=not args.quiet, ptx=not args.no_ptx)
    except BuildError as exc:
        print(f"trt_plugins.build: {exc}", file=sys.stderr)
        return 2
    artifacts["seconds"] = f"{time.monotonic() - start:.1f}"
    print(json.dumps(artifacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
