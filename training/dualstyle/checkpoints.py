"""DualStyleGAN (Yang et al., CVPR 2022) checkpoint formats: the official `generator.pt`, stylecast's native
directory, and the `*exstyle_code.npy` extrinsic-code files, read without executing any pickled code.

Official `generator.pt`: {"g_ema": state dict of the official DualStyleGAN module}, keys
    generator.*                     a full rosinality StyleGAN2 g_ema (training.checkpoints converts it)
    style.{1..L}.weight / .bias     the extrinsic structure mapping (style.0 is PixelNorm, no parameters)
    res.{j}.conv.0.weight           ModRes j = 0..res_index: ConvLayer = (EqualConv2d, FusedLeakyReLU)
    res.{j}.conv.1.bias             ... conv2.0.weight, conv2.1.bias, norm.style.weight [2C, w_dim],
                                    norm.style.bias, norm2.style.weight, norm2.style.bias
    res.{j}.weight / .bias          colour transforms j = res_index + 1 .. num_ws - 1
Training checkpoints of the official scripts also hold g, d, g_optim, d_optim, args, ada_aug_p: only g_ema
is read. `save_official` additionally stores `latent_avg` (the base generator's w_avg; the official scripts
only read g_ema) so that our -> official -> our round trips are bit-exact.

Exstyle codes: the official files are `np.save` of a dict {filename: float32 [1, num_ws, z_dim]}, i.e. a
pickle inside `.npy`. They are parsed here by hand: the .npy header with ast.literal_eval, the pickle with an
unpickler whose globals are our own stand-ins that only rebuild plain numeric arrays from their bytes.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load_bytes
from safetensors.numpy import save as safetensors_save_bytes

from common.files import atomic_directory, atomic_write_bytes
from training.checkpoints import (CheckpointError, _load_exact, _read_safetensors, _save_tensors, _torch_load_safe,
                                  generator_from_rosinality, generator_to_rosinality, infer_rosinality_config,
                                  read_native_config)
from training.networks.stylegan2 import GeneratorConfig

from .model import DualStyleConfig, DualStyleGAN

DUALSTYLE_FORMAT = "stylecast.dualstylegan/v1"
EXSTYLE_FORMAT = "stylecast.exstyle/v1"
WEIGHTS_FILE = "dualstylegan.safetensors"
MAX_EXSTYLE_BYTES = 1 << 30  # an exstyle file of 1000 codes at 1024 px is ~37 MB

# Top-level entries of official checkpoints: g_ema is read; the rest (training state) is ignored.
_OFFICIAL_TOP_KEYS = {"g_ema", "latent_avg", "g", "d", "g_optim", "d_optim", "args", "ada_aug_p"}


# ----------------------------------------------------------------------------------------------------------
# The key table


def official_key_map(cfg: DualStyleConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Official key -> (our key, shape) for the extrinsic path (everything but `generator.*`).

    The shapes are identical in both layouts; only the names differ.
    """
    w = cfg.w_dim
    m: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i in range(cfg.structure_layers):
        m[f"style.{i + 1}.weight"] = (f"structure_mapping.fc{i}.weight", (w, w))
        m[f"style.{i + 1}.bias"] = (f"structure_mapping.fc{i}.bias", (w,))
    for j in cfg.structure_indices:
        c = cfg.modres_channels(j)
        for theirs_conv, ours_conv in (("conv", "conv0"), ("conv2", "conv1")):
            m[f"res.{j}.{theirs_conv}.0.weight"] = (f"modres.{j}.{ours_conv}.weight", (c, c, 3, 3))
            m[f"res.{j}.{theirs_conv}.1.bias"] = (f"modres.{j}.{ours_conv}.bias", (c,))
        for theirs_norm, ours_norm in (("norm", "norm0"), ("norm2", "norm1")):
            m[f"res.{j}.{theirs_norm}.style.weight"] = (f"modres.{j}.{ours_norm}.affine.weight", (2 * c, w))
            m[f"res.{j}.{theirs_norm}.style.bias"] = (f"modres.{j}.{ours_norm}.affine.bias", (2 * c,))
    for k, j in enumerate(cfg.colour_indices):
        m[f"res.{j}.weight"] = (f"colour_transform.{k}.weight", (w, w))
        m[f"res.{j}.bias"] = (f"colour_transform.{k}.bias", (w,))
    return m


