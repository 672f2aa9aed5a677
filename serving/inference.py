"""The Open Inference Protocol (KServe v2) core, protocol-neutral: inference-model names -> a bundle's endpoint, model
metadata and model config (Triton's, in its JSON form), and inference on decoded tensors, all derived from the
endpoints each kind declares (serving.tensors). serving.kserve speaks it over gRPC; an HTTP/REST front end speaks
the same core over JSON, with no per-kind code in either.

An inference model is `<bundle name><suffix>`: "" for the bundle's own name, else a suffix its kind declares
(".synthesis", ".stylize"). Names are split at the longest known bundle name, so bundle names may contain dots.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np

from .config import Limits
from .errors import InvalidArgument, ModelNotFound, ServingError
from .models import Lease, LoadedModel, RequestContext
from .repository import ModelRepository
from .tensors import DATATYPES, Endpoint, decode_input

EXTENSIONS = ["model_configuration"]


def platform(backend_name: str) -> tuple[str, str]:
    """Triton's (platform, backend) names for a model's runner."""
    if backend_name.startswith("tensorrt"):
        return "tensorrt_plan", "tensorrt"
    return "onnxruntime_onnx", "onnxruntime"


class InferenceProtocol:
    """What every Open Inference Protocol front end asks of the model repository."""

    def __init__(self, repository: ModelRepository, limits: Limits, server_ready: Callable[[], bool] = lambda: True,
                 version: str = "", encode_pool: Executor | None = None):
        self.repo = repository
        self.limits = limits
        self.server_ready = server_ready
        self.version = version
        self.encode_pool = encode_pool

    # -- names ------------------------------------------------------------------------------------------------

    def _known(self, name: str) -> bool:
        return name in self.repo.models or self.repo.status(name) is not None

    def split(self, name: str) -> tuple[str, str]:
        """Inference-model name -> (bundle name, endpoint suffix)."""
        if self._known(name):
            return name, ""
        i = name.rfind(".")
        while i > 0:
            if self._known(name[:i]):
                return name[:i], name[i:]
            i = name.rfind(".", 0, i)
        return name, ""

    def label(self, name: str) -> str:
        """The metrics label of a requested name: itself when its bundle is known, else "_unknown"."""
        return name if self._known(self.split(name)[0]) else "_unknown"

    def lease(self, name: str, version: str = "") -> tuple[Lease, Endpoint]:
        """A lease on the model behind `name` and the endpoint it names.

        Raises:
            InvalidArgument: an empty name. ModelNotFound: unknown bundle, endpoint or version. ModelNotReady: the
            bundle is loading or failed.
        """
        if not name:
            raise InvalidArgument("model name is empty")
        base, suffix = self.split(name)
        lease = self.repo.acquire(base)
        model = lease.model
        endpoint = model.endpoints().get(suffix)
        if endpoint is None:
            lease.release()
            offered = ", ".join(f"{model.name}{s}" for s in model.endpoints()) or "none"
            raise ModelNotFound(f"model {name!r}: the {model.kind!r} model {model.name!r} does not serve it over the "
                                f"inference protocol (it serves: {offered})")
        if version and version != model.version:
            lease.release()
            raise ModelNotFound(f"model {name!r} version {version!r} is not available (serving {model.version!r})")
        return lease, endpoint

    def ready(self, name: str, version: str = "") -> bool:
        try:
            lease, _ = self.lease(name, version)
        except ServingError:
            return False
        lease.release()
        return True

    # -- metadata and config ----------------------------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "stylecast", "version": self.version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, model: LoadedModel, endpoint: Endpoint) -> dict[str, Any]:
        """The KServe v2 model metadata object {name, versions, platform, inputs, outputs}."""
        return {"name": name, "versions": [model.version], "platform": platform(model.backend_name)[0],
                "inputs": [t.metadata() for t in endpoint.inputs],
                "outputs": [t.metadata() for t in endpoint.outputs]}

    def model_config(self, name: str, model: LoadedModel, endpoint: Endpoint) -> dict[str, Any]:
        """Triton's ModelConfig in its JSON form (proto field names, enum names)."""
        plat, backend = platform(model.backend_name)
        b = model.batch_cfg
        return {
            "name": name, "platform": plat, "backend": backend, "max_batch_size": self.limits.max_seeds,
            "input": [{"name": t.name, "data_type": DATATYPES[t.datatype][1], "dims": list(t.dims),
                       "optional": t.optional} for t in endpoint.inputs],
            "output": [{"name": t.name, "data_type": DATATYPES[t.datatype][1], "dims": list(t.dims)}
                       for t in endpoint.outputs],
            "dynamic_batching": {"preferred_batch_size": [model.max_batch],
                                 "max_queue_delay_microseconds": int(round(b.max_queue_delay_ms * 1000))},
            "instance_group": [{"count": 1, "kind": "KIND_CPU" if "CPU" in model.backend_name else "KIND_GPU"}],
            "model_transaction_policy": {"decoupled": False},
            "parameters": {"stylecast_version": {"string_value": model.version}},
        }

    # -- inference --------------------------------------------------------------------------------------------

    def decode_inputs(self, endpoint: Endpoint, tensors: list[tuple[str, str, list[int], bytes | None, Any]],
                      ) -> dict[str, np.ndarray]:
        """Request tensors (name, datatype, shape, raw bytes or None, values or None) -> {name: array [N, ...]},
        each checked against the endpoint's TensorSpec."""
        arrays: dict[str, np.ndarray] = {}
        for name, datatype, shape, raw, values in tensors:
            spec = endpoint.inputs_by_name.get(name)
            if spec is None:
                raise InvalidArgument(f"unexpected input {name!r} (inputs: {', '.join(endpoint.inputs_by_name)})")
            if name in arrays:
                raise InvalidArgument(f"input {name!r} given twice")
            arrays[name] = decode_input(spec, datatype, shape, raw=raw, values=values, max_rows=self.limits.max_seeds)
        return arrays

    async def infer(self, model: LoadedModel, endpoint: Endpoint, inputs: dict[str, np.ndarray],
                    params: dict[str, Any], deadline: float | None,
                    requested: list[str] | None = None) -> list[tuple[str, str, np.ndarray]]:
        """Run one request on the leased model.

        Returns:
            (name, datatype, array) of the requested outputs (all when none is requested), in declaration order.
        """
        endpoint.check_outputs(requested or [])
        ctx = RequestContext(self.repo, self.limits, self.encode_pool, deadline)
        result = await model.infer(endpoint.suffix, inputs, params, ctx)
        return [(t.name, t.datatype, result[t.name]) for t in endpoint.outputs if not requested or t.name in requested]
