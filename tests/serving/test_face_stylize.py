"""Stylize / StylizeStream on face models through a real server: the astronaut and Grace Hopper photos are detected,
FFHQ-aligned, encoded by the bundle's encoder.onnx, rendered by the chosen (possibly adapted) model and pasted back.

The reference for every image is the same pipeline assembled here by hand from its parts (common.faces for the
geometry, ONNX Runtime sessions opened directly on the bundle files), so a wrong encoder, a wrong latent space, a
wrong face, a wrong paste or a wrong resize in the server shows up as a pixel difference.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.stylecast.v1 import style_pb2 as pb
from serving.client import face_options, output_options
from common import faces as F

pytestmark = pytest.mark.timeout(300)

ENC_SIZE = 64  # the tiny encoder's input size
RES = 32       # the tiny generator's resolution
MAX_FACES = 2  # the server's --max-faces


# ----------------------------------------------------------------------------------------------------------
# Fixtures: bundles, a server, photos, a hand-assembled reference pipeline


def _conftest():
    spec = importlib.util.spec_from_file_location("serving_conftest", Path(__file__).with_name("conftest.py"))
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_cfg, tiny_bundle):
    """face: tiny G + a tiny pSp encoder in the official .pt layout; toon: another G sharing face's latent space
    (--encoder-from); tiny: a plain bundle without encoder or latent space."""
    import torch

    from export.bundle import BundleOptions, build_bundle
    from training.checkpoints import save_native
    from training.inversion.encoders import EncoderConfig, build_encoder, save_official
    from training.networks import Generator

    root = tmp_path_factory.mktemp("face_bundles")
    torch.manual_seed(11)
    G = Generator(tiny_cfg).eval()
    torch.manual_seed(12)
    G_toon = Generator(tiny_cfg).eval()
    torch.manual_seed(13)
    enc = build_encoder(EncoderConfig.tiny(n_styles=G.num_ws, w_dim=G.w_dim, input_size=ENC_SIZE)).eval()
    with torch.no_grad():
        enc.latent_avg.copy_(G.mapping.w_avg.expand_as(enc.latent_avg))
    enc_path = save_official(root / "psp_tiny.pt", enc, decoder=G)
    face = build_bundle(save_native(root / "g", G), root / "out" / "face", BundleOptions(name="face", encoder=enc_path))
    toon = build_bundle(save_native(root / "g_toon", G_toon), root / "out" / "toon",
                        BundleOptions(name="toon", encoder_from=face))
    models = root / "models"
    for b in (face, toon, tiny_bundle):
        shutil.copytree(b, models / b.name)
    return {"face": face, "toon": toon, "tiny": tiny_bundle, "models": models}


@pytest.fixture(scope="module")
def server(bundles):
    s = _conftest().ServerThread(bundles["models"], limits={"max_photo_size": 1024, "max_faces": MAX_FACES})
    yield s
    s.close()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    from skimage import data
    return {"astronaut": data.astronaut(),
            "grace_hopper": F.read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))}


def encode(u8: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def raw(img) -> np.ndarray:
    return np.frombuffer(img.data, np.uint8).reshape(img.height, img.width, 3)


class Reference:
    """The photo path assembled by hand: faces -> encoder.onnx (face bundle) -> synthesis.onnx (chosen bundle)."""

    def __init__(self, bundles):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1

        def sess(path: Path):
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.encoder = sess(bundles["face"] / "encoder.onnx")
        self.synthesis = {n: sess(bundles[n] / "synthesis.onnx") for n in ("face", "toon")}
        self.w_avg = {n: np.asarray(json.loads((bundles[n] / "manifest.json").read_text())["model"]["w_avg"],
                                    np.float32) for n in ("face", "toon")}

    def ws(self, aligned_u8: np.ndarray) -> np.ndarray:
        img = aligned_u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
        return self.encoder.run(["ws"], {"img": img})[0]

    def render(self, model: str, ws: np.ndarray) -> np.ndarray:
        sess = self.synthesis[model]
        name = "img_u8" if "img_u8" in [o.name for o in sess.get_outputs()] else None
        if name is not None:
            return sess.run([name], {"ws": ws.astype(np.float32)})[0]
        img = sess.run(None, {"ws": ws.astype(np.float32)})[0]
        return np.clip(np.rint((img + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def stylize(self, model: str, photo: np.ndarray, which="largest", composite="paste", feather=0.08,
                psi: float | None = None, max_faces: int = MAX_FACES
                ) -> tuple[np.ndarray, list[F.AlignedFace], np.ndarray]:
        aligned = F.align_photo(photo, size=ENC_SIZE, which=which)[:max_faces]
        ws = self.ws(np.stack([a.img_u8 for a in aligned]))
        if psi is not None:
            ws = self.w_avg[model] + psi * (ws - self.w_avg[model])
        crops = self.render(model, ws)
        if composite == "crop":
            return crops[0], aligned, crops
        out = photo
        for a, c in reversed(list(zip(aligned, crops))):
            out = F.paste_back(out, c, a.quad, feather=feather)
        return out, aligned, crops


@pytest.fixture(scope="module")
def reference(bundles) -> Reference:
    return Reference(bundles)


def close(a: np.ndarray, b: np.ndarray, max_level: int = 1, max_frac: float = 0.005) -> None:
    """Equal up to float rounding between two ONNX Runtime runs: at most `max_level` levels, in a tiny fraction."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert int(diff.max()) <= max_level and (diff > 0).mean() <= max_frac, (int(diff.max()), (diff > 0).mean())


