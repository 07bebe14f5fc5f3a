"""What the integrators and the scheduler warm start both take: the VE score callable, counted, and the checks of
where an integration starts (below :mod:`dlg_sampler.integrators` and :mod:`dlg_sampler.schedulers`, which import
it; ``dlg_sampler.integrators`` re-exports every name)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dims, to broadcast a per-sample value against ``x``."""
    return v.reshape(v.shape[0], *[1] * (ndim - 1))


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class CountedScore:
    """Wraps a score: checks its output's shape and counts evaluations (``.nfe``, per sample)."""

    def __init__(self, score: Score):
        self.score, self.nfe = score, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.score(x, sigma)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the score returned {got} for x of shape {tuple(x.shape)}: a score must be a callable "
                "score(x [B, *shape], sigma [B]) -> Tensor shaped like x (the VE score); wrap your model "
                "with an adapter from dlg_sampler.adapters."
            )
        self.nfe += 1
        return out.to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Tweedie denoiser ``D(x, sigma) = x + sigma^2 s(x, sigma)``."""
        return x + append_dims(sigma, x.ndim) ** 2 * self(x, sigma)


def check_steps(steps, what: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"{what} must be a positive integer, got {steps!r}.")
    return int(steps)


def check_sigma_start(sigma_start, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``[B]`` start level to ``[B]`` on ``x``'s device; must be positive and finite."""
    sigma_start = torch.as_tensor(sigma_start, dtype=x.dtype, device=x.device)
    if sigma_start.ndim == 0:
        sigma_start = sigma_start.expand(x.shape[0])
    if sigma_start.shape != (x.shape[0],):
        raise ValueError(f"sigma_start must be a scalar or have shape [B]=({x.shape[0]},), got {tuple(sigma_start.shape)}.")
    if not (torch.isfinite(sigma_start).all() and (sigma_start > 0).all()):
        raise ValueError("sigma_start must be positive and finite for every sample (VE noise levels).")
    return sigma_start
