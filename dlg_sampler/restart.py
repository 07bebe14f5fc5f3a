"""The restart kernel's lift level by rule of thumb: ``RESTART_SCALE`` times the data scale of the chains (below
:mod:`dlg_sampler.sampler`, which sets it at the warm-up, and :mod:`dlg_sampler.tuning`, whose pilot checks it)."""

from __future__ import annotations

import math

import torch

#: ``restart_sigma`` left to the sampler: this many times the data scale the warm-up measures (the per-coordinate
#: spread of the warmed-up chains). On the digits model (scale 0.53) the lag-1 autocorrelation of consecutive outputs
#: is 0.24 at S = 3, 0.14 at S = 5, 0.10 at S = 7 and 0.07 at S = 10, and FD is lowest for S in 5-7 at 10-12 NFE
#: (docs/mixing.md); on a separated 12-d mixture (scale 3) S = 36 gives lag-1 0.11.
RESTART_SCALE = 12.0


def _data_scale(x: torch.Tensor) -> float:
    """The spread of samples ``x [C, *shape]``: RMS over coordinates of their std across samples (one sample: its
    std over coordinates). Consecutive restart outputs decorrelate once the lift level is large against it."""
    flat = x.detach().flatten(1).double()
    spread = flat.var(0).mean().sqrt() if len(flat) > 1 else flat.std()
    return float(spread) if math.isfinite(float(spread)) and spread > 0 else 1.0
