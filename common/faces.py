"""Face detection, 68-point landmarks and FFHQ alignment (Karras et al., "A Style-Based Generator Architecture for
Generative Adversarial Networks", CVPR 2019: the FFHQ crop), plus paste-back of a stylized crop into the photo.

Torch-free (numpy, Pillow and dlib), so the same code aligns faces at training time and in the server. dlib and its
models are loaded lazily on first use. Model files come from, in order: an explicit path, the directory in
``STYLECAST_FACE_MODELS``, or the ``face-recognition-models`` package (dlib's official, CC0 model files; located on
disk, never imported, because its ``__init__`` needs pkg_resources).

Coordinates: dlib landmarks are pixel indices; everything below uses *continuous* coordinates, where pixel ``i``
covers ``[i, i + 1)`` and its centre is ``i + 0.5`` (Pillow's AFFINE convention). FFHQ's own script adds the same
0.5 to its quad before Pillow's QUAD transform.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ENV_MODELS = "STYLECAST_FACE_MODELS"
LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"
FACE_ID_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
DETECTORS = ("hog", "cnn")
SELECT = ("largest", "all")
#: Faces are searched on a copy scaled to at most this many pixels on the long side (landmarks use full size).
DETECT_MAX_SIDE = 1024
#: Eye centres in an FFHQ-aligned crop, as fractions of its width, for a face with average proportions
#: (eye-to-eye 1/4 of the crop; the eye line 0.1 * eye-to-mouth above the centre).
FFHQ_EYES = ((0.375, 0.4725), (0.625, 0.4725))


class FaceError(ValueError):
    """A problem with a photo or the face models that the user can fix (one line)."""


class NoFaceError(FaceError):
    """No face was found in the photo."""


class FaceModelsError(FaceError, FileNotFoundError):
    """dlib or one of its model files is missing."""


# ----------------------------------------------------------------------------------------------------------
# Images


def to_rgb_u8(im: Any) -> np.ndarray:
    """A Pillow image of any mode -> img_u8 [H, W, 3] (EXIF orientation applied).

    Grayscale is replicated, alpha is composited over white, palette / CMYK / YCbCr are converted, and 16-bit or
    32-bit integer and float images are scaled to 8 bits (Pillow's own convert("RGB") would clip them).
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "F":
            peak = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        else:
            peak = 65535.0 if mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
        arr = np.clip(np.nan_to_num(arr / peak * 255.0), 0, 255)
        gray = np.rint(arr).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.ascontiguousarray(np.asarray(Image.alpha_composite(bg, rgba).convert("RGB")))
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def read_image(src: str | os.PathLike | bytes, max_side: int | None = None) -> np.ndarray:
    """Read a photo (path or encoded bytes) -> img_u8 [H, W, 3], see `to_rgb_u8`.

    Args:
        max_side: refuse images with a side larger than this before decoding any pixel.
    Raises:
        FaceError: unreadable, corrupt or too large.
    """
    from PIL import Image

    what = "image" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(src, "rb")
            with fp:
                im = Image.open(fp)
                if max_side is not None and max(im.size) > max_side:
                    raise FaceError(f"{what}: {im.size[0]}x{im.size[1]} exceeds the limit of {max_side} px per side")
                im.load()
                return to_rgb_u8(im)
    except FaceError:
        raise
    except FileNotFoundError:
        raise FaceError(f"{what}: no such file") from None
    except Exception as exc:  # Pillow raises many types on corrupt data
        raise FaceError(f"{what}: cannot decode ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------------------
# Models


def models_dir() -> Path | None:
    """Directory of dlib's model files: $STYLECAST_FACE_MODELS, else the face-recognition-models package."""
    env = os.environ.get(ENV_MODELS)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_path(name: str, path: str | os.PathLike | None = None) -> Path:
    """Resolve one of dlib's model files (explicit path first). Raises FaceModelsError with how to get it."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FaceModelsError(f"{p}: face model file not found")
        return p
    d = models_dir()
    if d is not None and (d / name).is_file():
        return d / name
    where = f"{d}" if d is not None else "no face-recognition-models package"
    raise FaceModelsError(f"dlib model {name} not found ({where}); `pip install face-recognition-models`, "
                          f"set {ENV_MODELS}=DIR, or pass its path")


def _dlib() -> Any:
    try:
        import dlib
    except ImportError:
        raise FaceModelsError("face alignment needs dlib: `pip install dlib-bin` (prebuilt) or `pip install dlib`") \
            from None
    return dlib


@dataclass(frozen=True)
class Face:
    """One detected face in continuous image coordinates.

    box: (left, top, right, bottom) of the detection; score: detector confidence; landmarks: [68, 2] float64 (x, y).
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    def quad(self) -> np.ndarray:
        return ffhq_quad(self.landmarks)


class FaceAligner:
    """dlib face detector + 68-point shape predictor. Thread-safe (dlib objects are guarded by a lock).

    Args:
        landmarks: path of shape_predictor_68_face_landmarks.dat (default: see `model_path`).
        detector: "hog" (dlib's frontal HOG + SVM detector, fast) or "cnn" (dlib's MMOD CNN, slower on a CPU,
            better on rotated and small faces; `cnn_model` = mmod_human_face_detector.dat).
        upsample: times the image is upsampled for detection (finds faces down to ~40 px at 1).
    """

    def __init__(self, landmarks: str | os.PathLike | None = None, detector: str = "hog",
                 cnn_model: str | os.PathLike | None = None, upsample: int = 1):
        if detector not in DETECTORS:
            raise FaceError(f"unknown face detector {detector!r}; choose from {', '.join(DETECTORS)}")
        if not 0 <= upsample <= 3:
            raise FaceError(f"detector upsample must be 0..3, got {upsample}")
        dlib = _dlib()
        self.detector_kind = detector
        self.upsample = upsample
        self.landmarks_path = model_path(LANDMARKS_68, landmarks)
        try:
            self.predictor = dlib.shape_predictor(str(self.landmarks_path))
            if detector == "hog":
                self.detector = dlib.get_frontal_face_detector()
            else:
                self.detector = dlib.cnn_face_detection_model_v1(str(model_path(CNN_DETECTOR, cnn_model)))
        except RuntimeError as exc:
            raise FaceModelsError(f"cannot load dlib face models: {exc}") from None
        self._lock = threading.Lock()

    def detect(self, img_u8: np.ndarray) -> list[Face]:
        """img_u8 [H, W, 3] -> faces sorted by detection area, largest first (empty list when none)."""
        img_u8 = _check_u8(img_u8)
        h, w = img_u8.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = img_u8
        if scale < 1.0:
            from PIL import Image
            small = np.asarray(Image.fromarray(img_u8).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                              Image.BILINEAR))
        dlib = _dlib()
        faces = []
        with self._lock:
            if self.detector_kind == "hog":
                rects, scores, _ = self.detector.run(small, self.upsample, 0.0)
            else:
                dets = self.detector(small, self.upsample)
                rects, scores = [d.rect for d in dets], [d.confidence for d in dets]
            for r, s in zip(rects, scores):
                box = tuple(float(v) / scale for v in (r.left(), r.top(), r.right() + 1, r.bottom() + 1))
                full = dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])) - 1,
                                      int(round(box[3])) - 1)
                shape = self.predictor(img_u8, full)
                lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) + 0.5
                faces.append(Face(box=box, score=float(s), landmarks=lm))
        faces.sort(key=lambda f: -f.area)
        return faces

    def select(self, img_u8: np.ndarray, which: str | int = "largest", what: str = "photo") -> list[Face]:
        """Detect and choose faces: "largest" (one), "all" (largest first) or an index into that order.

        Raises:
            NoFaceError: no face (or no face with that index).
        """
        faces = self.detect(img_u8)
        h, w = img_u8.shape[:2]
        if not faces:
            raise NoFaceError(f"no face found in {what} ({w}x{h}); use a photo with a clearly visible, roughly "
                              f"frontal face at least ~80 px wide")
        if which == "largest":
            return faces[:1]
        if which == "all":
            return faces
        if isinstance(which, str) and not which.isdigit():
            raise FaceError(f"face selection must be 'largest', 'all' or an index, got {which!r}")
        idx = int(which)
        if not 0 <= idx < len(faces):
            raise NoFaceError(f"face index {idx} out of range: {len(faces)} face(s) found in {what}")
        return [faces[idx]]


