"""VGG19 feature extractor (Simonyan & Zisserman, 2015) with torchvision's layout, as the loss network of
neural style transfer (Gatys et al., 2016; Johnson et al., 2016).

The trunk is exactly ``torchvision.models.vgg19(weights=None).features`` (so torchvision's ImageNet state
dict loads into it), truncated after the deepest layer a loss needs. Layers are named by block:
``conv1_1, relu1_1, conv1_2, relu1_2, pool1, conv2_1, ...``; the indices are torchvision's
(relu1_1 = 1, relu2_1 = 6, relu3_1 = 11, relu4_1 = 20, relu4_2 = 22, relu5_1 = 29).

Normalisation: images come in as ``img`` in [-1, 1], are mapped to [0, 1] and normalised with the ImageNet
mean / std that torchvision's weights were trained with. (jcjohnson/neural-style uses the Caffe VGG19
instead: BGR, 0..255, mean subtraction only; the loss weights it tuned therefore do not transfer exactly.)

Where the ImageNet weights come from, in order:

1. an explicit path (``--vgg-weights PATH``), else the ``STYLECAST_VGG19_WEIGHTS`` environment variable:
   a torchvision state dict (the full ``vgg19`` one, ``features.N.*`` + ``classifier.*``, or a
   features-only one, ``N.*``), read with ``torch.load(weights_only=True)``;
2. torchvision's cache file ``<torch hub dir>/checkpoints/vgg19-dcbb9e9d.pth``;
3. a download of ``VGG19_Weights.IMAGENET1K_V1`` into that cache, unless downloads are disabled
   (``STYLECAST_OFFLINE=1`` or ``allow_download=False``). Offline and missing: one clear error that says
   how to supply the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

# torchvision's VGG19 ("E") configuration: channels per conv, "M" = 2x2 max pool.
_CFG_E: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_HASH_PREFIX = "dcbb9e9d"  # torchvision names its files <name>-<first 8 hex of sha256>.pth
ENV_WEIGHTS = "STYLECAST_VGG19_WEIGHTS"
ENV_OFFLINE = "STYLECAST_OFFLINE"


def _layer_names() -> list[str]:
    names: list[str] = []
    block, conv = 1, 1
    for v in _CFG_E:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


#: Layer name -> index in ``torchvision.models.vgg19().features`` (37 entries).
VGG19_LAYERS: dict[str, int] = {name: i for i, name in enumerate(_layer_names())}
#: Indices of the 16 convolutions (the only layers with parameters).
VGG19_CONV_INDICES: tuple[int, ...] = tuple(i for n, i in VGG19_LAYERS.items() if n.startswith("conv"))


class VGGWeightsError(FileNotFoundError):
    """The ImageNet VGG19 weights are missing, unreadable or not a torchvision VGG19 state dict."""


def layer_index(name: str) -> int:
    """Index of a named layer (e.g. "relu4_2" -> 22) in torchvision's ``vgg19().features``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    try:
        return VGG19_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown VGG19 layer {name!r}: use names like relu1_1, relu4_2, conv5_1, pool3 "
                         f"(valid: {', '.join(VGG19_LAYERS)})") from None


def build_vgg19_trunk(depth: int, pooling: str = "max") -> nn.Sequential:
    """torchvision's ``vgg19(weights=None).features[:depth]`` with uninitialised parameters and non-inplace ReLUs.

    The network is built on the meta device (no 550 MB allocation for the classifier we never use) and then
    materialised, so callers must load or initialise the parameters.

    Args:
        depth: number of layers to keep (1..37).
        pooling: "max" (torchvision, neural-style's default) or "avg" (Gatys et al.'s suggestion).
    Returns:
        nn.Sequential whose child names are torchvision's indices "0", "1", ...
    """
    import torchvision

    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    with torch.device("meta"):
        features = torchvision.models.vgg19(weights=None).features
    trunk = features[:depth].to_empty(device="cpu")
    for i, m in enumerate(trunk):
        if isinstance(m, nn.ReLU):
            # In-place ReLUs would overwrite the conv outputs we hand to the losses.
            trunk[i] = nn.ReLU(inplace=False)
        elif isinstance(m, nn.MaxPool2d) and pooling == "avg":
            trunk[i] = nn.AvgPool2d(kernel_size=2, stride=2)
    return trunk


def min_input_size(layers: Sequence[str]) -> int:
    """Smallest H and W that reach the deepest of ``layers`` (each 2x2 pool before it halves the size)."""
    deepest = max(layer_index(n) for n in layers)
    pools = sum(1 for name, i in VGG19_LAYERS.items() if name.startswith("pool") and i <= deepest)
    return 2 ** pools


