"""training.checkpoints: the rosinality layout of REFERENCE.md, bit-exact round trips, config inference,
corrupt and hostile files, StyleGAN-NADA checkpoints without latent_avg, and the NVlabs .pkl importer
(which must never execute the source code embedded in the pickle)."""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoints import (CheckpointError, UnsafePickleError, detect_format, generator_from_rosinality,
                                  generator_to_rosinality, load_checkpoint, rosinality_key_map, save_native,
                                  save_rosinality)
from training.checkpoints.safe_pickle import restricted_load
from training.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig, seeds_to_z


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter and float buffer non-trivial values (zeros would make comparisons weak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith(("bias", "noise_strength")) else 1.0))
        for name, b in module.named_buffers():
            if name.endswith("w_avg"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return module.eval().requires_grad_(False)


def _state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


# ----------------------------------------------------------------------------------------------------------
# The 1024 px config-f layout (REFERENCE.md)


@pytest.fixture(scope="module")
def g1024():
    torch.manual_seed(0)
    G = Generator(GeneratorConfig.rosinality(1024, 2)).eval()
    return G, generator_to_rosinality(G)


def test_rosinality_1024_key_count_and_params(g1024):
    G, sd = g1024
    assert len(sd) == 171
    n_params = sum(v.numel() for k, v in sd.items() if not k.startswith("noises.") and not k.endswith(".kernel"))
    assert n_params == 30_370_060
    assert G.num_params() == 30_370_060
    assert sum(1 for k in sd if k.startswith("noises.")) == 17
    assert sum(1 for k in sd if k.endswith(".kernel")) == 16  # 8 conv blurs + 8 to-RGB upsamples


def test_rosinality_1024_key_names_and_shapes(g1024):
    _, sd = g1024
    expect = {
        "input.input": (1, 512, 4, 4),
        "conv1.conv.weight": (1, 512, 512, 3, 3),
        "conv1.conv.modulation.weight": (512, 512),
        "conv1.conv.modulation.bias": (512,),
        "conv1.noise.weight": (1,),
        "conv1.activate.bias": (512,),
        "to_rgb1.conv.weight": (1, 3, 512, 1, 1),
        "to_rgb1.conv.modulation.weight": (512, 512),
        "to_rgb1.conv.modulation.bias": (512,),
        "to_rgb1.bias": (1, 3, 1, 1),
        "convs.0.conv.weight": (1, 512, 512, 3, 3),
        "convs.0.conv.blur.kernel": (4, 4),
        "convs.4.conv.weight": (1, 512, 512, 3, 3),      # 32 px up-conv: 512 -> 512
        "convs.6.conv.weight": (1, 512, 512, 3, 3),      # 64 px up-conv: 512 -> 512 (256 * cm)
        "convs.8.conv.weight": (1, 256, 512, 3, 3),      # 128 px up-conv: 512 -> 256
        "convs.9.conv.weight": (1, 256, 256, 3, 3),
        "convs.10.conv.weight": (1, 128, 256, 3, 3),     # 256 px up-conv: 256 -> 128
        "convs.10.conv.blur.kernel": (4, 4),
        "convs.14.conv.weight": (1, 32, 64, 3, 3),       # 1024 px up-conv: 64 -> 32
        "convs.14.conv.modulation.weight": (64, 512),
        "convs.15.conv.weight": (1, 32, 32, 3, 3),
        "convs.15.conv.modulation.weight": (32, 512),
        "convs.15.activate.bias": (32,),
        "convs.15.noise.weight": (1,),
        "to_rgbs.0.conv.weight": (1, 3, 512, 1, 1),
        "to_rgbs.0.upsample.kernel": (4, 4),
        "to_rgbs.7.conv.weight": (1, 3, 32, 1, 1),
        "to_rgbs.7.upsample.kernel": (4, 4),
        "to_rgbs.7.bias": (1, 3, 1, 1),
        "noises.noise_0": (1, 1, 4, 4),
        "noises.noise_1": (1, 1, 8, 8),
        "noises.noise_2": (1, 1, 8, 8),
        "noises.noise_15": (1, 1, 1024, 1024),
        "noises.noise_16": (1, 1, 1024, 1024),
    }
    for i in range(1, 9):
        expect[f"style.{i}.weight"] = (512, 512)
        expect[f"style.{i}.bias"] = (512,)
    for k, shape in expect.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape), shape)
    assert "style.0.weight" not in sd and "style.9.weight" not in sd
    assert "convs.16.conv.weight" not in sd and "to_rgbs.8.conv.weight" not in sd
    assert "noises.noise_17" not in sd
    assert not any(k.startswith("convs.") and k.endswith("blur.kernel") and int(k.split(".")[1]) % 2 for k in sd)
    # rosinality stores the [1,3,3,1] blur pre-multiplied by factor**2 = 4
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0])
    want = torch.outer(k1, k1) / 64 * 4
    torch.testing.assert_close(sd["convs.0.conv.blur.kernel"], want, rtol=0, atol=1e-7)
    torch.testing.assert_close(sd["to_rgbs.3.upsample.kernel"], want, rtol=0, atol=1e-7)
    # resolution 2^k uses convs.{2(k-3)}, convs.{2(k-3)+1}, to_rgbs.{k-3}; channels 16 * cm = 32 at 1024
    for k in range(3, 11):
        c = min(32768 // 2**k, 512)
        assert sd[f"convs.{2 * (k - 3) + 1}.conv.weight"].shape[1] == c
        assert sd[f"to_rgbs.{k - 3}.conv.weight"].shape[2] == c


def test_key_map_covers_every_tensor(tiny_G):
    m = rosinality_key_map(tiny_G.cfg)
    own = set(tiny_G.state_dict()) - {"mapping.w_avg"}  # w_avg becomes latent_avg
    assert set(m) == own
    theirs = [t for t, _ in m.values()]
    assert len(theirs) == len(set(theirs))


# ----------------------------------------------------------------------------------------------------------
# Round trips


@pytest.fixture(scope="module")
def trio(tiny_cfg):
    torch.manual_seed(1)
    G = _randomize(Generator(tiny_cfg), 10)
    G_train = _randomize(Generator(tiny_cfg), 11)
    with torch.no_grad():  # NVlabs/rosinality keep one w_avg, copied from the trained G to G_ema
        G_train.mapping.w_avg.copy_(G.mapping.w_avg)
    D = _randomize(Discriminator(DiscriminatorConfig.from_generator(tiny_cfg)), 12)
    return G, G_train, D


def test_native_rosinality_native_round_trip_is_bit_exact(tmp_path, trio):
    G, G_train, D = trio
    save_native(tmp_path / "a", G, D=D, G_train=G_train)
    ck1 = load_checkpoint(tmp_path / "a", with_discriminator=True, with_train_generator=True)
    assert ck1.format == "native"
    save_rosinality(tmp_path / "b.pt", ck1.G, D=ck1.D, G_train=ck1.G_train)
    ck2 = load_checkpoint(tmp_path / "b.pt", with_discriminator=True, with_train_generator=True)
    assert ck2.format == "rosinality"
    save_native(tmp_path / "c", ck2.G, D=ck2.D, G_train=ck2.G_train)
    ck3 = load_checkpoint(tmp_path / "c", with_discriminator=True, with_train_generator=True)
    for ck in (ck1, ck2, ck3):
        assert ck.G.cfg == G.cfg
        _state_equal(ck.G.state_dict(), G.state_dict())
        _state_equal(ck.G_train.state_dict(), G_train.state_dict())
        assert ck.D.cfg == D.cfg
        _state_equal(ck.D.state_dict(), D.state_dict())


def test_rosinality_native_rosinality_round_trip_is_bit_exact(tmp_path, trio):
    G, G_train, D = trio
    optim = {"state": {}, "param_groups": [{"lr": 0.002, "betas": (0.0, 0.99), "params": [0, 1]}]}
    save_rosinality(tmp_path / "a.pt", G, D=D, G_train=G_train, extra={"g_optim": optim})
    ck = load_checkpoint(tmp_path / "a.pt", with_discriminator=True, with_train_generator=True)
    assert ck.extra["g_optim"] == optim
    save_native(tmp_path / "n", ck.G, D=ck.D, G_train=ck.G_train)
    ck2 = load_checkpoint(tmp_path / "n", with_discriminator=True, with_train_generator=True)
    save_rosinality(tmp_path / "b.pt", ck2.G, D=ck2.D, G_train=ck2.G_train)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert set(a) == {"g_ema", "latent_avg", "g", "d", "g_optim"} and set(b) == {"g_ema", "latent_avg", "g", "d"}
    for k in ("g_ema", "g", "d"):
        _state_equal(a[k], b[k])
    assert torch.equal(a["latent_avg"], b["latent_avg"])
    assert tuple(a["latent_avg"].shape) == (G.w_dim,)


def test_round_trip_images_are_identical(tmp_path, tiny_G):
    save_rosinality(tmp_path / "g.pt", tiny_G)
    save_native(tmp_path / "g", tiny_G)
    z = seeds_to_z([0, 1, 2], tiny_G.z_dim)
    with torch.no_grad():
        want = tiny_G(z, psi=0.7)
        for p in (tmp_path / "g.pt", tmp_path / "g"):
            assert torch.equal(load_checkpoint(p).G(z, psi=0.7), want)


def test_save_native_never_overwrites(tmp_path, tiny_G):
    save_native(tmp_path / "g", tiny_G)
    before = sorted(os.listdir(tmp_path / "g"))
    with pytest.raises(FileExistsError):
        save_native(tmp_path / "g", tiny_G)
    assert sorted(os.listdir(tmp_path / "g")) == before
    assert sorted(os.listdir(tmp_path)) == ["g"]  # no partial directory left behind


INFER_CONFIGS = [
    GeneratorConfig.tiny(16, w_dim=32, max_channels=32, min_channels=16, mapping_layers=1),
    GeneratorConfig(resolution=32, z_dim=48, w_dim=40, mapping_layers=3, channels=(40, 24, 16, 8)),
    GeneratorConfig.tiny(64, w_dim=32, max_channels=48, min_channels=16, mapping_layers=5),
    GeneratorConfig(resolution=16, z_dim=24, w_dim=24, mapping_layers=2, channels=(8, 16, 12)),
]


@pytest.mark.parametrize("cfg", INFER_CONFIGS, ids=lambda c: f"{c.resolution}px-mlp{c.mapping_layers}")
def test_config_is_inferred_from_shapes(tmp_path, cfg):
    G = _randomize(Generator(cfg), 3)
    save_rosinality(tmp_path / "g.pt", G)
    ck = load_checkpoint(tmp_path / "g.pt")
    assert ck.G.cfg == cfg
    _state_equal(ck.G.state_dict(), G.state_dict())
    # also from a bare g_ema state dict (no wrapper)
    torch.save(generator_to_rosinality(G), tmp_path / "bare.pt")
    G2 = load_checkpoint(tmp_path / "bare.pt").G
    assert G2.cfg == cfg
    _state_equal({k: v for k, v in G2.state_dict().items() if k != "mapping.w_avg"},
                 {k: v for k, v in G.state_dict().items() if k != "mapping.w_avg"})


# ----------------------------------------------------------------------------------------------------------
# Bad rosinality files


def _ros_obj(G):
    return {"g_ema": generator_to_rosinality(G), "latent_avg": G.w_avg.clone()}


def test_unknown_key_is_named(tmp_path, tiny_G):
    obj = _ros_obj(tiny_G)
    obj["g_ema"]["convs.0.conv.extra_scale"] = torch.ones(3)
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"convs\.0\.conv\.extra_scale") as e:
        load_checkpoint(tmp_path / "x.pt")
    _one_line(e.value)


