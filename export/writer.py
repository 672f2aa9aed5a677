"""The one bundle writer every kind's builder uses: an atomic directory (all or nothing, never over an existing
bundle), the manifest header (format, name, kind, created, stylecast version, opset), the graphs table, golden.npz
with the golden tolerances recorded, the files table with sha256, and the manifest validated (protos.manifest, the
rules bundle_manifest.schema.json publishes) before the directory is published.

    with BundleWriter(out, "stylegan2", name, opset, steps=["mapping", ...], progress=True) as w:
        w.graph("mapping", export_mapping(G, w.dir / "mapping.onnx"))
        w.golden({"z": ..., ...}, seeds=[0, 1])
        w.publish(model={...}, source={...})
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.files import atomic_directory, sha256_file
from common.version import stylecast_version
from protos.manifest import BUNDLE_FORMAT, GOLDEN_NAME, GOLDEN_TOLERANCE, MANIFEST_NAME, NAME_RE, load_manifest


def check_name(name: str | None) -> str:
    """A served model name (NAME_RE), else ValueError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"bundle name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    return name


def check_psi(psi: Any, what: str = "default psi") -> float:
    if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not math.isfinite(psi):
        raise ValueError(f"{what} must be a finite number")
    return float(psi)


def graph_entry(info: Any, precision: str = "fp32") -> dict[str, Any]:
    """The manifest's graphs[...] entry of an exported graph (export.onnx_export.GraphInfo)."""
    return {"file": Path(info.path).name, "inputs": info.inputs, "outputs": info.outputs, "nodes": info.nodes,
            "precision": precision}


class BundleWriter:
    """Builds one bundle directory; see the module docstring.

    Args:
        out: the bundle directory to create (must not exist).
        kind, name, opset: the manifest header (name checked against NAME_RE before anything is written).
        steps: labels of the progress bar (one `step()` each); progress: show it (tqdm on stderr).
    Raises:
        FileExistsError: `out` exists. ValueError: a bad name.
    """

    def __init__(self, out: str | Path, kind: str, name: str, opset: int, steps: Sequence[str] = (),
                 progress: bool = False):
        self.out = Path(out)
        self.kind = kind
        self.name = check_name(name)
        self.opset = int(opset)
        if self.out.exists():
            raise FileExistsError(f"{self.out} already exists (bundles are never overwritten)")
        self.graphs: dict[str, Any] = {}
        self.engines: list[dict[str, Any]] = []
        self.golden_doc: dict[str, Any] | None = None
        self.manifest: dict[str, Any] | None = None
        self._steps = list(steps)
        self._progress = progress
        self._bar = None
        self._ctx = None
        self.dir = Path()

    def __enter__(self) -> "BundleWriter":
        self._ctx = atomic_directory(self.out)
        self.dir = self._ctx.__enter__()
        if self._progress and self._steps:
            from tqdm import tqdm
            self._bar = tqdm(total=len(self._steps), desc=f"{self.kind} bundle", unit="step")
        return self

    def __exit__(self, typ, value, tb) -> bool | None:
        if self._bar is not None:
            self._bar.close()
        if typ is None and self.manifest is None:  # a builder bug: discard the directory, never publish it
            value = RuntimeError(f"{self.out}: the bundle was never published")
            self._ctx.__exit__(RuntimeError, value, None)
            raise value
        return self._ctx.__exit__(typ, value, tb)

    def step(self) -> None:
        """One progress-bar step done."""
        if self._bar is not None:
            self._bar.update()

    def graph(self, key: str, info: Any, precision: str = "fp32") -> dict[str, Any]:
        """Record an exported graph (GraphInfo of a file in `dir`) as graphs[key]; one progress step."""
        self.graphs[key] = graph_entry(info, precision)
        self.step()
        return self.graphs[key]

    def golden(self, arrays: dict[str, np.ndarray], tolerance: dict[str, float] | None = None,
               **doc: Any) -> None:
        """Write golden.npz and the manifest's golden section: `doc` (what the rows are) and the tolerances serving
        and verify apply (GOLDEN_TOLERANCE, with `tolerance` overriding); one progress step."""
        np.savez(self.dir / GOLDEN_NAME, **arrays)
        self.golden_doc = {"file": GOLDEN_NAME, **doc, "tolerance": {**GOLDEN_TOLERANCE, **(tolerance or {})}}
        self.step()

    def publish(self, model: dict[str, Any], source: dict[str, Any], **sections: Any) -> dict[str, Any]:
        """Write manifest.json (header, model, source, `sections`, files with sha256, graphs, engines, golden) and
        validate it; the directory is renamed into place when the `with` block ends.

        Returns:
            the manifest.
        Raises:
            ManifestError: the manifest does not validate (nothing is published).
        """
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(self.dir.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
        doc: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "name": self.name, "kind": self.kind,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stylecast_version": stylecast_version(), "opset": self.opset,
            "model": model, "source": source,
            **{k: v for k, v in sections.items() if v is not None},
            "files": files, "graphs": self.graphs, "engines": self.engines,
        }
        if self.golden_doc is not None:
            doc["golden"] = self.golden_doc
        (self.dir / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        load_manifest(self.dir)  # never publish a bundle whose manifest does not validate
        self.manifest = doc
        return doc
