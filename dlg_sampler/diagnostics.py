"""How independent are the outputs of persistent chains? Lag-1 autocorrelation of consecutive outputs of one chain."""

from __future__ import annotations

from typing import Any

import torch

#: Above this lag-1 autocorrelation the AR(1) effective sample size ``(1 - r) / (1 + r)`` of a run falls below half
#: its nominal size: more than half of the outputs are redundant, and the sampler says so.
CORRELATION_WARNING = 1 / 3


def ess_fraction(lag1: float) -> float:
    """AR(1) effective sample size per output, ``(1 - r) / (1 + r)``, clipped to ``[0, 1]``."""
    return min(max((1 - lag1) / (1 + lag1), 0.0), 1.0) if lag1 > -1 else 1.0


class OutputCorrelation:
    """Running lag-1 autocorrelation of consecutive outputs of the same chain, pooled over coordinates.

    ``r = sum_d cov_d(x_t, x_{t+1}) / sum_d var_d(x)``: the covariance of a chain's output with its next output,
    over all chains and consecutive pairs, relative to the variance of all outputs (pooling over coordinates keeps
    constant pixels, e.g. an image border, from dividing by zero). Independent outputs give ~0, copies 1.

    Args:
        num_chains: chains whose outputs are tracked.
        dim: coordinates per output (``prod(shape)``).
        device: where the previous outputs ``[C, D]`` are kept.
    """

    def __init__(self, num_chains: int, dim: int, device: torch.device | str = "cpu"):
        self.prev = torch.zeros(num_chains, dim, dtype=torch.float64, device=device)
        self.has_prev = torch.zeros(num_chains, dtype=torch.bool, device=device)
        # sums over all outputs [n, sum x, sum x^2] and over consecutive pairs [m, sum prev, sum cur, sum prev*cur]
        self.sums = torch.zeros(4, dim, dtype=torch.float64, device=device)  # x, x^2, pair prev, pair cur
        self.cross = torch.zeros(dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(2, dtype=torch.float64)  # outputs, pairs

    def update(self, chains: torch.Tensor, outputs: torch.Tensor) -> None:
        """Record ``outputs [k, *shape]`` of chains ``chains [k]`` (indices), each the chain's next output."""
        x = outputs.detach().flatten(1).to(self.prev.device, torch.float64)
        chains = chains.to(self.prev.device)
        self.sums[0] += x.sum(0)
        self.sums[1] += (x * x).sum(0)
        self.counts[0] += len(x)
        paired = self.has_prev[chains]
        if paired.any():
            prev, cur = self.prev[chains[paired]], x[paired]
            self.sums[2] += prev.sum(0)
            self.sums[3] += cur.sum(0)
            self.cross += (prev * cur).sum(0)
            self.counts[1] += int(paired.sum())
        self.prev[chains] = x
        self.has_prev[chains] = True

    def forget(self, chains: torch.Tensor) -> None:
        """Chains ``chains [k]`` restarted from scratch: their next output pairs with nothing."""
        self.has_prev[chains.to(self.has_prev.device)] = False

    @property
    def pairs(self) -> int:
        return int(self.counts[1])

    @property
    def lag1(self) -> float | None:
        """The pooled lag-1 autocorrelation, or ``None`` before two outputs of one chain."""
        n, m = float(self.counts[0]), float(self.counts[1])
        if m < 2 or n < 2:
            return None
        mean = self.sums[0] / n
        var = (self.sums[1] / n - mean**2).sum()
        cov = (self.cross / m - (self.sums[2] / m) * (self.sums[3] / m)).sum()
        return float(cov / var) if var > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev.clone(), "has_prev": self.has_prev.clone(), "sums": self.sums.clone(),
                "cross": self.cross.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.prev.device
        self.prev, self.has_prev = state["prev"].to(device), state["has_prev"].to(device)
        self.sums, self.cross = state["sums"].to(device), state["cross"].to(device)
        self.counts = state["counts"].clone()
