"""Which StyleGAN2 layers StyleGAN-NADA trains (Gal et al., "StyleGAN-NADA", SIGGRAPH 2022, Sec. 4.2):
fixed phases and adaptive layer selection, with the correct W+ index -> layer mapping.

W+ latent -> layer in our generator (and in rosinality's / NVlabs', which are the same network):

    latent 0            -> b4.conv1                                  (rosinality conv1)
    latent 1            -> b8.conv0 and b4.torgb                     (convs.0, to_rgb1)
    latent 2k-5 (k>=4)  -> b(2^k).conv0 and b(2^(k-1)).torgb         (convs.2(k-3), to_rgbs.k-4)
    latent 2k-4 (k>=3)  -> b(2^k).conv1                              (convs.2(k-3)+1)
    latent num_ws-1     -> b(R).torgb only                           (the last to_rgbs)

So the conv driven by latent i (i <= num_ws - 2) is CONV_UNITS[i] = [b4.conv1, b8.conv0, b8.conv1, ...].

Where the official code differs: its adaptive selection maps W+ index i to
``[conv1, to_rgb1, convs.0, convs.1, ...][i]``. Index 1 therefore trains ``to_rgb1`` (a to-RGB layer, although
the official comments say to-RGB layers are not optimised) instead of ``convs.0``; every index i >= 2 trains
``convs.{i-2}``, the conv driven by latent i-1 (off by one); and the last latent, which drives only the final
to-RGB layer, trains ``convs.{num_ws-3}``. We train the conv the chosen latent actually drives, and by default
only latents that drive a conv are candidates, so exactly k conv layers train per step. `official_latent_unit`
reproduces the official choice for comparison.

Phases are defined by layers exactly as the official code defines them (the learned constant, ``conv1`` and a
slice of rosinality's ``convs`` list), so they match the official layers one to one:

    all            const, conv1, convs[:]      (the official default, phase None)
    texture        const, conv1, convs[2:10]   (16 .. 128 px at 1024)
    shape          const, conv1, convs[0:2]    (8 px)
    no-fine        const, conv1, convs[0:10]   (8 .. 128 px)
    shape-expanded const, conv1, convs[0:3]    (8 px and the up-conv of 16 px)

The official ``--phase all`` also trains the mapping network and to-RGB layers; here to-RGB layers are an
opt-in (`train_torgb`) and the mapping network never trains, because the result must share the source's
mapping network bit for bit (blending and exported bundles rely on it).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from training.networks.stylegan2 import Generator, GeneratorConfig

PHASES = ("all", "texture", "shape", "no-fine", "shape-expanded")
CONST_UNIT = "synthesis.b4.const"
# phase -> slice of rosinality's convs list (conv1 and the constant are in every phase, as in the official code)
_PHASE_CONVS: dict[str, tuple[int, int | None]] = {
    "all": (0, None), "texture": (2, 10), "shape": (0, 2), "no-fine": (0, 10), "shape-expanded": (0, 3),
}


def conv_units(cfg: GeneratorConfig) -> list[str]:
    """Conv layers in W+ order: conv_units(cfg)[i] is the conv driven by latent i (len = num_ws - 1)."""
    units = ["synthesis.b4.conv1"]
    for k in range(3, cfg.log_size + 1):
        units += [f"synthesis.b{2**k}.conv0", f"synthesis.b{2**k}.conv1"]
    return units


def torgb_units(cfg: GeneratorConfig) -> list[str]:
    """To-RGB layers from 4 px up."""
    return [f"synthesis.b{r}.torgb" for r in cfg.resolutions]


def latent_units(cfg: GeneratorConfig, i: int) -> list[str]:
    """Every layer that W+ latent i drives (conv first, then to-RGB)."""
    if not 0 <= i < cfg.num_ws:
        raise ValueError(f"latent index must be in 0..{cfg.num_ws - 1}, got {i}")
    convs = conv_units(cfg)
    out = [convs[i]] if i < len(convs) else []
    if i % 2 == 1:
        out.append(f"synthesis.b{2 ** ((i + 3) // 2)}.torgb")
    return out


def official_latent_unit(cfg: GeneratorConfig, i: int) -> str:
    """The layer the official StyleGAN-NADA code trains for W+ index i (see the module docstring)."""
    table = ["synthesis.b4.conv1", "synthesis.b4.torgb"] + conv_units(cfg)[1:]
    return table[i]


def phase_units(cfg: GeneratorConfig, phase: str, train_torgb: bool = False) -> list[str]:
    """Trainable units of a phase: the constant, conv layers and (opt-in) every to-RGB layer."""
    if phase not in _PHASE_CONVS:
        raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    lo, hi = _PHASE_CONVS[phase]
    convs = conv_units(cfg)
    units = [CONST_UNIT, convs[0]] + convs[1:][lo:hi]
    if train_torgb:
        units += torgb_units(cfg)
    return units


def latent_candidates(cfg: GeneratorConfig, phase: str = "all", train_torgb: bool = False) -> list[int]:
    """W+ indices adaptive selection may choose: those driving a conv of the phase (or a to-RGB, if trained)."""
    allowed = set(phase_units(cfg, phase, train_torgb))
    return [i for i in range(cfg.num_ws) if any(u in allowed for u in latent_units(cfg, i))]


def units_for_latents(cfg: GeneratorConfig, latents: Sequence[int], phase: str = "all",
                      train_torgb: bool = False) -> list[str]:
    """Layers trained when the given latents are chosen (restricted to the phase / to-RGB option)."""
    allowed = set(phase_units(cfg, phase, train_torgb)) - {CONST_UNIT}
    out: list[str] = []
    for i in latents:
        out += [u for u in latent_units(cfg, i) if u in allowed and u not in out]
    return out


def unit_parameters(G: nn.Module, units: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every unit, in the module's own parameter order (deterministic)."""
    wanted = set(units)
    out = []
    for name, p in G.named_parameters():
        if name in wanted or any(name.startswith(u + ".") for u in wanted):
            out.append((name, p))
    missing = [u for u in units if not any(n == u or n.startswith(u + ".") for n, _ in out)]
    if missing:
        raise ValueError(f"the generator has no layers {missing}")
    return out


