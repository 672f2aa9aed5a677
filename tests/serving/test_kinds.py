"""Model kinds as plug-ins: the front ends hold no per-kind code, a kind's tensor declarations are all an inference
protocol needs (a new kind registered in one line is served over KServe v2 by a real server, metadata, config and
inference, without touching a front end), the golden comparisons against their textbook rules, and the torch-free
`export verify`."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FRONT_ENDS = ["serving/style_service.py", "serving/kserve.py", "serving/inference.py", "serving/plumbing.py",
              "serving/repository.py", "serving/photo.py", "serving/verify.py"]


# ----------------------------------------------------------------------------------------------------------
# No per-kind branches in the front ends


def _code_names(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(identifiers and imported names, string constants other than docstrings, the names isinstance / issubclass
    test against) of a module."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    names, strings, tested = set(), set(), set()
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "issubclass")
                and len(n.args) == 2):
            tested |= {x.id if isinstance(x, ast.Name) else getattr(x, "attr", "") for x in ast.walk(n.args[1])}
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            names.add(n.attr)
        elif isinstance(n, ast.ImportFrom):
            names |= {a.name for a in n.names} | {n.module or ""}
        elif isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            strings.add(n.value)
    return names, strings, tested


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_front_ends_know_no_kind(front_end):
    """No kind class, kind module or kind name in the code of a front end (docstrings may name them)."""
    from serving.kinds import MODEL_KINDS
    names, strings, tested = _code_names(ROOT / front_end)
    kind_classes = {cls.__name__ for cls in MODEL_KINDS.values()}
    kind_modules = {cls.__module__ for cls in MODEL_KINDS.values()} | {m.rpartition(".")[2] for m in
                                                                       (cls.__module__ for cls in MODEL_KINDS.values())}
    assert not names & (kind_classes | kind_modules | {"StyleRequest", "Style"}), names & (kind_classes | kind_modules)
    assert not strings & set(MODEL_KINDS), strings & set(MODEL_KINDS)
    assert not tested & {"LoadedModel", "LatentModel", *kind_classes}, tested  # capabilities, not classes


# ----------------------------------------------------------------------------------------------------------
# A new kind is one module and one registry line: the inference protocol derives everything from its tensors


def _echo_kind():
    """A minimal kind: one endpoint X FP32 [-1, 4] (+ optional SCALE FP32 [-1, 1]) -> Y = X * scale, and a ".sum"
    endpoint; golden check: scale 2 on golden X reproduces golden Y."""
    from serving import golden as G
    from serving.models import LoadedModel
    from serving.tensors import Endpoint, TensorSpec

    class EchoModel(LoadedModel):
        kind = "echo"

        @classmethod
        def _open(cls, path, manifest, version, **kw):
            m = cls(manifest["name"], version, path, manifest)
            m.backend_name = "onnxruntime:CPUExecutionProvider"
            return m

        def golden_checks(self, thorough=False):
            gold = G.Golden(self.path, self.manifest)
            return [G.close("echo", "y", gold["x"] * 2, gold["y"], gold.tolerance["max_abs_fp32"])]

        def endpoints(self):
            x = TensorSpec("X", "FP32", (-1, 4))
            return {"": Endpoint("", (x, TensorSpec("SCALE", "FP32", (-1, 1), optional=True)),
                                 (TensorSpec("Y", "FP32", (-1, 4)),)),
                    ".sum": Endpoint(".sum", (x,), (TensorSpec("S", "FP32", (-1, 1)),))}

        async def infer(self, suffix, inputs, params, ctx):
            if suffix == ".sum":
                return {"S": inputs["X"].sum(axis=1, keepdims=True)}
            return {"Y": inputs["X"] * inputs.get("SCALE", np.float32(2.0))}

    return EchoModel


def _write_echo_bundle(root: Path) -> Path:
    from common.files import sha256_file
    b = root / "echo"
    b.mkdir(parents=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(b / "golden.npz", x=x, y=x * 2)
    doc = {"format": "stylecast.bundle/v1", "name": "echo", "kind": "echo", "stylecast_version": "0", "opset": 17,
           "model": {}, "source": {"sha256": "0" * 64},
           "files": {"golden.npz": {"sha256": sha256_file(b / "golden.npz"), "bytes": (b / "golden.npz").stat().st_size}},
           "graphs": {}, "engines": [], "golden": {"file": "golden.npz"}}
    (b / "manifest.json").write_text(json.dumps(doc))
    return b


def test_a_new_kind_is_served_over_kserve_from_its_declarations(tmp_path, server_factory, monkeypatch):
    import protos.manifest as manifest
    import serving.kinds
    from protos.inference import grpc_service_pb2 as ipb
    from protos.inference import grpc_service_pb2_grpc as ipb_grpc
    monkeypatch.setitem(manifest.KIND_RULES, "echo", lambda doc, graphs, files: [])  # its schema section
    monkeypatch.setitem(serving.kinds.MODEL_KINDS, "echo", _echo_kind())            # its registry line
    _write_echo_bundle(tmp_path / "models")
    srv = server_factory(tmp_path / "models")
    with grpc.insecure_channel(srv.target) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        meta = stub.ModelMetadata(ipb.ModelMetadataRequest(name="echo"), timeout=10)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("X", "FP32", [-1, 4]),
                                                                              ("SCALE", "FP32", [-1, 1])]
        cfg = stub.ModelConfig(ipb.ModelConfigRequest(name="echo.sum"), timeout=10).config
        assert [(t.name, list(t.dims)) for t in cfg.input] == [("X", [4])] and cfg.output[0].name == "S"
        req = ipb.ModelInferRequest(model_name="echo", id="r1")
        x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
        req.inputs.add(name="X", datatype="FP32", shape=[2, 4])
        req.raw_input_contents.append(x.tobytes())
        resp = stub.ModelInfer(req, timeout=10)
        assert resp.id == "r1" and resp.outputs[0].name == "Y" and list(resp.outputs[0].shape) == [2, 4]
        assert np.array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4), x * 2)
        req = ipb.ModelInferRequest(model_name="echo.sum")
        req.inputs.add(name="X", datatype="FP32", shape=[2, 4])
        req.inputs[0].contents.fp32_contents.extend(x.reshape(-1).tolist())
        resp = stub.ModelInfer(req, timeout=10)
        assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [10.0, 26.0]
        for name in ("echo.synthesis", "echo.stylize"):  # endpoints the kind does not declare
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelMetadata(ipb.ModelMetadataRequest(name=name), timeout=10)
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "it serves: echo, echo.sum" in ei.value.details()
        bad = ipb.ModelInferRequest(model_name="echo")
        bad.inputs.add(name="X", datatype="FP32", shape=[1, 3])
        bad.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(bad, timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'X'" in ei.value.details()
    # StyleService asks the same model what it can do: it does not generate, stylize or have a style library.
    from protos.stylecast.v1 import style_pb2 as pb
    with srv.client() as c:
        info = {m.name: m for m in c.list_models()}["echo"]
        assert info.ready and info.kind == "echo"
        for call, code in ((lambda: c.stub.Generate(pb.GenerateRequest(model="echo"), timeout=10),
                            grpc.StatusCode.INVALID_ARGUMENT),
                           (lambda: c.stub.Stylize(pb.StylizeRequest(model="echo", image=b"x"), timeout=10),
                            grpc.StatusCode.FAILED_PRECONDITION),
                           (lambda: c.stub.ListStyles(pb.ListStylesRequest(model="echo"), timeout=10),
                            grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == code and "'echo' model" in ei.value.details()


def test_model_names_with_dots_split_at_the_longest_bundle_name():
    from serving.inference import InferenceProtocol

    class Repo:
        models = {"a": None, "a.b": None}

        def status(self, name):
            return None
    core = InferenceProtocol(Repo(), None)
    assert core.split("a.b") == ("a.b", "")
    assert core.split("a.b.synthesis") == ("a.b", ".synthesis")
    assert core.split("a.synthesis") == ("a", ".synthesis")
    assert core.split("nope.synthesis") == ("nope.synthesis", "")
    assert core.label("a.b.stylize") == "a.b.stylize" and core.label("zz.stylize") == "_unknown"


# ----------------------------------------------------------------------------------------------------------
# Golden comparisons against their rules restated


def test_psnr_is_the_textbook_formula():
    from serving.golden import psnr
    rs = np.random.RandomState(0)
    a = rs.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    b = a + rs.normal(0, 0.01, a.shape).astype(np.float32)
    mse = sum((float(x) - float(y)) ** 2 for x, y in zip(a.reshape(-1), b.reshape(-1))) / a.size
    assert psnr(b, a) == pytest.approx(10 * math.log10(2.0 ** 2 / mse), rel=1e-9)
    assert psnr(a, a) == math.inf


@pytest.mark.parametrize("precision, levels, frac, ok", [
    ("fp32", 1, 0.01, True), ("fp32", 2, 0.005, False), ("fp32", 1, 0.02, False),
    ("fp16", 8, 0.25, True), ("fp16", 9, 0.01, False), ("fp16", 1, 0.3, False),
])
def test_uint8_images_pass_within_levels_and_fraction(precision, levels, frac, ok):
    from protos.manifest import GOLDEN_TOLERANCE
    from serving.golden import image
    ref = np.full((1, 10, 10, 3), 100, np.uint8)
    val = ref.copy()
    k = round(frac * ref.size)
    val.reshape(-1)[:k] += np.uint8(levels)
    c = image("synthesis", "img_u8", val, ref, precision, GOLDEN_TOLERANCE)
    assert c.ok is ok and c.max_abs == levels


def test_float_images_fp32_max_abs_fp16_psnr():
    from protos.manifest import GOLDEN_TOLERANCE
    from serving.golden import image
    ref = np.zeros((1, 3, 4, 4), np.float32)
    assert image("s", "img", ref + np.float32(1e-4), ref, "fp32", GOLDEN_TOLERANCE).ok
    assert not image("s", "img", ref + np.float32(2e-4), ref, "fp32", GOLDEN_TOLERANCE).ok
    # PSNR 40 dB over a peak-to-peak of 2 is an RMS error of 0.02
    assert image("s", "img", ref + np.float32(0.0199), ref, "fp16", GOLDEN_TOLERANCE).ok
    assert not image("s", "img", ref + np.float32(0.0201), ref, "fp16", GOLDEN_TOLERANCE).ok
    bad = image("s", "img", ref[:, :2], ref, "fp32", GOLDEN_TOLERANCE)
    assert not bad.ok and "shape [1, 2, 4, 4] != golden [1, 3, 4, 4]" in bad.note


# ----------------------------------------------------------------------------------------------------------
# `stylecast export verify` without torch


BLOCK_TORCH = r'''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "training", "export", "open_clip"):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
from stylecast.cli import main
main(sys.argv[1:])
'''


def test_export_verify_runs_without_torch(tiny_bundle, tmp_path):
    """The server-only install has no torch: `stylecast export verify` must not need it (nor training, export)."""
    def run(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_TORCH, "export", "verify", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    r = run(tiny_bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"{tiny_bundle}: verified"
    r = run(tiny_bundle, "--provider", "NoSuchExecutionProvider")
    assert r.returncode == 3 and "NOT VERIFIED (execution provider NoSuchExecutionProvider not available" in r.stdout
    r = run(tiny_bundle, "--engines", "only")
    assert r.returncode == 3 and "NOT VERIFIED (the bundle has no TensorRT engines)" in r.stdout
    # the blocker works: the same interpreter cannot export (which needs torch)
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "export", "onnx", "-c", str(tmp_path), "-o",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ImportError: blocked: " in r.stderr
