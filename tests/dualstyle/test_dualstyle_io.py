"""training.dualstyle.checkpoints: the official generator.pt layout and the native directory (bit-exact round
trips both ways, config inference, every bad key named), and exstyle_code.npy files read without executing
their pickle (numpy 1.x / 2.x files load, hostile and truncated files are refused)."""

from __future__ import annotations

import copy
import io
import os
import pickle
import shlex
import warnings

import numpy as np
import pytest
import torch

from training.checkpoints import CheckpointError, save_native
from training.dualstyle import (DualStyleConfig, DualStyleGAN, dualstylegan_to_official, load_dualstylegan,
                                load_exstyle_codes, official_key_map, save_dualstylegan, save_exstyle_codes,
                                save_official)
from training.networks import GeneratorConfig


@pytest.fixture(scope="module")
def model(tiny_G) -> DualStyleGAN:
    """A tiny DualStyleGAN (32 px, res_index 2, one structure-mapping layer) with random extrinsic weights."""
    torch.manual_seed(0)
    m = DualStyleGAN.from_generator(copy.deepcopy(tiny_G), res_index=2, structure_layers=1)
    with torch.no_grad():
        for p in m.extrinsic_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _write_official(path, g_ema: dict, **top) -> None:
    torch.save({"g_ema": g_ema, **top}, path)


def _image(m: DualStyleGAN) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ws = torch.randn(2, m.num_ws, m.w_dim, generator=g)
    ex = torch.randn(2, m.num_ws, m.w_dim, generator=g)
    with torch.no_grad():
        return m(ws, ex, torch.rand(2, m.num_ws, generator=g))


# ----------------------------------------------------------------------------------------------------------
# Round trips


def test_official_layout_keys(model):
    g_ema = dualstylegan_to_official(model)
    extrinsic = sorted(k for k in g_ema if not k.startswith("generator."))
    expected = (["style.1.bias", "style.1.weight"]
                + [f"res.{j}.{n}" for j in range(3) for n in
                   ("conv.0.weight", "conv.1.bias", "conv2.0.weight", "conv2.1.bias", "norm.style.bias",
                    "norm.style.weight", "norm2.style.bias", "norm2.style.weight")]
                + [f"res.{j}.{n}" for j in range(3, 8) for n in ("bias", "weight")])
    assert extrinsic == sorted(expected)
    assert tuple(g_ema["res.0.norm.style.weight"].shape) == (128, 64)
    assert tuple(g_ema["res.2.conv2.0.weight"].shape) == (64, 64, 3, 3)
    assert "generator.convs.0.conv.blur.kernel" in g_ema and "generator.noises.noise_0" in g_ema
    assert len(official_key_map(DualStyleConfig.official())) == 2 * 2 + 7 * 8 + 11 * 2


def test_official_file_round_trip_is_bit_exact(tmp_path, model):
    """official -> ours -> official: the same g_ema, key for key, bit for bit (an official file has no
    latent_avg; w_avg is then estimated deterministically)."""
    g_ema = dualstylegan_to_official(model)
    _write_official(tmp_path / "generator.pt", g_ema)
    loaded = load_dualstylegan(tmp_path / "generator.pt")
    assert loaded.cfg == model.cfg and not loaded.training
    save_official(tmp_path / "again.pt", loaded)
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    _assert_state_equal(again["g_ema"], g_ema)
    torch.testing.assert_close(_image(loaded), _image(model), rtol=0, atol=0)


def test_native_official_native_round_trip_is_bit_exact(tmp_path, model):
    save_dualstylegan(tmp_path / "native", model, meta={"stage": "III"})
    a = load_dualstylegan(tmp_path / "native")
    _assert_state_equal(a.state_dict(), model.state_dict())
    save_official(tmp_path / "official.pt", a)
    b = load_dualstylegan(tmp_path / "official.pt")
    _assert_state_equal(b.state_dict(), model.state_dict())
    save_dualstylegan(tmp_path / "native2", b)
    c = load_dualstylegan(tmp_path / "native2")
    _assert_state_equal(c.state_dict(), model.state_dict())
    assert torch.equal(_image(c), _image(model))
    from training.dualstyle import read_dualstylegan_meta
    assert read_dualstylegan_meta(tmp_path / "native") == {"stage": "III"}


