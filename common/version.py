"""The stylecast version, read from the installed package's metadata (or, in a source tree that was never
installed, such as a bare GPU machine, from the pyproject.toml beside it)."""

from __future__ import annotations

import functools
import tomllib
from importlib import metadata
from pathlib import Path


@functools.lru_cache(maxsize=1)
def stylecast_version() -> str:
    """"0.1.0" etc.; "0+unknown" when neither the metadata nor a pyproject.toml beside the source can be read."""
    try:
        return metadata.version("stylecast")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"
