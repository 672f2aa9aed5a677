"""NADA's loss terms against independent float64 computations of their formulas (tiny random CLIP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.nada.clip import ClipBank, load_clip
from training.nada.losses import (LossWeights, NadaLoss, build_targets, directional_loss, global_loss,
                                  manifold_angle_loss, patch_directional_loss, text_direction)
from training.nada.templates import IMAGENET_TEMPLATES, PART_TEMPLATES

TINY_CLIP = "stylecast-tiny-clip:random"


def _n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _directional_f64(f_src, f_tgt, t_src, t_tgt) -> float:
    """The formula of REFERENCE.md, written independently in numpy float64."""
    f_src, f_tgt, t_src, t_tgt = (np.asarray(a, dtype=np.float64) for a in (f_src, f_tgt, t_src, t_tgt))
    d_text = _n(np.mean(_n(t_tgt), axis=0) - np.mean(_n(t_src), axis=0))
    d_img = _n(_n(f_tgt) - _n(f_src))
    return float(np.mean(1.0 - d_img @ d_text))


def test_directional_formula_matches_float64():
    g = torch.Generator().manual_seed(0)
    f_src, f_tgt = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    t_src, t_tgt = torch.randn(79, 32, generator=g), torch.randn(79, 32, generator=g)
    ours = directional_loss(f_src, f_tgt, text_direction(t_src, t_tgt))
    assert ours.dtype == torch.float32
    assert abs(float(ours) - _directional_f64(f_src, f_tgt, t_src, t_tgt)) < 1e-6


def test_other_terms_match_float64():
    g = torch.Generator().manual_seed(1)
    f_src, f_tgt = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    target, a_src, a_tgt = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)
    parts = torch.randn(15, 16, generator=g)
    s, t, tg = (f.double().numpy() for f in (f_src, f_tgt, target))
    assert abs(float(global_loss(f_tgt, target)) - np.mean(1 - _n(t) @ _n(tg))) < 1e-6
    cos_img = np.sum(_n(s) * _n(t), axis=1)
    cos_txt = float(_n(a_src.double().numpy()) @ _n(a_tgt.double().numpy()))
    assert abs(float(manifold_angle_loss(f_src, f_tgt, a_src, a_tgt)) - np.mean(np.abs(cos_img - cos_txt))) < 1e-6
    d = _n(_n(t) - _n(s))
    sim = d @ _n(parts.double().numpy()).T
    soft = np.exp(sim) / np.exp(sim).sum(axis=1, keepdims=True)
    assert abs(float(patch_directional_loss(f_src, f_tgt, parts)) - np.mean((1 - sim) * soft)) < 1e-6


def test_nada_loss_end_to_end_matches_formula():
    """Images -> CLIP -> loss: the module's directional loss is the float64 formula on the same embeddings."""
    enc = load_clip(TINY_CLIP)
    bank = ClipBank([enc], [0.7])
    loss_fn = NadaLoss.build(bank, "photo", "pencil sketch", LossWeights(direction=1.0, l2=0.5), resolution=32)
    g = torch.Generator().manual_seed(2)
    img_f, img_t = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    loss, parts = loss_fn(img_f, img_t)
    with torch.no_grad():
        f_src, f_tgt = enc.model.encode_image(enc.preprocess(img_f)), enc.model.encode_image(enc.preprocess(img_t))
        t_src = enc.model.encode_text(enc.tokenizer([t.format("photo") for t in IMAGENET_TEMPLATES]))
        t_tgt = enc.model.encode_text(enc.tokenizer([t.format("pencil sketch") for t in IMAGENET_TEMPLATES]))
    expected = _directional_f64(f_src, f_tgt, t_src, t_tgt)
    l2 = float(np.mean((img_t.double().numpy() - img_f.double().numpy()) ** 2))
    assert abs(parts["direction"] - 0.7 * expected) < 1e-5
    assert abs(float(loss) - (0.7 * expected + 0.5 * l2)) < 1e-5


def test_several_clip_models_add_with_their_weights():
    enc = load_clip(TINY_CLIP)
    single = NadaLoss.build(ClipBank([enc], [1.0]), "photo", "sketch", LossWeights(), resolution=32)
    double = NadaLoss.build(ClipBank([enc, enc], [0.25, 2.0]), "photo", "sketch", LossWeights(), resolution=32)
    img_f, img_t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert abs(float(double(img_f, img_t)[0]) - 2.25 * float(single(img_f, img_t)[0])) < 1e-5


