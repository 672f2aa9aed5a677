"""setuptools build hook: every build (wheel, sdist, editable install) generates the protobuf / gRPC modules.

The generated `*_pb2*.py` are never committed; grpcio-tools (pinned in pyproject's [build-system] so that the
gencode matches the runtime range in `dependencies`) compiles `protos/**/*.proto` at build time. All metadata lives
in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _compile_protos(out_dir: str | Path) -> None:
    # Loaded by file path: an isolated build does not put the project on sys.path, and importing the `protos`
    # package would need the very modules this generates.
    spec = importlib.util.spec_from_file_location("_stylecast_protos_build", ROOT / "protos" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(quiet=True, out_dir=out_dir)


class BuildPyWithProtos(build_py):
    """build_py + the generated modules: into the build directory (wheels), into the source tree (editable)."""

    def run(self) -> None:
        super().run()
        _compile_protos(ROOT if self.editable_mode else self.build_lib)


class SdistWithProtos(sdist):
    """sdist + the generated modules, so an sdist unpacked without grpcio-tools still has them."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        # The release tree hard-links the source files: unlink generated modules picked up from a dev tree before
        # protoc rewrites them, so the source tree is never written through a link.
        for stale in Path(base_dir, "protos").rglob("*_pb2*.py*"):
            stale.unlink()
        _compile_protos(base_dir)


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
