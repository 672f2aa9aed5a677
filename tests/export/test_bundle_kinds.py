"""One set of bundle tests for every kind the export registry builds (stylegan2, dualstylegan, fast_style): the kind
is known to every registry, a fresh bundle verifies, tampering fails `export verify` and the server refuses the same
bundle, an interrupted build leaves nothing, an existing bundle is never overwritten, and the golden tolerances are
recorded in the manifest and read back by serving (defaults for bundles written before they were recorded)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.kinds import EXPORT_KINDS

KINDS = sorted(EXPORT_KINDS)
# kind -> graph labels a fresh bundle's verify must report as ok, and a golden.npz key holding a reference output
EXPECT = {
    "stylegan2": ({"mapping", "synthesis", "synthesis_fp16"}, "img_u8"),
    "dualstylegan": ({"mapping", "encoder", "styles", "synthesis"}, "img_u8"),
    "fast_style": ({"stylizer"}, "out_0"),
}


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def fresh(kind, kind_sources, request) -> Path:
    """The session's bundle of this kind (do not modify: copy)."""
    return request.getfixturevalue(kind_sources[kind][0])


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "models" / bundle.name))


def _edit(bundle: Path, fn) -> None:
    doc = json.loads((bundle / "manifest.json").read_text())
    fn(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))


def _rehash(bundle: Path, fname: str) -> None:
    data = (bundle / fname).read_bytes()
    _edit(bundle, lambda d: d["files"].__setitem__(fname, {"sha256": hashlib.sha256(data).hexdigest(),
                                                           "bytes": len(data)}))


def _served(bundle: Path) -> tuple[bool, str]:
    """(READY?, error) of the bundle in a real model repository (the server's loader, golden checks included)."""
    from serving.repository import ModelRepository

    async def main():
        repo = ModelRepository(bundle.parent)
        await repo.scan()
        try:
            (status,) = repo.statuses()
            return status.ready, status.error
        finally:
            await repo.close()
    return asyncio.run(main())


# ----------------------------------------------------------------------------------------------------------
# Registries


def test_every_kind_is_known_to_every_registry():
    """export.kinds, serving.kinds, the manifest rules and the JSON Schema name the same kinds; each has a test here."""
    from protos.manifest import KIND_RULES, SCHEMA_PATH
    from serving.kinds import MODEL_KINDS
    schema_kinds = json.loads(SCHEMA_PATH.read_text())["properties"]["kind"]["enum"]
    assert set(EXPORT_KINDS) == set(MODEL_KINDS) == set(KIND_RULES) == set(schema_kinds) == set(EXPECT)
    assert all(cls.kind == k for k, cls in MODEL_KINDS.items())


# ----------------------------------------------------------------------------------------------------------
# Verify, tampering, and the server agreeing with verify


def test_fresh_bundle_verifies_and_serves(kind, fresh, tmp_path, cli):
    code, out = cli(["export", "verify", fresh])
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"{fresh}: verified", out
    oks = {line.split()[1] for line in out.splitlines() if line.startswith("ok ")}
    assert EXPECT[kind][0] <= oks, out
    assert "FAIL" not in out and "skip" not in out
    assert _served(_copy(fresh, tmp_path)) == (True, "")


def _change_file(b: Path) -> str:
    name = sorted(json.loads((b / "manifest.json").read_text())["graphs"].values(), key=lambda g: g["file"])[0]["file"]
    with open(b / name, "ab") as f:
        f.write(b"\0")
    return f"{name} was modified (sha256 mismatch)"


def _missing_file(b: Path) -> str:
    (b / "golden.npz").unlink()
    return "missing file golden.npz"


def _extra_file(b: Path) -> str:
    (b / "extra.bin").write_bytes(b"x")
    return "unlisted files ['extra.bin']"


def _wrong_format(b: Path) -> str:
    _edit(b, lambda d: d.update(format="stylecast.bundle/v2"))
    return "'stylecast.bundle/v2' is not supported"


def _missing_manifest(b: Path) -> str:
    (b / "manifest.json").unlink()
    return "manifest.json: missing"


def _broken_json(b: Path) -> str:
    (b / "manifest.json").write_text("{not json")
    return "not valid JSON"


def _bad_opset(b: Path) -> str:
    _edit(b, lambda d: d.update(opset=13))
    return "manifest.opset: 13 < 17"


def _unknown_kind(b: Path) -> str:
    _edit(b, lambda d: d.update(kind="stylegan9"))
    return "'stylegan9' is not one of"