def stylize(server, model: str, image: bytes, fmt: str = "raw", size=None, **face):
    req = pb.StylizeRequest(model=model, image=image, output=output_options(fmt, size=size),
                            face=face_options(**face))
    with server.client() as c:
        return c.stylize_raw(req, timeout=60)


def status(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


# ----------------------------------------------------------------------------------------------------------
# Discovery


def test_models_advertise_their_photo_path(server):
    with server.client() as c:
        models = {m.name: m for m in c.list_models()}
    face, toon, tiny = models["face"], models["toon"], models["tiny"]
    assert face.ready and face.has_encoder and face.latent_space == "face" and face.encoder_model == "face"
    assert toon.ready and not toon.has_encoder and toon.latent_space == "face" and toon.encoder_model == "face"
    assert not tiny.has_encoder and tiny.latent_space == "" and tiny.encoder_model == ""


# ----------------------------------------------------------------------------------------------------------
# Unary Stylize


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_stylize_pastes_the_encoded_face_back(server, reference, photos, name):
    photo = photos[name]
    resp = stylize(server, "face", encode(photo))
    out = raw(resp.image)
    want, aligned, _ = reference.stylize("face", photo)
    assert (resp.image.width, resp.image.height) == (photo.shape[1], photo.shape[0])
    close(out, want)
    # Only the face square changed: everything outside the quad's bounding box is the photo, bit for bit.
    lo = np.floor(aligned[0].quad.min(0)).astype(int) - 1
    hi = np.ceil(aligned[0].quad.max(0)).astype(int) + 1
    outside = np.ones(photo.shape[:2], bool)
    outside[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = False
    assert np.array_equal(out[outside], photo[outside])
    assert not np.array_equal(out[~outside], photo[~outside])
    # The detection box is reported, and the timings of every stage are filled in.
    (f,) = resp.faces
    assert np.allclose([f.left, f.top, f.right, f.bottom], aligned[0].face.box, atol=0.5) and f.score > 0
    t = resp.timings
    for field in ("decode_ms", "align_ms", "encoder_ms", "synthesis_ms", "composite_ms", "encode_ms", "total_ms"):
        assert getattr(t, field) > 0, field
    assert t.total_ms >= t.align_ms + t.encoder_ms


def test_adapted_model_uses_the_base_models_encoder(server, reference, photos):
    photo = photos["astronaut"]
    out = raw(stylize(server, "toon", encode(photo), composite="crop").image)
    want, _, _ = reference.stylize("toon", photo, composite="crop")
    assert out.shape == (RES, RES, 3)
    close(out, want)
    # ... and not the toon model's own (it has none) nor the face model's synthesis.
    other, _, _ = reference.stylize("face", photo, composite="crop")
    assert np.abs(out.astype(int) - other.astype(int)).max() > 8


def test_crop_mode_psi_and_output_size(server, reference, photos):
    photo = photos["grace_hopper"]
    resp = stylize(server, "face", encode(photo), composite="crop", psi=0.5)
    want, _, _ = reference.stylize("face", photo, composite="crop", psi=0.5)
    close(raw(resp.image), want)
    # psi 0 pulls every face to the model's average face.
    avg = reference.render("face", np.broadcast_to(reference.w_avg["face"], (1, 8, 64)).copy())[0]
    close(raw(stylize(server, "face", encode(photo), composite="crop", psi=0.0).image), avg)
    # An explicit output size resizes the pasted-back photo; PNG output decodes to the raw pixels.
    png = stylize(server, "face", encode(photo), fmt="png")
    assert np.array_equal(decode(png.image.data), raw(stylize(server, "face", encode(photo)).image))
    small = stylize(server, "face", encode(photo), size=(100, 80))
    assert (small.image.width, small.image.height) == (100, 80)


def test_all_faces_and_face_index(server, reference, photos):
    """Two photos side by side: `all` stylizes the faces (largest first, at most --max-faces: dlib also finds a
    small third "face" in the padding), an index picks one."""
    a, g = photos["astronaut"], photos["grace_hopper"]
    h = max(a.shape[0], g.shape[0])
    pad = lambda x: np.pad(x, ((0, h - x.shape[0]), (0, 0), (0, 0)), mode="edge")  # noqa: E731
    both = np.ascontiguousarray(np.concatenate([pad(a), pad(g)], axis=1))
    resp = stylize(server, "face", encode(both), faces="all")
    want, aligned, _ = reference.stylize("face", both, which="all")
    assert len(resp.faces) == MAX_FACES == len(aligned)
    areas = [(f.right - f.left) * (f.bottom - f.top) for f in resp.faces]
    assert areas[0] >= areas[1]
    close(raw(resp.image), want)
    # Index 1 = the smaller face only; its crop equals the second crop of `all`.
    one = stylize(server, "face", encode(both), faces=1, composite="crop")
    _, _, crops = reference.stylize("face", both, which="all", composite="crop")
    close(raw(one.image), crops[1])
    # Crop mode with several faces returns every crop.
    many = stylize(server, "face", encode(both), faces="all", composite="crop", fmt="png")
    assert len(many.faces) == 2
    close(decode(many.faces[1].crop.data), crops[1])


def test_photo_modes_and_exif(server, reference, photos):
    """A JPEG with an EXIF rotation, an RGBA PNG and a 16-bit grayscale PNG all find the face."""
    from PIL import Image
    photo = photos["astronaut"]
    rotated = np.ascontiguousarray(np.rot90(photo))  # stored rotated, EXIF says "rotate back"
    im = Image.fromarray(rotated)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif)
    out = stylize(server, "face", buf.getvalue())
    assert (out.image.width, out.image.height) == (photo.shape[1], photo.shape[0]) and len(out.faces) == 1
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=2)
    close(raw(stylize(server, "face", encode(rgba)).image), reference.stylize("face", photo)[0])
    gray16 = Image.fromarray((photo.mean(2) * 257).astype(np.uint16))
    buf = io.BytesIO()
    gray16.save(buf, format="PNG")
    assert len(stylize(server, "face", buf.getvalue()).faces) == 1


