"""Gatys style transfer on tiny real images with a random-weight VGG19: both optimisers lower the loss,
original colours keep the content's chroma exactly, multi-scale reaches the requested size, bad inputs fail."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from training.style.gatys import GatysConfig, GatysObjective, initial_image, output_size, stylize
from training.style.images import resize, transfer_original_colors
from training.style.losses import NonFiniteLossError

YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def np_yiq(img: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> YIQ of the [0, 1] image, float64 [3, H, W]."""
    x = (img[0].double().numpy() + 1) / 2
    return np.einsum("ij,jhw->ihw", YIQ, x)


def small(**kw) -> GatysConfig:
    base = dict(image_size=32, iterations=4, save_every=0)
    base.update(kw)
    return GatysConfig(**base)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_optimisers_lower_the_total_loss(optimizer, content, style, vgg):
    cfg = small(optimizer=optimizer, iterations=5, init="noise", seed=3)
    objective = GatysObjective.build(content, [style], cfg, vgg, cfg.image_size)
    x0 = initial_image(objective.content, cfg)
    before = float(objective(x0)["total"])
    out = stylize(content, [style], cfg, vgg, progress=False)
    after = float(objective(out)["total"])
    assert out.shape == objective.content.shape == (1, 3, 32, 24)
    assert out.min() >= -1 and out.max() <= 1
    assert after < 0.9 * before, (before, after)


def test_noise_init_is_seeded(content):
    c = content[:, :, :8, :8]
    a = initial_image(c, small(init="noise", seed=1))
    torch.testing.assert_close(a, initial_image(c, small(init="noise", seed=1)), rtol=0, atol=0)
    assert not torch.equal(a, initial_image(c, small(init="noise", seed=2)))
    assert torch.equal(initial_image(c, small(init="content")), c)


def test_original_colors_keep_the_content_chroma_exactly(content, style, vgg):
    cfg = small(original_colors=True, init="noise", iterations=3, style_weight=1e4)
    out = stylize(content, [style], cfg, vgg, progress=False)
    ref = resize(content, out.shape[-2:])
    yiq_out, yiq_ref = np_yiq(out), np_yiq(ref)
    np.testing.assert_allclose(yiq_out[1:], yiq_ref[1:], atol=2e-6)  # I and Q: float32 rounding only
    assert np.abs(yiq_out[0] - yiq_ref[0]).max() > 0.05  # the luminance did change


def test_colour_transfer_out_of_gamut_keeps_chroma_and_range():
    g = torch.Generator().manual_seed(0)
    stylized = torch.rand(2, 3, 9, 7, generator=g) * 2 - 1
    stylized[:, :, :3] = 1.0  # very bright: out of gamut for saturated content colours
    content = torch.rand(1, 3, 9, 7, generator=g) * 2 - 1
    out = transfer_original_colors(stylized, content)
    assert out.shape == stylized.shape and out.min() >= -1 and out.max() <= 1
    for n in range(2):
        np.testing.assert_allclose(np_yiq(out[n:n + 1])[1:], np_yiq(content)[1:], atol=2e-6)
    # The luminance is the stylized one, clipped to the interval where Y + chroma stays inside the RGB cube.
    yiq_c = np_yiq(content)
    d = np.einsum("ij,jhw->ihw", np.linalg.inv(YIQ), np.concatenate([np.zeros_like(yiq_c[:1]), yiq_c[1:]]))
    lo, hi = (-d).max(axis=0), (1 - d).min(axis=0)
    y_sty = np_yiq(stylized[:1])[0]
    np.testing.assert_allclose(np_yiq(out[:1])[0], np.clip(y_sty, lo, hi), atol=2e-6)
    assert ((y_sty >= lo) & (y_sty <= hi)).any() and ((y_sty < lo) | (y_sty > hi)).any()  # both cases occur


def test_multi_scale_reaches_the_requested_size_and_reports_intermediates(content, style, vgg):
    cfg = small(image_size=40, scales=(24, 40), iterations=(2, 1), save_every=1, init="content")
    seen = []
    out = stylize(content, [style], cfg, vgg, progress=False,
                  callback=lambda si, size, it, img: seen.append((si, size, it, tuple(img.shape))))
    assert tuple(out.shape) == (1, 3, 40, 30) == (1, 3, *output_size((64, 48), cfg))
    assert seen == [(0, 24, 1, (1, 3, 24, 18)), (0, 24, 2, (1, 3, 24, 18)), (1, 40, 1, (1, 3, 40, 30))]


def test_several_style_images_with_blend_weights(content, style, vgg):
    flipped = style.flip(-1)[:, :, :30]
    cfg = small(style_blend_weights=(3.0, 1.0), iterations=1, style_scale=0.75)
    objective = GatysObjective.build(content, [style, flipped], cfg, vgg, 32)
    a = GatysObjective.build(content, [style], small(iterations=1, style_scale=0.75), vgg, 32).style_targets
    b = GatysObjective.build(content, [flipped], small(iterations=1, style_scale=0.75), vgg, 32).style_targets
    for layer, t in objective.style_targets.items():
        torch.testing.assert_close(t, 0.75 * a[layer] + 0.25 * b[layer], rtol=1e-5, atol=1e-9)
    assert stylize(content, [style, flipped], cfg, vgg, progress=False).shape == (1, 3, 32, 24)
    with pytest.raises(ValueError, match="blend weights"):
        stylize(content, [style], cfg, vgg, progress=False)


def test_nan_loss_is_a_clear_error(content, style, vgg):
    broken = copy.deepcopy(vgg)
    with torch.no_grad():
        broken.trunk[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="NaN|nan"):
        stylize(content, [style], small(iterations=2), broken, progress=False)


@pytest.mark.parametrize("kw, msg", [
    (dict(content_layers=("relu9_9",)), "unknown VGG19 layer"),
    (dict(image_size=512, scales=(512, 256)), "last scale"),
    (dict(image_size=512, scales=(512, 512)), "increase"),
    (dict(image_size=4096), "max-size"),
    (dict(style_scale=3.0, image_size=1024), "style image size"),
    (dict(iterations=(3, 4)), "one per scale"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(style_weight=float("nan")), "finite"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GatysConfig(**kw)


def test_config_json_round_trip():
    cfg = GatysConfig(scales=(256, 512), iterations=(300, 100), style_blend_weights=(1, 2), optimizer="adam")
    assert cfg.learning_rate == 0.08 and GatysConfig().learning_rate == 1.0
    assert GatysConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        GatysConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.gpu
def test_gatys_on_cuda(content, style, vgg):
    vgg_cuda = copy.deepcopy(vgg).cuda()
    cfg = small(iterations=3, init="noise", original_colors=True)
    out = stylize(content, [style], cfg, vgg_cuda, progress=False)
    assert out.is_cuda and out.shape == (1, 3, 32, 24)
    ref = resize(content, out.shape[-2:])
    np.testing.assert_allclose(np_yiq(out.cpu())[1:], np_yiq(ref)[1:], atol=2e-6)


def test_load_image_errors(image_files, tmp_path):
    from training.style.images import load_image
    img = load_image(image_files["content"])
    assert img.shape == (1, 3, 64, 48) and img.dtype == torch.float32 and -1 <= img.min() < img.max() <= 1
    with pytest.raises(ValueError, match="MP allowed"):
        load_image(image_files["content"], max_pixels=1000)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_files["content"].read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(truncated)
