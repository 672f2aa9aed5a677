"""`dualstylegan` bundles in the torch-free server (DualStyleGAN: Yang et al., "Pastiche Master: Exemplar-Based
High-Resolution Portrait Style Transfer", CVPR 2022): mapping.onnx, the dualstyle synthesis graph (content ws +
extrinsic code + per-layer weights -> image), the style library (styles.npz) and an optional encoder.onnx.

Conventions of the official scripts: intrinsic (content) codes are truncated towards 0 (ws = psi * w), extrinsic
codes are never truncated, a style id is the position in the exstyle code file, and --preserve_color replaces the
extrinsic colour latents (res_index + 1 ..) by the content's untruncated ones.

Rows of the synthesis batcher carry their own style: one float32 row [num_ws, 2 * w_dim + 1] packs
(ws, exstyle_w, weights) (`pack`), so requests with different styles and weights share batches.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protos.manifest import GOLDEN_NAME

from .backends import OrtGraph, OrtMapping, SystemProbe, ort_available_providers
from .batcher import BatchItem, DynamicBatcher
from .config import BatchConfig
from .errors import InvalidArgument, ServingError
from .logs import log
from .models import (MAPPING_TOLERANCE, BundleRefused, LatentModel, check_bundle_files, check_u8_golden)

logger = logging.getLogger("serving.dualstyle")

WEIGHT_RANGE = (-2.0, 2.0)  # accepted per-layer extrinsic weights (the official range of use is [0, 1])


@dataclass(frozen=True)
class StyleRequest:
    """A parsed, validated DualStyleOptions: exactly one source of the extrinsic code, the weights and
    preserve_color. Resolve it with `DualStyleGANModel.resolve_style` (an image needs encoding first)."""

    style_id: int | None = None              # a library style (name already resolved to its id)
    image: bytes | None = None               # an exemplar photo to align and encode
    exstyle_z: np.ndarray | None = None      # [1, num_ws, z_dim], mapped by the model
    exstyle_w: np.ndarray | None = None      # [1, num_ws, w_dim]
    weights: np.ndarray | None = None        # [num_ws] float32; None = the model's default_weights
    preserve_color: bool = False


@dataclass(frozen=True)
class Style:
    """A resolved extrinsic style: exstyle_w [1, num_ws, w_dim] float32 (untruncated), weights [num_ws] float32."""

    exstyle_w: np.ndarray
    weights: np.ndarray
    preserve_color: bool = False
    style_id: int | None = None


class OrtDualStyleSynthesis:
    """Packed rows [N, num_ws, 2 * w_dim + 1] -> img_u8 [N, R, R, 3] through the dualstyle synthesis.onnx
    (inputs ws, exstyle_w [N, num_ws, w_dim], weights [N, num_ws]; output img_u8)."""

    kind = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: Path, providers: list[str], w_dim: int, threads: int = 0):
        self.graph = OrtGraph(path, providers, threads)
        if sorted(self.graph.input_names) != ["exstyle_w", "weights", "ws"] or "img_u8" not in self.graph.output_names:
            raise ValueError(f"{path.name}: a dualstyle synthesis graph maps ws, exstyle_w, weights to img_u8")
        self.w_dim = w_dim
        self.name = f"onnxruntime:{self.graph.providers[0]}"

    def run(self, ws: np.ndarray, exstyle_w: np.ndarray, weights: np.ndarray) -> np.ndarray:
        feeds = {"ws": np.ascontiguousarray(ws, np.float32), "exstyle_w": np.ascontiguousarray(exstyle_w, np.float32),
                 "weights": np.ascontiguousarray(weights, np.float32)}
        return self.graph.run(["img_u8"], feeds)[0]

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        d = self.w_dim
        return self.run(rows[:, :, :d], rows[:, :, d: 2 * d], rows[:, :, 2 * d])

    def close(self) -> None:
        self.graph = None  # type: ignore[assignment]


class DualStyleGANModel(LatentModel):
    """A dualstylegan bundle: LatentModel (mapping, truncation towards 0, optional encoder) + the style library and
    the batched dualstyle synthesis.

    Front ends: `parse_style` / `resolve_style` turn request options into a Style; `await synthesize(ws, style,
    content_ws, deadline)` -> img_u8; `render_faces` is the photo path's last step (see serving.photo).
    """

    kind = "dualstylegan"

    def __init__(self, name: str, version: str, path: Path, manifest: dict, mapping: OrtMapping,
                 synthesis: OrtDualStyleSynthesis, batch: BatchConfig, exstyle_w: np.ndarray, names: list[str],
                 encoder=None):
        super().__init__(name, version, path, manifest, mapping, batch, encoder)
        m = manifest["model"]
        self.res_index = int(m["res_index"])
        self.default_weights = np.asarray(m["default_weights"], dtype=np.float32)
        self.trunc_origin = np.zeros(self.w_dim, dtype=np.float32)  # ws = psi * w
        self.exstyle_w = exstyle_w  # [S, num_ws, w_dim] float32
        self.style_names = names
        self.style_ids = {n: i for i, n in enumerate(names)}
        self.synthesis = synthesis
        self.backend_name = synthesis.name
        self.precision = "fp32"
        self.max_batch = batch.max_batch
        self.batcher: DynamicBatcher | None = None

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(style_count=len(self.style_names), res_index=self.res_index,
                 default_weights=[float(v) for v in self.default_weights])
        return d

    # -- loading (blocking; runs in a loader thread) ----------------------------------------------------------

    @classmethod
    def load(cls, path: Path, manifest: dict, version: str, *, backend: str = "auto", threads: int = 0,
             batch: BatchConfig | None = None, golden_check: bool = True,
             probe: SystemProbe | None = None) -> "DualStyleGANModel":
        problems = check_bundle_files(path, manifest)
        if problems:
            raise BundleRefused("; ".join(problems))
        if backend == "tensorrt":
            raise BundleRefused("dualstylegan bundles have no TensorRT engines; serve them with onnxruntime or auto")
        m, graphs, table = manifest["model"], manifest["graphs"], manifest["styles"]
        try:
            with np.load(path / table["file"], allow_pickle=False) as f:
                exstyle_w = np.ascontiguousarray(f["exstyle_w"], dtype=np.float32)
                names = [str(n) for n in f["names"]]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleRefused(f"{table['file']} unreadable: {exc}") from exc
        if exstyle_w.shape != (table["count"], m["num_ws"], m["w_dim"]) or not np.isfinite(exstyle_w).all():
            raise BundleRefused(f"{table['file']}: exstyle_w {list(exstyle_w.shape)} is not {table['count']} finite "
                                f"codes of [{m['num_ws']}, {m['w_dim']}]")
        if names != list(table["names"]):
            raise BundleRefused(f"{table['file']}: style names differ from the manifest's style table")
        providers = [p for p in ("CUDAExecutionProvider",) if p in ort_available_providers()]
        try:
            mapping = OrtMapping(path / graphs["mapping"]["file"], threads)
            synthesis = OrtDualStyleSynthesis(path / graphs["synthesis"]["file"], providers + ["CPUExecutionProvider"],
                                              int(m["w_dim"]), threads)
            encoder = cls.load_encoder(path, manifest, threads)
        except Exception as exc:  # ORT refuses a graph, wrong graph signature, ...
            raise BundleRefused(f"cannot load graphs: {exc}") from exc
        model = cls(manifest["name"], version, path, manifest, mapping, synthesis, batch or BatchConfig(), exstyle_w,
                    names, encoder)
        if golden_check:
            model.check_golden()
        if encoder is not None or model.latent_space:
            model.warm_face_models()
        return model

    def check_golden(self) -> None:
        """golden.npz through mapping (w; ws = psi * w in numpy), the style library (the golden rows' codes are
        library rows) and the synthesis (img_u8), plus the encoder; BundleRefused outside the tolerances."""
        gold = self.manifest.get("golden")
        if not gold:
            raise BundleRefused("the manifest lists no golden outputs (golden.npz); refusing an unchecked bundle")
        keys = ("z", "psi", "w", "ws", "style_ids", "exstyle_w", "weights", "img_u8")
        try:
            with np.load(self.path / gold.get("file", GOLDEN_NAME), allow_pickle=False) as g:
                ref = {k: g[k] for k in keys}
        except (OSError, KeyError, ValueError) as exc:
            raise BundleRefused(f"golden.npz unreadable: {exc}") from exc
        w = self.mapping(ref["z"].astype(np.float32))
        err_w = float(np.abs(w - ref["w"]).max())
        ws = np.concatenate([self.to_ws(w[i: i + 1], float(p)) for i, p in enumerate(ref["psi"])])
        err_ws = float(np.abs(ws - ref["ws"]).max())
        if not (err_w <= MAPPING_TOLERANCE and err_ws <= MAPPING_TOLERANCE):
            raise BundleRefused(f"golden check failed: mapping max |w - golden| = {err_w:.3g}, "
                                f"|psi * w - golden ws| = {err_ws:.3g} (tolerance {MAPPING_TOLERANCE})")
        ids = ref["style_ids"]
        if (ids.ndim != 1 or ids.min() < 0 or ids.max() >= len(self.style_names)
                or not np.array_equal(self.exstyle_w[ids], ref["exstyle_w"])):
            raise BundleRefused("golden check failed: the golden rows' extrinsic codes are not the library's styles")
        img = self.synthesis.run(ref["ws"], ref["exstyle_w"], ref["weights"])
        max_diff, frac = check_u8_golden(img, ref["img_u8"], self.precision)
        err_enc = self._check_golden_encoder() if self.encoder is not None else None
        log(logger, logging.INFO, "golden check passed", model=self.name, version=self.version,
            mapping_max_abs=err_w, synthesis_max_diff=max_diff, synthesis_frac_diff=frac, encoder_max_abs=err_enc,
            styles=len(self.style_names))

    # -- styles -----------------------------------------------------------------------------------------------

    def style_id(self, spec: int | str) -> int:
        """A library id (int) or name (str) -> id; InvalidArgument when unknown."""
        if isinstance(spec, str):
            if spec not in self.style_ids:
                raise InvalidArgument(f"unknown style name {spec!r} for model {self.name!r} (see ListStyles)")
            return self.style_ids[spec]
        if not 0 <= int(spec) < len(self.style_names):
            raise InvalidArgument(f"unknown style id {spec} for model {self.name!r}: it has "
                                  f"{len(self.style_names)} styles (ids 0..{len(self.style_names) - 1})")
        return int(spec)

    def check_weights(self, values: Sequence[float] | np.ndarray | None, what: str = "weights") -> np.ndarray | None:
        """num_ws finite weights in WEIGHT_RANGE -> float32 [num_ws] (None / empty -> None = default)."""
        if values is None or len(values) == 0:
            return None
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape[0] != self.num_ws:
            raise InvalidArgument(f"{what}: {arr.shape[0]} values; model {self.name!r} needs {self.num_ws} (one per "
                                  f"layer; layers 0..{self.res_index} are structure layers)")
        lo, hi = WEIGHT_RANGE
        if not np.isfinite(arr).all() or arr.min() < lo or arr.max() > hi:
            raise InvalidArgument(f"{what}: every weight must be a finite number in [{lo}, {hi}]")
        return arr.astype(np.float32)

    def check_code(self, arr: np.ndarray, dim: int, what: str) -> np.ndarray:
        if arr.shape != (1, self.num_ws, dim):
            raise InvalidArgument(f"{what}: shape {list(arr.shape)}, expected [1, {self.num_ws}, {dim}]")
        return np.ascontiguousarray(arr, dtype=np.float32)

    async def resolve_style(self, req: StyleRequest | None, exemplar_ws: np.ndarray | None = None) -> Style:
        """The extrinsic code of a StyleRequest (None = style 0 with the default weights).

        Args:
            exemplar_ws: the encoded exemplar [1, num_ws, w_dim] when req.image was given (serving.photo).
        """
        req = req or StyleRequest()
        weights = self.default_weights if req.weights is None else req.weights
        style_id = None
        if req.image is not None:
            if exemplar_ws is None:
                raise ServingError("internal: the exemplar style image was not encoded")
            ex = self.check_code(exemplar_ws, self.w_dim, "style_image")
        elif req.exstyle_w is not None:
            ex = req.exstyle_w
        elif req.exstyle_z is not None:
            loop = asyncio.get_running_loop()
            z = req.exstyle_z.reshape(self.num_ws, self.z_dim)
            ex = (await loop.run_in_executor(self.executor, self.mapping, z)).reshape(1, self.num_ws, self.w_dim)
        else:
            style_id = 0 if req.style_id is None else req.style_id
            ex = self.exstyle_w[style_id: style_id + 1]
        return Style(np.ascontiguousarray(ex, np.float32), weights, req.preserve_color, style_id)

    # -- synthesis --------------------------------------------------------------------------------------------

    def pack(self, ws: np.ndarray, exstyle_w: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Batcher rows [N, num_ws, 2 * w_dim + 1] from ws [N, num_ws, w_dim], exstyle_w [1 or N, num_ws, w_dim] and
        weights [num_ws] or [1 or N, num_ws]."""
        ws = self._check_ws(ws)
        n = ws.shape[0]
        ex = np.broadcast_to(np.asarray(exstyle_w, np.float32), (n, self.num_ws, self.w_dim))
        wt = np.broadcast_to(np.asarray(weights, np.float32).reshape(-1, self.num_ws), (n, self.num_ws))
        return np.concatenate([ws, ex, wt[:, :, None]], axis=2)

    def style_rows(self, ws: np.ndarray, style: Style, content_ws: np.ndarray | None = None) -> np.ndarray:
        """Packed rows for truncated ws [N, num_ws, w_dim] in one style; preserve_color takes the colour latents of
        the extrinsic code from content_ws (the untruncated content codes, required then)."""
        ex = style.exstyle_w
        if style.preserve_color:
            if content_ws is None:
                raise ServingError("internal: preserve_color needs the untruncated content codes")
            ex = preserve_colour(ex, content_ws, self.res_index)
        return self.pack(ws, ex, style.weights)

    async def synthesize_rows(self, rows: np.ndarray, deadline: float | None = None,
                              stats: dict[str, float] | None = None) -> np.ndarray:
        """Packed rows -> img_u8 [N, R, R, 3] through the dynamic batcher (deadline / stats as StyleGAN2Model)."""
        assert self.batcher is not None, "model not started"
        out, queue_s = await self.batcher.submit(rows, deadline)
        if stats is not None:
            stats["queue_s"] = queue_s
        return out

    async def synthesize(self, ws: np.ndarray, style: Style, content_ws: np.ndarray | None = None,
                         deadline: float | None = None, stats: dict[str, float] | None = None) -> np.ndarray:
        """Truncated ws [N, num_ws, w_dim] in one style -> img_u8 [N, R, R, 3]."""
        return await self.synthesize_rows(self.style_rows(ws, style, content_ws), deadline, stats)

    def enqueue_rows(self, rows: np.ndarray, deadline: float | None = None) -> list[BatchItem]:
        """Queue packed rows without waiting (streams): await each item's future, cancel it to drop the row."""
        assert self.batcher is not None, "model not started"
        return self.batcher.enqueue(rows, deadline)

    async def render_faces(self, ws: np.ndarray, psi: float | None, deadline: float | None,
                           stats: dict[str, float], style: StyleRequest | None = None,
                           exemplar_ws: np.ndarray | None = None) -> np.ndarray:
        """Encoded faces ws [F, num_ws, w_dim] (untruncated) -> crops img_u8 [F, R, R, 3]: psi (None = default_psi)
        towards 0, the requested style (preserve_color from the untruncated codes), the batched synthesis."""
        resolved = await self.resolve_style(style, exemplar_ws)
        return await self.synthesize(self.to_ws(ws, psi), resolved, ws, deadline, stats)

    async def close(self) -> None:
        await self._close_runners([self.batcher, self.encoder_batcher], [self.synthesis, self.mapping, self.encoder])


def preserve_colour(exstyle_w: np.ndarray, content_ws: np.ndarray, res_index: int) -> np.ndarray:
    """The official --preserve_color in W+: exstyle_w [1 or N, num_ws, w_dim] with its colour latents
    (res_index + 1 ..) replaced by content_ws [N, num_ws, w_dim]'s -> [N, num_ws, w_dim]. (The official code swaps
    z+ rows before the mapping; the mapping works row by row, so swapping the mapped rows is the same.)"""
    n = content_ws.shape[0]
    out = np.array(np.broadcast_to(exstyle_w, (n,) + exstyle_w.shape[1:]), dtype=np.float32)
    out[:, res_index + 1:] = content_ws[:, res_index + 1:]
    return out


def parse_weights(text: str, what: str = "weights") -> list[float]:
    """'0.75,0.75,1' (KServe parameter / CLI) -> floats; InvalidArgument on anything else."""
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise InvalidArgument(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise InvalidArgument(f"{what}: every weight must be finite")
    return vals
