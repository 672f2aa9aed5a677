"""A restricted unpickler for NVlabs stylegan2-ada-pytorch `.pkl` files that never executes embedded code.

NVlabs pickles store each network as `torch_utils.persistence._reconstruct_persistent_obj(meta)` where meta
holds the module's *source code* and its state; the stock loader imports and runs that source. Here the
reconstructor is replaced by one that keeps only the class name and state, tensors are rebuilt from their
raw bytes by our own parser of torch's legacy storage format, and every other global is refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class UnsafePickleError(ValueError):
    """The pickle references something we will not construct (it could run code)."""


@dataclass
class PersistentObject:
    """What an NVlabs persistent class instance reduces to: its class name and its __dict__ state."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)
    module_src_len: int = 0  # size of the embedded source we ignored (for diagnostics only)

    def module(self, name: str) -> "PersistentObject | None":
        mods = self.state.get("_modules") or {}
        return mods.get(name)

    def children(self) -> dict[str, Any]:
        return dict(self.state.get("_modules") or {})

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flatten parameters and buffers of this object and its children into a dotted state dict."""
        out: dict[str, torch.Tensor] = {}
        for group in ("_parameters", "_buffers"):
            for k, v in (self.state.get(group) or {}).items():
                if v is not None:
                    out[prefix + k] = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        for name, child in self.children().items():
            if isinstance(child, PersistentObject):
                out.update(child.tensors(prefix + name + "."))
        return out


def _reconstruct_persistent_obj(meta: dict) -> PersistentObject:
    # Stands in for torch_utils.persistence._reconstruct_persistent_obj: the source is never compiled.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("unexpected persistent object record in pickle")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise UnsafePickleError("persistent object state is not a dict")
    return PersistentObject(class_name=str(meta.get("class_name")), state=dict(state),
                            module_src_len=len(meta.get("module_src") or ""))


class _EasyDict(dict):
    """Plain dict standing in for dnnlib.util.EasyDict."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


@dataclass
class _StorageRef:
    dtype: torch.dtype
    data: torch.Tensor | None = None  # 1-D tensor of dtype


class _StorageMetaUnpickler(pickle.Unpickler):
    """Reads the inner pickles of torch's legacy serialization: only storage type names are allowed."""

    def __init__(self, f, storages: dict[str, _StorageRef]):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise UnsafePickleError(f"refusing to load {module}.{name} inside a tensor record")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError("unexpected persistent id in tensor record")
        _, storage_type, key, _location, _numel = pid[:5]
        if storage_type not in _STORAGE_DTYPES:
            raise UnsafePickleError(f"unknown storage type {storage_type!r}")
        ref = self.storages.setdefault(str(key), _StorageRef(_STORAGE_DTYPES[storage_type]))
        return ref


def _load_from_bytes(b: bytes) -> _StorageRef:
    """Parse torch's legacy `torch.save(storage)` byte layout without executing anything.

    Layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(obj with storage persistent ids),
    pickle(list of storage keys), then per key: int64 element count + raw little-endian data.
    """
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafePickleError("tensor storage record is not bytes")
    f = io.BytesIO(b)
    storages: dict[str, _StorageRef] = {}
    try:
        for _ in range(3):  # magic number, protocol version, sys info: plain data
            _StorageMetaUnpickler(f, storages).load()
        obj = _StorageMetaUnpickler(f, storages).load()
        keys = _StorageMetaUnpickler(f, storages).load()
        for key in keys:
            ref = storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            itemsize = torch.empty((), dtype=ref.dtype).element_size()
            raw = f.read(count * itemsize)
            if count < 0 or len(raw) != count * itemsize:
                raise UnsafePickleError("truncated tensor data")
            ref.data = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if count else torch.empty(0, dtype=ref.dtype)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as exc:
        raise UnsafePickleError(f"corrupt tensor record: {exc}") from None
    if not isinstance(obj, _StorageRef) or obj.data is None:
        raise UnsafePickleError("tensor record holds no storage")
    return obj


def _rebuild_tensor_v2(storage: _StorageRef, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("tensor without a storage record")
    data = storage.data
    need = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if need > data.numel():
        raise UnsafePickleError("tensor view exceeds its storage")
    return torch.as_strided(data, tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, backward_hooks: Any = None) -> torch.Tensor:
    return data


def _rebuild_parameter_with_state(data: torch.Tensor, requires_grad: bool, backward_hooks: Any,
                                  state: Any) -> torch.Tensor:
    return data


def _codecs_encode(s: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles store bytes as latin-1 text; only that conversion is allowed.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"unexpected encoding {encoding!r} in pickle")
    return s.encode("latin-1")


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError("numpy subclass in pickle")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("object-typed numpy scalar in pickle")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _np_dtype(name: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(name)
    if dt.hasobject:
        raise UnsafePickleError("object-typed numpy array in pickle")
    return dt


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ALLOWED_GLOBALS and refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles use Python 2 names (__builtin__.set); translate them as pickle itself does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            if module.startswith("dnnlib.tflib"):
                raise UnsafePickleError("this is a TensorFlow StyleGAN pickle; only stylegan2-ada-pytorch "
                                        "pickles are supported") from None
            raise UnsafePickleError(f"refusing to load global {module}.{name}: the pickle would execute "
                                    "code that is not part of a StyleGAN checkpoint") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("unexpected persistent id in pickle")


def restricted_load(data: bytes | io.BufferedIOBase) -> Any:
    """Unpickle without executing code. Raises UnsafePickleError (a ValueError) on anything suspicious."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return RestrictedUnpickler(f).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, struct.error,
            ValueError, MemoryError) as exc:
        raise UnsafePickleError(f"corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None
