"""dualstylegan bundles through a real server: ListModels / ListStyles, Generate with a style id, Stylize with a style
id, an uploaded exemplar, preserve_color, colour-only and all-zero weights, StylizeStream, KServe v2, the error codes,
and a refused bundle.

Every image is compared with the pipeline assembled here by hand from its parts (common.faces for the geometry,
ONNX Runtime sessions opened directly on the bundle files, numpy for psi * w and the style rows), so a wrong style row,
wrong weights, a truncation towards w_avg instead of 0, a wrong preserve_color or a wrong encoder shows up as a pixel
difference. All-zero weights are also compared with the stylegan2 bundle of the same base generator.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from protos.stylecast.v1 import style_pb2 as pb
from serving.client import dualstyle_options, face_options, latents, output_options
from common import faces as F

pytestmark = pytest.mark.timeout(300)

ENC_SIZE, RES, NUM_WS, W_DIM, R_INDEX = 64, 32, 8, 64, 4
NAMES = ["pixar_01.png", "anime_07.png", "comic_3.png"]


def _conftest():
    spec = importlib.util.spec_from_file_location("serving_conftest", Path(__file__).with_name("conftest.py"))
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_G, tiny_bundle):
    """toon: a DualStyleGAN on a copy of tiny_G with 3 styles and its own tiny pSp encoder; face: the stylegan2 bundle
    of tiny_G with another encoder; toon2: another DualStyleGAN on tiny_G sharing face's latent space
    (--encoder-from); tiny: the stylegan2 bundle of tiny_G without an encoder."""
    from export.bundle import BundleOptions, build_bundle
    from export.dualstyle_bundle import DualStyleBundleOptions, build_dualstyle_bundle
    from training.checkpoints import save_native
    from training.dualstyle import DualStyleGAN, save_dualstylegan, save_exstyle_codes
    from training.inversion.encoders import EncoderConfig, build_encoder, save_official

    root = tmp_path_factory.mktemp("dual_bundles")

    def dualstyle(seed: int) -> DualStyleGAN:
        torch.manual_seed(seed)
        m = DualStyleGAN.from_generator(copy.deepcopy(tiny_G), res_index=R_INDEX)
        m.init_extrinsic_path(modres_scale=0.5, colour_noise=0.5)
        return m.eval()

    def encoder(seed: int):
        torch.manual_seed(seed)
        enc = build_encoder(EncoderConfig.tiny(n_styles=NUM_WS, w_dim=W_DIM, input_size=ENC_SIZE)).eval()
        with torch.no_grad():
            enc.latent_avg.copy_(tiny_G.mapping.w_avg.expand_as(enc.latent_avg))
        return save_official(root / f"psp{seed}.pt", enc, decoder=tiny_G)

    g = torch.Generator().manual_seed(21)
    codes = save_exstyle_codes(root / "exstyle_code.npy",
                               {n: torch.randn(1, NUM_WS, 64, generator=g) for n in NAMES})
    out = root / "out"
    toon = build_dualstyle_bundle(save_dualstylegan(root / "dsg", dualstyle(1)), codes, out / "toon",
                                  DualStyleBundleOptions(name="toon", encoder=encoder(13)))
    face = build_bundle(save_native(root / "g", tiny_G), out / "face", BundleOptions(name="face", encoder=encoder(14)))
    toon2 = build_dualstyle_bundle(save_dualstylegan(root / "dsg2", dualstyle(2)), codes, out / "toon2",
                                   DualStyleBundleOptions(name="toon2", encoder_from=face, default_psi=1.0))
    models = root / "models"
    for b in (toon, face, toon2, tiny_bundle):
        _conftest().copy_bundle(b, models / b.name)
    return {"toon": toon, "face": face, "toon2": toon2, "tiny": tiny_bundle, "models": models}


@pytest.fixture(scope="module")
def server(bundles):
    s = _conftest().ServerThread(bundles["models"], limits={"max_photo_size": 1024, "max_faces": 2})
    yield s
    s.close()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    from skimage import data
    return {"astronaut": data.astronaut(),
            "grace_hopper": F.read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
            "no_face": np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], (200, 1, 3))}


def encode(u8: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return buf.getvalue()


def raw(img) -> np.ndarray:
    return np.frombuffer(img.data, np.uint8).reshape(img.height, img.width, 3)


def close(a: np.ndarray, b: np.ndarray, max_level: int = 1, max_frac: float = 0.005) -> None:
    """Equal up to float rounding between two ONNX Runtime runs."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert int(diff.max()) <= max_level and (diff > 0).mean() <= max_frac, (int(diff.max()), (diff > 0).mean())


