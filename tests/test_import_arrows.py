"""The import arrows of ARCHITECTURE.md, enforced on the source (static) and at run time (serving)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules it must never import
# `common` is the ground floor (torch-free, imports no layer); `stylecast` is the CLI at the top, imported by nobody.
LAYERS = {"training", "export", "serving", "protos", "benchmarks", "stylecast"}
FORBIDDEN = {
    "common": LAYERS | {"torch", "torchvision", "open_clip", "onnxruntime", "grpc"},
    "serving": {"torch", "torchvision", "training", "export", "open_clip", "stylecast"},
    "training": {"export", "serving", "benchmarks", "stylecast"},
    "protos": {"torch", "training", "export", "serving", "stylecast"},
    "export": {"serving", "stylecast"},
    "benchmarks": {"stylecast"},
}
# training.ops is a leaf: torch, numpy and itself only
OPS_ALLOWED_PROJECT = {"training.ops"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _py_files(pkg: str) -> list[Path]:
    return [p for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name]


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_forbidden_imports(pkg: str) -> None:
    bad = []
    for f in _py_files(pkg):
        for line, mod in _imports(f):
            if mod.split(".")[0] in FORBIDDEN[pkg]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "import arrows of ARCHITECTURE.md broken:\n" + "\n".join(bad)


def test_ops_is_a_leaf() -> None:
    bad = []
    for f in _py_files("training/ops"):
        for line, mod in _imports(f):
            top = mod.split(".")[0]
            if top in ("training", "export", "serving", "stylecast", "benchmarks") and not mod.startswith("training.ops"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "training.ops must only import torch/numpy:\n" + "\n".join(bad)


def test_networks_import_only_ops() -> None:
    bad = []
    for f in _py_files("training/networks"):
        for line, mod in _imports(f):
            if mod.startswith("training.") and not (mod.startswith("training.ops") or mod.startswith("training.networks")):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_serving_and_cli_do_not_load_torch_at_runtime() -> None:
    """Importing the whole serving package (and the CLI entry) must not pull torch into the process."""
    code = (
        "import sys, pkgutil, importlib\n"
        "import stylecast.cli\n"
        "import serving\n"
        "for m in pkgutil.walk_packages(serving.__path__, 'serving.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('torch', 'training', 'export', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# training.<method> may import the shared layers (networks, ops, checkpoints) and the shared helpers (generate:
# sampling and grids; distributed: torchrun / DDP). A method may build on another method's public pieces only along
# these deliberate arrows (DualStyleGAN is finetuning + a pSp encoder + destylization; inversion reuses the VGG
# weight loading of neural style and the image-folder reader of finetuning); anything else is a new design decision
# and must be added here on purpose.
SHARED = {"networks", "ops", "checkpoints", "generate", "distributed"}
METHOD_ARROWS = {
    "dualstyle": {"finetune", "inversion", "style"},
    "inversion": {"finetune", "style"},
    "blend": set(), "finetune": set(), "nada": set(), "style": set(),
}


def test_training_methods_import_only_shared_layers_and_declared_methods() -> None:
    bad = []
    for f in _py_files("training"):
        rel = f.relative_to(ROOT / "training")
        method = rel.parts[0].removesuffix(".py")
        if method in SHARED or method == "__init__":
            continue
        allowed = SHARED | METHOD_ARROWS.get(method, set()) | {method}
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "training":
                    targets = [a.name for a in node.names]
                elif node.module.startswith("training."):
                    targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("training.")]
            for t in targets:
                if t not in allowed:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} training.{method} imports training.{t}")
    assert not bad, "undeclared method-to-method imports (see METHOD_ARROWS):\n" + "\n".join(bad)
