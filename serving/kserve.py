"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) gRPC API with Triton's ModelStreamInfer
and ModelConfig, on the same port as StyleService, so stock `tritonclient[grpc]` and perf_analyzer work unchanged.

The inference models and their tensors are what each bundle's kind declares (serving.tensors, through the
protocol-neutral core serving.inference); this module only translates protobuf messages. Today's kinds declare:

    stylegan2 `<name>`            SEED INT64 [-1, 1] (or Z FP32 [-1, z_dim]) + optional PSI FP32 [-1, 1]
                                  -> IMAGE UINT8 [-1, R, R, 3]
              `<name>.synthesis`  WS FP32 [-1, num_ws, w_dim] -> IMAGE UINT8 [-1, R, R, 3]
              `<name>.stylize`    IMAGE BYTES [-1, 1] (encoded face photos) -> STYLIZED BYTES [-1, 1] (PNG); bundles
                                  with an encoder or a latent_space served by one; parameters `faces`
                                  "largest"|"all"|index, `composite` "paste"|"crop", `psi` (double)
    dualstylegan (psi towards 0)  as stylegan2, `<name>` adding optional STYLE_ID INT64 [-1, 1] and WEIGHTS FP32
                                  [-1, num_ws] (1 or N rows; defaults style 0 and the bundle's weights),
                                  `.synthesis` adding EXSTYLE_W FP32 [-1, num_ws, w_dim] and WEIGHTS FP32 [-1, num_ws],
                                  `.stylize` the parameters `style_id` (int64 or a style name), `weights` (string
                                  "w0,w1,..."), `preserve_color` (bool); `psi` defaults to the bundle's
    fast_style `<name>`           IMAGE UINT8 [-1, -1, -1, 3] (RGB, any size up to max_size) -> STYLIZED, same size

Not exposed over KServe (use StyleService): exemplar style images, extrinsic codes outside `.synthesis`,
ListStyles, preserve_color for seeds.

Inputs come in `raw_input_contents` (or typed `contents`), outputs go out in `raw_output_contents` (BYTES elements
4-byte little-endian length-prefixed, as tritonclient serialises them). PSI absent = the bundle's default_psi.
Errors: unknown model / endpoint / version NOT_FOUND, a model still loading FAILED_PRECONDITION, bad tensors
INVALID_ARGUMENT naming the tensor. ModelStreamInfer reports per-request errors in-stream (`error_message` +
`infer_response.id`) and keeps the stream open; every stream response carries the bool parameter
`triton_final_response = true`. Triton's other RPCs (statistics, repository, shared memory, trace, logging) are not
registered and answer UNIMPLEMENTED.

Note: the generated messages live in proto package `inference`, like tritonclient's own; one process cannot
import both (duplicate symbols in protobuf's default pool). Run clients and this server in separate processes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Callable

from google.protobuf import json_format

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc

from .config import Limits
from .errors import InvalidArgument
from .inference import InferenceProtocol
from .metrics import Metrics
from .plumbing import Call, Plumbing, deadline_from
from .repository import ModelRepository
from .tensors import encode_output

logger = logging.getLogger("serving.kserve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
# datatype -> the typed `contents` field of InferTensorContents
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT32": "int_contents", "INT64": "int64_contents",
                  "UINT8": "uint_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}
STREAM_WINDOW = 64  # requests of one stream in flight at once


def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, limits: Limits, metrics: Metrics,
                 server_ready: Callable[[], bool] = lambda: True, version: str = "",
                 encode_pool: Executor | None = None):
        self.core = InferenceProtocol(repository, limits, server_ready, version, encode_pool)
        self.plumbing = Plumbing(metrics, logger, self.core.label)

    # -- health and metadata --------------------------------------------------------------------------------------

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        async def run(call: Call):
            return pb.ServerLiveResponse(live=True)
        return await self.plumbing.unary("ServerLive", "", context, run)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        async def run(call: Call):
            return pb.ServerReadyResponse(ready=bool(self.core.server_ready()))
        return await self.plumbing.unary("ServerReady", "", context, run)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        async def run(call: Call):
            return pb.ModelReadyResponse(ready=self.core.ready(request.name, request.version))
        return await self.plumbing.unary("ModelReady", request.name, context, run)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        async def run(call: Call):
            return json_format.ParseDict(self.core.server_metadata(), pb.ServerMetadataResponse())
        return await self.plumbing.unary("ServerMetadata", "", context, run)

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        async def run(call: Call):
            lease, endpoint = self.core.lease(request.name, request.version)
            with lease as model:
                doc = self.core.model_metadata(request.name, model, endpoint)
            return json_format.ParseDict(doc, pb.ModelMetadataResponse())
        return await self.plumbing.unary("ModelMetadata", request.name, context, run)

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        async def run(call: Call):
            lease, endpoint = self.core.lease(request.name, request.version)
            with lease as model:
                doc = self.core.model_config(request.name, model, endpoint)
            return pb.ModelConfigResponse(config=json_format.ParseDict(doc, mc.ModelConfig()))
        return await self.plumbing.unary("ModelConfig", request.name, context, run)

    # -- inference ------------------------------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        lease, endpoint = self.core.lease(request.model_name, request.model_version)
        with lease as model:
            raw = request.raw_input_contents
            if raw and len(raw) != len(request.inputs):
                raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
            tensors = [(t.name, t.datatype, list(t.shape), raw[i] if raw else None,
                        None if raw else list(getattr(t.contents, CONTENTS_FIELD.get(t.datatype, "bytes_contents"))))
                       for i, t in enumerate(request.inputs)]
            endpoint.check_outputs([o.name for o in request.outputs])
            inputs = self.core.decode_inputs(endpoint, tensors)
            params = {k: _param_value(v) for k, v in request.parameters.items()}
            outputs = await self.core.infer(model, endpoint, inputs, params, deadline,
                                            [o.name for o in request.outputs])
            resp = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version, id=request.id)
        for name, datatype, arr in outputs:
            resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
            resp.raw_output_contents.append(encode_output(arr))
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async def run(call: Call):
            return await self._infer(request, call.deadline)
        return await self.plumbing.unary("ModelInfer", request.model_name, context, run)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they batch together); responses come back as they finish. Each request is
        counted and logged on its own; the stream counts once in the in-flight gauge."""
        method = "ModelStreamInfer"
        plumbing = self.plumbing
        out: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        tasks: set[asyncio.Task] = set()
        peer = context.peer()

        async def one(req: pb.ModelInferRequest) -> None:
            call = plumbing.begin(method, req.model_name, req.id, peer, in_flight=False)
            try:
                ok, resp = await plumbing.guarded(call, self._infer(req, deadline_from(context.time_remaining())),
                                                  context.time_remaining)
            finally:
                window.release()
                plumbing.finish(call)
            if ok:
                resp.parameters["triton_final_response"].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
                return
            err = pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version, id=req.id)
            err.parameters["triton_final_response"].bool_param = True
            out.put_nowait(pb.ModelStreamInferResponse(error_message=f"[{call.code}] {call.detail}",
                                                       infer_response=err))

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

        in_flight = plumbing.metrics.in_flight.labels(method)
        in_flight.inc()
        read = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
            await read
        finally:
            in_flight.dec()
            if not read.done():
                read.cancel()
            for task in list(tasks):
                task.cancel()
