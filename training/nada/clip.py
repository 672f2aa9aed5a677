"""Frozen CLIP encoders (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", 2021) loaded through open_clip and shared by every StyleGAN-NADA loss.

A model is named by a spec string ``MODEL[:PRETRAINED][=WEIGHT]``:

- ``ViT-B-32:openai=1.0``: an open_clip architecture and one of its pretrained tags (``ViT-B/32`` also works);
- ``ViT-B-32-quickgelu:/path/to/open_clip_pytorch_model.bin``: a local weights file (open_clip state dict,
  safetensors, or the TorchScript ``ViT-B-32.pt`` of OpenAI's ``clip`` package);
- ``hf-hub:org/repo`` or ``local-dir:/path/to/dir``: open_clip's own schemas;
- ``ViT-B-32``: the ``openai`` tag when the architecture has one.

``PRETRAINED = random`` builds randomly initialised weights (seeded, so identical in every process). It exists
only for tests and timing; ``stylecast-tiny-clip:random`` is a tiny architecture built in code for tests.

Weights are never downloaded silently when offline: with ``HF_HUB_OFFLINE=1`` (or without network) a missing
download is a one-line ``ValueError`` naming the model and how to supply the weights.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

RANDOM_TAG = "random"
TINY_TEST_MODEL = "stylecast-tiny-clip"
# A ~3.4 M parameter CLIP for tests: 32 px ViT (patch 8, width 64, 2 layers) and a 2-layer text transformer.
TINY_TEST_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_SCHEMAS = ("hf-hub:", "local-dir:")
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ClipSpec:
    """One CLIP model and its loss weight. `pretrained` is a tag, a file path, "random" or None (schemas)."""

    model: str
    pretrained: str | None
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "ClipSpec":
        """Parse ``MODEL[:PRETRAINED][=WEIGHT]`` (see the module docstring).

        Raises:
            ValueError: empty spec, bad weight, unknown default tag.
        """
        s = str(text).strip()
        if not s:
            raise ValueError("empty CLIP spec: use e.g. ViT-B-32:openai=1.0")
        weight = 1.0
        if "=" in s:
            head, tail = s.rsplit("=", 1)
            try:
                weight = float(tail)
            except ValueError:
                head = s  # an '=' inside a path, not a weight
            else:
                s = head
                if not math.isfinite(weight) or weight <= 0:
                    raise ValueError(f"CLIP weight must be a positive number, got {tail!r} in {text!r}")
        if s.startswith(_SCHEMAS):
            return cls(model=s, pretrained=None, weight=weight)
        model, _, pretrained = s.partition(":")
        model = model.strip().replace("/", "-")
        if not model:
            raise ValueError(f"CLIP spec {text!r} has no model name: use e.g. ViT-B-32:openai")
        pretrained = pretrained.strip() or None
        if pretrained is None:
            pretrained = _default_tag(model)
        return cls(model=model, pretrained=pretrained, weight=weight)

    @property
    def key(self) -> tuple[str, str | None]:
        return self.model, self.pretrained

    def __str__(self) -> str:
        base = self.model if self.pretrained is None else f"{self.model}:{self.pretrained}"
        return f"{base}={self.weight:g}"


def _default_tag(model: str) -> str:
    if model == TINY_TEST_MODEL:
        return RANDOM_TAG
    import open_clip
    tags = open_clip.list_pretrained_tags_by_model(model)
    if "openai" in tags:
        return "openai"
    if tags:
        raise ValueError(f"CLIP {model} has no 'openai' weights; name a tag, e.g. {model}:{tags[0]} "
                         f"(available: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}) or a file")
    raise ValueError(f"CLIP {model}: no pretrained weights known; pass {model}:/path/to/weights.bin")


def parse_clip_specs(specs: Sequence[str | ClipSpec]) -> tuple[ClipSpec, ...]:
    """Parse specs; the same model+weights named twice becomes one entry with the summed weight."""
    out: dict[tuple[str, str | None], ClipSpec] = {}
    for item in specs:
        spec = item if isinstance(item, ClipSpec) else ClipSpec.parse(item)
        if spec.key in out:
            spec = ClipSpec(spec.model, spec.pretrained, out[spec.key].weight + spec.weight)
        out[spec.key] = spec
    if not out:
        raise ValueError("at least one CLIP model is needed (e.g. --clip ViT-B-32:openai)")
    return tuple(out.values())


# ----------------------------------------------------------------------------------------------------------
# Finding weights without surprises


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them (checked at call time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants
        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return False


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def _cached_weights(pcfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """Path of already-downloaded weights for an open_clip pretrained config, or None."""
    hf = pcfg.get("hf_hub", "")
    if hf:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(hf)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                try:
                    found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                except Exception:  # malformed cache entries: treat as not cached
                    found = None
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = pcfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _download_host(pcfg: dict[str, Any]) -> str | None:
    """The host open_clip would download these weights from (HF hub preferred, as open_clip does)."""
    from urllib.parse import urlparse
    if pcfg.get("hf_hub"):
        try:
            from huggingface_hub import constants
            return urlparse(constants.ENDPOINT).hostname
        except ImportError:
            pass
    return urlparse(pcfg["url"]).hostname if pcfg.get("url") else None


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    import socket
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _missing_weights(model: str, tag: str, pcfg: dict[str, Any], cache_dir: str | None, reason: str) -> ValueError:
    file_model = f"{model}-quickgelu" if pcfg.get("quick_gelu") and "quickgelu" not in model else model
    where = _hf_cache_dir(cache_dir) if pcfg.get("hf_hub") else (cache_dir or "~/.cache/clip")
    return ValueError(
        f"could not load CLIP weights for {model} (pretrained '{tag}'): {reason}; download them on a machine "
        f"with internet (open_clip caches them under {where}; copy that folder here or pass --clip-cache-dir) "
        f"or pass {file_model}:/path/to/open_clip_pytorch_model.bin")


def _resolve_weights(model: str, tag: str, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """A local weights file for (model, tag): the tag's cached download, a download, or the path itself."""
    import open_clip
    if os.path.isfile(tag):
        return tag, {}
    pcfg = open_clip.get_pretrained_cfg(model, tag) or {}
    if not pcfg:
        if os.sep in tag or tag.endswith(_WEIGHT_SUFFIXES):
            raise FileNotFoundError(f"CLIP weights file not found: {tag} (for {model})")
        tags = open_clip.list_pretrained_tags_by_model(model)
        listed = f" (available: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''})" if tags else ""
        raise ValueError(f"unknown pretrained tag {tag!r} for CLIP {model}{listed}; "
                         f"or pass {model}:/path/to/weights.bin")
    cached = _cached_weights(pcfg, cache_dir)
    if cached:
        return cached, pcfg
    if _offline():
        raise _missing_weights(model, tag, pcfg, cache_dir, "offline (HF_HUB_OFFLINE=1) and not cached")
    host = _download_host(pcfg)
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if host and not proxied and not _reachable(host):
        # huggingface_hub would retry for about a minute before failing; say it at once.
        raise _missing_weights(model, tag, pcfg, cache_dir, f"offline ({host} unreachable) and not cached")
    try:
        path = open_clip.download_pretrained(pcfg, cache_dir=cache_dir)
    except Exception as exc:  # network errors come in many types (OSError, HTTPError, hub errors, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise _missing_weights(model, tag, pcfg, cache_dir, f"offline or not cached ({reason})") from None
    if not path or not os.path.isfile(path):
        raise _missing_weights(model, tag, pcfg, cache_dir, "offline or not cached")
    return path, pcfg


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist()[:200])


