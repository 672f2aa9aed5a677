"""common.faces: FFHQ alignment on real photos with dlib's real models, image decoding, paste-back, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common import faces as F


@pytest.fixture(scope="module")
def aligner() -> F.FaceAligner:
    return F.get_aligner()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    from skimage import data
    return {"astronaut": data.astronaut(),
            "grace_hopper": F.read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))}


def _eyes(lm: np.ndarray) -> np.ndarray:
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
@pytest.mark.parametrize("size", [256, 512])
def test_aligned_eyes_at_ffhq_positions(aligner, photos, name, size):
    """Landmarks re-detected on the aligned crop put the eyes at FFHQ's canonical positions within 2% of the width,
    and agree with the photo's landmarks mapped through the alignment transform."""
    (face,) = F.align_photo(photos[name], size=size, aligner=aligner)
    assert face.img_u8.shape == (size, size, 3) and face.img_u8.dtype == np.uint8
    redetected = aligner.select(face.img_u8, what="aligned crop")[0].landmarks
    eyes = _eyes(redetected) / size
    assert np.abs(eyes - np.array(F.FFHQ_EYES)).max() < 0.02, eyes
    mapped = _eyes(face.to_crop(face.face.landmarks)) / size
    assert np.abs(mapped - eyes).max() < 0.02


def test_ffhq_quad_by_hand():
    """Eyes at (40, 50) / (60, 50), mouth corners (42, 75) / (58, 75): eye-to-mouth 25 wins (1.8 * 25 > 2 * 20),
    half side 45, centre 2.5 below the eyes."""
    lm = np.zeros((68, 2))
    lm[36:42] = (40, 50)
    lm[42:48] = (60, 50)
    lm[48], lm[54] = (42, 75), (58, 75)
    quad = F.ffhq_quad(lm)
    np.testing.assert_allclose(quad, [[5, 7.5], [5, 97.5], [95, 97.5], [95, 7.5]], atol=1e-9)
    # Rotating the face rotates the square with it.
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    np.testing.assert_allclose(F.ffhq_quad(lm @ rot.T), quad @ rot.T, atol=1e-9)


