"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) gRPC API with Triton's ModelStreamInfer
and ModelConfig, on the same port as StyleService, so stock `tritonclient[grpc]` and perf_analyzer work unchanged.

Models (per StyleGAN2 bundle `<name>`, through the same per-model dynamic batcher as StyleService):

    <name>            SEED INT64 [-1, 1]  (or Z FP32 [-1, z_dim])  + optional PSI FP32 [-1, 1]  -> IMAGE UINT8 [-1, R, R, 3]
    <name>.synthesis  WS FP32 [-1, num_ws, w_dim]                                                -> IMAGE UINT8 [-1, R, R, 3]
    <name>.stylize    IMAGE BYTES [-1] (encoded face photos)                       -> STYLIZED BYTES [-1] (PNG)

(`.stylize`: bundles with an encoder or a latent_space served by one; the photo path of StyleService.Stylize with
request parameters `faces` "largest"|"all"|index, `composite` "paste"|"crop", `psi` (double); BYTES elements are
4-byte little-endian length-prefixed in raw contents, as tritonclient serialises them)

and per fast_style bundle `<name>`: IMAGE UINT8 [-1, -1, -1, 3] (RGB pixels, any size up to the bundle's
max_size) -> STYLIZED UINT8 [-1, -1, -1, 3] of the same size.

