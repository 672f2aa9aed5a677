"""TensorRT engines of the StyleGAN2 (Karras et al., 2020) synthesis graph: build with `tensorrt` (on the GPU it
will run on) or `tensorrt_rtx` (ahead of time, for listed compute capabilities, on a machine without a GPU). The
server and `stylecast export verify` run them against a bundle's golden outputs (serving.stylegan2_model, torch-free).

Engines are strongly typed: the precision comes from the ONNX graph, never from a builder flag. An fp16 engine
is built from the fp16 graph (synthesis_fp16.onnx), which keeps demodulation in fp32 and clamps activations;
letting the builder lower an fp32 graph to fp16 would put demodulation in fp16, the known way to turn StyleGAN
decoders into garbage.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from common.files import atomic_write_bytes, sha256_file

FLAVOURS = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = ("install TensorRT-RTX (`pip install tensorrt-rtx-cu13`, builds ahead of time without a GPU) or "
                "TensorRT (`pip install tensorrt-cu13`, needs the GPU the engine will run on)")
# TensorRT-RTX cannot compile fp32 GEMMs for Turing (SM75) at all, so the default ahead-of-time targets are the
# supported architectures from Ampere (8.0) on.
DEFAULT_AOT_MIN_CC = (8, 0)
HOPPER = (9, 0)


class EngineError(ValueError):
    """An engine cannot be built or run: no TensorRT, an unsupported target, a graph the parser rejects."""


# ----------------------------------------------------------------------------------------------------------
# Finding a TensorRT flavour


def _import_flavour(flavour: str) -> ModuleType | None:
    try:
        if flavour == "tensorrt":
            import tensorrt as trt
        else:
            import tensorrt_rtx as trt
    except (ImportError, OSError):  # OSError: the bindings are there but their shared libraries are not
        return None
    return trt


def _cuda_capability() -> tuple[int, int] | None:
    """Compute capability of CUDA device 0, or None without a usable GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
    except Exception:  # a CUDA build of torch on a machine with a broken driver raises here
        pass
    return None


def select_tensorrt(flavour: str | None = None) -> tuple[ModuleType, str]:
    """The TensorRT module to build with and its flavour name.

    Without `flavour` (or STYLECAST_TRT_FLAVOUR): `tensorrt` when it imports and a GPU is present (it cannot
    build without one), else `tensorrt_rtx`.

    Raises:
        EngineError: neither is installed (the message says how to install one).
    """
    flavour = flavour or os.environ.get("STYLECAST_TRT_FLAVOUR") or None
    if flavour is not None:
        if flavour not in FLAVOURS:
            raise EngineError(f"unknown TensorRT flavour {flavour!r} (expected one of {FLAVOURS})")
        trt = _import_flavour(flavour)
        if trt is None:
            raise EngineError(f"{flavour} is not installed: {INSTALL_HINT}")
        return trt, flavour
    full = _import_flavour("tensorrt")
    if full is not None and _cuda_capability() is not None:
        return full, "tensorrt"
    rtx = _import_flavour("tensorrt_rtx")
    if rtx is not None:
        return rtx, "tensorrt_rtx"
    if full is not None:
        return full, "tensorrt"  # fails later with "needs a GPU", which is the real reason
    raise EngineError(f"building TensorRT engines needs tensorrt or tensorrt_rtx: {INSTALL_HINT}")


def _make_logger(trt: ModuleType):
    """An ILogger that keeps errors (for one-line exceptions) and drops the chatter."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # noqa: ANN001 (TensorRT's signature)
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg).strip())

    return _Logger()


# ----------------------------------------------------------------------------------------------------------
# Compute capabilities


def parse_compute_capabilities(spec: str) -> list[tuple[int, int]]:
    """'8.9', 'sm89', 'sm_120', '12.0', '8.6,8.9' -> [(8, 6), (8, 9)] (sorted, unique)."""
    out = set()
    for part in re.split(r"[,\s]+", spec.strip().lower()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\.(\d)", part) or re.fullmatch(r"(?:sm_?)?(\d+)(\d)", part)
        if not m:
            raise EngineError(f"invalid compute capability {part!r}: use e.g. 8.9, sm89 or 8.6,8.9,12.0")
        out.add((int(m.group(1)), int(m.group(2))))
    if not out:
        raise EngineError("no compute capability given")
    return sorted(out)


def cc_str(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def cc_tag(cc: tuple[int, int]) -> str:
    return f"sm{cc[0]}{cc[1]}"


def rtx_targets(trt: ModuleType) -> dict[tuple[int, int], Any]:
    """The ahead-of-time targets this TensorRT-RTX supports: (major, minor) -> trt.ComputeCapability."""
    out = {}
    for name, member in trt.ComputeCapability.__members__.items():
        m = re.fullmatch(r"SM(\d+)(\d)", name)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = member
    return out


def hopper_note(flavour: str, version: str, cc_label: str) -> str | None:
    """The statement a TensorRT-RTX engine carries when it cannot run on Hopper (H100/H200), else None.

    TensorRT-RTX targets consumer and workstation GPUs (sm80/86/89/120/121 in 1.7); it builds no sm90 code, so an
    H100/H200 needs an engine built by full TensorRT on that machine.
    """
    if flavour != "tensorrt_rtx" or HOPPER in engine_targets({"compute_capability": cc_label}):
        return None
    return (f"TensorRT-RTX {version} engines target {cc_label.removeprefix('aot:')} only: this one does not run on "
            "Hopper (H100/H200, compute capability 9.0); build one there with full TensorRT (the tensorrt package)")


def engine_targets(entry: dict[str, Any]) -> list[tuple[int, int]]:
    """The compute capabilities a manifest engine entry runs on ('9.0' or 'aot:8.6,8.9')."""
    spec = str(entry.get("compute_capability", ""))
    return parse_compute_capabilities(spec[4:] if spec.startswith("aot:") else spec)


# ----------------------------------------------------------------------------------------------------------
# Building


def graph_precision(onnx_path: str | Path) -> str:
    """'fp16' when the graph holds half-precision weights, else 'fp32'."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in model.graph.initializer):
        return "fp16"
    for node in model.graph.node:
        if node.op_type == "Constant" and any(a.t.data_type == half for a in node.attribute if a.name == "value"):
            return "fp16"
    return "fp32"