_ALIGNERS: dict[tuple, FaceAligner] = {}
_ALIGNERS_LOCK = threading.Lock()


def get_aligner(landmarks: str | os.PathLike | None = None, detector: str = "hog",
                cnn_model: str | os.PathLike | None = None, upsample: int = 1) -> FaceAligner:
    """A process-wide cached FaceAligner (the 68-point model is ~100 MB; load it once)."""
    key = (str(landmarks), detector, str(cnn_model), upsample)
    with _ALIGNERS_LOCK:
        if key not in _ALIGNERS:
            _ALIGNERS[key] = FaceAligner(landmarks, detector, cnn_model, upsample)
        return _ALIGNERS[key]


def _check_u8(img_u8: np.ndarray) -> np.ndarray:
    if not isinstance(img_u8, np.ndarray) or img_u8.dtype != np.uint8 or img_u8.ndim != 3 or img_u8.shape[2] != 3:
        raise FaceError(f"expected an RGB uint8 image [H, W, 3], got {getattr(img_u8, 'dtype', type(img_u8))} "
                        f"{list(getattr(img_u8, 'shape', []))}")
    return np.ascontiguousarray(img_u8)


# ----------------------------------------------------------------------------------------------------------
# FFHQ alignment


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """68 landmarks [68, 2] -> the FFHQ crop square [4, 2]: corners top-left, bottom-left, bottom-right, top-right.

    The square is centred a tenth of the eye-to-mouth vector below the eyes, oriented along the eye line corrected
    by the eye-to-mouth direction, with side max(4 * eye distance, 3.6 * eye-to-mouth distance) (FFHQ's rule).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2) or not np.isfinite(lm).all():
        raise FaceError(f"landmarks must be finite [68, 2], got {list(lm.shape)}")
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    # Half-side vector x along the (tilt-corrected) eye line, y perpendicular (pointing down the face).
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def quad_to_crop_matrix(quad: np.ndarray, size: int) -> np.ndarray:
    """The affine map [3, 3] from photo coordinates to the coordinates of a size x size crop of `quad`."""
    tl, bl, _, tr = np.asarray(quad, dtype=np.float64)
    # crop (u, v) -> photo: tl + u/size * (tr - tl) + v/size * (bl - tl); invert it.
    fwd = np.array([[(tr - tl)[0] / size, (bl - tl)[0] / size, tl[0]],
                    [(tr - tl)[1] / size, (bl - tl)[1] / size, tl[1]],
                    [0.0, 0.0, 1.0]])
    return np.linalg.inv(fwd)


def transform_points(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply an affine [3, 3] to points [K, 2]."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


@dataclass(frozen=True)
class AlignedFace:
    """An FFHQ-aligned crop and where it came from.

    img_u8: [size, size, 3]; quad: [4, 2] in the photo's continuous coordinates; face: the detection;
    photo_size: (width, height) of the photo.
    """

    img_u8: np.ndarray
    quad: np.ndarray
    face: Face | None
    photo_size: tuple[int, int]

    @property
    def size(self) -> int:
        return int(self.img_u8.shape[0])

    def to_crop(self, pts: np.ndarray) -> np.ndarray:
        """Photo coordinates [K, 2] -> crop coordinates."""
        return transform_points(quad_to_crop_matrix(self.quad, self.size), pts)


def align_quad(img_u8: np.ndarray, quad: np.ndarray, size: int, supersample: int = 2,
               pad_mode: str = "reflect") -> np.ndarray:
    """Resample the square `quad` of a photo into a size x size crop (bilinear at `supersample` x, then Lanczos).

    Faces much larger than the crop are first box-filtered down by an integer factor (as FFHQ's script does), and
    parts of the square outside the photo are filled by reflection blended with a blurred copy (FFHQ's padding),
    so no black corners appear.

    Args:
        img_u8: [H, W, 3] uint8 photo; quad: [4, 2] (top-left, bottom-left, bottom-right, top-right).
        pad_mode: "reflect" (FFHQ) or "edge" / "constant".
    Returns:
        img_u8 [size, size, 3].
    """
    from PIL import Image

    img_u8 = _check_u8(img_u8)
    if not 8 <= size <= 4096:
        raise FaceError(f"aligned size must be in 8..4096, got {size}")
    quad = np.asarray(quad, dtype=np.float64).copy()
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    if not np.isfinite(quad).all() or qsize < 1:
        raise FaceError("degenerate face square")
    im = Image.fromarray(img_u8)
    # Shrink: keep at most ~2x the output resolution before resampling (antialiasing for small crops of big faces).
    shrink = int(math.floor(qsize / (size * supersample) * 0.5))
    if shrink > 1:
        im = im.reduce(shrink)
        quad /= shrink
        qsize /= shrink
    # Crop to the square plus a border, so the padding and resampling touch only the face region.
    border = max(int(round(qsize * 0.1)), 3)
    lo = np.floor(quad.min(0)).astype(int) - border
    hi = np.ceil(quad.max(0)).astype(int) + border
    crop = (max(lo[0], 0), max(lo[1], 0), min(hi[0], im.size[0]), min(hi[1], im.size[1]))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise FaceError("the face square lies outside the photo")
    im = im.crop(crop)
    quad -= crop[:2]
    # Pad where the square leaves the photo.
    pad_l = max(border - int(np.floor(quad[:, 0].min())), 0)
    pad_t = max(border - int(np.floor(quad[:, 1].min())), 0)
    pad_r = max(int(np.ceil(quad[:, 0].max())) + border - im.size[0], 0)
    pad_b = max(int(np.ceil(quad[:, 1].max())) + border - im.size[1], 0)
    if max(pad_l, pad_t, pad_r, pad_b) > 0:
        im = _pad(im, (pad_l, pad_t, pad_r, pad_b), qsize, pad_mode)
        quad += [pad_l, pad_t]
    # Resample: output pixel centre (u, v) of the supersampled crop -> photo coordinates (an affine map).
    big = size * max(1, supersample)
    tl, bl, _, tr = quad
    ex, ey = (tr - tl) / big, (bl - tl) / big
    coeffs = (ex[0], ey[0], tl[0], ex[1], ey[1], tl[1])
    out = im.transform((big, big), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    if big != size:
        out = out.resize((size, size), Image.LANCZOS)
    return np.ascontiguousarray(np.asarray(out))


def _pad(im: Any, pad: tuple[int, int, int, int], qsize: float, mode: str) -> Any:
    """Pad a Pillow image by (left, top, right, bottom). "reflect" mirrors the photo and fades the mirrored margin
    into a blurred copy and then the median colour towards the outer edge (FFHQ's recipe), hiding the mirror seam."""
    from PIL import Image, ImageFilter

    if mode not in ("reflect", "edge", "constant"):
        raise FaceError(f"unknown pad mode {mode!r}")
    arr = np.asarray(im).astype(np.float32)
    pad_l, pad_t, pad_r, pad_b = pad
    h, w = arr.shape[:2]
    # np.pad's reflect needs the photo to be larger than the pad; fall back to repeating the edge.
    np_mode = mode if mode != "reflect" or (h > max(pad_t, pad_b) and w > max(pad_l, pad_r)) else "edge"
    out = np.pad(arr, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)), mode=np_mode)  # type: ignore[call-overload]
    if mode == "reflect":
        ph, pw = out.shape[:2]
        x = np.arange(pw, dtype=np.float32)[None, :]
        y = np.arange(ph, dtype=np.float32)[:, None]
        # 1 at the outer edge of a padded side, 0 where the photo starts, negative inside the photo.
        sides = [1.0 - x / pad_l if pad_l else None, 1.0 - (pw - 1 - x) / pad_r if pad_r else None,
                 1.0 - y / pad_t if pad_t else None, 1.0 - (ph - 1 - y) / pad_b if pad_b else None]
        mask = np.full((ph, pw), -np.inf, dtype=np.float32)
        for m in sides:
            if m is not None:
                mask = np.maximum(mask, np.broadcast_to(m, (ph, pw)))
        mask = mask[:, :, None]
        blurred = np.asarray(Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
                             .filter(ImageFilter.GaussianBlur(max(qsize * 0.02, 1.0)))).astype(np.float32)
        out += (blurred - out) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        out += (np.median(out, axis=(0, 1)) - out) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def align_face(img_u8: np.ndarray, face: Face, size: int = 256, supersample: int = 2) -> AlignedFace:
    """One detected face -> its FFHQ-aligned crop (256 px for encoders, the generator's resolution to project)."""
    quad = face.quad()
    return AlignedFace(img_u8=align_quad(img_u8, quad, size, supersample), quad=quad, face=face,
                       photo_size=(int(img_u8.shape[1]), int(img_u8.shape[0])))


def align_photo(img_u8: np.ndarray, size: int = 256, which: str | int = "largest",
                aligner: FaceAligner | None = None, what: str = "photo") -> list[AlignedFace]:
    """Detect, choose (see FaceAligner.select) and align faces of a photo. Raises NoFaceError."""
    aligner = aligner or get_aligner()
    return [align_face(img_u8, f, size) for f in aligner.select(_check_u8(img_u8), which, what)]


# ----------------------------------------------------------------------------------------------------------
# Paste-back


def face_mask(size: int, feather: float = 0.08, inset: float = 0.02) -> np.ndarray:
    """A soft mask [size, size] float32 in [0, 1] over the crop: 1 inside, fading to 0 over `feather` * size at the
    rounded square border `inset` * size in from the edge (hides the seam where the stylized crop meets the photo)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    xx, yy = np.meshgrid(c, c)
    # A superellipse (p = 4): a square with rounded corners.
    r = (np.abs(xx) ** 4 + np.abs(yy) ** 4) ** 0.25
    edge = 1.0 - 2.0 * inset
    f = max(2.0 * feather, 1e-6)
    return np.clip((edge - r) / f, 0.0, 1.0).astype(np.float32)


def paste_back(photo_u8: np.ndarray, crop_u8: np.ndarray, quad: np.ndarray, feather: float = 0.08) -> np.ndarray:
    """Warp a (stylized) crop back into the photo it was aligned from and blend it in with a feathered mask.

    Args:
        photo_u8: [H, W, 3] the original photo; crop_u8: [S, S, 3] at any resolution S; quad: the AlignedFace quad.
    Returns:
        img_u8 [H, W, 3].
    """
    from PIL import Image

    photo_u8, crop_u8 = _check_u8(photo_u8), _check_u8(crop_u8)
    if crop_u8.shape[0] != crop_u8.shape[1]:
        raise FaceError(f"the stylized crop must be square, got {crop_u8.shape[1]}x{crop_u8.shape[0]}")
    h, w = photo_u8.shape[:2]
    s = crop_u8.shape[0]
    quad = np.asarray(quad, dtype=np.float64)
    lo = np.clip(np.floor(quad.min(0)).astype(int) - 1, 0, [w, h])
    hi = np.clip(np.ceil(quad.max(0)).astype(int) + 1, 0, [w, h])
    if hi[0] <= lo[0] or hi[1] <= lo[1]:
        return photo_u8.copy()
    # Region pixel (x, y) -> crop coordinates.
    m = quad_to_crop_matrix(quad, s)
    shift = np.array([[1.0, 0.0, lo[0]], [0.0, 1.0, lo[1]], [0.0, 0.0, 1.0]])
    m = m @ shift
    coeffs = tuple(m[:2].reshape(-1))
    rw, rh = int(hi[0] - lo[0]), int(hi[1] - lo[1])
    warped = np.asarray(Image.fromarray(crop_u8).transform((rw, rh), Image.AFFINE, coeffs, resample=Image.BICUBIC))
    mask_img = Image.fromarray(face_mask(s, feather), mode="F")
    mask = np.asarray(mask_img.transform((rw, rh), Image.AFFINE, coeffs, resample=Image.BILINEAR))[:, :, None]
    out = photo_u8.copy()
    region = out[lo[1]:hi[1], lo[0]:hi[0]].astype(np.float32)
    blended = region + (warped.astype(np.float32) - region) * np.clip(mask, 0.0, 1.0)
    out[lo[1]:hi[1], lo[0]:hi[0]] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def replace(face: AlignedFace, **changes: Any) -> AlignedFace:
    return dataclasses.replace(face, **changes)


__all__: Sequence[str] = ("AlignedFace", "Face", "FaceAligner", "FaceError", "FaceModelsError", "NoFaceError",
                          "align_face", "align_photo", "align_quad", "face_mask", "ffhq_quad", "get_aligner",
                          "model_path", "paste_back", "read_image", "to_rgb_u8", "transform_points")