def test_missing_key_is_an_error(tmp_path, tiny_G):
    obj = _ros_obj(tiny_G)
    del obj["g_ema"]["convs.1.noise.weight"]
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"convs\.1\.noise\.weight") as e:
        load_checkpoint(tmp_path / "x.pt")
    _one_line(e.value)


def test_wrong_shape_and_non_finite_are_errors(tiny_G):
    sd = generator_to_rosinality(tiny_G)
    bad = dict(sd, **{"conv1.conv.modulation.bias": torch.ones(7)})
    with pytest.raises(CheckpointError, match="conv1"):
        generator_from_rosinality(bad, tiny_G.w_avg)
    nan = dict(sd, **{"style.1.bias": torch.full_like(sd["style.1.bias"], float("nan"))})
    with pytest.raises(CheckpointError, match="non-finite"):
        generator_from_rosinality(nan, tiny_G.w_avg)
    with pytest.raises(CheckpointError, match="latent_avg"):
        generator_from_rosinality(sd, torch.zeros(3))


def _write_corrupt(kind: str, path: Path, valid: bytes) -> None:
    if kind == "truncated":
        path.write_bytes(valid[: len(valid) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.RandomState(0).bytes(4096))
    elif kind == "random-0x80":  # looks like a raw pickle / legacy torch file
        path.write_bytes(b"\x80" + np.random.RandomState(1).bytes(4096))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "not a checkpoint")
    elif kind == "text":
        path.write_text("hello\n")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "random-0x80", "zip", "text"])
