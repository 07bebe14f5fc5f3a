"""dlg-sampler: Denoising Langevin Gibbs (Kim & Ye, ICML 2023) for pretrained diffusion models."""

from .levels import NoiseLevels
from .mixture import ExactNoisePosterior, GaussianMixture

__all__ = ["NoiseLevels", "GaussianMixture", "ExactNoisePosterior"]
__version__ = "0.1.0"
