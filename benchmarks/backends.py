"""Inference backends of the StyleGAN2 synthesis network (Karras et al., 2020) as the benchmarks see them: PyTorch
eager (fp32, bf16, fp16), torch.compile, the compiled CUDA ops (trt_plugins' PyTorch extension), ONNX Runtime
(CPU, CUDA) and TensorRT (fp32, fp16).

Every backend has the same small interface, so the harness can time them side by side:

    b = BACKENDS["ort-cpu"](ctx)
    ok, reason = b.available()        # cheap; (False, why) when this machine cannot run it
    b.setup(G, batch)                 # heavy work (export, engine build, compile) is cached per generator
    x = b.prepare(ws)                 # ws [N, num_ws, w_dim] float32 numpy -> the backend's input, on its device
    out = b.run(x)                    # the timed call: -> img [N, 3, R, R] in the backend's own type/device
    img = b.to_numpy(out)             # float32 numpy [N, 3, R, R], for the correctness check

fp32 backends run in strict fp32 (TF32 off in PyTorch, ONNX Runtime CUDA and TensorRT), so they can be held to
the fp32 PSNR threshold.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# The default CPU set of `make bench` / --quick.
QUICK_BACKENDS = ("torch-fp32", "torch-bf16", "ort-cpu")
REFERENCE_BACKEND = "torch-fp32"


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as "no CUDA"
        return False


@dataclass
class BenchContext:
    """What the backends of one sweep share: where exports go, the device, thread counts, time bounds."""

    work_dir: Path
    device: str = "auto"               # auto | cpu  (auto = cuda when available)
    threads: int = 0                   # CPU threads for torch and ONNX Runtime; 0 = torch's default
    compile_timeout_s: float = 900.0   # bound on torch.compile (enforced in a subprocess, see TorchCompile)
    trt_opt_batch: int = 8             # TensorRT profile: min 1, opt this (clipped), max = largest batch
    trt_max_batch: int = 32
    log: Callable[[str], None] = lambda msg: None
    _onnx: dict = field(default_factory=dict)

    @property
    def use_cuda(self) -> bool:
        return self.device != "cpu" and cuda_available()

    def cpu_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        import torch
        return torch.get_num_threads()

    def onnx_path(self, G, fp16: bool = False) -> Path:
        """synthesis graph of G (output "img" only), exported once per (generator, precision)."""
        key = (id(G), fp16)
        if key not in self._onnx:
            from export.onnx_export import export_synthesis
            path = self.work_dir / f"synthesis_{G.resolution}_{len(self._onnx)}{'_fp16' if fp16 else ''}.onnx"
            t0 = time.perf_counter()
            self.log(f"exporting {path.name} ...")
            export_synthesis(G, path, outputs=("img",), fp16=fp16)
            self.log(f"exported {path.name} in {time.perf_counter() - t0:.1f} s")
            self._onnx[key] = (path, G)  # holding G keeps id(G) from being reused by a later generator
        return self._onnx[key][0]


class Backend:
    """Base class: see the module docstring for the protocol."""

    name = "base"
    precision = "fp32"
    device = "cpu"
    timing = "wall"                 # "wall": perf_counter around a synchronous run; "cuda_events"
    uses_torch_allocator = False    # peak memory from torch.cuda.max_memory_allocated

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.setup_s: float | None = None

    def available(self) -> tuple[bool, str]:
        return True, ""

    def setup(self, G, batch: int) -> None:
        raise NotImplementedError

    def prepare(self, ws: np.ndarray) -> Any:
        return ws

    def run(self, x: Any) -> Any:
        raise NotImplementedError

    def to_numpy(self, out: Any) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# PyTorch


class TorchEager(Backend):
    """G.synthesis in eager mode: fp32, bf16 (autocast), fp16 (half weights, fp32 demodulation, clamp 256, as
    the fp16 export) or with the compiled CUDA ops (impl="cuda")."""

    uses_torch_allocator = True

    def __init__(self, ctx: BenchContext, precision: str = "fp32", impl: str = "ref", name: str | None = None):
        super().__init__(ctx)
        self.precision = precision
        self.impl = impl
        self.device = "cuda" if ctx.use_cuda else "cpu"
        self.timing = "cuda_events" if self.device == "cuda" else "wall"
        self.name = name or f"torch-{precision}"
        self._G = None
        self._key = None

    def available(self) -> tuple[bool, str]:
        if self.impl == "cuda":
            if self.device != "cuda":
                return False, "the compiled CUDA ops need a CUDA device (none here)"
            from training.ops import _dispatch
            if _dispatch.load_extension() is None:
                return False, (f"the stylecast_ops_cuda extension is not built ({_dispatch._ext_error}); "
                               "build it with `make plugins`")
        if self.precision == "fp16" and self.device == "cpu":
            return False, ("fp16 on the CPU: PyTorch has no fast fp16 convolution kernels here (one 256 px batch "
                           "of 2 took ~280 s in a probe, vs ~1 s in fp32); run it on a CUDA device")
        if self.precision == "bf16" and self.device == "cuda":
            import torch
            if not torch.cuda.is_bf16_supported():
                return False, "this GPU has no bf16 support"
        return True, ""

    def _module(self, G):
        import torch
        if self.precision == "fp16":
            from export.onnx_export import half_generator
            Gd = half_generator(G)
        elif self.device == "cuda":
            Gd = copy.deepcopy(G)
        else:
            Gd = G  # read-only use: no copy needed on the CPU
        return Gd.to(self.device).eval().requires_grad_(False), torch

    def setup(self, G, batch: int) -> None:
        if self._key is not G:
            t0 = time.perf_counter()
            self._G, _ = self._module(G)
            self._key = G  # identity: keeps G alive, so no other generator can reuse its id
            self.setup_s = time.perf_counter() - t0

    def prepare(self, ws: np.ndarray):
        import torch
        x = torch.from_numpy(np.ascontiguousarray(ws)).to(self.device)
        return x.half() if self.precision == "fp16" else x

    def _forward(self, x):
        return self._G.synthesis(x, noise_mode="const", impl=self.impl)

    def run(self, x):
        import torch
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(self.device, dtype=torch.bfloat16):
                    return self._forward(x)
            return self._forward(x)

    def sync(self) -> None:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()

    def to_numpy(self, out) -> np.ndarray:
        return out.detach().float().cpu().numpy()

    def close(self) -> None:
        self._G = None


COMPILE_PROBE = r"""
import json, sys, time, torch
from training.networks.stylegan2 import Generator, GeneratorConfig
cfg = GeneratorConfig.from_dict(json.loads(sys.argv[1]))
device, batch = sys.argv[2], int(sys.argv[3])
G = Generator(cfg).eval().requires_grad_(False).to(device)
fn = torch.compile(lambda x: G.synthesis(x, noise_mode="const", impl="ref"), dynamic=True)
x = torch.randn(batch, G.num_ws, G.w_dim, device=device)
t0 = time.perf_counter()
with torch.inference_mode():
    fn(x)
