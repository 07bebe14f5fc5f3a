"""The restart kernel's lift level by rule of thumb (below :mod:`dlg_sampler.sampler`, which sets it at the warm-up,
and :mod:`dlg_sampler.tuning`, whose pilot checks it): ``RESTART_SCALE`` times the data scale of the chains, raised
where their spread concentrates in a few directions (:func:`spectral_level`)."""

from __future__ import annotations

import math

import torch
from scipy.optimize import brentq

from .scores import append_dims

#: ``restart_sigma`` left to the sampler: this many times the data scale the warm-up measures (the per-coordinate
#: spread of the warmed-up chains). On the digits model (scale 0.53) the lag-1 autocorrelation of consecutive outputs
#: is 0.24 at S = 3, 0.14 at S = 5, 0.10 at S = 7 and 0.07 at S = 10, and FD is lowest for S in 5-7 at 10-12 NFE
#: (docs/mixing.md); on a separated 12-d mixture (scale 3) S = 36 gives lag-1 0.11.
RESTART_SCALE = 12.0
#: Up to this many denoising steps the rule is ``RESTART_SCALE`` x the data scale; beyond, its multiple grows in
#: proportion to the steps, up to ``RULE_MAX_GROWTH`` times (at twice these steps). The best level rises with the
#: steps: a higher lift decorrelates consecutive outputs further, and more steps denoise the longer solve as
#: accurately. On the digits model (5000 samples, seeds 0-1, FD against both references) 1.5 or 2 times the level
#: scored worse at 8 steps, better from 10, and four times worse than twice at 19; at 9 steps (n = 256, the README's
#: command) 1.125 times scored worse on 2 of 3 seeds (docs/mixing.md).
RULE_STEPS = 9
#: The most the rule's multiple grows with the steps.
RULE_MAX_GROWTH = 2.0
#: The chains' spread "sits in few directions" where their spectral level is more than this many times the rule of
#: thumb's ``RESTART_SCALE`` x data scale (photo-digits: 4.8; digits and the three mixtures: 0.68-1.03, seeds 0-4).
FEW_DIRECTIONS = 2.0
#: Largest lag-1 autocorrelation of consecutive outputs the lift level aims at (the mixing target: <= 0.2).
TARGET_LAG1 = 0.2
#: The rule in words, for summaries.
RULE = (f"{RESTART_SCALE:g} x the warm-up's data scale (rising to {RULE_MAX_GROWTH * RESTART_SCALE:g} x from "
        f"{RULE_STEPS} to {int(RULE_MAX_GROWTH * RULE_STEPS)} denoising steps), or more where its spread sits in few "
        f"directions")


def _data_scale(x: torch.Tensor) -> float:
    """The spread of samples ``x [C, *shape]``: RMS over coordinates of their std across samples (one sample: its
    std over coordinates). Consecutive restart outputs decorrelate once the lift level is large against it."""
    flat = x.detach().flatten(1).double()
    spread = flat.var(0).mean().sqrt() if len(flat) > 1 else flat.std()
    return float(spread) if math.isfinite(float(spread)) and spread > 0 else 1.0


def restart_rule(x: torch.Tensor, target_lag1: float = TARGET_LAG1, steps: int = RULE_STEPS) -> float:
    """The lift level the warm-up sets from warmed-up chains ``x [C, *shape]`` for a solve of ``steps`` denoising
    steps: :func:`rule_scale` times their data scale, or :func:`spectral_level` where that is higher (data whose
    spread sits in a few directions: that level is where the chains mix, whatever the steps)."""
    return max(rule_scale(steps) * _data_scale(x), spectral_level(x, target_lag1))


def spread_in_few_directions(x: torch.Tensor, target_lag1: float = TARGET_LAG1) -> bool:
    """Whether the spread of chains ``x [C, *shape]`` sits in a few directions: their :func:`spectral_level` above
    ``FEW_DIRECTIONS`` times ``RESTART_SCALE`` x their data scale (a photo's brightness moving every pixel together).
    There the solve from the lift level has to follow the dominant directions down from high levels, which a Karras
    ramp crosses in one or two steps; levels uniform in log-SNR serve it (docs/mixing.md)."""
    return spectral_level(x, target_lag1) > FEW_DIRECTIONS * RESTART_SCALE * _data_scale(x)


def rule_scale(steps: int) -> float:
    """The rule of thumb's multiple of the data scale for ``steps`` denoising steps: ``RESTART_SCALE`` up to
    ``RULE_STEPS``, then in proportion to the steps, at most ``RULE_MAX_GROWTH`` times ``RESTART_SCALE``."""
    return RESTART_SCALE * min(max(steps / RULE_STEPS, 1.0), RULE_MAX_GROWTH)


