"""DualStyleGAN training on tiny models: destylization lowers its loss, Stage II learns a fixed batch, Stage III
trains only the extrinsic path, every stage resumes bit for bit, two torchrun processes equal one, the CLI end to
end with its one-line errors, and every output loads back."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from stylecast.cli import main
from training.checkpoints import load_checkpoint
from training.dualstyle import DualStyleGAN, load_dualstylegan, load_exstyle_codes, save_dualstylegan
from training.dualstyle.common import DualStyleDivergedError, colour_start, inject_schedule, invert_mapping
from training.dualstyle.destylize import DestylizeConfig, DestylizeRun, RefineConfig, RefineRun
from training.dualstyle.trainer import (DualFinetuneConfig, DualFinetuneRun, PretrainConfig, PretrainRun,
                                        d_logits)

RES_INDEX = 2  # as in conftest.py: 16 px, 6 latents, ModRes on 0..2

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# Helpers and fixtures


def _extrinsic(model: DualStyleGAN) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("generator.")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stats(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "sec"} for line in lines]


@pytest.fixture(scope="session")
def encoders(tmp_path_factory, ds_cfg) -> dict[str, Path]:
    """Tiny random pSp encoders saved natively: one predicting ws (W+), one predicting z+ codes."""
    from training.inversion.encoders import EncoderConfig, build_encoder, save_encoder

    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for space in ("w+", "z+"):
        torch.manual_seed(3)
        cfg = EncoderConfig.tiny(n_styles=ds_cfg.num_ws, w_dim=ds_cfg.w_dim, input_size=32, latent_space=space,
                                 add_latent_avg=False)
        out[space] = save_encoder(root / space.replace("+", "plus"), build_encoder(cfg).eval())
    return out


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, ds_files) -> Path:
    """A DualStyleGAN (Stage I init of the tiny base) saved natively, standing in for a pretrain snapshot."""
    G = load_checkpoint(ds_files["base"]).G
    torch.manual_seed(7)
    model = DualStyleGAN.from_generator(G, res_index=RES_INDEX)
    with torch.no_grad():  # a visible ModRes residual, as after some pretraining
        for block in model.modres:
            block.conv0.weight.mul_(20)
            block.conv1.weight.mul_(20)
    return save_dualstylegan(tmp_path_factory.mktemp("pre") / "pretrained", model)


@pytest.fixture(scope="session")
def codes(tmp_path_factory, ds_files, ds_cfg) -> dict[str, Path]:
    """Random exstyle / instyle z+ codes for the four style images, in both file formats."""
    from training.dualstyle import save_exstyle_codes

    root = tmp_path_factory.mktemp("codes")
    g = torch.Generator().manual_seed(11)
    names = sorted(p.name for p in ds_files["styles"].iterdir())
    ex = {n: torch.randn(1, ds_cfg.num_ws, ds_cfg.z_dim, generator=g).numpy() for n in names}
    ins = {n: torch.randn(1, ds_cfg.num_ws, ds_cfg.z_dim, generator=g).numpy() for n in names}
    save_exstyle_codes(root / "exstyle_code.npy", ex)
    save_exstyle_codes(root / "instyle_code.safetensors", ins)
    return {"exstyle": root / "exstyle_code.npy", "instyle": root / "instyle_code.safetensors", "dir": root}


def pretrain_cfg(ds_files, tmp_path, **kw) -> PretrainConfig:
    base = dict(checkpoint=str(ds_files["base"]), res_index=RES_INDEX, phase_iters=(2, 2, 4), batch=2,
                snapshot_every=4, sample_every=4, sample_seeds=(0, 1), style_seeds=(5, 6), loss_size=16,
                outdir=str(tmp_path / "runs"))
    base.update(kw)
    return PretrainConfig(**base)


def finetune_cfg(ds_files, pretrained, codes, tmp_path, **kw) -> DualFinetuneConfig:
    base = dict(checkpoint=str(pretrained), data=str(ds_files["styles"]), exstyle=str(codes["exstyle"]),
                instyle=str(codes["instyle"]), discriminator=str(ds_files["finetuned"]), iters=6, batch=2,
                snapshot_every=3, snapshot_begin=0, sample_every=3, sample_seeds=(0, 1), sample_styles=2,
                loss_size=16, outdir=str(tmp_path / "runs"))
    base.update(kw)
    return DualFinetuneConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# Pieces


def test_official_indices_generalise_from_res_index():
    assert inject_schedule(6, 18) == (7, 6, 5) and colour_start(6, 18) == 8  # the official 1024 px numbers
    assert inject_schedule(2, 6) == (3, 2, 1) and colour_start(2, 6) == 4
    assert inject_schedule(0, 6) == (1, 1, 1) and colour_start(6, 8) == 8


def test_invert_mapping_recovers_ws(ds_files, ds_cfg):
    G = load_checkpoint(ds_files["base"]).G
    z = torch.randn(2, ds_cfg.num_ws, ds_cfg.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ws = G.mapping(z.reshape(-1, ds_cfg.z_dim)).reshape(2, ds_cfg.num_ws, -1)
    z0, res0 = invert_mapping(G, ws, steps=0)
    z_hat, res = invert_mapping(G, ws, steps=300)
    assert res0.mean() > 0.2 and float(res.max()) < 0.03  # the optimisation does the work
    assert torch.allclose(z_hat.norm(dim=2), torch.full((2, ds_cfg.num_ws), ds_cfg.z_dim ** 0.5), atol=1e-4)
    with torch.no_grad():
        back = G.mapping(z_hat.reshape(-1, ds_cfg.z_dim)).reshape_as(ws)
    assert torch.allclose(back, ws, atol=0.05 * float(ws.abs().max()))


def test_d_logits_groups_contiguous_samples(ds_files):
    D = load_checkpoint(ds_files["base"], with_discriminator=True).D  # minibatch-stddev group 2
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = d_logits(D, x)
        chunks = torch.cat([D(x[i: i + 2]) for i in range(0, 6, 2)])
        stock = D(x)
    assert torch.allclose(whole, chunks, atol=1e-6)  # = every process evaluating its own slice
    assert not torch.allclose(whole, stock, atol=1e-4)  # the stock strided groups differ


# ----------------------------------------------------------------------------------------------------------
# Destylization and refinement


@pytest.mark.parametrize("space", ["w+", "z+"])
def test_destylization_lowers_its_loss_and_writes_loadable_codes(tmp_path, ds_files, ds_cfg, nets, encoders, space):
    cfg = DestylizeConfig(base=str(ds_files["base"]), finetuned=str(ds_files["finetuned"]),
                          data=str(ds_files["styles"]), encoder=str(encoders[space]), iters=30, res_index=RES_INDEX,
                          invert_steps=40, loss_size=16, outdir=str(tmp_path / "runs"))
    run = DestylizeRun.start(cfg, nets=nets)
    assert run.encoder.space == space
    run.create_run_dir()
    assert json.loads((run.run_dir / "config.json").read_text())["config"]["iters"] == 30
    run.run(progress=False)
    for name, hist in run.history.items():
        assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], (name, hist[0], hist[-1])
        assert hist[-1]["lpips"] < hist[0]["lpips"]
    ex = load_exstyle_codes(run.run_dir / "exstyle_code.npy")
    ins = load_exstyle_codes(run.run_dir / "instyle_code.safetensors")
    assert list(ex) == run.names == ["s0.png", "s1.png", "s2.png", "s3.png"]
    c = colour_start(RES_INDEX, ds_cfg.num_ws)
    for n in ex:
        assert ex[n].shape == (1, ds_cfg.num_ws, ds_cfg.z_dim)
        np.testing.assert_array_equal(ins[n][:, c:], ex[n][:, c:])  # colour latents kept from the encoder
        assert not np.array_equal(ins[n][:, :c], ex[n][:, :c])
    assert load_exstyle_codes(run.run_dir / "exstyle_code.safetensors").keys() == ex.keys()
    assert len(list((run.run_dir / "destylized").glob("*.png"))) == 4


def test_destylization_resumes_identically_without_encoder(tmp_path, ds_files, nets):
    cfg = DestylizeConfig(base=str(ds_files["base"]), finetuned=str(ds_files["finetuned"]),
                          data=str(ds_files["styles"]), iters=4, res_index=RES_INDEX, invert_steps=20, loss_size=16,
                          outdir=str(tmp_path / "runs"))
    straight = DestylizeRun.start(cfg, nets=nets)
    straight.create_run_dir()
    straight.run(progress=False)
    broken = DestylizeRun.start(cfg, nets=nets)
    broken.create_run_dir()
    broken.run(progress=False, max_images=2)  # "interrupted" after two images
    assert not (broken.run_dir / "exstyle_code.npy").exists()
    resumed = DestylizeRun.resume(broken.run_dir, nets=nets)
    assert resumed.num_done == 2
    resumed.run(progress=False)
    for out in ("exstyle_code", "instyle_code"):
        a = load_exstyle_codes(straight.run_dir / f"{out}.npy")
        b = load_exstyle_codes(broken.run_dir / f"{out}.npy")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert len((broken.run_dir / "log.jsonl").read_text().splitlines()) == 4


def test_refinement_lowers_its_loss_and_resumes_identically(tmp_path, ds_files, pretrained, codes, nets):
    cfg = RefineConfig(checkpoint=str(pretrained), data=str(ds_files["styles"]), exstyle=str(codes["exstyle"]),
                       instyle=str(codes["instyle"]), iters=12, lr_colour=0.1, lr_structure=0.05, loss_size=16,
                       outdir=str(tmp_path / "runs"))
    straight = RefineRun.start(cfg, nets=nets)
    straight.create_run_dir()
    straight.run(progress=False)
    for hist in straight.history.values():
        assert hist[-1]["loss"] < hist[0]["loss"]
    broken = RefineRun.start(cfg, nets=nets)
    broken.create_run_dir()
    broken.run(progress=False, max_images=3)
    RefineRun.resume(broken.run_dir, nets=nets).run(progress=False)
    a = load_exstyle_codes(straight.run_dir / "refined_exstyle_code.npy")
    b = load_exstyle_codes(broken.run_dir / "refined_exstyle_code.safetensors")
    original = load_exstyle_codes(codes["exstyle"])
    assert a.keys() == b.keys() == original.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], original[k]) for k in a)


def test_destylize_align_checks_every_image_first(tmp_path, ds_files, nets):
    from PIL import Image
    from skimage import data

    from stylecast.commands.train_dualstylegan import align_style_images

    styles = tmp_path / "styles"
    styles.mkdir()
    Image.fromarray(data.astronaut()).save(styles / "a_astronaut.png")
    cfg = DestylizeConfig(base=str(ds_files["base"]), finetuned=str(ds_files["finetuned"]), data=str(styles),
                          align=True, iters=1, res_index=RES_INDEX, invert_steps=0, loss_size=16,
                          outdir=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="--align needs a face aligner"):
        DestylizeRun.start(cfg, nets=nets)
    run = DestylizeRun.start(cfg, nets=nets, aligner=align_style_images)
    assert run.aligned[0].shape == (16, 16, 3) and run.aligned[0].dtype == np.uint8
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(styles / "b_noise.png")
    with pytest.raises(ValueError, match=r"--align: 1 of 2 style images have no detectable face \(first: .*b_noise"):
        DestylizeRun.start(cfg, nets=nets, aligner=align_style_images)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------
# Stage I + II


def test_pretrain_resumes_identically(tmp_path, ds_files, nets, encoders):
    cfg = pretrain_cfg(ds_files, tmp_path, data=str(ds_files["faces"]), encoder=str(encoders["z+"]),
                       subspace_freq=2)
    straight = PretrainRun.start(cfg, nets=nets)
    assert straight.cfg.inject == (3, 2, 1) and straight.d_source == str(ds_files["base"])
    straight.create()
    last = straight.run(progress=False)
    broken = PretrainRun.start(cfg, nets=nets)
    broken.create()
    broken.run(progress=False, until=3)  # mid-phase, between the regularisation steps
    resumed = PretrainRun.resume(broken.run_dir, nets=nets)
    assert resumed.step == 3
    resumed.run(progress=False)
    assert _same(_extrinsic(straight.model), _extrinsic(resumed.model))
    assert _same(_extrinsic(straight.ema), _extrinsic(resumed.ema))
    assert _same(straight.D.state_dict(), resumed.D.state_dict())
    assert _stats(straight.run_dir) == _stats(broken.run_dir)
    steps = _stats(straight.run_dir)
    assert [s["step"] for s in steps] == list(range(1, 9)) and "loss_R1" in steps[0] and "loss_PL" in steps[4]

    # The snapshot is the EMA model, in both layouts, on the untouched base generator.
    nat, pt = load_dualstylegan(last), load_dualstylegan(last.with_suffix(".pt"))
    assert last.name == "network-snapshot-000008"
    assert _same(_extrinsic(nat), _extrinsic(straight.ema.cpu())) and _same(_extrinsic(pt), _extrinsic(nat))
    base = load_checkpoint(ds_files["base"]).G.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in nat.generator.state_dict().items())
    assert (straight.run_dir / "samples" / "grid-000008.png").is_file()


def test_stage2_perceptual_loss_falls_on_a_fixed_batch(tmp_path, ds_files, nets):
    run = PretrainRun.start(pretrain_cfg(ds_files, tmp_path, phase_iters=(0, 0, 40)), nets=nets)
    gen = torch.Generator().manual_seed(0)
    batch = run.g_batch(gen)  # injection index r - 1: the target's structure layers r-1, r come from z2
    losses = []
    for _ in range(40):
        fake = run.render(run.model, batch)
        loss = run.g_losses(batch, fake)["perc"]
        losses.append(loss.item())
        run.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        run.opt_G.step()
    assert losses[-1] < 0.75 * losses[0], losses[::8]


# ----------------------------------------------------------------------------------------------------------
# Stage III


def test_stage3_trains_only_the_extrinsic_path(tmp_path, ds_files, pretrained, codes, nets):
    run = DualFinetuneRun.start(finetune_cfg(ds_files, pretrained, codes, tmp_path, iters=4), nets=nets)
    assert run.d_source == str(ds_files["finetuned"])
    before = load_dualstylegan(pretrained)
    run.create()
    last = run.run(progress=False)
    after = load_dualstylegan(last)
    gen_before, gen_after = before.generator.state_dict(), after.generator.state_dict()
    assert all(torch.equal(gen_before[k], v) for k, v in gen_after.items())  # mapping + synthesis untouched
    assert all(torch.equal(gen_before[k], v) for k, v in run.G.state_dict().items())
    ex_b, ex_a = _extrinsic(before), _extrinsic(after)
    changed = [k for k in ex_b if not torch.equal(ex_b[k], ex_a[k])]
    assert any(k.startswith("modres.") for k in changed) and any(k.startswith("colour_transform.") for k in changed)
    stats = _stats(run.run_dir)
    assert {"G_fm", "G_cx", "G_id", "G_reg", "G_adv"} <= set(stats[0]) and "G_perc" in stats[1]  # paired: odd steps
    assert load_exstyle_codes(run.run_dir / "exstyle_code.npy").keys() == load_exstyle_codes(codes["exstyle"]).keys()


def test_stage3_resumes_identically_to_a_larger_total(tmp_path, ds_files, pretrained, codes, nets):
    straight = DualFinetuneRun.start(finetune_cfg(ds_files, pretrained, codes, tmp_path), nets=nets)
    straight.create()
    straight.run(progress=False)
    short = DualFinetuneRun.start(finetune_cfg(ds_files, pretrained, codes, tmp_path, iters=4), nets=nets)
    short.create()
    short.run(progress=False)
    resumed = DualFinetuneRun.resume(short.run_dir, nets=nets, iters=6)
    resumed.run(progress=False)
    assert _same(_extrinsic(straight.model), _extrinsic(resumed.model))
    assert _same(_extrinsic(straight.ema), _extrinsic(resumed.ema))
    assert _same(straight.D.state_dict(), resumed.D.state_dict())
    assert _stats(straight.run_dir) == _stats(short.run_dir)
    assert json.loads((short.run_dir / "config.json").read_text())["config"]["iters"] == 6


def test_stage3_nan_guard(tmp_path, ds_files, pretrained, codes, nets):
    class NaNVGG(torch.nn.Module):
        layers = nets.vgg19.layers

        def forward(self, img, layers=None):
            return {k: v * float("nan") for k, v in nets.vgg19(img, layers).items()}

    run = DualFinetuneRun.start(finetune_cfg(ds_files, pretrained, codes, tmp_path),
                                nets=dataclasses.replace(nets, vgg19=NaNVGG()))
    run.create()
    with pytest.raises(DualStyleDivergedError, match="finetune diverged at step 0 in the generator update"):
        run.run(progress=False)
    assert not list(run.run_dir.glob("network-snapshot-*"))


# ----------------------------------------------------------------------------------------------------------
# Two torchrun processes == one process


WORKER = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from training import distributed as D
    from training.dualstyle.common import LossNets, VGG19_LAYERS
    from training.dualstyle.trainer import PretrainConfig, PretrainRun, DualFinetuneConfig, DualFinetuneRun
    from training.inversion.losses import IDLoss
    from training.style.vgg import random_vgg19
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # see the test's docstring
    from training.networks import stylegan2

    def mapping_float64(self, z, update_w_avg=False):  # the stock mapping computes in float32, as NVlabs
        x = stylegan2.normalize_2nd_moment(z.to(torch.float64))
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x

    stylegan2.MappingNetwork.forward = mapping_float64
    base, faces, pretrained, styles, ex, ins, ft, out = sys.argv[1:9]
    env = D.init("cpu")
    torch.manual_seed(0)
    idnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(8))
    idnet(torch.zeros(1, 3, 16, 16))
    nets = LossNets(vgg19=random_vgg19(VGG19_LAYERS, seed=0), identity=IDLoss(idnet))

    def record(run, grads):
        # The gradient of every update after the all-reduce (what the optimiser steps with), flattened.
        sync = run._sync
        def _sync(params):
            sync(params)
            grads.append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone())
        run._sync = _sync

    result = {}
    for stage in ("pretrain", "finetune"):
        if stage == "pretrain":
            cfg = PretrainConfig(checkpoint=base, data=faces, res_index=2, phase_iters=(1, 1, 3), batch=4,
                                 loss_size=16, snapshot_every=100, sample_every=0, outdir=out + "/runs", seed=3)
            run = PretrainRun.start(cfg, nets=nets, env=env)
        else:
            cfg = DualFinetuneConfig(checkpoint=pretrained, data=styles, exstyle=ex, instyle=ins, discriminator=ft,
                                     iters=4, batch=4, loss_size=16, snapshot_every=100, snapshot_begin=100,
                                     sample_every=0, outdir=out + "/runs", seed=4)
            run = DualFinetuneRun.start(cfg, nets=nets, env=env)
        grads = []
        record(run, grads)
        run.create()
        run.run(progress=False)
        params = torch.cat([p.detach().reshape(-1) for p in run.ex_params + run.d_params])
        torch.save({"grads": grads, "params": params}, f"{out}/{stage}.rank{env.rank}.pt")
        if env.is_main:
            result[stage] = [json.loads(x) for x in (run.run_dir / "stats.jsonl").read_text().splitlines()]
    result["world"] = env.world_size
    result["runs"] = sorted(p.name for p in Path(out, "runs").iterdir())
    D.barrier(env)
    if env.is_main:
        Path(out, "result.json").write_text(json.dumps(result))
    D.shutdown()
""")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_two_processes_train_like_one(tmp_path, ds_files, pretrained, codes):
    """Pretrain and finetune with a global batch of 4: 2 gloo processes (2 images each) vs 1 process.

    Both run in float64. In float32 the two differ by reduction order (~1e-7 relative in the first gradients), and
    these tiny networks amplify that: Adam's steps with beta1 = 0 are sign-like for entries whose gradient nearly
    cancels, so after a few steps single gradients differ by ~1e-2 although nothing is wrong. In float64 the same
    code must agree to ~1e-10 in every gradient of every update, every parameter and every logged loss, which a
    slicing mistake (two ranks on the same images, unequal minibatch-stddev groups, a missing all-reduce, a
    local instead of global statistic) cannot.
    """
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(a) for a in (ds_files["base"], ds_files["faces"], pretrained, ds_files["styles"], codes["exstyle"],
                             codes["instyle"], ds_files["finetuned"])]
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        launcher = [sys.executable] if world == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        r = subprocess.run(launcher + [str(script)] + args + [str(out)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results[world] = json.loads((out / "result.json").read_text())
    one, two = results[1], results[2]
    assert one["world"] == 1 and two["world"] == 2
    assert two["runs"] == ["00000-dualstylegan-pretrain", "00001-dualstylegan-finetune-styles"]  # rank 0 writes
    for stage in ("pretrain", "finetune"):
        ref = torch.load(tmp_path / "world1" / f"{stage}.rank0.pt")
        r0, r1 = (torch.load(tmp_path / "world2" / f"{stage}.rank{k}.pt") for k in (0, 1))
        assert torch.equal(r0["params"], r1["params"])  # the ranks stay bit-identical
        assert len(ref["grads"]) == len(r0["grads"]) >= 10  # D, G (+ R1, path length) per step
        errors = [_rel(a, b) for a, b in zip(r0["grads"], ref["grads"])]
        assert max(errors) < 1e-9, errors
        assert _rel(r0["params"], ref["params"]) < 1e-12
        for a, b in zip(two[stage], one[stage]):
            assert a["step"] == b["step"] and a.keys() == b.keys()
            for k in a:
                if k != "sec":
                    assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), (stage, a["step"], k)
        init = torch.load(tmp_path / "world1" / f"{stage}.rank0.pt")["grads"][0]
        assert init.norm() > 0  # the updates were real


# ----------------------------------------------------------------------------------------------------------
# The CLI


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _only_run(outdir: Path, kind: str) -> Path:
    runs = sorted(outdir.glob(f"*-dualstylegan-{kind}*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_cli_end_to_end(tmp_path, capsys, ds_files, weight_files, monkeypatch):
    monkeypatch.setenv("STYLECAST_OFFLINE", "1")
    runs = tmp_path / "runs"
    common = ["--outdir", runs, "--no-progress", "--device", "cpu"]
    code, out, err = run_cli(["train", "dualstylegan", "destylize", "--base", ds_files["base"], "--finetuned",
                              ds_files["finetuned"], "--data", ds_files["styles"], "--iters", 3, "--res-index", 2,
                              "--invert-steps", 10, "--id", "none", "--vgg16-weights", weight_files["vgg16"]]
                             + common, capsys)
    assert code == 0, err
    dst = _only_run(runs, "destylize")
    assert "codes start from the mean face (no --encoder); identity loss off (--id none)" in err
    assert load_exstyle_codes(dst / "exstyle_code.npy").keys() == load_exstyle_codes(dst / "instyle_code.npy").keys()

    code, out, err = run_cli(["train", "dualstylegan", "pretrain", "--checkpoint", ds_files["base"], "--res-index", 2,
                              "--iters", 10, "--batch", 2, "--vgg-weights", weight_files["vgg19"],
                              "--snapshot-every", 6, "--sample-every", 6, "--sample-seeds", "0-1",
                              "--style-seeds", "7-8"] + common, capsys)
    assert code == 0, err
    pre = _only_run(runs, "pretrain")
    assert "12 steps, injection [3, 2, 1] for [1, 1, 10] steps" in err and "reals: samples of the base" in err
    assert f"D from {ds_files['base']}" in err and "done: 12 steps" in out
    assert json.loads((pre / "config.json").read_text())["config"]["phase_iters"] == [1, 1, 10]
    snap = pre / "network-snapshot-000012"
    assert load_dualstylegan(snap).res_index == 2 and load_dualstylegan(snap.with_suffix(".pt")).num_ws == 6
    assert (pre / "network-snapshot-000006").is_dir() and (pre / "samples" / "grid-000012.png").is_file()

    code, out, err = run_cli(["train", "dualstylegan", "finetune", "--checkpoint", snap, "--data", ds_files["styles"],
                              "--codes", dst, "--iters", 2, "--batch", 2, "--id", "none", "--vgg-weights",
                              weight_files["vgg19"], "--snapshot-begin", 0, "--snapshot-every", 2,
                              "--sample-every", 2, "--sample-seeds", "0-1", "--sample-styles", 2] + common, capsys)
    assert code == 0, err
    ft = _only_run(runs, "finetune")
    assert "D from fresh (no discriminator given); identity loss off (--id none)" in err
    assert (ft / "network-snapshot-000002").is_dir() and load_dualstylegan(ft / "network-snapshot-000002.pt")

    # Resume: only --iters / --device / --progress may be given.
    code, _, err = run_cli(["train", "dualstylegan", "finetune", "--resume", ft, "--iters", 4, "--lr", 0.01], capsys)
    assert code == 2 and err.count("\n") == 1 and "--lr cannot be given" in err
    code, out, err = run_cli(["train", "dualstylegan", "finetune", "--resume", ft, "--iters", 4, "--no-progress",
                              "--snapshot-every", 2], capsys)
    assert code == 2 and "--snapshot-every cannot be given" in err
    code, out, err = run_cli(["train", "dualstylegan", "finetune", "--resume", ft, "--iters", 4, "--no-progress"],
                             capsys)
    assert code == 0, err
    assert "resuming" in err and "at step 2 of 4" in err and (ft / "network-snapshot-000004").is_dir()

    code, out, err = run_cli(["train", "dualstylegan", "refine", "--checkpoint", ft / "network-snapshot-000004",
                              "--data", ds_files["styles"], "--codes", dst, "--iters", 2, "--vgg-weights",
                              weight_files["vgg19"], "--vgg16-weights", weight_files["vgg16"]] + common, capsys)
    assert code == 0, err
    ref = _only_run(runs, "refine")
    refined = load_exstyle_codes(ref / "refined_exstyle_code.npy")
    assert refined.keys() == load_exstyle_codes(dst / "exstyle_code.npy").keys()


@pytest.mark.parametrize("case", ["missing-folder", "pretrain-gets-dualstylegan", "finetune-gets-generator",
                                  "finetune-gets-encoder", "vgg-offline", "vgg16-offline", "arcface-missing",
                                  "bad-id", "no-codes"])
def test_cli_errors_are_one_line_and_write_nothing(case, tmp_path, capsys, ds_files, pretrained, codes, encoders,
                                                   weight_files, monkeypatch):
    monkeypatch.setenv("STYLECAST_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    for var in ("STYLECAST_VGG19_WEIGHTS", "STYLECAST_VGG16_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    runs = tmp_path / "runs"
    dst = ["destylize", "--base", ds_files["base"], "--finetuned", ds_files["finetuned"], "--data", ds_files["styles"],
           "--res-index", 2, "--id", "none"]
    ft = ["finetune", "--data", ds_files["styles"], "--exstyle", codes["exstyle"], "--instyle", codes["instyle"],
          "--id", "none", "--vgg-weights", weight_files["vgg19"]]
    args, msg = {
        "missing-folder": (dst[:5] + ["--data", tmp_path / "nope"] + dst[7:], "style image folder not found"),
        "pretrain-gets-dualstylegan": (["pretrain", "--checkpoint", pretrained, "--vgg-weights",
                                        weight_files["vgg19"]], "is not a generator checkpoint"),
        "finetune-gets-generator": (ft + ["--checkpoint", ds_files["base"]], "is not a DualStyleGAN checkpoint"),
        "finetune-gets-encoder": (ft + ["--checkpoint", encoders["w+"]], "is not a DualStyleGAN checkpoint"),
        "vgg-offline": (["pretrain", "--checkpoint", ds_files["base"], "--res-index", 2],
                        "VGG19 ImageNet weights not found and downloads are disabled"),
        "vgg16-offline": (dst, "VGG16 ImageNet weights not found and downloads are disabled"),
        "arcface-missing": (dst[:-1] + ["arcface:/nowhere/model_ir_se50.pth", "--vgg16-weights",
                                        weight_files["vgg16"]], "ArcFace weights /nowhere/model_ir_se50.pth not found"),
        "bad-id": (dst[:-1] + ["facenet", "--vgg16-weights", weight_files["vgg16"]], "--id must be"),
        "no-codes": (["finetune", "--checkpoint", pretrained, "--data", ds_files["styles"]],
                     "give --codes DESTYLIZE_RUN_DIR or both --exstyle and --instyle"),
    }[case]
    code, out, err = run_cli(["train", "dualstylegan"] + args + ["--outdir", runs, "--no-progress"], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert "Traceback" not in err
    assert not runs.exists()  # nothing half-written