def test_align_quad_axis_aligned_is_an_exact_crop():
    """An axis-aligned square at scale 1 samples pixel centres exactly: the crop equals the sub-array."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)
    x0, y0, s = 17, 11, 40
    quad = np.array([[x0, y0], [x0, y0 + s], [x0 + s, y0 + s], [x0 + s, y0]], dtype=np.float64)
    out = F.align_quad(img, quad, s, supersample=1)
    np.testing.assert_array_equal(out, img[y0:y0 + s, x0:x0 + s])


def test_align_quad_pads_outside_the_photo():
    """A square hanging over the border is filled (reflection + blur), not left black."""
    img = np.full((64, 64, 3), 200, np.uint8)
    quad = np.array([[-20, -20], [-20, 40], [40, 40], [40, -20]], dtype=np.float64)
    out = F.align_quad(img, quad, 32)
    assert out.min() > 150
    for mode in ("edge", "constant"):
        assert F.align_quad(img, quad, 32, pad_mode=mode).shape == (32, 32, 3)
    with pytest.raises(F.FaceError, match="pad mode"):
        F.align_quad(img, quad, 32, pad_mode="wrap")


def test_faces_sorted_largest_first_and_selection(aligner, photos):
    a = photos["astronaut"]
    h = np.asarray(Image.fromarray(photos["grace_hopper"]).resize((256, 300)))
    canvas = np.full((520, 800, 3), 255, np.uint8)
    canvas[:512, :512] = a
    canvas[100:400, 530:786] = h
    faces = aligner.detect(canvas)
    assert len(faces) >= 2
    assert all(faces[i].area >= faces[i + 1].area for i in range(len(faces) - 1))
    largest = aligner.select(canvas)[0]
    assert largest.area == faces[0].area
    everyone = F.align_photo(canvas, 64, which="all", aligner=aligner)
    assert len(everyone) == len(faces)
    second = aligner.select(canvas, which=1)[0]
    assert second.box == faces[1].box
    with pytest.raises(F.NoFaceError, match="out of range"):
        aligner.select(canvas, which=len(faces))
    with pytest.raises(F.FaceError, match="face selection"):
        aligner.select(canvas, which="biggest")


def test_no_face_is_a_clear_error(aligner):
    rng = np.random.default_rng(1)
    for img in (np.full((300, 400, 3), 128, np.uint8), rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)):
        with pytest.raises(F.NoFaceError, match=r"no face found in photo \(\d+x\d+\)"):
            F.align_photo(img, aligner=aligner)


def test_paste_back_of_the_unchanged_crop_restores_the_photo(aligner, photos):
    img = photos["astronaut"]
    (face,) = F.align_photo(img, size=512, aligner=aligner)
    out = F.paste_back(img, face.img_u8, face.quad)
    assert out.shape == img.shape
    # Inside the face the round trip photo -> crop -> photo costs only resampling blur.
    x0, y0, x1, y1 = (int(v) for v in face.face.box)
    diff = np.abs(out[y0:y1, x0:x1].astype(int) - img[y0:y1, x0:x1].astype(int))
    assert diff.mean() < 4.0, diff.mean()
    # Outside the square nothing changes.
    lo = np.floor(face.quad.min(0)).astype(int) - 1
    assert np.array_equal(out[:, : max(lo[0], 0)], img[:, : max(lo[0], 0)])
    # A different crop changes the face region.
    changed = F.paste_back(img, 255 - face.img_u8, face.quad)
    assert np.abs(changed[y0:y1, x0:x1].astype(int) - img[y0:y1, x0:x1].astype(int)).mean() > 50


def test_face_mask_shape():
    m = F.face_mask(64)
    assert m.shape == (64, 64) and m.dtype == np.float32
    assert m[32, 32] == 1.0 and m[0, 0] == 0.0 and 0 <= m.min() and m.max() <= 1


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_image_modes_are_normalised_to_rgb8():
    gray16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = F.read_image(_encode(Image.fromarray(gray16)))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest transparent -> white
    out = F.read_image(_encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])
    gray = F.read_image(_encode(Image.fromarray(np.full((3, 4), 77, np.uint8), "L")))
    assert gray.shape == (3, 4, 3) and (gray == 77).all()
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    np.testing.assert_array_equal(F.read_image(_encode(pal))[0], [[10, 20, 30], [40, 50, 60]])


def test_exif_orientation_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # white left half
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = F.read_image(_encode(im, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_bad_images_and_models_are_clear_errors(tmp_path):
    with pytest.raises(F.FaceError, match="cannot decode"):
        F.read_image(b"not an image")
    with pytest.raises(F.FaceError, match="no such file"):
        F.read_image(tmp_path / "missing.jpg")
    big = _encode(Image.new("RGB", (300, 20)))
    with pytest.raises(F.FaceError, match="exceeds the limit of 256"):
        F.read_image(big, max_side=256)
    png = _encode(Image.new("RGB", (64, 64)))
    with pytest.raises(F.FaceError, match="cannot decode"):
        F.read_image(png[: len(png) // 2])
    with pytest.raises(F.FaceError, match="uint8"):
        F.align_quad(np.zeros((10, 10, 3), np.float32), np.zeros((4, 2)), 16)
    with pytest.raises(F.FaceError, match="degenerate"):
        F.align_quad(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2)), 16)
    with pytest.raises(F.FaceError, match="landmarks"):
        F.ffhq_quad(np.zeros((5, 2)))
    with pytest.raises(F.FaceModelsError, match="not found"):
        F.FaceAligner(landmarks=tmp_path / "nope.dat")
    bad = tmp_path / "corrupt.dat"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(F.FaceModelsError, match="cannot load"):
        F.FaceAligner(landmarks=bad)
    with pytest.raises(F.FaceError, match="unknown face detector"):
        F.FaceAligner(detector="yolo")


def test_models_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(F.ENV_MODELS, str(tmp_path))
    with pytest.raises(F.FaceModelsError, match="STYLECAST_FACE_MODELS"):
        F.model_path(F.LANDMARKS_68)
    (tmp_path / F.LANDMARKS_68).write_bytes(b"x")
    assert F.model_path(F.LANDMARKS_68) == tmp_path / F.LANDMARKS_68
