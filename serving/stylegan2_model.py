"""`stylegan2` bundles in the torch-free server (StyleGAN2: Karras et al., "Analyzing and Improving the Image Quality
of StyleGAN", CVPR 2020): mapping.onnx (z -> w, run per request), the synthesis (ws -> uint8 image, dynamically
batched; ONNX Runtime or a TensorRT engine of the bundle), truncation towards w_avg, and an optional encoder.onnx
for face photos (pSp / e4e).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import golden as G
from . import latents as L
from .backends import (BackendError, OrtGraph, OrtMapping, SystemProbe, TensorRTSynthesis, create_synthesis,
                       resolve_plugins)
from .config import BatchConfig
from .errors import InvalidArgument
from .latent_model import LatentModel


class StyleGAN2Model(LatentModel):
    """A StyleGAN2 bundle: LatentModel (mapping, truncation towards w_avg, optional encoder) + the synthesis runner
    (`self.synthesis`: ws [N, num_ws, w_dim] -> img_u8 [N, R, R, 3])."""

    kind = "stylegan2"
    serves_engines = True

    def __init__(self, name: str, version: str, path: Path, manifest: dict, mapping: OrtMapping, synthesis,
                 batch: BatchConfig, encoder=None):
        super().__init__(name, version, path, manifest, mapping, batch, encoder)
        self.w_avg = np.asarray(manifest["model"]["w_avg"], dtype=np.float32)
        self.trunc_origin = self.w_avg
        self.synthesis = synthesis
        self.backend_name = synthesis.name
        self.precision = getattr(synthesis, "precision", "fp32")
        limit = getattr(synthesis, "max_batch", None)
        self.max_batch = min(batch.max_batch, limit) if limit else batch.max_batch

    @classmethod
    def _open(cls, path: Path, manifest: dict, version: str, *, backend: str, threads: int, batch: BatchConfig,
              probe: SystemProbe | None, providers: list[str] | None) -> "StyleGAN2Model":
        graphs = manifest["graphs"]
        mapping = OrtMapping(path / graphs["mapping"]["file"], threads)
        synthesis = create_synthesis(path, manifest, backend, threads, probe, providers=providers)
        encoder = cls.load_encoder(path, manifest, threads, providers)
        return cls(manifest["name"], version, path, manifest, mapping, synthesis, batch, encoder)

    # -- golden checks ----------------------------------------------------------------------------------------

    def golden_checks(self, thorough: bool = False) -> list[G.Check]:
        """Mapping (w; ws by the server's numpy truncation towards w_avg), the synthesis runner this model serves
        with (img_u8 at its precision), the encoder. Thorough: every output of the fp32 synthesis graph and the fp16
        graph in ONNX Runtime too."""
        gold = G.Golden(self.path, self.manifest)
        checks = self.mapping_checks(gold)
        checks += synthesis_checks(self.synthesis_label, self.synthesis, gold, self.precision)
        checks += self.encoder_checks(gold)
        if thorough:
            checks += self.graph_checks(gold, skip_served=True)
        return checks

    @classmethod
    def engine_checks(cls, bundle: Path, manifest: dict, entry: dict) -> list[G.Check]:
        label = f"engine.{entry.get('precision', '?')}"
        runner = None
        try:
            runner = TensorRTSynthesis(bundle / entry["file"], resolve_plugins(bundle, entry, manifest["files"]),
                                       entry["trt_flavour"], entry["precision"])
            return synthesis_checks(label, runner, G.Golden(bundle, manifest), entry["precision"])
        except (BackendError, OSError, ValueError) as exc:  # BundleRefused is a ValueError
            return [G.Check(label, "*", math.nan, math.nan, False, f"{entry['file']}: {exc}")]
        finally:
            if runner is not None:
                runner.close()

    def graph_checks(self, gold: G.Golden, skip_served: bool = False) -> list[G.Check]:
        """Every synthesis graph of the bundle (synthesis, synthesis_fp16) in ONNX Runtime, every output with golden
        values. skip_served: leave out the img_u8 of the graph this model already serves with."""
        checks = []
        for key in ("synthesis", "synthesis_fp16"):
            g = self.manifest["graphs"].get(key)
            if g is None:
                continue
            served = skip_served and key == "synthesis" and self.backend_name.startswith("onnxruntime")
            graph = OrtGraph(self.path / g["file"], self.synthesis_providers(), 0)
            outs = dict(zip(graph.output_names, graph.run(None, {"ws": gold["ws"].astype(np.float32)})))
            for out_name, val in outs.items():
                if out_name in gold and not (served and out_name == "img_u8"):
                    checks.append(G.image(key, out_name, val, gold[out_name], g.get("precision", "fp32"),
                                          gold.tolerance))
        return checks

    @property
    def synthesis_label(self) -> str:
        """How reports name the served synthesis: "synthesis" (the ONNX graph) or "engine.<precision>"."""
        return "synthesis" if self.backend_name.startswith("onnxruntime") else f"engine.{self.precision}"

    def synthesis_providers(self) -> list[str]:
        graph = getattr(self.synthesis, "graph", None)
        return list(graph.providers) if graph is not None else ["CPUExecutionProvider"]

    # -- serving ----------------------------------------------------------------------------------------------

    def _run_synthesis(self, rows: np.ndarray) -> np.ndarray:
        return self.synthesis(rows)

    def _runners(self) -> list:
        return [self.synthesis, *super()._runners()]

    def _rows(self, ws: np.ndarray, style, content_ws: np.ndarray | None) -> np.ndarray:
        if style is not None:
            raise InvalidArgument(f"model {self.name!r} is a stylegan2 model: it takes no style")
        return self._check_ws(ws)

    async def render_faces(self, ws: np.ndarray, psi: float | None, deadline: float | None,
                           stats: dict[str, float], style=None, exemplar_ws: np.ndarray | None = None) -> np.ndarray:
        """Encoded faces ws [F, num_ws, w_dim] (untruncated) -> crops img_u8 [F, R, R, 3]: psi (None = 1, none)
        pulls towards w_avg, then the batched synthesis."""
        if style is not None or exemplar_ws is not None:
            raise InvalidArgument(f"model {self.name!r} is a stylegan2 model: dualstyle options do not apply")
        if psi is not None:
            ws = L.truncate(ws, self.w_avg, psi, None)
        return await self.synthesize(ws, deadline, stats)


def synthesis_checks(label: str, runner, gold: G.Golden, precision: str) -> list[G.Check]:
    """A synthesis runner (ONNX Runtime session or TensorRT engine: ws -> img_u8) on golden ws against golden img_u8
    at the runner's precision; the golden batch is tiled or cut to the runner's batch limit."""
    ws = gold["ws"].astype(np.float32)
    n = min(len(ws), getattr(runner, "max_batch", None) or len(ws))
    img = runner(np.ascontiguousarray(ws[:n]))
    return [G.image(label, "img_u8", img, gold["img_u8"][:n], precision, gold.tolerance)]
