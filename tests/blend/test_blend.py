"""Network blending (training.blend): the switch rule layer by layer, bit for bit, against an independent
statement of Pinkney's rule; soft weights; identities; interpolation; N-model weights; architecture errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from training import blend as B
from training.networks import GeneratorConfig


# An independent statement of the rule (module docstring of training.blend / REFERENCE.md), by key name only.
def expected_position(key: str) -> int | None:
    m = re.match(r"synthesis\.b(\d+)\.(const|conv0|conv1|torgb)\b", key)
    if m is None:
        return None
    res, layer = int(m.group(1)), m.group(2)
    level = 0 if layer in ("const", "conv0") else 1
    return 2 * (int(math.log2(res)) - 2) + level


def is_buffer_from_base(key: str) -> bool:
    return key.endswith(("noise_const", "resample_filter"))


def all_switch_points(cfg: GeneratorConfig) -> list[tuple[int, int]]:
    return [(r, lv) for r in cfg.resolutions for lv in (0, 1)]


def test_layer_order_and_positions(blend_cfg, make_gen):
    got = [(s.name, s.position) for s in B.synthesis_layers(blend_cfg)]
    assert got == [
        ("synthesis.b4.const", 0), ("synthesis.b4.conv1", 1), ("synthesis.b4.torgb", 1),
        ("synthesis.b8.conv0", 2), ("synthesis.b8.conv1", 3), ("synthesis.b8.torgb", 3),
        ("synthesis.b16.conv0", 4), ("synthesis.b16.conv1", 5), ("synthesis.b16.torgb", 5),
        ("synthesis.b32.conv0", 6), ("synthesis.b32.conv1", 7), ("synthesis.b32.torgb", 7),
    ]
    # Every parameter of the generator outside the mapping network belongs to exactly one slot.
    G_keys = [k for k in make_gen(blend_cfg, 0).state_dict() if k.startswith("synthesis.")]
    for k in G_keys:
        assert expected_position(k) is not None, k


@pytest.mark.parametrize("mapping", ["base", "other"])
def test_hard_switch_every_point_bit_exact(blend_cfg, model_a, model_b, mapping):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for res, level in all_switch_points(blend_cfg):
        out = B.blend_models(model_a, model_b, res, level, mapping=mapping).state_dict()
        p = 2 * (int(math.log2(res)) - 2) + level
        n_other = 0
        for key, t in out.items():
            if key.startswith("mapping."):
                src = sb if mapping == "other" else sa
            elif is_buffer_from_base(key):
                src = sa
            else:
                src = sb if expected_position(key) - p > 1 else sa
                n_other += src is sb
            assert t.dtype == src[key].dtype and torch.equal(t, src[key]), (res, level, key)
        # The rule really switches: at the top resolution nothing comes from `other`, below it something does.
        assert (n_other == 0) == (p >= 2 * (blend_cfg.log_size - 2)), (res, level, n_other)


def test_toonify_convention_at_32_of_64(make_gen):
    """Switch at (32, 0): everything up to and including 32 px from base; 64 px from other (incl. to-RGB)."""
    cfg = GeneratorConfig.tiny(resolution=64, w_dim=32, max_channels=32, min_channels=16)
    toon, ffhq = make_gen(cfg, 10), make_gen(cfg, 11)
    out = B.blend_models(toon, ffhq, 32, 0).state_dict()
    st, sf = toon.state_dict(), ffhq.state_dict()
    for k, t in out.items():
        from_ffhq = k.startswith("synthesis.b64.") and not is_buffer_from_base(k)
        assert torch.equal(t, (sf if from_ffhq else st)[k]), k


@pytest.mark.parametrize("width", [0.5, 1.0, 3.0])
def test_soft_switch_weights_are_sigmoid(blend_cfg, model_a, model_b, width):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for res, level in all_switch_points(blend_cfg):
        p = 2 * (int(math.log2(res)) - 2) + level
        ys = B.switch_weights(blend_cfg, res, level, width)
        for slot in B.synthesis_layers(blend_cfg):
            x = slot.position - p
            assert ys[slot.name] == pytest.approx(1 / (1 + math.exp(-x / width)), rel=0, abs=1e-15)
        out = B.blend_models(model_a, model_b, res, level, blend_width=width).state_dict()
        for key, t in out.items():
            if key.startswith("mapping.") or is_buffer_from_base(key):
                assert torch.equal(t, sa[key]), key
                continue
            y = 1 / (1 + math.exp(-(expected_position(key) - p) / width))
            # Exactly torch.lerp with that weight, and (1 - y) a + y b within float32 rounding.
            assert torch.equal(t, torch.lerp(sa[key], sb[key], y)), key
            ref = (1 - y) * sa[key].double() + y * sb[key].double()
            torch.testing.assert_close(t.double(), ref, rtol=1e-6, atol=1e-6)


def test_torgb_choices(blend_cfg, model_a, model_b):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for torgb, src in (("base", sa), ("other", sb)):
        out = B.blend_models(model_a, model_b, 8, 0, torgb=torgb).state_dict()
        for k, t in out.items():
            if ".torgb." in k and not is_buffer_from_base(k):
                assert torch.equal(t, src[k]), k
            elif ".conv1." in k and k.startswith("synthesis.b32") and not is_buffer_from_base(k):
                assert torch.equal(t, sb[k]), k  # convs still follow the switch


def test_self_blend_is_identity_in_every_mode(blend_cfg, model_a):
    ref = model_a.state_dict()
    results = [B.blend_models(model_a, model_a, r, lv) for r, lv in all_switch_points(blend_cfg)]
    results += [B.blend_models(model_a, model_a, r, lv, blend_width=w) for r, lv in all_switch_points(blend_cfg)
                for w in (0.3, 1.7)]
    results += [B.interpolate_models(model_a, model_a, a, mapping=m) for a in (0.0, 0.3, 0.5, 0.77, 1.0)
                for m in ("base", "other", "interp")]
    results += [B.blend_many([model_a] * 3, {r: [1, 1, 1] for r in blend_cfg.resolutions}),
                B.blend_many([model_a] * 3, {4: [1, 0, 0], 8: [0.2, 0.3, 0.5], 16: [3, 1, 7], 32: [0, 0, 2]})]
    for G in results:
        out = G.state_dict()
        assert out.keys() == ref.keys()
        for k in ref:
            assert torch.equal(out[k], ref[k]), k


def test_blended_model_renders_like_its_sources(model_a, model_b):
    """A switch at the top layer gives base's images; interpolation alpha 1 with other's mapping gives other's."""
    from training.networks import seeds_to_z
    z = seeds_to_z([0, 1], model_a.z_dim)
    top = B.blend_models(model_a, model_b, 32, 1)
    assert torch.equal(top(z), model_a(z))
    full = B.interpolate_models(model_a, model_b, 1.0, mapping="other")
    # Only the noise buffers come from base: render without noise to compare.
    assert torch.equal(full(z, noise_mode="none"), model_b(z, noise_mode="none"))