def check_vgg_input(what: str, img: torch.Tensor, layers: Sequence[str]) -> None:
    """Raise ValueError when img [N, 3, H, W] is too small to reach the deepest of ``layers``."""
    need = min_input_size(layers)
    h, w = img.shape[-2:]
    if min(h, w) < need:
        deepest = max(layers, key=layer_index)
        raise ValueError(f"{what} is {w}x{h} px, too small for VGG layer {deepest} (each side needs >= {need} px); "
                         "use a larger size or shallower layers")


class VGGFeatures(nn.Module):
    """A frozen, truncated VGG19 that returns the activations of the named layers.

    Args:
        trunk: ``vgg19().features[:depth]`` with loaded (or random) parameters; see build_vgg19_trunk.
        layers: names of the layers to return, e.g. ("relu4_2", "relu1_1").
    """

    def __init__(self, trunk: nn.Sequential, layers: Sequence[str]):
        super().__init__()
        if not layers:
            raise ValueError("VGGFeatures needs at least one layer")
        self.layers = tuple(dict.fromkeys(layers))  # unique, order kept
        self.indices = {name: layer_index(name) for name in self.layers}
        depth = max(self.indices.values()) + 1
        if len(trunk) < depth:
            raise ValueError(f"VGG trunk has {len(trunk)} layers; {self.layers} need {depth}")
        self.trunk = trunk[:depth]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGFeatures":
        # The loss network is always in eval mode (it has no dropout / BN, but be explicit).
        return super().train(False)

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1] -> ImageNet-normalised, the input torchvision's weights expect. [N, 3, H, W]."""
        return ((img + 1) * 0.5 - self.mean) / self.std

    def forward(self, img: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Activations of the named layers; the trunk runs only as deep as the deepest of them.

        Args:
            img: [N, 3, H, W] float image in [-1, 1].
            layers: a subset of ``self.layers``; None -> all of them.
        Returns:
            {layer name: [N, C_l, H_l, W_l]} for every requested name.
        """
        wanted = self.layers if layers is None else tuple(layers)
        unknown = [n for n in wanted if n not in self.indices]
        if unknown:
            raise ValueError(f"this VGG network was built for {list(self.layers)}, not {unknown}")
        by_index = {self.indices[n]: n for n in wanted}
        depth = max(by_index) + 1
        out: dict[str, torch.Tensor] = {}
        x = self.normalize(img)
        for i in range(depth):
            x = self.trunk[i](x)
            if i in by_index:
                out[by_index[i]] = x
        return out


# ----------------------------------------------------------------------------------------------------------
# Weights


def offline() -> bool:
    """True when ``STYLECAST_OFFLINE=1``: never download (weights must come from a path or the cache)."""
    return os.environ.get(ENV_OFFLINE, "0") == "1"


def hub_cache_file() -> Path:
    """Where torchvision caches the VGG19 weights: ``<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def _how_to_supply() -> str:
    return (f"pass --vgg-weights PATH (torchvision's {VGG19_FILE}, from {VGG19_URL}) or set {ENV_WEIGHTS}, "
            f"or put the file at {hub_cache_file()}")


def read_vgg19_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision VGG19 state dict and return its ``features`` part keyed "0.weight", "0.bias", ...

    Accepts the full ``vgg19`` state dict (``features.N.*`` and ``classifier.*``; the classifier is dropped)
    or a features-only one (``N.*``). Read with ``torch.load(weights_only=True)``: pickled modules or code
    are refused.

    Raises:
        VGGWeightsError: missing file, not a state dict, unknown keys, missing convolutions, wrong shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise VGGWeightsError(f"VGG19 weights {path} not found; {_how_to_supply()}")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files: all mean "not a usable state dict"
        if isinstance(exc, (MemoryError, KeyboardInterrupt)):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        full = str(exc)
        if "weights_only" in full or "Weights only load failed" in full or "Unsupported global" in full:
            msg = f"not a plain tensor state dict ({msg[:200]})"
        raise VGGWeightsError(f"{path}: cannot read VGG19 weights: {msg}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise VGGWeightsError(f"{path}: expected a VGG19 state dict, got {type(sd).__name__}")
    feats: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = str(key)
        if k.startswith("features."):
            k = k[len("features."):]
        elif k.startswith("classifier."):
            continue
        if not isinstance(value, torch.Tensor):
            raise VGGWeightsError(f"{path}: entry {key!r} is not a tensor")
        feats[k] = value
    expected = _expected_shapes()
    unknown = sorted(set(feats) - set(expected))
    missing = sorted(set(expected) - set(feats), key=lambda k: (int(k.split(".")[0]), k))
    if unknown or missing:
        detail = f"unknown keys {unknown[:4]}" if unknown else f"missing keys {missing[:4]}"
        raise VGGWeightsError(f"{path}: not a torchvision VGG19 state dict ({detail})")
    for k, shape in expected.items():
        if tuple(feats[k].shape) != shape:
            raise VGGWeightsError(f"{path}: {k} has shape {tuple(feats[k].shape)}, expected {shape} "
                                  "(is this VGG19? VGG16 and others have different layers)")
        feats[k] = feats[k].float()
    return feats


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    c_in, i = 3, 0
    for v in _CFG_E:
        if v == "M":
            i += 1
            continue
        shapes[f"{i}.weight"] = (int(v), c_in, 3, 3)
        shapes[f"{i}.bias"] = (int(v),)
        c_in, i = int(v), i + 2
    return shapes


def resolve_torchvision_weights(net: str, weights: str | os.PathLike | None, env_var: str, cached: Path, url: str,
                                hash_prefix: str, how_to_supply: str, allow_download: bool | None = None,
                                progress: bool = True) -> Path:
    """Find (or download) a torchvision ImageNet weights file: an explicit path, then ``$env_var``, then the torch
    hub cache file, then a hash-checked download into that cache unless offline.

    Args:
        net: the network's name for messages ("VGG19").
        weights: explicit path or None.
        env_var: environment variable holding a path.
        cached: torchvision's cache location of the file.
        url, hash_prefix: download source and the sha256 prefix torch.hub checks.
        how_to_supply: the end of every error message (how the user can provide the file).
        allow_download: None -> allowed unless ``STYLECAST_OFFLINE=1``.
        progress: show a download progress bar.
    Raises:
        VGGWeightsError: with a one-line message ending in how_to_supply.
    """
    if weights is None and os.environ.get(env_var):
        weights = os.environ[env_var]
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise VGGWeightsError(f"{net} weights {p} not found; {how_to_supply}")
        return p
    if cached.is_file():
        return cached
    if allow_download is None:
        allow_download = not offline()
    if not allow_download:
        raise VGGWeightsError(f"{net} ImageNet weights not found and downloads are disabled "
                              f"({ENV_OFFLINE}=1); {how_to_supply}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_prefix, progress=progress)
    except Exception as exc:  # URLError, timeouts, hash mismatch: one line, and nothing half-written
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise VGGWeightsError(f"could not download the {net} ImageNet weights ({str(exc)[:200]}); "
                              f"{how_to_supply}") from None
    return cached


def resolve_vgg19_weights(weights: str | os.PathLike | None = None, allow_download: bool | None = None,
                          progress: bool = True) -> Path:
    """Find (or download) the VGG19 ImageNet weights file; see the module docstring for the search order.

    Args:
        weights: explicit path; None -> ``STYLECAST_VGG19_WEIGHTS`` -> torch hub cache -> download.
        allow_download: None -> allowed unless ``STYLECAST_OFFLINE=1``.
        progress: show a download progress bar.
    Returns:
        Path of a file to pass to read_vgg19_state_dict.
    Raises:
        VGGWeightsError: with a one-line message saying how to supply the file.
    """
    return resolve_torchvision_weights("VGG19", weights, ENV_WEIGHTS, hub_cache_file(), VGG19_URL, VGG19_HASH_PREFIX,
                                       _how_to_supply(), allow_download, progress)


def load_vgg19(layers: Sequence[str], weights: str | os.PathLike | None = None, pooling: str = "max",
               allow_download: bool | None = None, device: str | torch.device = "cpu",
               progress: bool = True) -> VGGFeatures:
    """The ImageNet-trained VGG19 loss network, truncated after the deepest of ``layers``.

    Args:
        layers: layer names the losses need, e.g. ("relu4_2", "relu1_1", ..., "relu5_1").
        weights: path of a torchvision VGG19 state dict; None searches as described in the module docstring.
        pooling: "max" or "avg".
        allow_download: None -> allowed unless ``STYLECAST_OFFLINE=1``.
        device: where to put the network.
        progress: show a download progress bar.
    Returns:
        A frozen VGGFeatures in eval mode.
    """
    path = resolve_vgg19_weights(weights, allow_download=allow_download, progress=progress)
    sd = read_vgg19_state_dict(path)
    net = VGGFeatures(build_vgg19_trunk(max(layer_index(n) for n in layers) + 1, pooling), layers)
    own = net.trunk.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k])
    return net.to(device)


def random_vgg19(layers: Sequence[str], seed: int = 0, pooling: str = "max",
                 device: str | torch.device = "cpu") -> VGGFeatures:
    """A VGG19 loss network with torchvision's random initialisation (for tests and timing, not for art).

    Convolutions get Kaiming-normal weights (fan_out, ReLU gain) and zero biases, as torchvision initialises
    VGG, drawn from a generator seeded with ``seed``.
    """
    net = VGGFeatures(build_vgg19_trunk(max(layer_index(n) for n in layers) + 1, pooling), layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.trunk:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                m.bias.zero_()
    return net.to(device)


def vgg19_state_dict(net: VGGFeatures) -> dict[str, torch.Tensor]:
    """The trunk's parameters in torchvision's features-only layout ("0.weight", ...), e.g. to save."""
    return {k: v.detach().cpu().clone() for k, v in net.trunk.state_dict().items()}