def test_patch_and_manifold_terms_run_and_are_differentiable():
    enc = load_clip(TINY_CLIP)
    w = LossWeights(direction=1.0, global_clip=1.0, patch=1.0, manifold=1.0, identity=1.0, l2=1.0)
    loss_fn = NadaLoss.build(ClipBank([enc], [1.0]), "photo", "sketch", w, resolution=32)
    assert loss_fn.targets[0].part_directions.shape == (len(PART_TEMPLATES), 32)
    assert loss_fn.patch_size == 16
    img_f = torch.rand(2, 3, 32, 32) * 2 - 1
    img_t = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    loss, parts = loss_fn(img_f, img_t, torch.Generator().manual_seed(0))
    assert set(parts) == {"direction", "global", "patch", "manifold", "identity", "l2", "loss"}
    loss.backward()
    assert img_t.grad is not None and torch.isfinite(img_t.grad).all() and img_t.grad.abs().sum() > 0


def _write_style_images(folder, seed: int):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i, (w, h) in enumerate([(40, 40), (64, 48), (33, 57)]):
        arr = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        arr[..., i] = 255  # a dominant colour per image
        Image.fromarray(arr).save(folder / f"style{i}.png")
    (folder / "notes.txt").write_text("not an image")


def test_image_guided_direction_is_computed_from_the_style_images(nada_cfg, tmp_path):
    """The trainer's target direction = normalize(mean CLIP(style images) - mean CLIP(frozen samples))."""
    from PIL import Image
    from torchvision import transforms as T

    from training.nada.trainer import NadaTrainer
    style = tmp_path / "styles"
    _write_style_images(style, 0)
    trainer = NadaTrainer(nada_cfg(target=None, style_images=str(style)), progress=False)
    enc = trainer.bank.encoders[0]
    clip_pil = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                          T.Normalize(enc.mean.flatten().tolist(), enc.std.flatten().tolist())])
    files = sorted(style.glob("*.png"))
    with torch.no_grad():
        x = torch.stack([clip_pil(Image.open(f).convert("RGB")) for f in files])
        f_style = enc.model.encode_image(x).double().numpy()
        f_gen = enc.model.encode_image(enc.preprocess(trainer._source_samples(4))).double().numpy()
    expected = _n(np.mean(_n(f_style), axis=0) - np.mean(_n(f_gen), axis=0))
    got = trainer.loss_fn.targets[0].direction.double().numpy()
    assert np.abs(got - expected).max() < 1e-5
    assert trainer.style_names == [f.name for f in files]
    # Different style images -> a different direction.
    other = tmp_path / "styles2"
    _write_style_images(other, 1)
    t2 = NadaTrainer(nada_cfg(target=None, style_images=str(other)), progress=False)
    assert float(t2.loss_fn.targets[0].direction @ trainer.loss_fn.targets[0].direction) < 0.999
    assert not (tmp_path / "runs").exists()  # building a trainer writes nothing


def test_image_and_text_targets_blend(tmp_path):
    enc = load_clip(TINY_CLIP)
    style = tmp_path / "styles"
    _write_style_images(style, 0)
    from training.nada.trainer import load_style_images
    pil, _ = load_style_images(style)
    src = torch.rand(4, 3, 32, 32) * 2 - 1
    img_only = build_targets(enc, "photo", None, style_images=pil, source_images=src)
    text_only = build_targets(enc, "photo", "sketch")
    both = build_targets(enc, "photo", "sketch", style_images=pil, source_images=src, style_text_weight=0.25)
    expected = 0.75 * img_only.direction + 0.25 * text_only.direction
    torch.testing.assert_close(both.direction, expected / expected.norm())
    with pytest.raises(ValueError, match="needs a target text"):
        build_targets(enc, "photo", None, style_images=pil, source_images=src, style_text_weight=0.5)


def test_bad_style_folders_and_weights(tmp_path):
    from training.nada.trainer import load_style_images
    with pytest.raises(FileNotFoundError):
        load_style_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_style_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read style image"):
        load_style_images(tmp_path / "bad")
    with pytest.raises(ValueError, match="nothing to train"):
        LossWeights(direction=0.0)
    with pytest.raises(ValueError):
        LossWeights(global_clip=-1.0)
