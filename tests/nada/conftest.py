"""Fixtures for the StyleGAN-NADA tests: a tiny source checkpoint and the tiny random CLIP (nothing downloaded)."""

from __future__ import annotations

import pytest

TINY_CLIP = "stylecast-tiny-clip:random"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models are faster that way and stay fast on a loaded 2-core machine
    (results are identical for any thread count)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def nada_source(tiny_G, tmp_path_factory):
    """The tiny generator saved as a native checkpoint directory and as a rosinality .pt."""
    from training.checkpoints import save_native, save_rosinality
    root = tmp_path_factory.mktemp("nada-source")
    native = save_native(root / "native", tiny_G, meta={"what": "tiny test source"})
    pt = save_rosinality(root / "tiny.pt", tiny_G)
    return {"native": native, "pt": pt, "G": tiny_G}


@pytest.fixture()
def nada_cfg(nada_source, tmp_path):
    """A fast NadaConfig factory on the tiny setup (CPU, tiny CLIP, no progress bar)."""
    from training.nada import NadaConfig

    def make(**kw):
        base = dict(checkpoint=str(nada_source["native"]), outdir=str(tmp_path / "runs"), source="photo",
                    target="pencil sketch", clip=(TINY_CLIP,), iters=4, batch=2, output_interval=0,
                    save_interval=0, device="cpu", img2img_batch=4, auto_layer_batch=2)
        base.update(kw)
        return NadaConfig(**base)
    return make
