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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import golden as G
from . import latents as L
from . import photo
from .backends import OrtGraph, OrtMapping, SystemProbe
from .config import BatchConfig
from .errors import BundleRefused, InvalidArgument, ServingError
from .latent_model import STYLIZE, SYNTHESIS, LatentModel
from .models import RequestContext, StyleLibrary, StyleOptions
from .tensors import ParamSpec, TensorSpec

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

    @staticmethod
    def _feeds(ws: np.ndarray, exstyle_w: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {"ws": np.ascontiguousarray(ws, np.float32), "exstyle_w": np.ascontiguousarray(exstyle_w, np.float32),
                "weights": np.ascontiguousarray(weights, np.float32)}

    def run(self, ws: np.ndarray, exstyle_w: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """ws, exstyle_w [N, num_ws, w_dim], weights [N, num_ws] -> img_u8 [N, R, R, 3]."""
        return self.graph.run(["img_u8"], self._feeds(ws, exstyle_w, weights))[0]

    def run_all(self, ws: np.ndarray, exstyle_w: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph by name (img_u8, and img when the graph has it)."""
        return dict(zip(self.graph.output_names, self.graph.run(None, self._feeds(ws, exstyle_w, weights))))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        d = self.w_dim
        return self.run(rows[:, :, :d], rows[:, :, d: 2 * d], rows[:, :, 2 * d])

    def close(self) -> None:
        self.graph = None  # type: ignore[assignment]


class DualStyleGANModel(LatentModel):
    """A dualstylegan bundle: LatentModel (mapping, truncation towards 0, optional encoder) + the style library and
    the batched dualstyle synthesis.

    Style requests: `parse_style(StyleOptions)` -> StyleRequest (checked before any work), `await resolve_style(req,
    ctx)` -> Style (an exemplar image encoded); `synthesize(ws, style=, content_ws=)` / `enqueue` pack each row with
    its own style, so requests with different styles and weights share batches.
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

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(style_count=len(self.style_names), res_index=self.res_index,
                 default_weights=[float(v) for v in self.default_weights])
        return d

    # -- loading (blocking; runs in a loader thread) ----------------------------------------------------------

    @classmethod
    def _open(cls, path: Path, manifest: dict, version: str, *, backend: str, threads: int, batch: BatchConfig,
              probe: SystemProbe | None, providers: list[str] | None) -> "DualStyleGANModel":
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
        mapping = OrtMapping(path / graphs["mapping"]["file"], threads)
        synthesis = OrtDualStyleSynthesis(path / graphs["synthesis"]["file"], cls.ort_providers(providers),
                                          int(m["w_dim"]), threads)
        encoder = cls.load_encoder(path, manifest, threads, providers)
        return cls(manifest["name"], version, path, manifest, mapping, synthesis, batch, exstyle_w, names, encoder)

    # -- golden checks ----------------------------------------------------------------------------------------

    def golden_checks(self, thorough: bool = False) -> list[G.Check]:
        """Mapping (w; ws = psi * w by the server's numpy truncation), the style library (the golden rows' codes are
        library rows; thorough: mapping.onnx on the library's z_plus reproduces its exstyle_w), the synthesis (img_u8;
        thorough: img too), the encoder."""
        gold = G.Golden(self.path, self.manifest)
        checks = self.mapping_checks(gold)
        ids = gold["style_ids"]
        if (ids.ndim != 1 or ids.min() < 0 or ids.max() >= len(self.style_names)
                or not np.array_equal(self.exstyle_w[ids], gold["exstyle_w"])):
            checks.append(G.Check("styles", "style_ids", math.nan, math.nan, False,
                                  f"{self.manifest['styles']['file']}: the golden rows' extrinsic codes are not the "
                                  f"library's styles {list(ids)}"))
        if thorough:
            checks += self.library_checks(gold)
        outs = self.synthesis.run_all(gold["ws"], gold["exstyle_w"], gold["weights"])
        for out_name, val in outs.items():
            if out_name in gold and (thorough or out_name == "img_u8"):
                checks.append(G.image("synthesis", out_name, val, gold[out_name], self.precision, gold.tolerance))
        return checks + self.encoder_checks(gold)

    def library_checks(self, gold: G.Golden) -> list[G.Check]:
        """styles.npz: its extrinsic codes are mapping.onnx of its z_plus codes, row by row (untruncated)."""
        table = self.manifest["styles"]
        try:
            with np.load(self.path / table["file"], allow_pickle=False) as f:
                z_plus = np.asarray(f["z_plus"], np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleRefused(f"{table['file']} unreadable: {exc}") from exc
        if z_plus.shape != (len(self.style_names), self.num_ws, self.z_dim):
            return [G.Check("styles", "z_plus", math.nan, math.nan, False,
                            f"{table['file']}: z_plus {list(z_plus.shape)} is not {len(self.style_names)} codes of "
                            f"[{self.num_ws}, {self.z_dim}]")]
        w = self.mapping(z_plus.reshape(-1, self.z_dim)).reshape(self.exstyle_w.shape)
        return [G.close("styles", "exstyle_w", w, self.exstyle_w, gold.tolerance["max_abs_fp32"],
                        "mapping.onnx(z_plus)")]

    # -- styles -----------------------------------------------------------------------------------------------

    def style_library(self) -> StyleLibrary:
        return StyleLibrary(list(self.style_names), [float(v) for v in self.default_weights], self.num_ws,
                            self.res_index)

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

    def parse_style(self, opts: StyleOptions | None, ctx: RequestContext | None) -> StyleRequest:
        """Style options -> a validated StyleRequest (None = style 0 with the default weights). An exemplar image
        needs an encoder for the model (FAILED_PRECONDITION otherwise), checked here, before any work."""
        if opts is None:
            return StyleRequest()
        kw: dict[str, Any] = {}
        if opts.style_id is not None:
            kw["style_id"] = self.style_id(int(opts.style_id))
        elif opts.style_name is not None:
            kw["style_id"] = self.style_id(opts.style_name)
        elif opts.image is not None:
            if not opts.image:
                raise InvalidArgument(f"{opts.what('style_image')}: empty; send PNG, JPEG or WebP bytes")
            if ctx is not None:
                ctx.repo.encoder_for(self).release()
            kw["image"] = bytes(opts.image)
        for key, dim in (("exstyle_z", self.z_dim), ("exstyle_w", self.w_dim)):
            given = getattr(opts, key)
            if given is not None:
                shape, values = given
                arr = L.tensor(shape, values, opts.what(key), (None, self.num_ws, dim), 1)
                kw[key] = self.check_code(arr, dim, opts.what(key))
        weights = self.check_weights(opts.weights, opts.what("weights"))
        return StyleRequest(weights=weights, preserve_color=bool(opts.preserve_color), **kw)

    @staticmethod
    def library_id(style: StyleRequest | None) -> int | None:
        if style is None or style.image is not None or style.exstyle_z is not None or style.exstyle_w is not None:
            return None
        return style.style_id or 0

    async def resolve_style(self, req: StyleRequest | None, ctx: RequestContext | None = None,
                            exemplar_ws: np.ndarray | None = None) -> Style:
        """The extrinsic code of a StyleRequest (None = style 0 with the default weights).

        Args:
            ctx: encodes req.image (FFHQ-aligned, through the encoder serving this model's latent space).
            exemplar_ws: the already encoded exemplar [1, num_ws, w_dim] instead (serving.photo, serving.offline).
        """
        req = req or StyleRequest()
        weights = self.default_weights if req.weights is None else req.weights
        style_id = None
        if req.image is not None:
            if exemplar_ws is None:
                if ctx is None:
                    raise ServingError("internal: the exemplar style image was not encoded")
                with ctx.repo.encoder_for(self) as enc:
                    exemplar_ws = await photo.encode_style_image(enc, req.image,
                                                                 max_photo_size=ctx.limits.max_photo_size,
                                                                 pool=ctx.pool, deadline=ctx.deadline)
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

    def _rows(self, ws: np.ndarray, style: Style | None, content_ws: np.ndarray | None) -> np.ndarray:
        """Packed rows for truncated ws [N, num_ws, w_dim] in one style (None = style 0, default weights);
        preserve_color takes the colour latents of the extrinsic code from content_ws (the untruncated content codes,
        required then)."""
        if style is None:
            style = Style(self.exstyle_w[:1], self.default_weights, False, 0)
        ex = style.exstyle_w
        if style.preserve_color:
            if content_ws is None:
                raise ServingError("internal: preserve_color needs the untruncated content codes")
            ex = preserve_colour(ex, content_ws, self.res_index)
        return self.pack(ws, ex, style.weights)

    def _run_synthesis(self, rows: np.ndarray) -> np.ndarray:
        return self.synthesis(rows)

    def _runners(self) -> list:
        return [self.synthesis, *super()._runners()]

    async def render_faces(self, ws: np.ndarray, psi: float | None, deadline: float | None,
                           stats: dict[str, float], style: StyleRequest | None = None,
                           exemplar_ws: np.ndarray | None = None) -> np.ndarray:
        """Encoded faces ws [F, num_ws, w_dim] (untruncated) -> crops img_u8 [F, R, R, 3]: psi (None = default_psi)
        towards 0, the requested style (preserve_color from the untruncated codes), the batched synthesis."""
        resolved = await self.resolve_style(style, exemplar_ws=exemplar_ws)
        return await self.synthesize(self.to_ws(ws, psi), deadline, stats, style=resolved, content_ws=ws)

    # -- inference endpoints ----------------------------------------------------------------------------------

    def extra_inputs(self, suffix: str) -> tuple[TensorSpec, ...]:
        n, d = self.num_ws, self.w_dim
        if suffix == "":
            return (TensorSpec("STYLE_ID", "INT64", (-1, 1), optional=True, description="library style, 1 or N rows "
                               "(default 0)"),
                    TensorSpec("WEIGHTS", "FP32", (-1, n), optional=True, description="per-layer weights, 1 or N "
                               "rows (default the bundle's)"))
        if suffix == SYNTHESIS:
            return (TensorSpec("EXSTYLE_W", "FP32", (-1, n, d)), TensorSpec("WEIGHTS", "FP32", (-1, n)))
        return ()

    def extra_params(self, suffix: str) -> tuple[ParamSpec, ...]:
        if suffix != STYLIZE:
            return ()
        return (ParamSpec("style_id", "int64|string", "a library style by id or name (default 0)"),
                ParamSpec("weights", "string", "per-layer weights 'w0,w1,...' (default the bundle's)"),
                ParamSpec("preserve_color", "bool", "keep the content's colours"))

    def infer_rows(self, suffix: str, ws: np.ndarray, x: dict[str, np.ndarray]) -> np.ndarray:
        """`.synthesis` takes WS, EXSTYLE_W, WEIGHTS as they are (N rows each); `<name>` looks STYLE_ID up in the
        library, WEIGHTS defaulting to the bundle's (1 or N rows each)."""
        n = len(ws)
        if suffix == SYNTHESIS:
            if len(x["EXSTYLE_W"]) != n or len(x["WEIGHTS"]) != n:
                raise InvalidArgument(f"inputs 'WS', 'EXSTYLE_W' and 'WEIGHTS' need the same number of rows "
                                      f"({n}, {len(x['EXSTYLE_W'])}, {len(x['WEIGHTS'])})")
            return self.pack(ws, x["EXSTYLE_W"], x["WEIGHTS"])
        ids = x["STYLE_ID"][:, 0] if "STYLE_ID" in x else np.zeros(1, np.int64)
        weights = x["WEIGHTS"] if "WEIGHTS" in x else self.default_weights[None]
        for name, rows in (("STYLE_ID", ids), ("WEIGHTS", weights)):
            if len(rows) not in (1, n):
                raise InvalidArgument(f"input {name!r}: {len(rows)} rows for {n} latents (give 1 or {n})")
        ex = self.exstyle_w[[self.style_id(int(i)) for i in ids]]
        for row in weights:
            self.check_weights(row, "input 'WEIGHTS'")
        return self.pack(ws, ex, weights)


def preserve_colour(exstyle_w: np.ndarray, content_ws: np.ndarray, res_index: int) -> np.ndarray:
    """The official --preserve_color in W+: exstyle_w [1 or N, num_ws, w_dim] with its colour latents
    (res_index + 1 ..) replaced by content_ws [N, num_ws, w_dim]'s -> [N, num_ws, w_dim]. (The official code swaps
    z+ rows before the mapping; the mapping works row by row, so swapping the mapped rows is the same.)"""
    n = content_ws.shape[0]
    out = np.array(np.broadcast_to(exstyle_w, (n,) + exstyle_w.shape[1:]), dtype=np.float32)
    out[:, res_index + 1:] = content_ws[:, res_index + 1:]
    return out
