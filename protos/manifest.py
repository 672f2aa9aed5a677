"""The serving bundle manifest (`manifest.json`): its format version, schema and validator.

Shared by export (which writes it) and serving (which refuses any bundle that does not validate). Standard
library only. The same rules are published as JSON Schema in protos/bundle_manifest.schema.json.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

BUNDLE_FORMAT = "stylecast.bundle/v1"
MANIFEST_NAME = "manifest.json"
GOLDEN_NAME = "golden.npz"
ENCODER_KINDS = ("psp", "e4e")
ALIGNMENTS = ("ffhq",)
# dualstylegan: the truncation rule of the intrinsic codes (ws = psi * w: towards 0, as the official scripts).
DUALSTYLE_TRUNCATION = "zero"
DUALSTYLE_SYNTHESIS_INPUTS = ("ws", "exstyle_w", "weights")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SCHEMA_PATH = Path(__file__).with_name("bundle_manifest.schema.json")
# The golden tolerances: how far a bundle's graphs (ONNX Runtime, TensorRT) may be from the PyTorch outputs in
# golden.npz. Export records them in manifest.golden.tolerance; serving and `export verify` read them from there
# (`golden_tolerance`), these values filling what a bundle written before does not record.
GOLDEN_TOLERANCE: dict[str, float] = {
    "max_abs_fp32": 1e-4,     # fp32 graphs: largest |value - golden| of float outputs ([-1, 1] images, w, ws)
    "min_psnr_fp16": 40.0,    # fp16 graphs: PSNR (dB) of float images over the [-1, 1] range
    # The encoder is ~100 layers deep: fp32 rounding differences between ONNX Runtime and PyTorch accumulate.
    "max_abs_encoder": 1e-3,
    # uint8 images: at most this many levels off, in at most this fraction of the values (fp32 / fp16 graphs);
    # rounding (x + 1) * 127.5 flips a level wherever the float image sits near a .5 boundary.
    "u8_max_diff_fp32": 1, "u8_max_frac_fp32": 0.01,
    "u8_max_diff_fp16": 8, "u8_max_frac_fp16": 0.25,
}


class ManifestError(ValueError):
    """The manifest is missing, malformed or inconsistent with the bundle's files."""


def _req(doc: dict, key: str, typ: type | tuple[type, ...], where: str, errors: list[str]) -> Any:
    if key not in doc:
        errors.append(f"{where}: missing '{key}'")
        return None
    val = doc[key]
    if typ is int and isinstance(val, bool) or not isinstance(val, typ):
        errors.append(f"{where}.{key}: expected {getattr(typ, '__name__', typ)}, got {type(val).__name__}")
        return None
    return val


