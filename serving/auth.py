"""Bearer-token authentication: a grpc.aio server interceptor that answers UNAUTHENTICATED without a valid
`authorization: Bearer <token>` header.

Health checks and server reflection stay open (load balancers and grpcurl probe them without credentials;
neither reveals more than the service and model names). Everything else needs a token.
"""

from __future__ import annotations

import hmac
from typing import Sequence

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Sequence[str]):
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    def _authorized(self, metadata) -> tuple[bool, str]:
        value = None
        for key, val in metadata or ():
            if key == "authorization":
                value = val
                break
        if value is None:
            return False, "missing bearer token (metadata 'authorization: Bearer <token>')"
        scheme, _, token = str(value).partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False, "malformed authorization metadata (expected 'Bearer <token>')"
        given = token.strip().encode()
        # compare with every token (constant time each) so timing does not reveal which one nearly matched
        ok = False
        for t in self._tokens:
            ok |= hmac.compare_digest(given, t)
        return (True, "") if ok else (False, "invalid bearer token")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        ok, why = self._authorized(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if ok or handler is None:
            return handler
        return _deny(handler, why)


def _deny(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)