def test_stylize_errors(server, photos):
    no_face = np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], (200, 1, 3))
    st, msg = status(lambda: stylize(server, "face", encode(no_face)))
    assert st == grpc.StatusCode.FAILED_PRECONDITION and "no face found" in msg
    st, msg = status(lambda: stylize(server, "face", encode(photos["astronaut"]), faces=3))
    assert st == grpc.StatusCode.FAILED_PRECONDITION and "face index 3 out of range" in msg
    st, msg = status(lambda: stylize(server, "face", b"\x89PNG\r\n\x1a\n garbage"))
    assert st == grpc.StatusCode.INVALID_ARGUMENT
    st, msg = status(lambda: stylize(server, "face", b""))
    assert st == grpc.StatusCode.INVALID_ARGUMENT and "empty" in msg
    st, msg = status(lambda: stylize(server, "face", encode(np.zeros((8, 1100, 3), np.uint8))))
    assert st == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in msg
    st, msg = status(lambda: stylize(server, "face", encode(photos["astronaut"]), feather=0.9))
    assert st == grpc.StatusCode.INVALID_ARGUMENT and "feather" in msg
    st, msg = status(lambda: stylize(server, "face", encode(photos["astronaut"]), psi=float("nan")))
    assert st == grpc.StatusCode.INVALID_ARGUMENT and "psi" in msg
    st, msg = status(lambda: stylize(server, "face", encode(photos["astronaut"]), size=(5000, 5000)))
    assert st == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in msg
    st, msg = status(lambda: stylize(server, "tiny", encode(photos["astronaut"])))
    assert st == grpc.StatusCode.FAILED_PRECONDITION and "no encoder" in msg
    st, msg = status(lambda: stylize(server, "nope", encode(photos["astronaut"])))
    assert st == grpc.StatusCode.NOT_FOUND


