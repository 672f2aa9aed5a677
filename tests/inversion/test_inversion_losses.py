"""Inversion losses: the LPIPS-style VGG16 distance against a float64 hand computation, VGG16 / LPIPS weight
resolution and its errors (never downloading), the identity loss on a tiny ArcFace (and dlib's network), and the
W-norm / e4e delta regularisers against per-sample loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.checkpoints import CheckpointError
from training.inversion.irse import ArcFaceConfig, Backbone, IRSEConfig
from training.inversion.losses import (ArcFaceEmbedder, IDLoss, PerceptualLoss, delta_loss, read_lpips_weights,
                                       w_norm_loss)
from training.style.vgg import VGGWeightsError

# torchvision's vgg16().features: conv widths by block, convs per block, and the indices of the 13 convolutions.
VGG16 = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TINY = (4, 8, 8, 12, 12)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("STYLECAST_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
    monkeypatch.delenv("STYLECAST_VGG16_WEIGHTS", raising=False)


def _imgs(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


def lpips_reference(convs, lins, img0, img1):
    """Float64 LPIPS from the paper's formula; convs = 13 (weight, bias) in order, lins = 5 channel weights."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img):
        x = ((img.double() + 1) / 2 - mean) / std
        out, k = [], 0
        for b, (_, n) in enumerate(VGG16):
            for _ in range(n):
                w, bias = convs[k]
                x = torch.relu(F.conv2d(x, w.double(), bias.double(), padding=1))
                k += 1
            out.append(x)
            if b < 4:
                x = F.max_pool2d(x, 2)
        return out

    total = torch.zeros(img0.shape[0], dtype=torch.float64)
    for f0, f1, lin in zip(taps(img0), taps(img1), lins):
        n0 = f0 / (torch.sqrt((f0 ** 2).sum(1, keepdim=True)) + 1e-10)
        n1 = f1 / (torch.sqrt((f1 ** 2).sum(1, keepdim=True)) + 1e-10)
        d = ((n0 - n1) ** 2 * lin.double().view(1, -1, 1, 1)).sum(1)  # [N, h, w]
        total += d.mean(dim=(1, 2))
    return total


def _convs_of(loss):
    sd = loss.trunk.state_dict()
    return [(sd[f"{i}.weight"], sd[f"{i}.bias"]) for i in CONV_INDICES]


# ----------------------------------------------------------------------------------------------------------
# Perceptual loss


