"""The bundle kinds this server runs: manifest["kind"] -> the model class that loads it.

The one place that knows every kind: the registry imports the kind modules, the kind modules import only the shared
base (serving.models and what it builds on), and nothing below imports this module, so there is no import cycle.
A new kind adds its module and one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .dualstyle_model import DualStyleGANModel
from .errors import BundleRefused
from .fast_style_model import FastStyleModel
from .models import LoadedModel
from .stylegan2_model import StyleGAN2Model

MODEL_KINDS: dict[str, type[LoadedModel]] = {
    StyleGAN2Model.kind: StyleGAN2Model,
    DualStyleGANModel.kind: DualStyleGANModel,
    FastStyleModel.kind: FastStyleModel,
}


def model_class(kind: str) -> type[LoadedModel]:
    """The class serving bundles of `kind`; BundleRefused (naming the supported kinds) for any other."""
    cls = MODEL_KINDS.get(kind)
    if cls is None:
        raise BundleRefused(f"bundle kind {kind!r} is not supported by this server version "
                            f"(supported: {', '.join(MODEL_KINDS)})")
    return cls


def load_model(path: Path, manifest: dict, version: str, **options: Any) -> LoadedModel:
    """Load a validated bundle with its kind's class (options: see LoadedModel.load)."""
    return model_class(manifest["kind"]).load(Path(path), manifest, version, **options)
