"""Render seeds from a bundle in-process, without a server: exactly the server's pipeline (ONNX Runtime mapping,
numpy truncation, synthesis, the same encoder), so the bytes equal what Generate returns for the same settings.

Used by `stylecast generate` when --checkpoint is a bundle directory, and by the server-overhead benchmark.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from protos.manifest import MANIFEST_NAME, load_manifest

from . import codecs
from . import latents as L
from .models import StyleGAN2Model


class BundleRenderer:
    """A loaded, golden-checked stylegan2 bundle with blocking `render_u8` / `render` calls."""

    def __init__(self, bundle: str | Path, threads: int = 0, backend: str = "onnxruntime",
                 golden_check: bool = True):
        bundle = Path(bundle)
        manifest = load_manifest(bundle)
        if manifest["kind"] != "stylegan2":
            raise ValueError(f"{bundle}: a {manifest['kind']!r} bundle, not a stylegan2 generator")
        version = hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()[:12]
        self.model = StyleGAN2Model.load(bundle, manifest, version, backend=backend, threads=threads,
                                         golden_check=golden_check)

    def render_u8(self, seeds: Sequence[int], psi: float | None = None, cutoff: int | None = None,
                  batch_size: int = 8) -> np.ndarray:
        """[len(seeds), R, R, 3] uint8 (psi None = the bundle's default_psi)."""
        m = self.model
        out = []
        for i in range(0, len(seeds), batch_size):
            z = L.seeds_to_z(list(seeds[i: i + batch_size]), m.z_dim)
            out.append(m.synthesis(m.to_ws(m.mapping(z), psi, cutoff)))
        return np.concatenate(out, axis=0)

    def render(self, seeds: Sequence[int], psi: float | None = None, cutoff: int | None = None, fmt: str = "png",
               quality: int = 90, size: tuple[int, int] | None = None, batch_size: int = 8) -> list[bytes]:
        return [codecs.encode(img, fmt, quality, size) for img in self.render_u8(seeds, psi, cutoff, batch_size)]

    def close(self) -> None:
        self.model.synthesis.close()
        self.model.mapping.close()


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()
