"""Shared export fixtures: one tiny checkpoint, its ONNX graphs and one bundle, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def run_graph():
    """run_graph(path, **feeds) -> {output name: array}: a real ONNX Runtime CPU session (2 threads), one per
    graph file for the whole session (graphs here are written once and never changed)."""
    import onnxruntime as ort
    sessions: dict[str, ort.InferenceSession] = {}

    def run(path: str | Path, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        key = str(path)
        if key not in sessions:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = 2
            sessions[key] = ort.InferenceSession(key, so, providers=["CPUExecutionProvider"])
        sess = sessions[key]
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return run


@pytest.fixture(scope="session")
def export_ckpt(tiny_G, tmp_path_factory) -> Path:
    """A native checkpoint of the conftest tiny generator (32 px, w_dim 64, noise strength 0.1)."""
    from training.checkpoints import save_native
    return save_native(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_G)


@pytest.fixture(scope="session")
def graphs(bundle, tiny_G, tmp_path_factory) -> dict[str, Path]:
    """Graphs of tiny_G, each exported with a batch-2 dummy: the bundle's mapping, synthesis (fp32 / fp16),
    plus synthesis with noise inputs and the whole generator."""
    from export.onnx_export import export_generator, export_synthesis
    d = tmp_path_factory.mktemp("graphs")
    return {
        "mapping": bundle / "mapping.onnx",
        "synthesis": bundle / "synthesis.onnx",
        "synthesis_fp16": bundle / "synthesis_fp16.onnx",
        "synthesis_noise": export_synthesis(tiny_G, d / "synthesis_noise.onnx", outputs=("img",),
                                            noise_input=True).path,
        "generator": export_generator(tiny_G, d / "generator.onnx").path,
    }


@pytest.fixture(scope="session")
def bundle(export_ckpt, tmp_path_factory) -> Path:
    """A bundle (with the fp16 synthesis graph) of the tiny checkpoint; tests copy it before changing it."""
    from export.bundle import BundleOptions, build_bundle
    return build_bundle(export_ckpt, tmp_path_factory.mktemp("bundles") / "tiny",
                        BundleOptions(name="tiny", default_psi=0.7, fp16=True))


@pytest.fixture
def cli(capsys):
    """cli(args) -> (exit code, stdout + stderr): the `stylecast` console entry, run in-process."""
    from stylecast.cli import main

    def run(args: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return int(exc.value.code or 0), out.out + out.err
    return run
