"""pSp / e4e encoders and the ArcFace IR-SE network: official-layout checkpoints built here at tiny size load and
match an independent float64 functional oracle written from the papers' code description; native and official
round trips are bit-exact; bad checkpoints raise one-line CheckpointErrors; ONNX export runs at another batch."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.checkpoints import CheckpointError, generator_to_rosinality, save_native
from training.inversion.encoders import (EncoderConfig, build_encoder, codes_to_ws, load_encoder, resize_faces,
                                         resize_weights, save_encoder, save_official, z_plus_to_ws)
from training.inversion.irse import ArcFaceConfig, Backbone, IRSEConfig, load_arcface

# The tiny architecture used throughout: stage widths 8/16/24/32, units 2/2/2/1 (stage 1 keeps the stem width,
# so its first unit has the strided max-pool shortcut), SE reduction 4, 64 px input -> c3 4 px, p2 8, p1 16.
STEM, WIDTHS, UNITS, SE_R = 8, (8, 16, 24, 32), (2, 2, 2, 1), 4
N_STYLES, W_DIM, SIZE = 8, 64, 64


# ----------------------------------------------------------------------------------------------------------
# Independent oracle: official key names / shapes and a functional float64 forward


def _bn(p: str, c: int) -> dict[str, tuple[tuple[int, ...], str]]:
    return {p + "weight": ((c,), "bn_w"), p + "bias": ((c,), "small"), p + "running_mean": ((c,), "small"),
            p + "running_var": ((c,), "var"), p + "num_batches_tracked": ((), "count")}


def official_irse_keys(stem=STEM, widths=WIDTHS, units=UNITS, se_r=SE_R, se=True, in_c=3):
    """key -> (shape, kind) of InsightFace_Pytorch's input_layer + body, from the textual description."""
    keys = {"input_layer.0.weight": ((stem, in_c, 3, 3), "conv"), "input_layer.2.weight": ((stem,), "prelu")}
    keys.update(_bn("input_layer.1.", stem))
    i, c_in = 0, stem
    for depth, n in zip(widths, units):
        for u in range(n):
            p = f"body.{i}."
            if c_in != depth:
                keys[p + "shortcut_layer.0.weight"] = ((depth, c_in, 1, 1), "conv")
                keys.update(_bn(p + "shortcut_layer.1.", depth))
            keys.update(_bn(p + "res_layer.0.", c_in))
            keys[p + "res_layer.1.weight"] = ((depth, c_in, 3, 3), "conv")
            keys[p + "res_layer.2.weight"] = ((depth,), "prelu")
            keys[p + "res_layer.3.weight"] = ((depth, depth, 3, 3), "conv")
            keys.update(_bn(p + "res_layer.4.", depth))
            if se:
                keys[p + "res_layer.5.fc1.weight"] = ((depth // se_r, depth, 1, 1), "conv")
                keys[p + "res_layer.5.fc2.weight"] = ((depth, depth // se_r, 1, 1), "conv")
            i, c_in = i + 1, depth
    return keys


def official_encoder_keys(n_styles=N_STYLES, w_dim=W_DIM, size=SIZE, **irse):
    widths = irse.get("widths", WIDTHS)
    keys = official_irse_keys(**irse)
    for i in range(n_styles):
        spatial = size // 16 if i < 3 else size // 8 if i < 7 else size // 4
        for j in range(int(math.log2(spatial))):
            c_in = widths[3] if j == 0 else w_dim
            keys[f"styles.{i}.convs.{2 * j}.weight"] = ((w_dim, c_in, 3, 3), "conv")
            keys[f"styles.{i}.convs.{2 * j}.bias"] = ((w_dim,), "small")
        keys[f"styles.{i}.linear.weight"] = ((w_dim, w_dim), "randn")
        keys[f"styles.{i}.linear.bias"] = ((w_dim,), "small")
    keys["latlayer1.weight"] = ((widths[3], widths[2], 1, 1), "conv")
    keys["latlayer1.bias"] = ((widths[3],), "small")
    keys["latlayer2.weight"] = ((widths[3], widths[1], 1, 1), "conv")
    keys["latlayer2.bias"] = ((widths[3],), "small")
    return keys


def official_arcface_keys(emb=16, spatial=7, **irse):
    c = irse.get("widths", WIDTHS)[-1]
    keys = official_irse_keys(**irse)
    keys.update(_bn("output_layer.0.", c))
    keys["output_layer.3.weight"] = ((emb, c * spatial * spatial), "conv")
    keys["output_layer.3.bias"] = ((emb,), "small")
    keys.update(_bn("output_layer.4.", emb))
    return keys


def random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, (shape, kind) in keys.items():
        if kind == "count":
            sd[k] = torch.tensor(7, dtype=torch.long)
        elif kind == "conv":
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif kind == "bn_w":
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif kind == "var":
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif kind == "prelu":
            sd[k] = 0.5 * torch.rand(shape, generator=g)
        elif kind == "small":
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g)
    return sd


def o_bn(sd, p, x):
    mean, var = sd[p + "running_mean"], sd[p + "running_var"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * sd[p + "weight"].view(shape) \
        + sd[p + "bias"].view(shape)


def o_prelu(x, a):
    return torch.where(x >= 0, x, a.view(1, -1, 1, 1) * x)


def o_unit(sd, p, x, c_in, depth, stride, se):
    if c_in == depth:
        short = x[:, :, ::stride, ::stride]  # MaxPool2d(1, stride) is plain subsampling
    else:
        short = o_bn(sd, p + "shortcut_layer.1.", F.conv2d(x, sd[p + "shortcut_layer.0.weight"], stride=stride))
    r = o_bn(sd, p + "res_layer.0.", x)
    r = o_prelu(F.conv2d(r, sd[p + "res_layer.1.weight"], padding=1), sd[p + "res_layer.2.weight"])
    r = o_bn(sd, p + "res_layer.4.", F.conv2d(r, sd[p + "res_layer.3.weight"], stride=stride, padding=1))
    if se:
        gate = r.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(gate, sd[p + "res_layer.5.fc1.weight"])),
                                      sd[p + "res_layer.5.fc2.weight"]))
        r = r * gate
    return r + short


def o_body(sd, x, stem=STEM, widths=WIDTHS, units=UNITS, se=True):
    """Returns the output of every unit."""
    x = o_prelu(o_bn(sd, "input_layer.1.", F.conv2d(x, sd["input_layer.0.weight"], padding=1)),
                sd["input_layer.2.weight"])
    outs, i, c_in = [], 0, stem
    for depth, n in zip(widths, units):
        for u in range(n):
            x = o_unit(sd, f"body.{i}.", x, c_in, depth, 2 if u == 0 else 1, se)
            outs.append(x)
            i, c_in = i + 1, depth
    return outs


def interp_matrix(n_in, n_out):
    """Bilinear align_corners=True interpolation as a [n_out, n_in] matrix."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        t = src - lo
        m[o, lo] += 1 - t
        m[o, hi] += t
    return m


def o_upsample_add(x, y):
    mh, mw = interp_matrix(x.shape[2], y.shape[2]), interp_matrix(x.shape[3], y.shape[3])
    return torch.einsum("oh,nchw,pw->ncop", mh, x, mw) + y


def o_style(sd, i, x):
    j = 0
    while f"styles.{i}.convs.{j}.weight" in sd:
        x = F.leaky_relu(F.conv2d(x, sd[f"styles.{i}.convs.{j}.weight"], sd[f"styles.{i}.convs.{j}.bias"],
                                  stride=2, padding=1), 0.01)
        j += 2
    x = x.reshape(x.shape[0], -1)
    weight = sd[f"styles.{i}.linear.weight"]
    return x @ (weight / math.sqrt(weight.shape[1])).t() + sd[f"styles.{i}.linear.bias"]


def o_encoder(sd, img, kind, n_styles=N_STYLES, latent_avg=None, units=UNITS, se=True):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    outs = o_body(sd, img.double(), units=units, se=se)
    ends = np.cumsum(units) - 1
    c1, c2, c3 = outs[ends[1]], outs[ends[2]], outs[ends[3]]
    p2 = o_upsample_add(c3, F.conv2d(c2, sd["latlayer1.weight"], sd["latlayer1.bias"]))
    p1 = o_upsample_add(p2, F.conv2d(c1, sd["latlayer2.weight"], sd["latlayer2.bias"]))
    feats = [c3 if i < 3 else p2 if i < 7 else p1 for i in range(n_styles)]
    if kind == "psp":
        ws = torch.stack([o_style(sd, i, feats[i]) for i in range(n_styles)], 1)
    else:
        w0 = o_style(sd, 0, c3)
        ws = torch.stack([w0] + [w0 + o_style(sd, i, feats[i]) for i in range(1, n_styles)], 1)
    if latent_avg is not None:
        ws = ws + latent_avg.double()
    return ws


def o_arcface(sd, img, units=UNITS):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = o_body(sd, img.double(), units=units)[-1]
    x = o_bn(sd, "output_layer.0.", x).reshape(x.shape[0], -1)
    x = o_bn(sd, "output_layer.4.", x @ sd["output_layer.3.weight"].t() + sd["output_layer.3.bias"])
    return x / x.norm(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


def _opts(kind, **kw):
    opts = {"encoder_type": {"psp": "GradualStyleEncoder", "e4e": "Encoder4Editing"}[kind], "input_nc": 3,
            "label_nc": 0, "output_size": 32, "stylegan_size": 32, "start_from_latent_avg": True,
            "learn_in_w": False, "batch_size": 8, "lpips_lambda": 0.8}  # plus unrelated training options
    opts.update(kw)
    return opts


def _write(path, enc_sd, opts, latent_avg=None, dec_sd=None, extra=None):
    sd = {f"encoder.{k}": v for k, v in enc_sd.items()}
    sd.update({f"decoder.{k}": v for k, v in (dec_sd or {}).items()})
    obj = {"state_dict": sd, "opts": opts}
    if latent_avg is not None:
        obj["latent_avg"] = latent_avg
    obj.update(extra or {})
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def enc_sd():
    return random_state(official_encoder_keys(), seed=1)


@pytest.fixture(scope="module")
def img():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _one_line(exc):
    assert "\n" not in str(exc), str(exc)


# ----------------------------------------------------------------------------------------------------------
# Key layout at full size


def test_full_size_layouts_have_the_official_keys():
    with torch.device("meta"):
        for kind in ("psp", "e4e"):
            enc = build_encoder(EncoderConfig.official(kind, 1024))
            ours = {k: tuple(v.shape) for k, v in enc.state_dict().items() if k != "latent_avg"}
            want = {k: s for k, (s, _) in official_encoder_keys(18, 512, 256, stem=64, widths=(64, 128, 256, 512),
                                                                units=(3, 4, 14, 3), se_r=16).items()}
            assert ours == want
            assert enc._taps == (6, 20, 23)
        arc = Backbone(ArcFaceConfig())
        ours = {k: tuple(v.shape) for k, v in arc.state_dict().items()}
        want = {k: s for k, (s, _) in official_arcface_keys(512, 7, stem=64, widths=(64, 128, 256, 512),
                                                            units=(3, 4, 14, 3), se_r=16).items()}
        assert ours == want
    assert IRSEConfig.resnet(100).units == (3, 13, 30, 3) and IRSEConfig.resnet(152).units == (3, 8, 36, 3)
    assert IRSEConfig.resnet(152, "ir").mode == "ir"
    with pytest.raises(ValueError, match="num_layers"):
        IRSEConfig.resnet(34)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints


@pytest.mark.parametrize("kind", ["psp", "e4e"])
@pytest.mark.parametrize("avg_shape", ["1d", "2d"])
def test_official_checkpoint_matches_the_oracle(tmp_path, enc_sd, img, kind, avg_shape):
    g = torch.Generator().manual_seed(5)
    latent_avg = torch.randn(W_DIM, generator=g) if avg_shape == "1d" else torch.randn(N_STYLES, W_DIM, generator=g)
    path = _write(tmp_path / f"{kind}.pt", enc_sd, _opts(kind), latent_avg)
    ck = load_encoder(path)
    enc = ck.encoder
    assert ck.format == "official" and ck.decoder is None and enc.cfg.kind == kind
    assert enc.cfg == EncoderConfig(kind=kind, backbone=IRSEConfig(stem_channels=STEM, widths=WIDTHS, units=UNITS,
                                                                   se_reduction=SE_R),
                                    n_styles=N_STYLES, w_dim=W_DIM, input_size=SIZE, add_latent_avg=True)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    want = o_encoder(enc_sd, img, kind, latent_avg=latent_avg)
    got64 = enc.double()(img.double())
    assert got64.shape == (2, N_STYLES, W_DIM)
    torch.testing.assert_close(got64, want, rtol=1e-10, atol=1e-10)
    got32 = enc.float()(img)
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_official_without_latent_avg_and_plain_ir(tmp_path, img):
    units = (1, 2, 1, 1)
    sd = random_state(official_encoder_keys(units=units, se=False), seed=9)
    path = _write(tmp_path / "ir.pt", sd, _opts("psp", start_from_latent_avg=False))
    enc = load_encoder(path).encoder
    assert enc.cfg.backbone.mode == "ir" and enc.cfg.backbone.units == units and not enc.cfg.add_latent_avg
    torch.testing.assert_close(enc.double()(img.double()), o_encoder(sd, img, "psp", units=units, se=False),
                               rtol=1e-10, atol=1e-10)


def test_decoder_is_returned_as_our_generator(tmp_path, enc_sd, img, tiny_G):
    g_ema = generator_to_rosinality(tiny_G)
    latent_avg = tiny_G.mapping.w_avg.clone()
    path = _write(tmp_path / "e4e.pt", enc_sd, _opts("e4e"), latent_avg, g_ema,
                  extra={"global_step": 100, "best_val_loss": 0.5})
    ck = load_encoder(path)
    G = ck.decoder
    assert G is not None and G.cfg == tiny_G.cfg
    ours, ref = G.state_dict(), tiny_G.state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    ws = ck.encoder(img)
    torch.testing.assert_close(G.synthesis(ws), tiny_G.synthesis(ws), rtol=0, atol=0)
    assert load_encoder(path, with_decoder=False).decoder is None


def test_missing_latent_avg_falls_back_to_the_decoder_mean(tmp_path, enc_sd, tiny_G):
    path = _write(tmp_path / "psp.pt", enc_sd, _opts("psp"), None, generator_to_rosinality(tiny_G))
    ck = load_encoder(path)
    avg = ck.decoder.mapping.w_avg
    assert torch.equal(ck.encoder.latent_avg, avg.expand(N_STYLES, W_DIM))
    with torch.no_grad():  # the mean of the mapping network over many z, as pSp's mean_latent
        z = torch.randn(20000, tiny_G.z_dim, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(avg, tiny_G.mapping(z).mean(0), atol=0.05, rtol=0)


def test_e4e_progressive_stage(tmp_path, enc_sd, img):
    enc = load_encoder(_write(tmp_path / "e4e.pt", enc_sd, _opts("e4e", start_from_latent_avg=False))).encoder
    full = enc(img)
    enc.progressive_stage = 2
    part = enc(img)
    torch.testing.assert_close(part[:, :3], full[:, :3], rtol=0, atol=0)
    for i in range(3, N_STYLES):
        torch.testing.assert_close(part[:, i], full[:, 0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("kind", ["psp", "e4e"])
def test_native_and_official_round_trips_are_bit_exact(tmp_path, enc_sd, img, kind, tiny_G):
    latent_avg = tiny_G.mapping.w_avg.clone()
    ck = load_encoder(_write(tmp_path / "src.pt", enc_sd, _opts(kind), latent_avg, generator_to_rosinality(tiny_G)))
    enc, ws = ck.encoder, ck.encoder(img)

    native = save_encoder(tmp_path / "native", enc, meta={"source": "test"})
    assert sorted(p.name for p in native.iterdir()) == ["config.json", "encoder.safetensors"]
    back = load_encoder(native)
    assert back.format == "native" and back.encoder.cfg == enc.cfg and back.meta == {"source": "test"}
    a, b = enc.state_dict(), back.encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.encoder(img), ws)
    with pytest.raises(FileExistsError):
        save_encoder(native, enc)

    official = save_official(tmp_path / "out.pt", enc, ck.decoder)
    raw = torch.load(official, weights_only=True)
    want = {f"encoder.{k}": v for k, v in enc_sd.items()}
    want.update({f"decoder.{k}": v for k, v in generator_to_rosinality(tiny_G).items()})
    assert raw["state_dict"].keys() == want.keys()
    assert all(torch.equal(raw["state_dict"][k], want[k]) for k in want)
    assert raw["opts"]["encoder_type"] == _opts(kind)["encoder_type"] and raw["opts"]["start_from_latent_avg"]
    assert raw["opts"]["output_size"] == raw["opts"]["stylegan_size"] == 32 and raw["opts"]["input_nc"] == 3
    back = load_encoder(official)
    assert back.encoder.cfg == enc.cfg and torch.equal(back.encoder(img), ws)
    assert all(torch.equal(x, y) for x, y in zip(back.decoder.state_dict().values(), ck.decoder.state_dict().values()))
    with pytest.raises(FileExistsError):
        save_official(official, enc)


def test_native_errors(tmp_path, tiny_G):
    enc = build_encoder(EncoderConfig.tiny())
    with pytest.raises(CheckpointError, match="not an encoder") as e:
        load_encoder(save_native(tmp_path / "gen", tiny_G))
    _one_line(e.value)
    d = save_encoder(tmp_path / "enc", enc)
    (d / "encoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_encoder(d)
    _one_line(e.value)
    with pytest.raises(TypeError):  # non-JSON meta fails before anything is written
        save_encoder(tmp_path / "enc2", enc, meta={"x": object()})
    assert not (tmp_path / "enc2").exists()
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="2 log2"):
        save_official(tmp_path / "odd.pt", build_encoder(EncoderConfig.tiny(n_styles=7)))


# ----------------------------------------------------------------------------------------------------------
# Bad official checkpoints


def _mark(path):
    Path(path).write_text("code ran")


class _Hostile:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _bad_cases(tmp_path, enc_sd):
    g = torch.Generator().manual_seed(0)
    avg = torch.randn(W_DIM, generator=g)
    cases = {}
    sd = dict(enc_sd, **{"styles.0.extra": torch.zeros(1)})
    cases["unknown key"] = (_write(tmp_path / "a.pt", sd, _opts("psp"), avg), "styles.0.extra")
    sd = {k: v for k, v in enc_sd.items() if k != "styles.5.linear.bias"}
    cases["missing key"] = (_write(tmp_path / "b.pt", sd, _opts("psp"), avg), "styles.5.linear.bias")
    sd = {k: v for k, v in enc_sd.items() if k != "body.3.res_layer.1.weight"}
    cases["missing unit conv"] = (_write(tmp_path / "b2.pt", sd, _opts("psp"), avg), "body.3.res_layer.1.weight")
    sd = dict(enc_sd, **{"latlayer1.weight": torch.zeros(32, 24, 3, 3)})
    cases["wrong shape"] = (_write(tmp_path / "c.pt", sd, _opts("psp"), avg), "latlayer1.weight")
    cases["encoder_type"] = (_write(tmp_path / "d.pt", enc_sd, _opts("psp", encoder_type="ResNetBackboneEncoder"),
                                    avg), "ResNetBackboneEncoder")
    cases["input_nc 1"] = (_write(tmp_path / "e.pt", enc_sd, _opts("psp", input_nc=1), avg), "input_nc=1")
    sd = dict(enc_sd, **{"input_layer.0.weight": torch.zeros(STEM, 1, 3, 3)})
    cases["1-channel stem"] = (_write(tmp_path / "e2.pt", sd, _opts("psp"), avg), "3")
    sd = {k: v for k, v in enc_sd.items() if not k.startswith("styles.4.convs.4")}
    cases["style pattern"] = (_write(tmp_path / "e3.pt", sd, _opts("psp"), avg), "styles.4")
    cases["learn_in_w"] = (_write(tmp_path / "f.pt", enc_sd, _opts("psp", learn_in_w=True), avg), "learn_in_w")
    cases["size mismatch"] = (_write(tmp_path / "g.pt", enc_sd, _opts("psp", output_size=1024), avg), "output_size")
    cases["latent_avg shape"] = (_write(tmp_path / "h.pt", enc_sd, _opts("psp"), torch.zeros(3, W_DIM)),
                                 "latent_avg")
    cases["no latent_avg, no decoder"] = (_write(tmp_path / "i.pt", enc_sd, _opts("psp")), "latent_avg")
    cases["nan"] = (_write(tmp_path / "j.pt", dict(enc_sd, **{"latlayer2.bias": torch.full((32,), math.nan)}),
                           _opts("psp"), avg), "latlayer2.bias")
    cases["no opts"] = (_write(tmp_path / "k.pt", enc_sd, None, avg), "opts")
    sd = {f"encoder.{k}": v for k, v in enc_sd.items()}
    sd["discriminator.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd, "opts": _opts("psp"), "latent_avg": avg}, tmp_path / "m.pt")
    cases["foreign prefix"] = (tmp_path / "m.pt", "discriminator.0.weight")
    torch.save({"g_ema": {}, "latent_avg": avg}, tmp_path / "n.pt")
    cases["generator"] = (tmp_path / "n.pt", "generator")
    torch.save([1, 2, 3], tmp_path / "o.pt")
    cases["not a dict"] = (tmp_path / "o.pt", "list")
    good = _write(tmp_path / "p.pt", enc_sd, _opts("psp"), avg).read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    cases["truncated"] = (tmp_path / "trunc.pt", "corrupt or truncated")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.pt", "empty")
    return cases


def test_bad_official_checkpoints_raise_one_line_errors(tmp_path, enc_sd):
    for name, (path, needle) in _bad_cases(tmp_path, enc_sd).items():
        with pytest.raises(CheckpointError) as e:
            load_encoder(path)
        msg = str(e.value)
        _one_line(e.value)
        assert str(path) in msg, (name, msg)
        assert needle in msg, (name, msg)


def test_hostile_pickle_is_refused_without_running_code(tmp_path, enc_sd):
    marker = tmp_path / "marker"
    opts = _opts("psp")
    opts["payload"] = _Hostile(_mark, (str(marker),))
    path = _write(tmp_path / "evil.pt", enc_sd, opts, torch.zeros(W_DIM))
    with pytest.raises(CheckpointError, match="refused") as e:
        load_encoder(path)
    _one_line(e.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        EncoderConfig(kind="restyle")
    with pytest.raises(ValueError, match="w\\+"):
        EncoderConfig(latent_space="w")
    with pytest.raises(ValueError, match="power of two"):
        EncoderConfig.tiny(input_size=48)
    with pytest.raises(ValueError, match="unknown"):
        EncoderConfig.from_dict({"kind": "psp", "bogus": 1})
    with pytest.raises(ValueError, match="differ"):
        IRSEConfig(widths=(8, 8, 16, 32))
    cfg = EncoderConfig.tiny("e4e")
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_matches_pil_and_torch_antialiased_bilinear():
    from PIL import Image

    x = torch.rand(1, 3, 150, 150, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    enc = build_encoder(EncoderConfig.tiny())
    out = enc.preprocess(x.float())
    assert out.shape == (1, 3, SIZE, SIZE) and out.dtype == torch.float32
    ref_torch = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out.double(), ref_torch, rtol=0, atol=1e-6)
    for c in range(3):  # PIL's float ("F") images resample with the same filter
        pil = Image.fromarray(x[0, c].float().numpy(), mode="F").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(out[0, c].numpy(), np.asarray(pil), rtol=0, atol=1e-5)
    up = resize_faces(x[:, :, :40, :40], SIZE)  # upsampling too
    ref_up = F.interpolate(x[:, :, :40, :40], size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(up, ref_up, rtol=0, atol=1e-9)
    assert enc.preprocess(out) is out and np.array_equal(resize_weights(5, 5), np.eye(5))
    with pytest.raises(ValueError, match="preprocess"):
        enc(x.float())


# ----------------------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as export/ uses
@pytest.mark.parametrize("kind", ["psp", "e4e"])
def test_onnx_export_dynamic_batch(tmp_path, enc_sd, kind):
    import onnxruntime as ort

    enc = load_encoder(_write(tmp_path / "src.pt", enc_sd, _opts(kind), torch.randn(W_DIM))).encoder
    buf = io.BytesIO()
    torch.onnx.export(enc, (torch.zeros(2, 3, SIZE, SIZE),), buf, input_names=["img"], output_names=["ws"],
                      dynamic_axes={"img": {0: "N"}, "ws": {0: "N"}}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    (got,) = sess.run(["ws"], {"img": x.numpy()})
    assert got.shape == (3, N_STYLES, W_DIM)
    assert np.abs(got - enc(x).numpy()).max() <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# ArcFace


def test_arcface_official_layout_loads_and_matches_the_oracle(tmp_path):
    units = (1, 1, 1, 1)
    sd = random_state(official_arcface_keys(units=units), seed=4)
    path = tmp_path / "model_ir_se50.pth"
    torch.save(sd, path)
    net = load_arcface(path)
    assert net.cfg.input_size == 112 and net.cfg.emb_dim == 16 and net.cfg.backbone.units == units
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    emb = net(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(net.double()(x.double()), o_arcface(sd, x, units), rtol=1e-10, atol=1e-10)
    # state dicts of PyTorch < 0.4.1 have no num_batches_tracked
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    torch.testing.assert_close(load_arcface(tmp_path / "old.pth")(x), emb, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="model_ir_se50.pth") as e:
        load_arcface(tmp_path / "missing.pth")
    _one_line(e.value)
    torch.save({k: v for k, v in sd.items() if not k.startswith("output_layer.3")}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="output_layer.3.weight"):
        load_arcface(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------------------------------------
# z+ encoders (DualStyleGAN's encoder.pt: a pSp GradualStyleEncoder whose rows are z codes)


def _rowwise_mapping(G, z_plus):
    """Oracle: every z+ row through the mapping network on its own, as DualStyleGAN's decoder loops over rows."""
    return torch.stack([G.mapping(z_plus[:, i]) for i in range(z_plus.shape[1])], dim=1)


def test_z_plus_official_checkpoint_loads_and_maps_every_row(tmp_path, enc_sd, img, tiny_G):
    path = _write(tmp_path / "encoder.pt", enc_sd, _opts("psp", start_from_latent_avg=False, z_plus_latent=True),
                  None, generator_to_rosinality(tiny_G))
    ck = load_encoder(path)
    assert ck.config.latent_space == "z+" and not ck.config.add_latent_avg and ck.config.kind == "psp"
    codes = ck.encoder(img)  # the forward returns codes in the encoder's own space
    torch.testing.assert_close(codes.double(), o_encoder(enc_sd, img, "psp"), rtol=1e-5, atol=1e-5)
    ws = codes_to_ws(codes, "z+", ck.decoder.mapping)
    assert ws.shape == (2, N_STYLES, tiny_G.w_dim)
    torch.testing.assert_close(ws, _rowwise_mapping(tiny_G, codes), rtol=0, atol=1e-5)
    torch.testing.assert_close(z_plus_to_ws(tiny_G.mapping, codes), ws, rtol=0, atol=0)
    assert not torch.allclose(ws, codes, atol=1e-2)  # the mapping really ran
    assert torch.equal(codes_to_ws(codes, "w+"), codes)
    with pytest.raises(ValueError, match="mapping"):
        codes_to_ws(codes, "z+")
    # The decoder's truncation centre is never taken from a z+ latent_avg (that is a z code, not a w).
    avg = torch.randn(W_DIM, generator=torch.Generator().manual_seed(2)) + 5.0
    with_avg = _write(tmp_path / "avg.pt", enc_sd, _opts("psp", z_plus_latent=True), avg,
                      generator_to_rosinality(tiny_G))
    dec = load_encoder(with_avg).decoder
    assert not torch.allclose(dec.mapping.w_avg, avg, atol=1.0)
    torch.testing.assert_close(dec.mapping.w_avg, ck.decoder.mapping.w_avg, rtol=0, atol=0)


def test_z_plus_recognition_from_opts_and_caller(tmp_path, enc_sd, img):
    g = torch.Generator().manual_seed(8)
    avg = torch.randn(N_STYLES, W_DIM, generator=g)
    plain = _write(tmp_path / "plain.pt", enc_sd, _opts("psp", start_from_latent_avg=False))
    assert load_encoder(plain).config.latent_space == "w+"  # nothing recorded: the official default, W+
    assert load_encoder(plain, latent_space="z+").config.latent_space == "z+"  # the caller says which
    for value in ("z+", "zplus", "Z_PLUS"):
        named = _write(tmp_path / f"named{len(value)}.pt", enc_sd, _opts("e4e", latent_space=value), avg)
        ck = load_encoder(named)
        assert ck.config.latent_space == "z+" and ck.config.kind == "e4e"
        # start_from_latent_avg adds the checkpoint's latent_avg in the encoder's own space, as the official code
        torch.testing.assert_close(ck.encoder(img).double(), o_encoder(enc_sd, img, "e4e", latent_avg=avg),
                                   rtol=1e-5, atol=1e-5)
    assert load_encoder(_write(tmp_path / "w.pt", enc_sd, _opts("psp", z_plus_latent=False), avg)) \
        .config.latent_space == "w+"
    bad = {
        "contradiction": (_opts("psp", z_plus_latent=True, latent_space="w+"), avg, "contradicts"),
        "unknown space": (_opts("psp", latent_space="s"), avg, "neither"),
        "no latent_avg": (_opts("psp", z_plus_latent=True), None, "latent_avg"),
    }
    for name, (opts, latent_avg, needle) in bad.items():
        path = _write(tmp_path / f"bad-{name.replace(' ', '_')}.pt", enc_sd, opts, latent_avg)
        with pytest.raises(CheckpointError, match=needle) as e:
            load_encoder(path)
        _one_line(e.value)
    with pytest.raises(ValueError, match="latent space"):
        load_encoder(plain, latent_space="w")


def test_z_plus_decoder_must_fit(tmp_path, enc_sd):
    from training.networks import Generator, GeneratorConfig
    import dataclasses
    G = Generator(dataclasses.replace(GeneratorConfig.tiny(resolution=32, w_dim=64), z_dim=32))  # z_dim != 64
    path = _write(tmp_path / "zp.pt", enc_sd, _opts("psp", start_from_latent_avg=False, z_plus_latent=True), None,
                  generator_to_rosinality(G))
    with pytest.raises(CheckpointError, match="z_dim") as e:
        load_encoder(path)
    _one_line(e.value)


def test_z_plus_round_trips_are_bit_exact(tmp_path, enc_sd, img, tiny_G):
    src = _write(tmp_path / "src.pt", enc_sd, _opts("e4e", start_from_latent_avg=False, z_plus_latent=True), None,
                 generator_to_rosinality(tiny_G))
    ck = load_encoder(src)
    codes = ck.encoder(img)
    back = load_encoder(save_encoder(tmp_path / "native", ck.encoder))
    assert back.config == ck.config and back.config.latent_space == "z+"
    assert torch.equal(back.encoder(img), codes)
    with pytest.raises(CheckpointError, match="z\\+ encoder, not w\\+"):
        load_encoder(tmp_path / "native", latent_space="w+")
    official = save_official(tmp_path / "out.pt", ck.encoder, ck.decoder)
    raw = torch.load(official, weights_only=True)
    assert raw["opts"]["z_plus_latent"] is True and raw["opts"]["latent_space"] == "z+"
    assert "latent_avg" not in raw
    want = {f"encoder.{k}": v for k, v in enc_sd.items()}
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in want.items())
    again = load_encoder(official)
    assert again.config == ck.config and torch.equal(again.encoder(img), codes)
    assert torch.equal(codes_to_ws(again.encoder(img), "z+", again.decoder.mapping),
                       codes_to_ws(codes, "z+", tiny_G.mapping))
    import dataclasses

    from training.networks import Generator, GeneratorConfig
    with pytest.raises(ValueError, match="z_dim"):
        save_official(tmp_path / "bad.pt", ck.encoder,
                      Generator(dataclasses.replace(GeneratorConfig.tiny(resolution=32, w_dim=64), z_dim=16)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_z_plus_onnx_graph_is_encoder_plus_mapping(tmp_path, enc_sd, tiny_G):
    import onnxruntime as ort

    from export.encoder_export import encoder_golden, export_encoder

    enc = load_encoder(_write(tmp_path / "zp.pt", enc_sd, _opts("psp", start_from_latent_avg=False,
                                                                 z_plus_latent=True))).encoder
    with pytest.raises(ValueError, match="generator"):
        export_encoder(enc, tmp_path / "no-G.onnx")
    info = export_encoder(enc, tmp_path / "encoder.onnx", generator=tiny_G)
    assert not enc.training and not tiny_G.training  # exporting leaves the caller's modules in eval mode
    assert list(info.outputs) == ["ws"] and info.outputs["ws"]["shape"][1:] == [N_STYLES, tiny_G.w_dim]
    sess = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1  # exported at batch 2
    (got,) = sess.run(["ws"], {"img": x.numpy()})
    with torch.no_grad():
        want = _rowwise_mapping(tiny_G, enc(x))
    assert got.shape == (3, N_STYLES, tiny_G.w_dim)
    assert np.abs(got - want.numpy()).max() <= 1e-4
    golden = encoder_golden(enc, tiny_G)  # the bundle's golden ws are W+ too
    (g_ws,) = sess.run(["ws"], {"img": golden["enc_img_u8"].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1})
    assert np.abs(g_ws - golden["enc_ws"]).max() <= 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_z_plus_encoder_in_a_bundle_verifies(tmp_path, enc_sd, tiny_G):
    from export.bundle import BundleOptions, build_bundle
    from serving.verify import verify_bundle

    enc_path = _write(tmp_path / "encoder.pt", enc_sd, _opts("psp", start_from_latent_avg=False,
                                                              z_plus_latent=True))
    ck = save_native(tmp_path / "gen", tiny_G)
    out = build_bundle(ck, tmp_path / "bundle", BundleOptions(name="zp", encoder=enc_path))
    report = verify_bundle(out)
    assert report.ok, (report.problems, [c for c in report.checks if not c.ok])
    assert any(c.graph == "encoder" for c in report.checks)
