"""Compile every .proto under protos/ into Python modules next to it (run by `make`, never committed).

Usage: python -m protos.build
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(quiet: bool = False) -> list[Path]:
    """Generate `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` for all protos; returns the .proto files built."""
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)
    import grpc_tools

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    if not protos:
        return []
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # Packages for the generated modules (protos/stylecast/v1/...).
    for p in protos:
        d = p.parent
        while d != ROOT:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            d = d.parent
    if not quiet:
        print(f"compiled {len(protos)} proto file(s)")
    return protos


if __name__ == "__main__":
    build()
    sys.exit(0)
