"""NADA training on the tiny setup: the loss falls, frozen layers stay bit-identical, adaptive selection trains
exactly k layers, resume is exact, NaN stops cleanly, and the CLI writes checkpoints the rest of stylecast reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from training.checkpoints import load_checkpoint
from training.nada import NadaDivergedError, resume_nada, train_nada
from training.nada.clip import ClipBank, load_clip
from training.nada.layers import phase_units, unit_of, units_for_latents
from training.nada.losses import LossWeights, NadaLoss

TINY_CLIP = "stylecast-tiny-clip:random"


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]


@torch.no_grad()
def _eval_direction(G_frozen, G, n: int = 16) -> float:
    """Directional loss on a fixed batch (fixed noise), independent of the trainer's own objects."""
    loss_fn = NadaLoss.build(ClipBank([load_clip(TINY_CLIP)], [1.0]), "photo", "pencil sketch",
                             LossWeights(direction=1.0), resolution=G.resolution)
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(123))
    ws = G_frozen.map(z)
    torch.manual_seed(7)
    img_f = G_frozen.synthesis(ws, noise_mode="random")
    img_t = G.synthesis(ws, noise_mode="random")
    return loss_fn(img_f, img_t)[1]["direction"]


def test_short_run_lowers_the_loss_and_keeps_frozen_layers_bit_identical(nada_cfg, nada_source):
    cfg = nada_cfg(phase="texture", iters=12, save_interval=6, output_interval=6)
    result = train_nada(cfg, progress=False)
    run = result.run_dir
    src = nada_source["G"]
    # Outputs: config first, previews, native + rosinality checkpoints with resume states.
    doc = json.loads((run / "config.json").read_text())
    assert doc["config"]["phase"] == "texture" and doc["source"]["resolution"] == 32
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["000000.png", "000006.png", "000012.png"]
    for step in ("000006", "000012"):
        assert (run / "checkpoints" / step / "config.json").is_file()
        assert (run / "checkpoints" / f"{step}.pt").is_file()
        assert (run / "checkpoints" / f"{step}.state.safetensors").is_file()
    assert [r["step"] for r in _log(run)] == list(range(1, 13))

    trained = load_checkpoint(result.checkpoint).G
    # The loss falls (on a fixed evaluation batch, measured independently of the trainer).
    before, after = _eval_direction(src, src), _eval_direction(src, trained)
    assert after < before - 0.15, (before, after)
    # Frozen: mapping, w_avg, every to-RGB layer and every layer outside the phase; trained: the phase.
    units = phase_units(src.cfg, "texture")
    sd_src, sd_new = src.state_dict(), trained.state_dict()
    assert sd_src.keys() == sd_new.keys()
    changed = {k for k in sd_src if not torch.equal(sd_src[k], sd_new[k])}
    assert changed, "nothing trained"
    assert all(unit_of(k, units) is not None for k in changed)
    for k in sd_src:
        if k.startswith("mapping") or ".torgb." in k or unit_of(k, units) is None:
            assert torch.equal(sd_src[k], sd_new[k]), k
    assert {unit_of(k, units) for k in changed} == set(units)
    # The rosinality file holds the same generator (mapping and w_avg bit for bit).
    pt = load_checkpoint(result.rosinality).G.state_dict()
    assert all(torch.equal(pt[k], v) for k, v in sd_new.items())