# ----------------------------------------------------------------------------------------------------------
# Building models


def _seeded_build(fn, seed: int = 0):
    """Run fn with the global RNG seeded and restored afterwards (random CLIP weights are reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _build(spec: ClipSpec, cache_dir: str | None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, preprocess cfg) for a spec, on CPU in fp32."""
    import open_clip
    name, tag = spec.model, spec.pretrained
    if name == TINY_TEST_MODEL:
        if tag != RANDOM_TAG:
            raise ValueError(f"{TINY_TEST_MODEL} is a test architecture with random weights only "
                             f"(use {TINY_TEST_MODEL}:random)")
        from open_clip.model import CLIP
        from open_clip.tokenizer import SimpleTokenizer
        cfg = TINY_TEST_CONFIG
        model = _seeded_build(lambda: CLIP(embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]),
                                           text_cfg=dict(cfg["text_cfg"])))
        pp = {"size": cfg["vision_cfg"]["image_size"], "mean": OPENAI_MEAN, "std": OPENAI_STD,
              "interpolation": "bicubic", "resize_mode": "shortest"}
        open_clip.set_model_preprocess_cfg(model, pp)
        return model, SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"]), pp

    if name.startswith(_SCHEMAS):
        try:
            model = open_clip.create_model(name, cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"could not load CLIP {name}: {reason}; for offline use download it on a machine "
                             f"with internet and pass local-dir:/path/to/folder") from None
        return model, tokenizer, open_clip.get_model_preprocess_cfg(model)

    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown CLIP architecture {name!r}: use an open_clip model name such as ViT-B-32, "
                         f"ViT-B-16 or ViT-L-14 (see open_clip.list_models()), or {TINY_TEST_MODEL} for tests")
    try:
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except Exception as exc:  # HF tokenizers of some models need files from the hub
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"could not load the tokenizer of CLIP {name}: {reason}") from None
    if tag == RANDOM_TAG:
        model = _seeded_build(lambda: open_clip.create_model(name, pretrained=None, pretrained_text=False))
        log.warning("CLIP %s has random weights (for tests and timing only)", name)
        return model, tokenizer, open_clip.get_model_preprocess_cfg(model)
    if tag is None:
        raise ValueError(f"CLIP {name} needs weights: pass {name}:openai, another tag, or a file path")

    path, pcfg = _resolve_weights(name, tag, cache_dir)
    quick_gelu = bool(pcfg.get("quick_gelu", False))
    pp_override = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
    if _is_torchscript(path):
        # The original `clip` package caches TorchScript archives; rebuild an eager model from their weights.
        from open_clip.model import build_model_from_openai_state_dict
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()
            model = build_model_from_openai_state_dict(sd).float()
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"could not load CLIP weights for {name} from {path}: {reason}") from None
        pp = {"size": model.visual.image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
              "resize_mode": "shortest", **pp_override}
        open_clip.set_model_preprocess_cfg(model, pp)
        return model, tokenizer, open_clip.get_model_preprocess_cfg(model)
    try:
        model = open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu,
                                       force_preprocess_cfg=pp_override or None, pretrained_text=False,
                                       cache_dir=cache_dir)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"could not load CLIP weights for {name} from {path}: {reason}") from None
    return model, tokenizer, open_clip.get_model_preprocess_cfg(model)


