"""Render from a bundle in-process, without a server: exactly the server's pipeline (ONNX Runtime mapping, numpy
truncation, synthesis, the same encoder), so the bytes equal what Generate / Stylize return for the same settings.

`BundleRenderer` (seeds of a stylegan2 bundle) is used by `stylecast generate` when --checkpoint is a bundle
directory and by the server-overhead benchmark; `BundleStylizer` (aligned face photos through a dualstylegan or
stylegan2 bundle with an encoder) and `BundleStyleTransfer` on top of it (the style library of a dualstylegan bundle)
by `stylecast stylize` when --model is a bundle directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from protos.manifest import MANIFEST_NAME, ManifestError, load_manifest

from . import codecs
from . import latents as L
from .kinds import load_model
from .latent_model import LatentModel
from .models import StyleOptions


class BundleRenderer:
    """A loaded, golden-checked stylegan2 bundle with blocking `render_u8` / `render` calls."""

    def __init__(self, bundle: str | Path, threads: int = 0, backend: str = "onnxruntime",
                 golden_check: bool = True):
        bundle = Path(bundle)
        manifest = load_manifest(bundle)
        if manifest["kind"] != "stylegan2":
            raise ValueError(f"{bundle}: a {manifest['kind']!r} bundle, not a stylegan2 generator")
        self.model = load_model(bundle, manifest, bundle_version(bundle), backend=backend, threads=threads,
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


def bundle_version(bundle: Path) -> str:
    """The version the server gives a bundle: the first 12 hex digits of its manifest's sha256."""
    return hashlib.sha256((Path(bundle) / MANIFEST_NAME).read_bytes()).hexdigest()[:12]


def _load(bundle: Path, threads: int, golden_check: bool) -> LatentModel:
    manifest = load_manifest(bundle)
    model = load_model(bundle, manifest, bundle_version(bundle), backend="onnxruntime", threads=threads,
                       golden_check=golden_check)
    if not model.generates:
        raise ValueError(f"{bundle}: a {manifest['kind']!r} bundle, not a generator of faces (stylegan2, "
                         "dualstylegan)")
    return model


def find_encoder_bundle(bundle: Path, latent_space: str, preferred: str | None = None) -> Path | None:
    """A bundle next to `bundle` (in the same model repository) whose encoder serves `latent_space`, as the server
    would choose it: the one named `preferred` (the manifest's encoder_from) if it qualifies, else the first by
    directory name; None when there is none. Unreadable neighbours are skipped."""
    found: list[tuple[str, Path]] = []
    for d in sorted(bundle.resolve().parent.iterdir()):
        if d.name.startswith(".") or not d.is_dir() or d.resolve() == bundle.resolve():
            continue
        try:
            m = load_manifest(d)
        except (ManifestError, OSError, ValueError):
            continue
        if "encoder" in m.get("graphs", {}) and m.get("model", {}).get("latent_space") == latent_space:
            found.append((m["name"], d))
    for name, d in found:
        if name == preferred:
            return d
    return found[0][1] if found else None


