"""Image -> latent inversion: pSp / e4e encoders, identity networks and encoder losses."""
