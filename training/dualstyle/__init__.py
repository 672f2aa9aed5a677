"""DualStyleGAN (Yang et al., "Pastiche Master: Exemplar-Based High-Resolution Portrait Style Transfer", CVPR
2022) around stylecast's one StyleGAN2 Generator.

Modules: `model` (DualStyleConfig, DualStyleGAN: the extrinsic style path and the two-path forward),
`checkpoints` (the official generator.pt and exstyle_code.npy layouts, the native directory format), `losses`
(contextual and feature-matching losses).
"""

from .checkpoints import (DUALSTYLE_FORMAT, EXSTYLE_FORMAT, UnsafeCodeFileError, dualstylegan_from_official,
                          dualstylegan_to_official, load_dualstylegan, load_exstyle_codes, official_key_map,
                          read_dualstylegan_meta, save_dualstylegan, save_exstyle_codes, save_official)
from .losses import contextual_loss, feature_matching_loss
from .model import (AdaResBlock, AdaptiveInstanceNorm, DualStyleConfig, DualStyleGAN, StructureMapping,
                    colour_only_weights, default_weights, preserve_colour_codes, structure_only_weights)

__all__ = [
    "AdaResBlock", "AdaptiveInstanceNorm", "DUALSTYLE_FORMAT", "DualStyleConfig", "DualStyleGAN", "EXSTYLE_FORMAT",
    "StructureMapping", "UnsafeCodeFileError", "colour_only_weights", "contextual_loss", "default_weights",
    "dualstylegan_from_official", "dualstylegan_to_official", "feature_matching_loss", "load_dualstylegan",
    "load_exstyle_codes", "official_key_map", "preserve_colour_codes", "read_dualstylegan_meta",
    "save_dualstylegan", "save_exstyle_codes", "save_official", "structure_only_weights",
]