print(json.dumps({"compile_s": time.perf_counter() - t0}))
"""


class TorchCompile(TorchEager):
    """torch.compile (inductor, dynamic batch axis: one compilation per resolution) of the fp32 synthesis.

    Compilation is bounded: it first runs in a subprocess with a timeout (`compile_timeout_s`), which fills
    inductor's on-disk FX graph cache; the in-process compile that follows reuses the cached kernels. A compile
    that does not finish in time makes the backend an error for that resolution instead of stalling the sweep.
    """

    def __init__(self, ctx: BenchContext):
        super().__init__(ctx, "fp32", name="torch-compile")
        self._fn = None

    def available(self) -> tuple[bool, str]:
        import torch
        if not hasattr(torch, "compile"):
            return False, "this PyTorch has no torch.compile"
        if self.device == "cpu":
            if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
                return False, "inductor on the CPU needs a C++ compiler (none on PATH)"
        else:
            try:
                import triton  # noqa: F401
            except ImportError:
                return False, "inductor on CUDA needs triton (not installed)"
        return True, ""

    def setup(self, G, batch: int) -> None:
        if self._key is G:
            return
        import torch
        t0 = time.perf_counter()
        self._probe(G, batch)
        self._G, _ = self._module(G)
        Gd = self._G
        self._fn = torch.compile(lambda x: Gd.synthesis(x, noise_mode="const", impl="ref"), dynamic=True)
        with torch.inference_mode():
            self._fn(torch.randn(batch, G.num_ws, G.w_dim, device=self.device))
        self.sync()
        self._key = G  # identity: keeps G alive, so no other generator can reuse its id
        self.setup_s = time.perf_counter() - t0

    def _probe(self, G, batch: int) -> None:
        import json
        timeout = self.ctx.compile_timeout_s
        self.ctx.log(f"torch.compile at {G.resolution} px (bounded to {timeout:.0f} s) ...")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if self.ctx.threads > 0:
            env["OMP_NUM_THREADS"] = str(self.ctx.threads)
        try:
            r = subprocess.run([sys.executable, "-c", COMPILE_PROBE, json.dumps(G.cfg.to_dict()), self.device,
                                str(max(2, batch))], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"torch.compile did not finish within {timeout:.0f} s "
                               "(raise --compile-timeout)") from None
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"torch.compile failed: {tail[0][:300]}")

    def _forward(self, x):
        return self._fn(x)

    def close(self) -> None:
        self._fn = None
        self._G = None


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime


class OrtBackend(Backend):
    """The exported synthesis graph (reference ops, dynamic batch) in an ONNX Runtime session."""

    def __init__(self, ctx: BenchContext, provider: str = "cpu", precision: str = "fp32"):
        super().__init__(ctx)
        self.provider = provider
        self.precision = precision
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.name = f"ort-{provider}" + ("-fp16" if precision == "fp16" else "")
        self._sess = None
        self._key = None

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed"
        if self.provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return False, (f"this onnxruntime {ort.__version__} build has no CUDAExecutionProvider "
                               "(install onnxruntime-gpu)")
            if not cuda_available():
                return False, "no CUDA device"
        elif self.precision != "fp32":
            return False, "ONNX Runtime on the CPU runs fp16 graphs through slow fallbacks; not benchmarked"
        return True, ""

    def setup(self, G, batch: int) -> None:
        if self._key is G:
            return
        import onnxruntime as ort
        t0 = time.perf_counter()
        path = self.ctx.onnx_path(G, fp16=self.precision == "fp16")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.provider == "cuda":
            opts = {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE",
                    "use_tf32": "0" if self.precision == "fp32" else "1"}
            providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        else:
            so.intra_op_num_threads = self.ctx.cpu_threads()
            so.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
        self._sess = ort.InferenceSession(str(path), so, providers=providers)
        if self.provider == "cuda" and self._sess.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"ONNX Runtime fell back to {self._sess.get_providers()[0]}")
        self._key = G  # identity: keeps G alive, so no other generator can reuse its id
        self.setup_s = time.perf_counter() - t0

    def prepare(self, ws: np.ndarray):
        ws = np.ascontiguousarray(ws, dtype=np.float32)
        if self.provider != "cuda":
            return ws
        import onnxruntime as ort
        return ort.OrtValue.ortvalue_from_numpy(ws, "cuda", 0)

    def run(self, x):
        if self.provider != "cuda":
            return self._sess.run(["img"], {"ws": x})[0]
        binding = self._sess.io_binding()
        binding.bind_ortvalue_input("ws", x)
        binding.bind_output("img", "cuda", 0)
        self._sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()[0]

    def to_numpy(self, out) -> np.ndarray:
        return out.numpy() if hasattr(out, "numpy") and not isinstance(out, np.ndarray) else np.asarray(out)

    def close(self) -> None:
        self._sess = None


# ----------------------------------------------------------------------------------------------------------
# TensorRT


class TensorRTBackend(Backend):
    """A TensorRT engine built from the exported synthesis graph (fp32: TF32 off; fp16: from the fp16 graph,
    which keeps demodulation in fp32 and clamps activations). One engine per resolution and precision with the
    profile min 1 / opt ctx.trt_opt_batch / max ctx.trt_max_batch; I/O buffers are torch CUDA tensors and
    execution is enqueued on torch's current stream, so CUDA events time it."""

    timing = "cuda_events"
    device = "cuda"

    def __init__(self, ctx: BenchContext, precision: str = "fp32"):
        super().__init__(ctx)
        self.precision = precision
        self.name = f"trt-{precision}"
        self._engine = self._context = None
        self._key = None
        self._res = 0

    def available(self) -> tuple[bool, str]:
        if not cuda_available():
            return False, "TensorRT needs a CUDA device (none here)"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "the tensorrt Python package is not installed (pip install tensorrt)"
        return True, ""

    def setup(self, G, batch: int) -> None:
        if self._key is G:
            return
        import tensorrt as trt
        t0 = time.perf_counter()
        path = self.ctx.onnx_path(G, fp16=self.precision == "fp16")
        self.ctx.log(f"building TensorRT {self.precision} engine at {G.resolution} px ...")
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {path.name}: {errs[:400]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 8 << 30)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
        mx = self.ctx.trt_max_batch
        opt = min(self.ctx.trt_opt_batch, mx)
        profile = builder.create_optimization_profile()
        shape = (G.num_ws, G.w_dim)
        profile.set_shape("ws", (1, *shape), (opt, *shape), (mx, *shape))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT engine build failed")
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        self._context = self._engine.create_execution_context()
        self._res = G.resolution
        self._key = G  # identity: keeps G alive, so no other generator can reuse its id
        self.setup_s = time.perf_counter() - t0

    def prepare(self, ws: np.ndarray):
        import torch
        return torch.from_numpy(np.ascontiguousarray(ws, dtype=np.float32)).cuda()

    def run(self, x):
        import torch
        n = x.shape[0]
        if n > self.ctx.trt_max_batch:
            raise RuntimeError(f"batch {n} > engine max batch {self.ctx.trt_max_batch}")
        out = torch.empty((n, 3, self._res, self._res), device="cuda", dtype=torch.float32)
        self._context.set_input_shape("ws", tuple(x.shape))
        self._context.set_tensor_address("ws", x.data_ptr())
        self._context.set_tensor_address("img", out.data_ptr())
        if not self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out

    def to_numpy(self, out) -> np.ndarray:
        return out.float().cpu().numpy()

    def close(self) -> None:
        self._context = self._engine = None