@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_corrupt_files_give_a_one_line_checkpoint_error(tmp_path, tiny_G, kind, suffix):
    buf = io.BytesIO()
    torch.save(_ros_obj(tiny_G), buf)
    path = tmp_path / f"bad{suffix}"
    _write_corrupt(kind, path, buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    _one_line(e.value)


def test_missing_path_and_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "d")
    _one_line(e.value)


def test_native_with_corrupt_safetensors(tmp_path, tiny_G):
    save_native(tmp_path / "g", tiny_G)
    f = tmp_path / "g" / "generator.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "g")
    _one_line(e.value)


def _write_marker(path):
    Path(path).write_text("code ran")


class _Hostile:
    """An object whose unpickling runs a function (here: writes a marker file)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("how", ["test-function", "builtins.open", "os.system"])
def test_torch_file_with_code_is_refused_without_running_it(tmp_path, tiny_G, how):
    marker = tmp_path / "marker"
    payload = {"test-function": (_write_marker, (str(marker),)),
               "builtins.open": (builtins.open, (str(marker), "w")),
               "os.system": (os.system, (f"touch {marker}",))}[how]
    obj = _ros_obj(tiny_G)
    obj["args"] = _Hostile(*payload)
    torch.save(obj, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused") as e:
        load_checkpoint(tmp_path / "evil.pt")
    _one_line(e.value)
    assert not marker.exists()
    # the marker mechanism is real: an unrestricted load would have run the code
    if how == "test-function":
        torch.load(tmp_path / "evil.pt", weights_only=False)
        assert marker.exists()


def test_training_checkpoint_with_argparse_namespace_loads(tmp_path, tiny_G):
    import argparse
    obj = _ros_obj(tiny_G)
    obj["args"] = argparse.Namespace(size=32, batch=4, r1=10.0)
    torch.save(obj, tmp_path / "train.pt")
    ck = load_checkpoint(tmp_path / "train.pt")
    assert ck.extra["args"].r1 == 10.0


# ----------------------------------------------------------------------------------------------------------
# StyleGAN-NADA layout: {"g_ema", "g_optim"}, no latent_avg


def test_nada_checkpoint_without_latent_avg(tmp_path, tiny_G):
    optim = {"state": {}, "param_groups": [{"lr": 0.0016, "betas": (0.0, 0.992), "params": [0]}]}
    torch.save({"g_ema": generator_to_rosinality(tiny_G), "g_optim": optim}, tmp_path / "nada.pt")
    a = load_checkpoint(tmp_path / "nada.pt")
    b = load_checkpoint(tmp_path / "nada.pt")
    assert a.meta["latent_avg"] == "estimated"
    assert torch.equal(a.G.w_avg, b.G.w_avg)  # deterministic
    # the estimate is the mean w: compare to an independent sample of 20k z (other seeds)
    with torch.no_grad():
        z = torch.from_numpy(np.random.RandomState(123).randn(20000, tiny_G.z_dim).astype(np.float32))
        w = tiny_G.mapping(z).double()
    tol = 5 * w.std(0).max().item() / np.sqrt(10000)
    assert (a.G.w_avg.double() - w.mean(0)).abs().max().item() < tol
    # everything else is the stored generator
    _state_equal({k: v for k, v in a.G.state_dict().items() if k != "mapping.w_avg"},
                 {k: v for k, v in tiny_G.state_dict().items() if k != "mapping.w_avg"})
    z = seeds_to_z([0], tiny_G.z_dim)
    with torch.no_grad():
        assert torch.equal(a.G(z, psi=0.5), b.G(z, psi=0.5))


def test_detect_format(tmp_path, tiny_G):
    save_native(tmp_path / "n", tiny_G)
    save_rosinality(tmp_path / "r.pt", tiny_G)
    (tmp_path / "x.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert detect_format(tmp_path / "n") == "native"
    assert detect_format(tmp_path / "r.pt") == "rosinality"
    assert detect_format(tmp_path / "x.pkl") == "nvlabs"
    with pytest.raises(CheckpointError, match="G_ema"):
        load_checkpoint(tmp_path / "x.pkl")


# ----------------------------------------------------------------------------------------------------------
# NVlabs stylegan2-ada-pytorch pickles, built in the test


NV_CLASSES = ("Generator", "MappingNetwork", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer", "ToRGBLayer",
              "FullyConnectedLayer", "SynthesisInput")


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict (pickled by reference as dnnlib.util.EasyDict)."""


