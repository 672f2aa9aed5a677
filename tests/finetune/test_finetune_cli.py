"""`stylecast train finetune` end to end: a few steps on a real folder, the run directory, resume, errors."""

from __future__ import annotations

import json
import re

import pytest

from stylecast.cli import main
from training.checkpoints import load_checkpoint


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_finetune_cli_run_and_resume(tmp_path, capsys, base_ckpt, red_folder):
    runs = tmp_path / "runs"
    code, out, err = run_cli(["train", "finetune", "--checkpoint", base_ckpt, "--data", red_folder, "--kimg", 0.02,
                              "--batch", 2, "--outdir", runs, "--snapshot-kimg", 0.01, "--sample-seeds", "0-3",
                              "--augment", "ada", "--mirror", "--no-progress"], capsys)
    assert code == 0, err
    run_dir = runs / "00000-finetune-red"
    assert "warning: skipping unreadable image" in err and "broken.jpg" in err
    assert "12 images at 16 px, 1 unreadable file(s) skipped; D from fresh" in err
    assert re.search(r"done: 0.02 kimg, [\d.]+ kimg/h", out)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["format"] == "stylecast.finetune-config/v1" and cfg["config"]["kimg"] == 0.02
    assert cfg["config"]["augment"] == "ada" and cfg["config"]["mirror"] is True
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["kimg"] == 0.02 and stats[-1]["kimg_per_hour"] > 0 and "loss_D" in stats[-1]
    for n in ("000000010", "000000020"):
        ck = load_checkpoint(run_dir / f"network-snapshot-{n}", with_discriminator=True, with_train_generator=True)
        assert ck.D is not None and ck.G_train is not None and ck.meta["finetune"]["cur_nimg"] == int(n)
        assert load_checkpoint(run_dir / f"network-snapshot-{n}.pt").G.cfg == ck.G.cfg
        assert (run_dir / "samples" / f"fakes{n}.png").is_file()

    # Resume to a larger total; other options cannot change.
    code, out, err = run_cli(["train", "finetune", "--resume", run_dir, "--kimg", 0.03, "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming" in err and "at 0.02 kimg (step 10)" in err
    assert json.loads((run_dir / "config.json").read_text())["config"]["kimg"] == 0.03
    assert (run_dir / "network-snapshot-000000030").is_dir()
    state = json.loads((run_dir / "state" / "training_state.json").read_text())
    assert state["step"] == 15 and state["cur_nimg"] == 30

    code, _, err = run_cli(["train", "finetune", "--resume", run_dir, "--kimg", 0.05, "--lr", 0.01], capsys)
    assert code == 2 and "--lr cannot change on --resume" in err
    code, _, err = run_cli(["train", "finetune", "--resume", run_dir, "--kimg", 0.03], capsys)
    assert code == 2 and "already reached 0.03 kimg" in err


def test_folder_without_readable_images_fails_clearly(tmp_path, capsys, base_ckpt):
    data = tmp_path / "junk"
    data.mkdir()
    (data / "a.png").write_bytes(b"not a png")
    (data / "b.webp").write_bytes(b"")
    runs = tmp_path / "runs"
    code, out, err = run_cli(["train", "finetune", "--checkpoint", base_ckpt, "--data", data, "--kimg", 1,
                              "--outdir", runs, "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1] == f"error: no readable images in {data} (2 files tried)"
    assert all(line.startswith("warning: skipping unreadable image") for line in lines[:-1]) and len(lines) == 3
    assert "Traceback" not in err
    assert not runs.exists()  # nothing half-written


@pytest.mark.parametrize("args,msg", [
    (["--kimg", 1], "--checkpoint, --data required"),
    (["--checkpoint", "nope.pt", "--data", ".", "--kimg", 1], "checkpoint not found"),
    (["--resume", "not-a-run"], "not a finetune run directory"),
])
def test_bad_invocations(tmp_path, capsys, args, msg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "finetune", "--outdir", tmp_path / "runs"] + args, capsys)
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
