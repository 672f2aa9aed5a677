"""The `stylecast` CLI foundation (generate, convert, info, error handling, help) and common.files / common.seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylecast.cli import main
from common.files import atomic_directory, atomic_write_bytes, next_run_dir
from common.seeds import parse_seeds
from training.checkpoints import load_checkpoint, save_native, save_rosinality
from training.networks import seeds_to_z

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STYLECAST_DEBUG": "0"}
    return subprocess.run([sys.executable, "-m", "stylecast", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Run stylecast.cli.main in-process (as the console script does) and return (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def expected_u8(G, seeds) -> np.ndarray:
    """round((img + 1) * 127.5) clamped to 0..255, NHWC, computed here with numpy."""
    with torch.no_grad():
        img = G(seeds_to_z(seeds, G.z_dim)).numpy()  # [N, 3, H, W] float32
    u8 = np.clip(np.rint((img + np.float32(1)) * np.float32(127.5)), 0, 255).astype(np.uint8)
    return u8.transpose(0, 2, 3, 1)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_G):
    d = tmp_path_factory.mktemp("ckpts")
    save_native(d / "native", tiny_G)
    save_rosinality(d / "g.pt", tiny_G)
    return d


@pytest.fixture(scope="module")
def generated(tmp_path_factory, ckpts):
    """One subprocess run of `stylecast generate` on the native checkpoint (shared by several tests)."""
    out = tmp_path_factory.mktemp("gen") / "out"
    r = run_cli("generate", "--checkpoint", ckpts / "native", "--seeds", "0-2,5", "--outdir", out, "--grid",
                "--batch-size", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out, r


# ----------------------------------------------------------------------------------------------------------
# generate


def test_generate_writes_expected_pngs(generated, tiny_G):
    out, r = generated
    assert sorted(os.listdir(out)) == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png", "seed0005.png"]
    want = expected_u8(tiny_G, [0, 1, 2, 5])  # the CLI rendered them as one batch of 4
    for img, seed in zip(want, [0, 1, 2, 5]):
        got = read_png(out / f"seed{seed:04d}.png")
        assert got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, img)
    assert "wrote 4 image(s)" in r.stdout


def test_generate_grid(generated):
    out, _ = generated
    grid = read_png(out / "grid.png")
    assert grid.shape == (64, 64, 3)  # 4 images -> 2 x 2
    for i, seed in enumerate([0, 1, 2, 5]):
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(grid[32 * r: 32 * r + 32, 32 * c: 32 * c + 32],
                                      read_png(out / f"seed{seed:04d}.png"))


# The remaining happy paths call main() in-process (the console script's entry point, same exit-code mapping)
# to keep the suite fast; the subprocess runs above and below cover the real process boundary.


def test_generate_same_bytes_alone_and_in_a_batch(capsys, generated, ckpts, tmp_path):
    out, _ = generated
    code, _, err = run_main(capsys, "generate", "-c", ckpts / "native", "--seeds", "5", "-o", tmp_path / "alone",
                            "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "alone" / "seed0005.png").read_bytes() == (out / "seed0005.png").read_bytes()


def test_generate_rosinality_and_native_give_identical_pngs(capsys, generated, ckpts, tmp_path):
    out, _ = generated
    code, _, err = run_main(capsys, "generate", "--checkpoint", ckpts / "g.pt", "--seeds", "0-2,5", "--outdir",
                            tmp_path / "ros", "--batch-size", "4", "--device", "cpu")
    assert code == 0, err
    for seed in (0, 1, 2, 5):
        name = f"seed{seed:04d}.png"
        assert (tmp_path / "ros" / name).read_bytes() == (out / name).read_bytes()


def test_generate_in_process_psi_and_noise(capsys, ckpts, tiny_G, tmp_path):
    code, _, err = run_main(capsys, "generate", "-c", ckpts / "g.pt", "--seeds", "3,3", "--psi", "0",
                            "--noise-mode", "none", "-o", tmp_path / "o", "--device", "cpu")
    assert code == 0, err
    with torch.no_grad():
        img = tiny_G.synthesis(tiny_G.w_avg[None, None].repeat(1, tiny_G.num_ws, 1), noise_mode="none").numpy()
    want = np.clip(np.rint((img + np.float32(1)) * np.float32(127.5)), 0, 255).astype(np.uint8)[0].transpose(1, 2, 0)
    got = read_png(tmp_path / "o" / "seed0003.png")
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # psi=0: the mean face, any seed


# ----------------------------------------------------------------------------------------------------------
# convert and info


def test_convert_native_rosinality_native_is_bit_exact(capsys, ckpts, tiny_G, tmp_path):
    code, out, err = run_main(capsys, "convert", ckpts / "native", tmp_path / "x.pt", "--to", "rosinality")
    assert code == 0, err
    assert "wrote rosinality checkpoint" in out
    code, _, err = run_main(capsys, "convert", tmp_path / "x.pt", tmp_path / "back", "--to", "native")
    assert code == 0, err
    for p in (tmp_path / "x.pt", tmp_path / "back"):
        G = load_checkpoint(p).G
        assert G.cfg == tiny_G.cfg
        a, b = G.state_dict(), tiny_G.state_dict()
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    meta = json.loads((tmp_path / "back" / "config.json").read_text())["meta"]
    assert meta["converted_from"] == "rosinality"


def test_convert_refuses_existing_destination(capsys, ckpts, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    code, _, err = run_main(capsys, "convert", ckpts / "native", tmp_path / "dst")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exists" in err
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]


def test_info_prints_format_and_params(capsys, ckpts, tiny_G):
    code, out, err = run_main(capsys, "info", ckpts / "g.pt")
    assert code == 0, err
    assert "format      rosinality" in out
    assert f"{tiny_G.num_params():,}" in out
    assert "resolution  32" in out


def test_info_json(capsys, ckpts, tiny_G):
    code, out, _ = run_main(capsys, "info", ckpts / "native", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["format"] == "native"
    assert doc["params"]["total"] == tiny_G.num_params() == doc["params"]["mapping"] + doc["params"]["synthesis"]
    assert doc["config"] == tiny_G.cfg.to_dict()
    assert doc["num_ws"] == 8


# ----------------------------------------------------------------------------------------------------------
# user errors: exit 2, one stderr line, no traceback, nothing written


def test_missing_checkpoint_subprocess(tmp_path):
    r = run_cli("generate", "--checkpoint", tmp_path / "nope.pt", "--seeds", "0", "--outdir", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "not found" in r.stderr
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint_subprocess(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    r = run_cli("generate", "--checkpoint", tmp_path / "bad.pt", "--outdir", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--seeds", "3-1"], "end is before start"),
    (["--seeds", "a"], "invalid seed range"),
    (["--seeds", ""], "no seeds"),
    (["--seeds", "-1"], "invalid seed range"),
    (["--psi", "nan"], "--psi"),
    (["--psi", "inf"], "--psi"),
    (["--psi", "5"], "--psi"),
    (["--cutoff", "99"], "--cutoff"),
])
def test_bad_generate_arguments(capsys, ckpts, tmp_path, args, needle):
    code, out, err = run_main(capsys, "generate", "-c", ckpts / "native", "-o", tmp_path / "o", "--device", "cpu",
                              *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["empty", "random", "dir"])
def test_bad_checkpoints_in_process(capsys, tmp_path, kind):
    p = tmp_path / "ck.pt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "random":
        p.write_bytes(np.random.RandomState(0).bytes(1000))
    else:
        p.mkdir()
    code, _, err = run_main(capsys, "info", p)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_click_usage_errors_exit_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "generate", "--outdir", tmp_path / "o")  # --checkpoint missing
    assert code == 2 and "checkpoint" in err.lower()
    code, _, err = run_main(capsys, "frobnicate")
    assert code == 2


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in ("generate", "convert", "info", "train", "export"):
        assert name in r.stdout
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    assert "Example" in r.stdout and "--seeds" in r.stdout and "default" in r.stdout


# ----------------------------------------------------------------------------------------------------------
# common.files / common.seeds


@pytest.mark.parametrize("spec,want", [
    ("0-3,7", [0, 1, 2, 3, 7]),
    ("5", [5]),
    (5, [5]),
    ([2, 1], [2, 1]),
    ("3,3", [3, 3]),
    ("0-2,,5", [0, 1, 2, 5]),
    (" 1 - 2 , 9 ", [1, 2, 9]),
    ("4-4", [4]),
    ("4294967295", [2**32 - 1]),
    ("10-12,0", [10, 11, 12, 0]),
])
def test_parse_seeds(spec, want):
    assert parse_seeds(spec) == want


@pytest.mark.parametrize("spec,match", [
    ("3-1", "end is before start"),
    ("a", "invalid seed range"),
    ("1-", "invalid seed range"),
    ("-1", "invalid seed range"),
    ("1.5", "invalid seed range"),
    ("", "no seeds"),
    (",", "no seeds"),
    ("4294967296", "out of range"),
    ([-1], "out of range"),
    ("0-100000", "too many seeds"),
    ("0-99999999999999", "too many seeds"),
])
def test_parse_seeds_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_seeds(spec)


def test_parse_seeds_max_count():
    assert len(parse_seeds("0-9", max_count=10)) == 10
    with pytest.raises(ValueError, match="too many"):
        parse_seeds("0-9,11", max_count=10)


def test_next_run_dir_numbering(tmp_path):
    a = next_run_dir(tmp_path / "runs", "nada sketch!")
    assert a.name == "00000-nada-sketch" and a.is_dir()
    (a / "result.txt").write_text("keep")
    b = next_run_dir(tmp_path / "runs", "nada sketch!")
    assert b.name == "00001-nada-sketch"
    (tmp_path / "runs" / "00007-other").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("x")
    c = next_run_dir(tmp_path / "runs", "x")
    assert c.name == "00008-x"
    assert (a / "result.txt").read_text() == "keep"
    assert next_run_dir(tmp_path / "runs", "///").name == "00009-run"


def test_next_run_dir_concurrent_callers_never_share(tmp_path):
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(next_run_dir(tmp_path, "r"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20 and len(set(results)) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:05d}-r" for i in range(20)]


def test_atomic_directory_leaves_nothing_on_exception(tmp_path):
    dest = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(dest) as tmp:
            (tmp / "a.bin").write_bytes(b"123")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_success_and_no_overwrite(tmp_path):
    dest = tmp_path / "bundle"
    with atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not dest.exists()  # published only at the end
    assert (dest / "a.txt").read_text() == "1"
    assert oct(dest.stat().st_mode & 0o777) == oct(0o755)
    with pytest.raises(FileExistsError):
        with atomic_directory(dest) as tmp:  # refused before any work
            raise AssertionError("must not run")
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(dest)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    # a failed overwrite keeps the old content
    with pytest.raises(RuntimeError):
        with atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "c.txt").write_text("3")
            raise RuntimeError("boom")
    assert sorted(os.listdir(dest)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(p, b"abc")
    atomic_write_bytes(p, b"xyz")
    assert p.read_bytes() == b"xyz"
    assert os.listdir(tmp_path / "sub") == ["f.bin"]
    # a failing replace (the target is a non-empty directory) leaves no temporary file
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "d", b"data")
    assert sorted(os.listdir(tmp_path)) == ["d", "sub"]
