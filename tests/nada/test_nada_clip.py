"""CLIP loading for StyleGAN-NADA: specs, templates, preprocessing, local files and the missing-weights error."""

from __future__ import annotations

import json
import os

import pytest
import torch

from training.nada.clip import (TINY_TEST_CONFIG, ClipBank, ClipSpec, clear_clip_cache, load_clip,
                                parse_clip_specs)
from training.nada.templates import IMAGENET_TEMPLATES, PART_TEMPLATES

TINY_CLIP = "stylecast-tiny-clip:random"


def test_templates_are_clips_imagenet_set_without_the_plural_one():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    published = {t("{}") for t in OPENAI_IMAGENET_TEMPLATES}
    assert len(published) == 80
    assert len(IMAGENET_TEMPLATES) == 79 == len(set(IMAGENET_TEMPLATES))
    assert set(IMAGENET_TEMPLATES) == published - {"a photo of many {}."}
    for t in IMAGENET_TEMPLATES + PART_TEMPLATES:
        assert t.count("{}") == 1


@pytest.mark.parametrize("text, model, pretrained, weight", [
    ("ViT-B-32:openai=1.0", "ViT-B-32", "openai", 1.0),
    ("ViT-B/16", "ViT-B-16", "openai", 1.0),
    ("ViT-B-16:openai=0.5", "ViT-B-16", "openai", 0.5),
    ("ViT-B-32:/weights/a=b.bin", "ViT-B-32", "/weights/a=b.bin", 1.0),
    ("ViT-B-32-quickgelu:/w/model.bin=2", "ViT-B-32-quickgelu", "/w/model.bin", 2.0),
    ("hf-hub:org/repo=3", "hf-hub:org/repo", None, 3.0),
    (TINY_CLIP, "stylecast-tiny-clip", "random", 1.0),
])
def test_spec_parsing(text, model, pretrained, weight):
    spec = ClipSpec.parse(text)
    assert (spec.model, spec.pretrained, spec.weight) == (model, pretrained, weight)
    assert ClipSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "  ", "=1", ":openai", "ViT-B-32:openai=-1", "ViT-B-32:openai=nan",
                                  "ViT-B-32:openai=0"])
def test_bad_specs(text):
    with pytest.raises(ValueError):
        ClipSpec.parse(text)


def test_duplicate_specs_merge():
    specs = parse_clip_specs(["ViT-B-32:openai=1", "ViT-B/32=0.5", "ViT-B-16:openai"])
    assert [(s.model, s.weight) for s in specs] == [("ViT-B-32", 1.5), ("ViT-B-16", 1.0)]


def test_missing_weights_give_one_clear_line(tmp_path, monkeypatch):
    """Offline and not cached: a ValueError naming the model, the tag and how to supply the weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        load_clip("ViT-B-32:openai", cache_dir=str(tmp_path / "empty-cache"))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("could not load CLIP weights for ViT-B-32 (pretrained 'openai')")
    assert "offline" in msg and "ViT-B-32-quickgelu:/path/to/open_clip_pytorch_model.bin" in msg
    assert str(tmp_path / "empty-cache") in msg


def test_missing_file_and_unknown_names():
    with pytest.raises(FileNotFoundError, match="CLIP weights file not found"):
        load_clip("ViT-B-32:/nonexistent/dir/open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for CLIP ViT-B-32"):
        load_clip("ViT-B-32:nope")
    with pytest.raises(ValueError, match="unknown CLIP architecture 'ViT-Q-99'"):
        load_clip("ViT-Q-99:random")
    with pytest.raises(ValueError, match="random weights only"):
        load_clip("stylecast-tiny-clip:openai")


def test_tiny_clip_is_frozen_shared_and_reproducible():
    a = load_clip(TINY_CLIP)
    assert load_clip(TINY_CLIP) is a  # loaded once per process
    assert not any(p.requires_grad for p in a.parameters())
    assert a.image_size == (32, 32) and not a.training
    bank = ClipBank.load([TINY_CLIP + "=1", TINY_CLIP + "=0.5"])
    assert len(bank) == 1 and bank.weights == [1.5] and bank.encoders[0] is a
    state = {k: v.clone() for k, v in a.model.state_dict().items()}
    clear_clip_cache()
    b = load_clip(TINY_CLIP)
    assert b is not a
    assert all(torch.equal(state[k], v) for k, v in b.model.state_dict().items())


def test_preprocess_matches_torchvision_pipeline():
    """[-1, 1] -> [0, 1] -> Resize(shortest, bicubic, antialias) -> CenterCrop -> Normalize, as the official code."""
    from torchvision import transforms as T
    enc = load_clip(TINY_CLIP)
    img = torch.rand(2, 3, 48, 80) * 2 - 1
    ref = T.Compose([T.Normalize([-1.0] * 3, [2.0] * 3),
                     T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                     T.Normalize(enc.mean.flatten().tolist(), enc.std.flatten().tolist())])
    torch.testing.assert_close(enc.preprocess(img), ref(img), atol=1e-5, rtol=1e-5)
    same = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(enc.preprocess(same), ((same + 1) / 2 - enc.mean) / enc.std)  # no resize


def test_local_weights_file_goes_through_open_clip(tmp_path):
    """An open_clip architecture + a weights file: the file's tensors end up in the model."""
    import open_clip
    from safetensors.torch import save_file
    cfg_path = tmp_path / "stylecast-tiny-file.json"
    cfg_path.write_text(json.dumps(TINY_TEST_CONFIG))
    open_clip.add_model_config(cfg_path)
    src = load_clip(TINY_CLIP).model
    sd = {k: v.clone() + 0.01 for k, v in src.state_dict().items()}
    weights = tmp_path / "open_clip_model.safetensors"
    save_file(sd, str(weights))
    enc = load_clip(f"stylecast-tiny-file:{weights}")
    got = enc.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert enc.image_size == (32, 32)


def test_cli_missing_weights_exit_2_and_nothing_written(nada_source, tmp_path, monkeypatch, capsys):
    from stylecast.cli import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        main(["train", "nada", "--checkpoint", str(nada_source["pt"]), "--target", "pencil sketch",
              "--outdir", str(out), "--clip", "ViT-B-32:openai", "--clip-cache-dir", str(tmp_path / "cache"),
              "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not load CLIP weights for ViT-B-32 (pretrained 'openai')")
    assert len(err.splitlines()) == 1
    assert not out.exists() or not os.listdir(out)
