"""Container health check: exit 0 when the server's grpc.health.v1 service answers SERVING, else 1 (one line why).

    python deploy/healthcheck.py                       # readiness: every configured model READY
    python deploy/healthcheck.py --service liveness    # the process listens and is not draining
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server (default: %(default)s)")
    parser.add_argument("--service", default="",
                        help='health service name: "" = readiness (default), "liveness", or a model name')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA certificate of a TLS server")
    args = parser.parse_args(argv)
    if args.tls_ca is not None:
        channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(args.tls_ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                             timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.address} {args.service!r}: {exc.code().name} {exc.details() or ''}".rstrip(),
                  file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address} {args.service!r}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
