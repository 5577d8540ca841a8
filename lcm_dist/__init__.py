"""lcm-dist: a distributed trainer for Latent Convolutional Models."""

__version__ = "0.1.0"