def spectral_level(x: torch.Tensor, target_lag1: float = TARGET_LAG1) -> float:
    """The lowest lift level ``S`` at which Gaussian data with the spectrum of ``x [C, *shape]`` keeps consecutive
    restart outputs at most ``target_lag1`` correlated (0 for fewer than 3 finite samples).

    An exact restart move (lift to ``S``, probability-flow ODE back) on Gaussian data maps each principal direction of
    variance ``l`` to a correlation ``sqrt(l / (l + S^2))``; pooled over coordinates as
    :class:`~dlg_sampler.diagnostics.OutputCorrelation` pools them, the lag-1 is ``sum l sqrt(l / (l + S^2)) / sum l``.
    Per-coordinate scale alone misses where the variance sits: a photo background's brightness moves all 768
    coordinates of a 3x16x16 image together, one direction holding a third of the variance, and the rule of thumb's
    S = 5.6 left lag-1 0.58 there (0.56 predicted). With ``C`` chains only ``C - 1`` directions are seen and the
    sampling noise lifts each by about ``trace / (C - 1)``: the spectrum is the directions standing above that floor
    (less the floor) plus the rest of the trace spread evenly over all coordinates. On the digits model this gives
    S of about 5 (below the rule of thumb's 6.5) and on photo-digits about 23 from 50 or more chains (23.6 from 5000
    training images).
    """
    flat = x.detach().flatten(1).double()
    flat = flat[torch.isfinite(flat).all(1)]  # diverged chains say nothing about the spread (the sampler reports them)
    if len(flat) < 3:
        return 0.0
    centred = flat - flat.mean(0)
    gram = centred @ centred.T if len(flat) <= flat.shape[1] else centred.T @ centred  # same nonzero eigenvalues
    seen = torch.linalg.eigvalsh(gram / (len(flat) - 1)).clamp(min=0)
    trace = float(seen.sum())
    if not math.isfinite(trace) or trace <= 0:
        return 0.0
    spikes = (seen - trace / (len(flat) - 1)).clamp(min=0)
    spikes = spikes[spikes > 0]
    rest = trace - float(spikes.sum())
    spectrum = torch.cat([spikes, torch.full((flat.shape[1],), rest / flat.shape[1], dtype=flat.dtype)])

    def excess(log_s: float) -> float:
        return float((spectrum * (spectrum / (spectrum + math.exp(2 * log_s))).sqrt()).sum()) / trace - target_lag1

    hi = math.log(math.sqrt(trace)) + 10.0  # the lag-1 there is below 1e-4 for any spectrum of this trace
    return math.exp(brentq(excess, hi - 30.0, hi)) if excess(hi - 30.0) > 0 else 0.0


class GaussianFirstStep:
    """A score for one restart solve from the lift level: its first call (at ``S``, where the solve starts) is answered
    by the posterior mean under a Gaussian with the mean and covariance of the chains' current states ``chains [N,
    *shape]``; every later call goes to ``score``. The solve's first model evaluation is saved.

    For ``x0 ~ N(m, C)``, ``C = V diag(v) V^T`` (the chains' principal directions ``V`` and variances ``v``), the
    lifted state ``x = x0 + S z`` has ``E[x0 | x] = m + V diag(v / (v + S^2)) V^T (x - m)``: exact for Gaussian data,
    and the lift level sits well above the data scale (12 times it or more, :func:`restart_rule`), where the noisy
    distribution is nearly Gaussian. The chains are the run's own samples, so the statistics cost no evaluation.
    """

    def __init__(self, score, chains: torch.Tensor):
        flat = chains.detach().flatten(1).double()
        self.mean = flat.mean(0)  # [D]
        _, singular, self.directions = torch.linalg.svd(flat - self.mean, full_matrices=False)  # [r], [r, D]
        self.variances = singular**2 / max(len(flat) - 1, 1)  # [r]
        self.score, self.answered = score, False

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x]`` under the Gaussian for ``x [B, *shape]`` at levels ``sigma [B]``."""
        coords = (x.flatten(1).double() - self.mean) @ self.directions.T  # [B, r]
        shrink = self.variances / (self.variances + sigma.double().reshape(-1, 1) ** 2)  # [B, r]
        return (self.mean + (coords * shrink) @ self.directions).to(x.dtype).view_as(x)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.answered:
            return self.score(x, sigma)
        self.answered = True
        sigma = sigma.expand(len(x)) if sigma.ndim == 0 else sigma
        return (self.denoise(x, sigma) - x) / append_dims(sigma, x.ndim) ** 2
