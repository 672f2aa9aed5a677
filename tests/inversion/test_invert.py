"""`stylecast invert` end to end on the real astronaut photo (dlib alignment) with a tiny generator checkpoint and
random VGG16 weights: the run directory, shapes, the fall of the perceptual loss, re-rendering from the written
latent + noise, the encoder start (w+ and z+), and one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.inversion.encoders import EncoderConfig, build_encoder, codes_to_ws, save_encoder
from training.inversion.invert import img_to_u8, rerender


def _png(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def test_invert_astronaut_end_to_end(tmp_path, cli, offline, gen_ckpt, astronaut_file, vgg16_random_file, tiny_G):
    runs = tmp_path / "runs"
    code, out, err = cli(["invert", astronaut_file, "--checkpoint", gen_ckpt, "--outdir", runs, "--steps", 40,
                          "--vgg16-weights", vgg16_random_file, "--progress-grid", "--video", "--paste-back",
                          "--seed", 1, "--no-progress"])
    assert code == 0, err
    run = runs / "00000-invert-astronaut"
    assert out.strip() == str(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["format"] == "stylecast.invert-config/v1" and cfg["faces"] == 1
    assert cfg["config"]["projector"]["steps"] == 40 and cfg["config"]["projector"]["space"] == "w+"
    face = run / "face0"
    # config.json was written before any result
    assert (run / "config.json").stat().st_mtime_ns <= (face / "latent.npy").stat().st_mtime_ns

    ws = np.load(face / "latent.npy")
    assert ws.dtype == np.float32 and ws.shape == (1, tiny_G.num_ws, tiny_G.w_dim) and np.isfinite(ws).all()
    assert not (face / "w.npy").exists()
    noise_names = {n for n, _ in tiny_G.named_buffers() if n.endswith("noise_const")}
    with np.load(face / "noise.npz") as z:
        assert set(z.files) == noise_names
        shapes = dict(tiny_G.named_buffers())
        assert all(z[k].shape == tuple(shapes[k].shape) and z[k].dtype == np.float32 for k in z.files)
    target, rec = _png(face / "target.png"), _png(face / "reconstruction.png")
    assert target.shape == rec.shape == (32, 32, 3)
    history = [json.loads(line) for line in (face / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(40))
    m = json.loads((face / "metrics.json").read_text())
    assert m["perceptual_final"] < 0.8 * m["perceptual_init"], m
    assert np.isfinite(m["psnr"]) and m["psnr"] > 0 and len(m["quad"]) == 4
    # the written latent + noise render exactly the written reconstruction
    again = img_to_u8(rerender(tiny_G, face).clamp(-1, 1))
    assert np.abs(again.astype(int) - rec.astype(int)).max() <= 1

    grid = _png(face / "progress.png")
    assert grid.shape[0] >= 32 and grid.shape[1] > 32
    with Image.open(face / "progress.gif") as gif:
        assert gif.n_frames > 5 and gif.size == (32, 32)
    composite, photo = _png(run / "paste_back.png"), _png(astronaut_file)
    assert composite.shape == photo.shape
    changed = np.abs(composite.astype(int) - photo.astype(int)).max(axis=2) > 0
    quad = np.array(m["quad"])  # only inside the face's FFHQ square
    lo, hi = np.floor(quad.min(0)).astype(int) - 1, np.ceil(quad.max(0)).astype(int) + 1
    inside = np.zeros_like(changed)
    inside[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = True
    assert changed.any() and not (changed & ~inside).any()
    assert json.loads((run / "metrics.json").read_text())["faces"][0]["face"] == 0
    assert not list(runs.glob("**/*.partial")) and not list(runs.glob("**/.*.tmp"))

    # A second run never overwrites the first.
    code, out, err = cli(["invert", astronaut_file, "-c", gen_ckpt, "--outdir", runs, "--steps", 1,
                          "--vgg16-weights", vgg16_random_file, "--no-progress"])
    assert code == 0, err
    assert out.strip().endswith("00001-invert-astronaut")


@pytest.mark.parametrize("space", ["w+", "z+"])
def test_invert_starts_from_the_encoder(tmp_path, cli, offline, gen_ckpt, astronaut_file, vgg16_random_file,
                                        tiny_G, space):
    """--steps 0 returns the start point exactly: the encoder's guess (z+ mapped row by row), averaged over layers
    for --space w. --no-align takes an aligned image as it is."""
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig.tiny(latent_space=space, input_size=32)).eval()
    enc_dir = save_encoder(tmp_path / "enc", enc)
    aligned = tmp_path / "aligned.png"
    Image.fromarray(np.asarray(Image.open(astronaut_file).convert("RGB"))[60:260, 150:350]).save(aligned)
    code, out, err = cli(["invert", aligned, "-c", gen_ckpt, "--outdir", tmp_path / "runs", "--no-align",
                          "--encoder", enc_dir, "--space", "w", "--steps", 0, "--no-optimize-noise",
                          "--vgg16-weights", vgg16_random_file, "--no-progress"])
    assert code == 0, err
    face = tmp_path / "runs" / "00000-invert-aligned" / "face0"
    target = torch.from_numpy(_png(face / "target.png")).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        want = codes_to_ws(enc(enc.preprocess(target)), space, tiny_G.mapping).mean(1)  # [1, w_dim]
    w = np.load(face / "w.npy")
    ws = np.load(face / "latent.npy")
    np.testing.assert_allclose(w, want.numpy(), rtol=0, atol=1e-5)
    assert (ws == w[:, None]).all()  # one W code on every layer
    assert not (face / "noise.npz").exists() and (face / "encoder.png").is_file()
    m = json.loads((face / "metrics.json").read_text())
    assert "encoder_psnr" in m and m["steps"] == 0


def test_invert_errors_are_one_line_and_leave_nothing(tmp_path, cli, offline, gen_ckpt, astronaut_file,
                                                      gradient_file, vgg16_random_file):
    runs = tmp_path / "runs"
    base = ["-c", gen_ckpt, "--outdir", runs, "--steps", 2, "--no-progress"]
    cases = [
        (["invert", gradient_file, *base, "--vgg16-weights", vgg16_random_file], "no face found"),
        (["invert", astronaut_file, *base], "STYLECAST_VGG16_WEIGHTS"),  # offline, no weights anywhere
        (["invert", astronaut_file, *base, "--vgg16-weights", tmp_path / "nope.pth"], "not found"),
        (["invert", astronaut_file, *base, "--vgg16-weights", vgg16_random_file, "--no-align", "--paste-back"],
         "--no-align"),
        (["invert", tmp_path / "missing.jpg", *base, "--vgg16-weights", vgg16_random_file], "photo not found"),
        (["invert", astronaut_file, *base, "--vgg16-weights", vgg16_random_file, "--face", "3"],
         "out of range"),
    ]
    wrong = save_encoder(tmp_path / "wrong", build_encoder(EncoderConfig.tiny(n_styles=6, input_size=32)))
    cases.append((["invert", astronaut_file, *base, "--vgg16-weights", vgg16_random_file, "--encoder", wrong],
                  "latents"))
    for args, needle in cases:
        code, out, err = cli(args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and err.strip().count("\n") == 0 and needle in err, (needle, err)
        assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
