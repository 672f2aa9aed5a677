"""Shared export fixtures, built once per session: a tiny checkpoint, its ONNX graphs and one bundle of each kind
(stylegan2, dualstylegan with a photo encoder, fast_style), and `kind_sources` to build more of any kind."""

from __future__ import annotations

from pathlib import Path

import copy

import numpy as np
import pytest

DUAL_NAMES = ["b_style.jpg", "a_style.jpg", "c_style.jpg"]  # not sorted: ids follow the file's order
DUAL_ENC_SIZE = 64
FAST_STYLE_TINY = {"channels": 4, "res_blocks": 1}


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


@pytest.fixture(scope="session")
def dual_model(tiny_G):
    """tiny_G (a copy) + an extrinsic path with clearly non-trivial weights (res_index 4: latents 0..4 structure)."""
    import torch

    from training.dualstyle import DualStyleGAN
    torch.manual_seed(0)
    m = DualStyleGAN.from_generator(copy.deepcopy(tiny_G), res_index=4)
    m.init_extrinsic_path(modres_scale=0.5, colour_noise=0.5)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def dual_files(dual_model, tiny_G, tmp_path_factory) -> dict[str, Path]:
    """The sources of a dualstylegan bundle: checkpoint, official exstyle codes, a tiny pSp encoder (official .pt)."""
    import torch

    from training.dualstyle import save_dualstylegan, save_exstyle_codes
    from training.inversion.encoders import EncoderConfig, build_encoder, save_official
    root = tmp_path_factory.mktemp("dsb")
    g = torch.Generator().manual_seed(5)
    codes = {n: torch.randn(1, dual_model.num_ws, dual_model.z_dim, generator=g) for n in DUAL_NAMES}
    torch.manual_seed(3)
    enc = build_encoder(EncoderConfig.tiny(n_styles=dual_model.num_ws, w_dim=dual_model.w_dim,
                                           input_size=DUAL_ENC_SIZE)).eval()
    with torch.no_grad():
        enc.latent_avg.copy_(tiny_G.mapping.w_avg.expand_as(enc.latent_avg))
    return {"ckpt": save_dualstylegan(root / "dsg", dual_model),
            "codes": save_exstyle_codes(root / "exstyle_code.npy", codes),
            "encoder": save_official(root / "psp.pt", enc, decoder=tiny_G), "root": root}


@pytest.fixture(scope="session")
def dual_bundle(dual_files) -> Path:
    """A dualstylegan bundle "toon" with its photo encoder; tests copy it before changing it."""
    from export.dualstyle_bundle import DualStyleBundleOptions, build_dualstyle_bundle
    return build_dualstyle_bundle(dual_files["ckpt"], dual_files["codes"], dual_files["root"] / "out" / "toon",
                                  DualStyleBundleOptions(name="toon", encoder=dual_files["encoder"]))


@pytest.fixture(scope="session")
def style_ckpt(tmp_path_factory) -> Path:
    """A tiny fast stylizer checkpoint (4 channels, 1 residual block)."""
    from training.style.fast_style import TransformerNetConfig, build_transformer_net, save_fast_style
    net = build_transformer_net(TransformerNetConfig(**FAST_STYLE_TINY), seed=3)
    return save_fast_style(tmp_path_factory.mktemp("fs") / "ckpt", net)


@pytest.fixture(scope="session")
def style_bundle(style_ckpt, tmp_path_factory) -> Path:
    """A fast_style bundle "tiny-style" (max_size 256); tests copy it before changing it."""
    from export.fast_style_bundle import build_fast_style_bundle
    return build_fast_style_bundle(style_ckpt, tmp_path_factory.mktemp("fsb") / "tiny-style", "tiny-style",
                                   max_size=256)


@pytest.fixture(scope="session")
def kind_sources(export_ckpt, dual_files, style_ckpt):
    """kind -> (the session's bundle fixture name, build(out) -> Path: a small new bundle of that kind through the
    export registry)."""
    from export.bundle import BundleOptions
    from export.dualstyle_bundle import DualStyleBundleOptions
    from export.kinds import EXPORT_KINDS
    return {
        "stylegan2": ("bundle", lambda out: EXPORT_KINDS["stylegan2"](export_ckpt, out, BundleOptions(name="k"))),
        "dualstylegan": ("dual_bundle", lambda out: EXPORT_KINDS["dualstylegan"](
            dual_files["ckpt"], dual_files["codes"], out, DualStyleBundleOptions(name="k"))),
        "fast_style": ("style_bundle", lambda out: EXPORT_KINDS["fast_style"](style_ckpt, out, "k", max_size=64)),
    }


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
