"""Adapters: pretrained diffusion models as noise-conditional VE score functions."""
