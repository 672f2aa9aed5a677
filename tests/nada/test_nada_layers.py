"""W+ index -> layer mapping, phases (against the official layer lists) and the official mapping's offset."""

from __future__ import annotations

import re

import pytest
import torch

from training.checkpoints import rosinality_key_map
from training.networks import Generator, GeneratorConfig
from training.nada.layers import (CONST_UNIT, PHASES, conv_units, latent_candidates, latent_units,
                                  official_latent_unit, phase_units, unit_parameters, units_for_latents)

CFG_1024 = GeneratorConfig()  # config-f, 18 latents (only the config: nothing is built)


def test_latent_to_layer_table_at_1024():
    assert CFG_1024.num_ws == 18
    assert latent_units(CFG_1024, 0) == ["synthesis.b4.conv1"]
    assert latent_units(CFG_1024, 1) == ["synthesis.b8.conv0", "synthesis.b4.torgb"]
    assert latent_units(CFG_1024, 2) == ["synthesis.b8.conv1"]
    assert latent_units(CFG_1024, 3) == ["synthesis.b16.conv0", "synthesis.b8.torgb"]
    assert latent_units(CFG_1024, 16) == ["synthesis.b1024.conv1"]
    assert latent_units(CFG_1024, 17) == ["synthesis.b1024.torgb"]
    for k in range(3, 11):  # the rule of the brief: conv0 <- 2k-5, conv1 <- 2k-4, torgb <- 2k-3
        r = 2**k
        assert f"synthesis.b{r}.conv0" in latent_units(CFG_1024, 2 * k - 5)
        assert f"synthesis.b{r}.conv1" in latent_units(CFG_1024, 2 * k - 4)
        assert f"synthesis.b{r}.torgb" in latent_units(CFG_1024, 2 * k - 3)


def test_mapping_matches_what_the_network_reads(tiny_G):
    """Feed latent i = the constant i and record which latent every layer's affine actually receives."""
    G, cfg = tiny_G, tiny_G.cfg
    seen: dict[str, int] = {}
    hooks = []
    for name, mod in G.synthesis.named_modules():
        if name.endswith(("conv0", "conv1", "torgb")):
            def hook(module, args, name=name):
                seen[f"synthesis.{name}"] = int(round(float(args[1][0, 0])))
            hooks.append(mod.register_forward_pre_hook(hook))
    ws = torch.arange(cfg.num_ws, dtype=torch.float32).reshape(1, -1, 1).repeat(1, 1, cfg.w_dim)
    with torch.no_grad():
        G.synthesis(ws)
    for h in hooks:
        h.remove()
    expected = {u: i for i in range(cfg.num_ws) for u in latent_units(cfg, i)}
    assert seen == expected


def test_official_mapping_is_offset_by_one():
    """Official: W+ index i -> [conv1, to_rgb1, convs.0, ...][i]; index 1 trains a to-RGB layer, i >= 2 the
    conv of latent i - 1, and the last index (to-RGB only) trains the last conv."""
    assert official_latent_unit(CFG_1024, 0) == "synthesis.b4.conv1" == latent_units(CFG_1024, 0)[0]
    assert official_latent_unit(CFG_1024, 1) == "synthesis.b4.torgb"
    for i in range(2, 18):
        assert official_latent_unit(CFG_1024, i) == latent_units(CFG_1024, i - 1)[0]
    assert official_latent_unit(CFG_1024, 17) == "synthesis.b1024.conv1"


def _rosinality_names(units: list[str]) -> set[str]:
    """Our units -> rosinality module names (input, conv1, convs.N, ...) via the converter's key map."""
    out = set()
    for ours, (theirs, _) in rosinality_key_map(CFG_1024).items():
        if any(ours == u or ours.startswith(u + ".") for u in units) and not theirs.startswith("noises."):
            out.add(re.match(r"(input|conv1|to_rgb1|convs\.\d+|to_rgbs\.\d+|style\.\d+)", theirs).group(1))
    return out


@pytest.mark.parametrize("phase, convs", [
    ("all", range(0, 16)), ("texture", range(2, 10)), ("shape", range(0, 2)), ("no-fine", range(0, 10)),
    ("shape-expanded", range(0, 3)),
])
def test_phases_are_the_official_layer_lists(phase, convs):
    """Official phases: the learned constant + conv1 + a slice of rosinality's convs list."""
    names = _rosinality_names(phase_units(CFG_1024, phase))
    assert names == {"input", "conv1"} | {f"convs.{j}" for j in convs}
    assert not any(n.startswith(("to_rgb", "style")) for n in names)


def test_torgb_opt_in_and_candidates():
    units = phase_units(CFG_1024, "all", train_torgb=True)
    assert {u for u in units if u.endswith("torgb")} == {f"synthesis.b{r}.torgb" for r in CFG_1024.resolutions}
    # Without to-RGB training the last latent drives nothing trainable: 17 candidates, one conv each.
    cands = latent_candidates(CFG_1024, "all")
    assert cands == list(range(17))
    assert all(len(units_for_latents(CFG_1024, [i])) == 1 for i in cands)
    assert latent_candidates(CFG_1024, "all", train_torgb=True) == list(range(18))
    assert latent_candidates(CFG_1024, "texture") == [0] + list(range(3, 11))
    assert CONST_UNIT not in units_for_latents(CFG_1024, cands)
    assert set(PHASES) == {"all", "texture", "shape", "no-fine", "shape-expanded"}
    with pytest.raises(ValueError, match="unknown phase"):
        phase_units(CFG_1024, "fine")


def test_unit_parameters_cover_layers_but_never_mapping(tiny_G):
    units = phase_units(tiny_G.cfg, "all")
    names = [n for n, _ in unit_parameters(tiny_G, units)]
    assert "synthesis.b4.const" in names and "synthesis.b8.conv0.affine.weight" in names
    assert not any(n.startswith("mapping") or ".torgb." in n for n in names)
    assert len(conv_units(tiny_G.cfg)) == tiny_G.num_ws - 1
    g = Generator(GeneratorConfig.tiny(resolution=16))
    with pytest.raises(ValueError, match="no layers"):
        unit_parameters(g, ["synthesis.b64.conv0"])
