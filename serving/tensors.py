"""Protocol-neutral tensor declarations: the inference endpoints a model offers, each with its input and output
tensors (Open Inference Protocol names, datatypes and shapes, -1 for a dynamic dimension, optional inputs) and its
request parameters, declared once by the model's kind and read by every front end (KServe v2 gRPC in
serving.kserve, HTTP/REST later): metadata, model config, input decoding and output encoding need no per-kind code.

Every tensor has the batch axis first. Inputs arrive as raw little-endian bytes (`raw_input_contents`, the
binary data extension) or as a list of values; BYTES elements in raw form are 4-byte little-endian lengths each
followed by the element, as tritonclient serialises them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import InvalidArgument

# Open Inference Protocol datatype -> (numpy dtype, Triton model-config data type)
DATATYPES: dict[str, tuple[Any, str]] = {
    "BOOL": (np.bool_, "TYPE_BOOL"), "UINT8": (np.uint8, "TYPE_UINT8"), "INT32": (np.int32, "TYPE_INT32"),
    "INT64": (np.int64, "TYPE_INT64"), "FP32": (np.float32, "TYPE_FP32"), "BYTES": (np.object_, "TYPE_STRING"),
}
PARAM_TYPES = ("bool", "int64", "double", "string", "int64|string")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of an endpoint.

    Attributes:
        shape: with the batch axis first; -1 = any size (always for the batch axis).
        optional: an input the request may leave out.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name}: unknown datatype {self.datatype!r}")
        if not self.shape or self.shape[0] != -1:
            raise ValueError(f"tensor {self.name}: the first (batch) dimension must be -1")

    @property
    def dims(self) -> tuple[int, ...]:
        """The shape without the batch axis (Triton's model-config `dims`)."""
        return self.shape[1:]

    def metadata(self) -> dict[str, Any]:
        """The KServe v2 metadata object: {name, datatype, shape}."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ParamSpec:
    """A request parameter of an endpoint: its name, type (one of PARAM_TYPES) and meaning."""

    name: str
    type: str
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name}: unknown type {self.type!r}")


@dataclass(frozen=True)
class Endpoint:
    """One inference-protocol model of a bundle: `<bundle name><suffix>` ("" for the bundle's own name)."""

    suffix: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: tuple[ParamSpec, ...] = ()
    description: str = ""
    inputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs_by_name", {t.name: t for t in self.inputs})

    def check_outputs(self, requested: Sequence[str]) -> None:
        """Requested output names must be outputs of this endpoint (INVALID_ARGUMENT otherwise)."""
        names = [t.name for t in self.outputs]
        for r in requested:
            if r not in names:
                raise InvalidArgument(f"unknown requested output {r!r} (outputs: {', '.join(names)})")


# ----------------------------------------------------------------------------------------------------------
# Decoding inputs and encoding outputs


def unpack_bytes(data: bytes, count: int, name: str) -> list[bytes]:
    """Triton's BYTES raw layout: each element as a 4-byte little-endian length, then its bytes."""
    items, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise InvalidArgument(f"input {name!r}: truncated BYTES element length")
        n = int.from_bytes(data[pos: pos + 4], "little")
        if pos + 4 + n > len(data):
            raise InvalidArgument(f"input {name!r}: BYTES element {len(items)} claims {n} bytes, "
                                  f"{len(data) - pos - 4} left")
        items.append(data[pos + 4: pos + 4 + n])
        pos += 4 + n
        if len(items) > count:
            break
    return items


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """Elements -> Triton's BYTES raw layout (the inverse of unpack_bytes)."""
    return b"".join(len(b).to_bytes(4, "little") + bytes(b) for b in items)


def decode_input(spec: TensorSpec, datatype: str, shape: Sequence[int], *, raw: bytes | None = None,
                 values: Sequence[Any] | None = None, max_rows: int) -> np.ndarray:
    """One request tensor -> a checked array [N, *spec.dims] (a [N] tensor is taken as [N, 1] when dims are (1,)).

    Args:
        datatype, shape: as the request states them.
        raw: the tensor's raw bytes, or None to take `values` (the typed contents / JSON data, flattened).
        max_rows: the most rows (batch size) a request may carry.
    Raises:
        InvalidArgument: naming the tensor: datatype, rank, dims, row count, byte or value count, NaN / Inf.
    """
    name = spec.name
    if datatype != spec.datatype:
        raise InvalidArgument(f"input {name!r}: datatype {datatype or '(none)'}, expected {spec.datatype}")
    shape = tuple(int(d) for d in shape)
    dims = spec.dims
    want = "[" + ", ".join(["N", *map(str, dims)]) + "]"
    ok_rank = len(shape) == len(spec.shape) or (dims == (1,) and len(shape) == 1)
    dims_ok = all(want_d in (-1, got) for got, want_d in zip(shape[1:], dims))
    if not ok_rank or any(d < 0 for d in shape) or not dims_ok:
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} does not match {want}")
    n = shape[0] if shape else 0
    if n < 1:
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has no rows")
    if n > max_rows:
        raise InvalidArgument(f"input {name!r}: {n} rows, more than the limit of {max_rows}")
    dtype = DATATYPES[spec.datatype][0]
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        items = unpack_bytes(raw, count, name) if raw is not None else [bytes(v) for v in (values or [])]
        if len(items) != count:
            raise InvalidArgument(f"input {name!r}: {len(items)} elements do not fill shape {list(shape)}")
        arr = np.empty(count, dtype=object)
        arr[:] = items
        arr = arr.reshape(shape)
    elif raw is not None:
        size = count * np.dtype(dtype).itemsize
        if len(raw) != size:
            raise InvalidArgument(f"input {name!r}: {len(raw)} bytes of raw contents, shape {list(shape)} "
                                  f"{spec.datatype} needs {size}")
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        values = list(values or [])
        if len(values) != count:
            raise InvalidArgument(f"input {name!r}: {len(values)} values do not fill shape {list(shape)}")
        arr = np.asarray(values, dtype=dtype).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidArgument(f"input {name!r}: NaN or Inf values")
    return arr.reshape(n, *(shape[1:] if len(shape) == len(spec.shape) else dims))


def require_inputs(x: dict[str, np.ndarray], names: Sequence[str]) -> None:
    """INVALID_ARGUMENT naming the required inputs that are missing."""
    missing = [k for k in names if k not in x]
    if len(missing) == 1:
        raise InvalidArgument(f"input {missing[0]!r} is required")
    if missing:
        raise InvalidArgument(f"inputs {missing} are required")


def encode_output(arr: np.ndarray) -> bytes:
    """An output array -> its raw contents (BYTES elements in Triton's length-prefixed layout)."""
    if arr.dtype == object:
        return pack_bytes(list(arr.reshape(-1)))
    return np.ascontiguousarray(arr).tobytes()