def test_adapted_model_without_its_encoder_bundle_is_refused_clearly(bundles, photos, server_factory, tmp_path,
                                                                      copy_bundle):
    """toon alone (its latent space's encoder bundle not loaded): FAILED_PRECONDITION naming the space;
    Generate keeps working."""
    copy_bundle(bundles["toon"], tmp_path / "toon")
    s = server_factory(tmp_path)
    st, msg = status(lambda: stylize(s, "toon", encode(photos["astronaut"])))
    assert st == grpc.StatusCode.FAILED_PRECONDITION and "latent space 'face'" in msg
    with s.client() as c:
        assert len(c.generate("toon", seeds=[1])) == 1


# ----------------------------------------------------------------------------------------------------------
# StylizeStream


def test_stylize_stream_30_frames_with_bad_ones(server, reference, photos):
    """30 frames of a moving crop of the astronaut, frame 9 corrupt and frame 20 without a face: every frame is
    answered in order, the two bad ones in-stream with their codes, and the stream goes on."""
    photo = photos["astronaut"]
    frames, wants = [], {}
    for i in range(30):
        dx, dy = 4 * (i % 6), 3 * (i % 5)
        crop = np.ascontiguousarray(photo[dy: dy + 400, 40 + dx: 440 + dx])
        if i == 9:
            frames.append(encode(crop)[:200])  # truncated PNG
        elif i == 20:
            frames.append(encode(np.full((300, 300, 3), 90, np.uint8)))
        else:
            frames.append(encode(crop))
            if i % 7 == 0:
                wants[i] = reference.stylize("face", crop)[0]
    with server.client() as c:
        got = list(c.stylize_stream("face", frames, timeout=120, fmt="raw"))
    assert [r.index for r in got] == list(range(30))
    for r in got:
        if r.index == 9:
            assert r.error_code == "INVALID_ARGUMENT" and r.error and not r.image.data
        elif r.index == 20:
            assert r.error_code == "FAILED_PRECONDITION" and "no face found" in r.error
        else:
            assert not r.error and r.model == "face" and len(r.faces) == 1
            assert (r.image.width, r.image.height) == (400, 400)
            if r.index in wants:
                close(raw(r.image), wants[r.index])


def test_stylize_stream_on_a_model_without_encoder_ends_the_call(server, photos):
    with server.client() as c:
        st, msg = status(lambda: list(c.stylize_stream("tiny", [encode(photos["astronaut"])], timeout=30)))
    assert st == grpc.StatusCode.FAILED_PRECONDITION


# ----------------------------------------------------------------------------------------------------------
# KServe v2: `<name>.stylize` with the stock tritonclient (in a subprocess: its protos clash with ours)