def test_adaptive_selection_trains_exactly_k_layers_per_step(nada_cfg, nada_source):
    k = 2
    snapshots = [{n: p.detach().clone() for n, p in nada_source["G"].named_parameters()}]
    units_seen = []

    def callback(step, info):
        snapshots.append({n: p.detach().clone() for n, p in info["G"].named_parameters()})
        units_seen.append(info["units"])

    result = train_nada(nada_cfg(auto_layer_k=k, auto_layer_iters=1, iters=4), progress=False, callback=callback)
    log = _log(result.run_dir)
    cfg = nada_source["G"].cfg
    all_units = phase_units(cfg, "all", train_torgb=True) + [f"synthesis.b{r}.torgb" for r in cfg.resolutions]
    for step in range(1, 5):
        before, after = snapshots[step - 1], snapshots[step]
        moved = {unit_of(n, all_units) or n for n in before if not torch.equal(before[n], after[n])}
        assert len(moved) == k, (step, moved)
        assert moved == set(units_for_latents(cfg, log[step - 1]["latents"])) == set(units_seen[step - 1])
        assert all(u.endswith(("conv0", "conv1")) for u in moved)


def test_resume_continues_identically(nada_cfg, tmp_path):
    full = train_nada(nada_cfg(iters=6, save_interval=3, mixing=0.5, outdir=str(tmp_path / "a")), progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_5(step, info):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_nada(nada_cfg(iters=6, save_interval=3, mixing=0.5, outdir=str(tmp_path / "b")), progress=False,
                   callback=stop_at_5)
    run_b = next((tmp_path / "b").iterdir())
    assert (run_b / "checkpoints" / "000003").is_dir() and not (run_b / "checkpoints" / "000006").exists()
    # A save interrupted after the native directory but before its resume state is ignored and replaced.
    shutil.copytree(run_b / "checkpoints" / "000003", run_b / "checkpoints" / "000006")
    resumed = resume_nada(run_b, progress=False)
    assert resumed.step == 6 and resumed.run_dir == run_b
    a, b = load_checkpoint(full.checkpoint).G.state_dict(), load_checkpoint(resumed.checkpoint).G.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "sec"} for r in _log(full.run_dir)]
    assert strip == [{k: v for k, v in r.items() if k != "sec"} for r in _log(run_b)]
    # Extending a finished run continues from its last checkpoint.
    more = resume_nada(full.run_dir, iters=7, progress=False)
    assert more.step == 7 and (full.run_dir / "checkpoints" / "000007").is_dir()
    assert json.loads((full.run_dir / "config.json").read_text())["config"]["iters"] == 7