# ----------------------------------------------------------------------------------------------------------
# Registry

BACKENDS: dict[str, Callable[[BenchContext], Backend]] = {
    "torch-fp32": lambda ctx: TorchEager(ctx, "fp32"),
    "torch-bf16": lambda ctx: TorchEager(ctx, "bf16"),
    "torch-fp16": lambda ctx: TorchEager(ctx, "fp16"),
    "torch-compile": TorchCompile,
    "torch-plugin": lambda ctx: TorchEager(ctx, "fp32", impl="cuda", name="torch-plugin"),
    "ort-cpu": lambda ctx: OrtBackend(ctx, "cpu"),
    "ort-cuda": lambda ctx: OrtBackend(ctx, "cuda"),
    "ort-cuda-fp16": lambda ctx: OrtBackend(ctx, "cuda", "fp16"),
    "trt-fp32": lambda ctx: TensorRTBackend(ctx, "fp32"),
    "trt-fp16": lambda ctx: TensorRTBackend(ctx, "fp16"),
}

# Known but not built into the harness, reported as skipped with the reason.
NOT_IMPLEMENTED = {
    "trt-plugin": "TensorRT engine with the stylecast::ModulatedConv2d plugin: needs export.plugin_graph and the "
                  "plugin library; not wired into the benchmark yet",
}


def parse_backends(spec: str | None, quick: bool = False) -> list[str]:
    """'all' | 'quick' | comma-separated names -> names in registry order.

    Raises:
        ValueError: on an unknown name.
    """
    if not spec:
        spec = "quick" if quick else "all"
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            names += list(BACKENDS) + list(NOT_IMPLEMENTED)
        elif part == "quick":
            names += list(QUICK_BACKENDS)
        elif part in BACKENDS or part in NOT_IMPLEMENTED:
            names.append(part)
        else:
            raise ValueError(f"unknown backend {part!r}; choose from all, quick, "
                             + ", ".join(list(BACKENDS) + list(NOT_IMPLEMENTED)))
    order = list(BACKENDS) + list(NOT_IMPLEMENTED)
    return sorted(set(names), key=order.index)


def default_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="stylecast-bench-"))