Per dualstylegan bundle `<name>` (DualStyleGAN; psi truncates towards 0, ws = psi * w):

    <name>            SEED INT64 [-1, 1] (or Z FP32 [-1, z_dim]) + optional PSI FP32 [-1, 1]
                      + optional STYLE_ID INT64 [-1, 1] (1 or N rows; default 0)
                      + optional WEIGHTS FP32 [-1, num_ws] (1 or N rows; default the bundle's)    -> IMAGE UINT8
    <name>.synthesis  WS FP32 [-1, num_ws, w_dim] + EXSTYLE_W FP32 [-1, num_ws, w_dim] + WEIGHTS FP32 [-1, num_ws]
                      (the synthesis graph's own inputs, N rows each)                             -> IMAGE UINT8
    <name>.stylize    as for stylegan2, with the extra parameters `style_id` (int64 or a style name as string),
                      `weights` (string "w0,w1,..."), `preserve_color` (bool); `psi` defaults to the bundle's

Not exposed over KServe (use StyleService): exemplar style images, extrinsic codes (exstyle_z / exstyle_w) outside
`.synthesis`, ListStyles (the style table is in GetModel / ListStyles of StyleService), preserve_color for seeds.

Inputs come in `raw_input_contents` (or typed `contents`), outputs go out in `raw_output_contents`. PSI absent =
the bundle's default_psi (as StyleService). Errors: unknown model / version NOT_FOUND, a model still loading
FAILED_PRECONDITION, bad tensors INVALID_ARGUMENT naming the tensor. ModelStreamInfer reports per-request errors
in-stream (`error_message` + `infer_response.id`) and keeps the stream open; every stream response carries the
bool parameter `triton_final_response = true`. Triton's other RPCs (statistics, repository, shared memory, trace,
logging) are not registered and answer UNIMPLEMENTED.

Note: the generated messages live in proto package `inference`, like tritonclient's own; one process cannot
import both (duplicate symbols in protobuf's default pool). Run clients and this server in separate processes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Callable

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc

from . import latents as L
from .config import Limits
from .errors import InvalidArgument, ModelNotFound, ServingError
from .logs import log
from .metrics import Metrics
from .dualstyle_model import DualStyleGANModel, StyleRequest, parse_weights
from .fast_style_model import FastStyleModel
from .models import LatentModel, StyleGAN2Model
from .repository import ModelRepository

logger = logging.getLogger("serving.kserve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
SYNTHESIS_SUFFIX = ".synthesis"
STYLIZE_SUFFIX = ".stylize"
MODES = {SYNTHESIS_SUFFIX: "synthesis", STYLIZE_SUFFIX: "stylize"}
EXTENSIONS = ["model_configuration"]
DTYPES = {"INT64": (np.int64, mc.TYPE_INT64, "int64_contents"), "FP32": (np.float32, mc.TYPE_FP32, "fp32_contents"),
          "UINT8": (np.uint8, mc.TYPE_UINT8, "uint_contents"), "BYTES": (np.object_, mc.TYPE_STRING, "bytes_contents")}
STREAM_WINDOW = 64  # requests of one stream in flight at once
DEADLINE_SLACK_S = 0.05


def _platform(backend_name: str) -> tuple[str, str]:
    if backend_name.startswith("tensorrt"):
        return "tensorrt_plan", "tensorrt"
    return "onnxruntime_onnx", "onnxruntime"


class TensorSpec:
    def __init__(self, name: str, datatype: str, dims: tuple[int, ...], optional: bool = False):
        self.name, self.datatype, self.dims, self.optional = name, datatype, dims, optional  # dims without batch


def _specs(model: LatentModel | FastStyleModel, mode: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    if isinstance(model, FastStyleModel):
        # -1: any height/width (checked against the bundle's max_size per image)
        return [TensorSpec("IMAGE", "UINT8", (-1, -1, 3))], [TensorSpec("STYLIZED", "UINT8", (-1, -1, 3))]
    if mode == "stylize":
        return [TensorSpec("IMAGE", "BYTES", (1,))], [TensorSpec("STYLIZED", "BYTES", (1,))]
    r = model.resolution
    out = [TensorSpec("IMAGE", "UINT8", (r, r, 3))]
    dual = isinstance(model, DualStyleGANModel)
    if mode == "synthesis":
        ins = [TensorSpec("WS", "FP32", (model.num_ws, model.w_dim))]
        if dual:
            ins += [TensorSpec("EXSTYLE_W", "FP32", (model.num_ws, model.w_dim)),
                    TensorSpec("WEIGHTS", "FP32", (model.num_ws,))]
        return ins, out
    ins = [TensorSpec("SEED", "INT64", (1,)), TensorSpec("Z", "FP32", (model.z_dim,), optional=True),
           TensorSpec("PSI", "FP32", (1,), optional=True)]
    if dual:
        ins += [TensorSpec("STYLE_ID", "INT64", (1,), optional=True),
                TensorSpec("WEIGHTS", "FP32", (model.num_ws,), optional=True)]
    return ins, out


def _param(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def _unpack_bytes(data: bytes, count: int, name: str) -> list[bytes]:
    """Triton's BYTES raw layout: each element as a 4-byte little-endian length, then its bytes."""
    items, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise InvalidArgument(f"input {name!r}: truncated BYTES element length")
        n = int.from_bytes(data[pos: pos + 4], "little")
        if pos + 4 + n > len(data):
            raise InvalidArgument(f"input {name!r}: BYTES element {len(items)} claims {n} bytes, "
                                  f"{len(data) - pos - 4} left")
        items.append(data[pos + 4: pos + 4 + n])
        pos += 4 + n
        if len(items) > count:
            break
    return items


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, limits: Limits, metrics: Metrics,
                 server_ready: Callable[[], bool] = lambda: True, version: str = "",
                 encode_pool: Executor | None = None):
        self.encode_pool = encode_pool
        self.repo = repository
        self.limits = limits
        self.metrics = metrics
        self.server_ready = server_ready
        self.version = version

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _split(self, name: str) -> tuple[str, str]:
        """KServe model name -> (bundle name, mode "" | "synthesis" | "stylize")."""
        for suffix, mode in MODES.items():
            if name.endswith(suffix) and name not in self.repo.models:
                return name[: -len(suffix)], mode
        return name, ""

    def _model_label(self, name: str) -> str:
        base, _ = self._split(name)
        return name if base in self.repo.models or self.repo.status(base) is not None else "_unknown"

    def _lease(self, name: str, version: str):
        """(lease, mode); checks kind and version."""
        base, mode = self._split(name)
        if not name:
            raise InvalidArgument("model name is empty")
        lease = self.repo.acquire(base)
        model = lease.model
        faceless = mode == "stylize" and not (getattr(model, "encoder", None) is not None
                                               or getattr(model, "latent_space", ""))
        if (not isinstance(model, (StyleGAN2Model, DualStyleGANModel, FastStyleModel))
                or (mode and isinstance(model, FastStyleModel))
                or faceless):
            lease.release()
            raise ModelNotFound(f"model {name!r} is a {model.kind!r} model, not served over the inference protocol")
        if version and version != model.version:
            lease.release()
            raise ModelNotFound(f"model {name!r} version {version!r} is not available (serving {model.version!r})")
        return lease, mode

    def _observe(self, method: str, label: str, code: str, elapsed: float, rid: str, peer: str, detail: str = "",
                 model: str = "") -> None:
        m = self.metrics
        m.latency.labels(method, label).observe(elapsed)
        if code != "OK":
            m.errors.labels(method, label, code).inc()
        log(logger, logging.INFO if code in ("OK", "CANCELLED") else logging.WARNING, "rpc", method=method,
            model=model, request_id=rid, code=code, latency_ms=round(elapsed * 1000, 3), peer=peer,
            **({"detail": detail} if detail else {}))

    async def _call(self, method: str, model: str, context: grpc.aio.ServicerContext, fn, *args) -> Any:
        rid = uuid.uuid4().hex[:16]
        label = self._model_label(model) if model else ""
        m = self.metrics
        m.requests.labels(method, label).inc()
        m.in_flight.labels(method).inc()
        t0 = time.perf_counter()
        code, detail = "OK", ""
        try:
            return await fn(*args)
        except ServingError as exc:
            code, detail = exc.code, exc.message
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"
            raise
        except Exception:
            code, detail = "INTERNAL", f"internal error (request id {rid})"
            logger.exception("unhandled error", extra={"request_id": rid, "method": method})
        finally:
            m.in_flight.labels(method).dec()
            self._observe(method, label, code, time.perf_counter() - t0, rid, context.peer(), detail, model)
        await context.abort(grpc.StatusCode[code], detail)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + max(0.0, remaining)

    # -- health and metadata --------------------------------------------------------------------------------------

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        async def run():
            return pb.ServerLiveResponse(live=True)
        return await self._call("ServerLive", "", context, run)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        async def run():
            return pb.ServerReadyResponse(ready=bool(self.server_ready()))
        return await self._call("ServerReady", "", context, run)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        async def run():
            try:
                lease, _ = self._lease(request.name, request.version)
            except ServingError:
                return pb.ModelReadyResponse(ready=False)
            lease.release()
            return pb.ModelReadyResponse(ready=True)
        return await self._call("ModelReady", request.name, context, run)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        async def run():
            return pb.ServerMetadataResponse(name="stylecast", version=self.version, extensions=EXTENSIONS)
        return await self._call("ServerMetadata", "", context, run)

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        async def run():
            lease, mode = self._lease(request.name, request.version)
            with lease as model:
                ins, outs = _specs(model, mode)
                meta = pb.ModelMetadataResponse.TensorMetadata
                return pb.ModelMetadataResponse(
                    name=request.name, versions=[model.version], platform=_platform(model.backend_name)[0],
                    inputs=[meta(name=t.name, datatype=t.datatype, shape=[-1, *t.dims]) for t in ins],
                    outputs=[meta(name=t.name, datatype=t.datatype, shape=[-1, *t.dims]) for t in outs])
        return await self._call("ModelMetadata", request.name, context, run)

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        async def run():
            lease, mode = self._lease(request.name, request.version)
            with lease as model:
                ins, outs = _specs(model, mode)
                platform, backend = _platform(model.backend_name)
                b = model.batch_cfg
                cfg = mc.ModelConfig(
                    name=request.name, platform=platform, backend=backend, max_batch_size=self.limits.max_seeds,
                    input=[mc.ModelInput(name=t.name, data_type=DTYPES[t.datatype][1], dims=t.dims,
                                         optional=t.optional) for t in ins],
                    output=[mc.ModelOutput(name=t.name, data_type=DTYPES[t.datatype][1], dims=t.dims) for t in outs],
                    dynamic_batching=mc.ModelDynamicBatching(
                        preferred_batch_size=[model.max_batch],
                        max_queue_delay_microseconds=int(round(b.max_queue_delay_ms * 1000))),
                    instance_group=[mc.ModelInstanceGroup(
                        count=1, kind=mc.ModelInstanceGroup.KIND_CPU if "CPU" in model.backend_name
                        else mc.ModelInstanceGroup.KIND_GPU)],
                    model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False))
                cfg.parameters["stylecast_version"].string_value = model.version
                return pb.ModelConfigResponse(config=cfg)
        return await self._call("ModelConfig", request.name, context, run)

    # -- inference ------------------------------------------------------------------------------------------------

    def _inputs(self, request: pb.ModelInferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
        by_name = {t.name: t for t in specs}
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        arrays: dict[str, np.ndarray] = {}
        for i, t in enumerate(request.inputs):
            spec = by_name.get(t.name)
            if spec is None:
                raise InvalidArgument(f"unexpected input {t.name!r} (inputs: {', '.join(by_name)})")
            if t.name in arrays:
                raise InvalidArgument(f"input {t.name!r} given twice")
            if t.datatype != spec.datatype:
                raise InvalidArgument(f"input {t.name!r}: datatype {t.datatype or '(none)'}, expected {spec.datatype}")
            shape = tuple(int(d) for d in t.shape)
            want = "[" + ", ".join(["N", *map(str, spec.dims)]) + "]"
            ok_rank = len(shape) == 1 + len(spec.dims) or (spec.dims == (1,) and len(shape) == 1)
            dims_ok = all(want_d in (-1, got) for got, want_d in zip(shape[1:], spec.dims))
            if not ok_rank or any(d < 0 for d in shape) or not dims_ok:
                raise InvalidArgument(f"input {t.name!r}: shape {list(shape)} does not match {want}")
            n = shape[0] if shape else 0
            if n < 1:
                raise InvalidArgument(f"input {t.name!r}: shape {list(shape)} has no rows")
            if n > self.limits.max_seeds:
                raise InvalidArgument(f"input {t.name!r}: {n} rows, more than the limit of {self.limits.max_seeds}")
            dtype, _, field = DTYPES[spec.datatype]
            count = math.prod(shape)
            if spec.datatype == "BYTES":
                arr = np.empty(count, dtype=object)
                items = _unpack_bytes(raw[i], count, t.name) if raw else list(t.contents.bytes_contents)
                if len(items) != count:
                    raise InvalidArgument(f"input {t.name!r}: {len(items)} elements do not fill shape {list(shape)}")
                arr[:] = items
                arr = arr.reshape(shape)
            elif raw:
                data = raw[i]
                if len(data) != count * np.dtype(dtype).itemsize:
                    raise InvalidArgument(f"input {t.name!r}: {len(data)} bytes of raw contents, shape {list(shape)} "
                                          f"{spec.datatype} needs {count * np.dtype(dtype).itemsize}")
                arr = np.frombuffer(data, dtype=dtype).reshape(shape)
            else:
                values = getattr(t.contents, field)
                if len(values) != count:
                    raise InvalidArgument(f"input {t.name!r}: {len(values)} values in contents.{field} do not fill "
                                          f"shape {list(shape)}")
                arr = np.asarray(values, dtype=dtype).reshape(shape)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InvalidArgument(f"input {t.name!r}: NaN or Inf values")
            dims = tuple(shape[1:]) if len(shape) == 1 + len(spec.dims) else spec.dims  # [N] -> [N, 1]
            arrays[t.name] = arr.reshape(n, *dims)
        return arrays

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        lease, mode = self._lease(request.model_name, request.model_version)
        with lease as model:
            ins, outs = _specs(model, mode)
            for o in request.outputs:
                if o.name not in {t.name for t in outs}:
                    raise InvalidArgument(f"unknown requested output {o.name!r} "
                                          f"(outputs: {', '.join(t.name for t in outs)})")
            x = self._inputs(request, ins)
            deadline = self._deadline(context)
            if isinstance(model, FastStyleModel):
                if "IMAGE" not in x:
                    raise InvalidArgument("input 'IMAGE' is required")
                # One image per batcher row (sizes differ between requests); rows of one request run concurrently.
                rows = [np.ascontiguousarray(im) for im in x["IMAGE"]]
                out = await asyncio.gather(*(model.stylize(im, deadline) for im in rows))
                resp = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version,
                                             id=request.id)
                img = np.stack(out)
                resp.outputs.add(name="STYLIZED", datatype="UINT8", shape=list(img.shape))
                resp.raw_output_contents.append(np.ascontiguousarray(img).tobytes())
                return resp
            if mode == "stylize":
                return await self._stylize(model, request, x["IMAGE"][:, 0], deadline)
            if isinstance(model, DualStyleGANModel):
                img = await model.synthesize_rows(await self._dualstyle_rows(model, mode, x), deadline)
                resp = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version,
                                             id=request.id)
                resp.outputs.add(name="IMAGE", datatype="UINT8", shape=list(img.shape))
                resp.raw_output_contents.append(np.ascontiguousarray(img).tobytes())
                return resp
            if mode == "synthesis":
                if "WS" not in x:
                    raise InvalidArgument("input 'WS' is required")
                ws = x["WS"]
            else:
                ws = await self._mapped(model, x)
            img = await model.synthesize(np.ascontiguousarray(ws, np.float32), deadline)
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version, id=request.id)
        resp.outputs.add(name="IMAGE", datatype="UINT8", shape=list(img.shape))
        resp.raw_output_contents.append(np.ascontiguousarray(img).tobytes())
        return resp

    async def _dualstyle_rows(self, model: DualStyleGANModel, mode: str, x: dict[str, np.ndarray]) -> np.ndarray:
        """Packed synthesis rows of a dualstylegan request: `.synthesis` takes WS, EXSTYLE_W, WEIGHTS as they are;
        `<name>` maps SEED / Z (psi towards 0) and looks STYLE_ID up in the library, WEIGHTS defaulting to the
        bundle's (1 or N rows each)."""
        if mode == "synthesis":
            missing = [k for k in ("WS", "EXSTYLE_W", "WEIGHTS") if k not in x]
            if missing:
                raise InvalidArgument(f"inputs {missing} are required")
            n = len(x["WS"])
            if len(x["EXSTYLE_W"]) != n or len(x["WEIGHTS"]) != n:
                raise InvalidArgument(f"inputs 'WS', 'EXSTYLE_W' and 'WEIGHTS' need the same number of rows "
                                      f"({n}, {len(x['EXSTYLE_W'])}, {len(x['WEIGHTS'])})")
            return model.pack(x["WS"], x["EXSTYLE_W"], x["WEIGHTS"])
        ws = await self._mapped(model, x)
        n = len(ws)
        ids = x["STYLE_ID"][:, 0] if "STYLE_ID" in x else np.zeros(1, np.int64)
        weights = x["WEIGHTS"] if "WEIGHTS" in x else model.default_weights[None]
        for name, rows in (("STYLE_ID", ids), ("WEIGHTS", weights)):
            if len(rows) not in (1, n):
                raise InvalidArgument(f"input {name!r}: {len(rows)} rows for {n} latents (give 1 or {n})")
        ex = model.exstyle_w[[model.style_id(int(i)) for i in ids]]
        for row in weights:
            model.check_weights(row, "input 'WEIGHTS'")
        return model.pack(ws, ex, weights)

    async def _stylize(self, model: LatentModel, request: pb.ModelInferRequest, images: np.ndarray,
                       deadline: float | None) -> pb.ModelInferResponse:
        """`<name>.stylize`: each encoded photo through the StyleService photo path, answered as PNG bytes."""
        from . import codecs, photo

        req = self._face_request(request)
        style = self._style_request(request, model)
        outs = await asyncio.gather(*(photo.stylize_faces(
            self.repo, model, bytes(im), req, max_photo_size=self.limits.max_photo_size,
            max_faces=self.limits.max_faces, pool=self.encode_pool, deadline=deadline, style=style)
            for im in images))
        loop = asyncio.get_running_loop()
        pngs = await asyncio.gather(*(loop.run_in_executor(self.encode_pool, codecs.encode, r.image, "png")
                                      for r in outs))
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version, id=request.id)
        resp.outputs.add(name="STYLIZED", datatype="BYTES", shape=[len(pngs), 1])
        resp.raw_output_contents.append(b"".join(len(p).to_bytes(4, "little") + p for p in pngs))
        return resp

    def _face_request(self, request: pb.ModelInferRequest):
        from . import photo

        params = request.parameters
        select: str | int = "largest"
        composite = "paste"
        if "faces" in params:
            v = params["faces"].string_param or str(params["faces"].int64_param)
            if v not in ("largest", "all") and not v.isdigit():
                raise InvalidArgument(f"parameter 'faces': 'largest', 'all' or an index, got {v!r}")
            select = int(v) if v.isdigit() else v
        if "composite" in params:
            composite = params["composite"].string_param
            if composite not in ("paste", "crop"):
                raise InvalidArgument(f"parameter 'composite': 'paste' or 'crop', got {composite!r}")
        psi = None
        if "psi" in params:
            psi = float(params["psi"].double_param)
            lo, hi = self.limits.psi_range
            if not (math.isfinite(psi) and lo <= psi <= hi):
                raise InvalidArgument(f"parameter 'psi' must be in [{lo}, {hi}], got {psi}")
        return photo.FaceRequest(select=select, composite=composite, psi=psi)

    def _style_request(self, request: pb.ModelInferRequest, model: LatentModel) -> StyleRequest | None:
        """dualstylegan `.stylize` parameters style_id (int64, or a name as string), weights ("w0,w1,..."),
        preserve_color (bool) -> StyleRequest; None for other kinds (which reject these parameters)."""
        params = request.parameters
        given = [k for k in ("style_id", "weights", "preserve_color") if k in params]
        if not isinstance(model, DualStyleGANModel):
            if given:
                raise InvalidArgument(f"parameters {given} apply to dualstylegan models only")
            return None
        style_id = None
        if "style_id" in params:
            p = params["style_id"]
            by_name = p.WhichOneof("parameter_choice") == "string_param"
            spec: int | str = p.string_param if by_name else int(p.int64_param)
            style_id = model.style_id(spec)
        weights = None
        if "weights" in params:
            weights = model.check_weights(parse_weights(params["weights"].string_param, "parameter 'weights'"),
                                          "parameter 'weights'")
        return StyleRequest(style_id=style_id, weights=weights,
                            preserve_color=bool(params["preserve_color"].bool_param) if "preserve_color" in params
                            else False)

    async def _mapped(self, model: LatentModel, x: dict[str, np.ndarray]) -> np.ndarray:
        if ("SEED" in x) == ("Z" in x):
            raise InvalidArgument("give exactly one of the inputs 'SEED' or 'Z'")
        if "SEED" in x:
            seeds = [int(s) for s in x["SEED"][:, 0]]
            for s in seeds:
                if not 0 <= s <= L.MAX_SEED:
                    raise InvalidArgument(f"input 'SEED': seed {s} out of range 0..{L.MAX_SEED}")
            w = await model.seeds_to_w(seeds)
        else:
            w = await model.map_w(x["Z"])
        n = len(w)
        if "PSI" not in x:
            return model.to_ws(w, None)
        psi = x["PSI"][:, 0]
        if len(psi) not in (1, n):
            raise InvalidArgument(f"input 'PSI': {len(psi)} rows for {n} latents (give 1 or {n})")
        lo, hi = self.limits.psi_range
        for p in psi:
            if not lo <= float(p) <= hi:
                raise InvalidArgument(f"input 'PSI': psi must be in [{lo}, {hi}], got {float(p)}")
        if len(psi) == 1 or (psi == psi[0]).all():
            return model.to_ws(w, float(psi[0]))
        return np.concatenate([model.to_ws(w[i: i + 1], float(p)) for i, p in enumerate(psi)])

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self._call("ModelInfer", request.model_name, context, self._infer, request, context)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they batch together); responses come back as they finish."""
        method = "ModelStreamInfer"
        m = self.metrics
        out: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        tasks: set[asyncio.Task] = set()
        peer = context.peer()

        async def one(req: pb.ModelInferRequest) -> None:
            label = self._model_label(req.model_name) if req.model_name else ""
            m.requests.labels(method, label).inc()
            t0 = time.perf_counter()
            code, detail = "OK", ""
            try:
                resp = await self._infer(req, context)
                resp.parameters["triton_final_response"].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                if isinstance(exc, ServingError):
                    code, detail = exc.code, exc.message
                else:
                    code, detail = "INTERNAL", "internal error"
                    logger.exception("unhandled error", extra={"method": method})
                err = pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version, id=req.id)
                err.parameters["triton_final_response"].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(error_message=f"[{code}] {detail}", infer_response=err))
            finally:
                window.release()
                self._observe(method, label, code, time.perf_counter() - t0, req.id, peer, detail, req.model_name)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    await window.acquire()
                    task = asyncio.ensure_future(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                out.put_nowait(None)

        m.in_flight.labels(method).inc()
        read = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
            await read
        finally:
            m.in_flight.labels(method).dec()
            if not read.done():
                read.cancel()
            for task in list(tasks):
                task.cancel()
