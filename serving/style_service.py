"""stylecast.v1.StyleService: ListModels, GetModel, ListStyles, Generate (unary), GenerateStream (server streaming),
Stylize and StylizeStream, over stylegan2, dualstylegan and fast_style models.

Requests are validated completely before any work starts; every RPC is counted, timed and logged with its
request id (the client's `x-request-id` metadata, or a fresh one, returned in the trailing metadata).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from protos.stylecast.v1 import common_pb2 as cpb
from protos.stylecast.v1 import style_pb2 as pb
from protos.stylecast.v1 import style_pb2_grpc as pb_grpc

from . import codecs
from . import latents as L
from . import photo
from .batcher import cancel_items
from .config import Limits
from .errors import InvalidArgument, ModelNotFound, QueueFull, ServingError
from .logs import log
from .metrics import Metrics
from .dualstyle_model import DualStyleGANModel, StyleRequest
from .fast_style_model import FastStyleModel
from .models import LatentModel, StyleGAN2Model
from .repository import ModelRepository, ModelStatus, State

logger = logging.getLogger("serving.access")

FORMATS = {cpb.IMAGE_FORMAT_UNSPECIFIED: "png", cpb.IMAGE_FORMAT_PNG: "png", cpb.IMAGE_FORMAT_JPEG: "jpeg",
           cpb.IMAGE_FORMAT_WEBP: "webp", cpb.IMAGE_FORMAT_RAW_RGB8: "raw"}
FORMAT_ENUM = {"png": cpb.IMAGE_FORMAT_PNG, "jpeg": cpb.IMAGE_FORMAT_JPEG, "webp": cpb.IMAGE_FORMAT_WEBP,
               "raw": cpb.IMAGE_FORMAT_RAW_RGB8}
STATE_ENUM = {State.LOADING: pb.MODEL_STATE_LOADING, State.READY: pb.MODEL_STATE_READY,
              State.FAILED: pb.MODEL_STATE_FAILED}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
DEADLINE_SLACK_S = 0.05


@dataclass
class Output:
    fmt: str
    quality: int
    size: tuple[int, int]


@dataclass
class Batch:
    """Parsed latents of a request: the space they live in, the array, and the seeds when given as seeds."""

    space: str                 # "z" (also for seeds), "w" or "ws"
    values: np.ndarray | None  # [N, z_dim] | [N, w_dim] | [N, num_ws, w_dim]; None for seeds (z made lazily)
    seeds: list[int] | None

    def __len__(self) -> int:
        return len(self.seeds) if self.values is None else len(self.values)

    def rows(self, start: int, stop: int) -> "Batch":
        if self.values is None:
            return Batch(self.space, None, self.seeds[start: stop])
        return Batch(self.space, self.values[start: stop], None)


class StyleServicer(pb_grpc.StyleServiceServicer):
    def __init__(self, repository: ModelRepository, limits: Limits, metrics: Metrics, encode_pool: Executor):
        self.repo = repository
        self.limits = limits
        self.metrics = metrics
        self.encode_pool = encode_pool

    # -- plumbing shared by every RPC ---------------------------------------------------------------------------

    def _model_label(self, name: str) -> str:
        # Only known names become label values: a client must not be able to grow the metric set.
        return name if name in self.repo.models or self.repo.status(name) is not None else "_unknown"

    async def _call(self, method: str, model: str, context: grpc.aio.ServicerContext, fn, *args) -> Any:
        md = dict((k, v) for k, v in (context.invocation_metadata() or ()))
        rid = md.get("x-request-id", "")
        rid = rid if isinstance(rid, str) and REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]
        label = self._model_label(model) if model else ""
        m = self.metrics
        m.requests.labels(method, label).inc()
        m.in_flight.labels(method).inc()
        t0 = time.perf_counter()
        code, detail, extra = "OK", "", {}
        trailing = (("x-request-id", rid),)
        try:
            result = await fn(*args, context, rid, extra)
            context.set_trailing_metadata(trailing)
            return result
        except ServingError as exc:
            code, detail = exc.code, exc.message
        except asyncio.CancelledError:
            # The client's own deadline fires a transit time before the server's copy of it: a cancellation
            # within DEADLINE_SLACK_S of the deadline is the deadline.
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"
            raise
        except Exception as exc:
            code, detail = "INTERNAL", f"internal error (request id {rid})"
            logger.exception("unhandled error", extra={"request_id": rid, "method": method})
            extra["error"] = repr(exc)
        finally:
            elapsed = time.perf_counter() - t0
            m.in_flight.labels(method).dec()
            m.latency.labels(method, label).observe(elapsed)
            if code != "OK":
                m.errors.labels(method, label, code).inc()
            log(logger, logging.INFO if code in ("OK", "CANCELLED") else logging.WARNING, "rpc", method=method,
                model=model, request_id=rid, code=code, latency_ms=round(elapsed * 1000, 3),
                peer=context.peer(), **({"detail": detail} if detail else {}), **extra)
        await context.abort(grpc.StatusCode[code], detail, trailing_metadata=trailing)

    # -- model discovery ------------------------------------------------------------------------------------------

    def _model_info(self, s: ModelStatus) -> pb.ModelInfo:
        i = s.info
        return pb.ModelInfo(name=s.name, kind=s.kind, version=i.get("version", ""), state=STATE_ENUM[s.state],
                            ready=s.ready, error=s.error, resolution=i.get("resolution", 0),
                            z_dim=i.get("z_dim", 0), w_dim=i.get("w_dim", 0), num_ws=i.get("num_ws", 0),
                            default_psi=i.get("default_psi", 0.0), backend=i.get("backend", ""),
                            max_batch=i.get("max_batch", 0), description=i.get("description", ""),
                            bundle=s.bundle, max_image_size=i.get("max_size", 0),
                            has_encoder=bool(i.get("has_encoder", False)), latent_space=i.get("latent_space", ""),
                            encoder_model=self._encoder_name(s), style_count=i.get("style_count", 0),
                            res_index=i.get("res_index", 0), default_weights=i.get("default_weights", []))

    def _encoder_name(self, s: ModelStatus) -> str:
        """The model whose encoder Stylize would use for this model ("" = none, or not a face model)."""
        if not s.ready or s.kind == "fast_style":
            return ""
        model = self.repo.models.get(s.name)
        if model is None:
            return ""
        try:
            with self.repo.encoder_for(model) as enc:
                return enc.name
        except ServingError:
            return ""

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async def run(context, rid, extra):
            return pb.ListModelsResponse(models=[self._model_info(s) for s in self.repo.statuses()])
        return await self._call("ListModels", "", context, run)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        async def run(context, rid, extra):
            s = self.repo.status(request.name)
            if s is None:
                raise ModelNotFound(f"unknown model {request.name!r}")
            return self._model_info(s)
        return await self._call("GetModel", request.name, context, run)

    async def ListStyles(self, request: pb.ListStylesRequest, context) -> pb.ListStylesResponse:
        async def run(context, rid, extra):
            with self.repo.acquire(request.model) as model:
                if not isinstance(model, DualStyleGANModel):
                    raise InvalidArgument(f"model {model.name!r} is a {model.kind!r} model; only dualstylegan models "
                                          "have a style library")
                return pb.ListStylesResponse(
                    model=model.name, model_version=model.version, num_ws=model.num_ws, res_index=model.res_index,
                    styles=[pb.StyleInfo(id=i, name=n) for i, n in enumerate(model.style_names)],
                    default_weights=[float(v) for v in model.default_weights])
        return await self._call("ListStyles", request.model, context, run)

    # -- validation ---------------------------------------------------------------------------------------------

    def _psi(self, msg, field: str = "psi") -> float | None:
        if not msg.HasField(field):
            return None
        psi = float(getattr(msg, field))
        lo, hi = self.limits.psi_range
        if not math.isfinite(psi) or not lo <= psi <= hi:
            raise InvalidArgument(f"psi must be a finite number in [{lo}, {hi}], got {psi}")
        return psi

    def _cutoff(self, msg, model: LatentModel) -> int | None:
        if not msg.HasField("truncation_cutoff"):
            return None
        cutoff = int(msg.truncation_cutoff)
        model.check_cutoff(cutoff)
        return cutoff

    def _output(self, opts: cpb.OutputOptions, model: LatentModel) -> Output:
        fmt = FORMATS.get(opts.format)
        if fmt is None:
            raise InvalidArgument(f"unknown image format {opts.format}")
        quality = opts.quality or self.limits.default_quality
        if not 1 <= quality <= 100:
            raise InvalidArgument(f"quality must be in 1..100, got {quality}")
        mx = self.limits.max_output_size
        if opts.width > mx or opts.height > mx:
            raise InvalidArgument(f"output size {opts.width}x{opts.height} exceeds the limit of {mx}x{mx}")
        size = codecs.output_size((model.resolution, model.resolution), opts.width, opts.height)
        if max(size) > mx:
            raise InvalidArgument(f"output size {size[0]}x{size[1]} exceeds the limit of {mx}x{mx}")
        return Output(fmt, quality, size)

    def _latents(self, msg: cpb.Latents, model: LatentModel, what: str, max_rows: int) -> Batch:
        space = msg.WhichOneof("space")
        if space is None:
            raise InvalidArgument(f"{what}: give seeds, z, w or ws")
        if space == "seeds":
            return self._seeds(list(msg.seeds.seeds), what, max_rows)
        t = getattr(msg, space)
        expect = {"z": (None, model.z_dim), "w": (None, model.w_dim), "ws": (None, model.num_ws, model.w_dim)}
        return Batch(space, L.tensor(t.shape, t.values, f"{what}.{space}", expect[space], max_rows), None)

    @staticmethod
    def _seeds(seeds: list[int], what: str, max_rows: int) -> Batch:
        """Checked seeds; their z is made later, in the thread pool (`_to_ws`)."""
        if not seeds:
            raise InvalidArgument(f"{what}: no seeds")
        if len(seeds) > max_rows:
            raise InvalidArgument(f"{what}: too many seeds ({len(seeds)}, the limit is {max_rows})")
        for s in seeds:
            if not 0 <= s <= L.MAX_SEED:
                raise InvalidArgument(f"{what}: seed {s} out of range 0..{L.MAX_SEED}")
        return Batch("z", None, seeds)

    def _model(self, lease_model) -> LatentModel:
        if not isinstance(lease_model, (StyleGAN2Model, DualStyleGANModel)):
            raise InvalidArgument(f"model {lease_model.name!r} is a {lease_model.kind!r} model; this RPC needs a "
                                  "stylegan2 or dualstylegan model")
        return lease_model

    def _dualstyle(self, request, model) -> StyleRequest | None:
        """request.dualstyle -> a validated StyleRequest for a dualstylegan model (unset = style 0, default weights);
        None for other kinds, for which setting it is INVALID_ARGUMENT. An exemplar needs an encoder for the model
        (FAILED_PRECONDITION otherwise), checked here, before any work."""
        has = request.HasField("dualstyle")
        if not isinstance(model, DualStyleGANModel):
            if has:
                raise InvalidArgument(f"dualstyle: model {model.name!r} is a {model.kind!r} model; dualstyle options "
                                      "apply to dualstylegan models only")
            return None
        if not has:
            return StyleRequest()
        msg = request.dualstyle
        which = msg.WhichOneof("style")
        kw: dict[str, Any] = {}
        if which == "style_id":
            kw["style_id"] = model.style_id(int(msg.style_id))
        elif which == "style_name":
            kw["style_id"] = model.style_id(msg.style_name)
        elif which == "style_image":
            if not msg.style_image:
                raise InvalidArgument("dualstyle.style_image: empty; send PNG, JPEG or WebP bytes")
            self.repo.encoder_for(model).release()
            kw["image"] = bytes(msg.style_image)
        elif which in ("exstyle_z", "exstyle_w"):
            t = getattr(msg, which)
            dim = model.z_dim if which == "exstyle_z" else model.w_dim
            kw[which] = model.check_code(L.tensor(t.shape, t.values, f"dualstyle.{which}", (None, model.num_ws, dim),
                                                  1), dim, f"dualstyle.{which}")
        weights = model.check_weights(list(msg.weights), "dualstyle.weights")
        return StyleRequest(weights=weights, preserve_color=bool(msg.preserve_color), **kw)

    async def _exemplar(self, model: DualStyleGANModel, style: StyleRequest, deadline: float | None):
        """The encoded exemplar [1, num_ws, w_dim] of style.image (None without one)."""
        if style.image is None:
            return None
        with self.repo.encoder_for(model) as enc:
            return await photo.encode_style_image(enc, style.image, max_photo_size=self.limits.max_photo_size,
                                                  pool=self.encode_pool, deadline=deadline)

    async def _to_ws(self, model: LatentModel, batch: Batch, psi: float | None, cutoff: int | None) -> np.ndarray:
        if batch.values is None:
            return model.to_ws(await model.seeds_to_w(batch.seeds), psi, cutoff)
        if batch.space == "z":
            return model.to_ws(await model.map_w(batch.values), psi, cutoff)
        return model.to_ws(batch.values, psi, cutoff)

    async def _encode(self, imgs: np.ndarray, out: Output) -> list[bytes]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*[
            loop.run_in_executor(self.encode_pool, codecs.encode, img, out.fmt, out.quality, out.size)
            for img in imgs]))

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + max(0.0, remaining)

    # -- Generate -------------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return await self._call("Generate", request.model, context, self._generate, request)

    async def _generate(self, request: pb.GenerateRequest, context, rid: str, extra: dict) -> pb.GenerateResponse:
        t0 = time.perf_counter()
        with self.repo.acquire(request.model) as leased:
            model = self._model(leased)
            lim = self.limits
            psi = self._psi(request)
            cutoff = self._cutoff(request, model)
            out = self._output(request.output, model)
            if not request.HasField("latents"):
                raise InvalidArgument("latents: give seeds, z, w or ws")
            batch = self._latents(request.latents, model, "latents", lim.max_seeds)
            n = len(batch)
            fine = None
            if request.HasField("mixing"):
                mixing = request.mixing
                if not request.mixing.HasField("fine"):
                    raise InvalidArgument("mixing.fine: give the latents of the fine layers")
                fine = self._latents(mixing.fine, model, "mixing.fine", lim.max_seeds)
                if len(fine) not in (1, n):
                    raise InvalidArgument(f"mixing.fine: {len(fine)} latents; give 1 or {n} (one per latent)")
                if not 0 <= mixing.crossover <= model.num_ws:
                    raise InvalidArgument(f"mixing.crossover {mixing.crossover} out of range 0..{model.num_ws}")
            style_req = self._dualstyle(request, model)
            extra.update(rows=n, version=model.version)
            # Work starts here: mapping, then the batched synthesis, then encoding in the thread pool.
            deadline = self._deadline(context)
            stats: dict[str, float] = {}
            if style_req is not None:
                # dualstylegan: untruncated codes first (preserve_color reads them), then psi towards 0.
                ws_u = await self._to_ws(model, batch, 1.0, None)
                if fine is not None:
                    ws_fine = await self._to_ws(model, fine, 1.0, None)
                    if len(ws_fine) == 1 and n > 1:
                        ws_fine = np.repeat(ws_fine, n, axis=0)
                    ws_u = L.mix(ws_u, ws_fine, int(request.mixing.crossover))
                ws = model.to_ws(ws_u, psi, cutoff)
                style = await model.resolve_style(style_req, await self._exemplar(model, style_req, deadline))
                extra["style_id"] = style.style_id
                t1 = time.perf_counter()
                imgs = await model.synthesize(ws, style, ws_u, deadline, stats)
            else:
                ws = await self._to_ws(model, batch, psi, cutoff)
                if fine is not None:
                    ws_fine = await self._to_ws(model, fine, psi, cutoff)
                    if len(ws_fine) == 1 and n > 1:
                        ws_fine = np.repeat(ws_fine, n, axis=0)
                    ws = L.mix(ws, ws_fine, int(request.mixing.crossover))
                t1 = time.perf_counter()
                imgs = await model.synthesize(ws, deadline, stats)
            t2 = time.perf_counter()
            data = await self._encode(imgs, out)
            t3 = time.perf_counter()
            w, h = out.size
            images = [cpb.Image(data=d, format=FORMAT_ENUM[out.fmt], width=w, height=h, index=i,
                                **({"seed": batch.seeds[i]} if batch.seeds is not None else {}))
                      for i, d in enumerate(data)]
            timings = cpb.Timings(queue_ms=stats.get("queue_s", 0.0) * 1000, mapping_ms=(t1 - t0) * 1000,
                                  synthesis_ms=(t2 - t1) * 1000, encode_ms=(t3 - t2) * 1000,
                                  total_ms=(time.perf_counter() - t0) * 1000)
            return pb.GenerateResponse(images=images, model=model.name, model_version=model.version,
                                       request_id=rid, timings=timings)

    # -- GenerateStream -------------------------------------------------------------------------------------------

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context) -> None:
        await self._call("GenerateStream", request.model, context, self._stream, request)

    async def _stream(self, request: pb.GenerateStreamRequest, context, rid: str, extra: dict) -> None:
        with self.repo.acquire(request.model) as leased:
            model = self._model(leased)
            lim = self.limits
            psi = self._psi(request)
            cutoff = self._cutoff(request, model)
            out = self._output(request.output, model)
            source = request.WhichOneof("source")
            ts: list[float] | None = None
            if source == "seeds":
                batch = self._seeds(list(request.seeds.seeds), "seeds", lim.max_stream_frames)
            elif source == "interpolation":
                interp = request.interpolation
                if not interp.HasField("waypoints"):
                    raise InvalidArgument("interpolation.waypoints: give at least 2 seeds or latents")
                way = self._latents(interp.waypoints, model, "interpolation.waypoints", lim.max_waypoints)
                if len(way) < 2:
                    raise InvalidArgument("interpolation.waypoints: give at least 2 seeds or latents")
                if not 2 <= interp.steps <= lim.max_stream_frames:
                    raise InvalidArgument(f"interpolation.steps must be in 2..{lim.max_stream_frames}, "
                                          f"got {interp.steps}")
                if interp.mode == pb.INTERPOLATION_MODE_UNSPECIFIED:
                    mode = "slerp" if way.space == "z" else "linear"
                elif interp.mode == pb.INTERPOLATION_MODE_SLERP:
                    mode = "slerp"
                elif interp.mode == pb.INTERPOLATION_MODE_LINEAR:
                    mode = "linear"
                else:
                    raise InvalidArgument(f"unknown interpolation mode {interp.mode}")
                if way.values is None:  # seed waypoints: interpolate their z
                    way = Batch("z", await asyncio.to_thread(L.seeds_to_z, way.seeds, model.z_dim), None)
                points, ts = await asyncio.to_thread(L.path_points, way.values, int(interp.steps), mode)
                batch = Batch(way.space, points, None)
                extra["mode"] = mode
            else:
                raise InvalidArgument("give seeds or an interpolation")
            style_req = self._dualstyle(request, model)
            total = len(batch)
            extra.update(frames=total, version=model.version)
            await context.send_initial_metadata((("x-request-id", rid),))
            deadline = self._deadline(context)
            style = None
            if style_req is not None:
                style = await model.resolve_style(style_req, await self._exemplar(model, style_req, deadline))

            async def enqueue(rows: Batch) -> list:
                if style is None:
                    return model.enqueue(await self._to_ws(model, rows, psi, cutoff), deadline)
                ws_u = await self._to_ws(model, rows, 1.0, None)
                return model.enqueue_rows(model.style_rows(model.to_ws(ws_u, psi, cutoff), style, ws_u), deadline)

            window = self.repo.batch.stream_window or 2 * model.max_batch
            pending: collections.deque = collections.deque()  # (frame index, BatchItem) in frame order
            queued = sent = 0
            w, h = out.size
            loop = asyncio.get_running_loop()
            try:
                while sent < total:
                    # Keep up to `window` rows of this stream queued; the batcher mixes them with other requests.
                    while queued < total and len(pending) < window:
                        k = min(window - len(pending), total - queued)
                        try:
                            items = await enqueue(batch.rows(queued, queued + k))
                        except QueueFull:
                            if pending:
                                break  # the rows already queued will make room
                            raise
                        pending.extend((queued + i, it) for i, it in enumerate(items))
                        queued += k
                    index, item = pending.popleft()
                    img = await item.future
                    data = await loop.run_in_executor(self.encode_pool, codecs.encode, img, out.fmt, out.quality,
                                                      out.size)
                    image = cpb.Image(data=data, format=FORMAT_ENUM[out.fmt], width=w, height=h, index=index,
                                      **({"seed": batch.seeds[index]} if batch.seeds is not None else {}))
                    await context.write(pb.GenerateFrame(index=index, total=total, image=image,
                                                         t=ts[index] if ts is not None else 0.0,
                                                         model_version=model.version))
                    sent += 1
            finally:
                cancel_items([it for _, it in pending])
                extra["sent"] = sent

    # -- Stylize / StylizeStream (fast_style, stylegan2 and dualstylegan models) -----------------------------------

    def _stylizer(self, leased):
        """The leased model if it can stylize photos (a fast_style model, or a face model with an encoder for its
        latent space); else FAILED_PRECONDITION, which ends a StylizeStream before any frame."""
        if not isinstance(leased, (FastStyleModel, StyleGAN2Model, DualStyleGANModel)):
            raise ServingError(f"model {leased.name!r} is a {leased.kind!r} model, which cannot stylize photos",
                               code="FAILED_PRECONDITION")
        if isinstance(leased, LatentModel):
            self.repo.encoder_for(leased).release()
        return leased

    def _format(self, opts: cpb.OutputOptions) -> tuple[str, int]:
        fmt = FORMATS.get(opts.format)
        if fmt is None:
            raise InvalidArgument(f"unknown image format {opts.format}")
        quality = opts.quality or self.limits.default_quality
        if not 1 <= quality <= 100:
            raise InvalidArgument(f"quality must be in 1..100, got {quality}")
        mx = self.limits.max_output_size
        if opts.width > mx or opts.height > mx:
            raise InvalidArgument(f"output size {opts.width}x{opts.height} exceeds the limit of {mx}x{mx}")
        return fmt, quality

    def _size(self, opts: cpb.OutputOptions, hw: tuple[int, int], limit: int = 0) -> tuple[int, int]:
        """Output size for an input of (height, width): an explicit size obeys max_output_size; the input's own
        size may be up to `limit` (a pasted-back photo keeps its size)."""
        size = codecs.output_size(hw, opts.width, opts.height)
        mx = self.limits.max_output_size if (opts.width or opts.height) else max(limit, self.limits.max_output_size)
        if max(size) > mx:
            raise InvalidArgument(f"output size {size[0]}x{size[1]} exceeds the limit of {mx}x{mx}")
        return size

    async def _stylize_one(self, model, request: pb.StylizeRequest, deadline: float | None) -> pb.StylizeResponse:
        if isinstance(model, FastStyleModel):
            return await self._stylize_whole(model, request, deadline)
        return await self._stylize_faces(model, request, deadline)

    async def _stylize_whole(self, model: FastStyleModel, request: pb.StylizeRequest,
                           deadline: float | None) -> pb.StylizeResponse:
        """Decode (thread pool), stylize (batcher), encode (thread pool) one image."""
        t0 = time.perf_counter()
        fmt, quality = self._format(request.output)
        self._dualstyle(request, model)  # INVALID_ARGUMENT when dualstyle options are set
        loop = asyncio.get_running_loop()
        img = await loop.run_in_executor(self.encode_pool, model.decode, request.image)
        size = self._size(request.output, (img.shape[0], img.shape[1]))
        stats: dict[str, float] = {}
        out = await model.stylize(img, deadline, stats)
        t1 = time.perf_counter()
        data = await loop.run_in_executor(self.encode_pool, codecs.encode, out, fmt, quality, size)
        t2 = time.perf_counter()
        w, h = size
        timings = cpb.Timings(queue_ms=stats.get("queue_s", 0.0) * 1000, synthesis_ms=(t1 - t0) * 1000,
                              encode_ms=(t2 - t1) * 1000, total_ms=(t2 - t0) * 1000)
        return pb.StylizeResponse(image=cpb.Image(data=data, format=FORMAT_ENUM[fmt], width=w, height=h),
                                  model=model.name, model_version=model.version, timings=timings)

    async def _stylize_faces(self, model: LatentModel, request: pb.StylizeRequest,
                             deadline: float | None) -> pb.StylizeResponse:
        """A face photo through a stylegan2 or dualstylegan model (serving.photo.stylize_faces), then the image
        encoding."""
        t0 = time.perf_counter()
        fmt, quality = self._format(request.output)
        req = photo.parse_face_options(request.face, self.limits.psi_range)
        style = self._dualstyle(request, model)
        res = await photo.stylize_faces(self.repo, model, request.image, req, max_photo_size=self.limits.max_photo_size,
                                        max_faces=self.limits.max_faces, pool=self.encode_pool, deadline=deadline,
                                        style=style)
        t1 = time.perf_counter()
        limit = self.limits.max_photo_size if req.composite == "paste" else 0
        size = self._size(request.output, (res.image.shape[0], res.image.shape[1]), limit=limit)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.encode_pool, codecs.encode, res.image, fmt, quality, size)
        faces = [photo.detected(a) for a in res.faces]
        if req.composite == "crop" and len(res.crops) > 1:
            extra = await asyncio.gather(*[loop.run_in_executor(self.encode_pool, codecs.encode, c, fmt, quality,
                                                                size) for c in res.crops])
            for f, d in zip(faces, extra):
                f.crop.CopyFrom(cpb.Image(data=d, format=FORMAT_ENUM[fmt], width=size[0], height=size[1]))
        t2 = time.perf_counter()
        sec, ms = res.seconds, 1000.0
        timings = cpb.Timings(queue_ms=sec["queue"] * ms, decode_ms=sec["decode"] * ms, align_ms=sec["align"] * ms,
                              encoder_ms=sec["encoder"] * ms, synthesis_ms=sec["synthesis"] * ms,
                              composite_ms=sec["composite"] * ms, encode_ms=(t2 - t1) * ms,
                              total_ms=(t2 - t0) * ms)
        w, h = size
        resp = pb.StylizeResponse(image=cpb.Image(data=data, format=FORMAT_ENUM[fmt], width=w, height=h),
                                  model=model.name, model_version=model.version, timings=timings, faces=faces)
        if style is not None and style.image is None and style.exstyle_z is None and style.exstyle_w is None:
            resp.style_id = style.style_id or 0
        return resp

    async def Stylize(self, request: pb.StylizeRequest, context) -> pb.StylizeResponse:
        return await self._call("Stylize", request.model, context, self._stylize, request)

    async def _stylize(self, request: pb.StylizeRequest, context, rid: str, extra: dict) -> pb.StylizeResponse:
        with self.repo.acquire(request.model) as leased:
            model = self._stylizer(leased)
            extra.update(version=model.version, bytes=len(request.image))
            resp = await self._stylize_one(model, request, self._deadline(context))
            resp.request_id = rid
            return resp

    async def StylizeStream(self, request_iterator, context) -> None:
        await self._call("StylizeStream", "", context, self._stylize_stream, request_iterator)

    async def _stylize_stream(self, request_iterator, context, rid: str, extra: dict) -> None:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        with self.repo.acquire(first.model) as leased:
            model = self._stylizer(leased)
            extra.update(stream_model=model.name, version=model.version)
            await context.send_initial_metadata((("x-request-id", rid),))
            deadline = self._deadline(context)
            window = asyncio.Semaphore(self.repo.batch.stream_window or 4)  # frames in work at once
            frames: asyncio.Queue = asyncio.Queue()  # (index, task) in stream order; None = input ended

            async def one(index: int, req: pb.StylizeRequest) -> pb.StylizeResponse:
                try:
                    if req.model and req.model != model.name:
                        raise InvalidArgument(f"frame {index}: model {req.model!r}; this stream serves "
                                              f"{model.name!r}")
                    resp = await self._stylize_one(model, req, deadline)
                except ServingError as exc:  # answered in-stream; the stream goes on
                    resp = pb.StylizeResponse(model=model.name, model_version=model.version, error=exc.message,
                                              error_code=exc.code)
                resp.index, resp.request_id = index, rid
                return resp

            async def reader() -> None:
                try:
                    index, req = 0, first
                    while True:
                        await window.acquire()
                        frames.put_nowait((index, asyncio.ensure_future(one(index, req))))
                        index += 1
                        try:
                            req = await requests.__anext__()
                        except StopAsyncIteration:
                            return
                finally:
                    frames.put_nowait(None)

            read_task = asyncio.ensure_future(reader())
            sent = errors = 0
            current: asyncio.Future | None = None
            try:
                while (entry := await frames.get()) is not None:
                    current = entry[1]
                    resp = await current
                    await context.write(resp)
                    window.release()
                    sent += 1
                    errors += bool(resp.error)
                await read_task  # re-raise a failure of the reader
            finally:
                read_task.cancel()
                if current is not None:
                    current.cancel()
                while not frames.empty():
                    entry = frames.get_nowait()
                    if entry is not None:
                        entry[1].cancel()
                extra.update(sent=sent, frame_errors=errors)
