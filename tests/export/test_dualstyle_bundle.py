"""dualstylegan bundles (export.dualstyle_bundle): built from a tiny DualStyleGAN, its exstyle codes and a tiny pSp
encoder; the manifest and style library, ONNX parity against PyTorch at another batch size with per-sample styles and
weights, `export verify` (and what tampering of the style library it catches), the manifest rules (validator and JSON
Schema), and errors that leave nothing behind."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from protos.manifest import SCHEMA_PATH, validate_manifest

NAMES = ["b_style.jpg", "a_style.jpg", "c_style.jpg"]  # the conftest's DUAL_NAMES: ids follow the file's order


# The session's dualstylegan fixtures (tests/export/conftest.py) under this module's short names.
@pytest.fixture
def dual(dual_model):
    return dual_model


@pytest.fixture
def files(dual_files) -> dict[str, Path]:
    return dual_files


@pytest.fixture
def bundle(dual_bundle) -> Path:
    return dual_bundle


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _rehash(b: Path, fname: str) -> None:
    from common.files import sha256_file
    m = _manifest(b)
    m["files"][fname] = {"sha256": sha256_file(b / fname), "bytes": (b / fname).stat().st_size}
    (b / "manifest.json").write_text(json.dumps(m, indent=2))


# ----------------------------------------------------------------------------------------------------------
# Contents


def test_manifest_library_and_golden(bundle, dual, tiny_G):
    from training.dualstyle import load_exstyle_codes
    m = _manifest(bundle)
    assert m["kind"] == "dualstylegan" and validate_manifest(m) == []
    model = m["model"]
    assert (model["resolution"], model["num_ws"], model["w_dim"], model["z_dim"]) == (32, 8, 64, 64)
    assert model["res_index"] == 4 and model["truncation"] == "zero" and model["default_psi"] == 0.75
    assert model["default_weights"] == [0.75] * 5 + [1.0] * 3
    assert model["latent_space"] == "toon" and m["encoder"]["latent_space"] == "toon"
    assert set(m["graphs"]) == {"mapping", "synthesis", "encoder"} and m["engines"] == []
    assert list(m["graphs"]["synthesis"]["inputs"]) == ["ws", "exstyle_w", "weights"]
    assert m["styles"]["names"] == NAMES and m["styles"]["count"] == 3
    assert m["styles"]["source"]["format"] == "official"
    assert set(m["files"]) == {"mapping.onnx", "synthesis.onnx", "encoder.onnx", "styles.npz", "golden.npz"}

    codes = load_exstyle_codes(bundle.parent.parent / "exstyle_code.npy")
    with np.load(bundle / "styles.npz", allow_pickle=False) as f:
        lib = {k: f[k] for k in f.files}
    assert list(lib["names"]) == NAMES
    z = np.concatenate([codes[n] for n in NAMES])
    assert np.array_equal(lib["z_plus"], z)
    with torch.no_grad():
        want = dual.map_extrinsic(torch.from_numpy(z)).numpy()
    assert np.abs(lib["exstyle_w"] - want).max() < 1e-6
    # the extrinsic codes are untruncated W+: distinct per layer and per style
    assert np.abs(lib["exstyle_w"][0, 0] - lib["exstyle_w"][0, 1]).max() > 0.1

    with np.load(bundle / "golden.npz", allow_pickle=False) as g:
        gold = {k: g[k] for k in g.files}
    assert list(gold["style_ids"]) == [0, 1, 2, 2] and np.array_equal(gold["exstyle_w"], lib["exstyle_w"][[0, 1, 2, 2]])
    assert np.allclose(gold["ws"], gold["psi"][:, None, None] * gold["w"][:, None, :], atol=1e-6)  # towards 0
    rows = gold["weights"]
    assert list(rows[0]) == model["default_weights"] and list(rows[1]) == [0.0] * 5 + [1.0] * 3
    assert not rows[2].any() and (rows[3] == 1).all()
    # The all-zero row is the base generator's image of the same ws; the others are not.
    with torch.no_grad():
        base = tiny_G.synthesis(torch.from_numpy(gold["ws"]), noise_mode="const", impl="ref").numpy()
    assert np.abs(gold["img"][2] - base[2]).max() < 1e-5
    assert np.abs(gold["img"][0] - base[0]).max() > 0.05 and np.abs(gold["img"][1] - base[1]).max() > 0.05


def test_onnx_parity_at_another_batch_with_per_sample_styles_and_weights(bundle, dual, run_graph):
    g = torch.Generator().manual_seed(9)
    with np.load(bundle / "styles.npz", allow_pickle=False) as f:
        ex = f["exstyle_w"][[2, 0, 1]]
    z = torch.randn(3, dual.z_dim, generator=g)
    psi = torch.tensor([0.5, 1.0, 0.8])
    weights = torch.tensor([[1.0] * 8, [0.3, 0.6, 0.9, 0.2, 0.5, 0.0, 0.7, 1.0], [0.75] * 5 + [0.0] * 3])
    mapped = run_graph(bundle / "mapping.onnx", z=z.numpy(), psi=psi.numpy())
    with torch.no_grad():
        ws = dual.map_intrinsic(z, psi)
        ref = dual(ws, torch.from_numpy(ex), weights, noise_mode="const", impl="ref")
    assert np.abs(mapped["ws"] - ws.numpy()).max() < 1e-5
    assert np.abs(mapped["ws"] - psi.numpy()[:, None, None] * mapped["w"][:, None]).max() < 1e-6
    out = run_graph(bundle / "synthesis.onnx", ws=ws.numpy(), exstyle_w=ex, weights=weights.numpy())
    assert out["img"].shape == (3, 3, 32, 32) and np.abs(out["img"] - ref.numpy()).max() <= 1e-4
    u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(out["img_u8"].astype(np.int16) - u8.astype(np.int16)).max() <= 1


# ----------------------------------------------------------------------------------------------------------
# export verify and the style library (tampering common to every kind: test_bundle_kinds.py)


def test_verify_passes_and_checks_every_part(bundle, cli):
    code, out = cli(["export", "verify", bundle])
    assert code == 0, out
    oks = [line.split()[1:3] for line in out.splitlines() if line.startswith("ok")]
    for part in (["mapping", "w"], ["mapping", "ws"], ["encoder", "ws"], ["styles", "exstyle_w"],
                 ["synthesis", "img"], ["synthesis", "img_u8"]):
        assert part in oks, out
    assert out.strip().endswith("verified")


@pytest.mark.parametrize("tamper", ["library", "names"])
def test_tampering_fails_verify(bundle, tmp_path, cli, tamper):
    b = shutil.copytree(bundle, tmp_path / "toon")
    if tamper == "library":  # re-hashed, but a style code that is not mapping(z_plus) (and not the golden rows')
        with np.load(b / "styles.npz") as f:
            lib = {k: f[k] for k in f.files}
        lib["exstyle_w"][0, 3] += np.float32(0.5)
        np.savez(b / "styles.npz", **lib)
        _rehash(b, "styles.npz")
        expect = "FAIL styles"
    else:  # the style table no longer matches the library's names
        m = _manifest(b)
        m["styles"]["names"] = list(reversed(m["styles"]["names"]))
        (b / "manifest.json").write_text(json.dumps(m))
        expect = "style names differ"
    code, out = cli(["export", "verify", b])
    assert code == 1 and expect in out, out
    assert "FAILED" in out


# ----------------------------------------------------------------------------------------------------------
# Manifest rules


BAD_MANIFESTS = {
    "no styles": (lambda m: m.pop("styles"), "manifest.styles"),
    "weights length": (lambda m: m["model"]["default_weights"].pop(), "default_weights"),
    "nan weight": (lambda m: m["model"]["default_weights"].__setitem__(0, float("nan")), "default_weights"),
    "odd res_index": (lambda m: m["model"].__setitem__("res_index", 3), "res_index"),
    "res_index too large": (lambda m: m["model"].__setitem__("res_index", 8), "res_index"),
    "truncation": (lambda m: m["model"].__setitem__("truncation", "w_avg"), "truncation"),
    "names count": (lambda m: m["styles"]["names"].pop(), "styles.names"),
    "duplicate names": (lambda m: m["styles"]["names"].__setitem__(1, m["styles"]["names"][0]), "styles.names"),
    "library file": (lambda m: m["styles"].__setitem__("file", "other.npz"), "styles.file"),
    "synthesis inputs": (lambda m: m["graphs"]["synthesis"]["inputs"].pop("weights"), "inputs must be"),
    "engines": (lambda m: m["engines"].append({"file": "golden.npz", "graph": "synthesis", "precision": "fp16",
                                               "trt_flavour": "tensorrt", "trt_version": "10",
                                               "compute_capability": "9.0"}), "no TensorRT engines"),
    "no golden": (lambda m: m.pop("golden"), "golden"),
}
SCHEMA_CATCHES = {"no styles", "odd res_index", "truncation", "duplicate names", "synthesis inputs", "engines",
                  "no golden"}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_manifest_rules(bundle, case):
    import jsonschema
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    good = _manifest(bundle)
    assert validate_manifest(good) == [] and not list(validator.iter_errors(good))
    bad = copy.deepcopy(good)
    fn, expect = BAD_MANIFESTS[case]
    fn(bad)
    errors = validate_manifest(bad)
    assert errors and any(expect in e for e in errors), errors
    if case in SCHEMA_CATCHES:  # the rules JSON Schema can state are in the published schema too
        assert list(validator.iter_errors(json.loads(json.dumps(bad)))), case


# ----------------------------------------------------------------------------------------------------------
# The command and its errors


def test_cli_builds_a_verified_bundle_with_its_own_defaults(files, tmp_path, cli):
    out = tmp_path / "models" / "toon2"
    code, text = cli(["export", "dualstyle-bundle", "-c", files["ckpt"], "-s", files["codes"], "-o", out,
                      "--name", "toon2", "--default-weights", "0.5*5,1*3", "--default-psi", "0.6",
                      "--description", "tiny test"])
    assert code == 0, text
    assert "verified" in text
    m = _manifest(out)
    assert m["model"]["default_weights"] == [0.5] * 5 + [1.0] * 3 and m["model"]["default_psi"] == 0.6
    assert "encoder" not in m["graphs"] and "latent_space" not in m["model"] and m["description"] == "tiny test"
    with np.load(out / "golden.npz") as g:
        assert list(g["weights"][0]) == [0.5] * 5 + [1.0] * 3


@pytest.mark.parametrize("case", ["weights", "codes", "exists", "both encoders", "encoder_from without encoder",
                                  "name"])
def test_errors_leave_nothing_behind(files, bundle, tmp_path, cli, dual, case):
    from training.dualstyle import save_exstyle_codes
    out = tmp_path / "models" / "x"
    args = ["export", "dualstyle-bundle", "-c", files["ckpt"], "-s", files["codes"], "-o", out, "--name", "x"]
    if case == "weights":
        args += ["--default-weights", "0.75*7,1*11"]
        expect = "8 layers"
    elif case == "codes":  # codes of a generator with another number of latents
        bad = save_exstyle_codes(tmp_path / "bad_exstyle_code.npy", {"s": np.zeros((1, 18, 64), np.float32)})
        args[args.index(files["codes"])] = bad
        expect = "bad_exstyle_code.npy"
    elif case == "exists":
        out.mkdir(parents=True)
        expect = "already exists"
    elif case == "both encoders":
        args += ["--encoder", files["encoder"], "--encoder-from", bundle]
        expect = "either an encoder or encoder_from"
    elif case == "encoder_from without encoder":
        plain = tmp_path / "plain"
        assert cli(["export", "dualstyle-bundle", "-c", files["ckpt"], "-s", files["codes"], "-o", plain,
                    "--name", "plain", "--no-verify"])[0] == 0
        args += ["--encoder-from", plain]
        expect = "has no encoder to share"
    else:
        args[args.index("x")] = "Bad Name"
        expect = "bundle name"
    code, text = cli(args)
    assert code == 2 and expect in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert not out.exists() or (case == "exists" and not any(out.iterdir()))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")] if out.parent.exists() else True