KSERVE_SCRIPT = r'''
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
target, out = sys.argv[1], sys.argv[2]
photos = np.load(f"{out}/in.npz", allow_pickle=True)["photos"]
c = g.InferenceServerClient(target)
res = {"meta": c.get_model_metadata("toon.stylize", as_json=True), "ready": c.is_model_ready("toon.stylize")}
t = g.InferInput("IMAGE", [len(photos), 1], "BYTES")
t.set_data_from_numpy(photos.reshape(-1, 1))
r = c.infer("toon.stylize", [t], parameters={"composite": "crop"})
outs = r.as_numpy("STYLIZED")
for i, o in enumerate(outs.reshape(-1)):
    open(f"{out}/out{i}.png", "wb").write(o)
try:
    t = g.InferInput("IMAGE", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"not an image"]], dtype=object))
    c.infer("toon.stylize", [t])
    res["error"] = None
except InferenceServerException as e:
    res["error"] = [e.status(), e.message()]
try:
    c.get_model_metadata("tiny.stylize")
    res["tiny"] = None
except InferenceServerException as e:
    res["tiny"] = [e.status(), e.message()]
json.dump(res, open(f"{out}/res.json", "w"))
'''


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] not installed")
def test_kserve_stylize_with_tritonclient(server, reference, photos, tmp_path):
    ims = [encode(photos["astronaut"]), encode(photos["grace_hopper"], "JPEG", quality=95)]
    np.savez(tmp_path / "in.npz", photos=np.array(ims, dtype=object))
    proc = subprocess.run([sys.executable, "-c", KSERVE_SCRIPT, server.target, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["ready"] is True
    assert res["meta"]["inputs"][0]["datatype"] == "BYTES" and res["meta"]["outputs"][0]["name"] == "STYLIZED"
    for i, src in enumerate((photos["astronaut"], decode(ims[1]))):
        close(decode((tmp_path / f"out{i}.png").read_bytes()), reference.stylize("toon", src, composite="crop")[0])
    assert res["error"][0] == "StatusCode.INVALID_ARGUMENT"
    assert res["tiny"][0] == "StatusCode.NOT_FOUND"


# ----------------------------------------------------------------------------------------------------------
# `stylecast client stylize`


def test_client_stylize_cli(server, reference, photos, tmp_path, capsys):
    from stylecast.cli import main

    def run(*args) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as ei:
            main(["client", "stylize", "--server", server.target, *map(str, args)])
        out = capsys.readouterr()
        return int(ei.value.code or 0), out.out + out.err

    a = tmp_path / "astronaut.png"
    a.write_bytes(encode(photos["astronaut"]))
    code, out = run("--model", "face", "--outdir", tmp_path / "out", a)
    assert code == 0, out
    close(decode((tmp_path / "out" / "astronaut.face.png").read_bytes()), reference.stylize("face", photos["astronaut"])[0])
    # Several photos go through one stream; a bad one is reported and the others are written (exit 1).
    g = tmp_path / "hopper.jpg"
    g.write_bytes(encode(photos["grace_hopper"], "JPEG", quality=95))
    bad = tmp_path / "wall.png"
    bad.write_bytes(encode(np.full((120, 160, 3), 200, np.uint8)))
    code, out = run("--model", "toon", "--composite", "crop", "--outdir", tmp_path / "many", a, bad, g)
    assert code == 1 and "wall.png: FAILED_PRECONDITION: no face found" in out and "1 photo(s) failed" in out, out
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["astronaut.toon.png", "hopper.toon.png"]
    close(decode((tmp_path / "many" / "hopper.toon.png").read_bytes()),
          reference.stylize("toon", decode(g.read_bytes()), composite="crop")[0])
    # A model that cannot stylize: one line, exit 2.
    code, out = run("--model", "tiny", "--outdir", tmp_path / "x", a)
    assert code == 2 and out.strip().startswith("Error: FAILED_PRECONDITION") and out.strip().count("\n") == 0, out