class BundleStylizer:
    """A golden-checked stylegan2 / dualstylegan bundle and the encoder serving it (its own encoder.onnx, or that of
    `encoder_bundle`, which must declare the same latent space), run through the server's photo-path steps (encoder
    batcher, `render_faces`, `serving.photo.composite`) on a private event loop. Blocking calls; close() when done.
    """

    def __init__(self, bundle: str | Path, encoder_bundle: str | Path | None = None, threads: int = 0,
                 golden_check: bool = True):
        import asyncio

        self.model = _load(Path(bundle), threads, golden_check)
        self.encoder_model = self.model
        if encoder_bundle is None and self.model.encoder is None and self.model.latent_space:
            encoder_bundle = find_encoder_bundle(Path(bundle), self.model.latent_space,
                                                 self.model.manifest["model"].get("encoder_from"))
        if encoder_bundle is not None:
            enc = _load(Path(encoder_bundle), threads, golden_check)
            self.encoder_model = enc
            if enc.encoder is None:
                raise ValueError(f"{encoder_bundle}: the bundle has no encoder")
            if (enc.latent_space != self.model.latent_space or not self.model.latent_space
                    or (enc.num_ws, enc.w_dim) != (self.model.num_ws, self.model.w_dim)):
                raise ValueError(f"{encoder_bundle}: its encoder serves latent space {enc.latent_space!r}, the model "
                                 f"{Path(bundle)} takes {self.model.latent_space or '(none declared)'!r}")
        elif self.model.encoder is None:
            raise ValueError(f"{bundle}: the bundle has no encoder.onnx and no bundle next to it serves its latent "
                             f"space {self.model.latent_space!r}; give one with an encoder for that space"
                             if self.model.latent_space else
                             f"{bundle}: the bundle has no encoder.onnx and declares no latent space")
        self.loop = asyncio.new_event_loop()
        self.run(self.model.start(None, None))
        if self.encoder_model is not self.model:
            self.run(self.encoder_model.start(None, None))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @property
    def encoder_size(self) -> int:
        """Side of the aligned crops the encoder takes."""
        return self.encoder_model.encoder_size

    def encode(self, aligned_u8: np.ndarray) -> np.ndarray:
        """Aligned faces img_u8 [F, S, S, 3] -> untruncated ws [F, num_ws, w_dim]."""
        return self.run(self.encoder_model.encode(np.ascontiguousarray(aligned_u8)))

    def stylize(self, photo_u8: np.ndarray, aligned: list, psi: float | None = None, style=None,
                exemplar_ws: np.ndarray | None = None, composite: str = "paste",
                feather: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
        """Aligned faces of a photo (common.faces.AlignedFace at encoder_size) -> (the photo with the stylized
        faces pasted back, or the first crop; every crop [F, R, R, 3]).

        Args:
            psi: None = the bundle's rule (stylegan2: none; dualstylegan: default_psi towards 0).
            style: a serving.dualstyle_model.StyleRequest (dualstylegan bundles; None = style 0, default weights).
            exemplar_ws: the encoded exemplar [1, num_ws, w_dim] when style.image is set.
        """
        from . import photo

        ws = self.encode(np.stack([a.img_u8 for a in aligned]))
        crops = self.run(self.model.render_faces(ws, psi, None, {}, style=style, exemplar_ws=exemplar_ws))
        if composite == "crop":
            return crops[0], crops
        req = photo.FaceRequest(composite="paste", feather=feather)
        return photo.composite(photo_u8, aligned, crops, req), crops

    def close(self) -> None:
        for m in {id(self.model): self.model, id(self.encoder_model): self.encoder_model}.values():
            self.run(m.close())
        self.loop.close()


class BundleStyleTransfer:
    """`stylecast stylize` on a bundle with a style library (dualstylegan): the library, the encoder and the
    rendering of BundleStylizer, torch-free, so the images equal what `stylecast serve` returns for the same request.

    The same interface as training.dualstyle.stylize.CheckpointStyleTransfer (the PyTorch path): names, num_ws,
    res_index, default_weights, default_psi, encoder_size, `encode`, `render`, `close`.
    """

    mode = "bundle"

    def __init__(self, bundle: str | Path, encoder_bundle: str | Path | None = None):
        self.stylizer = BundleStylizer(bundle, encoder_bundle=encoder_bundle)
        model = self.stylizer.model
        lib = model.style_library()
        if lib is None:
            self.stylizer.close()
            raise ValueError(f"{bundle}: a {model.kind!r} bundle, which has no style library; stylecast stylize "
                             "needs a dualstylegan bundle")
        self.model = model
        self.names = list(lib.names)
        self.num_ws, self.res_index = lib.num_ws, lib.res_index
        self.default_weights = list(lib.default_weights)
        self.default_psi = model.default_psi
        self.encoder_size = self.stylizer.encoder_size

    def encode(self, aligned_u8: np.ndarray) -> np.ndarray:
        """Aligned faces img_u8 [F, S, S, 3] -> untruncated W+ ws [F, num_ws, w_dim]."""
        return self.stylizer.encode(aligned_u8)

    def render(self, photo_u8: np.ndarray, aligned: list, psi: float, style_id: int | None,
               exemplar_ws: np.ndarray | None, weights: list[float], preserve_color: bool, composite: str,
               feather: float) -> tuple[np.ndarray, np.ndarray]:
        """The faces of one photo in a library style (or the encoded exemplar [1, num_ws, w_dim]) -> (the photo
        with the stylized faces pasted back, or the first crop; every crop [F, R, R, 3])."""
        ex = None if exemplar_ws is None else (tuple(exemplar_ws.shape), exemplar_ws.reshape(-1))
        opts = StyleOptions(style_id=style_id if exemplar_ws is None else None, exstyle_w=ex, weights=list(weights),
                            preserve_color=preserve_color, where="style")
        req = self.model.parse_style(opts, None)
        return self.stylizer.stylize(photo_u8, aligned, psi, req, composite=composite, feather=feather)

    def close(self) -> None:
        self.stylizer.close()
