"""The finetuning loop: it learns the data, resumes bit for bit, keeps Freeze-D layers fixed, takes D from the
checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.checkpoints import load_checkpoint, save_native
from training.finetune import FinetuneConfig, FinetuneRun
from training.finetune.dataset import DatasetWarning
from training.generate import generate_images
from training.networks import Discriminator, DiscriminatorConfig, Generator

pytestmark = pytest.mark.filterwarnings("ignore::training.finetune.dataset.DatasetWarning")


@pytest.fixture(scope="module")
def base_with_d(tmp_path_factory, ft_cfg):
    torch.manual_seed(1)
    G = Generator(ft_cfg)
    D = Discriminator(DiscriminatorConfig.from_generator(ft_cfg))
    return save_native(tmp_path_factory.mktemp("based") / "base", G, D=D, G_train=G)


def mean_color(G) -> np.ndarray:
    return generate_images(G, list(range(16))).reshape(-1, 3).mean(axis=0) / 127.5 - 1


def test_finetune_moves_generator_towards_the_data(tmp_path, base_ckpt, red_folder):
    cfg = FinetuneConfig(checkpoint=str(base_ckpt), data=str(red_folder), kimg=0.08, batch=4, lr=0.005,
                         snapshot_kimg=100, sample_seeds=(0, 1, 2, 3))
    run = FinetuneRun.start(cfg, tmp_path / "run")
    target = run.dataset.mean_color()
    before = np.linalg.norm(mean_color(run.G_ema) - target)
    last = run.run(progress=False)
    after_G = load_checkpoint(last).G
    after = np.linalg.norm(mean_color(after_G) - target)
    assert run.d_source == "fresh"
    assert after < 0.5 * before, (before, after)
    assert last.name == "network-snapshot-000000080"
    assert (tmp_path / "run" / "samples" / "reals.png").is_file()
    assert (tmp_path / "run" / "samples" / "fakes000000080.png").is_file()
    assert (tmp_path / "run" / f"{last.name}.pt").is_file()


def _states(run: FinetuneRun) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in (("G", run.G), ("G_ema", run.G_ema), ("D", run.D)):
        out.update({f"{prefix}.{k}": v for k, v in m.state_dict().items()})
    for prefix, opt in (("optG", run.opt_G), ("optD", run.opt_D)):
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            for k, v in opt.state.get(p, {}).items():
                out[f"{prefix}.{i}.{k}"] = v
    out["pl_mean"] = run.pl.pl_mean
    return out


def test_resume_continues_identically(tmp_path, base_with_d, red_folder):
    common = dict(checkpoint=str(base_with_d), data=str(red_folder), batch=2, r1_interval=3, pl_interval=2,
                  augment="ada", augment_p=0.2, ada_interval=3, ada_kimg=0.05, mirror=True, freeze_d=1, seed=5,
                  snapshot_kimg=100, sample_seeds=(0,))
    full = FinetuneRun.start(FinetuneConfig(kimg=0.024, **common), tmp_path / "full")
    assert full.d_source == "checkpoint"
    full.run(progress=False)

    part = FinetuneRun.start(FinetuneConfig(kimg=0.010, **common), tmp_path / "part")
    part.run(progress=False)
    assert part.step == 5  # stops mid R1 / ADA interval: their accumulators must survive the resume
    resumed = FinetuneRun.resume(tmp_path / "part", FinetuneConfig(kimg=0.024, **common))
    assert resumed.step == 5 and resumed.cur_nimg == 10
    resumed.run(progress=False)

    assert full.step == resumed.step == 12
    assert full.augment.p == resumed.augment.p and full.augment.p != 0.2  # ADA moved p
    a, b = _states(full), _states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def test_freeze_d_and_discriminator_from_checkpoint(tmp_path, base_with_d, red_folder):
    D0 = load_checkpoint(base_with_d, with_discriminator=True).D.state_dict()
    cfg = FinetuneConfig(checkpoint=str(base_with_d), data=str(red_folder), kimg=0.006, batch=2, freeze_d=1,
                         r1_interval=1, snapshot_kimg=100, sample_seeds=(0,))
    run = FinetuneRun.start(cfg, tmp_path / "run")
    assert all(torch.equal(v, D0[k]) for k, v in run.D.state_dict().items())  # D starts from the checkpoint
    run.run(progress=False)
    D1 = run.D.state_dict()
    for k, v in D1.items():
        top = k.split(".")[0]
        if top in ("fromrgb", "b16"):
            assert torch.equal(v, D0[k]), k
        elif not k.endswith("resample_filter"):
            assert not torch.equal(v, D0[k]), k


def test_config_validation():
    with pytest.raises(ValueError, match="augment must be one of"):
        FinetuneConfig(checkpoint="x", data="y", kimg=1, augment="strong")
    with pytest.raises(ValueError, match="kimg must be > 0"):
        FinetuneConfig(checkpoint="x", data="y", kimg=0)
    cfg = FinetuneConfig(checkpoint="x", data="y", kimg=1.5, sample_seeds=(1, 2))
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


def test_freeze_d_too_deep(tmp_path, base_ckpt, red_folder):
    with pytest.raises(ValueError, match="exceeds"):
        FinetuneRun.start(FinetuneConfig(checkpoint=str(base_ckpt), data=str(red_folder), kimg=1, freeze_d=5))


def test_dataset_warning_type_is_public():
    assert issubclass(DatasetWarning, UserWarning)