def dualstylegan_to_official(model: DualStyleGAN) -> dict[str, torch.Tensor]:
    """Our model's state -> the official `g_ema` state dict (generator.* in rosinality's layout)."""
    out = {f"generator.{k}": v for k, v in generator_to_rosinality(model.generator).items()}
    sd = model.state_dict()
    for theirs, (ours, _) in official_key_map(model.cfg).items():
        out[theirs] = sd[ours].detach().cpu().clone()
    return out


def dualstylegan_from_official(g_ema: Mapping[str, Any], latent_avg: torch.Tensor | None = None,
                               what: str = "checkpoint") -> DualStyleGAN:
    """Build our DualStyleGAN from an official `g_ema` state dict, inferring the config from its keys/shapes.

    Args:
        g_ema: the official state dict.
        latent_avg: [w_dim] mean w of the base generator, or None to estimate it (as training.checkpoints does
            for rosinality files without one; DualStyleGAN itself truncates towards 0 and never reads it).
        what: name used in error messages (the file).
    Raises:
        CheckpointError naming every unknown or missing key, wrong shapes and non-finite values.
    """
    if not isinstance(g_ema, Mapping):
        raise CheckpointError(f"{what}: g_ema is not a state dict")
    bad = sorted(repr(k) for k in g_ema if not isinstance(k, str))
    if bad:
        raise CheckpointError(f"{what}: g_ema has non-string keys {bad[:5]}")
    gen = {k[len("generator."):]: v for k, v in g_ema.items() if k.startswith("generator.")}
    if not gen:
        raise CheckpointError(f"{what}: no generator.* keys: not a DualStyleGAN checkpoint")
    rest = {k: v for k, v in g_ema.items() if not k.startswith("generator.")}
    cfg = _infer_config(gen, rest, what)
    table = official_key_map(cfg)
    unknown = sorted(set(rest) - set(table))
    missing = sorted(set(table) - set(rest))
    if unknown or missing:
        raise CheckpointError(f"{what}: {_list('unrecognised keys', unknown)}"
                              f"{'; ' if unknown and missing else ''}{_list('missing keys', missing)}")
    G = generator_from_rosinality(gen, latent_avg, f"{what} (generator.*)", lr_mul=cfg.generator.mapping_lr_mul)
    model = DualStyleGAN(cfg, G)
    sd = {f"generator.{k}": v for k, v in G.state_dict().items()}
    for theirs, (ours, shape) in table.items():
        t = rest[theirs]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{what}: {theirs} is not a tensor")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{what}: {theirs} has shape {tuple(t.shape)}, expected {shape}")
        sd[ours] = t
    _load_exact(model, sd, what)
    return model.eval()


