"""Checkpoint formats: stylecast's native directory (config.json + safetensors) and converters for rosinality
`.pt` (also written by StyleGAN-NADA and toonify ports) and NVlabs stylegan2-ada-pytorch `.pkl` files.

Every converter is a table of key patterns that raises on any key it does not recognise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.files import atomic_directory, atomic_write_bytes, sha256_file
from training.networks.stylegan2 import (Discriminator, DiscriminatorConfig, Generator, GeneratorConfig,
                                         seeds_to_z)

from .safe_pickle import PersistentObject, UnsafePickleError, restricted_load

GENERATOR_FORMAT = "stylecast.generator/v1"
MAX_CHECKPOINT_BYTES = 8 << 30  # refuse absurd files before reading them


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: wrong format, unknown keys, corrupt or hostile content."""


@dataclass
class Checkpoint:
    """A loaded generator checkpoint (eval-mode modules on CPU unless moved)."""

    G: Generator
    format: str  # "native" | "rosinality" | "nvlabs"
    path: Path
    sha256: str
    D: Discriminator | None = None
    G_train: Generator | None = None  # the non-EMA generator of a training checkpoint
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. optimizer states of a training checkpoint

    @property
    def config(self) -> GeneratorConfig:
        return self.G.cfg


# ----------------------------------------------------------------------------------------------------------
# Format detection and the public entry points


