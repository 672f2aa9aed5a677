"""`stylecast blend` end to end on real files: rosinality / native / NADA-style inputs, previews, sweeps,
interpolation, N-model weights, and one-line errors that leave nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stylecast.cli import main
from training import blend as B
from training.checkpoints import generator_to_rosinality, load_checkpoint, save_native, save_rosinality
from training.generate import generate_images
from training.networks import GeneratorConfig


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture()
def ckpts(tmp_path, model_a, model_b, model_c):
    """A as a rosinality .pt, B as a native dir, C as a StyleGAN-NADA style .pt (g_ema only, no latent_avg)."""
    a = save_rosinality(tmp_path / "a.pt", model_a)
    b = save_native(tmp_path / "b", model_b)
    c = tmp_path / "c_nada.pt"
    torch.save({"g_ema": generator_to_rosinality(model_c)}, c)
    return a, b, c


def assert_same_state(G1, G2):
    s1, s2 = G1.state_dict(), G2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_switch_blend_with_preview_and_sweep(tmp_path, capsys, ckpts):
    a, b, _ = ckpts
    out = tmp_path / "toon.pt"
    code, stdout, err = run_cli(["blend", "--base", a, "--other", b, "--resolution", 8, "--level", 1, "--out", out,
                                 "--preview-seeds", "0-1", "--sweep", "4,8,16,32", "--psi", 1.0], capsys)
    assert code == 0, err
    A, Bm = load_checkpoint(a).G, load_checkpoint(b).G
    got = load_checkpoint(out).G
    assert_same_state(got, B.blend_models(A, Bm, 8, 1))
    R = A.cfg.resolution
    # Preview: rows = seeds, columns = base | other | blended, exactly what generate renders.
    prev = np.asarray(Image.open(tmp_path / "toon_preview.png"))
    assert prev.shape == (2 * R, 3 * R, 3)
    for col, G in enumerate((A, Bm, got)):
        imgs = generate_images(G, [0, 1], psi=1.0)
        for row in range(2):
            assert np.array_equal(prev[row * R:(row + 1) * R, col * R:(col + 1) * R], imgs[row]), (row, col)
    sweep = np.asarray(Image.open(tmp_path / "toon_sweep.png"))
    assert sweep.shape == (2 * R, 6 * R, 3)
    blended16 = generate_images(B.blend_models(A, Bm, 16, 1), [1], psi=1.0)[0]
    assert np.array_equal(sweep[R:, 4 * R:5 * R], blended16)
    assert "toon_preview.png" in stdout and "toon_sweep.png" in stdout


def test_soft_blend_native_out_and_nada_input(tmp_path, capsys, ckpts):
    a, _, c = ckpts
    out = tmp_path / "soft"
    code, _, err = run_cli(["blend", "--base", c, "--other", a, "--resolution", 16, "--blend-width", 0.7,
                            "--mapping", "other", "--out", out], capsys)
    assert code == 0, err
    ck = load_checkpoint(out)
    assert ck.format == "native" and ck.meta["blend"]["mode"] == "switch"
    assert ck.meta["blend"]["other_weight"]["synthesis.b16.conv0"] == 0.5
    assert_same_state(ck.G, B.blend_models(load_checkpoint(c).G, load_checkpoint(a).G, 16, 0, 0.7, mapping="other"))


def test_alpha_and_many_models(tmp_path, capsys, ckpts):
    a, b, c = ckpts
    code, _, err = run_cli(["blend", "--base", a, "--other", b, "--alpha", 0.5, "--out", tmp_path / "mid"], capsys)
    assert code == 0, err
    A, Bm, C = (load_checkpoint(p).G for p in (a, b, c))
    assert_same_state(load_checkpoint(tmp_path / "mid").G, B.interpolate_models(A, Bm, 0.5))
    code, _, err = run_cli(["blend", "--model", a, "--model", b, "--model", c, "--weights",
                            "4:1,0,0;8:1,0,0;16:0,1,0;*:0,0,1", "--out", tmp_path / "abc.pt",
                            "--preview-seeds", "3"], capsys)
    assert code == 0, err
    want = B.blend_many([A, Bm, C], {4: [1, 0, 0], 8: [1, 0, 0], 16: [0, 1, 0], 32: [0, 0, 1]})
    assert_same_state(load_checkpoint(tmp_path / "abc.pt").G, want)
    prev = np.asarray(Image.open(tmp_path / "abc_preview.png"))
    assert prev.shape == (32, 4 * 32, 3)  # three models | blended


@pytest.mark.parametrize("case", ["arch", "exists", "resolution", "alpha+res", "no-mode", "sweep"])
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, ckpts, make_gen, case):
    a, b, _ = ckpts
    out = tmp_path / "out.pt"
    args = ["blend", "--base", a, "--other", b, "--resolution", 16, "--out", out, "--preview-seeds", "0"]
    expect = None
    if case == "arch":
        wide = make_gen(GeneratorConfig.tiny(resolution=32, w_dim=32, max_channels=64, min_channels=16,
                                             mapping_layers=3), 9)
        args[4] = save_rosinality(tmp_path / "wide.pt", wide)
        expect = "architectures differ: mapping_layers: 2"
    elif case == "exists":
        out.write_bytes(b"keep me")
        expect = "already exists"
    elif case == "resolution":
        args[6] = 64
        expect = "switch resolution 64"
    elif case == "alpha+res":
        args += ["--alpha", "0.5"]
        expect = "--alpha is whole-model interpolation"
    elif case == "no-mode":
        args = ["blend", "--base", a, "--other", b, "--out", out]
        expect = "give --resolution"
    elif case == "sweep":
        args += ["--sweep", "8,64"]
        expect = "--sweep resolutions [64]"
    code, stdout, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()
    assert not (tmp_path / "out_preview.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
