"""Files on disk, as every layer writes them: numbered run directories, atomic writes and directories, sha256.

Part of the ground floor (`common`): standard library only, imported by training, export, serving and the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

def next_run_dir(root: str | os.PathLike, name: str) -> Path:
    """Create and return root/NNNNN-name, numbered one past the highest existing run; never reuses one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
    while True:
        ids = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d{5})-", p.name))]
        run = root / f"{(max(ids) + 1 if ids else 0):05d}-{safe}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty-printed JSON written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to dest only if the block succeeds.

    An exception (or a kill) inside the block leaves no dest. With overwrite=False an existing dest is an
    error raised before any work is done.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (bundles and checkpoints are never overwritten)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; published directories are world-readable like any other
    try:
        yield tmp
        if dest.exists() and overwrite:
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