def _list(label: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
    return f"{label} {keys[:5]}{more}"


def _infer_config(gen: dict[str, Any], rest: dict[str, Any], what: str) -> DualStyleConfig:
    gcfg: GeneratorConfig = infer_rosinality_config(gen, f"{what} (generator.*)")
    n_modres = 0
    while f"res.{n_modres}.norm.style.weight" in rest:
        n_modres += 1
    if n_modres == 0:
        raise CheckpointError(f"{what}: no ModRes blocks (res.0.norm.style.weight missing)")
    n_style = 0
    while f"style.{n_style + 1}.weight" in rest:
        n_style += 1
    weight = rest.get("style.1.weight", rest.get("res.0.norm.style.weight"))
    w_dim = int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else -1
    if w_dim != gcfg.w_dim:
        raise CheckpointError(f"{what}: the extrinsic path has width {w_dim}, the generator w_dim {gcfg.w_dim}")
    try:
        return DualStyleConfig(generator=gcfg, res_index=n_modres - 1, structure_layers=n_style,
                               structure_lr_mul=0.01)
    except ValueError as exc:
        raise CheckpointError(f"{what}: unsupported DualStyleGAN layout ({exc})") from None


# ----------------------------------------------------------------------------------------------------------
# Loading and saving models


def load_dualstylegan(path: str | os.PathLike) -> DualStyleGAN:
    """Load an official `generator.pt` or a native checkpoint directory.

    Args:
        path: official `.pt` ({"g_ema": ...}, read with torch.load(weights_only=True)) or a directory written
            by save_dualstylegan.
    Returns:
        DualStyleGAN in eval mode on CPU (parameters keep requires_grad; freeze what you do not train).
    Raises:
        FileNotFoundError; CheckpointError (a ValueError) naming the file and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"DualStyleGAN checkpoint not found: {p}")
    if p.is_dir():
        return _load_native(p)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty")
    obj = _torch_load_safe(p)
    if not isinstance(obj, dict) or "g_ema" not in obj:
        keys = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{p}: not a DualStyleGAN checkpoint (expected a dict with 'g_ema', got {keys})")
    unknown = sorted(str(k) for k in obj if k not in _OFFICIAL_TOP_KEYS)
    if unknown:
        raise CheckpointError(f"{p}: unrecognised top-level entries {unknown[:5]}")
    latent_avg = obj.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"{p}: latent_avg is not a tensor")
    return dualstylegan_from_official(obj["g_ema"], latent_avg, str(p))


def save_official(path: str | os.PathLike, model: DualStyleGAN) -> Path:
    """Write the official layout `{"g_ema": ..., "latent_avg": w_avg}` atomically (loads in the official
    `DualStyleGAN(...).load_state_dict(ckpt["g_ema"])`)."""
    obj = {"g_ema": dualstylegan_to_official(model),
           "latent_avg": model.generator.w_avg.detach().cpu().clone()}
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_dualstylegan(path: str | os.PathLike, model: DualStyleGAN, meta: dict[str, Any] | None = None,
                      overwrite: bool = False) -> Path:
    """Write a native checkpoint directory atomically: config.json ({"format": "stylecast.dualstylegan/v1",
    "config": DualStyleConfig, "meta": ...}) + dualstylegan.safetensors (the whole state dict)."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _save_tensors(model, tmp / WEIGHTS_FILE)
        doc = {"format": DUALSTYLE_FORMAT, "config": model.cfg.to_dict(), "meta": meta or {}}
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_dualstylegan_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta` dict of a native DualStyleGAN checkpoint."""
    doc = _read_doc(Path(path))
    meta = doc.get("meta", {})
    return dict(meta) if isinstance(meta, dict) else {}


def _read_doc(path: Path) -> dict[str, Any]:
    doc = read_native_config(path)
    if doc["format"] != DUALSTYLE_FORMAT:
        raise CheckpointError(f"{path}: format {doc['format']!r} is not a DualStyleGAN checkpoint "
                              f"(expected {DUALSTYLE_FORMAT!r})")
    return doc


def _load_native(path: Path) -> DualStyleGAN:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is a directory without config.json (not a stylecast checkpoint)")
    doc = _read_doc(path)
    try:
        cfg = DualStyleConfig.from_dict(doc["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid DualStyleGAN config ({exc})") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    model = DualStyleGAN(cfg)
    _load_exact(model, _read_safetensors(weights), str(path))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Exstyle codes


def load_exstyle_codes(path: str | os.PathLike, num_ws: int | None = None,
                       w_dim: int | None = None) -> dict[str, np.ndarray]:
    """Read an official `*exstyle_code.npy` (without executing its pickle) or a native `.safetensors` file.

    Args:
        path: the file; the format is recognised by its content.
        num_ws, w_dim: the expected code shape (None = inferred from the first entry, then enforced).
    Returns:
        {name: float32 [1, num_ws, w_dim]} in the file's order (the official scripts index by position).
    Raises:
        FileNotFoundError; CheckpointError naming the file and the problem (hostile or unknown pickle
        content, truncation, wrong shapes, non-finite values).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"exstyle code file not found: {p}")
    size = p.stat().st_size
    if size > MAX_EXSTYLE_BYTES:
        raise CheckpointError(f"{p}: {size / 2**20:.0f} MiB is too large for an exstyle code file")
    data = p.read_bytes()
    if data.startswith(b"\x93NUMPY"):
        raw = _read_official_codes(data, p)
    elif len(data) >= 8 and data[8:9] == b"{":
        raw = _read_native_codes(data, p)
    elif len(data) < 6 and b"\x93NUMPY".startswith(data):
        raise CheckpointError(f"{p}: truncated .npy file ({len(data)} bytes)")
    else:
        raise CheckpointError(f"{p}: not an exstyle code file (expected an official .npy or a stylecast "
                              ".safetensors)")
    return _validate_codes(raw, p, num_ws, w_dim)


def save_exstyle_codes(path: str | os.PathLike, codes: Mapping[str, np.ndarray | torch.Tensor]) -> Path:
    """Write codes atomically: `.npy` -> the official layout (np.save of the dict, a pickle: loads in the
    official scripts with np.load(allow_pickle=True).item()); `.safetensors` -> native, no pickle (one
    [K, num_ws, w_dim] float32 tensor `codes` + the names, in order, in the metadata).

    Args:
        codes: {name: [1, num_ws, w_dim] or [num_ws, w_dim]}, written as float32 [1, num_ws, w_dim].
    """
    p = Path(path)
    arrays = _validate_codes({str(k): _to_numpy(v) for k, v in codes.items()}, p, None, None)
    if p.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, dict(arrays), allow_pickle=True)
        atomic_write_bytes(p, buf.getvalue())
    elif p.suffix == ".safetensors":
        names = list(arrays)
        stacked = np.ascontiguousarray(np.concatenate([arrays[n] for n in names], axis=0))
        meta = {"format": EXSTYLE_FORMAT, "names": json.dumps(names)}
        atomic_write_bytes(p, safetensors_save_bytes({"codes": stacked}, metadata=meta))
    else:
        raise ValueError(f"{p}: exstyle codes are written as .npy (official) or .safetensors (native)")
    return p


def _to_numpy(v: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _validate_codes(raw: Mapping[str, Any], p: Path, num_ws: int | None,
                    w_dim: int | None) -> dict[str, np.ndarray]:
    if not raw:
        raise CheckpointError(f"{p}: holds no exstyle codes")
    out: dict[str, np.ndarray] = {}
    for name, a in raw.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{p}: code name {name!r} is not a string")
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            raise CheckpointError(f"{p}: code {name!r} is not a float array")
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[0] != 1:
            raise CheckpointError(f"{p}: code {name!r} has shape {a.shape}, expected (1, num_ws, w_dim) "
                                  "or (num_ws, w_dim)")
        # The first entry fixes whatever the caller left open; every entry must then agree.
        num_ws = a.shape[1] if num_ws is None else num_ws
        w_dim = a.shape[2] if w_dim is None else w_dim
        if a.shape[1:] != (num_ws, w_dim):
            raise CheckpointError(f"{p}: code {name!r} has shape {a.shape}, expected (1, {num_ws}, {w_dim})")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{p}: code {name!r} holds non-finite values")
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def _read_native_codes(data: bytes, p: Path) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors_load_bytes(data)
        (header_len,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8: 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p}: corrupt safetensors file ({exc})") from None
    if meta.get("format") != EXSTYLE_FORMAT:
        raise CheckpointError(f"{p}: not a stylecast exstyle file (metadata format {meta.get('format')!r})")
    try:
        names = json.loads(meta["names"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: exstyle metadata lacks a valid 'names' list") from None
    codes = tensors.get("codes")
    if set(tensors) != {"codes"} or codes is None or codes.ndim != 3:
        raise CheckpointError(f"{p}: expected exactly one [K, num_ws, w_dim] tensor 'codes', got "
                              f"{sorted(tensors)}")
    if not isinstance(names, list) or len(names) != codes.shape[0] or len(set(map(str, names))) != len(names):
        raise CheckpointError(f"{p}: {len(names) if isinstance(names, list) else '?'} names for "
                              f"{codes.shape[0]} codes (names must be unique)")
    return {str(n): codes[i: i + 1] for i, n in enumerate(names)}


# .npy parsing -----------------------------------------------------------------------------------------------


def _read_official_codes(data: bytes, p: Path) -> dict[str, np.ndarray]:
    header, offset = _parse_npy_header(data, p)
    if header["descr"] != "|O" or header["shape"] != ():
        raise CheckpointError(f"{p}: expected np.save of a dict (a 0-d object array), got an array with dtype "
                              f"{header['descr']!r} and shape {header['shape']}")
    try:
        obj = _CodeUnpickler(io.BytesIO(data[offset:])).load()
    except UnsafeCodeFileError as exc:
        raise CheckpointError(f"{p}: refused to load: {exc}") from None
    except (pickle.UnpicklingError, EOFError, struct.error) as exc:
        raise CheckpointError(f"{p}: corrupt or truncated pickle payload ({_first_line(exc)})") from None
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f"{p}: malformed pickle payload ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(obj, _ArrayStub) or obj.objects is None or obj.shape != () or len(obj.objects) != 1:
        raise CheckpointError(f"{p}: the pickle is not a 0-d object array")
    codes = obj.objects[0]
    if not isinstance(codes, dict):
        raise CheckpointError(f"{p}: the saved object is a {type(codes).__name__}, expected a dict "
                              "{filename: code}")
    out: dict[str, Any] = {}
    for k, v in codes.items():
        if not isinstance(v, _ArrayStub) or v.array is None:
            raise CheckpointError(f"{p}: code {k!r} is not a numeric array")
        out[k] = v.array
    return out


def _first_line(exc: BaseException) -> str:
    s = str(exc)
    return s.splitlines()[0] if s else type(exc).__name__


def _parse_npy_header(data: bytes, p: Path) -> tuple[dict[str, Any], int]:
    """Parse the .npy magic, version and header dict (a Python literal, read with ast.literal_eval)."""
    if len(data) < 10:
        raise CheckpointError(f"{p}: truncated .npy header")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10
    elif major in (2, 3):
        if len(data) < 12:
            raise CheckpointError(f"{p}: truncated .npy header")
        (hlen,) = struct.unpack("<I", data[8:12])
        start = 12
    else:
        raise CheckpointError(f"{p}: unsupported .npy format version {major}.{data[7]}")
    if len(data) < start + hlen:
        raise CheckpointError(f"{p}: truncated .npy header")
    try:
        text = data[start: start + hlen].decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(text.strip())
    except (UnicodeDecodeError, ValueError, SyntaxError, MemoryError, RecursionError):
        raise CheckpointError(f"{p}: unreadable .npy header") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"} \
            or not isinstance(header["shape"], tuple):
        raise CheckpointError(f"{p}: malformed .npy header {header!r:.200}")
    return header, start + hlen


class UnsafeCodeFileError(ValueError):
    """The exstyle pickle references something other than plain numpy arrays (it could run code)."""


class _LoaderObject:
    """Base of the stand-ins find_class hands out: no attributes, and the pickle's BUILD opcode (which would
    otherwise set attributes on them, persisting across loads) is refused."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCodeFileError("the pickle tries to modify a loader object")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCodeFileError("the pickle tries to modify a loader object")


class _NdarrayMarker(_LoaderObject):
    """Stands in for the global numpy.ndarray: only ever passed to _reconstruct, never called."""

    __slots__ = ()


_NDARRAY = _NdarrayMarker()
# Plain numeric dtypes (any byte order) and the object dtype of np.save's 0-d wrapper.
_NUMERIC_SPECS = {"f2", "f4", "f8"}
_OBJECT_SPECS = {"O4", "O8"}


class _DtypeStub:
    """A dtype being unpickled (numpy.dtype(spec, align, copy) then BUILD): validated, then a plain dtype."""

    def __init__(self, spec: Any, align: Any, copy: Any):
        if spec not in _NUMERIC_SPECS | _OBJECT_SPECS or align not in (False, 0) or copy not in (True, 1):
            raise UnsafeCodeFileError(f"dtype {spec!r} is not a plain float or object dtype")
        self.spec = spec
        self.dtype: np.dtype | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, meta])
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafeCodeFileError("unexpected dtype state")
        order = state[1]
        if order not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5]) \
                or (len(state) == 9 and state[8] is not None):
            raise UnsafeCodeFileError("only plain (unstructured, metadata-free) dtypes are allowed")
        base = np.dtype(self.spec)
        self.dtype = base if order in ("|", "=") else base.newbyteorder(order)


class _DtypeFactory(_LoaderObject):
    """Stands in for the global numpy.dtype."""

    __slots__ = ()

    def __call__(self, spec: Any = None, align: Any = False, copy: Any = True) -> _DtypeStub:
        return _DtypeStub(spec, align, copy)


class _Reconstruct(_LoaderObject):
    """Stands in for numpy's multiarray._reconstruct(ndarray, (0,), b'b'): an empty array to BUILD."""

    __slots__ = ()

    def __call__(self, subtype: Any = None, shape: Any = None, typecode: Any = None) -> "_ArrayStub":
        if subtype is not _NDARRAY or shape not in ((0,), [0]) or typecode not in (b"b", "b"):
            raise UnsafeCodeFileError("_reconstruct called with something other than a plain ndarray")
        return _ArrayStub()


class _ArrayStub:
    """An ndarray being unpickled: __setstate__ gets numpy's (version, shape, dtype, fortran, data) state.

    Numeric arrays are rebuilt with np.frombuffer from their raw bytes (copied); the object array np.save
    wraps the dict in keeps its already-unpickled items in `objects`.
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self.objects: list[Any] | None = None
        self.shape: tuple[int, ...] = ()

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafeCodeFileError("unexpected ndarray state")
        if len(state) == 5:
            if state[0] != 1:
                raise UnsafeCodeFileError(f"unsupported ndarray state version {state[0]!r}")
            state = state[1:]
        shape, dtype, fortran, payload = state
        if not isinstance(shape, tuple) or not all(isinstance(s, int) and 0 <= s < 2**31 for s in shape):
            raise UnsafeCodeFileError("ndarray shape is not a tuple of sizes")
        if not isinstance(dtype, _DtypeStub) or dtype.dtype is None or not isinstance(fortran, bool):
            raise UnsafeCodeFileError("ndarray dtype is not a plain dtype")
        count = math.prod(shape)
        self.shape = shape
        if dtype.spec in _OBJECT_SPECS:
            if not isinstance(payload, list) or len(payload) != count:
                raise UnsafeCodeFileError("object array payload does not match its shape")
            self.objects = payload
            return
        if not isinstance(payload, (bytes, bytearray)) or len(payload) != count * dtype.dtype.itemsize:
            size = len(payload) if isinstance(payload, (bytes, bytearray)) else "?"
            raise UnsafeCodeFileError(f"array data of {size} bytes does not match shape {shape} of {dtype.dtype}")
        a = np.frombuffer(bytes(payload), dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")
        self.array = a.astype(dtype.dtype.newbyteorder("="), copy=True)


class _Frombuffer(_LoaderObject):
    """Stands in for numpy's numeric._frombuffer(buffer, dtype, shape, order) (pickle protocol 5)."""

    __slots__ = ()

    def __call__(self, buf: Any = None, dtype: Any = None, shape: Any = None, order: Any = None) -> "_ArrayStub":
        if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
            raise UnsafeCodeFileError("_frombuffer called without a byte buffer")
        stub = _ArrayStub()
        stub.__setstate__((1, shape, dtype, order == "F", bytes(buf)))
        return stub


# (module, name) -> our stand-in. numpy 1.x pickles reference numpy.core.multiarray, numpy 2.x numpy._core.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy.core.numeric", "_frombuffer"): _Frombuffer(),
    ("numpy._core.numeric", "_frombuffer"): _Frombuffer(),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeFactory(),
}


class _CodeUnpickler(pickle.Unpickler):
    """Unpickler for np.save'd dicts of arrays: every global resolves to a stand-in above or is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCodeFileError(f"the pickle references {module}.{name}, which is not a plain numpy "
                                      "array (only numeric arrays in a dict are accepted)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCodeFileError("the pickle uses persistent ids")
