"""The pSp / e4e encoder trainer on tiny parts (32 px generator, tiny IR-SE encoder, random VGG16-topology loss):
the loss falls, a resumed run is bit-identical to an uninterrupted one, NaN stops the run naming the last good
checkpoint, outputs load back, and the small pieces (data folder, latent pool, per-sample noise, ArcFace init)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.inversion.encoder_trainer import (EncoderDivergedError, EncoderTrainConfig, EncoderTrainer, FaceFolder,
                                                LatentPool, init_backbone_from_arcface, synthesis_with_noise)
from training.inversion.encoders import EncoderConfig, build_encoder, codes_to_ws, load_encoder
from training.inversion.losses import PerceptualLoss

TINY_VGG = (8, 8, 16, 16, 16)


def _cfg(gen_ckpt, **kw):
    base = dict(generator=str(gen_ckpt), steps=10, arch="tiny", input_size=32, batch=4, lr=1e-3, id_lambda=0.0,
                snapshot_every=1000, log_every=1, val_images=2)
    base.update(kw)
    return EncoderTrainConfig(**base)


def _trainer(cfg, run_dir=None):
    run = EncoderTrainer.start(cfg, perceptual=PerceptualLoss.random(widths=TINY_VGG))
    if run_dir is not None:
        run.run_dir = Path(run_dir)
        run.run_dir.mkdir(parents=True, exist_ok=True)
    return run


def _stats(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_loss_falls_on_a_tiny_setup(tmp_path, gen_ckpt, tiny_faces_dir):
    cfg = _cfg(gen_ckpt, steps=25, lr=2e-3, data=str(tiny_faces_dir), mirror=False)
    run = _trainer(cfg, tmp_path / "run")
    assert len(run.dataset) == 6 and len(run.dataset.skipped) == 1
    run.run(progress=False, log=lambda m: None)
    losses = [s["loss"] for s in _stats(tmp_path / "run")]
    assert len(losses) == 25 and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)


def _state(run):
    sd = {f"enc.{k}": v for k, v in run.enc.state_dict().items()}
    if run.disc is not None:
        sd.update({f"disc.{k}": v for k, v in run.disc.state_dict().items()})
        sd["pool.real"], sd["pool.fake"] = run.pools[0].tensor(64), run.pools[1].tensor(64)
    for i, st in run.opt.state_dict()["state"].items():
        sd.update({f"opt.{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return sd


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_is_bit_identical(tmp_path, gen_ckpt, tiny_faces_dir):
    """5 steps + resume to 10 == 10 steps: e4e with progressive stages, discriminator, R1, a swapping latent pool,
    synthetic + real rows, mirroring and a latent loss all continue exactly."""
    kw = dict(kind="e4e", data=str(tiny_faces_dir), synthetic=True, latent_lambda=1.0, progressive_start=3,
              progressive_step_every=2, w_discriminator_lambda=0.1, d_reg_every=3, w_pool_size=6, w_norm_lambda=0.01,
              snapshot_every=5)
    straight = _trainer(_cfg(gen_ckpt, **kw), tmp_path / "straight")
    straight.run(progress=False, log=lambda m: None)
    first = _trainer(_cfg(gen_ckpt, steps=5, **kw), tmp_path / "split")
    first.run(progress=False, log=lambda m: None)
    resumed = EncoderTrainer.resume(tmp_path / "split", _cfg(gen_ckpt, **kw),
                                    perceptual=PerceptualLoss.random(widths=TINY_VGG))
    assert resumed.step == 5 and len(resumed.pools[1].items) == 6
    resumed.run(progress=False, log=lambda m: None)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    sa, sb = _stats(tmp_path / "straight"), _stats(tmp_path / "split")
    assert [s["loss"] for s in sa] == [s["loss"] for s in sb]
    assert {s.get("stage") for s in sa} == {0.0, 1.0, 2.0, 3.0, 4.0} and any("loss_r1" in s for s in sa)
    assert "loss_delta" in sa[-1] and "loss_adv" in sa[-1] and "loss_latent" in sa[-1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_outputs_load_back(tmp_path, gen_ckpt, tiny_G):
    cfg = _cfg(gen_ckpt, steps=4, latent_space="z+", synthetic=True, snapshot_every=2)
    run = _trainer(cfg, tmp_path / "run")
    run.run(progress=False, log=lambda m: None)
    snaps = tmp_path / "run" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["000002", "000002.pt", "000004", "000004.pt"]
    x = run.val_inputs
    run.enc.eval()
    with torch.no_grad():
        want = run.enc(x)
    native, official = load_encoder(snaps / "000004"), load_encoder(snaps / "000004.pt")
    assert native.config == official.config == run.enc.cfg and native.config.latent_space == "z+"
    assert native.meta["encoder_training"]["step"] == 4
    assert torch.equal(native.encoder(x), want) and torch.equal(official.encoder(x), want)
    # the official file carries the generator as its decoder
    dec = official.decoder.state_dict()
    assert all(torch.equal(dec[k], v) for k, v in tiny_G.state_dict().items() if not k.endswith("w_avg"))
    ws = codes_to_ws(want, "z+", tiny_G.mapping)
    assert ws.shape == (2, tiny_G.num_ws, tiny_G.w_dim)
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["000002.png", "000004.png", "init.png"]
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "init.png"))
    assert grid.shape == (2 * 32 + 2, 2 * 32 + 2, 3)  # inputs over reconstructions, 2 validation faces
    state = json.loads((tmp_path / "run" / "state" / "training_state.json").read_text())
    assert state["step"] == 4 and state["last_snapshot"].endswith("000004")


def test_nan_stops_naming_the_last_good_checkpoint(tmp_path, gen_ckpt):
    class NaNAfter(torch.nn.Module):
        def __init__(self, inner, ok_calls):
            super().__init__()
            self.inner, self.calls, self.ok = inner, 0, ok_calls

        def forward(self, a, b):
            self.calls += 1
            out = self.inner(a, b)
            return out if self.calls <= self.ok else out * float("nan")

    cfg = _cfg(gen_ckpt, synthetic=True, snapshot_every=2)
    run = EncoderTrainer.start(cfg, perceptual=NaNAfter(PerceptualLoss.random(widths=TINY_VGG), 3))
    run.run_dir = tmp_path / "run"
    run.run_dir.mkdir()
    before = {k: v.clone() for k, v in run.enc.state_dict().items()}
    with pytest.raises(EncoderDivergedError) as e:
        run.run(progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and "step 3" in msg and "lpips" in msg
    assert str(tmp_path / "run" / "snapshots" / "000002") in msg
    assert run.step == 3  # the bad step was not applied
    assert not torch.equal(run.enc.state_dict()["styles.0.linear.weight"], before["styles.0.linear.weight"])
    assert load_encoder(tmp_path / "run" / "snapshots" / "000002").config == run.enc.cfg


def test_config_errors():
    ok = dict(generator="g", steps=1, synthetic=True)
    for kw, match in [({"synthetic": False}, "--data"), ({"kind": "psp", "progressive_start": 5}, "e4e"),
                      ({"id_lambda": 0.1}, "identity"), ({"input_size": 48}, "power of two"),
                      ({"bn": "sync"}, "bn"), ({"lr": float("nan")}, "finite"), ({"latent_space": "s"}, "latent")]:
        with pytest.raises(ValueError, match=match):
            EncoderTrainConfig(**{**ok, "id_lambda": 0.0, **kw})
    cfg = EncoderTrainConfig(**ok, id_lambda=0.0, kind="e4e", progressive_start=10, progressive_step_every=5)
    assert [cfg.progressive_stage(s, 8) for s in (0, 9, 10, 14, 15, 100)] == [0, 0, 1, 1, 2, 7]
    assert EncoderTrainConfig.from_dict(cfg.to_dict()) == cfg
    both = EncoderTrainConfig(**{**ok, "data": "d", "batch": 5, "id_lambda": 0.0})
    assert both.num_synthetic == 2  # round(5 * 0.5), at least one real row kept


# ----------------------------------------------------------------------------------------------------------
# Pieces


def test_face_folder(tmp_path, tiny_faces_dir):
    with pytest.warns(UserWarning, match="broken.png"):
        ds = FaceFolder(tiny_faces_dir, 32, mirror=True, seed=3)
    assert len(ds) == 6 and ds.skipped[0][0].name == "broken.png"
    a, b = ds.rows(range(0, 14)), ds.rows(range(0, 14))
    assert a.shape == (14, 3, 32, 32) and torch.equal(a, b) and float(a.abs().max()) <= 1.0
    perm, flips = ds.order(0)
    want0 = torch.from_numpy(ds.images[perm[0]][:, ::-1].copy() if flips[0] else ds.images[perm[0]]).permute(2, 0, 1)
    torch.testing.assert_close(a[0], want0.float() / 127.5 - 1, rtol=0, atol=0)
    assert not torch.equal(ds.rows(range(6)), ds.rows(range(6, 12)))  # epoch 1 has another order
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable images"):
        FaceFolder(junk, 32)

    def faceless(path, size):
        raise ValueError("no face found")
    with pytest.warns(UserWarning, match="no face found"), pytest.raises(ValueError, match="no readable"):
        FaceFolder(tiny_faces_dir, 32, loader=faceless)


def test_latent_pool():
    rng = np.random.RandomState(0)
    pool = LatentPool(3)
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(pool.query(x, rng), x) and len(pool.items) == 3  # filling: pass through
    y = torch.full((40, 2), -1.0)
    out = pool.query(y, rng)
    swapped = (out != -1).all(1)
    assert 0 < int(swapped.sum()) < 40  # about half the queries return a stored code instead
    assert set(map(tuple, out[swapped][:3].tolist())) <= set(map(tuple, x.tolist()))
    k = torch.randn(5, 4, 2)  # [N, K, w_dim]: one of the K codes per row
    picked = LatentPool(10).query(k, np.random.RandomState(1))
    assert picked.shape == (5, 2) and all(any(torch.equal(picked[i], k[i, j]) for j in range(4)) for i in range(5))
    assert torch.equal(LatentPool(0).query(k, rng), k[:, 0])


def test_per_sample_noise_is_independent_of_the_batch(tiny_G):
    g = torch.Generator().manual_seed(0)
    ws = tiny_G.mapping(torch.randn(3, tiny_G.z_dim, generator=g)).unsqueeze(1).repeat(1, tiny_G.num_ws, 1)
    layers = [m for m in tiny_G.synthesis.modules() if hasattr(m, "noise_const")]
    noises = [torch.randn(3, 1, m.noise_const.shape[-1], m.noise_const.shape[-1], generator=g) for m in layers]
    with torch.no_grad():
        batch = synthesis_with_noise(tiny_G, ws, noises)
        one = synthesis_with_noise(tiny_G, ws[1:2], [n[1:2] for n in noises])
        const = tiny_G.synthesis(ws, noise_mode="const")
    torch.testing.assert_close(one, batch[1:2], rtol=0, atol=1e-5)
    assert not torch.allclose(batch, const, atol=1e-3)
    assert all(m.noise_const.shape == (m.noise_const.shape[-1],) * 2 for m in layers)  # buffers restored


def test_backbone_from_arcface(tmp_path):
    from training.inversion.irse import ArcFaceConfig, Backbone

    enc = build_encoder(EncoderConfig.tiny(input_size=32))
    torch.manual_seed(1)
    arc = Backbone(ArcFaceConfig(backbone=enc.cfg.backbone, input_size=32, emb_dim=16))
    torch.save(arc.state_dict(), tmp_path / "model_ir_se50.pth")
    init_backbone_from_arcface(enc, tmp_path / "model_ir_se50.pth")
    assert all(torch.equal(v, arc.state_dict()[k]) for k, v in enc.state_dict().items()
               if k.startswith(("input_layer.", "body.")))
    from training.inversion.irse import IRSEConfig
    other_body = IRSEConfig(stem_channels=8, widths=(8, 16, 24, 32), units=(1, 1, 1, 1), se_reduction=4)
    other = build_encoder(EncoderConfig(backbone=other_body, n_styles=8, w_dim=64, input_size=32))
    with pytest.raises(ValueError, match="differs"):
        init_backbone_from_arcface(other, tmp_path / "model_ir_se50.pth")