def _never_called(meta):  # stands in for torch_utils.persistence._reconstruct_persistent_obj
    raise AssertionError("the fake persistence module must not be used for loading")


@contextlib.contextmanager
def fake_nvlabs_modules():
    """Install `torch_utils.persistence` and `dnnlib.util` just long enough to pickle, then remove them."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    saved = {n: sys.modules.get(n) for n in names}
    tu, tup, dn, dnu = (types.ModuleType(n) for n in names)
    _never_called.__module__, _never_called.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    _EasyDict.__module__, _EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    tup._reconstruct_persistent_obj = _never_called
    dnu.EasyDict = _EasyDict
    tu.persistence, dn.util = tup, dnu
    sys.modules.update(dict(zip(names, (tu, tup, dn, dnu))))
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class NVPersistent:
    """Pickles exactly like an NVlabs @persistence.persistent_class instance."""

    def __init__(self, class_name, module_src, params=None, buffers=None, modules=None, **attrs):
        assert class_name in NV_CLASSES
        self.class_name, self.module_src = class_name, module_src
        self.state = {
            "training": False, "_parameters": collections.OrderedDict(), "_buffers": collections.OrderedDict(),
            "_non_persistent_buffers_set": set(), "_backward_hooks": collections.OrderedDict(),
            "_forward_hooks": collections.OrderedDict(), "_forward_pre_hooks": collections.OrderedDict(),
            "_state_dict_hooks": collections.OrderedDict(), "_load_state_dict_pre_hooks": collections.OrderedDict(),
            "_modules": collections.OrderedDict(), "_init_args": (), "_init_kwargs": _EasyDict(attrs),
        }
        for k, v in (params or {}).items():
            self.state["_parameters"][k] = torch.nn.Parameter(v.detach().clone(), requires_grad=False)
        for k, v in (buffers or {}).items():
            self.state["_buffers"][k] = v.detach().clone()
        self.state["_modules"].update(modules or {})
        self.state.update(attrs)

    def __reduce__(self):
        meta = dict(type="class", version=4, module_src=self.module_src, class_name=self.class_name,
                    state=self.state)
        return _never_called, (meta,)


def _nv_filter():
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(k, k) / 64


def nvlabs_generator(G: Generator, src: str, *, c_dim=0, architecture="skip", stylegan3=False) -> NVPersistent:
    """An NVlabs-layout Generator persistent object holding G's tensors (names/shapes of stylegan2-ada)."""
    cfg, sd = G.cfg, G.state_dict()
    P = lambda cls, **kw: NVPersistent(cls, src, **kw)  # noqa: E731

    def fc(prefix, lr_mul, act):
        w = sd[f"{prefix}.weight"]
        return P("FullyConnectedLayer", params={"weight": w, "bias": sd[f"{prefix}.bias"]}, in_features=w.shape[1],
                 out_features=w.shape[0], activation=act, lr_multiplier=lr_mul,
                 weight_gain=lr_mul / np.sqrt(w.shape[1]), bias_gain=lr_mul)

    mods = {f"fc{i}": fc(f"mapping.fc{i}", cfg.mapping_lr_mul, "lrelu") for i in range(cfg.mapping_layers)}
    if c_dim:
        mods = {"embed": P("FullyConnectedLayer", params={"weight": torch.randn(cfg.w_dim, c_dim),
                                                          "bias": torch.zeros(cfg.w_dim)}), **mods}
    mapping = P("MappingNetwork", buffers={"w_avg": sd["mapping.w_avg"]}, modules=mods, z_dim=cfg.z_dim,
                c_dim=c_dim, w_dim=cfg.w_dim, num_ws=cfg.num_ws, num_layers=cfg.mapping_layers,
                w_avg_beta=cfg.w_avg_beta)

    def layer(prefix, res, up):
        w = sd[f"{prefix}.weight"]
        return P("SynthesisLayer",
                 params={"weight": w, "noise_strength": sd[f"{prefix}.noise_strength"], "bias": sd[f"{prefix}.bias"]},
                 buffers={"resample_filter": _nv_filter(), "noise_const": sd[f"{prefix}.noise_const"]},
                 modules={"affine": fc(f"{prefix}.affine", 1.0, "linear")}, in_channels=w.shape[1],
                 w_dim=cfg.w_dim, resolution=res, up=up, use_noise=True, activation="lrelu",
                 conv_clamp=cfg.conv_clamp, padding=1, act_gain=float(np.sqrt(2)))

    blocks = {}
    for res in cfg.resolutions:
        b = f"synthesis.b{res}"
        m = {}
        if res > 4:
            m["conv0"] = layer(f"{b}.conv0", res, 2)
        m["conv1"] = layer(f"{b}.conv1", res, 1)
        w = sd[f"{b}.torgb.weight"]
        m["torgb"] = P("ToRGBLayer", params={"weight": w, "bias": sd[f"{b}.torgb.bias"]},
                       modules={"affine": fc(f"{b}.torgb.affine", 1.0, "linear")}, conv_clamp=cfg.conv_clamp,
                       weight_gain=1 / np.sqrt(w.shape[1]))
        blocks[f"b{res}"] = P("SynthesisBlock", params={"const": sd[b + ".const"]} if res == 4 else {},
                              buffers={"resample_filter": _nv_filter()}, modules=m,
                              in_channels=0 if res == 4 else cfg.channels_at(res // 2), w_dim=cfg.w_dim,
                              resolution=res, img_channels=cfg.img_channels, is_last=res == cfg.resolution,
                              architecture=architecture, use_fp16=False, channels_last=False,
                              num_conv=1 if res == 4 else 2, num_torgb=1)
    if stylegan3:
        blocks = {"input": P("SynthesisInput", params={"weight": torch.randn(4, 4)}),
                  "L0_36_512": blocks["b4"].state["_modules"]["conv1"], **blocks}
    synthesis = P("SynthesisNetwork", modules=blocks, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                  img_resolution_log2=cfg.log_size, img_channels=cfg.img_channels,
                  block_resolutions=cfg.resolutions, num_ws=cfg.num_ws)
    return P("Generator", modules={"synthesis": synthesis, "mapping": mapping}, z_dim=cfg.z_dim, c_dim=c_dim,
             w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=cfg.img_channels, num_ws=cfg.num_ws,
             mapping_kwargs=_EasyDict(num_layers=cfg.mapping_layers),
             synthesis_kwargs=_EasyDict(channel_base=16384, channel_max=512, num_fp16_res=4,
                                        conv_clamp=cfg.conv_clamp))


def write_nvlabs_pickle(path: Path, G_ema: Generator, G: Generator | None, marker: Path, protocol: int = 4,
                        **kw) -> bytes:
    src = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('embedded source executed')\n"
           "class Generator:\n    pass\n")
    with fake_nvlabs_modules():
        g_ema = nvlabs_generator(G_ema, src, **kw)
        g = nvlabs_generator(G, src, **kw) if G is not None else g_ema
        data = {"G": g, "D": None, "G_ema": g_ema, "augment_pipe": None,
                "training_set_kwargs": _EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                 path="ffhq.zip", use_labels=False, max_size=70000, xflip=True,
                                                 resolution=G_ema.cfg.resolution)}
        blob = pickle.dumps(data, protocol=protocol)
    assert "torch_utils.persistence" not in sys.modules and "dnnlib.util" not in sys.modules
    path.write_bytes(blob)
    return blob


