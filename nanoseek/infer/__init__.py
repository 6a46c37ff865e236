"""Inference: batched generation on the MLA latent cache."""
