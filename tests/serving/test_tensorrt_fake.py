"""The TensorRT backend's control flow with a fake `tensorrt` module and fake CUDA runtime (no GPU here).

The fake engine runs the bundle's synthesis.onnx in ONNX Runtime on the "device" buffers, so the whole path
(selection, plugin checksums and registration before deserialising, buffers, padding to the profile minimum,
the golden check, batching) runs for real up to the TensorRT and CUDA calls themselves.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import types

import grpc
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)

PLAN = b"FAKE-TENSORRT-PLAN"


class FakeCudart(types.SimpleNamespace):
    """cuda-python's runtime API shape: calls return (error, value...) tuples; 'device' memory is host memory."""

    def __init__(self):
        super().__init__(cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))
        self.allocs: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []

    def cudaStreamCreate(self):
        return 0, 1234

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaMalloc(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        self.allocs[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.freed.append(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


def fake_tensorrt(bundle, events: list, min_batch: int = 2, max_batch: int = 4) -> types.ModuleType:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(bundle / "synthesis.onnx"), providers=["CPUExecutionProvider"])
    manifest = json.loads((bundle / "manifest.json").read_text())["model"]
    num_ws, w_dim, res = manifest["num_ws"], manifest["w_dim"], manifest["resolution"]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.14.1.48"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT="f32", UINT8="u8")
    trt.nptype = lambda dt: {"f32": np.float32, "u8": np.uint8}[dt]
    trt.init_libnvinfer_plugins = lambda logger, ns: events.append("init_plugins")

    class Registry:
        def load_library(self, path):
            events.append(f"load_library:{path.rsplit('/', 1)[-1]}")
            return object()

    registry = Registry()
    trt.get_plugin_registry = lambda: registry
    shapes = {"ws": lambda n: (n, num_ws, w_dim), "img": lambda n: (n, 3, res, res),
              "img_u8": lambda n: (n, res, res, 3)}

    class Context:
        def __init__(self):
            self.n = None
            self.addr = {}

        def set_input_shape(self, name, shape):
            assert name == "ws" and min_batch <= shape[0] <= max_batch, shape
            self.n = shape[0]

        def get_tensor_shape(self, name):
            return shapes[name](self.n)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            assert isinstance(stream, int)
            events.append(f"execute:{self.n}")
            nbytes = self.n * num_ws * w_dim * 4
            ws = np.frombuffer((ctypes.c_char * nbytes).from_address(self.addr["ws"]), np.float32)
            img_u8 = sess.run(["img_u8"], {"ws": ws.reshape(self.n, num_ws, w_dim).copy()})[0]
            ctypes.memmove(self.addr["img_u8"], img_u8.ctypes.data, img_u8.nbytes)
            return True

    class Engine:
        num_io_tensors = 3

        def get_tensor_name(self, i):
            return ["ws", "img", "img_u8"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "ws" else "out"

        def get_tensor_dtype(self, name):
            return "u8" if name == "img_u8" else "f32"

        def get_tensor_profile_shape(self, name, profile):
            return [shapes["ws"](min_batch), shapes["ws"](min_batch), shapes["ws"](max_batch)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            events.append("deserialize")
            return Engine() if data == PLAN else None

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def trt_bundle(tmp_path, tiny_bundle, copy_bundle, edit_manifest):
    """The tiny bundle plus a (fake) TensorRT engine with a plugin library, all checksummed in the manifest."""
    b = copy_bundle(tiny_bundle, tmp_path / "models" / "tiny")
    (b / "synthesis.fp32.plan").write_bytes(PLAN)
    (b / "libstylecast_trt_plugins.so").write_bytes(b"\x7fELF fake plugin")

    def add(m):
        for f in ("synthesis.fp32.plan", "libstylecast_trt_plugins.so"):
            data = (b / f).read_bytes()
            m["files"][f] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        m["engines"] = [{"file": "synthesis.fp32.plan", "graph": "synthesis", "precision": "fp32",
                         "trt_flavour": "tensorrt", "trt_version": "10.14.1.48", "compute_capability": "9.0",
                         "profile": {"min_batch": 2, "opt_batch": 2, "max_batch": 4},
                         "plugins": [{"file": "libstylecast_trt_plugins.so",
                                      "sha256": m["files"]["libstylecast_trt_plugins.so"]["sha256"]}]}]
    edit_manifest(b, add)
    return b


@pytest.fixture
def fake_gpu(monkeypatch, trt_bundle):
    import serving.backends as B
    events: list[str] = []
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(trt_bundle, events))
    monkeypatch.setattr(B, "_cudart", lambda: cudart)
    probe = B.SystemProbe(("CPUExecutionProvider",), "tensorrt", "10.14.1.48", "9.0")
    return types.SimpleNamespace(events=events, cudart=cudart, probe=probe)


def test_tensorrt_runner_pads_to_the_profile_and_frees(trt_bundle, fake_gpu):
    import onnxruntime as ort

    from serving.backends import TensorRTSynthesis
    runner = TensorRTSynthesis(trt_bundle / "synthesis.fp32.plan", [trt_bundle / "libstylecast_trt_plugins.so"],
                               "tensorrt", "fp32")
    assert fake_gpu.events == ["init_plugins", "load_library:libstylecast_trt_plugins.so", "deserialize"]
    assert (runner.min_batch, runner.max_batch, runner.name) == (2, 4, "tensorrt:fp32")
    ws = np.random.default_rng(0).standard_normal((3, 8, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(trt_bundle / "synthesis.onnx")).run(["img_u8"], {"ws": ws})[0]
    np.testing.assert_array_equal(runner(ws[:1]), ref[:1])  # padded to 2 rows, 1 returned
    np.testing.assert_array_equal(runner(ws), ref)
    assert fake_gpu.events[-2:] == ["execute:2", "execute:3"]
    runner.close()
    assert sorted(fake_gpu.cudart.freed) == sorted(fake_gpu.cudart.allocs)


def test_server_on_a_tensorrt_engine(trt_bundle, fake_gpu, server_factory):
    srv = server_factory(trt_bundle.parent, backend="tensorrt", probe=fake_gpu.probe,
                         batch={"max_batch": 8, "max_queue_delay_ms": 0})
    with srv.client() as c:
        info = c.get_model("tiny")
        assert info.ready and info.backend == "tensorrt:fp32" and info.max_batch == 4  # capped by the engine
        images = c.generate("tiny", seeds=list(range(6)), psi=0.7, fmt="raw")
    from serving.offline import BundleRenderer
    ref = BundleRenderer(trt_bundle).render_u8(list(range(6)), psi=0.7)
    np.testing.assert_array_equal(np.stack([im.to_numpy() for im in images]), ref)
    assert all(int(e.split(":")[1]) <= 4 for e in fake_gpu.events if e.startswith("execute:"))


def test_tampered_plugin_is_never_loaded(trt_bundle, fake_gpu, server_factory):
    (trt_bundle / "libstylecast_trt_plugins.so").write_bytes(b"tampered")
    srv = server_factory(trt_bundle.parent, backend="tensorrt", probe=fake_gpu.probe)
    with srv.client() as c:
        info = c.get_model("tiny")
        assert not info.ready and "sha256" in info.error
        with pytest.raises(grpc.RpcError) as e:
            c.generate("tiny", seeds=[0])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not any(e.startswith("load_library") for e in fake_gpu.events)  # a bad plugin is never loaded


def test_auto_falls_back_to_onnxruntime_when_the_engine_fails(trt_bundle, fake_gpu, server_factory,
                                                              refresh_file_entry):
    (trt_bundle / "synthesis.fp32.plan").write_bytes(b"NOT-A-PLAN")  # checksum updated: only TensorRT can tell
    refresh_file_entry(trt_bundle, "synthesis.fp32.plan")
    srv = server_factory(trt_bundle.parent, backend="auto", probe=fake_gpu.probe)
    with srv.client() as c:
        info = c.get_model("tiny")
        assert info.ready and info.backend == "onnxruntime:CPUExecutionProvider"
        assert len(c.generate("tiny", seeds=[0])) == 1
    forced = server_factory(trt_bundle.parent, backend="tensorrt", probe=fake_gpu.probe)
    with forced.client() as c:
        info = c.get_model("tiny")
    assert not info.ready and "could not deserialise" in info.error
