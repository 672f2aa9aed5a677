"""Gram matrix, content, style (several layers, several blended style images) and TV losses against float64
numpy references written from the formulas with explicit sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.style.losses import (LossWeights, blended_grams, content_loss, gram_matrix, layer_weights,
                                   normalize_blend_weights, style_loss, total_loss, tv_loss)


def np_gram(f: np.ndarray) -> np.ndarray:
    """G[n, i, j] = sum_{h, w} F[n, i, h, w] F[n, j, h, w] / (C H W), by explicit loops."""
    n, c, h, w = f.shape
    g = np.zeros((n, c, c), dtype=np.float64)
    for b in range(n):
        for i in range(c):
            for j in range(c):
                s = 0.0
                for y in range(h):
                    for x in range(w):
                        s += float(f[b, i, y, x]) * float(f[b, j, y, x])
                g[b, i, j] = s / (c * h * w)
    return g


def np_mse(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float((d * d).sum() / d.size)


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def test_gram_matrix_matches_explicit_sums():
    x = rand(2, 4, 3, 5)
    got = gram_matrix(x).double().numpy()
    assert got.shape == (2, 4, 4)
    np.testing.assert_allclose(got, np_gram(x.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, got.transpose(0, 2, 1), atol=1e-7)  # symmetric


def test_content_loss_several_layers_and_weights():
    feats = {"relu1_1": rand(2, 3, 4, 4, seed=1), "relu4_2": rand(2, 5, 2, 3, seed=2)}
    targets = {"relu1_1": rand(1, 3, 4, 4, seed=3), "relu4_2": rand(2, 5, 2, 3, seed=4)}  # first broadcasts
    weights = {"relu1_1": 0.5, "relu4_2": 3.0}
    got = float(content_loss(feats, targets, weights))
    ref = 0.0
    for layer, wt in weights.items():
        f = feats[layer].numpy()
        t = np.broadcast_to(targets[layer].numpy(), f.shape)
        s = 0.0
        for idx in np.ndindex(*f.shape):
            s += (float(f[idx]) - float(t[idx])) ** 2
        ref += wt * s / f.size
    assert got == pytest.approx(ref, rel=1e-5)


def test_style_loss_several_layers_weights_and_blended_style_images():
    layers = ["relu1_1", "relu2_1", "relu3_1"]
    chans = {"relu1_1": 3, "relu2_1": 4, "relu3_1": 2}
    # Two style images of different sizes, blend weights 3:1 (normalised to 0.75 / 0.25).
    s1 = {l: rand(1, chans[l], 4, 5, seed=10 + i) for i, l in enumerate(layers)}
    s2 = {l: rand(1, chans[l], 3, 2, seed=20 + i) for i, l in enumerate(layers)}
    gen = {l: rand(2, chans[l], 3, 3, seed=30 + i) for i, l in enumerate(layers)}
    targets = blended_grams([s1, s2], [3.0, 1.0], layers)
    weights = layer_weights(layers, 100.0, [1.0, 0.5, 2.0])
    got = float(style_loss(gen, targets, weights))

    ref = 0.0
    for layer, factor in zip(layers, [1.0, 0.5, 2.0]):
        t = 0.75 * np_gram(s1[layer].numpy())[0] + 0.25 * np_gram(s2[layer].numpy())[0]
        g = np_gram(gen[layer].numpy())
        s = 0.0
        for b in range(g.shape[0]):
            for i in range(g.shape[1]):
                for j in range(g.shape[2]):
                    s += (g[b, i, j] - t[i, j]) ** 2
        ref += 100.0 * factor * s / g.size
    assert got == pytest.approx(ref, rel=1e-5)
    # A single style image is the blend [1]; equal weights are the default.
    np.testing.assert_allclose(blended_grams([s1, s2], None, layers)["relu1_1"].numpy(),
                               blended_grams([s1, s2], [2.0, 2.0], layers)["relu1_1"].numpy(), rtol=1e-6)


def test_tv_loss_matches_explicit_sums():
    x = rand(2, 3, 4, 5, seed=7)
    got = float(tv_loss(x))
    a = x.numpy().astype(np.float64)
    n, c, h, w = a.shape
    s = 0.0
    for b in range(n):
        for ch in range(c):
            for y in range(h):
                for xx in range(w):
                    if y + 1 < h:
                        s += (a[b, ch, y + 1, xx] - a[b, ch, y, xx]) ** 2
                    if xx + 1 < w:
                        s += (a[b, ch, y, xx + 1] - a[b, ch, y, xx]) ** 2
    assert got == pytest.approx(s / n, rel=1e-5)
    assert float(tv_loss(torch.full((1, 3, 6, 7), 0.3))) == 0.0


def test_total_loss_is_the_weighted_sum():
    img = rand(1, 3, 4, 4, seed=8)
    feats = {"a": rand(1, 2, 2, 2, seed=9)}
    w = LossWeights(content={"a": 2.0}, style={"a": 10.0}, tv=0.1)
    parts = total_loss(img, feats, {"a": torch.zeros(1, 2, 2, 2)}, {"a": torch.zeros(1, 2, 2)}, w)
    assert float(parts["content"]) == pytest.approx(2.0 * np_mse(feats["a"].numpy(), np.zeros((1, 2, 2, 2))), rel=1e-5)
    assert float(parts["tv"]) == pytest.approx(0.1 * float(tv_loss(img)), rel=1e-6)
    assert float(parts["total"]) == pytest.approx(float(parts["content"] + parts["style"] + parts["tv"]), rel=1e-6)


@pytest.mark.parametrize("blend, count, msg", [([1.0], 2, "2 style"), ([1.0, -1.0], 2, ">= 0"),
                                               ([0.0, 0.0], 2, "zero"), ([float("nan")], 1, "finite")])
def test_bad_blend_weights(blend, count, msg):
    with pytest.raises(ValueError, match=msg):
        normalize_blend_weights(blend, count)


def test_layer_weights():
    assert layer_weights(["a", "b"], 5.0) == {"a": 5.0, "b": 5.0}
    assert layer_weights(["a", "b"], 5.0, [1.0, 0.2]) == {"a": 5.0, "b": 1.0}
    with pytest.raises(ValueError, match="per-layer"):
        layer_weights(["a", "b"], 1.0, [1.0])
    with pytest.raises(ValueError, match="finite"):
        layer_weights(["a"], float("inf"))
