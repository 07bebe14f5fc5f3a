"""dlg-sampler: Denoising Langevin Gibbs (Kim & Ye, ICML 2023) for pretrained diffusion models."""

from .gibbs import gibbs_step, langevin_step, sample_sigma_index
from .integrators import INTEGRATORS, integrate
from .classifier import NoiseClassifier
from .levels import NoiseLevels
from .mixture import ExactNoisePosterior, GaussianMixture
from .sampler import DLGSampler

__all__ = ["NoiseLevels", "NoiseClassifier", "DLGSampler", "integrate", "INTEGRATORS", "GaussianMixture", "ExactNoisePosterior",
           "langevin_step", "sample_sigma_index", "gibbs_step"]
__version__ = "0.1.0"