def test_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(nada_cfg, tmp_path):
    def poison(step, info):
        if step == 3:  # weights go bad after step 3; step 4's loss is NaN
            with torch.no_grad():
                info["G"].synthesis.b8.conv0.weight.fill_(float("nan"))

    with pytest.raises(NadaDivergedError) as err:
        train_nada(nada_cfg(iters=6, save_interval=2), progress=False, callback=poison)
    run = next((tmp_path / "runs").iterdir())
    msg = str(err.value)
    assert "diverged at step 4" in msg and "nan" in msg.lower() and "\n" not in msg
    assert str(run / "checkpoints" / "000002") in msg
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["000002", "000002.pt", "000002.state.safetensors"]  # nothing bad, nothing half-written
    good = load_checkpoint(run / "checkpoints" / "000002").G
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_nan_loss_with_good_weights_saves_them_before_stopping(nada_cfg, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = NadaLoss.__call__

    def flaky(self, *args, **kwargs):
        loss, parts = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return loss * float("inf"), {**parts, "loss": float("inf")}
        return loss, parts

    monkeypatch.setattr(NadaLoss, "__call__", flaky)
    with pytest.raises(NadaDivergedError, match="diverged at step 3: loss is inf"):
        train_nada(nada_cfg(iters=6, save_interval=5), progress=False)
    run = next((tmp_path / "runs").iterdir())
    assert (run / "checkpoints" / "000002.state.safetensors").is_file()  # the last good state, resumable
    assert [r["step"] for r in _log(run)] == [1, 2]


def test_cli_end_to_end(nada_source, tmp_path, capsys):
    """`stylecast train nada` on a rosinality .pt -> checkpoints that load_checkpoint and generate read."""
    from stylecast.cli import main
    out = tmp_path / "runs"
    style = tmp_path / "styles"
    style.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 30, 30)).save(style / "red.png")

    def run(args):
        with pytest.raises(SystemExit) as info:
            main(args)
        return info.value.code, capsys.readouterr()

    code, io = run(["train", "nada", "--checkpoint", str(nada_source["pt"]), "--source", "photo",
                    "--target", "pencil sketch", "--iters", "3", "--outdir", str(out), "--clip", TINY_CLIP,
                    "--save-interval", "2", "--output-interval", "2", "--no-progress", "--device", "cpu"])
    assert code == 0, io.err
    run_dir = next(out.iterdir())
    assert "checkpoints/000003" in io.out
    src = load_checkpoint(nada_source["pt"]).G.state_dict()
    for ck in (run_dir / "checkpoints" / "000003", run_dir / "checkpoints" / "000003.pt"):
        got = load_checkpoint(ck).G.state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.items() if k.startswith("mapping")), ck
    code, io = run(["generate", "--checkpoint", str(run_dir / "checkpoints" / "000003"), "--seeds", "0-1",
                    "--outdir", str(tmp_path / "gen"), "--device", "cpu"])
    assert code == 0, io.err
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["seed0000.png", "seed0001.png"]
    # Image-guided, no target text.
    code, io = run(["train", "nada", "--checkpoint", str(nada_source["native"]), "--style-images", str(style),
                    "--img2img-batch", "2", "--iters", "2", "--outdir", str(out), "--clip", TINY_CLIP,
                    "--no-progress", "--device", "cpu", "--output-interval", "0"])
    assert code == 0, io.err
    assert len(list(out.iterdir())) == 2
    # Resume with an option that would change the computation: a usage error, nothing written.
    code, io = run(["train", "nada", "--resume", str(run_dir), "--target", "cat"])
    assert code == 2 and "--target cannot be changed" in io.err
    code, io = run(["train", "nada", "--target", "cat", "--outdir", str(out)])
    assert code == 2 and "--checkpoint is required" in io.err
    code, io = run(["train", "nada", "--checkpoint", str(nada_source["pt"]), "--target", "x", "--outdir", str(out),
                    "--clip", TINY_CLIP, "--style-images", str(tmp_path / "nope"), "--no-progress"])
    assert code == 2 and io.err.startswith("error: style image folder not found")
    code, io = run(["train", "nada", "--checkpoint", str(nada_source["pt"]), "--target", "x", "--outdir", str(out),
                    "--clip", TINY_CLIP, "--auto-layer-k", "9", "--no-progress"])
    assert code == 2 and "exceeds the 7 W+ latents" in io.err
    assert len(list(out.iterdir())) == 2  # failed starts leave no run directory


def test_const_noise_jitter_tensorboard_and_several_clip_weights(nada_cfg, tmp_path):
    """Const noise: frozen images get pixel jitter (else the first image direction is 0/0); optional
    TensorBoard warns when the package is missing; improve-shape resolves the Colab preset."""
    try:
        import torch.utils.tensorboard  # noqa: F401
        has_tb = True
    except ImportError:
        has_tb = False
    cfg = nada_cfg(noise_mode="const", iters=2, tensorboard=True, improve_shape=True,
                   clip=(TINY_CLIP + "=0.25", TINY_CLIP + "=0.75"))
    with pytest.warns(RuntimeWarning) as record:
        result = train_nada(cfg, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "pixel noise" in messages
    assert has_tb == (result.run_dir / "tb").is_dir()
    if not has_tb:
        assert "tensorboard" in messages
    doc = json.loads((result.run_dir / "config.json").read_text())
    assert doc["config"]["auto_layer_k"] == 5 and doc["config"]["mixing"] == 0.9  # int(2 * (2*5 - 2) / 3)
    assert doc["config"]["clip"] == [TINY_CLIP + "=1"] and doc["clip"][0]["weight"] == 1.0
    assert all(r["loss"] == r["loss"] for r in _log(result.run_dir))
