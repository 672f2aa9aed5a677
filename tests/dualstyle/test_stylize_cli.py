"""`stylecast stylize` end to end on the astronaut: a tiny DualStyleGAN (native checkpoint), exstyle codes in the
official .npy layout and a tiny z+ pSp encoder (PyTorch path), and the dualstylegan bundle exported from the same
three files (the server's torch-free path) give the same pictures within one level; options, outputs and user
errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import faces as F

pytestmark = pytest.mark.timeout(300)

NAMES = ["a.jpg", "b.jpg", "c.jpg"]


@pytest.fixture(scope="module")
def files(tiny_G, tmp_path_factory) -> dict[str, Path]:
    import matplotlib.cbook as cbook
    from PIL import Image
    from skimage import data

    from export.dualstyle_bundle import DualStyleBundleOptions, build_dualstyle_bundle
    from training.dualstyle import DualStyleGAN, save_dualstylegan, save_exstyle_codes
    from training.inversion.encoders import EncoderConfig, build_encoder, save_encoder

    root = tmp_path_factory.mktemp("stylize_cli")
    torch.manual_seed(4)
    dual = DualStyleGAN.from_generator(copy.deepcopy(tiny_G), res_index=4)
    dual.init_extrinsic_path(modres_scale=0.5, colour_noise=0.5)
    g = torch.Generator().manual_seed(8)
    codes = save_exstyle_codes(root / "exstyle_code.npy", {n: torch.randn(1, 8, 64, generator=g) for n in NAMES})
    torch.manual_seed(6)
    enc = build_encoder(EncoderConfig.tiny(n_styles=8, w_dim=64, input_size=64, latent_space="z+")).eval()
    encoder = save_encoder(root / "psp_zplus", enc)
    ckpt = save_dualstylegan(root / "dsg", dual.eval())
    bundle = build_dualstyle_bundle(ckpt, codes, root / "bundle",
                                    DualStyleBundleOptions(name="toon", encoder=encoder))
    astro = root / "astronaut.png"
    Image.fromarray(data.astronaut()).save(astro)
    no_face = root / "gradient.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], (200, 1, 3))).save(no_face)
    return {"ckpt": ckpt, "codes": codes, "encoder": encoder, "bundle": bundle, "astronaut": astro,
            "grace": Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), "no_face": no_face,
            "root": root}


@pytest.fixture
def cli(capsys):
    from stylecast.cli import main

    def run(args: list) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return int(exc.value.code or 0), out.out + out.err
    return run


def read(path: Path) -> np.ndarray:
    return F.read_image(path)


def ckpt_args(files) -> list:
    return ["-m", files["ckpt"], "--styles", files["codes"], "--encoder", files["encoder"]]


def only_run(outdir: Path) -> Path:
    runs = sorted(outdir.iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-stylize"), runs
    return runs[0]


@pytest.mark.parametrize("options", [["--style-id", "1"],
                                     ["--style-id", "c.jpg", "--preserve-color", "--psi", "1"],
                                     ["--style-image", "GRACE", "--colour-only"]],
                         ids=["style-id", "name-preserve-color", "exemplar-colour-only"])
def test_pytorch_and_bundle_paths_agree(files, tmp_path, cli, options):
    options = [files["grace"] if o == "GRACE" else o for o in options]
    common = ["-i", files["astronaut"], *options]
    code, out = cli(["stylize", *ckpt_args(files), *common, "-o", tmp_path / "torch"])
    assert code == 0, out
    code, out2 = cli(["stylize", "-m", files["bundle"], *common, "-o", tmp_path / "bundle"])
    assert code == 0, out2
    a, b = only_run(tmp_path / "torch"), only_run(tmp_path / "bundle")
    cfg_a, cfg_b = (json.loads((r / "config.json").read_text()) for r in (a, b))
    assert (cfg_a["mode"], cfg_b["mode"]) == ("checkpoint", "bundle")
    assert cfg_a["weights"] == cfg_b["weights"] and cfg_a["psi"] == cfg_b["psi"] and cfg_a["style"] == cfg_b["style"]
    img_a, img_b = read(a / "astronaut.png"), read(b / "astronaut.png")
    photo = read(files["astronaut"])
    assert img_a.shape == photo.shape
    diff = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # the face was restyled; outside its quad the photo is untouched
    (face,) = F.align_photo(photo, size=64)
    lo = np.floor(face.quad.min(0)).astype(int) - 1
    hi = np.ceil(face.quad.max(0)).astype(int) + 1
    outside = np.ones(photo.shape[:2], bool)
    outside[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = False
    assert np.array_equal(img_a[outside], photo[outside])
    assert np.abs(img_a[~outside].astype(int) - photo[~outside].astype(int)).max() > 30


def test_options_change_the_picture_as_they_should(files, tmp_path, cli):
    """Through the bundle (fast): styles differ; with all-zero weights the style no longer matters; a name selects
    the same style as its index; crop mode writes the aligned crop; --out writes one PNG; runs are numbered."""
    def crop(*options) -> np.ndarray:
        out = tmp_path / f"c{len(list(tmp_path.iterdir()))}.png"
        code, text = cli(["stylize", "-m", files["bundle"], "-i", files["astronaut"], "--composite", "crop",
                          *options, "--out", out])
        assert code == 0, text
        return read(out)

    s0, s1 = crop("--style-id", "0"), crop("--style-id", "1")
    assert s0.shape == (32, 32, 3) and np.abs(s0.astype(int) - s1.astype(int)).max() > 8
    assert np.array_equal(crop("--style-id", "b.jpg"), s1)
    z0, z2 = crop("--style-id", "0", "--weights", "0*8"), crop("--style-id", "2", "--weights", "0*8")
    assert np.array_equal(z0, z2) and np.abs(z0.astype(int) - s0.astype(int)).max() > 8
    # --structure-only == explicit weights with zero colour layers
    assert np.array_equal(crop("--style-id", "1", "--structure-only"), crop("--style-id", "1", "--weights",
                                                                            "0.75*5,0*3"))
    outdir = tmp_path / "runs"
    for _ in range(2):
        code, text = cli(["stylize", "-m", files["bundle"], "-i", files["astronaut"], "--style-id", "0", "-o", outdir])
        assert code == 0, text
    assert [p.name for p in sorted(outdir.iterdir())] == ["00000-stylize", "00001-stylize"]
    assert sorted(p.name for p in (outdir / "00001-stylize").iterdir()) == ["astronaut.png", "config.json"]


@pytest.mark.parametrize("case", ["no face", "style id", "style name", "weights", "both outputs", "styles with bundle",
                                  "no encoder", "exemplar without face", "psi"])
def test_user_errors_are_one_line_and_write_nothing(files, tmp_path, cli, case):
    outdir = tmp_path / "out"
    base = ["stylize", "-m", files["bundle"], "-i", files["astronaut"], "-o", outdir]
    args, expect = {
        "no face": (["stylize", *ckpt_args(files), "-i", files["astronaut"], "-i", files["no_face"], "--style-id", "0",
                     "-o", outdir], "no face found"),
        "style id": ([*base, "--style-id", "3"], "the library has 3 styles"),
        "style name": ([*base, "--style-id", "zzz.jpg"], "no style of that name"),
        "weights": ([*base, "--style-id", "0", "--weights", "1,1"], "the model has 8 layers"),
        "both outputs": ([*base, "--style-id", "0", "--out", tmp_path / "x.png"], "exactly one of --outdir"),
        "styles with bundle": ([*base, "--style-id", "0", "--styles", files["codes"]], "a bundle carries its own"),
        "no encoder": (["stylize", "-m", files["ckpt"], "--styles", files["codes"], "-i", files["astronaut"],
                        "--style-id", "0", "-o", outdir], "--encoder is required"),
        "exemplar without face": ([*base, "--style-image", files["no_face"]], "no face found in the style image"),
        "psi": ([*base, "--style-id", "0", "--psi", "nan"], "--psi"),
    }[case]
    code, out = cli(args)
    assert code == 2 and expect in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not outdir.exists() or not any(outdir.iterdir())
    assert not (tmp_path / "x.png").exists()


def test_bundle_path_never_imports_torch(files, tmp_path):
    """`stylecast stylize --model BUNDLE` is the server's torch-free pipeline: torch is never imported."""
    import subprocess
    import sys
    script = ("import sys\nfrom stylecast.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    out = tmp_path / "one.png"
    proc = subprocess.run([sys.executable, "-c", script, "stylize", "-m", str(files["bundle"]), "-i",
                           str(files["astronaut"]), "--style-id", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    assert read(out).shape == (512, 512, 3)


def test_bundle_without_encoder_takes_another_bundles_encoder(files, tmp_path, cli):
    """A dualstylegan bundle exported with --encoder-from renders with `--encoder OTHER_BUNDLE` exactly as the bundle
    that ships that encoder (same model files, same encoder.onnx); without it the error says what is missing."""
    from export.dualstyle_bundle import DualStyleBundleOptions, build_dualstyle_bundle
    shared = build_dualstyle_bundle(files["ckpt"], files["codes"], tmp_path / "shared",
                                    DualStyleBundleOptions(name="shared", encoder_from=files["bundle"]))
    args = ["stylize", "-i", files["astronaut"], "--style-id", "1", "--composite", "crop"]
    assert cli([*args, "-m", files["bundle"], "--out", tmp_path / "own.png"])[0] == 0
    code, out = cli([*args, "-m", shared, "--encoder", files["bundle"], "--out", tmp_path / "shared.png"])
    assert code == 0, out
    assert np.array_equal(read(tmp_path / "own.png"), read(tmp_path / "shared.png"))
    code, out = cli([*args, "-m", shared, "--out", tmp_path / "none.png"])
    assert code == 2 and "has no encoder.onnx" in out and "'toon'" in out, out
    # In a model repository (the encoder's bundle next to it) it is found as the server finds it.
    import shutil
    shutil.copytree(files["bundle"], tmp_path / "repo" / "with-encoder")
    shutil.copytree(shared, tmp_path / "repo" / "shared")
    code, out = cli([*args, "-m", tmp_path / "repo" / "shared", "--out", tmp_path / "found.png"])
    assert code == 0, out
    assert np.array_equal(read(tmp_path / "own.png"), read(tmp_path / "found.png"))
