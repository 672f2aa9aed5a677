"""What the generator-family kinds (stylegan2, dualstylegan) share in the server: mapping.onnx (z -> w), the latent
geometry, truncation, the optional photo encoder, the batched synthesis interface, the photo path of Stylize and the
inference endpoints `<name>` (seeds or z), `<name>.synthesis` (ws) and `<name>.stylize` (face photos), declared once
for every protocol (serving.tensors).
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from . import golden as G
from . import latents as L
from . import photo
from .backends import OrtEncoder, OrtMapping
from .batcher import BatchItem, DynamicBatcher
from .codecs import encode
from .config import BatchConfig
from .errors import InvalidArgument, ServingError
from .logs import log
from .metrics import Metrics
from .models import LoadedModel, RequestContext, StyleOptions
from .tensors import Endpoint, ParamSpec, TensorSpec, require_inputs

logger = logging.getLogger("serving.models")

SYNTHESIS = ".synthesis"  # inference endpoint suffixes of the generator kinds
STYLIZE = ".stylize"


class LatentModel(LoadedModel):
    """What the generator-family bundles (stylegan2, dualstylegan) share: mapping.onnx (z -> w, run per request), the
    latent geometry, the truncation rule, the optional photo encoder (encoder.onnx, dynamically batched) and their
    inference endpoints (`<name>`: seeds or z, `<name>.synthesis`: ws, `<name>.stylize`: face photos).

    `await map_w(z)` / `await seeds_to_w(seeds)` -> untruncated w [N, w_dim]; `to_ws(w, psi, cutoff)` -> ws truncated
    towards `trunc_origin` (stylegan2: w_avg; dualstylegan: 0); `await synthesize(ws, deadline, stats, style=,
    content_ws=)` -> img_u8 [N, R, R, 3] and `enqueue(...)` (streams) run the batched synthesis with the model's
    parsed style (None for stylegan2); a bundle with encoder.onnx adds `await encode(aligned_u8, deadline)` -> ws.
    Subclasses provide the synthesis (`_run_synthesis` rows), `render_faces` and their tensors (`extra_inputs`).
    """

    generates = True

    def __init__(self, name: str, version: str, path: Path, manifest: dict, mapping: OrtMapping, batch: BatchConfig,
                 encoder: OrtEncoder | None = None):
        super().__init__(name, version, path, manifest)
        self.encoder = encoder
        self.encoder_info: dict = dict(manifest.get("encoder") or {}) if encoder is not None else {}
        self.encoder_batcher: DynamicBatcher | None = None
        self.batcher: DynamicBatcher | None = None
        m = manifest["model"]
        self.latent_space = str(m.get("latent_space") or "")
        self.resolution = int(m["resolution"])
        self.z_dim, self.w_dim, self.num_ws = int(m["z_dim"]), int(m["w_dim"]), int(m["num_ws"])
        self.default_psi = float(m["default_psi"])
        self.trunc_origin = np.zeros(self.w_dim, dtype=np.float32)  # set by subclasses
        self.mapping = mapping
        self.batch_cfg = batch
        self.max_batch = batch.max_batch
        self.executor: Executor | None = None

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(resolution=self.resolution, z_dim=self.z_dim, w_dim=self.w_dim, num_ws=self.num_ws,
                 default_psi=self.default_psi, has_encoder=self.encoder is not None, latent_space=self.latent_space)
        return d

    @property
    def encoder_size(self) -> int:
        """Side of the aligned crops the encoder takes (0 = no encoder)."""
        return int(self.encoder_info.get("input_size", 0))

    @staticmethod
    def load_encoder(path: Path, manifest: dict, threads: int, providers: list[str] | None = None) -> OrtEncoder | None:
        """encoder.onnx of the bundle (CUDA execution provider when available), or None."""
        graphs = manifest["graphs"]
        if "encoder" not in graphs:
            return None
        return OrtEncoder(path / graphs["encoder"]["file"], LoadedModel.ort_providers(providers), threads)

    def after_load(self) -> None:
        """Load dlib's face models now (once per process, ~1 s), not on the first Stylize request. Missing models
        only disable Stylize (it answers FAILED_PRECONDITION); Generate keeps working."""
        if self.encoder is None and not self.latent_space:
            return
        from common.faces import FaceModelsError, get_aligner
        try:
            get_aligner()
        except FaceModelsError as exc:
            log(logger, logging.WARNING, "face models unavailable: Stylize disabled", model=self.name, error=str(exc))

    # -- golden checks shared by the generator kinds ----------------------------------------------------------

    def mapping_checks(self, gold: G.Golden) -> list[G.Check]:
        """mapping.onnx on golden z against golden w, and this model's numpy truncation of it (per row psi, towards
        trunc_origin) against golden ws: the very path Generate takes."""
        tol = gold.tolerance["max_abs_fp32"]
        w = self.mapping(gold["z"].astype(np.float32))
        ws = np.concatenate([self.to_ws(w[i: i + 1], float(p)) for i, p in enumerate(gold["psi"])])
        return [G.close("mapping", "w", w, gold["w"], tol), G.close("mapping", "ws", ws, gold["ws"], tol)]

    def encoder_checks(self, gold: G.Golden) -> list[G.Check]:
        """The encoder on golden aligned crops against the PyTorch ws (none without an encoder)."""
        if self.encoder is None:
            return []
        keys = self.encoder_info["golden"]
        ws = self.encoder(gold[keys["img_u8"]])
        ref = gold[keys["ws"]]
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            return [G.Check("encoder", "ws", math.nan, math.nan, False,
                            f"encoder output {list(ws.shape)}; synthesis takes [N, {self.num_ws}, {self.w_dim}]")]
        return [G.close("encoder", "ws", ws, ref, gold.tolerance["max_abs_encoder"])]

    # -- serving ----------------------------------------------------------------------------------------------

    @property
    def stylizes_photos(self) -> bool:
        return self.encoder is not None or bool(self.latent_space)

    @property
    def uses_face_encoder(self) -> bool:
        return True

    def _run_synthesis(self, rows: np.ndarray) -> np.ndarray:
        """A batch of synthesis rows -> img_u8 [B, R, R, 3] (blocking; in the inference pool)."""
        raise NotImplementedError

    def _rows(self, ws: np.ndarray, style: Any, content_ws: np.ndarray | None) -> np.ndarray:
        """The batcher rows of truncated ws [N, num_ws, w_dim] in a parsed style."""
        return self._check_ws(ws)

    async def start(self, executor: Executor | None, metrics: Metrics | None) -> None:
        """Start the dynamic batchers: synthesis (up to `self.max_batch` rows) and, with encoder.onnx, the encoder's."""
        await super().start(executor, metrics)
        self.executor = executor
        self.batcher = self._batcher(self.name, self._run_synthesis, self.max_batch, None, executor, metrics)
        if self.encoder is not None:
            self.encoder_batcher = self._batcher(f"{self.name}.encoder", self.encoder, self.batch_cfg.max_batch, None,
                                                 executor, metrics)

    async def close(self) -> None:
        await self._close_runners([self.batcher, self.encoder_batcher], self._runners())

    def _runners(self) -> list:
        return [self.mapping, self.encoder]

    async def encode(self, aligned_u8: np.ndarray, deadline: float | None = None,
                     stats: dict[str, float] | None = None) -> np.ndarray:
        """FFHQ-aligned crops img_u8 [N, S, S, 3] (S = encoder_size) -> ws [N, num_ws, w_dim] float32."""
        if self.encoder_batcher is None:
            raise ServingError(f"model {self.name!r} has no encoder", code="FAILED_PRECONDITION")
        s = self.encoder_size
        if aligned_u8.ndim != 4 or aligned_u8.shape[1:] != (s, s, 3) or aligned_u8.dtype != np.uint8:
            raise InvalidArgument(f"aligned faces must be uint8 [N, {s}, {s}, 3], got {aligned_u8.dtype} "
                                  f"{list(aligned_u8.shape)}")
        out, queue_s = await self.encoder_batcher.submit(np.ascontiguousarray(aligned_u8), deadline)
        if stats is not None:
            stats["encoder_queue_s"] = queue_s
        return out

    def psi_or_default(self, psi: float | None) -> float:
        return self.default_psi if psi is None else float(psi)

    def check_cutoff(self, cutoff: int | None) -> None:
        if cutoff is not None and not 0 <= cutoff <= self.num_ws:
            raise InvalidArgument(f"truncation cutoff {cutoff} out of range 0..{self.num_ws}")

    async def map(self, z: np.ndarray, psi: float | None = None, cutoff: int | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
        """z [N, z_dim] -> (w [N, w_dim], ws [N, num_ws, w_dim] truncated with psi on layers [0, cutoff))."""
        w = await self.map_w(z)
        return w, self.to_ws(w, psi, cutoff)

    async def map_w(self, z: np.ndarray) -> np.ndarray:
        """z [N, z_dim] -> untruncated w [N, w_dim] (in the inference thread pool)."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise InvalidArgument(f"z must be [N, {self.z_dim}], got {list(z.shape)}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.mapping, np.ascontiguousarray(z, np.float32))

    async def seeds_to_w(self, seeds: list[int]) -> np.ndarray:
        """seeds -> untruncated w [N, w_dim]: seed -> z and the mapping, both in the inference thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: self.mapping(L.seeds_to_z(seeds, self.z_dim)))

    def to_ws(self, w: np.ndarray, psi: float | None = None, cutoff: int | None = None) -> np.ndarray:
        """w [N, w_dim] or ws [N, num_ws, w_dim] -> ws truncated towards trunc_origin (numpy; psi None =
        default_psi)."""
        self.check_cutoff(cutoff)
        return L.truncate(L.broadcast(w, self.num_ws), self.trunc_origin, self.psi_or_default(psi), cutoff)

    def _check_ws(self, ws: np.ndarray) -> np.ndarray:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise InvalidArgument(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        return np.ascontiguousarray(ws, dtype=np.float32)

    async def resolve_style(self, style: Any, ctx: RequestContext) -> Any:
        """A parsed style request -> the style synthesize takes (an exemplar image is encoded here); None = none."""
        return None

    @staticmethod
    def library_id(style: Any) -> int | None:
        """The library style id a parsed style request uses (None: none, or not a library style)."""
        return None

    async def synthesize(self, ws: np.ndarray, deadline: float | None = None, stats: dict[str, float] | None = None,
                         *, style: Any = None, content_ws: np.ndarray | None = None) -> np.ndarray:
        """Truncated ws [N, num_ws, w_dim] float32 -> img_u8 [N, R, R, 3] through the dynamic batcher.

        Args:
            deadline: absolute time.monotonic() after which queued rows are dropped (DeadlineExceeded).
            stats: filled with queue_s, the longest time one of the rows waited in the queue.
            style: a resolved style (`resolve_style`; None for models without a style library).
            content_ws: the untruncated ws (dualstylegan's preserve_color reads them).
        """
        return await self.synthesize_rows(self._rows(ws, style, content_ws), deadline, stats)

    async def synthesize_rows(self, rows: np.ndarray, deadline: float | None = None,
                              stats: dict[str, float] | None = None) -> np.ndarray:
        """Batcher rows -> img_u8 [N, R, R, 3]."""
        assert self.batcher is not None, "model not started"
        out, queue_s = await self.batcher.submit(rows, deadline)
        if stats is not None:
            stats["queue_s"] = queue_s
        return out

    def enqueue(self, ws: np.ndarray, deadline: float | None = None, *, style: Any = None,
                content_ws: np.ndarray | None = None) -> list[BatchItem]:
        """Queue rows without waiting (streams): await each item's future, cancel it to drop the row."""
        assert self.batcher is not None, "model not started"
        return self.batcher.enqueue(self._rows(ws, style, content_ws), deadline)

    async def render_faces(self, ws: np.ndarray, psi: float | None, deadline: float | None,
                           stats: dict[str, float], style: Any = None,
                           exemplar_ws: np.ndarray | None = None) -> np.ndarray:
        """Encoded faces ws [F, num_ws, w_dim] (untruncated) -> crops img_u8 [F, R, R, 3] (the photo path's last
        step, serving.photo.stylize_faces)."""
        raise NotImplementedError

    # -- Stylize (face photos) --------------------------------------------------------------------------------

    def check_stylize(self, ctx: RequestContext) -> None:
        ctx.repo.encoder_for(self).release()

    async def stylize_photo(self, image: bytes, face: photo.FaceRequest, style: StyleOptions | None,
                            ctx: RequestContext) -> photo.PhotoResult:
        """A face photo through the photo path (serving.photo.stylize_faces) with this model's style options."""
        parsed = self.parse_style(style, ctx)
        lim = ctx.limits
        res = await photo.stylize_faces(ctx.repo, self, image, face, max_photo_size=lim.max_photo_size,
                                        max_faces=lim.max_faces, pool=ctx.pool, deadline=ctx.deadline, style=parsed)
        res.style_id = self.library_id(parsed)
        return res

    # -- inference endpoints ----------------------------------------------------------------------------------

    def extra_inputs(self, suffix: str) -> tuple[TensorSpec, ...]:
        """The kind's own inputs of endpoint `suffix` beyond the shared ones."""
        return ()

    def extra_params(self, suffix: str) -> tuple[ParamSpec, ...]:
        return ()

    def endpoints(self) -> dict[str, Endpoint]:
        r = self.resolution
        image = TensorSpec("IMAGE", "UINT8", (-1, r, r, 3), description="img_u8, RGB")
        eps = {
            "": Endpoint("", (TensorSpec("SEED", "INT64", (-1, 1), description="seed -> z by the numpy rule"),
                              TensorSpec("Z", "FP32", (-1, self.z_dim), optional=True,
                                         description="instead of SEED"),
                              TensorSpec("PSI", "FP32", (-1, 1), optional=True,
                                         description="truncation, 1 or N rows (default the bundle's)"))
                         + self.extra_inputs(""), (image,), self.extra_params(""),
                         description="seeds or z through the mapping, truncation and synthesis"),
            SYNTHESIS: Endpoint(SYNTHESIS, (TensorSpec("WS", "FP32", (-1, self.num_ws, self.w_dim)),)
                                + self.extra_inputs(SYNTHESIS), (image,), self.extra_params(SYNTHESIS),
                                description="the synthesis graph's own inputs"),
        }
        if self.stylizes_photos:
            eps[STYLIZE] = Endpoint(
                STYLIZE, (TensorSpec("IMAGE", "BYTES", (-1, 1), description="encoded face photos"),),
                (TensorSpec("STYLIZED", "BYTES", (-1, 1), description="PNG"),),
                (ParamSpec("faces", "string", "'largest' | 'all' | an index"),
                 ParamSpec("composite", "string", "'paste' | 'crop'"),
                 ParamSpec("psi", "double", "truncation of the encoded latents")) + self.extra_params(STYLIZE),
                description="the photo path of StyleService.Stylize")
        return eps

    async def infer(self, suffix: str, inputs: dict[str, np.ndarray], params: dict[str, Any],
                    ctx: RequestContext) -> dict[str, np.ndarray]:
        if suffix == STYLIZE and self.stylizes_photos:
            return await self._infer_stylize(inputs, params, ctx)
        if suffix == SYNTHESIS:
            require_inputs(inputs, [t.name for t in self.endpoints()[SYNTHESIS].inputs if not t.optional])
            ws = inputs["WS"]
        elif suffix == "":
            ws = await self.ws_from_inputs(inputs, ctx.limits.psi_range)
        else:
            return await super().infer(suffix, inputs, params, ctx)
        return {"IMAGE": await self.synthesize_rows(self.infer_rows(suffix, ws, inputs), ctx.deadline)}

    def infer_rows(self, suffix: str, ws: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The batcher rows of an inference request (`<name>` / `.synthesis`) from its truncated ws and inputs."""
        return self._check_ws(ws)

    async def ws_from_inputs(self, x: dict[str, np.ndarray], psi_range: tuple[float, float]) -> np.ndarray:
        """SEED or Z, optional PSI (1 or N rows; absent = default_psi) -> truncated ws [N, num_ws, w_dim]."""
        if ("SEED" in x) == ("Z" in x):
            raise InvalidArgument("give exactly one of the inputs 'SEED' or 'Z'")
        if "SEED" in x:
            seeds = [int(s) for s in x["SEED"][:, 0]]
            for s in seeds:
                if not 0 <= s <= L.MAX_SEED:
                    raise InvalidArgument(f"input 'SEED': seed {s} out of range 0..{L.MAX_SEED}")
            w = await self.seeds_to_w(seeds)
        else:
            w = await self.map_w(x["Z"])
        n = len(w)
        if "PSI" not in x:
            return self.to_ws(w, None)
        psi = x["PSI"][:, 0]
        if len(psi) not in (1, n):
            raise InvalidArgument(f"input 'PSI': {len(psi)} rows for {n} latents (give 1 or {n})")
        lo, hi = psi_range
        for p in psi:
            if not lo <= float(p) <= hi:
                raise InvalidArgument(f"input 'PSI': psi must be in [{lo}, {hi}], got {float(p)}")
        if len(psi) == 1 or (psi == psi[0]).all():
            return self.to_ws(w, float(psi[0]))
        return np.concatenate([self.to_ws(w[i: i + 1], float(p)) for i, p in enumerate(psi)])

    async def _infer_stylize(self, x: dict[str, np.ndarray], params: dict[str, Any],
                             ctx: RequestContext) -> dict[str, np.ndarray]:
        """`<name>.stylize`: each encoded photo through the photo path, answered as PNG bytes."""
        require_inputs(x, ["IMAGE"])
        face = photo.FaceRequest.from_params(params, ctx.limits.psi_range)
        style = self.parse_style(StyleOptions.from_params(params), ctx)
        lim = ctx.limits
        outs = await asyncio.gather(*(photo.stylize_faces(
            ctx.repo, self, bytes(im), face, max_photo_size=lim.max_photo_size, max_faces=lim.max_faces,
            pool=ctx.pool, deadline=ctx.deadline, style=style) for im in x["IMAGE"][:, 0]))
        loop = asyncio.get_running_loop()
        pngs = await asyncio.gather(*(loop.run_in_executor(ctx.pool, encode, r.image, "png") for r in outs))
        out = np.empty((len(pngs), 1), dtype=object)
        out[:, 0] = pngs
        return {"STYLIZED": out}
