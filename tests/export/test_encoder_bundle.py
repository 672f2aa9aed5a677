"""Bundles with a photo encoder: `export bundle --encoder` adds encoder.onnx (aligned face -> ws) with its golden
check, `--encoder-from` makes an adapted model declare the base bundle's latent space; both verify, and the
errors are clear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ENC_SIZE = 64


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory, tiny_G) -> Path:
    """A tiny pSp encoder for tiny_G in the official .pt layout (with its decoder)."""
    from training.inversion.encoders import EncoderConfig, build_encoder, save_official
    torch.manual_seed(3)
    enc = build_encoder(EncoderConfig.tiny(n_styles=tiny_G.num_ws, w_dim=tiny_G.w_dim, input_size=ENC_SIZE)).eval()
    with torch.no_grad():
        enc.latent_avg.copy_(tiny_G.mapping.w_avg.expand_as(enc.latent_avg))
    return save_official(tmp_path_factory.mktemp("enc") / "psp_tiny.pt", enc, decoder=tiny_G)


@pytest.fixture(scope="module")
def face_bundle(export_ckpt, encoder_file, tmp_path_factory) -> Path:
    from export.bundle import BundleOptions, build_bundle
    return build_bundle(export_ckpt, tmp_path_factory.mktemp("fb") / "face",
                        BundleOptions(name="face", encoder=encoder_file))


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def test_encoder_graph_manifest_and_golden(face_bundle, encoder_file, tiny_G, run_graph):
    from training.inversion.encoders import load_encoder
    m = _manifest(face_bundle)
    assert set(m["graphs"]) == {"mapping", "synthesis", "encoder"}
    assert m["model"]["latent_space"] == "face"
    enc_doc = m["encoder"]
    assert enc_doc["kind"] == "psp" and enc_doc["input_size"] == ENC_SIZE and enc_doc["latent_space"] == "face"
    assert enc_doc["source"]["format"] == "official" and len(enc_doc["source"]["sha256"]) == 64
    g = m["graphs"]["encoder"]
    assert list(g["inputs"]) == ["img"] and list(g["outputs"]) == ["ws"]
    # The golden crops are the generator's own faces at the encoder's size, and enc_ws is the PyTorch encoder.
    with np.load(face_bundle / "golden.npz") as gold:
        crops, ref = gold["enc_img_u8"], gold["enc_ws"]
    assert crops.dtype == np.uint8 and crops.shape[1:] == (ENC_SIZE, ENC_SIZE, 3) and crops.std() > 5
    enc = load_encoder(encoder_file, with_decoder=False).encoder
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = enc(x).numpy()
    assert np.abs(ref - want).max() < 1e-6
    # ONNX Runtime at another batch size than the export's.
    x3 = np.concatenate([x.numpy()[:2], x.numpy()[:1] * 0.5])
    got = run_graph(face_bundle / "encoder.onnx", img=x3.astype(np.float32))["ws"]
    with torch.no_grad():
        want3 = enc(torch.from_numpy(x3)).numpy()
    assert got.shape == (3, tiny_G.num_ws, tiny_G.w_dim) and np.abs(got - want3).max() < 1e-4


def test_verify_checks_the_encoder(face_bundle, tmp_path, cli):
    code, out = cli(["export", "verify", face_bundle])
    assert code == 0, out
    assert any(line.startswith("ok") and "encoder" in line for line in out.splitlines()), out
    # Golden ws that the graph does not reproduce (re-hashed, so only the numbers are wrong) fail verify.
    from common.files import sha256_file
    b = shutil.copytree(face_bundle, tmp_path / "face")
    gold = dict(np.load(b / "golden.npz"))
    gold["enc_ws"] = gold["enc_ws"] + np.float32(0.01)
    np.savez(b / "golden.npz", **gold)
    m = _manifest(b)
    m["files"]["golden.npz"] = {"sha256": sha256_file(b / "golden.npz"), "bytes": (b / "golden.npz").stat().st_size}
    (b / "manifest.json").write_text(json.dumps(m))
    code, out = cli(["export", "verify", b])
    assert code == 1 and any(line.startswith("FAIL encoder") for line in out.splitlines()), out


def test_adapted_bundle_declares_the_base_latent_space(face_bundle, tiny_cfg, tmp_path, cli):
    from export.bundle import BundleOptions, build_bundle
    from training.checkpoints import save_native
    from training.networks import Generator
    torch.manual_seed(8)
    ck = save_native(tmp_path / "toon_ck", Generator(tiny_cfg))
    code, out = cli(["export", "bundle", "--checkpoint", ck, "--out", tmp_path / "toon", "--name", "toon",
                     "--encoder-from", face_bundle])
    assert code == 0, out
    m = _manifest(tmp_path / "toon")
    assert m["model"]["latent_space"] == "face" and "encoder" not in m["graphs"] and "encoder" not in m
    # An explicit --latent-space must agree with the base bundle's.
    with pytest.raises(ValueError, match="differs from 'face'"):
        build_bundle(ck, tmp_path / "x", BundleOptions(name="x", encoder_from=face_bundle, latent_space="other"))
    # A plain latent-space declaration without an encoder is allowed (an encoder bundle may come later).
    b = build_bundle(ck, tmp_path / "y", BundleOptions(name="y", latent_space="ffhq-w"))
    assert _manifest(b)["model"]["latent_space"] == "ffhq-w"


def test_encoder_errors_are_clear_and_leave_nothing(export_ckpt, encoder_file, face_bundle, bundle, tmp_path, cli,
                                                    tiny_G):
    from export.bundle import BundleOptions, build_bundle
    from training.inversion.encoders import EncoderConfig, build_encoder, save_encoder
    cases = [
        (BundleOptions(name="a", encoder=encoder_file, encoder_from=face_bundle), "not both"),
        (BundleOptions(name="a", encoder_from=bundle), "has no encoder to share"),
        (BundleOptions(name="a", encoder=encoder_file, latent_space="Bad Space!"), "must be lowercase"),
        (BundleOptions(name="a", encoder=tmp_path / "missing.pt"), "not found"),
    ]
    wrong = save_encoder(tmp_path / "wrong_enc", build_encoder(EncoderConfig.tiny(n_styles=6, w_dim=tiny_G.w_dim)))
    cases.append((BundleOptions(name="a", encoder=wrong), "outputs [N, 6, 64] latents"))
    for opts, msg in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=msg.replace("[", r"\[").replace("]", r"\]")):
            build_bundle(export_ckpt, tmp_path / "out", opts)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # From the CLI: one line, exit 2.
    code, out = cli(["export", "bundle", "--checkpoint", export_ckpt, "--out", tmp_path / "out", "--encoder", wrong])
    assert code == 2 and out.strip().count("\n") == 0 and "latents" in out, out


def test_manifest_encoder_rules(face_bundle):
    """The Python validator catches every broken encoder description; the JSON Schema the single-field ones (the
    cross-field rules are the validator's alone, as the schema's description says)."""
    import jsonschema

    from protos.manifest import SCHEMA_PATH, validate_manifest
    base = _manifest(face_bundle)
    schema = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))

    def errors(fn) -> tuple[list[str], list[str]]:
        doc = json.loads(json.dumps(base))
        fn(doc)
        return validate_manifest(doc), [e.message for e in schema.iter_errors(doc)]

    assert errors(lambda d: None) == ([], [])
    for single_field in (lambda d: d["encoder"].__setitem__("kind", "stylegan-encoder"),
                         lambda d: d["encoder"].__setitem__("input_size", 3),
                         lambda d: d["encoder"].__setitem__("align", "none"),
                         lambda d: d["model"].__setitem__("latent_space", "UPPER")):
        py, js = errors(single_field)
        assert py and js
    for cross_field in (lambda d: d["encoder"].__setitem__("latent_space", "other"),
                        lambda d: d.pop("encoder"),
                        lambda d: d["graphs"].pop("encoder")):
        assert errors(cross_field)[0]
