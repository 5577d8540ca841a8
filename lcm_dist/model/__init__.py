"""The model: per-image latent ConvNets, the shared generator and the loss (no distributed code)."""