@pytest.fixture(scope="module")
def nv_pair():
    cfg = GeneratorConfig.tiny(16, w_dim=32, max_channels=32, min_channels=16, mapping_layers=2, conv_clamp=256.0)
    G_ema = _randomize(Generator(cfg), 20)
    G = _randomize(Generator(cfg), 21)
    return G_ema, G


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_nvlabs_pickle_imports_bit_exact_without_running_embedded_code(tmp_path, nv_pair, protocol):
    G_ema, G = nv_pair
    marker = tmp_path / "marker"
    blob = write_nvlabs_pickle(tmp_path / "net.pkl", G_ema, G, marker, protocol=protocol)
    assert b"torch_utils.persistence" in blob and str(marker).encode() in blob
    ck = load_checkpoint(tmp_path / "net.pkl", with_train_generator=True)
    assert ck.format == "nvlabs"
    assert ck.G.cfg == G_ema.cfg  # incl. conv_clamp 256, n_mlp 2, lr_mul 0.01, the channel table
    _state_equal(ck.G.state_dict(), G_ema.state_dict())
    _state_equal(ck.G_train.state_dict(), G.state_dict())
    z = seeds_to_z([0, 1, 2], G_ema.z_dim)
    with torch.no_grad():
        assert torch.equal(ck.G(z, psi=0.7), G_ema(z, psi=0.7))
    assert not marker.exists()
    assert "torch_utils.persistence" not in sys.modules