def _resolve_graph(onnx_path: Path, precision: str) -> Path:
    """The graph to build from: the given one, or for fp16 its `*_fp16.onnx` sibling when it is fp32."""
    actual = graph_precision(onnx_path)
    if actual == precision:
        return onnx_path
    sibling = onnx_path.with_name(f"{onnx_path.stem}_fp16{onnx_path.suffix}")
    if precision == "fp16" and sibling.is_file() and graph_precision(sibling) == "fp16":
        return sibling
    if precision == "fp16":
        raise EngineError(f"{onnx_path.name} is an fp32 graph: fp16 engines are built from the fp16 graph "
                          "(export it with --fp16; it keeps demodulation in fp32)")
    raise EngineError(f"{onnx_path.name} is an fp16 graph: build fp32 engines from the fp32 graph")


def _engine_name(graph: str, precision: str, flavour: str, version: str, cc_label: str) -> str:
    tag = cc_label.replace("aot:", "aot-").replace(",", "-")
    tag = re.sub(r"(\d+)\.(\d)", lambda m: f"sm{m.group(1)}{m.group(2)}", tag)
    return f"{graph}.{precision}.{flavour}-{version}.{tag}.plan"


def _load_plugin(trt: ModuleType, path: Path, logger) -> None:
    """Register a plugin library's creators (before parsing, so the parser finds stylecast::* ops)."""
    # dlopen it ourselves first: handing TensorRT's registry a file that is not a loadable shared library
    # has crashed the process (seen with TensorRT-RTX 1.7); dlopen fails cleanly. Libraries that register
    # through static initialisers (REGISTER_TENSORRT_PLUGIN) need nothing more.
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise EngineError(f"cannot load plugin library {path}: {exc}") from None
    registry = trt.get_plugin_registry()
    if hasattr(registry, "load_library"):
        # None means no getCreators entry point: then only static initialisers register, already run above.
        registry.load_library(str(path))


