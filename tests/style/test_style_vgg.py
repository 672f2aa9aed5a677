"""The VGG19 loss network: torchvision's layer indices, both state dict layouts, clear errors when the
ImageNet weights are missing offline (STYLECAST_OFFLINE=1 with an empty torch hub dir) or malformed."""

from __future__ import annotations

import pytest
import torch

from training.style.vgg import (VGG19_LAYERS, VGGWeightsError, build_vgg19_trunk, hub_cache_file, layer_index,
                                load_vgg19, random_vgg19, read_vgg19_state_dict, vgg19_state_dict)


def test_layer_indices_are_torchvisions():
    import torch.nn as nn
    import torchvision
    expected = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu4_2": 22, "relu5_1": 29,
                "relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 24, "conv1_1": 0, "pool5": 36}
    assert {k: VGG19_LAYERS[k] for k in expected} == expected
    with torch.device("meta"):
        tv = torchvision.models.vgg19(weights=None).features
    assert len(tv) == len(VGG19_LAYERS) == 37
    for name, i in VGG19_LAYERS.items():
        kind = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}[name[:4].rstrip("0123456789_")]
        assert isinstance(tv[i], kind), name
    with pytest.raises(ValueError, match="unknown VGG19 layer"):
        layer_index("relu6_1")


def test_features_match_a_plain_torchvision_forward(vgg):
    """Our extractor == torchvision's vgg19().features[:k] on ImageNet-normalised [0, 1] input."""
    import torchvision
    with torch.device("meta"):
        tv = torchvision.models.vgg19(weights=None).features[:23]
    tv = tv.to_empty(device="cpu")
    tv.load_state_dict({k: v for k, v in vgg.trunk.state_dict().items() if int(k.split(".")[0]) < 23})
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    x01 = (img + 1) / 2
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = tv.eval()((x01 - mean) / std)
    got = vgg(img, ["relu4_2", "relu1_1"])
    assert set(got) == {"relu4_2", "relu1_1"}
    torch.testing.assert_close(got["relu4_2"], ref, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_load_full_and_features_only_state_dicts(vgg_weights_file, tmp_path):
    full = load_vgg19(["relu2_1"], weights=vgg_weights_file)
    sd = {k.removeprefix("features."): v for k, v in torch.load(vgg_weights_file, weights_only=True).items()
          if k.startswith("features.")}
    feats_only = tmp_path / "features.pth"
    torch.save(sd, feats_only)
    part = load_vgg19(["relu2_1"], weights=feats_only)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(full(x)["relu2_1"], part(x)["relu2_1"], rtol=0, atol=0)
    assert len(full.trunk) == 7  # truncated after relu2_1


def test_env_var_supplies_the_weights(vgg_weights_file, monkeypatch):
    monkeypatch.setenv("STYLECAST_VGG19_WEIGHTS", str(vgg_weights_file))
    assert load_vgg19(["relu1_1"]).layers == ("relu1_1",)


def test_offline_and_missing_is_one_clear_line():
    assert not hub_cache_file().exists()
    with pytest.raises(VGGWeightsError) as info:
        load_vgg19(["relu1_1"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "--vgg-weights" in msg and "STYLECAST_VGG19_WEIGHTS" in msg and "STYLECAST_OFFLINE=1" in msg
    assert isinstance(info.value, FileNotFoundError)  # a user error for the CLI (exit 2)


def test_bad_weight_files(tmp_path):
    with pytest.raises(VGGWeightsError, match="not found"):
        load_vgg19(["relu1_1"], weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(VGGWeightsError, match="cannot read"):
        read_vgg19_state_dict(tmp_path / "junk.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: refused, never executed
    with pytest.raises(VGGWeightsError, match="not a plain tensor state dict"):
        read_vgg19_state_dict(tmp_path / "module.pth")
    sd = vgg19_state_dict(random_vgg19(["relu5_4"]))
    bad = dict(sd)
    bad["0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(VGGWeightsError, match="shape"):
        read_vgg19_state_dict(tmp_path / "shape.pth")
    del bad["34.bias"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(VGGWeightsError, match="missing keys"):
        read_vgg19_state_dict(tmp_path / "missing.pth")


def test_avg_pooling_option():
    trunk = build_vgg19_trunk(10, pooling="avg")
    assert isinstance(trunk[4], torch.nn.AvgPool2d) and isinstance(trunk[9], torch.nn.AvgPool2d)
    assert all(not getattr(m, "inplace", False) for m in trunk)


def test_online_download_goes_to_the_hub_cache(vgg_weights_file, monkeypatch):
    """With downloads allowed, torchvision's URL is fetched into <hub>/checkpoints/ (simulated: no network)."""
    import shutil
    import urllib.error

    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        if len(calls) == 1:
            raise urllib.error.URLError("no route to host")
        shutil.copy(vgg_weights_file, dst)

    monkeypatch.delenv("STYLECAST_OFFLINE")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(VGGWeightsError) as info:
        load_vgg19(["relu1_1"], progress=False)
    assert "could not download" in str(info.value) and "\n" not in str(info.value)
    assert not hub_cache_file().exists()
    net = load_vgg19(["relu1_1"], progress=False)
    assert calls[-1] == ("https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", str(hub_cache_file()), "dcbb9e9d")
    assert hub_cache_file().is_file() and net.layers == ("relu1_1",)
    load_vgg19(["relu1_1"], progress=False)  # now served from the cache: no further download
    assert len(calls) == 2
