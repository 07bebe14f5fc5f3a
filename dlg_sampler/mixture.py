"""An isotropic Gaussian mixture with closed-form VE score, density and noise posterior.

The exact ground truth the project tests and benchmarks against: under VE noise
``x_sigma = x_0 + sigma z`` component ``k`` becomes ``N(mu_k, (s_k^2 + sigma^2) I)``, so the
perturbed density, its score and ``p(sigma_i | x)`` on a grid are all analytic.
"""

from __future__ import annotations

import math

import torch

from .levels import NoiseLevels


class GaussianMixture:
    """``sum_k w_k N(mu_k, s_k^2 I)`` in ``D`` dimensions.

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K]`` component standard deviations.
        weights: ``[K]`` mixture weights (normalised here); uniform if omitted.
        shape: sample shape (``D`` elements); defaults to ``(D,)``. Use e.g. ``(1, 4, 4)`` to pose as images.
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor | None = None,
                 shape: tuple[int, ...] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(self.means.shape[0]).clone()
        w = torch.ones(len(self.means), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.dim = self.means.shape[1]
        self.shape = tuple(shape) if shape is not None else (self.dim,)
        if math.prod(self.shape) != self.dim:
            raise ValueError(f"shape {self.shape} has {math.prod(self.shape)} elements, the means have D={self.dim}.")

    @classmethod
    def random(cls, num_modes: int = 4, dim: int = 8, spread: float = 3.0, std: float = 0.3,
               seed: int = 0, shape: tuple[int, ...] | None = None, unequal_weights: bool = True) -> "GaussianMixture":
        """A reproducible mixture: means ``~ N(0, spread^2 I)``, equal stds, weights 1..K (normalised)."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_modes, dim, generator=g, dtype=torch.float64) * spread
        weights = torch.arange(1, num_modes + 1, dtype=torch.float64) if unequal_weights else None
        return cls(means, torch.full((num_modes,), std), weights, shape)

    def characteristic_function(self, frequencies: torch.Tensor) -> torch.Tensor:
        """``E exp(i w . x) = sum_k w_k exp(i w . mu_k - s_k^2 |w|^2 / 2)``: ``frequencies [M, D]`` -> ``[M]``
        (complex128)."""
        w = torch.as_tensor(frequencies, dtype=torch.float64)
        phase = 1j * (w @ self.means.T) - 0.5 * (w * w).sum(1, keepdim=True) * self.stds**2  # [M, K]
        return (self.weights * torch.exp(phase)).sum(1)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).double()

    def _component_log_probs(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``[B, D]``, ``[B]`` -> ``log w_k + log N(x; mu_k, (s_k^2+sigma^2) I)``, ``[B, K]``."""
        var = self.stds.to(x.device) ** 2 + sigma.double()[:, None] ** 2  # [B, K]
        sq = torch.cdist(x, self.means.to(x.device)) ** 2  # [B, K]
        return self.weights.to(x.device).log() - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``log p_sigma(x)``: ``x [B, *shape]``, ``sigma [B]`` or scalar -> ``[B]`` (float64)."""
        xf = self._flat(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(xf.shape[0])
        return self._component_log_probs(xf, sigma).logsumexp(-1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact VE score ``grad_x log p_sigma(x)``: ``x [B, *shape]``, ``sigma [B]`` -> shape of ``x``."""
        xf = self._flat(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(xf.shape[0])
        resp = self._component_log_probs(xf, sigma).softmax(-1)  # [B, K]
        var = self.stds.to(x.device) ** 2 + sigma[:, None] ** 2  # [B, K]
        diff = self.means.to(x.device)[None] - xf[:, None]  # [B, K, D]
        s = (resp[..., None] * diff / var[..., None]).sum(1)
        return s.reshape(x.shape).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact ``E[x_0 | x_sigma]`` (Tweedie): ``x + sigma^2 s(x, sigma)``."""
        return x + sigma.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype) ** 2 * self.score(x, sigma)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``p(k | x_sigma)``, ``[B, K]``."""
        xf = self._flat(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(xf.shape[0])
        return self._component_log_probs(xf, sigma).softmax(-1)

    def sample(self, n: int, sigma: torch.Tensor | float = 0.0, generator: torch.Generator | None = None,
               return_labels: bool = False):
        """``n`` exact samples of ``p_sigma`` (``sigma`` scalar or ``[n]``): ``[n, *shape]`` float32 (+ labels ``[n]``)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(n)
        std = (self.stds[labels] ** 2 + sigma**2).sqrt()
        x = self.means[labels] + std[:, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = x.float().reshape(n, *self.shape)
        return (x, labels) if return_labels else x

    def mode_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of samples ``x [B, *shape]`` assigned (by responsibility at sigma=0) to each mode, ``[K]``."""
        labels = self.responsibilities(x).argmax(-1)
        return torch.bincount(labels.cpu(), minlength=len(self.weights)).double() / x.shape[0]

    def noise_posterior(self, levels: NoiseLevels) -> "ExactNoisePosterior":
        """The Bayes-optimal noise classifier for this mixture on ``levels`` (uniform prior over the grid)."""
        return ExactNoisePosterior(self, levels)


class ExactNoisePosterior:
    """``x [B, *shape] -> logits [B, L]`` with ``softmax(logits) = p(sigma_i | x)`` exactly (uniform prior on the grid)."""

    def __init__(self, mixture: GaussianMixture, levels: NoiseLevels):
        self.mixture, self.levels = mixture, levels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixture
        sq = torch.cdist(m._flat(x), m.means.to(x.device)) ** 2  # [B, K]
        var = m.stds.to(x.device) ** 2 + self.levels.sigmas.to(x.device, torch.float64)[:, None] ** 2  # [L, K]
        # log p_{sigma_i}(x) = logsumexp_k [log w_k + log N(x; mu_k, var_ik I)], for every level i: [B, L]
        lp = m.weights.to(x.device).log() - 0.5 * sq[:, None, :] / var - 0.5 * m.dim * torch.log(2 * math.pi * var)
        return lp.logsumexp(-1).float()