TAMPERS = {"changed-file": _change_file, "missing-file": _missing_file, "unlisted-file": _extra_file,
           "wrong-format-version": _wrong_format, "no-manifest": _missing_manifest, "broken-json": _broken_json,
           "old-opset": _bad_opset, "unknown-kind": _unknown_kind}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_bundle_fails_verify(kind, fresh, tmp_path, cli, tamper):
    b = _copy(fresh, tmp_path)
    expected = TAMPERS[tamper](b)
    code, out = cli(["export", "verify", b])
    assert code == 1, out
    assert expected in out, out
    assert f"{b}: FAILED" in out.splitlines(), out


def test_golden_numbers_the_graphs_do_not_reproduce(kind, fresh, tmp_path, cli):
    """A consistently re-hashed bundle whose golden output is off fails on numbers, not on hashes: in verify and in
    the server, with the same check."""
    b = _copy(fresh, tmp_path)
    key = EXPECT[kind][1]
    gold = dict(np.load(b / "golden.npz"))
    ref = gold[key]
    gold[key] = (ref.astype(np.int16) + 5).clip(0, 255).astype(np.uint8) if ref.dtype == np.uint8 else ref + 0.01
    np.savez(b / "golden.npz", **gold)
    _rehash(b, "golden.npz")
    code, out = cli(["export", "verify", b])
    assert code == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and all(f" {key} " in line for line in fails), out
    ready, error = _served(b)
    assert not ready and "golden check failed" in error and key in error, error


# ----------------------------------------------------------------------------------------------------------
# Atomic, never overwritten


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial") or ".old." in p.name)


@pytest.mark.parametrize("exc", [RuntimeError("export failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_build_leaves_no_bundle(kind, kind_sources, tmp_path, monkeypatch, exc):
    import export.writer as writer
    seen = []

    def fail(self, *args, **kwargs):
        seen.append(sorted(p.name for p in self.dir.iterdir()))  # the graphs are already written
        raise exc
    monkeypatch.setattr(writer.BundleWriter, "golden", fail)
    out = tmp_path / "models" / "k"
    with pytest.raises(type(exc)):
        kind_sources[kind][1](out)
    assert seen and any(name.endswith(".onnx") for name in seen[0])
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_existing_bundle_is_never_overwritten(kind, fresh, kind_sources, tmp_path):
    b = _copy(fresh, tmp_path)
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        kind_sources[kind][1](b)
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    assert _leftovers(b.parent) == []


def test_a_manifest_that_does_not_validate_is_never_published(kind, kind_sources, tmp_path, monkeypatch):
    """The writer validates before it publishes: a builder writing a bad manifest leaves nothing behind."""
    import export.writer as writer
    real = writer.BundleWriter.publish

    def bad_publish(self, model, source, **sections):
        return real(self, {**model, "resolution": -1, "max_size": 1}, source, **sections)
    monkeypatch.setattr(writer.BundleWriter, "publish", bad_publish)
    out = tmp_path / "models" / "k"
    from protos.manifest import ManifestError
    with pytest.raises(ManifestError):
        kind_sources[kind][1](out)
    assert not out.exists() and _leftovers(out.parent) == []


# ----------------------------------------------------------------------------------------------------------
# One set of golden tolerances: recorded at export, read by serving and verify


def test_tolerances_are_recorded_and_read_from_the_manifest(kind, fresh, tmp_path, cli):
    from protos.manifest import GOLDEN_TOLERANCE, golden_tolerance
    doc = json.loads((fresh / "manifest.json").read_text())
    assert doc["golden"]["tolerance"] == GOLDEN_TOLERANCE
    # A bundle written before the tolerances were recorded (none, or only the fp32 one) gets the defaults.
    for old in ({}, {"max_abs_fp32": 1e-4}):
        b = _copy(fresh, tmp_path / f"old{len(old)}")
        _edit(b, lambda d: d["golden"].__setitem__("tolerance", old) if old else d["golden"].pop("tolerance"))
        assert golden_tolerance(json.loads((b / "manifest.json").read_text())) == GOLDEN_TOLERANCE
        assert cli(["export", "verify", b])[0] == 0
        assert _served(b) == (True, "")
    # The manifest's own values are the ones applied: no tolerance at all fails the first float comparison ...
    b = _copy(fresh, tmp_path / "strict")
    _edit(b, lambda d: d["golden"]["tolerance"].update(max_abs_fp32=0.0, u8_max_diff_fp32=0, u8_max_frac_fp32=0.0))
    code, out = cli(["export", "verify", b])
    assert code == 1 and "tolerance 0" in out, out
    ready, error = _served(b)
    assert not ready and "golden check failed" in error
    # ... and a negative one is an invalid manifest.
    b = _copy(fresh, tmp_path / "negative")
    _edit(b, lambda d: d["golden"]["tolerance"].update(max_abs_fp32=-1))
    code, out = cli(["export", "verify", b])
    assert code == 1 and "golden.tolerance.max_abs_fp32" in out, out