def _shortest_side_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """(H, W) after resizing the shortest side to the target, as torchvision's Resize(int) (CLIP's transform)."""
    target = min(th, tw) if th != tw else th
    if h <= w:
        return target, max(tw, int(target * w / h))
    return max(th, int(target * h / w)), target


def _crop_offsets(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """(top, left) of a center crop, rounded as torchvision's CenterCrop."""
    return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


class ClipEncoder(nn.Module):
    """One frozen CLIP model with the preprocessing the official NADA code applies to generator output.

    Images go [-1, 1] -> [0, 1] -> resize (shortest side to the model's input size, bicubic, antialiased)
    -> center crop -> normalize with the model's mean / std. The input size comes from the model
    (224 for ViT-B/32, 32 for the tiny test model).
    """

    def __init__(self, spec: ClipSpec, model: nn.Module, tokenizer: Any, preprocess_cfg: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = _pair(preprocess_cfg.get("size", getattr(model.visual, "image_size", 224)))
        self.interpolation = str(preprocess_cfg.get("interpolation", "bicubic"))
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            self.interpolation = "bicubic"
        self.resize_mode = str(preprocess_cfg.get("resize_mode", "shortest"))
        mean = torch.tensor(preprocess_cfg.get("mean", OPENAI_MEAN), dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.tensor(preprocess_cfg.get("std", OPENAI_STD), dtype=torch.float32).reshape(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.eval()

    @property
    def name(self) -> str:
        return self.spec.model if self.spec.pretrained is None else f"{self.spec.model}:{self.spec.pretrained}"

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> "ClipEncoder":
        return super().train(False)  # frozen: never in training mode (no dropout, ever)

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images in [-1, 1] -> CLIP input [N, 3, S, S] (differentiable)."""
        x = (img.float() + 1.0) / 2.0
        h, w = x.shape[-2:]
        th, tw = self.image_size
        size = (th, tw) if self.resize_mode == "squash" else _shortest_side_size(h, w, th, tw)
        if (h, w) != size:
            antialias = self.interpolation in ("bicubic", "bilinear")
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=antialias,
                              **({"align_corners": False} if antialias else {}))
        top, left = _crop_offsets(x.shape[-2], x.shape[-1], th, tw)
        x = x[..., top: top + th, left: left + tw]
        return (x - self.mean) / self.std

    def encode_images(self, img: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> unit-norm embeddings [N, D] float32 (differentiable w.r.t. img)."""
        feats = self.model.encode_image(self.preprocess(img.to(self.device)))
        return F.normalize(feats.float(), dim=-1)

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed CLIP input [N, 3, S, S] -> unit-norm embeddings [N, D] float32."""
        return F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], chunk: int = 256) -> torch.Tensor:
        """Strings -> unit-norm embeddings [T, D] float32 (no gradients)."""
        out = []
        for i in range(0, len(texts), chunk):
            tokens = self.tokenizer(list(texts[i: i + chunk])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out, dim=0)

    def preprocess_pil(self, image: Any) -> torch.Tensor:
        """A PIL image -> CLIP input [3, S, S] with CLIP's own PIL pipeline (resize, center crop, normalize)."""
        import numpy as np
        from PIL import Image
        image = image.convert("RGB")
        th, tw = self.image_size
        w, h = image.size
        nh, nw = (th, tw) if self.resize_mode == "squash" else _shortest_side_size(h, w, th, tw)
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(self.interpolation, Image.BICUBIC)
        if (nh, nw) != (h, w):
            image = image.resize((nw, nh), resample=resample)
        top, left = _crop_offsets(nh, nw, th, tw)
        image = image.crop((left, top, left + tw, top + th))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean[0].cpu()) / self.std[0].cpu()


# ----------------------------------------------------------------------------------------------------------
# The shared bank

_CACHE: dict[tuple[str, str | None, str | None, str], ClipEncoder] = {}


def load_clip(spec: ClipSpec | str, device: str | torch.device = "cpu", cache_dir: str | None = None) -> ClipEncoder:
    """Load one frozen CLIP encoder (cached per process: the same model is only ever loaded once).

    Raises:
        ValueError / FileNotFoundError with a one-line message (unknown model, missing weights, offline).
    """
    spec = spec if isinstance(spec, ClipSpec) else ClipSpec.parse(spec)
    device = torch.device(device)
    key = (spec.model, spec.pretrained, cache_dir, str(device))
    if key not in _CACHE:
        model, tokenizer, pp = _build(ClipSpec(spec.model, spec.pretrained), cache_dir)
        _CACHE[key] = ClipEncoder(ClipSpec(spec.model, spec.pretrained), model, tokenizer, pp).to(device)
    return _CACHE[key]


def clear_clip_cache() -> None:
    """Forget the loaded encoders (frees their memory once no bank holds them)."""
    _CACHE.clear()


class ClipBank:
    """The frozen CLIP models of a run with their loss weights, loaded once and shared by all losses."""

    def __init__(self, encoders: Sequence[ClipEncoder], weights: Sequence[float]):
        if len(encoders) != len(weights) or not encoders:
            raise ValueError("a ClipBank needs one weight per encoder and at least one encoder")
        self.encoders = list(encoders)
        self.weights = [float(w) for w in weights]

    @classmethod
    def load(cls, specs: Sequence[str | ClipSpec], device: str | torch.device = "cpu",
             cache_dir: str | None = None) -> "ClipBank":
        parsed = parse_clip_specs(specs)
        return cls([load_clip(s, device, cache_dir) for s in parsed], [s.weight for s in parsed])

    def __iter__(self) -> Iterator[tuple[ClipEncoder, float]]:
        return iter(zip(self.encoders, self.weights))

    def __len__(self) -> int:
        return len(self.encoders)

    def describe(self) -> list[dict[str, Any]]:
        return [{"model": e.spec.model, "pretrained": e.spec.pretrained, "weight": w,
                 "image_size": list(e.image_size)} for e, w in self]


__all__ = ["ClipBank", "ClipEncoder", "ClipSpec", "RANDOM_TAG", "TINY_TEST_CONFIG", "TINY_TEST_MODEL",
           "clear_clip_cache", "load_clip", "parse_clip_specs"]
