"""Inference backends of a bundle's graphs: ONNX Runtime (CPU, or the CUDA execution provider when installed) and
TensorRT engines (when `tensorrt` / `tensorrt_rtx` is importable and an engine in the manifest matches this GPU).

`choose_backend` is pure (it takes a `SystemProbe`), so the selection rules are unit-tested with fakes; only
`probe_system` and `TensorRTSynthesis` touch a GPU.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .logs import log

logger = logging.getLogger("serving.backends")

TRT_MODULES = ("tensorrt", "tensorrt_rtx")  # python module == manifest trt_flavour
PLUGIN_PATH_ENV = "STYLECAST_TRT_PLUGIN_PATH"  # extra places (os.pathsep-separated) to look for plugin libraries


class BackendError(RuntimeError):
    """A backend cannot be used (missing runtime, no matching engine, a plugin that fails its checksum)."""


def img_to_u8(img: np.ndarray) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC with round((img + 1) * 127.5) clamped, the rule of the exported graphs."""
    x = np.clip(np.round((img.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def u8_to_img(img_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (x / 127.5 - 1, the inverse of img_to_u8 up to rounding)."""
    return np.ascontiguousarray(img_u8.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1)


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime


def ort_available_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


class OrtGraph:
    """One ONNX graph in an InferenceSession (thread-safe `run`; ORT releases the GIL)."""

    def __init__(self, path: Path, providers: list[str], threads: int = 0):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Idle ORT worker threads otherwise spin after each call and steal cores from the other session
        # (mapping vs synthesis) and from gRPC/encoding threads; measured p95 11.6 -> 4.2 ms on 2 cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads > 0:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.providers = list(self.session.get_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


class OrtEncoder:
    """Aligned faces img_u8 [N, S, S, 3] -> ws [N, num_ws, w_dim] float32 through encoder.onnx (input `img` in
    [-1, 1] NCHW at the encoder's input size S)."""

    def __init__(self, path: Path, providers: list[str], threads: int = 0):
        self.graph = OrtGraph(path, providers, threads)
        if self.graph.input_names != ["img"] or "ws" not in self.graph.output_names:
            raise BackendError(f"{path.name}: an encoder graph maps input 'img' to output 'ws'")

    def __call__(self, img_u8: np.ndarray) -> np.ndarray:
        return self.graph.run(["ws"], {"img": u8_to_img(img_u8)})[0]

    def close(self) -> None:
        self.graph = None  # type: ignore[assignment]


class OrtSynthesis:
    """ws [N, num_ws, w_dim] float32 -> img_u8 [N, R, R, 3] through synthesis.onnx."""

    kind = "onnxruntime"
    precision = "fp32"
    max_batch: int | None = None  # dynamic batch axis: no limit of its own

    def __init__(self, path: Path, providers: list[str], threads: int = 0):
        self.graph = OrtGraph(path, providers, threads)
        self.has_u8 = "img_u8" in self.graph.output_names
        if not self.has_u8 and "img" not in self.graph.output_names:
            raise BackendError(f"{path.name}: synthesis graph has neither an 'img_u8' nor an 'img' output")
        self.name = f"onnxruntime:{self.graph.providers[0]}"

    def __call__(self, ws: np.ndarray) -> np.ndarray:
        if self.has_u8:
            return self.graph.run(["img_u8"], {"ws": ws})[0]
        return img_to_u8(self.graph.run(["img"], {"ws": ws})[0])

    def close(self) -> None:
        self.graph = None  # type: ignore[assignment]


class OrtMapping:
    """z [N, z_dim], psi [N] -> w [N, w_dim] (the untruncated mapping output) through mapping.onnx."""

    def __init__(self, path: Path, threads: int = 0):
        # The mapping network is a few small matrix products: the CPU is faster than a round trip to a GPU.
        self.graph = OrtGraph(path, ["CPUExecutionProvider"], threads)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        psi = np.ones(z.shape[0], dtype=np.float32)
        return self.graph.run(["w"], {"z": z, "psi": psi})[0]

    def close(self) -> None:
        self.graph = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------------------
# Backend selection


@dataclass(frozen=True)
class SystemProbe:
    """What this machine can run: ORT providers, the importable TensorRT flavour and version, the GPU."""

    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    trt_flavour: str | None = None        # "tensorrt" | "tensorrt_rtx" | None
    trt_version: str | None = None        # e.g. "10.14.1.48"
    compute_capability: str | None = None  # e.g. "9.0"


@dataclass
class BackendChoice:
    kind: str                                   # "onnxruntime" | "tensorrt"
    providers: list[str] = field(default_factory=list)
    engine: dict[str, Any] | None = None
    reason: str = ""


def normalize_cc(cc: Any) -> str | None:
    """'9.0', '90', 'sm_90', 9.0, (9, 0) -> '9.0'."""
    if cc is None:
        return None
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if m := re.fullmatch(r"(\d+)\.(\d+)", s):
        return f"{int(m.group(1))}.{int(m.group(2))}"
    if m := re.fullmatch(r"(\d+)(\d)", s):
        return f"{int(m.group(1))}.{int(m.group(2))}"
    return None


def same_trt_version(a: str | None, b: str | None) -> bool:
    """TensorRT plans only load in the exact TensorRT build that wrote them (as export's verify requires)."""
    return bool(a) and bool(b) and str(a) == str(b)


def engine_ccs(engine: dict) -> list[str]:
    """The compute capabilities an engine runs on: '9.0', or 'aot:8.0,8.6,8.9' (TensorRT-RTX ahead of time)."""
    spec = str(engine.get("compute_capability", ""))
    spec = spec[4:] if spec.startswith("aot:") else spec
    return [cc for part in spec.split(",") if (cc := normalize_cc(part))]


def matching_engines(manifest: dict, probe: SystemProbe, graph: str = "synthesis") -> tuple[list[dict], list[str]]:
    """Engines of the manifest this machine can run, and why each other engine cannot."""
    ok, why = [], []
    cc = normalize_cc(probe.compute_capability)
    for eng in manifest.get("engines") or []:
        if eng.get("graph") != graph:
            continue
        f = eng.get("file")
        if eng.get("trt_flavour") != probe.trt_flavour:
            why.append(f"{f}: built for {eng.get('trt_flavour')}, {probe.trt_flavour or 'no TensorRT'} installed")
        elif not same_trt_version(eng.get("trt_version"), probe.trt_version):
            why.append(f"{f}: built with TensorRT {eng.get('trt_version')}, {probe.trt_version} installed")
        elif cc not in engine_ccs(eng):
            why.append(f"{f}: built for compute capability {eng.get('compute_capability')}, GPU has {cc}")
        else:
            ok.append(eng)
    return ok, why


def choose_backend(requested: str, manifest: dict, probe: SystemProbe) -> BackendChoice:
    """Pick the synthesis backend of one bundle.

    auto: a matching TensorRT engine if any, else ONNX Runtime (CUDA EP when available, else CPU).
    tensorrt: a matching engine or BackendError. onnxruntime: ONNX Runtime.
    """
    if requested not in ("auto", "onnxruntime", "tensorrt"):
        raise BackendError(f"unknown backend {requested!r}")
    ort_providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in probe.ort_providers]
    if not ort_providers:
        ort_providers = ["CPUExecutionProvider"]
    if requested in ("auto", "tensorrt"):
        engines, why = matching_engines(manifest, probe)
        if engines:
            return BackendChoice("tensorrt", engine=engines[0],
                                 reason=f"engine {engines[0]['file']} matches {probe.trt_flavour} "
                                        f"{probe.trt_version} on compute capability {probe.compute_capability}")
        if not manifest.get("engines"):
            reason = "the bundle has no TensorRT engines"
        elif probe.trt_flavour is None:
            reason = "TensorRT is not installed"
        elif probe.compute_capability is None:
            reason = "no CUDA GPU found"
        else:
            reason = "no engine matches: " + "; ".join(why)
        if requested == "tensorrt":
            raise BackendError(f"--backend tensorrt: {reason}")
        return BackendChoice("onnxruntime", providers=ort_providers, reason=f"{reason}; using ONNX Runtime")
    return BackendChoice("onnxruntime", providers=ort_providers, reason="requested")


_PROBE_CACHE: dict[bool, SystemProbe] = {}


def probe_system(with_tensorrt: bool = True) -> SystemProbe:
    """Detect ORT providers and (optionally, since importing TensorRT is slow) TensorRT and the GPU."""
    if with_tensorrt in _PROBE_CACHE:
        return _PROBE_CACHE[with_tensorrt]
    providers = tuple(ort_available_providers())
    flavour = version = cc = None
    if with_tensorrt:
        for mod_name in TRT_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except Exception:  # ImportError, or a broken install that fails to load its libraries
                continue
            flavour, version = mod_name, str(getattr(mod, "__version__", ""))
            break
        cc = gpu_compute_capability()
    probe = SystemProbe(providers, flavour, version, cc)
    _PROBE_CACHE[with_tensorrt] = probe
    return probe


def gpu_compute_capability(device: int = 0) -> str | None:
    """Compute capability of a CUDA device via cuda-python, else nvidia-smi; None without a GPU."""
    cudart = _cudart()
    if cudart is not None:
        try:
            err, major = cudart.cudaDeviceGetAttribute(
                cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device)
            err2, minor = cudart.cudaDeviceGetAttribute(
                cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device)
            if int(err) == 0 and int(err2) == 0:
                return f"{major}.{minor}"
        except Exception:
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device}"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                return normalize_cc(out.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return None


def _cudart():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


# ----------------------------------------------------------------------------------------------------------
# TensorRT


def resolve_plugins(bundle: Path, engine: dict, manifest_files: dict, search: list[Path] | None = None) -> list[Path]:
    """The plugin libraries of an engine, each checked against its sha256 before anything loads it.

    A plugin with a `file` comes from the bundle; one without is looked up by checksum in STYLECAST_TRT_PLUGIN_PATH.
    """
    from common.files import sha256_file
    out = []
    if search is None:
        search = [Path(p) for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
    for plugin in engine.get("plugins") or []:
        want = plugin["sha256"]
        if plugin.get("file"):
            path = bundle / plugin["file"]
            if plugin["file"] not in manifest_files:
                raise BackendError(f"plugin {plugin['file']} is not listed in the manifest's files")
            if not path.is_file() or sha256_file(path) != want:
                raise BackendError(f"plugin {plugin['file']} is missing or fails its sha256 check")
            out.append(path)
            continue
        candidates = [c for d in search for c in ((sorted(d.glob("*.so*")) if d.is_dir() else [d]))]
        found = next((c for c in candidates if c.is_file() and sha256_file(c) == want), None)
        if found is None:
            raise BackendError(f"no plugin library with sha256 {want[:12]}... in {PLUGIN_PATH_ENV}")
        out.append(found)
    return out


def load_plugin_library(trt, path: Path) -> None:
    """Register a plugin library's creators: IPluginRegistry.load_library (libraries exporting getCreators, like
    trt_plugins/), else a plain dlopen (libraries that register through static initialisers)."""
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(path)) if hasattr(registry, "load_library") else None
    if handle is None:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class TensorRTSynthesis:
    """ws -> img_u8 through a serialized TensorRT engine (TensorRT 10 tensor API, cuda-python for memory).

    Buffers for the engine's largest profile batch are allocated once; `max_batch` caps the model's batcher and
    batches below the profile's minimum are padded.
    """

    kind = "tensorrt"

    def __init__(self, engine_path: Path, plugins: list[Path], flavour: str, precision: str):
        trt = importlib.import_module(flavour)
        cudart = _cudart()
        if cudart is None:
            raise BackendError("TensorRT needs cuda-python (pip install cuda-python) for device memory")
        self.trt, self.cudart = trt, cudart
        self.precision = precision
        self.name = f"{flavour}:{precision}"
        self._logger = trt.Logger(trt.Logger.WARNING)
        if flavour == "tensorrt" and hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self._logger, "")
        for lib in plugins:  # plugins before the engine: deserialising looks their creators up
            load_plugin_library(trt, lib)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendError(f"{engine_path.name}: TensorRT could not deserialise the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if self.inputs != ["ws"] or not ({"img_u8", "img"} & set(self.outputs)):
            raise BackendError(f"{engine_path.name}: expected input 'ws' and output 'img_u8' or 'img', "
                               f"got {self.inputs} -> {self.outputs}")
        self.out_name = "img_u8" if "img_u8" in self.outputs else "img"
        lo, _, hi = (tuple(d) for d in self.engine.get_tensor_profile_shape("ws", 0))
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.buffers: dict[str, int] = {}  # name -> device pointer, sized for the largest batch
        self.context.set_input_shape("ws", hi)
        for n in names:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            nbytes = int(np.prod(tuple(self.context.get_tensor_shape(n)))) * dtype.itemsize
            self.buffers[n] = self._ok(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(n, self.buffers[n])

    @staticmethod
    def _ok(res):
        err, *vals = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise BackendError(f"CUDA error {err}")
        return vals[0] if vals else None

    def __call__(self, ws: np.ndarray) -> np.ndarray:
        trt, cudart = self.trt, self.cudart
        n = ws.shape[0]
        if n < self.min_batch:  # pad with copies of the last row; the extra outputs are dropped
            ws = np.concatenate([ws, np.repeat(ws[-1:], self.min_batch - n, axis=0)])
        x = np.ascontiguousarray(ws.astype(np.dtype(trt.nptype(self.engine.get_tensor_dtype("ws"))), copy=False))
        self.context.set_input_shape("ws", x.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self.out_name)),
                       dtype=np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.out_name))))
        kinds = cudart.cudaMemcpyKind
        self._ok(cudart.cudaMemcpyAsync(self.buffers["ws"], x.ctypes.data, x.nbytes, kinds.cudaMemcpyHostToDevice,
                                        self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError("TensorRT execution failed")
        self._ok(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[self.out_name], out.nbytes,
                                        kinds.cudaMemcpyDeviceToHost, self.stream))
        self._ok(cudart.cudaStreamSynchronize(self.stream))
        out = out[:n]
        return out if self.out_name == "img_u8" else img_to_u8(out)

    def close(self) -> None:
        for ptr in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers = {}
        self.cudart.cudaStreamDestroy(self.stream)
        self.context = self.engine = self.runtime = None


def create_synthesis(bundle: Path, manifest: dict, requested: str, threads: int = 0,
                     probe: SystemProbe | None = None, providers: list[str] | None = None):
    """Build the synthesis runner of a bundle for the requested backend (auto | onnxruntime | tensorrt).

    Args:
        providers: ONNX Runtime execution providers to use instead of the probe's choice.
    """
    probe = probe or probe_system(with_tensorrt=requested != "onnxruntime")
    choice = choose_backend(requested, manifest, probe)
    if providers and choice.kind == "onnxruntime":
        choice.providers = list(providers)
    name = manifest.get("name")
    if choice.kind == "tensorrt":
        eng = choice.engine
        assert eng is not None
        try:
            plugins = resolve_plugins(bundle, eng, manifest["files"])
            runner = TensorRTSynthesis(bundle / eng["file"], plugins, eng["trt_flavour"], eng["precision"])
            log(logger, logging.INFO, "backend", model=name, backend=runner.name, reason=choice.reason)
            return runner
        except Exception as exc:
            if requested == "tensorrt":
                raise BackendError(f"--backend tensorrt: {exc}") from exc
            log(logger, logging.WARNING, "tensorrt unavailable, falling back to onnxruntime", model=name,
                error=str(exc))
            choice = choose_backend("onnxruntime", manifest, probe)
            if providers:
                choice.providers = list(providers)
    runner = OrtSynthesis(bundle / manifest["graphs"]["synthesis"]["file"], choice.providers, threads)
    log(logger, logging.INFO, "backend", model=name, backend=runner.name, reason=choice.reason)
    return runner
