"""A small synchronous Python client for stylecast.v1.StyleService.

    with StyleClient("127.0.0.1:50051") as c:
        print([m.name for m in c.list_models()])
        images = c.generate("demo", seeds=[0, 1, 2], psi=0.7)          # -> list[GeneratedImage]
        images[0].save("seed0000.png")
        for frame in c.generate_stream("demo", interpolate=[0, 7], steps=30):
            ...
        # dualstylegan models: a library style (id or name) or an exemplar photo (bytes), weights, preserve_color
        styles = c.list_styles("cartoon")                                  # [(id, name), ...]
        out = c.stylize("cartoon", photo_bytes, style=53, weights=[0.75] * 7 + [1] * 11, preserve_color=True)

    # Replicas: round_robin over every address, health-checked, UNAVAILABLE retried on another replica
    with StyleClient("127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053", load_balancing="round_robin") as c:
        ...
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np

from protos.stylecast.v1 import common_pb2 as cpb
from protos.stylecast.v1 import style_pb2 as pb
from protos.stylecast.v1 import style_pb2_grpc as pb_grpc

from .codecs import decode

FORMAT_NAMES = {cpb.IMAGE_FORMAT_PNG: "png", cpb.IMAGE_FORMAT_JPEG: "jpeg", cpb.IMAGE_FORMAT_WEBP: "webp",
                cpb.IMAGE_FORMAT_RAW_RGB8: "raw", cpb.IMAGE_FORMAT_UNSPECIFIED: "png"}
FORMAT_ENUM = {"png": cpb.IMAGE_FORMAT_PNG, "jpeg": cpb.IMAGE_FORMAT_JPEG, "jpg": cpb.IMAGE_FORMAT_JPEG,
               "webp": cpb.IMAGE_FORMAT_WEBP, "raw": cpb.IMAGE_FORMAT_RAW_RGB8}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "raw": ".rgb"}
LOAD_BALANCING = ("pick_first", "round_robin")
# The services whose RPCs the client retries: every one of them is a pure function of its request.
RETRIED_SERVICES = ("stylecast.v1.StyleService", "inference.GRPCInferenceService")


@dataclass
class GeneratedImage:
    data: bytes
    format: str      # png | jpeg | webp | raw
    width: int
    height: int
    index: int
    seed: int | None = None
    t: float = 0.0   # position along an interpolation path (streams)

    def to_numpy(self) -> np.ndarray:
        """[H, W, 3] uint8."""
        return decode(self.data, self.format, self.width, self.height)

    def save(self, path: str | Path) -> Path:
        from common.files import atomic_write_bytes
        atomic_write_bytes(path, self.data)
        return Path(path)

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def _image(msg: cpb.Image, t: float = 0.0) -> GeneratedImage:
    return GeneratedImage(msg.data, FORMAT_NAMES[msg.format], msg.width, msg.height, msg.index,
                          msg.seed if msg.HasField("seed") else None, t)


def tensor(arr) -> cpb.FloatTensor:
    a = np.asarray(arr, dtype=np.float32)
    return cpb.FloatTensor(shape=list(a.shape), values=a.ravel().tolist())


def latents(seeds: Sequence[int] | None = None, z=None, w=None, ws=None) -> cpb.Latents:
    """Exactly one of seeds / z [N, z_dim] / w [N, w_dim] / ws [N, num_ws, w_dim]."""
    given = [k for k, v in (("seeds", seeds), ("z", z), ("w", w), ("ws", ws)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of seeds, z, w, ws (got {given or 'none'})")
    if seeds is not None:
        return cpb.Latents(seeds=cpb.SeedList(seeds=[int(s) for s in seeds]))
    return cpb.Latents(**{given[0]: tensor({"z": z, "w": w, "ws": ws}[given[0]])})


def dualstyle_options(style: int | str | bytes | None = None, weights: Sequence[float] | None = None,
                      preserve_color: bool = False, exstyle_z=None, exstyle_w=None) -> pb.DualStyleOptions | None:
    """DualStyleOptions for a dualstylegan model, or None when nothing is set (the server then uses style 0 with the
    bundle's default weights).

    Args:
        style: a library style id (int), a style name (str) or an exemplar portrait (PNG / JPEG / WebP bytes).
        weights: num_ws per-layer extrinsic weights (None = the bundle's default).
        preserve_color: keep the content's colours (the official --preserve_color).
        exstyle_z / exstyle_w: an extrinsic code [1, num_ws, z_dim] (z+) / [1, num_ws, w_dim] (W+) instead of style.
    """
    given = [k for k, v in (("style", style), ("exstyle_z", exstyle_z), ("exstyle_w", exstyle_w)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of style, exstyle_z, exstyle_w (got {given})")
    if not given and weights is None and not preserve_color:
        return None
    opts = pb.DualStyleOptions(preserve_color=bool(preserve_color))
    if isinstance(style, bool):
        raise ValueError("style must be an id, a name or image bytes")
    if isinstance(style, int):
        opts.style_id = style
    elif isinstance(style, str):
        opts.style_name = style
    elif isinstance(style, (bytes, bytearray, memoryview)):
        opts.style_image = bytes(style)
    elif exstyle_z is not None:
        opts.exstyle_z.CopyFrom(tensor(exstyle_z))
    elif exstyle_w is not None:
        opts.exstyle_w.CopyFrom(tensor(exstyle_w))
    if weights is not None:
        opts.weights.extend(float(v) for v in weights)
    return opts


def output_options(fmt: str = "png", quality: int = 0, size: int | tuple[int, int] | None = None) -> cpb.OutputOptions:
    if fmt not in FORMAT_ENUM:
        raise ValueError(f"unknown format {fmt!r}; use one of {sorted(FORMAT_ENUM)}")
    w = h = 0
    if size is not None:
        w, h = (size, size) if isinstance(size, int) else size
    return cpb.OutputOptions(format=FORMAT_ENUM[fmt], quality=quality, width=w, height=h)


def service_config(load_balancing: str = "round_robin", health_service: str | None = "",
                   max_attempts: int = 5, initial_backoff_s: float = 0.05, max_backoff_s: float = 1.0) -> dict:
    """A gRPC service config for a client of several replicas (pass it as channel option `grpc.service_config`).

    Args:
        load_balancing: "round_robin" (every replica, in turn) or "pick_first" (one connection).
        health_service: client-side health checking with grpc.health.v1 Watch on this service name ("" = the
            server's readiness: every configured model READY); a replica that is starting, draining or missing a
            model takes no calls. None = no health checking. Needs round_robin.
        max_attempts: calls failing with UNAVAILABLE (a replica that went away mid-call, refused the connection, or
            refused the stream while draining) are retried up to this many attempts in all (gRPC caps it at 5);
            each retry is picked again, so round_robin sends it to another replica. 1 = no retries.
        initial_backoff_s / max_backoff_s: the randomised exponential backoff between attempts.

    Returns:
        The service config as a dict (json.dumps it for the channel option).
    """
    if load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING}, got {load_balancing!r}")
    if health_service is not None and load_balancing != "round_robin":
        raise ValueError("client-side health checking needs load_balancing='round_robin'")
    if not 1 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be in 1..5 (gRPC's limit), got {max_attempts}")
    cfg: dict = {"loadBalancingConfig": [{load_balancing: {}}]}
    if health_service is not None:
        cfg["healthCheckConfig"] = {"serviceName": health_service}
    if max_attempts > 1:
        cfg["methodConfig"] = [{
            "name": [{"service": s} for s in RETRIED_SERVICES],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": f"{initial_backoff_s}s",
                            "maxBackoff": f"{max_backoff_s}s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return cfg


def load_balancing_options(load_balancing: str = "round_robin", health_service: str | None = "",
                           max_attempts: int = 5, max_reconnect_backoff_s: float = 2.0) -> list[tuple[str, object]]:
    """Channel options for a client of several replicas: the `service_config` above, retries on, and a reconnect
    backoff capped at `max_reconnect_backoff_s` (gRPC's default grows to 120 s), so that a restarted replica gets
    calls again within seconds of listening.

    Returns:
        [(option name, value), ...] for grpc.insecure_channel / secure_channel.
    """
    cfg = service_config(load_balancing, health_service if load_balancing == "round_robin" else None, max_attempts)
    backoff_ms = int(max_reconnect_backoff_s * 1000)
    return [("grpc.service_config", json.dumps(cfg)), ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms)]


def channel_target(server: str) -> str:
    """A gRPC target for `server`: HOST:PORT, any gRPC URI (e.g. dns:///replicas.example:50051, whose every address
    is a replica under round_robin), or a comma-separated list of IP:PORT replicas (-> ipv4:/ipv6: target).

    Raises:
        ValueError: a list entry is not an IP literal with a port.
    """
    if "," not in server or "://" in server or server.startswith(("ipv4:", "ipv6:", "unix:")):
        return server
    hosts, families = [], set()
    for part in (p.strip() for p in server.split(",")):
        host, sep, port = part.rpartition(":")
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
            if not sep or not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(f"a list of replicas must be IP:PORT entries, got {part!r} (for a DNS name with "
                             "several addresses use dns:///NAME:PORT)") from None
        families.add(addr.version)
        hosts.append(f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}")
    if len(families) > 1:
        raise ValueError(f"a list of replicas must be all IPv4 or all IPv6, got {server!r}")
    return f"ipv{families.pop()}:" + ",".join(hosts)


class StyleClient:
    """Blocking client. `token` adds `authorization: Bearer <token>`; `tls_ca` (PEM path) or `tls=True` (system
    roots) make a TLS channel. RPC errors surface as grpc.RpcError (`.code()`, `.details()`).

    `target` is anything `channel_target` takes; `load_balancing="round_robin"` spreads calls over every replica
    behind it with client-side health checking and retries (`load_balancing_options`)."""

    def __init__(self, target: str, token: str | None = None, tls: bool = False, tls_ca: str | Path | None = None,
                 max_message_mb: int = 64, timeout: float | None = 60.0, server_name: str | None = None,
                 load_balancing: str | None = None):
        options = [("grpc.max_send_message_length", max_message_mb << 20),
                   ("grpc.max_receive_message_length", max_message_mb << 20)]
        if load_balancing is not None:
            options += load_balancing_options(load_balancing)
        target = channel_target(target)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or tls_ca is not None:
            root = Path(tls_ca).read_bytes() if tls_ca is not None else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.StyleServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> "StyleClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None, request_id: str | None = None) -> dict:
        md = self.metadata + ((("x-request-id", request_id),) if request_id else ())
        return {"metadata": md, "timeout": self.timeout if timeout is None else timeout}

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout)).models)

    def get_model(self, name: str, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(name=name), **self._kw(timeout))

    def list_styles_raw(self, model: str, timeout: float | None = None) -> pb.ListStylesResponse:
        return self.stub.ListStyles(pb.ListStylesRequest(model=model), **self._kw(timeout))

    def list_styles(self, model: str, timeout: float | None = None) -> list[tuple[int, str]]:
        """A dualstylegan model's style library: [(id, name), ...] in id order."""
        return [(s.id, s.name) for s in self.list_styles_raw(model, timeout).styles]

    def generate_raw(self, request: pb.GenerateRequest, timeout: float | None = None,
                     request_id: str | None = None) -> pb.GenerateResponse:
        return self.stub.Generate(request, **self._kw(timeout, request_id))

    def generate(self, model: str, seeds: Sequence[int] | None = None, *, z=None, w=None, ws=None,
                 psi: float | None = None, cutoff: int | None = None, mix: dict | None = None, fmt: str = "png",
                 quality: int = 0, size: int | tuple[int, int] | None = None, timeout: float | None = None,
                 request_id: str | None = None, style: int | str | bytes | None = None,
                 weights: Sequence[float] | None = None, preserve_color: bool = False) -> list[GeneratedImage]:
        """Render latents (one of seeds, z, w, ws). mix={"crossover": k, "seeds"|"z"|"w"|"ws": fine latents}.
        dualstylegan models: style / weights / preserve_color as `dualstyle_options` (psi truncates towards 0)."""
        req = pb.GenerateRequest(model=model, latents=latents(seeds, z, w, ws),
                                 output=output_options(fmt, quality, size))
        dual = dualstyle_options(style, weights, preserve_color)
        if dual is not None:
            req.dualstyle.CopyFrom(dual)
        if psi is not None:
            req.psi = float(psi)
        if cutoff is not None:
            req.truncation_cutoff = int(cutoff)
        if mix is not None:
            mix = dict(mix)
            crossover = int(mix.pop("crossover"))
            req.mixing.CopyFrom(pb.StyleMixing(fine=latents(**mix), crossover=crossover))
        resp = self.generate_raw(req, timeout, request_id)
        return [_image(im) for im in resp.images]

    def generate_stream(self, model: str, seeds: Sequence[int] | None = None, *,
                        interpolate: Sequence[int] | None = None, waypoints=None, space: str = "z",
                        steps: int = 16, mode: str | None = None, psi: float | None = None,
                        cutoff: int | None = None, fmt: str = "png", quality: int = 0,
                        size: int | tuple[int, int] | None = None, timeout: float | None = None,
                        style: int | str | bytes | None = None, weights: Sequence[float] | None = None,
                        preserve_color: bool = False) -> Iterator[GeneratedImage]:
        """Stream seeds, or an interpolation through seeds (`interpolate`) or latents (`waypoints` in `space`).

        Frames arrive in order as they are rendered; breaking out of the loop cancels the call on the server.
        dualstylegan models: style / weights / preserve_color as `dualstyle_options`.
        """
        req = pb.GenerateStreamRequest(model=model, output=output_options(fmt, quality, size))
        dual = dualstyle_options(style, weights, preserve_color)
        if dual is not None:
            req.dualstyle.CopyFrom(dual)
        if seeds is not None:
            req.seeds.CopyFrom(cpb.SeedList(seeds=[int(s) for s in seeds]))
        else:
            way = latents(seeds=interpolate) if interpolate is not None else latents(**{space: waypoints})
            modes = {None: pb.INTERPOLATION_MODE_UNSPECIFIED, "linear": pb.INTERPOLATION_MODE_LINEAR,
                     "slerp": pb.INTERPOLATION_MODE_SLERP}
            req.interpolation.CopyFrom(pb.Interpolation(waypoints=way, steps=steps, mode=modes[mode]))
        if psi is not None:
            req.psi = float(psi)
        if cutoff is not None:
            req.truncation_cutoff = int(cutoff)
        call = self.stub.GenerateStream(req, **self._kw(timeout))
        try:
            for frame in call:
                yield _image(frame.image, frame.t)
        finally:
            call.cancel()  # no-op when the stream finished; frees the server's queued rows otherwise


    # -- photos ---------------------------------------------------------------------------------------------------

    @staticmethod
    def stylize_request(model: str, image: bytes, *, faces: str | int = "largest", composite: str = "paste",
                        feather: float = 0.0, psi: float | None = None, fmt: str = "png", quality: int = 0,
                        size: int | tuple[int, int] | None = None, style: int | str | bytes | None = None,
                        weights: Sequence[float] | None = None, preserve_color: bool = False) -> pb.StylizeRequest:
        """A StylizeRequest. faces: "largest" | "all" | an index (largest first); composite: "paste" | "crop";
        dualstylegan models: style (id, name or exemplar bytes), weights, preserve_color (see dualstyle_options)."""
        opts = face_options(faces, composite, feather, psi)
        req = pb.StylizeRequest(model=model, image=bytes(image), output=output_options(fmt, quality, size), face=opts)
        dual = dualstyle_options(style, weights, preserve_color)
        if dual is not None:
            req.dualstyle.CopyFrom(dual)
        return req

    def stylize_raw(self, request: pb.StylizeRequest, timeout: float | None = None,
                    request_id: str | None = None) -> pb.StylizeResponse:
        return self.stub.Stylize(request, **self._kw(timeout, request_id))

    def stylize(self, model: str, image: bytes, timeout: float | None = None, **options) -> GeneratedImage:
        """Stylize one photo (encoded PNG / JPEG / WebP bytes); options as `stylize_request`."""
        return _image(self.stylize_raw(self.stylize_request(model, image, **options), timeout).image)

    def stylize_stream(self, model: str, images: Iterable[bytes], timeout: float | None = None,
                       **options) -> Iterator[pb.StylizeResponse]:
        """Stream frames; yields one StylizeResponse per frame in order (a bad frame has `error` set)."""
        def requests() -> Iterator[pb.StylizeRequest]:
            for data in images:
                yield self.stylize_request(model, data, **options)
        call = self.stub.StylizeStream(requests(), **self._kw(timeout))
        try:
            yield from call
        finally:
            call.cancel()


def face_options(faces: str | int = "largest", composite: str = "paste", feather: float = 0.0,
                 psi: float | None = None) -> pb.FaceOptions:
    if faces == "largest":
        opts = pb.FaceOptions(select=pb.FACE_SELECTION_LARGEST)
    elif faces == "all":
        opts = pb.FaceOptions(select=pb.FACE_SELECTION_ALL)
    elif isinstance(faces, int) or str(faces).isdigit():
        opts = pb.FaceOptions(select=pb.FACE_SELECTION_INDEX, index=int(faces))
    else:
        raise ValueError(f"faces must be 'largest', 'all' or an index, got {faces!r}")
    modes = {"paste": pb.FACE_COMPOSITE_PASTE_BACK, "crop": pb.FACE_COMPOSITE_CROP}
    if composite not in modes:
        raise ValueError(f"composite must be 'paste' or 'crop', got {composite!r}")
    opts.composite = modes[composite]
    opts.feather = float(feather)
    if psi is not None:
        opts.psi = float(psi)
    return opts


def parse_size(spec: str | None) -> tuple[int, int] | None:
    """'512' -> (512, 512); '640x480' -> (640, 480); None -> None."""
    if not spec:
        return None
    parts = spec.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"invalid size {spec!r}: use e.g. 512 or 640x480") from None
    if len(vals) == 1:
        vals *= 2
    if len(vals) != 2 or min(vals) < 1 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"invalid size {spec!r}: use e.g. 512 or 640x480")
    return vals[0], vals[1]