def unit_of(name: str, units: Sequence[str]) -> str | None:
    """The unit a parameter name belongs to."""
    for u in units:
        if name == u or name.startswith(u + "."):
            return u
    return None


def select_latents(G: Generator, ws: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], iters: int,
                   k: int, candidates: Sequence[int], noise_mode: str = "random", lr: float = 0.01) -> list[int]:
    """Adaptive layer selection: the k W+ latents that move most when W+ codes chase the global CLIP loss.

    Args:
        G: the trainable generator (its parameters get no gradients here).
        ws: [B, num_ws, w_dim] starting codes (w broadcast to W+).
        objective: images [B, 3, R, R] -> scalar loss (the global CLIP loss).
        iters: SGD steps on the codes (official: 1), lr 0.01 as in the official code.
        k: latents to choose among `candidates`.
    Returns:
        The chosen latent indices, sorted.
    """
    if not 1 <= k <= len(candidates):
        raise ValueError(f"auto_layer_k must be in 1..{len(candidates)}, got {k}")
    ws0 = ws.detach()
    codes = ws0.clone().requires_grad_(True)
    for _ in range(iters):
        loss = objective(G.synthesis(codes, noise_mode=noise_mode))
        (grad,) = torch.autograd.grad(loss, [codes])
        with torch.no_grad():
            codes -= lr * grad
    scores = (codes.detach() - ws0).abs().mean(dim=-1).mean(dim=0).float().cpu()  # [num_ws]
    cand = torch.tensor(list(candidates), dtype=torch.long)
    top = torch.topk(scores[cand], k).indices
    return sorted(cand[top].tolist())


__all__ = ["CONST_UNIT", "PHASES", "conv_units", "latent_candidates", "latent_units", "official_latent_unit",
           "phase_units", "select_latents", "torgb_units", "unit_of", "unit_parameters", "units_for_latents"]