def differ(a: np.ndarray, b: np.ndarray, levels: int = 8) -> bool:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) > levels


def status(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


class Reference:
    """The dualstyle photo path by hand: faces -> encoder.onnx -> psi * ws -> style row (or the exemplar's ws),
    preserve_color, weights -> synthesis.onnx -> paste back."""

    def __init__(self, bundles):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1

        def sess(path: Path):
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.sessions = {k: sess(bundles[n] / f"{g}.onnx") for k, n, g in (
            ("enc_toon", "toon", "encoder"), ("enc_face", "face", "encoder"), ("map", "toon", "mapping"),
            ("syn_toon", "toon", "synthesis"), ("syn_toon2", "toon2", "synthesis"), ("syn_tiny", "tiny", "synthesis"))}
        self.manifest = {n: json.loads((bundles[n] / "manifest.json").read_text()) for n in ("toon", "toon2")}
        with np.load(bundles["toon"] / "styles.npz") as f:
            self.styles, self.z_plus = f["exstyle_w"], f["z_plus"]
        self._aligned: dict[int, list] = {}

    def align(self, photo: np.ndarray) -> list:
        """common.faces alignment at the encoder's size (cached per photo array: dlib is the slow part)."""
        if id(photo) not in self._aligned:
            self._aligned[id(photo)] = F.align_photo(photo, size=ENC_SIZE)
        return self._aligned[id(photo)]

    def encode(self, aligned_u8: np.ndarray, enc: str = "toon") -> np.ndarray:
        img = aligned_u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
        return self.sessions[f"enc_{enc}"].run(["ws"], {"img": img})[0]

    def synth(self, model: str, ws: np.ndarray, ex: np.ndarray, weights) -> np.ndarray:
        n = len(ws)
        w = np.broadcast_to(np.asarray(weights, np.float32), (n, NUM_WS))
        return self.sessions[f"syn_{model}"].run(["img_u8"], {
            "ws": ws.astype(np.float32), "exstyle_w": np.ascontiguousarray(np.broadcast_to(ex, ws.shape), np.float32),
            "weights": np.ascontiguousarray(w)})[0]

    def render(self, model: str, ws_u: np.ndarray, psi: float | None = None, style: int = 0,
               ex: np.ndarray | None = None, weights=None, preserve: bool = False) -> np.ndarray:
        m = self.manifest[model]["model"]
        psi = m["default_psi"] if psi is None else psi
        ex = self.styles[style: style + 1] if ex is None else ex
        if preserve:
            ex = np.repeat(ex, len(ws_u), axis=0)
            ex[:, R_INDEX + 1:] = ws_u[:, R_INDEX + 1:]
        ws = ws_u if psi == 1 else np.float32(psi) * ws_u
        return self.synth(model, ws, ex, m["default_weights"] if weights is None else weights)

    def exemplar(self, photo: np.ndarray, enc: str = "toon") -> np.ndarray:
        return self.encode(self.align(photo)[0].img_u8[None], enc)

    def stylize(self, photo: np.ndarray, model: str = "toon", enc: str = "toon", composite: str = "paste",
                **kw) -> np.ndarray:
        aligned = self.align(photo)
        crops = self.render(model, self.encode(np.stack([a.img_u8 for a in aligned]), enc), **kw)
        if composite == "crop":
            return crops[0]
        return F.paste_back(photo, crops[0], aligned[0].quad, feather=0.08)

    def mapping(self, seeds: list[int]) -> np.ndarray:
        z = np.concatenate([np.random.RandomState(s).randn(1, 64).astype(np.float32) for s in seeds])
        return self.sessions["map"].run(["w"], {"z": z, "psi": np.ones(len(z), np.float32)})[0]


@pytest.fixture(scope="module")
def ref(bundles) -> Reference:
    return Reference(bundles)


def stylize(server, model: str, image: bytes, composite: str = "paste", psi=None, **style):
    req = pb.StylizeRequest(model=model, image=image, output=output_options("raw"),
                            face=face_options(composite=composite, psi=psi))
    opts = dualstyle_options(**style)
    if opts is not None:
        req.dualstyle.CopyFrom(opts)
    with server.client() as c:
        return c.stylize_raw(req, timeout=60)


def generate(server, model: str, seeds=None, ws=None, psi=None, **style) -> np.ndarray:
    with server.client() as c:
        imgs = c.generate(model, seeds=seeds, ws=ws, psi=psi, fmt="raw", **style)
    return np.stack([im.to_numpy() for im in imgs])


# ----------------------------------------------------------------------------------------------------------
# Discovery


def test_list_models_and_styles(server):
    with server.client() as c:
        models = {m.name: m for m in c.list_models()}
        toon = models["toon"]
        assert toon.ready and toon.kind == "dualstylegan" and toon.style_count == 3 and toon.res_index == R_INDEX
        assert list(toon.default_weights) == [0.75] * 5 + [1.0] * 3 and toon.default_psi == pytest.approx(0.75)
        assert toon.has_encoder and toon.latent_space == "toon" and toon.encoder_model == "toon"
        assert models["toon2"].ready and not models["toon2"].has_encoder and models["toon2"].encoder_model == "face"
        assert c.list_styles("toon") == list(enumerate(NAMES))
        resp = c.list_styles_raw("toon")
        assert (resp.num_ws, resp.res_index, resp.model) == (NUM_WS, R_INDEX, "toon") and resp.model_version
        assert status(lambda: c.list_styles("tiny"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert status(lambda: c.list_styles("nope"))[0] == grpc.StatusCode.NOT_FOUND


# ----------------------------------------------------------------------------------------------------------
# Generate


def test_generate_with_a_style_id(server, ref):
    w = ref.mapping([0, 5])
    got = generate(server, "toon", seeds=[0, 5], psi=0.6, style=2)
    ws = np.float32(0.6) * np.repeat(w[:, None], NUM_WS, 1)
    want = ref.synth("toon", ws, ref.styles[2:3], [0.75] * 5 + [1.0] * 3)
    close(got, want, max_level=0)
    # by name, as the library's own codes in W+ (exact) or z+ (through the mapping) -> the same style
    close(generate(server, "toon", seeds=[0, 5], psi=0.6, style=NAMES[2]), got, max_level=0)
    req = pb.GenerateRequest(model="toon", latents=latents(seeds=[0, 5]), psi=0.6, output=output_options("raw"),
                             dualstyle=dualstyle_options(exstyle_w=ref.styles[2:3]))
    with server.client() as c:
        as_w = np.stack([raw(im) for im in c.generate_raw(req).images])
        req.dualstyle.CopyFrom(dualstyle_options(exstyle_z=ref.z_plus[2:3]))
        as_z = np.stack([raw(im) for im in c.generate_raw(req).images])
    close(as_w, got, max_level=0)
    close(as_z, got)
    # no style given = style 0 with the bundle's psi (towards 0) and weights; another style differs
    default = generate(server, "toon", seeds=[0, 5])
    close(default, ref.synth("toon", np.float32(0.75) * np.repeat(w[:, None], NUM_WS, 1), ref.styles[0:1],
                             [0.75] * 5 + [1.0] * 3), max_level=0)
    assert differ(default, generate(server, "toon", seeds=[0, 5], style=1))


def test_all_zero_weights_give_the_base_generator(server, ref):
    """Weights 0 switch the extrinsic path off: the image of the stylegan2 bundle of the same base generator."""
    ws = np.random.RandomState(3).randn(2, NUM_WS, W_DIM).astype(np.float32) * 0.5
    base = generate(server, "tiny", ws=ws, psi=1.0)
    zero = generate(server, "toon", ws=ws, psi=1.0, style=1, weights=[0.0] * NUM_WS)
    close(zero, base)
    assert differ(generate(server, "toon", ws=ws, psi=1.0, style=1), base)


def test_generate_preserve_color_and_stream(server, ref):
    w = ref.mapping([7])
    ws_u = np.repeat(w[:, None], NUM_WS, 1)
    got = generate(server, "toon", seeds=[7], psi=0.8, style=1, preserve_color=True)
    close(got, ref.render("toon", ws_u, psi=0.8, style=1, preserve=True), max_level=0)
    assert differ(got, generate(server, "toon", seeds=[7], psi=0.8, style=1))
    # GenerateStream takes the same options; frames equal Generate's
    with server.client() as c:
        frames = [f.to_numpy() for f in c.generate_stream("toon", seeds=[7, 7], psi=0.8, style=1,
                                                          preserve_color=True, fmt="raw")]
    assert len(frames) == 2 and all(np.array_equal(f, got[0]) for f in frames)


# ----------------------------------------------------------------------------------------------------------
# Stylize


@pytest.mark.parametrize("case", ["style_id", "exemplar", "preserve_color", "colour_only", "zeros", "psi"])
def test_stylize_matches_the_hand_assembled_pipeline(server, ref, photos, case):
    photo = photos["astronaut"]
    colour_only = [0.0] * 5 + [1.0] * 3
    style, kw = {"style_id": (dict(style=2), dict(style=2)),
                 "exemplar": (dict(style=encode(photos["grace_hopper"])),
                              dict(ex=ref.exemplar(photos["grace_hopper"]))),
                 "preserve_color": (dict(style=1, preserve_color=True), dict(style=1, preserve=True)),
                 "colour_only": (dict(style=1, weights=colour_only), dict(style=1, weights=colour_only)),
                 "zeros": (dict(style=1, weights=[0.0] * NUM_WS), dict(style=1, weights=[0.0] * NUM_WS)),
                 "psi": (dict(style=0), dict(style=0, psi=0.3))}[case]
    psi = 0.3 if case == "psi" else None
    if case in ("style_id", "exemplar"):  # pasted back into the photo (the other cases: the crop only)
        resp = stylize(server, "toon", encode(photo), psi=psi, **style)
        out = raw(resp.image)
        assert out.shape == photo.shape
        close(out, ref.stylize(photo, **kw))
        assert resp.HasField("style_id") == (case == "style_id") and resp.style_id == (2 if case == "style_id" else 0)
    crop = raw(stylize(server, "toon", encode(photo), composite="crop", psi=psi, **style).image)
    close(crop, ref.stylize(photo, composite="crop", **kw))
    # each option changes the picture (against the default style-0 rendering)
    if case != "psi":
        assert differ(crop, ref.stylize(photo, composite="crop", style=0))


def test_stylize_with_the_encoder_of_another_bundle(server, ref, photos):
    """toon2 has no encoder; it shares face's latent space, so Stylize encodes with face's encoder.onnx."""
    photo = photos["grace_hopper"]
    out = raw(stylize(server, "toon2", encode(photo), composite="crop", style=1).image)
    close(out, ref.stylize(photo, model="toon2", enc="face", composite="crop", style=1))
    assert differ(out, ref.stylize(photo, model="toon2", enc="toon", composite="crop", style=1), 2)


def test_stylize_stream_mixes_styles_and_reports_bad_frames(server, ref, photos):
    photo = photos["astronaut"]
    reqs = [pb.StylizeRequest(model="toon", image=encode(img), output=output_options("raw"),
                              dualstyle=dualstyle_options(style=s))
            for img, s in ((photo, 0), (photos["no_face"], 1), (photo, 2), (photo, 99))]
    with server.client() as c:
        resps = list(c.stub.StylizeStream(iter(reqs), timeout=60))
    assert [r.index for r in resps] == [0, 1, 2, 3]
    close(raw(resps[0].image), ref.stylize(photo, style=0))
    close(raw(resps[2].image), ref.stylize(photo, style=2))
    assert resps[1].error_code == "FAILED_PRECONDITION" and "no face" in resps[1].error
    assert resps[3].error_code == "INVALID_ARGUMENT" and "unknown style id 99" in resps[3].error


def test_errors(server, photos):
    astro = encode(photos["astronaut"])
    cases = [
        (lambda: stylize(server, "toon", astro, style=3), grpc.StatusCode.INVALID_ARGUMENT, "unknown style id 3"),
        (lambda: stylize(server, "toon", astro, style="nope.png"), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown style name"),
        (lambda: stylize(server, "toon", astro, weights=[1.0] * 7), grpc.StatusCode.INVALID_ARGUMENT, "needs 8"),
        (lambda: stylize(server, "toon", astro, weights=[1.0] * 7 + [float("nan")]), grpc.StatusCode.INVALID_ARGUMENT,
         "finite"),
        (lambda: stylize(server, "toon", astro, weights=[5.0] * 8), grpc.StatusCode.INVALID_ARGUMENT, "[-2.0, 2.0]"),
        (lambda: stylize(server, "toon", encode(photos["no_face"])), grpc.StatusCode.FAILED_PRECONDITION,
         "no face found in the photo"),
        (lambda: stylize(server, "toon", astro, style=encode(photos["no_face"])), grpc.StatusCode.FAILED_PRECONDITION,
         "no face found in the style image"),
        (lambda: stylize(server, "toon", astro, style=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT,
         "style_image"),
        (lambda: stylize(server, "face", astro, style=1), grpc.StatusCode.INVALID_ARGUMENT,
         "takes no dualstyle options"),
        (lambda: generate(server, "tiny", seeds=[1], style=1), grpc.StatusCode.INVALID_ARGUMENT,
         "takes no dualstyle options"),
        (lambda: generate(server, "toon", seeds=[1], weights=[0.5] * 9), grpc.StatusCode.INVALID_ARGUMENT, "needs 8"),
        (lambda: generate(server, "toon", seeds=[1], psi=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "psi"),
    ]
    for fn, code, text in cases:
        st, msg = status(fn)
        assert st == code and text in msg, (text, st, msg)
    req = pb.GenerateRequest(model="toon", latents=latents(seeds=[1]),
                             dualstyle=dualstyle_options(exstyle_z=np.zeros((1, NUM_WS, 32), np.float32)))
    with server.client() as c:
        st, msg = status(lambda: c.generate_raw(req))
    assert st == grpc.StatusCode.INVALID_ARGUMENT and "exstyle_z" in msg


# ----------------------------------------------------------------------------------------------------------
# KServe v2 (the server's own generated stubs: no tritonclient in this process)


def test_kserve_seed_style_id_synthesis_and_stylize(server, ref, photos):
    from protos.inference import grpc_service_pb2 as ipb
    from protos.inference import grpc_service_pb2_grpc as ipb_grpc

    def tensor(req, name, arr, dtype):
        req.inputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())

    with grpc.insecure_channel(server.target) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        meta = stub.ModelMetadata(ipb.ModelMetadataRequest(name="toon"), timeout=30)
        assert [t.name for t in meta.inputs] == ["SEED", "Z", "PSI", "STYLE_ID", "WEIGHTS"]
        req = ipb.ModelInferRequest(model_name="toon")
        tensor(req, "SEED", np.array([[0], [5]], np.int64), "INT64")
        tensor(req, "STYLE_ID", np.array([[2], [1]], np.int64), "INT64")
        tensor(req, "PSI", np.array([[0.6]], np.float32), "FP32")
        resp = stub.ModelInfer(req, timeout=30)
        img = np.frombuffer(resp.raw_output_contents[0], np.uint8).reshape(2, RES, RES, 3)
        ws = np.float32(0.6) * np.repeat(ref.mapping([0, 5])[:, None], NUM_WS, 1)
        close(img[0], ref.synth("toon", ws[:1], ref.styles[2:3], [0.75] * 5 + [1.0] * 3)[0], max_level=0)
        close(img[1], ref.synth("toon", ws[1:], ref.styles[1:2], [0.75] * 5 + [1.0] * 3)[0], max_level=0)

        req = ipb.ModelInferRequest(model_name="toon.synthesis")
        weights = np.array([[0.2] * 8, [1.0] * 8], np.float32)
        tensor(req, "WS", ws, "FP32")
        tensor(req, "EXSTYLE_W", ref.styles[[0, 2]], "FP32")
        tensor(req, "WEIGHTS", weights, "FP32")
        resp = stub.ModelInfer(req, timeout=30)
        img = np.frombuffer(resp.raw_output_contents[0], np.uint8).reshape(2, RES, RES, 3)
        close(img, ref.sessions["syn_toon"].run(["img_u8"], {"ws": ws, "exstyle_w": ref.styles[[0, 2]],
                                                             "weights": weights})[0], max_level=0)

        req = ipb.ModelInferRequest(model_name="toon.stylize")
        data = encode(photos["astronaut"])
        req.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
        req.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
        req.parameters["style_id"].int64_param = 2
        req.parameters["preserve_color"].bool_param = True
        req.parameters["composite"].string_param = "crop"
        resp = stub.ModelInfer(req, timeout=60)
        png = resp.raw_output_contents[0][4:]
        from PIL import Image
        close(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")),
              ref.stylize(photos["astronaut"], composite="crop", style=2, preserve=True))

        bad = ipb.ModelInferRequest(model_name="toon")
        tensor(bad, "SEED", np.array([[0]], np.int64), "INT64")
        tensor(bad, "STYLE_ID", np.array([[7]], np.int64), "INT64")
        st, msg = status(lambda: stub.ModelInfer(bad, timeout=30))
        assert st == grpc.StatusCode.INVALID_ARGUMENT and "unknown style id 7" in msg


# ----------------------------------------------------------------------------------------------------------
# Loading


def test_a_library_that_does_not_match_the_golden_rows_is_refused(bundles, server_factory, tmp_path, copy_bundle,
                                                                   refresh_file_entry):
    b = copy_bundle(bundles["toon"], tmp_path / "models" / "toon")
    with np.load(b / "styles.npz") as f:
        lib = {k: f[k] for k in f.files}
    lib["exstyle_w"][1, 6] += np.float32(0.25)
    np.savez(b / "styles.npz", **lib)
    refresh_file_entry(b, "styles.npz")
    s = server_factory(tmp_path / "models")
    with s.client() as c:
        (m,) = c.list_models()
    assert not m.ready and "golden check failed" in m.error and "library" in m.error