def test_perceptual_loss_basic_properties():
    loss = PerceptualLoss.random(widths=TINY)
    x, y = _imgs()
    assert torch.equal(loss(x, x), torch.zeros(2))
    d = loss(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(loss(y, x), d, rtol=1e-6, atol=0)
    assert not loss.learned and not loss.training and not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training
    xg = x.clone().requires_grad_(True)
    loss(xg, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="16x16"):
        loss(x[:, :, :8, :8], y[:, :, :8, :8])
    with pytest.raises(ValueError, match="one shape"):
        loss(x, y[:1])


@pytest.mark.parametrize("learned", [False, True])
def test_perceptual_loss_matches_the_formula(learned):
    loss = PerceptualLoss.random(seed=3, widths=TINY, learned=learned)
    x, y = _imgs(size=48, seed=1)
    lins = [getattr(loss, f"lin{i}") for i in range(5)]
    if not learned:
        assert all(torch.equal(w, torch.ones_like(w)) for w in lins)
    torch.testing.assert_close(loss.double()(x.double(), y.double()), lpips_reference(_convs_of(loss), lins, x, y),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.float()(x, y).double(), lpips_reference(_convs_of(loss), lins, x, y),
                               rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A full-size random VGG16 state dict in torchvision's layout (features + a classifier entry)."""
    g = torch.Generator().manual_seed(0)
    sd, c_in, k = {}, 3, 0
    for c, n in VGG16:
        for _ in range(n):
            i = CONV_INDICES[k]
            sd[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c))
            sd[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.01
            c_in, k = c, k + 1
    sd["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    sd = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, (c, _) in enumerate(VGG16)}
    path = tmp_path_factory.mktemp("lpips") / "vgg.pth"
    torch.save(sd, path)
    return path


def test_real_layout_weights_load(vgg16_file, lpips_file, monkeypatch):
    loss = PerceptualLoss.load(vgg16_file, lpips_file)
    raw = torch.load(vgg16_file, weights_only=True)
    for i in CONV_INDICES:
        assert torch.equal(loss.trunk.state_dict()[f"{i}.weight"], raw[f"features.{i}.weight"])
    lins = read_lpips_weights(lpips_file)
    assert loss.learned and all(torch.equal(getattr(loss, f"lin{i}"), lins[i]) for i in range(5))
    x, y = _imgs(n=1, size=16, seed=2)
    convs = [(raw[f"features.{i}.weight"], raw[f"features.{i}.bias"]) for i in CONV_INDICES]
    torch.testing.assert_close(loss.double()(x.double(), y.double()), lpips_reference(convs, lins, x, y),
                               rtol=1e-10, atol=1e-12)
    # the environment variable and torchvision's hub cache file are found too
    monkeypatch.setenv("STYLECAST_VGG16_WEIGHTS", str(vgg16_file))
    assert not PerceptualLoss.load().learned
    monkeypatch.delenv("STYLECAST_VGG16_WEIGHTS")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    cache.parent.mkdir(parents=True)
    cache.symlink_to(vgg16_file)
    assert torch.equal(PerceptualLoss.load().trunk.state_dict()["28.weight"], raw["features.28.weight"])


def test_missing_vgg16_offline_is_one_clear_error(tmp_path):
    with pytest.raises(VGGWeightsError) as e:
        PerceptualLoss.load()
    msg = str(e.value)
    assert "\n" not in msg and "STYLECAST_OFFLINE=1" in msg and "STYLECAST_VGG16_WEIGHTS" in msg
    assert "vgg16-397923af.pth" in msg
    with pytest.raises(VGGWeightsError, match="not found"):
        PerceptualLoss.load(tmp_path / "nope.pth")


class _Hostile:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _mark(path):
    Path(path).write_text("code ran")


def test_bad_vgg16_and_lpips_files(tmp_path, vgg16_file):
    raw = torch.load(vgg16_file, weights_only=True)
    cases = {
        "wrong shape": ({**raw, "features.0.weight": torch.zeros(64, 3, 5, 5)}, "features.0.weight|0.weight"),
        "unknown key": ({**raw, "features.31.weight": torch.zeros(1)}, "unknown"),
        "missing key": ({k: v for k, v in raw.items() if k != "features.28.bias"}, "missing"),
        "not a dict": ([1, 2], "list"),
    }
    for name, (obj, needle) in cases.items():
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p)
        with pytest.raises(VGGWeightsError, match=needle) as e:
            PerceptualLoss.load(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
    marker = tmp_path / "marker"
    torch.save({"features.0.weight": _Hostile(_mark, (str(marker),))}, tmp_path / "evil.pth")
    with pytest.raises(VGGWeightsError, match="not a plain tensor state dict"):
        PerceptualLoss.load(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "trunc.pth").write_bytes(vgg16_file.read_bytes()[:1000])
    with pytest.raises(VGGWeightsError, match="cannot read"):
        PerceptualLoss.load(tmp_path / "trunc.pth")

    good = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, (c, _) in enumerate(VGG16)}
    bad_lpips = {
        "negative": ({**good, "lin2.model.1.weight": -torch.ones(1, 256, 1, 1)}, "non-negative"),
        "shape": ({**good, "lin0.model.1.weight": torch.ones(1, 63, 1, 1)}, "lin0.model.1.weight"),
        "keys": ({**good, "net.slice1.0.weight": torch.ones(1)}, "exactly the keys"),
    }
    for name, (obj, needle) in bad_lpips.items():
        p = tmp_path / f"lpips-{name}.pth"
        torch.save(obj, p)
        with pytest.raises(CheckpointError, match=needle) as e:
            read_lpips_weights(p)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        read_lpips_weights(tmp_path / "none.pth")


# ----------------------------------------------------------------------------------------------------------
# Identity loss


@pytest.fixture(scope="module")
def tiny_arcface():
    cfg = ArcFaceConfig(backbone=IRSEConfig(stem_channels=8, widths=(8, 16, 24, 32), units=(1, 1, 1, 1),
                                            se_reduction=4), emb_dim=16)
    torch.manual_seed(0)
    net = Backbone(cfg)
    with torch.no_grad():  # non-trivial BN statistics
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return net.eval()


def _faces(n=2, size=256, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_id_loss_on_arcface(tiny_arcface, tmp_path):
    torch.save(tiny_arcface.state_dict(), tmp_path / "model_ir_se50.pth")
    loss = IDLoss.arcface(tmp_path / "model_ir_se50.pth")
    x, y = _faces(seed=0), _faces(seed=1)
    same = loss(x, x)
    assert same.shape == (2,) and same.abs().max() <= 1e-6
    d = loss(x, y)
    assert (d > 1e-4).all() and (d <= 2).all()
    # the formula: 1 - cos of the network's embeddings of pSp's crop, pooled to 112 px
    emb = [tiny_arcface(F.adaptive_avg_pool2d(t[:, :, 35:223, 32:220], 112)) for t in (x, y)]
    torch.testing.assert_close(d, 1 - (emb[0] * emb[1]).sum(1), rtol=0, atol=1e-6)
    # only the face crop matters
    x2 = x.clone()
    x2[:, :, :35] = 1.0
    x2[:, :, :, 220:] = -1.0
    torch.testing.assert_close(loss(x2, y), d, rtol=0, atol=0)
    # other resolutions are area-averaged to 256 first
    big = _faces(size=768, seed=6)  # [N, 3, 768, 768]
    area = big.reshape(2, 3, 256, 3, 256, 3).mean(dim=(3, 5))  # 3x3 block means
    torch.testing.assert_close(loss(big, y), loss(area, y), rtol=0, atol=1e-6)
    # gradients reach the image, never the target or the network
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    loss(xg, yg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and yg.grad is None
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.embedder.net.training


def test_id_loss_accepts_any_embedder():
    class Pixels(torch.nn.Module):
        def forward(self, img):
            return img.flatten(1)

    loss = IDLoss(Pixels())
    x, y = _faces(size=8, seed=2), _faces(size=8, seed=3)
    want = 1 - F.cosine_similarity(x.flatten(1).double(), y.flatten(1).double(), dim=1)
    torch.testing.assert_close(loss(x, y).double(), want, rtol=0, atol=1e-6)


def test_id_loss_missing_arcface_weights(tmp_path):
    with pytest.raises(CheckpointError, match="model_ir_se50.pth") as e:
        IDLoss.arcface(tmp_path / "model_ir_se50.pth")
    assert "\n" not in str(e.value)


def test_id_loss_dlib_backend():
    try:
        from training.inversion import dlib_facenet  # noqa: F401  (written by another helper)
    except ImportError as exc:
        pytest.skip(f"training.inversion.dlib_facenet is not available yet ({exc})")
    loss = IDLoss.dlib()
    x, y = _faces(size=128, seed=4), _faces(size=128, seed=5)
    assert loss(x, x).abs().max() <= 1e-6
    assert (loss(x, y) > 0).all()


def test_arcface_embedder_rejects_bad_input(tiny_arcface):
    with pytest.raises(ValueError, match="aligned faces"):
        ArcFaceEmbedder(tiny_arcface)(torch.zeros(1, 1, 256, 256))


# ----------------------------------------------------------------------------------------------------------
# Latent regularisers


def test_w_norm_loss_against_a_loop():
    g = torch.Generator().manual_seed(0)
    ws = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    for avg in (None, torch.randn(5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                                      dtype=torch.float64)):
        total = 0.0
        for n in range(3):
            s = 0.0
            for i in range(4):
                for j in range(5):
                    a = 0.0 if avg is None else float(avg[j] if avg.ndim == 1 else avg[i, j])
                    s += (float(ws[n, i, j]) - a) ** 2
            total += math.sqrt(s)
        assert float(w_norm_loss(ws, avg)) == pytest.approx(total / 3, rel=1e-12)
    with pytest.raises(ValueError, match="num_ws"):
        w_norm_loss(ws[0])


def test_delta_loss_against_a_loop():
    ws = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for p, stage in ((2.0, None), (1.0, None), (2.0, 3), (2.0, 99)):
        last = 5 if stage is None else min(stage, 5)
        want = 0.0
        for i in range(1, last + 1):
            want += sum(sum(abs(float(ws[n, i, j] - ws[n, 0, j])) ** p for j in range(4)) ** (1 / p)
                        for n in range(3)) / 3
        assert float(delta_loss(ws, p=p, stage=stage)) == pytest.approx(want, rel=1e-12)
    assert float(delta_loss(ws[:, :1])) == 0.0