def test_nvlabs_pickle_embedded_source_would_run_if_executed(tmp_path, nv_pair):
    """The marker check is meaningful: exec of the embedded source (what the stock loader does) writes it."""
    marker = tmp_path / "marker"
    blob = write_nvlabs_pickle(tmp_path / "net.pkl", nv_pair[0], None, marker)
    data = restricted_load(blob)
    g = data["G_ema"]
    assert g.class_name == "Generator" and g.module_src_len > 0
    assert not marker.exists()
    src = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('embedded source executed')\n"
           "class Generator:\n    pass\n")
    assert len(src) == g.module_src_len
    exec(compile(src, "<embedded>", "exec"), {})
    assert marker.exists()


@pytest.mark.parametrize("kw,match", [
    (dict(c_dim=4), "conditional"),
    (dict(architecture="resnet"), "architecture"),
    (dict(stylegan3=True), "StyleGAN3"),
])
def test_unsupported_nvlabs_generators_are_refused(tmp_path, nv_pair, kw, match):
    marker = tmp_path / "marker"
    write_nvlabs_pickle(tmp_path / "net.pkl", nv_pair[0], None, marker, **kw)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(tmp_path / "net.pkl")
    _one_line(e.value)
    assert not marker.exists()


HOSTILE = {
    "os.system": lambda m: (os.system, (f"touch {m}",)),
    "builtins.eval": lambda m: (eval, (f"open({str(m)!r}, 'w').close()",)),
    "builtins.exec": lambda m: (exec, (f"open({str(m)!r}, 'w').close()",)),
    "subprocess.Popen": lambda m: (subprocess.Popen, (["touch", str(m)],)),
    "builtins.open": lambda m: (open, (str(m), "w")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("where", ["top", "inside-state"])
def test_hostile_pickles_are_refused_and_never_run(tmp_path, nv_pair, name, where):
    marker = tmp_path / "marker"
    evil = _Hostile(*HOSTILE[name](marker))
    if where == "top":
        blob = pickle.dumps({"G_ema": evil, "G": None}, protocol=4)
    else:  # hidden in an otherwise valid NVlabs pickle
        with fake_nvlabs_modules():
            g = nvlabs_generator(nv_pair[0], "")
            g.state["_init_kwargs"]["payload"] = evil
            blob = pickle.dumps({"G": g, "D": None, "G_ema": g, "augment_pipe": None}, protocol=4)
    (tmp_path / "evil.pkl").write_bytes(blob)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "evil.pkl")
    msg = _one_line(e.value)
    assert "refusing" in msg and HOSTILE[name](marker)[0].__name__ in msg
    with pytest.raises(UnsafePickleError):
        restricted_load(blob)
    assert not marker.exists()


def test_hostile_marker_mechanism_is_real(tmp_path):
    marker = tmp_path / "marker"
    blob = pickle.dumps({"G_ema": _Hostile(*HOSTILE["builtins.eval"](marker))})
    pickle.loads(blob)  # an unrestricted loader runs it
    assert marker.exists()


def test_truncated_nvlabs_pickle_is_a_clear_error(tmp_path, nv_pair):
    blob = write_nvlabs_pickle(tmp_path / "net.pkl", nv_pair[0], None, tmp_path / "marker")
    for cut in (len(blob) // 2, len(blob) - 1, 10):
        (tmp_path / "cut.pkl").write_bytes(blob[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / "cut.pkl")
        _one_line(e.value)


def test_tensorflow_pickle_is_named(tmp_path):
    # protocol 2: GLOBAL dnnlib.tflib.network.Network, EMPTY_TUPLE, NEWOBJ, STOP (the old TF pickles)
    (tmp_path / "tf.pkl").write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\n)\x81.")
    with pytest.raises(CheckpointError, match="TensorFlow") as e:
        load_checkpoint(tmp_path / "tf.pkl")
    _one_line(e.value)
