"""Choosing between the reference ops and the compiled CUDA kernels (`impl="ref" | "cuda" | "auto"`).

Nothing is compiled at import. The compiled extension is the PyTorch binding that trt_plugins/ builds
(`stylecast_ops_cuda`); it is looked up lazily the first time a CUDA tensor asks for it.

Which ops have a kernel is declared here (KERNEL_OPS), not guessed from the extension: only the modulated
convolution has one. In the synthesis network, the hot path, bias + activation, noise, the x2 upsampling blur and
the to-RGB skip are fused into that kernel's epilogue. The remaining standalone uses of `bias_act` and `upfirdn2d`
are the mapping network's [N, 512] fully connected layers, the discriminator and every training step (which need
autograd, which the forward-only kernels do not provide) and DualStyleGAN's ModRes blocks (a cuDNN convolution
followed by one elementwise pass). For those the reference ops (cuDNN and PyTorch's elementwise kernels) are the
intended GPU path, not a fallback: a missing extension never concerns them, STYLECAST_STRICT_OPS=1 does not
apply to them, and `impl="cuda"` on them is an error that says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

IMPLS = ("ref", "cuda", "auto")
EXTENSION_MODULE = "stylecast_ops_cuda"
#: The ops stylecast_ops_cuda provides a kernel for (see the module docstring for why only these).
KERNEL_OPS = frozenset({"modulated_conv2d"})

_ext: ModuleType | None = None
_ext_error: str | None = None
_ext_loaded = False
_warned: set[str] = set()


def strict_ops() -> bool:
    """True when STYLECAST_STRICT_OPS=1: a missing fast op is an error instead of a silent fallback."""
    return os.environ.get("STYLECAST_STRICT_OPS", "0").lower() in ("1", "true", "yes")


def reset_extension() -> None:
    """Forget the loaded (or missing) extension, so the next CUDA call looks it up again, e.g. after
    STYLECAST_OPS_LIBRARY was pointed at a freshly built library."""
    global _ext, _ext_error, _ext_loaded
    _ext, _ext_error, _ext_loaded = None, None, False
    _warned.clear()


def load_extension() -> ModuleType | None:
    """Import the compiled CUDA extension once; returns None (and remembers why) when unavailable."""
    global _ext, _ext_error, _ext_loaded
    if not _ext_loaded:
        _ext_loaded = True
        path = os.environ.get("STYLECAST_OPS_LIBRARY")
        try:
            if path:
                # A pybind module at an explicit path: load it by file location, not via sys.path.
                spec = importlib.util.spec_from_file_location(EXTENSION_MODULE, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                _ext = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_ext)
            else:
                _ext = importlib.import_module(EXTENSION_MODULE)
        except Exception as exc:  # ImportError, OSError from a bad .so, ...
            _ext = None
            _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def use_cuda_impl(op: str, impl: str, *tensors: torch.Tensor | None) -> bool:
    """Decide whether `op` runs the compiled kernel.

    Args:
        op: op name for messages.
        impl: "ref", "cuda" or "auto".
        tensors: the op's inputs; the kernel only applies when they live on a CUDA device.
    Returns:
        True to call the extension, False to run the reference.
    Raises:
        ValueError: bad impl, impl="cuda" on an op without a kernel or on CPU tensors.
        RuntimeError: impl="cuda" (or "auto" under STYLECAST_STRICT_OPS=1) on CUDA tensors when the extension
            that should provide the kernel is missing.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return False
    if op not in KERNEL_OPS:
        if impl == "cuda":
            raise ValueError(f"{op}: there is no CUDA kernel for this op (stylecast_ops_cuda provides "
                             f"{', '.join(sorted(KERNEL_OPS))}); use impl='auto' or 'ref', which run it with "
                             "PyTorch's own CUDA kernels")
        return False  # a reference-only op: its reference is its GPU path, nothing is missing
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if impl == "cuda":
        if not on_cuda:
            raise ValueError(f"{op}: impl='cuda' needs CUDA tensors")
        if load_extension() is None or not hasattr(_ext, op):
            raise RuntimeError(f"{op}: the CUDA extension is not available ({_ext_error or 'op missing'}); "
                               "build it with `make plugins` or use impl='ref'")
        return True
    # auto
    if not on_cuda:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False  # the compiled kernels are forward-only; training differentiates through the reference
    if load_extension() is not None and hasattr(_ext, op):
        return True
    if strict_ops():
        raise RuntimeError(f"{op}: STYLECAST_STRICT_OPS=1 and the CUDA extension is not available "
                           f"({_ext_error or 'op missing'})")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"{op}: CUDA extension not available ({_ext_error or 'op missing'}); "
                      "using the reference implementation", RuntimeWarning, stacklevel=3)
    return False


def extension() -> ModuleType:
    """The loaded extension (call only after use_cuda_impl returned True)."""
    assert _ext is not None
    return _ext
