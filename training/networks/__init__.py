"""The one StyleGAN2 network definition shared by every method, export and the tests."""

from .stylegan2 import (Discriminator, DiscriminatorConfig, Generator, GeneratorConfig, MappingNetwork,
                        SynthesisNetwork, mix_styles, rosinality_channels, seed_to_z, seeds_to_z, truncate)

__all__ = ["Discriminator", "DiscriminatorConfig", "Generator", "GeneratorConfig", "MappingNetwork",
           "SynthesisNetwork", "mix_styles", "rosinality_channels", "seed_to_z", "seeds_to_z", "truncate"]