def validate_manifest(doc: Any) -> list[str]:
    """Return the list of problems with a manifest document (empty when valid)."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        return ["manifest: not a JSON object"]
    fmt = doc.get("format")
    if fmt != BUNDLE_FORMAT:
        errors.append(f"manifest.format: {fmt!r} is not supported (expected {BUNDLE_FORMAT!r})")
        return errors
    name = _req(doc, "name", str, "manifest", errors)
    if name is not None and not NAME_RE.match(name):
        errors.append(f"manifest.name: {name!r} must match {NAME_RE.pattern}")
    kind = _req(doc, "kind", str, "manifest", errors)
    if kind is not None and kind not in KIND_RULES:
        errors.append(f"manifest.kind: {kind!r} is not one of {BUNDLE_KINDS}")
    _req(doc, "stylecast_version", str, "manifest", errors)
    opset = _req(doc, "opset", int, "manifest", errors)
    if opset is not None and opset < 17:
        errors.append(f"manifest.opset: {opset} < 17")
    files = _req(doc, "files", dict, "manifest", errors) or {}
    for fname, meta in files.items():
        if not fname or "/" in fname or "\\" in fname or fname.startswith(".") or fname == MANIFEST_NAME:
            errors.append(f"manifest.files: illegal file name {fname!r}")
        if not isinstance(meta, dict) or not SHA256_RE.match(str(meta.get("sha256", ""))):
            errors.append(f"manifest.files[{fname!r}]: needs a sha256")
        elif not isinstance(meta.get("bytes"), int) or isinstance(meta["bytes"], bool) or meta["bytes"] < 0:
            errors.append(f"manifest.files[{fname!r}]: needs a byte count")
    graphs = _req(doc, "graphs", dict, "manifest", errors) or {}
    for gname, g in graphs.items():
        if not isinstance(g, dict) or g.get("file") not in files:
            errors.append(f"manifest.graphs[{gname!r}]: file not listed in manifest.files")
            continue
        for io_key in ("inputs", "outputs"):
            if not isinstance(g.get(io_key), dict) or not g[io_key]:
                errors.append(f"manifest.graphs[{gname!r}].{io_key}: missing")
    source = _req(doc, "source", dict, "manifest", errors)
    if source is not None and not SHA256_RE.match(str(source.get("sha256", ""))):
        errors.append("manifest.source.sha256: missing or malformed")
    golden = doc.get("golden")
    if golden is not None and (not isinstance(golden, dict) or golden.get("file") not in files):
        errors.append("manifest.golden.file: not listed in manifest.files")
    elif golden is not None:
        errors += _validate_tolerance(golden.get("tolerance"))
    engines = doc.get("engines") or []
    if not isinstance(engines, list):
        errors.append("manifest.engines: expected a list")
        engines = []
    for i, eng in enumerate(engines):
        if not isinstance(eng, dict):
            errors.append(f"manifest.engines[{i}]: not an object")
            continue
        for key in ("file", "graph", "precision", "trt_flavour", "trt_version", "compute_capability"):
            if key not in eng:
                errors.append(f"manifest.engines[{i}]: missing '{key}'")
        if eng.get("file") not in files:
            errors.append(f"manifest.engines[{i}].file: not listed in manifest.files")
        if "target_note" in eng and not isinstance(eng["target_note"], str):
            errors.append(f"manifest.engines[{i}].target_note: expected a string")
        plugins = eng.get("plugins") or []
        if not isinstance(plugins, list):
            errors.append(f"manifest.engines[{i}].plugins: expected a list")
            plugins = []
        for plugin in plugins:
            if not isinstance(plugin, dict) or not SHA256_RE.match(str(plugin.get("sha256", ""))):
                errors.append(f"manifest.engines[{i}].plugins: each plugin needs a sha256")
    if kind in KIND_RULES and not errors:
        errors += KIND_RULES[kind](doc, graphs, files)
    return errors


def _validate_tolerance(tol: Any) -> list[str]:
    """manifest.golden.tolerance: absent, or an object of finite non-negative numbers (unknown keys allowed)."""
    if tol is None:
        return []
    if not isinstance(tol, dict):
        return ["manifest.golden.tolerance: expected an object"]
    return [f"manifest.golden.tolerance.{k}: expected a finite number >= 0" for k, v in tol.items()
            if not _is_number(v) or v < 0]


def golden_tolerance(manifest: dict) -> dict[str, float]:
    """The tolerances of a (validated) manifest: what it records in golden.tolerance over GOLDEN_TOLERANCE.

    Returns:
        {name: value} with every key of GOLDEN_TOLERANCE (and any extra key the manifest records).
    """
    golden = manifest.get("golden") or {}
    return {**GOLDEN_TOLERANCE, **dict(golden.get("tolerance") or {})}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_dualstylegan(doc: dict, graphs: dict, files: dict) -> list[str]:
    """dualstylegan (DualStyleGAN, Yang et al., CVPR 2022): the generator dims, res_index, default psi (truncation
    towards 0) and weights, a `mapping` graph (z -> w), a `synthesis` graph (ws, exstyle_w, weights -> image), the
    style library (`styles`: file, count, names in id order), golden outputs, and no TensorRT engines."""
    errors: list[str] = []
    model = _req(doc, "model", dict, "manifest", errors)
    if model is None:
        return errors
    dims = {}
    for key in ("resolution", "z_dim", "w_dim", "num_ws"):
        v = _req(model, key, int, "manifest.model", errors)
        if v is not None and v <= 0:
            errors.append(f"manifest.model.{key}: must be positive")
        dims[key] = v
    n = dims["num_ws"]
    r = _req(model, "res_index", int, "manifest.model", errors)
    if r is not None and isinstance(n, int) and (r % 2 or not 0 <= r <= n - 2):
        errors.append(f"manifest.model.res_index: {r} must be an even integer in 0..num_ws-2")
    if not _is_number(model.get("default_psi")):
        errors.append("manifest.model.default_psi: expected a finite number")
    if model.get("truncation") != DUALSTYLE_TRUNCATION:
        errors.append(f"manifest.model.truncation: must be {DUALSTYLE_TRUNCATION!r} (ws = psi * w, towards 0)")
    weights = model.get("default_weights")
    if (not isinstance(weights, list) or not isinstance(n, int) or len(weights) != n
            or not all(_is_number(v) for v in weights)):
        errors.append("manifest.model.default_weights: expected a list of num_ws finite numbers")
    for g in ("mapping", "synthesis"):
        if g not in graphs:
            errors.append(f"manifest.graphs: missing '{g}'")
    if "synthesis" in graphs:
        g = graphs["synthesis"]
        if sorted(g["inputs"]) != sorted(DUALSTYLE_SYNTHESIS_INPUTS):
            errors.append(f"manifest.graphs['synthesis']: inputs must be {list(DUALSTYLE_SYNTHESIS_INPUTS)}")
        if "img_u8" not in g["outputs"]:
            errors.append("manifest.graphs['synthesis']: needs an 'img_u8' output")
    styles = doc.get("styles")
    if not isinstance(styles, dict):
        errors.append("manifest.styles: a dualstylegan bundle needs its style library ({file, count, names})")
    else:
        if styles.get("file") not in files:
            errors.append("manifest.styles.file: not listed in manifest.files")
        count, names = styles.get("count"), styles.get("names")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            errors.append("manifest.styles.count: expected a positive integer")
        elif (not isinstance(names, list) or len(names) != count
              or not all(isinstance(x, str) and x for x in names) or len(set(names)) != len(names)):
            errors.append("manifest.styles.names: expected `count` distinct non-empty strings (id order)")
    if not isinstance(doc.get("golden"), dict):
        errors.append("manifest.golden: a dualstylegan bundle needs golden outputs")
    if doc.get("engines"):
        errors.append("manifest.engines: dualstylegan bundles carry no TensorRT engines (not supported)")
    errors += _validate_latent_space(doc, model, graphs)
    return errors


def _validate_fast_style(doc: dict, graphs: dict, files: dict) -> list[str]:
    """fast_style: a `stylizer` graph (img [N, 3, H, W] -> image of the same shape), model.max_size, golden."""
    errors: list[str] = []
    model = _req(doc, "model", dict, "manifest", errors)
    if model is None:
        return errors
    max_size = _req(model, "max_size", int, "manifest.model", errors)
    if max_size is not None and max_size < 5:
        errors.append("manifest.model.max_size: must be at least 5")
    if "stylizer" not in graphs:
        errors.append("manifest.graphs: missing 'stylizer'")
    elif len(graphs["stylizer"]["inputs"]) != 1 or len(graphs["stylizer"]["outputs"]) != 1:
        errors.append("manifest.graphs['stylizer']: needs exactly one input and one output")
    if not isinstance(doc.get("golden"), dict):
        errors.append("manifest.golden: a fast_style bundle needs golden outputs")
    return errors


def _validate_stylegan2(doc: dict, graphs: dict, files: dict) -> list[str]:
    """stylegan2: the generator dims, default psi, w_avg (the truncation centre), a `mapping` and a `synthesis`
    graph (optional TensorRT engines of the synthesis) and the optional photo encoder."""
    errors: list[str] = []
    model = _req(doc, "model", dict, "manifest", errors)
    if model is None:
        return errors
    for key in ("resolution", "z_dim", "w_dim", "num_ws"):
        v = _req(model, key, int, "manifest.model", errors)
        if v is not None and v <= 0:
            errors.append(f"manifest.model.{key}: must be positive")
    psi = model.get("default_psi")
    if not isinstance(psi, (int, float)) or isinstance(psi, bool):
        errors.append("manifest.model.default_psi: expected a number")
    w_avg = model.get("w_avg")
    if (not isinstance(w_avg, list) or len(w_avg) != model.get("w_dim")
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w_avg)):
        errors.append("manifest.model.w_avg: expected a list of w_dim numbers")
    for g in ("mapping", "synthesis"):
        if g not in graphs:
            errors.append(f"manifest.graphs: missing '{g}'")
    errors += _validate_latent_space(doc, model, graphs)
    return errors


def _validate_latent_space(doc: dict, model: dict, graphs: dict) -> list[str]:
    """The optional photo path: `model.latent_space` (the W+ space the synthesis accepts) and an optional
    `encoder` graph (aligned face img [N, 3, S, S] in [-1, 1] -> ws [N, num_ws, w_dim]) described by `encoder`."""
    errors: list[str] = []
    space = model.get("latent_space")
    if space is not None and (not isinstance(space, str) or not NAME_RE.match(space)):
        errors.append(f"manifest.model.latent_space: {space!r} must match {NAME_RE.pattern}")
    enc = doc.get("encoder")
    if "encoder" not in graphs:
        if enc is not None:
            errors.append("manifest.encoder: described, but graphs has no 'encoder'")
        return errors
    g = graphs["encoder"]
    if list(g["inputs"]) != ["img"] or list(g["outputs"]) != ["ws"]:
        errors.append("manifest.graphs['encoder']: must map input 'img' to output 'ws'")
    if not isinstance(enc, dict):
        return errors + ["manifest.encoder: a bundle with an encoder graph needs an 'encoder' object"]
    kind = enc.get("kind")
    if kind not in ENCODER_KINDS:
        errors.append(f"manifest.encoder.kind: {kind!r} is not one of {ENCODER_KINDS}")
    size = enc.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        errors.append("manifest.encoder.input_size: expected an integer in 8..4096")
    if enc.get("align") not in ALIGNMENTS:
        errors.append(f"manifest.encoder.align: {enc.get('align')!r} is not one of {ALIGNMENTS}")
    if space is None or enc.get("latent_space") != space:
        errors.append("manifest.encoder.latent_space: must equal manifest.model.latent_space")
    if "golden" not in enc or not isinstance(enc.get("golden"), dict):
        errors.append("manifest.encoder.golden: missing (the golden.npz keys of the encoder check)")
    return errors


# manifest.kind -> the rules of that kind's own fields (the kind's section of bundle_manifest.schema.json says the
# same in JSON Schema). A new bundle kind adds its rules function above and one line here.
KIND_RULES: dict[str, Callable[[dict, dict, dict], list[str]]] = {
    "stylegan2": _validate_stylegan2,
    "fast_style": _validate_fast_style,
    "dualstylegan": _validate_dualstylegan,
}
BUNDLE_KINDS = tuple(KIND_RULES)


def load_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and validate bundle_dir/manifest.json; raises ManifestError naming every problem."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    errors = validate_manifest(doc)
    if errors:
        raise ManifestError(f"{path}: " + "; ".join(errors))
    return doc


def check_bundle_files(bundle: str | Path, manifest: dict, ignore_hidden: bool = False) -> list[str]:
    """Every file listed in the manifest exists with its size and sha256, and no unlisted files are present.

    Args:
        ignore_hidden: skip unlisted names starting with "." (the server tolerates editor/NFS droppings).
    Returns:
        one message per problem (empty when the files are intact).
    """
    from common.files import sha256_file

    bundle = Path(bundle)
    problems = []
    for fname, meta in manifest["files"].items():
        p = bundle / fname
        if not p.is_file():
            problems.append(f"missing file {fname}")
        elif p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            problems.append(f"file {fname} was modified (sha256 mismatch)")
    extra = sorted(p.name for p in bundle.iterdir()
                   if p.name not in manifest["files"] and p.name != MANIFEST_NAME
                   and not (ignore_hidden and p.name.startswith(".")))
    if extra:
        problems.append(f"unlisted files {extra}")
    return problems
