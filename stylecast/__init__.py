"""stylecast: StyleGAN stylization from training to exported, served inference (package metadata + CLI)."""

__version__ = "0.1.0"
