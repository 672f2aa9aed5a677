"""Exemplar-based portrait style transfer with a DualStyleGAN checkpoint in PyTorch (Yang et al., "Pastiche Master:
Exemplar-Based High-Resolution Portrait Style Transfer", CVPR 2022; the official style_transfer.py): a pSp / e4e
encoder (W+ or z+) -> the content's W+ codes, truncation towards 0, an extrinsic style from the library (or an
encoded exemplar), the DualStyleGAN synthesis, paste-back into the photo.

`stylecast stylize` runs this for checkpoints and serving.offline.BundleStyleTransfer (the same interface,
torch-free) for bundles; the two agree with each other (tests/dualstyle/test_stylize_cli.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common import faces as F
from training.dualstyle import load_dualstylegan, load_exstyle_codes, preserve_colour_codes
from training.inversion.encoders import check_encoder_fits, codes_to_ws, load_encoder

DEFAULT_PSI = 0.75  # official style_transfer.py --truncation


class CheckpointStyleTransfer:
    """A DualStyleGAN checkpoint + its exstyle codes + a pSp / e4e encoder for its base generator.

    Args:
        checkpoint: official generator.pt or a stylecast DualStyleGAN directory.
        styles: the exstyle codes (official exstyle_code.npy or stylecast .safetensors); None = no library (an
            exemplar image is then the only style source).
        encoder: the encoder checkpoint (required); encoder_space: "w+" | "z+" for an official one that does not
            record it (DualStyleGAN's encoder.pt is z+).
        device: "cpu", "cuda", "cuda:1" or "auto".
    Raises:
        ValueError / FileNotFoundError: one line naming the problem.
    """

    mode = "checkpoint"

    def __init__(self, checkpoint: str | Path, styles: str | Path | None, encoder: str | Path | None,
                 encoder_space: str | None = None, device: str = "auto"):
        if encoder is None:
            raise ValueError("--encoder is required with a checkpoint (a pSp / e4e checkpoint for the base generator)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.impl = "ref" if self.device.type == "cpu" else "auto"
        self.model = load_dualstylegan(checkpoint).eval().requires_grad_(False).to(self.device)
        self.codes = (load_exstyle_codes(styles, num_ws=self.model.num_ws, w_dim=self.model.z_dim)
                      if styles is not None else {})
        self.enc = load_encoder(encoder, with_decoder=False, device=self.device, latent_space=encoder_space)
        check_encoder_fits(self.enc.config, self.model.generator, f"encoder {encoder}")
        self.names = list(self.codes)
        self.num_ws, self.res_index = self.model.num_ws, self.model.res_index
        self.default_weights = list(self.model.default_weights())
        self.default_psi = DEFAULT_PSI
        self.encoder_size = self.enc.config.input_size

    def encode(self, aligned_u8: np.ndarray) -> np.ndarray:
        """Aligned faces img_u8 [F, S, S, 3] -> untruncated W+ ws [F, num_ws, w_dim] float32: the server's conversion
        (x / 127.5 - 1 in float32), the encoder, z+ codes through the base mapping."""
        x = torch.from_numpy(np.array(aligned_u8, copy=True)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        with torch.no_grad():
            codes = self.enc.encoder(x.to(self.device))
            ws = codes_to_ws(codes, self.enc.config.latent_space, self.model.generator.mapping)
        return ws.float().cpu().numpy()

    def render(self, photo_u8: np.ndarray, aligned: list, psi: float, style_id: int | None,
               exemplar_ws: np.ndarray | None, weights: list[float], preserve_color: bool, composite: str,
               feather: float) -> tuple[np.ndarray, np.ndarray]:
        """The faces of one photo (common.faces.AlignedFace at encoder_size) in a library style or the encoded
        exemplar [1, num_ws, w_dim] -> (the photo with the stylized faces pasted back, or the first crop; every crop
        img_u8 [F, R, R, 3])."""
        dev = self.device
        ws_u = torch.from_numpy(self.encode(np.stack([a.img_u8 for a in aligned]))).to(dev)  # [F, num_ws, w_dim]
        with torch.no_grad():
            if exemplar_ws is not None:
                ex = torch.from_numpy(exemplar_ws).to(dev)
            else:
                ex = self.model.map_extrinsic(torch.from_numpy(self.codes[self.names[style_id]]).to(dev))
            if preserve_color:
                ex = preserve_colour_codes(ex, ws_u, self.model.cfg)
            ws = ws_u if psi == 1 else ws_u * psi  # truncation towards 0, as the official scripts
            w = torch.tensor([weights], dtype=torch.float32, device=dev)
            img = self.model(ws, ex, w, noise_mode="const", impl=self.impl)
            crops = ((img.float() + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        if composite == "crop":
            return crops[0], crops
        out = photo_u8
        for face, crop in reversed(list(zip(aligned, crops))):
            out = F.paste_back(out, np.ascontiguousarray(crop), face.quad, feather=feather)
        return out, crops

    def close(self) -> None:
        pass