def build_engine(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp16", min_batch: int = 1,
                 opt_batch: int = 4, max_batch: int = 16, plugin_library: str | Path | None = None,
                 timing_cache: str | Path | None = None, compute_capability: str | None = None,
                 flavour: str | None = None) -> dict[str, Any]:
    """Build a TensorRT engine from a synthesis graph and write it (atomically) into out_dir.

    Args:
        onnx_path: synthesis.onnx (fp32) or synthesis_fp16.onnx; for precision fp16 an fp32 path is replaced by
            its `*_fp16.onnx` sibling when that exists.
        out_dir: where the .plan (and a copy of the plugin library) go.
        precision: "fp32" or "fp16"; must match the graph (engines are strongly typed).
        min_batch, opt_batch, max_batch: the optimization profile of the batch axis.
        plugin_library: a TensorRT plugin .so, loaded before parsing and copied next to the engine.
        timing_cache: file to load and update (full TensorRT; TensorRT-RTX has no timing cache).
        compute_capability: targets. tensorrt: must be the GPU's (default). tensorrt_rtx: '8.9' or a list
            '8.6,8.9,12.0' for an ahead-of-time build; default the GPU's when there is one, else every
            supported target from 8.0 on.
        flavour: force "tensorrt" or "tensorrt_rtx" (default: see select_tensorrt).
    Returns:
        the manifest engine entry: {file, graph, onnx_file, precision, trt_flavour, trt_version,
        compute_capability ('8.9' or 'aot:8.0,8.6,...'), profile {min_batch, opt_batch, max_batch},
        plugins [{file, sha256}]}, and target_note for a TensorRT-RTX engine that cannot run on Hopper (also
        printed as one line on stderr).
    Raises:
        EngineError (a ValueError) with a one-line reason; FileExistsError if the engine file exists.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"precision must be fp32 or fp16, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {onnx_path}")
    src = _resolve_graph(onnx_path, precision)
    trt, flav = select_tensorrt(flavour)
    version = str(trt.__version__)
    logger = _make_logger(trt)
    gpu = _cuda_capability()

    # Targets: the full TensorRT builds for the GPU it runs on; TensorRT-RTX can build ahead of time.
    unsupported_hint = ""
    wanted = parse_compute_capabilities(compute_capability) if compute_capability else None
    aot_members: list[Any] = []
    if flav == "tensorrt":
        if gpu is None:
            raise EngineError("the tensorrt module builds only on the GPU the engine will run on and none is "
                              "visible; install tensorrt-rtx-cu13 to build ahead of time without one")
        if wanted is not None and wanted != [gpu]:
            raise EngineError(f"tensorrt builds for this GPU ({cc_str(gpu)}) only, not for "
                              f"{','.join(map(cc_str, wanted))}; use tensorrt_rtx for ahead-of-time builds")
        cc_label = cc_str(gpu)
    else:
        supported = rtx_targets(trt)
        if wanted is None and gpu is not None:
            wanted = [gpu]
            cc_label = cc_str(gpu)
        else:
            if wanted is None:
                wanted = [cc for cc in supported if cc >= DEFAULT_AOT_MIN_CC]
            unsupported = [cc for cc in wanted if cc not in supported]
            if unsupported:
                raise EngineError(f"TensorRT-RTX {version} cannot target compute capability "
                                  f"{','.join(map(cc_str, unsupported))} (supported: "
                                  f"{', '.join(map(cc_str, sorted(supported)))})")
            cc_label = "aot:" + ",".join(map(cc_str, wanted))
        aot_members = [supported[cc] for cc in wanted if cc in supported] if cc_label.startswith("aot:") else []
        if not aot_members and gpu not in supported:
            # Not an official target (e.g. Hopper): let the builder try for the current GPU; it says if it can't.
            unsupported_hint = (f" (TensorRT-RTX {version} officially supports "
                                f"{', '.join(map(cc_str, sorted(supported)))})")

    note = hopper_note(flav, version, cc_label)
    if note is not None:
        print(f"stylecast: note: {note}", file=sys.stderr)
    graph = "synthesis"
    fname = _engine_name(graph, precision, flav, version, cc_label)
    dest = out_dir / fname
    if dest.exists():
        raise FileExistsError(f"{dest} already exists (engines are never overwritten)")

    # Plugins first: the parser resolves stylecast::* nodes through the plugin registry.
    plugins = []
    if plugin_library is not None:
        plugin_library = Path(plugin_library)
        if not plugin_library.is_file():
            raise FileNotFoundError(f"plugin library not found: {plugin_library}")
        plugin_digest = sha256_file(plugin_library)
        existing = out_dir / plugin_library.name
        if existing.exists() and sha256_file(existing) != plugin_digest:
            raise FileExistsError(f"{existing} exists and is a different library than {plugin_library}")
        if flav == "tensorrt" and hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")
        _load_plugin(trt, plugin_library, logger)

    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errs = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logger.errors
        raise EngineError(f"TensorRT ({flav} {version}) cannot parse {src.name}: " + "; ".join(errs))

    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        # fp32 parity with PyTorch (max abs 1e-4) needs true fp32 math; TF32 keeps only 10 mantissa bits.
        config.clear_flag(trt.BuilderFlag.TF32)
    if aot_members:
        config.num_compute_capabilities = len(aot_members)
        for i, member in enumerate(aot_members):
            config.set_compute_capability(member, i)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if any(d < 0 for d in shape[1:]):
            raise EngineError(f"input {t.name} has dynamic non-batch dimensions {shape}")
        lo, mid, hi = (1, 1, max_batch) if t.name.startswith("noise_") else (min_batch, opt_batch, max_batch)
        profile.set_shape(t.name, (lo, *shape[1:]), (mid, *shape[1:]), (hi, *shape[1:]))
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None and flav == "tensorrt":
        tc_path = Path(timing_cache)
        cache = config.create_timing_cache(tc_path.read_bytes() if tc_path.is_file() else b"")
        config.set_timing_cache(cache, False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT ({flav} {version}) failed to build {src.name} for {cc_label}: "
                          + ("; ".join(logger.errors[-3:]) or "no error message") + unsupported_hint)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, bytes(plan))
    os.chmod(dest, 0o644)  # bundle files are world-readable (the temporary file was created 0600)
    if cache is not None:
        atomic_write_bytes(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    if plugin_library is not None:
        # The engine is useless without its plugins, so the library travels with it (serving loads it first).
        copy = out_dir / plugin_library.name
        if not copy.exists():
            shutil.copyfile(plugin_library, copy)
            os.chmod(copy, 0o644)
        plugins.append({"file": copy.name, "sha256": plugin_digest})
    return {
        "file": fname,
        "graph": graph,
        "onnx_file": src.name,
        "precision": precision,
        "trt_flavour": flav,
        "trt_version": version,
        "compute_capability": cc_label,
        "profile": {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch},
        "plugins": plugins,
        **({"target_note": note} if note else {}),
    }