def test_interpolation(blend_cfg, model_a, model_b):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    G = B.interpolate_models(model_a, model_b, 0.25)
    for k, t in G.state_dict().items():
        if k.startswith("mapping.") or is_buffer_from_base(k):
            assert torch.equal(t, sa[k]), k
        else:
            assert torch.equal(t, torch.lerp(sa[k], sb[k], 0.25)), k
    Gi = B.interpolate_models(model_a, model_b, 0.25, mapping="interp").state_dict()
    assert torch.equal(Gi["mapping.fc0.weight"], torch.lerp(sa["mapping.fc0.weight"], sb["mapping.fc0.weight"], 0.25))
    # w_avg is re-estimated for the interpolated mapping network (not a copy of either model's).
    assert not torch.equal(Gi["mapping.w_avg"], sa["mapping.w_avg"])
    with pytest.raises(ValueError, match="alpha"):
        B.interpolate_models(model_a, model_b, 1.5)


def test_many_models_by_resolution(blend_cfg, model_a, model_b, model_c):
    srcs = [m.state_dict() for m in (model_a, model_b, model_c)]
    weights = {4: [1, 0, 0], 8: [0, 2, 0], 16: [0, 0, 5], 32: [1, 1, 0]}
    out = B.blend_many([model_a, model_b, model_c], weights).state_dict()
    for k, t in out.items():
        m = re.match(r"synthesis\.b(\d+)\.", k)
        if k.startswith("mapping.") or is_buffer_from_base(k):
            assert torch.equal(t, srcs[0][k]), k
        elif int(m.group(1)) == 32:
            assert torch.equal(t, torch.lerp(srcs[0][k], srcs[1][k], 0.5)), k  # normalised 1:1
        else:
            idx = {4: 0, 8: 1, 16: 2}[int(m.group(1))]
            assert torch.equal(t, srcs[idx][k]), k
    three = B.blend_many([model_a, model_b, model_c], {r: [1, 1, 1] for r in blend_cfg.resolutions}).state_dict()
    k = "synthesis.b16.conv1.weight"
    torch.testing.assert_close(three[k].double(), sum(s[k].double() for s in srcs) / 3, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"missing for resolutions \[32\]"):
        B.blend_many([model_a, model_b], {4: [1, 0], 8: [1, 0], 16: [0, 1]})


