"""Face photos for the generator-family bundles (stylegan2, dualstylegan): decode -> detect + FFHQ-align (dlib) ->
encode to W+ -> render -> paste back (Richardson et al., "Encoding in Style: a StyleGAN Encoder for Image-to-Image
Translation", CVPR 2021, as the serving path of a face stylizer; for DualStyleGAN, Yang et al., CVPR 2022, the
rendering takes an extrinsic style, possibly an exemplar photo encoded by the same path).

One path for both kinds: everything up to the encoded W+ codes is shared, and the last step is the model's own
`render_faces(ws, psi, deadline, stats, style, exemplar_ws)` (stylegan2: psi towards w_avg, synthesis; dualstylegan:
psi towards 0, the extrinsic style, dualstyle synthesis). The blocking steps (`decode`, `find_faces`, `composite`)
run in the server's encode thread pool; the encoder and the synthesis run through their models' dynamic batchers.
`common.faces` does the geometry (torch-free).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import faces as F

from .codecs import decode_image
from .errors import InvalidArgument, ServingError

DEFAULT_FEATHER = 0.08
MAX_FEATHER = 0.5
SELECTIONS = ("largest", "all")
COMPOSITES = ("paste", "crop")


@dataclass(frozen=True)
class FaceRequest:
    """Parsed face options: which faces, how to composite them, and the optional pull towards the truncation
    centre (stylegan2: w_avg; dualstylegan: 0)."""

    select: str | int = "largest"
    composite: str = "paste"     # "paste" (back into the photo) or "crop" (the aligned stylized crop)
    feather: float = DEFAULT_FEATHER
    psi: float | None = None

    @classmethod
    def checked(cls, select: str | int, composite: str, feather: float, psi: float | None,
                psi_range: tuple[float, float], what: str = "face") -> "FaceRequest":
        """Validated options (feather 0 = DEFAULT_FEATHER); InvalidArgument naming the bad one."""
        if not (select in SELECTIONS or (isinstance(select, int) and not isinstance(select, bool) and select >= 0)):
            raise InvalidArgument(f"{what} selection: 'largest', 'all' or an index, got {select!r}")
        if composite not in COMPOSITES:
            raise InvalidArgument(f"{what} composite: 'paste' or 'crop', got {composite!r}")
        feather = float(feather) or DEFAULT_FEATHER
        if not 0.0 < feather <= MAX_FEATHER:
            raise InvalidArgument(f"{what} feather must be in (0, {MAX_FEATHER}], got {feather}")
        if psi is not None and not (math.isfinite(psi) and psi_range[0] <= psi <= psi_range[1]):
            raise InvalidArgument(f"{what} psi must be in [{psi_range[0]}, {psi_range[1]}], got {psi}")
        return cls(select=select, composite=composite, feather=feather, psi=psi)

    @classmethod
    def from_params(cls, params: dict[str, Any], psi_range: tuple[float, float]) -> "FaceRequest":
        """Inference-protocol request parameters `faces` ("largest" | "all" | an index), `composite` ("paste" |
        "crop"), `psi` (a number) -> FaceRequest."""
        select: str | int = "largest"
        if "faces" in params:
            v = str(params["faces"])
            if v not in SELECTIONS and not v.isdigit():
                raise InvalidArgument(f"parameter 'faces': 'largest', 'all' or an index, got {v!r}")
            select = int(v) if v.isdigit() else v
        composite = str(params.get("composite", "paste"))
        if composite not in COMPOSITES:
            raise InvalidArgument(f"parameter 'composite': 'paste' or 'crop', got {composite!r}")
        psi = None
        if "psi" in params:
            v = params["psi"]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidArgument(f"parameter 'psi': expected a number, got {v!r}")
            psi = float(v)
            lo, hi = psi_range
            if not (math.isfinite(psi) and lo <= psi <= hi):
                raise InvalidArgument(f"parameter 'psi' must be in [{lo}, {hi}], got {psi}")
        return cls(select=select, composite=composite, psi=psi)


def aligner() -> F.FaceAligner:
    """The process-wide dlib aligner (loaded once, ~100 MB). Raises ServingError FAILED_PRECONDITION when dlib or
    its models are missing."""
    try:
        return F.get_aligner()
    except F.FaceModelsError as exc:
        raise ServingError(f"face alignment unavailable on this server: {exc}", code="FAILED_PRECONDITION") from None


def find_faces(img_u8: np.ndarray, req: FaceRequest, size: int, max_faces: int,
               what: str = "the photo") -> list[F.AlignedFace]:
    """Detect, choose and align faces (largest first) at `size` px. Blocking.

    Raises:
        ServingError FAILED_PRECONDITION: no face (or no face with that index) in the photo.
    """
    try:
        chosen = aligner().select(img_u8, req.select, what=what)
        return [F.align_face(img_u8, face, size) for face in chosen[:max_faces]]
    except F.NoFaceError as exc:
        raise ServingError(str(exc), code="FAILED_PRECONDITION") from None
    except F.FaceError as exc:
        raise InvalidArgument(str(exc)) from None


def composite(photo_u8: np.ndarray, aligned: list[F.AlignedFace], stylized_u8: np.ndarray,
              req: FaceRequest) -> np.ndarray:
    """Paste each stylized crop [F, R, R, 3] back into the photo (largest face last, so it ends on top). Blocking."""
    out = photo_u8
    for face, crop in reversed(list(zip(aligned, stylized_u8))):
        out = F.paste_back(out, np.ascontiguousarray(crop), face.quad, feather=req.feather)
    return out


@dataclass
class PhotoResult:
    """What stylizing one photo made, for any front end to encode: the output image [H, W, 3] (the composited photo,
    the first crop, or the whole stylized image), the faces used with every stylized crop [F, R, R, 3] (face models),
    the seconds spent per stage (decode, align, encoder, synthesis, composite, queue), the largest side the output
    may keep at its own size (a pasted-back photo keeps the photo's), and the library style used (dualstylegan)."""

    image: np.ndarray
    faces: list[F.AlignedFace] = field(default_factory=list)
    crops: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    own_size_limit: int = 0
    style_id: int | None = None


async def encode_style_image(enc, image: bytes, *, max_photo_size: int, pool: Executor | None,
                             deadline: float | None) -> np.ndarray:
    """An exemplar portrait (dualstylegan style_image) -> its W+ code [1, num_ws, w_dim] float32 (untruncated): decode,
    FFHQ-align the largest face at the encoder's size, encode with `enc` (a model with an encoder).

    Raises:
        InvalidArgument: undecodable / oversized image. ServingError FAILED_PRECONDITION: no face in it.
    """
    loop = asyncio.get_running_loop()
    try:
        img = await loop.run_in_executor(pool, decode_image, image, max_photo_size)
    except InvalidArgument as exc:
        raise InvalidArgument(f"style_image: {exc.message}") from None
    aligned = await loop.run_in_executor(pool, find_faces, img, FaceRequest(), enc.encoder_size, 1, "the style image")
    return await enc.encode(aligned[0].img_u8[None], deadline)


async def stylize_faces(repo, model, image: bytes, req: FaceRequest, *, max_photo_size: int, max_faces: int,
                        pool: Executor | None, deadline: float | None, style=None) -> PhotoResult:
    """The whole photo path for a generator-family model: decode, align (encode pool), encode with the encoder serving
    the model's latent space, render (`model.render_faces`: psi and, for dualstylegan, the extrinsic `style`, a
    serving.dualstyle_model.StyleRequest; its exemplar image is encoded concurrently with the photo), composite
    (encode pool)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    stats: dict[str, float] = {}
    exemplar_ws = None
    with repo.encoder_for(model) as enc:
        exemplar = None
        if style is not None and style.image is not None:
            exemplar = asyncio.ensure_future(encode_style_image(enc, style.image, max_photo_size=max_photo_size,
                                                                pool=pool, deadline=deadline))
        try:
            img = await loop.run_in_executor(pool, decode_image, image, max_photo_size)
            t1 = time.perf_counter()
            aligned = await loop.run_in_executor(pool, find_faces, img, req, enc.encoder_size, max_faces)
            t2 = time.perf_counter()
            ws = await enc.encode(np.stack([a.img_u8 for a in aligned]), deadline, stats)
            if exemplar is not None:
                exemplar_ws = await exemplar
        finally:
            if exemplar is not None:
                if not exemplar.done():
                    exemplar.cancel()
                elif not exemplar.cancelled():
                    exemplar.exception()  # retrieved: the photo's own error is the one reported
    t3 = time.perf_counter()
    crops = await model.render_faces(ws, req.psi, deadline, stats, style=style, exemplar_ws=exemplar_ws)  # [F, R, R, 3]
    t4 = time.perf_counter()
    if req.composite == "paste":
        out = await loop.run_in_executor(pool, composite, img, aligned, crops, req)
    else:
        out = crops[0]
    t5 = time.perf_counter()
    seconds = {"decode": t1 - t0, "align": t2 - t1, "encoder": t3 - t2, "synthesis": t4 - t3,
               "composite": t5 - t4, "queue": stats.get("queue_s", 0.0) + stats.get("encoder_queue_s", 0.0)}
    return PhotoResult(out, aligned, crops, seconds, max_photo_size if req.composite == "paste" else 0)
