"""The product-space Gibbs kernel of Denoising Langevin Gibbs: x | sigma by Langevin, sigma | x by the noise posterior."""

from __future__ import annotations

from typing import Callable

import torch

from .integrators import Score, randn_like
from .levels import NoiseLevels

NoisePosterior = Callable[[torch.Tensor], torch.Tensor]

#: How sigma | x is drawn: the paper's argmax, or a true draw from the softmax.
SIGMA_MODES = ("argmax", "sample")


def langevin_step(score: Score, x: torch.Tensor, sigma: torch.Tensor, step_size: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """x | sigma: one Langevin step ``x + (eta / 2) s(x, sigma) + sqrt(eta) z`` with absolute step size ``eta``.

    ``x [B, *shape]``, ``sigma [B]``; ``eta`` is not scaled by sigma^2 (as in the paper's code), so the
    chains settle where the sqrt(eta) noise and the score's pull balance.
    """
    return x + 0.5 * step_size * score(x, sigma) + step_size**0.5 * randn_like(x, generator)


def noise_logits(noise_posterior: NoisePosterior, x: torch.Tensor, levels: NoiseLevels) -> torch.Tensor:
    """Evaluate the posterior and check its width: ``x [B, *shape]`` -> logits ``[B, L]``."""
    logits = noise_posterior(x)
    if not isinstance(logits, torch.Tensor) or logits.shape != (x.shape[0], len(levels)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the noise posterior returned {got}, expected logits of shape [B, L]=({x.shape[0]}, {len(levels)}) "
            f"over {levels!r}: pass a classifier trained on this grid (NoiseClassifier.levels) or build the "
            "NoiseLevels the classifier was trained with."
        )
    return logits


def sample_sigma_index(noise_posterior: NoisePosterior, x: torch.Tensor, levels: NoiseLevels, mode: str = "argmax",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """sigma | x: grid index ``[B]`` of ``argmax p(sigma_i | x)`` (the paper) or a draw from that softmax."""
    logits = noise_logits(noise_posterior, x, levels).float()
    if mode == "argmax":
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def gibbs_step(score: Score, noise_posterior: NoisePosterior, levels: NoiseLevels, x: torch.Tensor,
               sigma_idx: torch.Tensor, step_size: float, mode: str = "argmax",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gibbs sweep on the product space: x | sigma (Langevin), then sigma | x (noise posterior).

    ``x [B, *shape]``, ``sigma_idx [B]`` (grid indices) -> the new ``(x, sigma_idx)``. One score evaluation.
    """
    x = langevin_step(score, x, levels.sigma(sigma_idx).to(x.dtype), step_size, generator)
    return x, sample_sigma_index(noise_posterior, x, levels, mode, generator)


def diverged(x: torch.Tensor, levels: NoiseLevels) -> torch.Tensor:
    """``[B]`` bool: chains that are non-finite or have left the grid (RMS beyond 10 sigma_max)."""
    flat = x.flatten(1)
    rms = flat.float().pow(2).mean(-1).sqrt()
    return ~torch.isfinite(flat).all(-1) | ~(rms <= 10 * levels.sigma_max)

