"""StyleGAN-NADA (Gal et al., "StyleGAN-NADA: CLIP-Guided Domain Adaptation of Image Generators", SIGGRAPH
2022): text- or image-guided adaptation of a StyleGAN2 generator with frozen CLIP models.

Modules: `clip` (open_clip loading, the shared frozen CLIP bank), `templates` (prompt templates), `losses`
(directional / global / patch / manifold terms, image-guided targets), `layers` (phases, adaptive layer
selection, the W+ -> layer mapping), `trainer` (NadaConfig, the training loop, resume).
"""

from .trainer import NadaConfig, NadaDivergedError, NadaResult, read_run_config, resume_nada, train_nada

__all__ = ["NadaConfig", "NadaDivergedError", "NadaResult", "read_run_config", "resume_nada", "train_nada"]