def detect_format(path: str | os.PathLike) -> str:
    """'native' for a directory with config.json, 'rosinality' for a torch zip/legacy .pt, 'nvlabs' for a .pkl."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "native"
        raise CheckpointError(f"{p} is a directory without config.json (not a stylecast checkpoint)")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p} is empty")
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{p} is {size / 2**30:.1f} GiB, larger than any StyleGAN2 checkpoint")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "rosinality"  # torch's zip serialization
    if head[:1] == b"\x80":
        # A raw pickle: torch's legacy format starts with a pickled magic number (a long), NVlabs with a dict.
        return "rosinality" if p.suffix in (".pt", ".pth") else "nvlabs"
    raise CheckpointError(f"{p}: unrecognised file format (expected a native checkpoint directory, a "
                          "rosinality .pt or an NVlabs .pkl)")


def load_checkpoint(path: str | os.PathLike, with_discriminator: bool = False,
                    with_train_generator: bool = False) -> Checkpoint:
    """Load any supported generator checkpoint.

    Args:
        path: native directory, rosinality `.pt` or NVlabs `.pkl`.
        with_discriminator: also build D when the checkpoint has one.
        with_train_generator: also build the non-EMA generator when present.
    Returns:
        Checkpoint with G in eval mode.
    Raises:
        FileNotFoundError, CheckpointError (a ValueError) with a one-line message.
    """
    fmt = detect_format(path)
    loader = {"native": _load_native, "rosinality": _load_rosinality, "nvlabs": _load_nvlabs}[fmt]
    ckpt = loader(Path(path), with_discriminator, with_train_generator)
    ckpt.G.eval().requires_grad_(False)
    return ckpt


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """Shortcut: the (EMA) generator of any supported checkpoint, eval mode, on device."""
    return load_checkpoint(path).G.to(device)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, or of a native directory's config.json + safetensors (sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix == ".safetensors"):
            h.update(f.name.encode())
            h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def _build(cfg: GeneratorConfig, sd: dict[str, torch.Tensor], what: str) -> Generator:
    G = Generator(cfg)
    _load_exact(G, sd, what)
    return G


def _load_exact(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{what}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        if not torch.is_floating_point(v) or not torch.isfinite(v).all():
            raise CheckpointError(f"{what}: {k} holds non-finite or non-float values")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


# ----------------------------------------------------------------------------------------------------------
# Native format


def save_native(path: str | os.PathLike, G: Generator, D: Discriminator | None = None,
                G_train: Generator | None = None, meta: dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """Write a native checkpoint directory atomically: config.json + generator(.train/.disc).safetensors."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        doc: dict[str, Any] = {"format": GENERATOR_FORMAT, "config": G.cfg.to_dict(), "meta": meta or {}}
        _save_tensors(G, tmp / "generator.safetensors")
        if G_train is not None:
            _save_tensors(G_train, tmp / "generator_train.safetensors")
        if D is not None:
            doc["discriminator"] = D.cfg.to_dict()
            _save_tensors(D, tmp / "discriminator.safetensors")
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _save_tensors(module: torch.nn.Module, path: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None


def read_native_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate a native checkpoint's config.json."""
    path = Path(path)
    try:
        doc = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "format" not in doc:
        raise CheckpointError(f"{path / 'config.json'}: missing 'format'")
    return doc


def _load_native(path: Path, with_d: bool, with_train: bool) -> Checkpoint:
    doc = read_native_config(path)
    if doc["format"] != GENERATOR_FORMAT:
        raise CheckpointError(f"{path}: format {doc['format']!r} is not a generator checkpoint "
                              f"(expected {GENERATOR_FORMAT!r})")
    try:
        cfg = GeneratorConfig.from_dict(doc["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid generator config ({exc})") from None
    G = _build(cfg, _read_safetensors(path / "generator.safetensors"), str(path))
    ckpt = Checkpoint(G=G, format="native", path=path, sha256=checkpoint_sha256(path), meta=doc.get("meta", {}))
    if with_train and (path / "generator_train.safetensors").is_file():
        ckpt.G_train = _build(cfg, _read_safetensors(path / "generator_train.safetensors"), str(path))
    if with_d and "discriminator" in doc:
        D = Discriminator(DiscriminatorConfig.from_dict(doc["discriminator"]))
        _load_exact(D, _read_safetensors(path / "discriminator.safetensors"), f"{path} (discriminator)")
        ckpt.D = D
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# rosinality .pt


def rosinality_key_map(cfg: GeneratorConfig) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Our generator key -> (rosinality g_ema key, rosinality shape or None when the shape is the same)."""
    m: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for i in range(cfg.mapping_layers):
        m[f"mapping.fc{i}.weight"] = (f"style.{i + 1}.weight", None)
        m[f"mapping.fc{i}.bias"] = (f"style.{i + 1}.bias", None)
    c4 = cfg.channels_at(4)
    m["synthesis.b4.const"] = ("input.input", (1, c4, 4, 4))

    def layer(ours: str, theirs: str, in_ch: int, out_ch: int, res: int, noise_idx: int, up: bool) -> None:
        m[f"{ours}.weight"] = (f"{theirs}.conv.weight", (1, out_ch, in_ch, 3, 3))
        m[f"{ours}.affine.weight"] = (f"{theirs}.conv.modulation.weight", None)
        m[f"{ours}.affine.bias"] = (f"{theirs}.conv.modulation.bias", None)
        m[f"{ours}.noise_strength"] = (f"{theirs}.noise.weight", (1,))
        m[f"{ours}.bias"] = (f"{theirs}.activate.bias", None)
        m[f"{ours}.noise_const"] = (f"noises.noise_{noise_idx}", (1, 1, res, res))
        if up:
            # rosinality stores the blur kernel pre-multiplied by factor**2 = 4.
            m[f"{ours}.resample_filter"] = (f"{theirs}.conv.blur.kernel", None)

    def torgb(ours: str, theirs: str, in_ch: int, skip: bool) -> None:
        m[f"{ours}.weight"] = (f"{theirs}.conv.weight", (1, cfg.img_channels, in_ch, 1, 1))
        m[f"{ours}.affine.weight"] = (f"{theirs}.conv.modulation.weight", None)
        m[f"{ours}.affine.bias"] = (f"{theirs}.conv.modulation.bias", None)
        m[f"{ours}.bias"] = (f"{theirs}.bias", (1, cfg.img_channels, 1, 1))
        if skip:
            m[f"{ours}.resample_filter"] = (f"{theirs}.upsample.kernel", None)

    layer("synthesis.b4.conv1", "conv1", c4, c4, 4, 0, False)
    torgb("synthesis.b4.torgb", "to_rgb1", c4, False)
    for k in range(3, cfg.log_size + 1):
        res, j = 2**k, k - 3
        cin, cout = cfg.channels_at(res // 2), cfg.channels_at(res)
        layer(f"synthesis.b{res}.conv0", f"convs.{2 * j}", cin, cout, res, 2 * j + 1, True)
        layer(f"synthesis.b{res}.conv1", f"convs.{2 * j + 1}", cout, cout, res, 2 * j + 2, False)
        torgb(f"synthesis.b{res}.torgb", f"to_rgbs.{j}", cout, True)
    return m


_FILTER_KEYS = ("resample_filter",)


def generator_to_rosinality(G: Generator) -> dict[str, torch.Tensor]:
    """Our generator's state -> a rosinality `g_ema` state dict (keys and shapes of REFERENCE.md)."""
    sd = G.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, shape) in rosinality_key_map(G.cfg).items():
        t = sd[ours].detach().cpu().clone()
        if ours.endswith(_FILTER_KEYS):
            t = t * 4
        out[theirs] = t.reshape(shape) if shape is not None else t
    return out


def generator_from_rosinality(g_ema: dict[str, torch.Tensor], latent_avg: torch.Tensor | None,
                              what: str = "checkpoint", lr_mul: float = 0.01) -> Generator:
    """Build our Generator from a rosinality `g_ema` state dict, inferring the config from shapes."""
    cfg = infer_rosinality_config(g_ema, what, lr_mul)
    mapping = rosinality_key_map(cfg)
    expected = {theirs for theirs, _ in mapping.values()}
    unknown = sorted(set(g_ema) - expected)
    missing = sorted(expected - set(g_ema))
    if unknown:
        raise CheckpointError(f"{what}: unrecognised g_ema keys {unknown[:5]}"
                              f"{f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else ''}")
    if missing:
        raise CheckpointError(f"{what}: g_ema lacks keys {missing[:5]}"
                              f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
    G = Generator(cfg)
    own = G.state_dict()
    sd: dict[str, torch.Tensor] = {}
    for ours, (theirs, shape) in mapping.items():
        t = g_ema[theirs]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{what}: {theirs} is not a tensor")
        if shape is not None and tuple(t.shape) != shape:
            raise CheckpointError(f"{what}: {theirs} has shape {tuple(t.shape)}, expected {shape}")
        t = t.reshape(own[ours].shape) if t.numel() == own[ours].numel() else t
        if ours.endswith(_FILTER_KEYS):
            t = t / 4
            if not torch.equal(t.float(), own[ours]):
                raise CheckpointError(f"{what}: {theirs} is not the [1,3,3,1] blur kernel this converter supports")
        sd[ours] = t.float()
    if latent_avg is None:
        sd["mapping.w_avg"] = estimate_w_avg(G, sd)
    else:
        if tuple(latent_avg.shape) not in ((cfg.w_dim,), (1, cfg.w_dim)):
            raise CheckpointError(f"{what}: latent_avg has shape {tuple(latent_avg.shape)}, expected [{cfg.w_dim}]")
        sd["mapping.w_avg"] = latent_avg.reshape(cfg.w_dim).float()
    _load_exact(G, sd, what)
    return G


def estimate_w_avg(G: Generator, sd: dict[str, torch.Tensor], n: int = 10_000) -> torch.Tensor:
    """Mean w over a fixed set of seeds (for checkpoints without latent_avg, e.g. StyleGAN-NADA outputs).

    Deterministic: the same mapping network always gives the same bits, so adapted models of one base agree.
    """
    mapping_sd = {k[len("mapping."):]: v for k, v in sd.items() if k.startswith("mapping.fc")}
    m = G.mapping
    with torch.no_grad():
        for k, v in mapping_sd.items():
            m.get_parameter(k).copy_(v)
        z = torch.from_numpy(__import__("numpy").random.RandomState(0).randn(n, G.z_dim).astype("float32"))
        return m(z).double().mean(dim=0).float()


def infer_rosinality_config(g_ema: dict[str, Any], what: str, lr_mul: float = 0.01) -> GeneratorConfig:
    """Infer size, style_dim, n_mlp and the channel table from a rosinality g_ema state dict."""
    if not isinstance(g_ema, dict) or "input.input" not in g_ema or "style.1.weight" not in g_ema:
        if isinstance(g_ema, dict) and any(k.startswith("generator.") for k in g_ema):
            raise CheckpointError(f"{what}: this is a DualStyleGAN generator; load it with the DualStyleGAN loader")
        raise CheckpointError(f"{what}: not a rosinality StyleGAN2 g_ema state dict")
    n_mlp = 0
    while f"style.{n_mlp + 1}.weight" in g_ema:
        n_mlp += 1
    n_rgbs = 0
    while f"to_rgbs.{n_rgbs}.conv.weight" in g_ema:
        n_rgbs += 1
    log_size = n_rgbs + 2
    w_dim, z_dim = g_ema["style.1.weight"].shape[0], g_ema["style.1.weight"].shape[1]
    channels = [int(g_ema["input.input"].shape[1])]
    for j in range(n_rgbs):
        w = g_ema.get(f"convs.{2 * j}.conv.weight")
        if w is None:
            raise CheckpointError(f"{what}: missing convs.{2 * j}.conv.weight")
        channels.append(int(w.shape[1]))
    img_channels = int(g_ema["to_rgb1.conv.weight"].shape[1])
    return GeneratorConfig(resolution=2**log_size, z_dim=int(z_dim), w_dim=int(w_dim), mapping_layers=n_mlp,
                           mapping_lr_mul=lr_mul, channels=tuple(channels), img_channels=img_channels)


def discriminator_key_map(cfg: DiscriminatorConfig) -> dict[str, str]:
    """Our discriminator key -> rosinality `d` key."""
    m = {"fromrgb.weight": "convs.0.0.weight", "fromrgb.bias": "convs.0.1.bias"}
    res_list = [2**k for k in range(int(cfg.resolution).bit_length() - 1, 2, -1)]
    for i, res in enumerate(res_list, start=1):
        b = f"b{res}"
        m[f"{b}.conv0.weight"] = f"convs.{i}.conv1.0.weight"
        m[f"{b}.conv0.bias"] = f"convs.{i}.conv1.1.bias"
        m[f"{b}.conv1.resample_filter"] = f"convs.{i}.conv2.0.kernel"
        m[f"{b}.conv1.weight"] = f"convs.{i}.conv2.1.weight"
        m[f"{b}.conv1.bias"] = f"convs.{i}.conv2.2.bias"
        m[f"{b}.skip.resample_filter"] = f"convs.{i}.skip.0.kernel"
        m[f"{b}.skip.weight"] = f"convs.{i}.skip.1.weight"
    m.update({"conv.weight": "final_conv.0.weight", "conv.bias": "final_conv.1.bias",
              "fc.weight": "final_linear.0.weight", "fc.bias": "final_linear.0.bias",
              "out.weight": "final_linear.1.weight", "out.bias": "final_linear.1.bias"})
    return m


def discriminator_from_rosinality(d: dict[str, torch.Tensor], gcfg: GeneratorConfig, what: str) -> Discriminator:
    if "convs.0.0.weight" not in d:
        raise CheckpointError(f"{what}: 'd' is not a rosinality discriminator state dict")
    top = int(d["convs.0.0.weight"].shape[0])
    channels = list(gcfg.channels)
    channels[-1] = top
    cfg = DiscriminatorConfig(resolution=gcfg.resolution, channels=tuple(channels), img_channels=gcfg.img_channels)
    mapping = discriminator_key_map(cfg)
    unknown = sorted(set(d) - set(mapping.values()))
    if unknown:
        raise CheckpointError(f"{what}: unrecognised discriminator keys {unknown[:5]}")
    D = Discriminator(cfg)
    sd = {ours: d[theirs].float() for ours, theirs in mapping.items() if theirs in d}
    _load_exact(D, sd, f"{what} (discriminator)")
    return D


def discriminator_to_rosinality(D: Discriminator) -> dict[str, torch.Tensor]:
    sd = D.state_dict()
    return {theirs: sd[ours].detach().cpu().clone() for ours, theirs in discriminator_key_map(D.cfg).items()}


def _torch_load_safe(path: Path) -> Any:
    try:
        # rosinality training checkpoints carry `args` (an argparse.Namespace): plain data, allow-listed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle_errors() + (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: refused to load (it contains objects other than tensors and plain "
                                  f"data, which could execute code): {msg}") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({msg})") from None


def pickle_errors() -> tuple[type[BaseException], ...]:
    import pickle
    return (pickle.UnpicklingError,)


def _load_rosinality(path: Path, with_d: bool, with_train: bool) -> Checkpoint:
    obj = _torch_load_safe(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict with 'g_ema', got {type(obj).__name__}")
    if "g_ema" not in obj:
        if "state_dict" in obj and any(str(k).startswith("encoder.") for k in obj["state_dict"]):
            raise CheckpointError(f"{path}: this is a pSp/e4e encoder checkpoint, not a generator")
        if "style.1.weight" in obj:
            obj = {"g_ema": obj}  # a bare g_ema state dict
        else:
            raise CheckpointError(f"{path}: no 'g_ema' entry (keys: {sorted(map(str, obj))[:6]})")
    latent_avg = obj.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"{path}: latent_avg is not a tensor")
    G = generator_from_rosinality(obj["g_ema"], latent_avg, str(path))
    ckpt = Checkpoint(G=G, format="rosinality", path=path, sha256=sha256_file(path),
                      meta={"latent_avg": "stored" if latent_avg is not None else "estimated"})
    if with_train and isinstance(obj.get("g"), dict):
        ckpt.G_train = generator_from_rosinality(obj["g"], latent_avg if latent_avg is not None else G.w_avg,
                                                 f"{path} (g)")
    if with_d and isinstance(obj.get("d"), dict):
        ckpt.D = discriminator_from_rosinality(obj["d"], G.cfg, str(path))
    for k in ("g_optim", "d_optim", "args"):
        if k in obj:
            ckpt.extra[k] = obj[k]
    return ckpt


def save_rosinality(path: str | os.PathLike, G: Generator, D: Discriminator | None = None,
                    G_train: Generator | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a rosinality-layout `.pt` ({'g_ema', 'latent_avg'[, 'g', 'd']}) atomically."""
    obj: dict[str, Any] = {"g_ema": generator_to_rosinality(G), "latent_avg": G.w_avg.detach().cpu().clone()}
    if G_train is not None:
        obj["g"] = generator_to_rosinality(G_train)
    if D is not None:
        obj["d"] = discriminator_to_rosinality(D)
    obj.update(extra or {})
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# NVlabs stylegan2-ada-pytorch .pkl


def _load_nvlabs(path: Path, with_d: bool, with_train: bool) -> Checkpoint:
    try:
        data = restricted_load(path.read_bytes())
    except UnsafePickleError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or "G_ema" not in data:
        raise CheckpointError(f"{path}: not a stylegan2-ada-pytorch network pickle (no 'G_ema')")
    G = generator_from_nvlabs(data["G_ema"], str(path))
    ckpt = Checkpoint(G=G, format="nvlabs", path=path, sha256=sha256_file(path))
    if with_train and isinstance(data.get("G"), PersistentObject):
        ckpt.G_train = generator_from_nvlabs(data["G"], f"{path} (G)")
    return ckpt


def _attr(obj: PersistentObject, name: str, default: Any = None) -> Any:
    return obj.state.get(name, default)


def generator_from_nvlabs(g: Any, what: str) -> Generator:
    """Convert an NVlabs `Generator` persistent object into our Generator (renaming and reshaping only)."""
    try:
        return _generator_from_nvlabs(g, what)
    except CheckpointError:
        raise
    except (KeyError, AttributeError, TypeError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{what}: malformed stylegan2-ada-pytorch generator "
                              f"({type(exc).__name__}: {exc})") from None


def _generator_from_nvlabs(g: Any, what: str) -> Generator:
    if not isinstance(g, PersistentObject):
        raise CheckpointError(f"{what}: G_ema is not a network object")
    synthesis, mapping = g.module("synthesis"), g.module("mapping")
    if synthesis is None or mapping is None:
        raise CheckpointError(f"{what}: G_ema has no mapping/synthesis networks")
    if "input" in synthesis.children() or any(n.startswith("L") and "_" in n for n in synthesis.children()):
        raise CheckpointError(f"{what}: this is a StyleGAN3 pickle; only StyleGAN2 (ADA) generators are supported")
    if int(_attr(g, "c_dim", 0) or 0) > 0 or mapping.module("embed") is not None:
        raise CheckpointError(f"{what}: conditional generators (c_dim > 0) are not supported")
    res = int(_attr(synthesis, "img_resolution", 0) or 0)
    block_names = [n for n in synthesis.children() if n.startswith("b") and n[1:].isdigit()]
    if not res:
        res = max(int(n[1:]) for n in block_names)
    for name in block_names:
        arch = _attr(synthesis.module(name), "architecture", "skip")
        if arch != "skip":
            raise CheckpointError(f"{what}: synthesis architecture {arch!r} is not supported (only 'skip', "
                                  "the StyleGAN2 config-f generator)")
    sd = g.tensors()
    fc_names = sorted((n for n in mapping.children() if n.startswith("fc")), key=lambda n: int(n[2:]))
    n_mlp = len(fc_names)
    lr_mul = float(_attr(mapping.module("fc0"), "lr_multiplier", 0.01))
    w_dim = int(_attr(g, "w_dim", sd["mapping.fc0.weight"].shape[0]))
    z_dim = int(_attr(g, "z_dim", sd["mapping.fc0.weight"].shape[1]))
    log_size = res.bit_length() - 1
    channels = [int(sd["synthesis.b4.const"].shape[0])]
    for k in range(3, log_size + 1):
        channels.append(int(sd[f"synthesis.b{2**k}.conv0.weight"].shape[0]))
    clamp = _attr(synthesis.module("b4").module("conv1"), "conv_clamp", None)
    img_channels = int(sd["synthesis.b4.torgb.weight"].shape[0])
    cfg = GeneratorConfig(resolution=res, z_dim=z_dim, w_dim=w_dim, mapping_layers=n_mlp, mapping_lr_mul=lr_mul,
                          channels=tuple(channels), img_channels=img_channels,
                          conv_clamp=float(clamp) if clamp is not None else None,
                          w_avg_beta=float(_attr(mapping, "w_avg_beta", 0.995) or 0.995))
    G = Generator(cfg)
    own = G.state_dict()
    out: dict[str, torch.Tensor] = {}
    ref_filter = own[next(k for k in own if k.endswith("resample_filter"))] if res > 4 else None
    for k, v in sd.items():
        if k.endswith("resample_filter"):
            # NVlabs keeps a filter buffer in every block and layer; ours are rebuilt from the blur kernel.
            f = v.float() / v.float().sum()
            if ref_filter is not None and not torch.allclose(f, ref_filter):
                raise CheckpointError(f"{what}: {k} is not the [1,3,3,1] resample filter")
            continue
        if k not in own:
            raise CheckpointError(f"{what}: unrecognised tensor {k!r} in G_ema")
        if own[k].numel() != v.numel():
            raise CheckpointError(f"{what}: {k} has {v.numel()} elements, expected {own[k].numel()}")
        out[k] = v.float().reshape(own[k].shape)
    # Filters live per layer in our network; w_avg is a mapping buffer in both.
    for k in own:
        if k.endswith("resample_filter") and k not in out:
            out[k] = own[k]
    _load_exact(G, out, what)
    return G


__all__ = [
    "Checkpoint", "CheckpointError", "GENERATOR_FORMAT", "UnsafePickleError", "checkpoint_sha256",
    "detect_format", "discriminator_from_rosinality", "discriminator_to_rosinality", "estimate_w_avg",
    "generator_from_nvlabs", "generator_from_rosinality", "generator_to_rosinality", "infer_rosinality_config",
    "load_checkpoint", "load_generator", "read_native_config", "rosinality_key_map", "save_native",
    "save_rosinality", "seeds_to_z",
]
