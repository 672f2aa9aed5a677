"""stylegan2 bundles: manifest (both validators), golden outputs, what verify reports, a real `export bundle` process
interrupted half-way, and a shared mapping graph for models adapted from one base. (Verify, tampering, atomicity and
the golden tolerances of every kind: test_bundle_kinds.py.)"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from protos.manifest import BUNDLE_FORMAT, SCHEMA_PATH, validate_manifest

ROOT = Path(__file__).resolve().parents[2]


def _schema_errors(doc) -> list[str]:
    import jsonschema
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    return [e.message for e in validator.iter_errors(doc)]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / bundle.name
    shutil.copytree(bundle, dest)
    return dest


def _edit_manifest(bundle: Path, edit) -> None:
    doc = json.loads((bundle / "manifest.json").read_text())
    edit(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))


def _mapping_sha(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["files"]["mapping.onnx"]["sha256"]


# ----------------------------------------------------------------------------------------------------------
# A fresh bundle


def test_bundle_contents_and_manifest(bundle, export_ckpt, tiny_G):
    from common.files import sha256_file
    from training.checkpoints import checkpoint_sha256
    doc = json.loads((bundle / "manifest.json").read_text())
    assert validate_manifest(doc) == []
    assert _schema_errors(doc) == []
    assert sorted(p.name for p in bundle.iterdir()) == sorted(["manifest.json", *doc["files"]])
    assert set(doc["files"]) == {"mapping.onnx", "synthesis.onnx", "synthesis_fp16.onnx", "golden.npz"}
    for name, meta in doc["files"].items():
        assert meta == {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    assert doc["format"] == BUNDLE_FORMAT and doc["name"] == "tiny" and doc["opset"] >= 17
    model = doc["model"]
    assert (model["resolution"], model["z_dim"], model["w_dim"], model["num_ws"]) == (
        tiny_G.resolution, tiny_G.z_dim, tiny_G.w_dim, tiny_G.num_ws)
    assert model["default_psi"] == 0.7
    assert np.array_equal(np.array(model["w_avg"], np.float32), tiny_G.w_avg.numpy())
    assert doc["source"]["sha256"] == checkpoint_sha256(export_ckpt)
    assert doc["graphs"]["synthesis"]["inputs"]["ws"]["shape"] == ["N", tiny_G.num_ws, tiny_G.w_dim]
    assert doc["graphs"]["synthesis_fp16"]["precision"] == "fp16"
    assert doc["stylecast_version"] and doc["engines"] == []
    # Published files are world-readable like any other (the temporary directory was 0700).
    assert all(os.stat(p).st_mode & 0o044 == 0o044 for p in [bundle, *bundle.iterdir()])


def test_golden_holds_inputs_and_pytorch_outputs(bundle, tiny_G):
    from export.onnx_export import reference_outputs
    golden = np.load(bundle / "golden.npz")
    assert {"seeds", "z", "psi", "w", "ws", "img", "img_u8"} <= set(golden.files)
    ref = reference_outputs(tiny_G, torch.from_numpy(golden["z"]), torch.from_numpy(golden["psi"]))
    for k, v in ref.items():
        assert np.array_equal(golden[k], v.numpy()), k


def test_verify_reports_every_graph(bundle, cli):
    code, out = cli(["export", "verify", bundle])
    assert code == 0, out
    checks = {tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("ok ")}
    assert {("mapping", "w"), ("mapping", "ws"), ("synthesis", "img"), ("synthesis", "img_u8"),
            ("synthesis_fp16", "img"), ("synthesis_fp16", "img_u8")} <= checks, out
    assert "max_abs=" in out and "psnr=" in out


# ----------------------------------------------------------------------------------------------------------
# Atomic export from the command line (the same for every kind: test_bundle_kinds.py)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial") or ".old." in p.name)


def test_ctrl_c_during_cli_export_leaves_no_bundle(export_ckpt, tmp_path):
    """A real `stylecast export bundle` process interrupted (SIGINT) while its bundle is half written."""
    out = tmp_path / "tiny"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLECAST_")}
    proc = subprocess.Popen([sys.executable, "-m", "stylecast", "export", "bundle", "-c", str(export_ckpt),
                             "--out", str(out), "--fp16"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".tiny.*.partial") if (p / "mapping.onnx").exists()]
            if partial:
                break
            time.sleep(0.01)
        assert partial, f"the export never got half-way: {proc.communicate()[0].decode()[-2000:]}"
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_cli_never_overwrites_a_bundle(bundle, export_ckpt, tmp_path, cli):
    b = _copy(bundle, tmp_path)
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    code, out = cli(["export", "bundle", "-c", export_ckpt, "--out", b])
    assert code == 2 and "already exists" in out and "Traceback" not in out
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# One base, many styles: the mapping graph is shared


def _perturbed_synthesis(G):
    """A 'NADA-adapted' copy: same mapping network and w_avg, different synthesis weights."""
    G2 = copy.deepcopy(G)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in G2.synthesis.named_parameters():
            if name.endswith(".weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return G2


def _build_light(ckpt, out):
    """Only the graphs needed here (no fp16 graph) to keep the test quick."""
    from export.bundle import BundleOptions, build_bundle
    return build_bundle(ckpt, out, BundleOptions(name="styled"))


def test_adapted_models_share_the_mapping_graph(bundle, tiny_G, tmp_path):
    from training.checkpoints import save_native
    nada = save_native(tmp_path / "nada", _perturbed_synthesis(tiny_G))
    b2 = _build_light(nada, tmp_path / "b_nada")
    assert _mapping_sha(b2) == _mapping_sha(bundle)
    doc1, doc2 = (json.loads((b / "manifest.json").read_text()) for b in (bundle, b2))
    assert doc1["files"]["synthesis.onnx"]["sha256"] != doc2["files"]["synthesis.onnx"]["sha256"]
    assert doc1["model"]["w_avg"] == doc2["model"]["w_avg"]


def test_rosinality_checkpoints_without_latent_avg_share_the_estimated_w_avg(bundle, tiny_G, tmp_path):
    """StyleGAN-NADA writes {'g_ema', 'g_optim'} without latent_avg: w_avg is then estimated from the (frozen)
    mapping network, deterministically, so all styles of one base agree with each other, but not with a
    bundle of the base whose w_avg was tracked during training (its truncation centre is different)."""
    from training.checkpoints import generator_to_rosinality
    paths = []
    for i, G in enumerate([tiny_G, _perturbed_synthesis(tiny_G)]):
        p = tmp_path / f"nada{i}.pt"
        torch.save({"g_ema": generator_to_rosinality(G)}, p)
        paths.append(p)
    b1, b2 = (_build_light(p, tmp_path / f"b{i}") for i, p in enumerate(paths))
    assert _mapping_sha(b1) == _mapping_sha(b2)
    w1, w2 = (json.loads((b / "manifest.json").read_text())["model"]["w_avg"] for b in (b1, b2))
    assert w1 == w2
    assert _mapping_sha(b1) != _mapping_sha(bundle)
    assert w1 != json.loads((bundle / "manifest.json").read_text())["model"]["w_avg"]


# ----------------------------------------------------------------------------------------------------------
# The JSON Schema says what validate_manifest says


def _set(path: str, value):  # path: keys joined by "/"
    def edit(doc):
        *parents, last = path.split("/")
        d = doc
        for k in parents:
            d = d[k]
        d[last] = value
    return edit


def _delete(path: str):
    def edit(doc):
        *parents, last = path.split("/")
        d = doc
        for k in parents:
            d = d[k]
        del d[last]
    return edit


ENGINE = {"file": "golden.npz", "graph": "synthesis", "precision": "fp16", "trt_flavour": "tensorrt_rtx",
          "trt_version": "1.7.1.116", "compute_capability": "aot:8.9"}

BROKEN = {
    "not-an-object": lambda doc: doc.clear() or doc.update({"__replace__": []}),
    "wrong-format": _set("format", "stylecast.bundle/v0"),
    "no-format": _delete("format"),
    "bad-name": _set("name", "Not A Name"),
    "long-name": _set("name", "a" * 65),
    "bad-kind": _set("kind", "stylegan3"),
    "no-version": _delete("stylecast_version"),
    "opset-16": _set("opset", 16),
    "opset-bool": _set("opset", True),
    "opset-string": _set("opset", "17"),
    "files-list": _set("files", []),
    "file-in-subdir": lambda d: d["files"].update({"sub/x.onnx": d["files"]["golden.npz"]}),
    "dot-file": lambda d: d["files"].update({".hidden": d["files"]["golden.npz"]}),
    "manifest-listed": lambda d: d["files"].update({"manifest.json": d["files"]["golden.npz"]}),
    "bad-sha": _set("files/golden.npz", {"sha256": "abc", "bytes": 1}),
    "no-bytes": _set("files/golden.npz", {"sha256": "0" * 64}),
    "negative-bytes": _set("files/golden.npz", {"sha256": "0" * 64, "bytes": -1}),
    "graph-no-inputs": _set("graphs/mapping/inputs", {}),
    "graph-not-object": _set("graphs/mapping", "mapping.onnx"),
    "no-source-sha": _set("source", {"file": "x"}),
    "source-sha-upper": _set("source/sha256", "A" * 64),
    "no-model": _delete("model"),
    "negative-resolution": _set("model/resolution", -32),
    "psi-string": _set("model/default_psi", "0.7"),
    "psi-bool": _set("model/default_psi", False),
    "w-avg-not-list": _set("model/w_avg", 0.0),
    "no-synthesis-graph": _delete("graphs/synthesis"),
    "engine-missing-key": _set("engines", [{k: v for k, v in ENGINE.items() if k != "trt_version"}]),
    "engine-not-object": _set("engines", ["plan"]),
    "plugin-without-sha": _set("engines", [dict(ENGINE, plugins=[{"file": "x.so"}])]),
}


def _broken_doc(bundle: Path, key: str):
    doc = json.loads((bundle / "manifest.json").read_text())
    BROKEN[key](doc)
    return doc.pop("__replace__") if "__replace__" in doc else doc


@pytest.mark.parametrize("key", sorted(BROKEN))
def test_broken_manifests_fail_both_validators(bundle, key):
    doc = _broken_doc(bundle, key)
    assert validate_manifest(doc), f"validate_manifest accepted {key}"
    assert _schema_errors(doc), f"the JSON Schema accepted {key}"


def test_valid_variants_pass_both_validators(bundle):
    doc = json.loads((bundle / "manifest.json").read_text())
    variants = [
        lambda d: d.update(engines=[dict(ENGINE, plugins=[{"file": "golden.npz", "sha256": "0" * 64}])]),
        lambda d: d.update(engines=None, golden=None),
        lambda d: d.update(extra_field={"anything": 1}),
        lambda d: d["model"].update(default_psi=1),
    ]
    for edit in variants:
        d = copy.deepcopy(doc)
        edit(d)
        assert validate_manifest(d) == [] and _schema_errors(d) == []


def test_non_list_engines_is_a_problem_not_a_crash(bundle):
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["engines"] = 5
    assert _schema_errors(doc)
    assert validate_manifest(doc)
    doc["engines"] = [{"file": "x", "plugins": 3}]
    assert any("plugins" in e for e in validate_manifest(doc))
