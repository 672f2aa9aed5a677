"""`stylecast train encoder` end to end: an e4e run on a folder + synthetic samples with the real dlib identity loss,
its run directory and outputs (loaded back), resume, finetuning with --init, --align on the real astronaut photo, and
one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from training.inversion.encoders import load_encoder


def _base(gen_ckpt, vgg, outdir):
    return ["train", "encoder", "-g", gen_ckpt, "--arch", "tiny", "--input-size", 32, "--batch", 4,
            "--vgg16-weights", vgg, "--outdir", outdir, "--val-images", 2, "--log-every", 1, "--lr", 1e-3,
            "--no-progress", "--device", "cpu"]


def test_train_encoder_run_resume_and_init(tmp_path, cli, offline, gen_ckpt, tiny_faces_dir, vgg16_random_file,
                                           tiny_G):
    runs = tmp_path / "runs"
    base = _base(gen_ckpt, vgg16_random_file, runs)
    code, out, err = cli(base + ["--kind", "e4e", "--data", tiny_faces_dir, "--synthetic", "--latent-lambda", 1,
                                 "--steps", 4, "--snapshot-every", 2, "--progressive-start", 1,
                                 "--progressive-step-every", 1])
    assert code == 0, err
    run = runs / "00000-e4e-encoder"
    assert "warning: skipping" in err and "broken.png" in err
    assert "6 images, 1 unreadable / faceless file(s) skipped + synthetic samples" in err
    assert out.strip() == f"done: step 4; last snapshot {run / 'snapshots' / '000004'}"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["format"] == "stylecast.encoder-train-config/v1"
    c = cfg["config"]
    assert c["id_loss"] == "dlib" and c["id_lambda"] == 0.1 and c["lpips_lambda"] == 0.8 and c["l2_lambda"] == 1.0
    assert c["w_discriminator_lambda"] == 0.1 and c["optimizer"] == "ranger" and c["delta_norm_lambda"] == 2e-4
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4]
    assert {"loss_id", "loss_lpips", "loss_l2", "loss_adv", "loss_latent", "loss_disc"} <= set(stats[-1])
    for step in ("000002", "000004"):
        native, official = load_encoder(run / "snapshots" / step), load_encoder(run / "snapshots" / f"{step}.pt")
        assert native.config == official.config and native.config.kind == "e4e"
        assert official.decoder is not None and official.decoder.cfg == tiny_G.cfg
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        assert torch.equal(native.encoder(x), official.encoder(x))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["000002.png", "000004.png", "init.png"]

    # Resume to a larger total; other options cannot change.
    code, out, err = cli(["train", "encoder", "--resume", run, "--steps", 6, "--no-progress", "--device", "cpu"])
    assert code == 0, err
    assert f"resuming {run} at step 4" in err and (run / "snapshots" / "000006").is_dir()
    assert json.loads((run / "state" / "training_state.json").read_text())["step"] == 6
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 6
    code, _, err = cli(["train", "encoder", "--resume", run, "--steps", 8, "--lr", 0.1])
    assert code == 2 and "--lr cannot change on --resume" in err
    code, _, err = cli(["train", "encoder", "--resume", run, "--steps", 6])
    assert code == 2 and "already reached step 6" in err

    # Finetune the result (official layout) on synthetic samples only.
    init = run / "snapshots" / "000006.pt"
    code, out, err = cli(base + ["--kind", "e4e", "--init", init, "--synthetic", "--steps", 1, "--no-progressive",
                                 "--w-discriminator-lambda", 0, "--id", "none"])
    assert code == 0, err
    second = runs / "00001-e4e-encoder"
    assert load_encoder(second / "snapshots" / "000001").config == load_encoder(init).config
    code, _, err = cli(base + ["--kind", "psp", "--init", init, "--synthetic", "--steps", 1, "--id", "none"])
    assert code == 2 and "is a e4e w+ encoder" in err


def test_train_encoder_align_on_load(tmp_path, cli, offline, gen_ckpt, astronaut_file, gradient_file,
                                     vgg16_random_file):
    from common import faces

    data = tmp_path / "photos"
    data.mkdir()
    Image.open(astronaut_file).save(data / "astronaut.png")
    Image.open(gradient_file).save(data / "gradient.png")  # no face: skipped and counted
    runs = tmp_path / "runs"
    code, out, err = cli(_base(gen_ckpt, vgg16_random_file, runs) + ["--data", data, "--align", "--steps", 1,
                                                                    "--id", "none", "--val-images", 1])
    assert code == 0, err
    assert "no face found" in err and "1 images, 1 unreadable / faceless file(s) skipped" in err
    grid = np.asarray(Image.open(runs / "00000-psp-encoder" / "samples" / "init.png").convert("RGB"))
    want = faces.align_photo(faces.read_image(astronaut_file), size=32)[0].img_u8
    assert np.array_equal(grid[:32, :32], want)  # the validation input is the FFHQ-aligned astronaut


def test_train_encoder_errors_are_one_line_and_leave_nothing(tmp_path, cli, offline, gen_ckpt, gradient_file,
                                                             vgg16_random_file):
    runs = tmp_path / "runs"
    base = _base(gen_ckpt, vgg16_random_file, runs) + ["--steps", 1]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    faceless = tmp_path / "faceless"
    faceless.mkdir()
    Image.open(gradient_file).save(faceless / "g.png")
    no_vgg = [a if a != vgg16_random_file else tmp_path / "missing.pth" for a in base]
    cases = [
        (base + ["--data", junk, "--id", "none"], "no readable images"),
        (base + ["--data", faceless, "--align", "--id", "none"], "no readable images"),
        (base + ["--id", "none"], "--data"),
        (base + ["--synthetic", "--kind", "psp", "--progressive-start", 5], "e4e options"),
        (base + ["--synthetic", "--id", "arcface:" + str(tmp_path / "model_ir_se50.pth")], "model_ir_se50.pth"),
        (base + ["--synthetic", "--id", "bogus"], "--id must be"),
        (no_vgg + ["--synthetic", "--id", "none"], "not found"),
        ([a if a != gen_ckpt else tmp_path / "nope.pt" for a in base] + ["--synthetic"], "not found"),
        (base + ["--synthetic", "--id", "none", "--batch", 4, "--input-size", 48], "power of two"),
    ]
    # offline without any VGG16 path: the message says how to supply it
    drop = base.index("--vgg16-weights")
    cases.append((base[:drop] + base[drop + 2:] + ["--synthetic", "--id", "none"], "STYLECAST_VGG16_WEIGHTS"))
    for args, needle in cases:
        code, out, err = cli(args)
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning: ")]
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (needle, err)
        assert not runs.exists() or not any(runs.iterdir())
