"""fast_style bundles through a real server: Stylize (unary) and StylizeStream (bidirectional), size limits,
corrupt images, the golden check and the wrong model kind."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

MAX_SIZE = 96


@pytest.fixture(scope="module")
def style_bundle(tmp_path_factory) -> Path:
    from export.fast_style_bundle import build_fast_style_bundle
    from training.style.fast_style import TransformerNetConfig, build_transformer_net, save_fast_style
    net = build_transformer_net(TransformerNetConfig(channels=4, res_blocks=1), seed=5)
    ckpt = save_fast_style(tmp_path_factory.mktemp("fs") / "ckpt", net)
    return build_fast_style_bundle(ckpt, tmp_path_factory.mktemp("fsb") / "toon", "toon", max_size=MAX_SIZE)


@pytest.fixture(scope="module")
def reference(style_bundle):
    """img_u8 [H, W, 3] -> the stylized img_u8 straight from ONNX Runtime (no server)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(style_bundle / "stylizer.onnx"), providers=["CPUExecutionProvider"])

    def run(u8: np.ndarray) -> np.ndarray:
        x = u8.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1
        y = sess.run(None, {"img": x})[0][0]
        return np.clip(np.round((y + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return run


@pytest.fixture(scope="module")
def server(tmp_path_factory, style_bundle, tiny_bundle):
    import importlib.util  # the tests run with --import-mode=importlib: load conftest's ServerThread by path
    spec = importlib.util.spec_from_file_location("serving_conftest", Path(__file__).with_name("conftest.py"))
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(style_bundle, models / "toon")
    shutil.copytree(tiny_bundle, models / "tiny")
    s = conf.ServerThread(models)
    yield s
    s.close()


def png(u8: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def decode(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def req(model: str, data: bytes, **out):
    from protos.stylecast.v1 import common_pb2 as cpb
    from protos.stylecast.v1 import style_pb2 as pb
    return pb.StylizeRequest(model=model, image=data, output=cpb.OutputOptions(**out))


def test_model_listed_ready(server):
    with server.client() as c:
        m = {m.name: m for m in c.list_models()}["toon"]
    assert m.ready and m.kind == "fast_style" and m.max_image_size == MAX_SIZE
    assert m.backend.startswith("onnxruntime:")


@pytest.mark.parametrize("hw", [(37, 53), (64, 48)])
def test_stylize_unary_matches_onnxruntime(server, reference, hw):
    u8 = photo(*hw, seed=hw[0])
    with server.client() as c:
        resp = c.stub.Stylize(req("toon", png(u8)), timeout=30)
    assert (resp.image.width, resp.image.height) == (hw[1], hw[0])
    assert resp.model == "toon" and resp.model_version and resp.request_id
    out = decode(resp.image.data)
    diff = np.abs(out.astype(int) - reference(u8).astype(int))
    assert out.shape == (*hw, 3) and diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_stylize_jpeg_exif_and_output_options(server):
    from PIL import Image
    u8 = photo(20, 40)
    im = Image.fromarray(u8)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    from protos.stylecast.v1 import common_pb2 as cpb
    with server.client() as c:
        r = c.stub.Stylize(req("toon", buf.getvalue()), timeout=30)
        assert (r.image.width, r.image.height) == (20, 40)  # transposed by the EXIF orientation
        r = c.stub.Stylize(req("toon", png(u8), format=cpb.IMAGE_FORMAT_RAW_RGB8, width=80), timeout=30)
        assert (r.image.width, r.image.height) == (80, 40) and len(r.image.data) == 80 * 40 * 3


def test_stylize_errors(server):
    from PIL import Image
    with server.client() as c:
        def code(request):
            with pytest.raises(grpc.RpcError) as ei:
                c.stub.Stylize(request, timeout=30)
            return ei.value.code(), ei.value.details()
        st, msg = code(req("toon", png(photo(MAX_SIZE + 1, 10))))
        assert st == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in msg
        st, msg = code(req("toon", png(photo(40, 40))[:200]))  # truncated PNG
        assert st == grpc.StatusCode.INVALID_ARGUMENT and "cannot decode" in msg
        assert code(req("toon", b"not an image"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code(req("toon", b""))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code(req("toon", png(photo(3, 30))))[0] == grpc.StatusCode.INVALID_ARGUMENT
        buf = io.BytesIO()
        Image.fromarray(photo(10, 10)).save(buf, format="BMP")
        st, msg = code(req("toon", buf.getvalue()))
        assert st == grpc.StatusCode.INVALID_ARGUMENT and "not supported" in msg
        # a decompression bomb: a tiny PNG that claims 20000 x 20000 px is refused from its header
        big = Image.new("1", (20000, 20000))
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        assert len(buf.getvalue()) < 200_000
        st, msg = code(req("toon", buf.getvalue()))
        assert st == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in msg
        big = Image.new("1", (MAX_SIZE * 4, 8))  # under PIL's own guard, over the model's limit
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        st, msg = code(req("toon", buf.getvalue()))
        assert st == grpc.StatusCode.INVALID_ARGUMENT and f"{MAX_SIZE * 4}x8 exceeds" in msg
        st, msg = code(req("tiny", png(photo(16, 16))))
        assert st == grpc.StatusCode.FAILED_PRECONDITION and "stylegan2" in msg and "no encoder" in msg
        assert code(req("nope", png(photo(16, 16))))[0] == grpc.StatusCode.NOT_FOUND


def test_stylize_stream_in_order_with_bad_frame(server, reference):
    frames = [photo(16 + 3 * i, 24 + 2 * i, seed=i) for i in range(10)]
    data = [png(f) for f in frames]
    data[4] = b"\x89PNG corrupt"
    data[7] = png(photo(MAX_SIZE + 5, 12))  # too large: also answered in-stream
    with server.client() as c:
        requests = [req("toon" if i == 0 else "", d) for i, d in enumerate(data)]
        out = list(c.stub.StylizeStream(iter(requests), timeout=60))
    assert [r.index for r in out] == list(range(10))
    assert out[4].error and out[4].error_code == "INVALID_ARGUMENT" and not out[4].HasField("image")
    assert out[7].error_code == "INVALID_ARGUMENT" and "exceeds" in out[7].error
    for i, r in enumerate(out):
        if i in (4, 7):
            continue
        assert not r.error
        got = decode(r.image.data)
        assert got.shape == frames[i].shape
        assert np.abs(got.astype(int) - reference(frames[i]).astype(int)).max() <= 1


def test_stylize_stream_stays_open_after_bad_frame(server):
    """Bidirectional: the client sees the error answer of a bad frame before it sends the next frame."""
    import queue
    q: queue.Queue = queue.Queue()

    def gen():
        while (item := q.get()) is not None:
            yield item
    with server.client() as c:
        call = c.stub.StylizeStream(gen(), timeout=60)
        q.put(req("toon", b"garbage"))
        first = next(call)
        assert first.index == 0 and first.error_code == "INVALID_ARGUMENT"
        q.put(req("", png(photo(20, 20))))
        second = next(call)
        assert second.index == 1 and not second.error and second.image.width == 20
        q.put(req("other-model", png(photo(20, 20))))
        third = next(call)
        assert third.index == 2 and third.error_code == "INVALID_ARGUMENT"
        q.put(None)
        assert list(call) == []


def test_stylize_stream_wrong_kind_ends_call(server):
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as ei:
            list(c.stub.StylizeStream(iter([req("tiny", png(photo(16, 16)))]), timeout=30))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_tampered_golden_refused(tmp_path, style_bundle, server_factory, refresh_file_entry):
    bad = shutil.copytree(style_bundle, tmp_path / "models" / "bad")
    with np.load(bad / "golden.npz") as g:
        arrays = {k: g[k] for k in g.files}
    arrays["out_0"] = arrays["out_0"] + 0.05
    np.savez(bad / "golden.npz", **arrays)
    refresh_file_entry(bad, "golden.npz")
    srv = server_factory(tmp_path / "models")
    with srv.client() as c:
        m = {m.name: m for m in c.list_models()}["toon"]
    assert not m.ready and "golden check failed" in m.error


def test_repository_api_without_grpc(style_bundle, tmp_path):
    """What another front end (KServe v2) uses: repository.acquire(name) -> FastStyleModel.decode / stylize."""
    import asyncio
    from serving.fast_style_model import FastStyleModel
    from serving.repository import ModelRepository
    shutil.copytree(style_bundle, tmp_path / "toon")

    async def main():
        repo = ModelRepository(tmp_path)
        await repo.scan()
        try:
            with repo.acquire("toon") as model:
                assert isinstance(model, FastStyleModel)
                img = model.decode(png(photo(30, 21)))
                out = await model.stylize(img)
                assert out.shape == (30, 21, 3) and out.dtype == np.uint8
                from serving.errors import InvalidArgument
                with pytest.raises(InvalidArgument):
                    await model.stylize(photo(MAX_SIZE + 1, 8))
        finally:
            await repo.close()
    asyncio.run(main())


def test_fast_style_over_kserve(server, reference):
    """The fast_style bundle over the KServe v2 endpoint (our own stubs in-process): IMAGE -> STYLIZED."""
    import grpc

    from protos.inference import grpc_service_pb2 as ipb
    from protos.inference import grpc_service_pb2_grpc as ipb_grpc

    u8 = np.stack([photo(21, 34, seed=1), photo(21, 34, seed=2)])
    with grpc.insecure_channel(server.target) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        meta = stub.ModelMetadata(ipb.ModelMetadataRequest(name="toon"), timeout=10)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("IMAGE", "UINT8", [-1, -1, -1, 3])]
        assert [t.name for t in meta.outputs] == ["STYLIZED"]
        request = ipb.ModelInferRequest(model_name="toon", id="f1")
        request.inputs.add(name="IMAGE", datatype="UINT8", shape=list(u8.shape))
        request.raw_input_contents.append(u8.tobytes())
        resp = stub.ModelInfer(request, timeout=30)
        assert resp.id == "f1" and resp.outputs[0].name == "STYLIZED" and list(resp.outputs[0].shape) == [2, 21, 34, 3]
        out = np.frombuffer(resp.raw_output_contents[0], np.uint8).reshape(u8.shape)
        for got, src in zip(out, u8):
            diff = np.abs(got.astype(int) - reference(src).astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
        # Oversize and wrongly shaped images name the tensor; a synthesis suffix does not exist for fast_style.
        big = ipb.ModelInferRequest(model_name="toon")
        big.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, MAX_SIZE + 1, 8, 3])
        big.raw_input_contents.append(bytes((MAX_SIZE + 1) * 8 * 3))
        bad = ipb.ModelInferRequest(model_name="toon")
        bad.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 8, 8, 4])
        bad.raw_input_contents.append(bytes(8 * 8 * 4))
        for r in (big, bad):
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelInfer(r, timeout=30)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelMetadata(ipb.ModelMetadataRequest(name="toon.synthesis"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