def test_parse_resolution_weights(tmp_path, blend_cfg):
    res = blend_cfg.resolutions
    w = B.parse_resolution_weights("4:1,0,0; 8:1,0,0;16:0,1,0;*:0,0,1", 3, res)
    assert w == {4: [1, 0, 0], 8: [1, 0, 0], 16: [0, 1, 0], 32: [0, 0, 1]}
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"4": [1, 0], "8": [0.5, 0.5], "*": [0, 1]}))
    assert B.parse_resolution_weights(str(f), 2, res) == {4: [1, 0], 8: [0.5, 0.5], 16: [0, 1], 32: [0, 1]}
    for spec, msg in (("4:1,0;8", "invalid weights entry"), ("4:1,x", "must be numbers"), ("4:1,0,0", "3 weights"),
                      ("4:-1,2", ">= 0"), ("4:0,0", "sum to zero"), ("four:1,0", "invalid resolution"),
                      ("4:1,0;4:0,1", "twice")):
        with pytest.raises(ValueError, match=msg):
            B.parse_resolution_weights(spec, 2, res)


def test_architectures_that_differ_are_named(blend_cfg, model_a, make_gen):
    other = make_gen(GeneratorConfig.tiny(resolution=32, w_dim=48, max_channels=64, min_channels=16,
                                                mapping_layers=2), 5)
    with pytest.raises(ValueError, match="architectures differ") as exc:
        B.blend_models(model_a, other, 16, 0)
    msg = str(exc.value)
    assert "w_dim: 32" in msg and "48" in msg and "channels" in msg and "resolution" not in msg
    bigger = make_gen(GeneratorConfig.tiny(resolution=64, w_dim=32, max_channels=32, min_channels=16), 6)
    with pytest.raises(ValueError, match="resolution: 32 .* vs 64"):
        B.interpolate_models(model_a, bigger, 0.5)
    # conv_clamp is not architecture: blended with a warning, the base's value kept.
    import dataclasses
    clamped = make_gen(dataclasses.replace(blend_cfg, conv_clamp=256.0), 7)
    with pytest.warns(RuntimeWarning, match="conv_clamp"):
        G = B.blend_models(model_a, clamped, 8, 0)
    assert G.cfg.conv_clamp is None


def test_bad_switch_points(blend_cfg, model_a, model_b):
    with pytest.raises(ValueError, match="not one of the model's resolutions"):
        B.blend_models(model_a, model_b, 64, 0)
    with pytest.raises(ValueError, match="level"):
        B.blend_models(model_a, model_b, 16, 2)
    with pytest.raises(ValueError, match="blend width"):
        B.blend_models(model_a, model_b, 16, 0, blend_width=0.0)
