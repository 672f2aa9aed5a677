"""Compile every .proto under protos/ into Python modules (run by `make`, by the setup.py build hook, never committed).

Usage: python -m protos.build [--out DIR]      (default: next to the .proto files, for the editable dev install)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(quiet: bool = False, out_dir: str | Path | None = None) -> list[Path]:
    """Generate `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` for all protos.

    Args:
        quiet: print nothing.
        out_dir: root the generated `protos/...` modules are written under (a wheel's build directory, an sdist's
            release tree); None = the source tree itself.

    Returns:
        The .proto files built (paths in the source tree).
    """
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)
    import grpc_tools

    out = Path(out_dir).resolve() if out_dir is not None else ROOT
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    if not protos:
        return []
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    # Imports in the generated code follow the paths relative to -I (`from protos.stylecast.v1 import ...`), so the
    # include root stays the project root whatever the output directory is.
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    for p in protos:
        (out / p.parent.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # Packages for the generated modules (protos/stylecast/v1/...).
    for p in protos:
        d = out / p.parent.relative_to(ROOT)
        while d != out:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            d = d.parent
    if not quiet:
        print(f"compiled {len(protos)} proto file(s) into {out}")
    return protos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output root (default: the source tree)")
    args = parser.parse_args(argv)
    build(out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