@pytest.mark.parametrize("res_index,structure_layers,resolution", [(0, 2, 32), (4, 2, 64), (6, 0, 32)])
def test_config_is_inferred_from_shapes(tmp_path, res_index, structure_layers, resolution):
    gcfg = GeneratorConfig.tiny(resolution, w_dim=32, max_channels=32, min_channels=16)
    cfg = DualStyleConfig(generator=gcfg, res_index=res_index, structure_layers=structure_layers)
    torch.manual_seed(1)
    m = DualStyleGAN(cfg)
    _write_official(tmp_path / "g.pt", dualstylegan_to_official(m))
    assert load_dualstylegan(tmp_path / "g.pt").cfg == cfg


def test_training_checkpoint_entries_are_ignored(tmp_path, model):
    g_ema = dualstylegan_to_official(model)
    _write_official(tmp_path / "pretrain.pt", g_ema, g=g_ema, g_optim={"state": {}}, ada_aug_p=0.0)
    _assert_state_equal(dualstylegan_to_official(load_dualstylegan(tmp_path / "pretrain.pt")), g_ema)


def test_save_is_atomic_and_never_overwrites(tmp_path, model):
    save_dualstylegan(tmp_path / "ck", model)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(FileExistsError):
        save_dualstylegan(tmp_path / "ck", model)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before == ["config.json", "dualstylegan.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary leftovers


# ----------------------------------------------------------------------------------------------------------
# Bad checkpoints


def _bad_official(tmp_path, model, edit) -> str:
    g_ema = dualstylegan_to_official(model)
    edit(g_ema)
    _write_official(tmp_path / "bad.pt", g_ema)
    with pytest.raises(CheckpointError) as exc:
        load_dualstylegan(tmp_path / "bad.pt")
    msg = str(exc.value)
    assert "bad.pt" in msg and "\n" not in msg
    return msg


def test_unknown_key_is_named(tmp_path, model):
    msg = _bad_official(tmp_path, model, lambda d: d.__setitem__("res.1.conv.2.weight", torch.zeros(1)))
    assert "res.1.conv.2.weight" in msg and "unrecognised" in msg


def test_unknown_generator_key_is_named(tmp_path, model):
    msg = _bad_official(tmp_path, model, lambda d: d.__setitem__("generator.extra.weight", torch.zeros(1)))
    assert "extra.weight" in msg


def test_missing_key_is_named(tmp_path, model):
    msg = _bad_official(tmp_path, model, lambda d: d.pop("res.1.conv2.1.bias"))
    assert "res.1.conv2.1.bias" in msg and "missing" in msg
    msg = _bad_official(tmp_path, model, lambda d: d.pop("res.5.weight"))
    assert "res.5.weight" in msg


def test_wrong_shape_and_non_finite_are_errors(tmp_path, model):
    msg = _bad_official(tmp_path, model, lambda d: d.__setitem__("res.4.weight", torch.zeros(64, 63)))
    assert "res.4.weight" in msg and "shape" in msg
    msg = _bad_official(tmp_path, model, lambda d: d["res.0.norm.style.bias"].__setitem__(0, float("nan")))
    assert "non-finite" in msg


def test_structure_that_is_not_dualstylegan_is_refused(tmp_path, model, tiny_G):
    from training.checkpoints import generator_to_rosinality
    _write_official(tmp_path / "plain.pt", generator_to_rosinality(tiny_G))
    with pytest.raises(CheckpointError, match="no generator.* keys"):
        load_dualstylegan(tmp_path / "plain.pt")
    g_ema = dualstylegan_to_official(model)
    _write_official(tmp_path / "top.pt", g_ema, optimizer_of_someone_else=1)
    with pytest.raises(CheckpointError, match="unrecognised top-level entries .*optimizer_of_someone_else"):
        load_dualstylegan(tmp_path / "top.pt")
    torch.save({"model": g_ema}, tmp_path / "nog.pt")
    with pytest.raises(CheckpointError, match="expected a dict with 'g_ema'"):
        load_dualstylegan(tmp_path / "nog.pt")
    odd = {k: v for k, v in g_ema.items() if not k.startswith("res.2.")}  # ModRes 0..1: res_index 1 is odd
    _write_official(tmp_path / "odd.pt", odd)
    with pytest.raises(CheckpointError, match="unsupported DualStyleGAN layout"):
        load_dualstylegan(tmp_path / "odd.pt")


def test_truncated_empty_and_missing_files(tmp_path, model):
    save_official(tmp_path / "ok.pt", model)
    data = (tmp_path / "ok.pt").read_bytes()
    for n in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="cut.pt"):
            load_dualstylegan(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_dualstylegan(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError):
        load_dualstylegan(tmp_path / "nope.pt")


class _Hostile:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_hostile_torch_file_is_refused_without_running(tmp_path, model):
    marker = tmp_path / "marker"
    obj = {"g_ema": dualstylegan_to_official(model), "x": _Hostile(os.system, (f"touch {shlex.quote(str(marker))}",))}
    torch.save(obj, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_dualstylegan(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_native_directories(tmp_path, model, tiny_G):
    save_native(tmp_path / "gen", tiny_G)
    with pytest.raises(CheckpointError, match="not a DualStyleGAN checkpoint"):
        load_dualstylegan(tmp_path / "gen")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_dualstylegan(tmp_path / "empty_dir")
    save_dualstylegan(tmp_path / "ck", model)
    (tmp_path / "ck" / "dualstylegan.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_dualstylegan(tmp_path / "ck")
    save_dualstylegan(tmp_path / "ck2", model)
    (tmp_path / "ck2" / "dualstylegan.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_dualstylegan(tmp_path / "ck2")
    save_dualstylegan(tmp_path / "ck3", model)
    doc = (tmp_path / "ck3" / "config.json").read_text().replace('"res_index": 2', '"res_index": 3')
    (tmp_path / "ck3" / "config.json").write_text(doc)
    with pytest.raises(CheckpointError, match="invalid DualStyleGAN config"):
        load_dualstylegan(tmp_path / "ck3")
    (tmp_path / "ck3" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_dualstylegan(tmp_path / "ck3")


# ----------------------------------------------------------------------------------------------------------
# Exstyle codes


def _codes(n: int = 3, num_ws: int = 18, w_dim: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    names = ["Cartoons_00038_07.jpg", "zz.png", "ünïcode 01.jpg", "a.jpg", "m.jpg"][:n]
    return {name: rng.randn(1, num_ws, w_dim).astype(np.float32) for name in names}


def _npy_object_file(path, payload: bytes, version: tuple[int, int] = (1, 0)) -> None:
    """A .npy file with the header np.save writes for a 0-d object array and the given pickle payload."""
    f = io.BytesIO()
    header = {"descr": "|O", "fortran_order": False, "shape": ()}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(f, header)
    else:
        np.lib.format.write_array_header_2_0(f, header)
    path.write_bytes(f.getvalue() + payload)


def _object_scalar(obj) -> np.ndarray:
    """A 0-d object array holding obj, as np.save makes of a dict."""
    a = np.empty((), dtype=object)
    a[()] = obj
    return a


def _assert_codes_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == np.float32 and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def test_numpy_written_official_file_loads(tmp_path):
    codes = _codes()
    np.save(tmp_path / "exstyle_code.npy", codes, allow_pickle=True)
    _assert_codes_equal(load_exstyle_codes(tmp_path / "exstyle_code.npy", num_ws=18, w_dim=16), codes)


def test_numpy1_style_pickle_loads(tmp_path):
    """numpy 1.x writes protocol 3 with numpy.core.multiarray._reconstruct (numpy 2.x: numpy._core)."""
    codes = _codes(seed=1)
    payload = pickle.dumps(_object_scalar(codes), protocol=3)
    assert b"numpy._core.multiarray" in payload
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    _npy_object_file(tmp_path / "old.npy", payload)
    _assert_codes_equal(load_exstyle_codes(tmp_path / "old.npy"), codes)
    with warnings.catch_warnings():  # numpy 2 reads it too, through its numpy.core shim
        warnings.simplefilter("ignore", DeprecationWarning)
        ref = np.load(tmp_path / "old.npy", allow_pickle=True).item()
    _assert_codes_equal(ref, codes)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_other_protocols_and_header_versions(tmp_path, protocol):
    codes = _codes(seed=protocol)
    if protocol == 2:
        # protocol 2 stores bytes via _codecs.encode, which is not an array: refused with a clear error
        _npy_object_file(tmp_path / "p.npy", pickle.dumps(_object_scalar(codes), protocol=2))
        with pytest.raises(CheckpointError, match="_codecs.encode"):
            load_exstyle_codes(tmp_path / "p.npy")
        return
    _npy_object_file(tmp_path / "p.npy", pickle.dumps(_object_scalar(codes), protocol=protocol), (2, 0))
    _assert_codes_equal(load_exstyle_codes(tmp_path / "p.npy"), codes)


def test_byte_order_2d_codes_and_float64_are_normalised(tmp_path):
    rng = np.random.RandomState(3)
    big = rng.randn(1, 18, 16).astype(">f4")
    flat = rng.randn(18, 16).astype(np.float32)
    dbl = rng.randn(1, 18, 16)
    fortran = np.asfortranarray(rng.randn(18, 16).astype(np.float32))
    np.save(tmp_path / "c.npy", {"big": big, "flat": flat, "dbl": dbl, "f": fortran}, allow_pickle=True)
    got = load_exstyle_codes(tmp_path / "c.npy")
    assert all(v.dtype == np.float32 and v.shape == (1, 18, 16) for v in got.values())
    assert np.array_equal(got["big"], big.astype(np.float32))
    assert np.array_equal(got["flat"][0], flat) and np.array_equal(got["f"][0], fortran)
    assert np.array_equal(got["dbl"], dbl.astype(np.float32))


def test_writers_official_and_native(tmp_path):
    codes = _codes(n=5, seed=4)
    save_exstyle_codes(tmp_path / "refined_exstyle_code.npy", codes)
    official = np.load(tmp_path / "refined_exstyle_code.npy", allow_pickle=True).item()  # the official reader
    _assert_codes_equal(official, codes)
    _assert_codes_equal(load_exstyle_codes(tmp_path / "refined_exstyle_code.npy"), codes)
    save_exstyle_codes(tmp_path / "codes.safetensors", {k: torch.from_numpy(v) for k, v in codes.items()})
    assert b"__reduce__" not in (tmp_path / "codes.safetensors").read_bytes()
    _assert_codes_equal(load_exstyle_codes(tmp_path / "codes.safetensors"), codes)
    with pytest.raises(ValueError, match=".npy .official. or .safetensors"):
        save_exstyle_codes(tmp_path / "codes.bin", codes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.safetensors", "refined_exstyle_code.npy"]


def test_loaded_codes_feed_the_model(tmp_path, model):
    codes = _codes(n=2, num_ws=8, w_dim=64, seed=5)
    np.save(tmp_path / "exstyle_code.npy", codes, allow_pickle=True)
    loaded = load_exstyle_codes(tmp_path / "exstyle_code.npy", num_ws=model.num_ws, w_dim=model.z_dim)
    ex = torch.from_numpy(loaded["zz.png"])
    with torch.no_grad():
        img = model.stylize(torch.randn(1, 8, 64), ex, psi=0.75)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def _write_marker_reduce(marker):
    return [_Hostile(os.system, (f"touch {shlex.quote(str(marker))}",)),
            _Hostile(open, (str(marker), "w")),
            _Hostile(eval, (f"open({str(marker)!r}, 'w')",))]


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("where", ["top", "value", "inside_an_array"])
def test_hostile_pickles_are_refused_and_never_run(tmp_path, which, where):
    marker = tmp_path / "marker"
    evil = _write_marker_reduce(marker)[which]
    if where == "top":
        obj = evil
    elif where == "value":
        obj = _object_scalar({"a.jpg": np.zeros((1, 18, 16), np.float32), "b.jpg": evil})
    else:
        obj = _object_scalar({"a.jpg": _object_scalar(evil)})
    _npy_object_file(tmp_path / "evil.npy", pickle.dumps(obj, protocol=4))
    with pytest.raises(CheckpointError, match="refused to load: the pickle references"):
        load_exstyle_codes(tmp_path / "evil.npy")
    assert not marker.exists()


def test_hostile_marker_mechanism_is_real(tmp_path):
    """The same file, read the official way (np.load allow_pickle), does run the payload."""
    marker = tmp_path / "marker"
    _npy_object_file(tmp_path / "evil.npy", pickle.dumps(_write_marker_reduce(marker)[1], protocol=4))
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert marker.exists()


def test_pickle_tampering_with_loader_objects_is_refused(tmp_path):
    # GLOBAL numpy.dtype, then BUILD on it with a state dict: would set attributes on the stand-in.
    payload = b"\x80\x02cnumpy\ndtype\n}X\x03\x00\x00\x00foo\x94K\x01sb."
    _npy_object_file(tmp_path / "t.npy", payload)
    with pytest.raises(CheckpointError, match="modify a loader object"):
        load_exstyle_codes(tmp_path / "t.npy")
    # calling numpy.ndarray directly (instead of via _reconstruct)
    payload = b"\x80\x02cnumpy\nndarray\nK\x01\x85R."
    _npy_object_file(tmp_path / "t2.npy", payload)
    with pytest.raises(CheckpointError, match="t2.npy: malformed pickle payload"):
        load_exstyle_codes(tmp_path / "t2.npy")


def test_non_float_and_structured_arrays_are_refused(tmp_path):
    np.save(tmp_path / "i.npy", {"a": np.zeros((1, 18, 16), np.int32)}, allow_pickle=True)
    with pytest.raises(CheckpointError, match="dtype 'i4' is not a plain float"):
        load_exstyle_codes(tmp_path / "i.npy")
    rec = np.zeros((1, 18), dtype=[("x", "f4"), ("y", "f4")])
    np.save(tmp_path / "s.npy", {"a": rec}, allow_pickle=True)
    with pytest.raises(CheckpointError, match="refused"):
        load_exstyle_codes(tmp_path / "s.npy")


def test_wrong_contents_are_clear_errors(tmp_path):
    cases = {
        "list.npy": [np.zeros((1, 18, 16), np.float32)],
        "empty.npy": {},
        "shape.npy": {"a": np.zeros((2, 18, 16), np.float32)},
        "mixed.npy": {"a": np.zeros((1, 18, 16), np.float32), "b": np.zeros((1, 17, 16), np.float32)},
        "nan.npy": {"a": np.full((1, 18, 16), np.nan, np.float32)},
        "key.npy": {3: np.zeros((1, 18, 16), np.float32)},
    }
    expected = {"list.npy": "expected a dict", "empty.npy": "no exstyle codes", "shape.npy": "has shape",
                "mixed.npy": r"expected \(1, 18, 16\)", "nan.npy": "non-finite", "key.npy": "not a string"}
    for name, obj in cases.items():
        np.save(tmp_path / name, _object_scalar(obj), allow_pickle=True)
        with pytest.raises(CheckpointError, match=expected[name]) as exc:
            load_exstyle_codes(tmp_path / name)
        assert name in str(exc.value)
    np.save(tmp_path / "good.npy", _codes(), allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"expected \(1, 8, 16\)"):
        load_exstyle_codes(tmp_path / "good.npy", num_ws=8)
    np.save(tmp_path / "plain.npy", np.zeros((3, 18, 16), np.float32))
    with pytest.raises(CheckpointError, match="expected np.save of a dict"):
        load_exstyle_codes(tmp_path / "plain.npy")
    (tmp_path / "junk.npy").write_bytes(b"hello world, not numpy")
    with pytest.raises(CheckpointError, match="not an exstyle code file"):
        load_exstyle_codes(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError):
        load_exstyle_codes(tmp_path / "missing.npy")


def test_truncated_exstyle_files_are_clear_errors(tmp_path):
    np.save(tmp_path / "full.npy", _codes(), allow_pickle=True)
    data = (tmp_path / "full.npy").read_bytes()
    for n in (3, 9, 60, 140, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.npy").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="cut.npy: (truncated|corrupt or truncated)") as exc:
            load_exstyle_codes(tmp_path / "cut.npy")
        assert "\n" not in str(exc.value)
    (tmp_path / "hdr.npy").write_bytes(data[:10] + b"{'descr': os.system('x')}".ljust(118) + b"\n" + data[128:])
    with pytest.raises(CheckpointError, match="unreadable .npy header"):
        load_exstyle_codes(tmp_path / "hdr.npy")


def test_bad_native_code_files(tmp_path):
    from safetensors.numpy import save_file
    save_file({"codes": np.zeros((2, 18, 16), np.float32)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="not a stylecast exstyle file"):
        load_exstyle_codes(tmp_path / "nometa.safetensors")
    save_file({"codes": np.zeros((2, 18, 16), np.float32)}, str(tmp_path / "names.safetensors"),
              metadata={"format": "stylecast.exstyle/v1", "names": '["a"]'})
    with pytest.raises(CheckpointError, match="1 names for 2 codes"):
        load_exstyle_codes(tmp_path / "names.safetensors")
    save_exstyle_codes(tmp_path / "ok.safetensors", _codes())
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 7])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_exstyle_codes(tmp_path / "cut.safetensors")
