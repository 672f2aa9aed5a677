"""`stylecast train gatys` and `stylecast train fast-style` through the real entry point (stylecast.cli.main):
tiny runs write their outputs; bad inputs exit 2 with one line and leave no run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from stylecast.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_gatys_tiny_run_writes_config_intermediates_and_result(image_files, vgg_weights_file, tmp_path, capsys):
    code, out, err = run_cli(["train", "gatys", "--content", str(image_files["content"]), "--style",
                              str(image_files["style"]), "--style", str(image_files["content"]),
                              "--style-weights", "3,1", "--scales", "24,32", "--iterations", "2,1",
                              "--save-every", "1", "--original-colors", "--init", "content", "--device", "cpu",
                              "--vgg-weights", str(vgg_weights_file), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    (run,) = tmp_path.iterdir()
    assert run.name == "00000-gatys-content-style-content"
    doc = json.loads((run / "config.json").read_text())
    assert doc["format"] == "stylecast.gatys/v1"
    assert doc["config"]["scales"] == [24, 32] and doc["config"]["style_blend_weights"] == [3.0, 1.0]
    assert doc["config"]["content_layers"] == ["relu4_2"] and doc["config"]["style_weight"] == 100.0
    assert Image.open(run / "result.png").size == (24, 32)  # 48x64 content, longer side 32
    assert sorted(p.name for p in (run / "intermediate").iterdir()) == [
        "scale0-24px-iter00001.png", "scale0-24px-iter00002.png", "scale1-32px-iter00001.png"]
    assert "result.png" in out
    # A second run never overwrites the first.
    code, _, err = run_cli(["train", "gatys", "-c", str(image_files["content"]), "-s", str(image_files["style"]),
                            "--image-size", "24", "--iterations", "1", "--vgg-weights", str(vgg_weights_file),
                            "--out", str(tmp_path), "--save-every", "0"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-gatys-content-style-content",
                                                          "00001-gatys-content-style"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "huge", "offline", "blend", "scales", "tiny"])
def test_gatys_bad_inputs_exit_2_with_one_line(case, image_files, vgg_weights_file, tmp_path, capsys):
    content, style = str(image_files["content"]), str(image_files["style"])
    extra = ["--vgg-weights", str(vgg_weights_file)]
    needles: tuple[str, ...] = ()
    if case == "missing":
        content, needles = str(tmp_path / "nope.jpg"), ("nope.jpg", "no such image")
    elif case == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        style, needles = str(tmp_path / "bad.png"), ("bad.png", "cannot read image")
    elif case == "huge":
        extra += ["--image-size", "5000"]
        needles = ("--max-size",)
    elif case == "offline":
        extra = []
        needles = ("--vgg-weights", "STYLECAST_OFFLINE=1")
    elif case == "blend":
        extra += ["--style-weights", "1,2"]
        needles = ("--style-blend-weights", "2 values")
    elif case == "tiny":
        extra += ["--image-size", "16"]  # 48x64 content -> 12x16: relu5_1 needs 16 px on each side
        needles = ("too small", "12x16")
    elif case == "scales":
        extra += ["--scales", "256,128"]
        needles = ("scale",)
    out_dir = tmp_path / "runs"
    code, _, err = run_cli(["train", "gatys", "--content", content, "--style", style, "--iterations", "1",
                            "--out", str(out_dir), *extra], capsys)
    assert_one_line_error(code, err, *needles)
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing half-written


def test_fast_style_tiny_run_and_resume_rules(image_files, vgg_weights_file, tmp_path, capsys):
    args = ["train", "fast-style", "--style", str(image_files["style"]), "--data", str(image_files["data"]),
            "--image-size", "16", "--style-size", "24", "--batch-size", "2", "--iterations", "2",
            "--channels", "8", "--res-blocks", "1", "--checkpoint-every", "1", "--preview-every", "1",
            "--preview-count", "2", "--vgg-weights", str(vgg_weights_file), "--device", "cpu", "--workers", "0",
            "--out", str(tmp_path)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    (run,) = tmp_path.iterdir()
    assert run.name == "00000-fast-style-style"
    assert {p.name for p in run.iterdir()} == {"config.json", "files.txt", "previews", "checkpoints", "final"}
    assert {p.name for p in (run / "final").iterdir()} == {"config.json", "model.safetensors"}
    assert Image.open(run / "previews" / "step0000002.png").size == (32, 32)  # 2 columns, 2 rows of 16 px
    assert "warning: skipping unreadable training image" in err and "broken.jpg" in err
    code, _, err = run_cli(["train", "fast-style", "--resume", str(run), "--vgg-weights", str(vgg_weights_file)],
                           capsys)
    assert_one_line_error(code, err, "already finished")
    code, _, err = run_cli(["train", "fast-style", "--resume", str(run), "--iterations", "9"], capsys)
    assert_one_line_error(code, err, "--resume", "--iterations")


def test_fast_style_bad_inputs(image_files, vgg_weights_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out_dir = tmp_path / "runs"
    base = ["train", "fast-style", "--style", str(image_files["style"]), "--vgg-weights", str(vgg_weights_file),
            "--out", str(out_dir), "--iterations", "1"]
    code, _, err = run_cli(base + ["--data", str(tmp_path / "empty")], capsys)
    assert_one_line_error(code, err, "no images")
    code, _, err = run_cli(base + ["--data", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, "no such data folder")
    code, _, err = run_cli(["train", "fast-style", "--data", str(image_files["data"])], capsys)
    assert_one_line_error(code, err, "--style")
    code, _, err = run_cli(["train", "fast-style", "--style", str(image_files["style"]), "--data",
                            str(image_files["data"]), "--out", str(out_dir), "--iterations", "1"], capsys)
    assert_one_line_error(code, err, "--vgg-weights")  # offline, no weights anywhere
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize("command", ["gatys", "fast-style"])
def test_help_shows_an_example_and_defaults(command, capsys):
    code, out, _ = run_cli(["train", command, "--help"], capsys)
    assert code == 0
    assert "Example:" in out and f"stylecast train {command}" in out and "[default:" in out
    assert "--vgg-weights" in out and "--device" in out


def test_python_dash_m_error_is_one_line(tmp_path):
    """The real console path in a fresh interpreter: a missing image exits 2 with one line, no run folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STYLECAST_OFFLINE": "1"}
    env.pop("STYLECAST_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "stylecast", "train", "gatys", "--content", str(tmp_path / "x.jpg"),
                        "--style", str(tmp_path / "y.jpg"), "--out", str(tmp_path / "runs")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.jpg'}: no such image file"]
    assert not (tmp_path / "runs").exists()
