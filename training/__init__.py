"""stylecast training: the one StyleGAN2 definition, its ops, checkpoint formats and the adaptation methods."""
