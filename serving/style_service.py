"""stylecast.v1.StyleService: ListModels, GetModel, ListStyles, Generate (unary), GenerateStream (server streaming),
Stylize and StylizeStream, over every kind of model the repository serves.

Requests are validated completely before any work starts; every RPC is counted, timed and logged with its
request id (the client's `x-request-id` metadata, or a fresh one, returned in the trailing metadata) by the shared
request plumbing (serving.plumbing). Nothing here tests a model's kind: a model says what it can do (`generates`,
`stylizes_photos`, `style_library`) and parses its own style options.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

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
from .metrics import Metrics
from .latent_model import LatentModel
from .models import LoadedModel, RequestContext, StyleOptions
from .plumbing import Call, Plumbing
from .repository import ModelRepository, ModelStatus, State

logger = logging.getLogger("serving.access")

FORMATS = {cpb.IMAGE_FORMAT_UNSPECIFIED: "png", cpb.IMAGE_FORMAT_PNG: "png", cpb.IMAGE_FORMAT_JPEG: "jpeg",
           cpb.IMAGE_FORMAT_WEBP: "webp", cpb.IMAGE_FORMAT_RAW_RGB8: "raw"}
FORMAT_ENUM = {"png": cpb.IMAGE_FORMAT_PNG, "jpeg": cpb.IMAGE_FORMAT_JPEG, "webp": cpb.IMAGE_FORMAT_WEBP,
               "raw": cpb.IMAGE_FORMAT_RAW_RGB8}
STATE_ENUM = {State.LOADING: pb.MODEL_STATE_LOADING, State.READY: pb.MODEL_STATE_READY,
              State.FAILED: pb.MODEL_STATE_FAILED}
SELECT = {pb.FACE_SELECTION_UNSPECIFIED: "largest", pb.FACE_SELECTION_LARGEST: "largest",
          pb.FACE_SELECTION_ALL: "all"}
COMPOSITE = {pb.FACE_COMPOSITE_UNSPECIFIED: "paste", pb.FACE_COMPOSITE_PASTE_BACK: "paste",
             pb.FACE_COMPOSITE_CROP: "crop"}


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


def face_request(msg: pb.FaceOptions, psi_range: tuple[float, float]) -> photo.FaceRequest:
    """FaceOptions -> FaceRequest. Raises InvalidArgument on out-of-range values."""
    if msg.select == pb.FACE_SELECTION_INDEX:
        select: str | int = int(msg.index)
    elif msg.select in SELECT:
        select = SELECT[msg.select]
    else:
        raise InvalidArgument(f"unknown face selection {msg.select}")
    if msg.composite not in COMPOSITE:
        raise InvalidArgument(f"unknown face composite mode {msg.composite}")
    return photo.FaceRequest.checked(select, COMPOSITE[msg.composite], float(msg.feather),
                                     float(msg.psi) if msg.HasField("psi") else None, psi_range)


def style_options(request) -> StyleOptions | None:
    """request.dualstyle (DualStyleOptions) -> StyleOptions; None when unset."""
    if not request.HasField("dualstyle"):
        return None
    msg = request.dualstyle
    which = msg.WhichOneof("style")
    kw: dict[str, Any] = {}
    if which == "style_id":
        kw["style_id"] = int(msg.style_id)
    elif which == "style_name":
        kw["style_name"] = msg.style_name
    elif which == "style_image":
        kw["image"] = bytes(msg.style_image)
    elif which in ("exstyle_z", "exstyle_w"):
        t = getattr(msg, which)
        kw[which] = (tuple(t.shape), list(t.values))
    return StyleOptions(weights=list(msg.weights), preserve_color=bool(msg.preserve_color), **kw)


def detected(face) -> pb.DetectedFace:
    box = face.face.box if face.face is not None else (0.0, 0.0, 0.0, 0.0)
    score = face.face.score if face.face is not None else 0.0
    return pb.DetectedFace(left=box[0], top=box[1], right=box[2], bottom=box[3], score=score)


class StyleServicer(pb_grpc.StyleServiceServicer):
    def __init__(self, repository: ModelRepository, limits: Limits, metrics: Metrics, encode_pool: Executor):
        self.repo = repository
        self.limits = limits
        self.metrics = metrics
        self.encode_pool = encode_pool
        self.plumbing = Plumbing(metrics, logger, self._model_label)

    def _model_label(self, name: str) -> str:
        # Only known names become label values: a client must not be able to grow the metric set.
        return name if name in self.repo.models or self.repo.status(name) is not None else "_unknown"

    def _ctx(self, call: Call) -> RequestContext:
        return RequestContext(self.repo, self.limits, self.encode_pool, call.deadline)

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
        """The model whose encoder Stylize would use for this model ("" = none, or no face encoder needed)."""
        model = self.repo.models.get(s.name) if s.ready else None
        if model is None or not model.uses_face_encoder:
            return ""
        try:
            with self.repo.encoder_for(model) as enc:
                return enc.name
        except ServingError:
            return ""

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async def run(call: Call):
            return pb.ListModelsResponse(models=[self._model_info(s) for s in self.repo.statuses()])
        return await self.plumbing.unary("ListModels", "", context, run)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        async def run(call: Call):
            s = self.repo.status(request.name)
            if s is None:
                raise ModelNotFound(f"unknown model {request.name!r}")
            return self._model_info(s)
        return await self.plumbing.unary("GetModel", request.name, context, run)

    async def ListStyles(self, request: pb.ListStylesRequest, context) -> pb.ListStylesResponse:
        async def run(call: Call):
            with self.repo.acquire(request.model) as model:
                lib = model.style_library()
                if lib is None:
                    raise InvalidArgument(f"model {model.name!r} is a {model.kind!r} model, which has no style "
                                          "library")
                return pb.ListStylesResponse(
                    model=model.name, model_version=model.version, num_ws=lib.num_ws, res_index=lib.res_index,
                    styles=[pb.StyleInfo(id=i, name=n) for i, n in enumerate(lib.names)],
                    default_weights=lib.default_weights)
        return await self.plumbing.unary("ListStyles", request.model, context, run)

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

    def _output(self, opts: cpb.OutputOptions, model: LatentModel) -> Output:
        fmt, quality = self._format(opts)
        return Output(fmt, quality, self._size(opts, (model.resolution, model.resolution)))

    def _render_options(self, request, model: LatentModel) -> tuple[float | None, int | None, Output]:
        """psi, truncation_cutoff and output of a Generate / GenerateStream request, checked."""
        return self._psi(request), self._cutoff(request, model), self._output(request.output, model)

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
        """Checked seeds; their z is made later, in the thread pool (`_untruncated`)."""
        if not seeds:
            raise InvalidArgument(f"{what}: no seeds")
        if len(seeds) > max_rows:
            raise InvalidArgument(f"{what}: too many seeds ({len(seeds)}, the limit is {max_rows})")
        for s in seeds:
            if not 0 <= s <= L.MAX_SEED:
                raise InvalidArgument(f"{what}: seed {s} out of range 0..{L.MAX_SEED}")
        return Batch("z", None, seeds)

    @staticmethod
    def _generator(model: LoadedModel) -> LatentModel:
        if not model.generates:
            raise InvalidArgument(f"model {model.name!r} is a {model.kind!r} model, which does not generate from "
                                  "latents; this RPC needs a generator model (stylegan2, dualstylegan)")
        return model  # type: ignore[return-value]

    async def _untruncated(self, model: LatentModel, batch: Batch) -> np.ndarray:
        """The batch's untruncated ws [N, num_ws, w_dim] (seeds and z through the mapping)."""
        if batch.values is None:
            w = await model.seeds_to_w(batch.seeds)
        elif batch.space == "z":
            w = await model.map_w(batch.values)
        else:
            w = batch.values
        return model.to_ws(w, 1.0, None)

    async def _encode(self, imgs: np.ndarray, out: Output) -> list[bytes]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*[
            loop.run_in_executor(self.encode_pool, codecs.encode, img, out.fmt, out.quality, out.size)
            for img in imgs]))

    # -- Generate -------------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return await self.plumbing.unary("Generate", request.model, context,
                                         lambda call: self._generate(request, call))

    async def _generate(self, request: pb.GenerateRequest, call: Call) -> pb.GenerateResponse:
        t0 = time.perf_counter()
        with self.repo.acquire(request.model) as leased:
            model = self._generator(leased)
            ctx = self._ctx(call)
            lim = self.limits
            psi, cutoff, out = self._render_options(request, model)
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
            style_req = model.parse_style(style_options(request), ctx)
            call.extra.update(rows=n, version=model.version)
            # Work starts here: mapping, then the batched synthesis, then encoding in the thread pool. The codes
            # are mixed untruncated (truncation works layer by layer, so mixing first changes nothing) and kept:
            # dualstylegan's preserve_color reads them.
            stats: dict[str, float] = {}
            ws_u = await self._untruncated(model, batch)
            if fine is not None:
                ws_fine = await self._untruncated(model, fine)
                if len(ws_fine) == 1 and n > 1:
                    ws_fine = np.repeat(ws_fine, n, axis=0)
                ws_u = L.mix(ws_u, ws_fine, int(request.mixing.crossover))
            ws = model.to_ws(ws_u, psi, cutoff)
            style = await model.resolve_style(style_req, ctx)
            if style is not None:
                call.extra["style_id"] = style.style_id
            t1 = time.perf_counter()
            imgs = await model.synthesize(ws, call.deadline, stats, style=style, content_ws=ws_u)
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
                                       request_id=call.request_id, timings=timings)

    # -- GenerateStream -------------------------------------------------------------------------------------------

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context) -> None:
        await self.plumbing.unary("GenerateStream", request.model, context,
                                  lambda call: self._stream(request, context, call))

    async def _stream(self, request: pb.GenerateStreamRequest, context, call: Call) -> None:
        with self.repo.acquire(request.model) as leased:
            model = self._generator(leased)
            ctx = self._ctx(call)
            lim = self.limits
            psi, cutoff, out = self._render_options(request, model)
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
                call.extra["mode"] = mode
            else:
                raise InvalidArgument("give seeds or an interpolation")
            style_req = model.parse_style(style_options(request), ctx)
            total = len(batch)
            call.extra.update(frames=total, version=model.version)
            await context.send_initial_metadata((("x-request-id", call.request_id),))
            style = await model.resolve_style(style_req, ctx)

            async def enqueue(rows: Batch) -> list:
                ws_u = await self._untruncated(model, rows)
                return model.enqueue(model.to_ws(ws_u, psi, cutoff), call.deadline, style=style, content_ws=ws_u)

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
                call.extra["sent"] = sent

    # -- Stylize / StylizeStream ----------------------------------------------------------------------------------

    def _stylizer(self, model: LoadedModel, call: Call) -> LoadedModel:
        """The leased model if it can stylize photos now (FAILED_PRECONDITION otherwise, which ends a StylizeStream
        before any frame)."""
        model.check_stylize(self._ctx(call))
        return model

    async def _stylize_one(self, model: LoadedModel, request: pb.StylizeRequest, call: Call) -> pb.StylizeResponse:
        """Decode, stylize (the model's photo path) and encode one photo."""
        t0 = time.perf_counter()
        fmt, quality = self._format(request.output)
        face = face_request(request.face, self.limits.psi_range)
        res = await model.stylize_photo(request.image, face, style_options(request), self._ctx(call))
        t1 = time.perf_counter()
        size = self._size(request.output, (res.image.shape[0], res.image.shape[1]), limit=res.own_size_limit)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.encode_pool, codecs.encode, res.image, fmt, quality, size)
        faces = [detected(a) for a in res.faces]
        if face.composite == "crop" and res.crops is not None and len(res.crops) > 1:
            extra = await asyncio.gather(*[loop.run_in_executor(self.encode_pool, codecs.encode, c, fmt, quality,
                                                                size) for c in res.crops])
            for f, d in zip(faces, extra):
                f.crop.CopyFrom(cpb.Image(data=d, format=FORMAT_ENUM[fmt], width=size[0], height=size[1]))
        t2 = time.perf_counter()
        sec, ms = res.seconds, 1000.0
        timings = cpb.Timings(queue_ms=sec.get("queue", 0.0) * ms, decode_ms=sec.get("decode", 0.0) * ms,
                              align_ms=sec.get("align", 0.0) * ms, encoder_ms=sec.get("encoder", 0.0) * ms,
                              synthesis_ms=sec.get("synthesis", 0.0) * ms, composite_ms=sec.get("composite", 0.0) * ms,
                              encode_ms=(t2 - t1) * ms, total_ms=(t2 - t0) * ms)
        w, h = size
        resp = pb.StylizeResponse(image=cpb.Image(data=data, format=FORMAT_ENUM[fmt], width=w, height=h),
                                  model=model.name, model_version=model.version, timings=timings, faces=faces)
        if res.style_id is not None:
            resp.style_id = res.style_id
        return resp

    async def Stylize(self, request: pb.StylizeRequest, context) -> pb.StylizeResponse:
        return await self.plumbing.unary("Stylize", request.model, context,
                                         lambda call: self._stylize(request, call))

    async def _stylize(self, request: pb.StylizeRequest, call: Call) -> pb.StylizeResponse:
        with self.repo.acquire(request.model) as leased:
            model = self._stylizer(leased, call)
            call.extra.update(version=model.version, bytes=len(request.image))
            resp = await self._stylize_one(model, request, call)
            resp.request_id = call.request_id
            return resp

    async def StylizeStream(self, request_iterator, context) -> None:
        await self.plumbing.unary("StylizeStream", "", context,
                                  lambda call: self._stylize_stream(request_iterator, context, call))

    async def _stylize_stream(self, request_iterator, context, call: Call) -> None:
        rid = call.request_id
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        with self.repo.acquire(first.model) as leased:
            model = self._stylizer(leased, call)
            call.extra.update(stream_model=model.name, version=model.version)
            await context.send_initial_metadata((("x-request-id", rid),))
            window = asyncio.Semaphore(self.repo.batch.stream_window or 4)  # frames in work at once
            frames: asyncio.Queue = asyncio.Queue()  # (index, task) in stream order; None = input ended

            async def one(index: int, req: pb.StylizeRequest) -> pb.StylizeResponse:
                try:
                    if req.model and req.model != model.name:
                        raise InvalidArgument(f"frame {index}: model {req.model!r}; this stream serves "
                                              f"{model.name!r}")
                    resp = await self._stylize_one(model, req, call)
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
                call.extra.update(sent=sent, frame_errors=errors)
