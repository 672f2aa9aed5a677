"""The bundle kinds export builds: manifest kind -> the kind's build function (each with its own sources and
options: export.bundle.build_bundle, export.dualstyle_bundle.build_dualstyle_bundle, ...).

The one place in export that knows every kind: it imports the kind modules, which import only the shared base
(export.writer, export.onnx_export, export.encoder_export), so there is no import cycle. Tests check that every kind
here has a serving class (serving.kinds) and manifest rules (protos.manifest.KIND_RULES), and the parametrized
bundle tests cover each one. A new kind adds its module and one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import bundle, dualstyle_bundle, fast_style_bundle

EXPORT_KINDS: dict[str, Callable[..., Path]] = {
    bundle.KIND: bundle.build_bundle,
    dualstyle_bundle.KIND: dualstyle_bundle.build_dualstyle_bundle,
    fast_style_bundle.KIND: fast_style_bundle.build_fast_style_bundle,
}
