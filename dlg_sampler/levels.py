"""The noise-level grid shared by the noise classifier and the Gibbs kernel."""

from __future__ import annotations

import math
from typing import Any

import torch


class NoiseLevels:
    """A geometric grid of ``num`` VE noise levels between ``sigma_min`` and ``sigma_max``.

    ``sigmas[i] = sigma_min * (sigma_max / sigma_min) ** (i / (num - 1))`` (increasing with ``i``),
    the grid the paper uses (1000 levels from 0.01 to the model's ``sigma_max``).

    Args:
        sigma_min: smallest level, > 0.
        sigma_max: largest level, > ``sigma_min``.
        num: number of levels, >= 2.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, num: int = 1000):
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)) or not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"NoiseLevels needs 0 < sigma_min < sigma_max (both finite), got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}; pass the model's trained range (adapters expose .sigma_min/.sigma_max)."
            )
        if int(num) < 2:
            raise ValueError(f"NoiseLevels needs num >= 2 levels, got num={num}.")
        self.sigma_min, self.sigma_max, self.num = sigma_min, sigma_max, int(num)
        self.log_sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), self.num, dtype=torch.float64)
        self.sigmas = self.log_sigmas.exp().float()

    def __len__(self) -> int:
        return self.num

    def __repr__(self) -> str:
        return f"NoiseLevels(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, num={self.num})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseLevels) and self.config == other.config

    @property
    def config(self) -> dict[str, Any]:
        """The grid as a JSON-able dict; ``NoiseLevels.from_config(levels.config)`` restores it."""
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "num": self.num}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseLevels":
        return cls(config["sigma_min"], config["sigma_max"], config["num"])

    def sigma(self, index: torch.Tensor) -> torch.Tensor:
        """Grid indices ``[B]`` (long) -> noise levels ``[B]`` (float32, on the indices' device)."""
        return self.sigmas.to(index.device)[index]

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Noise levels ``[B]`` -> index ``[B]`` of the nearest level in log-sigma (clamped to the grid)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        pos = (sigma.log() - math.log(self.sigma_min)) / (math.log(self.sigma_max) - math.log(self.sigma_min))
        return (pos * (self.num - 1)).round().clamp(0, self.num - 1).long()

    def check_covers(self, sigma_min: float, sigma_max: float, *, rtol: float = 1e-3) -> None:
        """Raise ``ValueError`` unless the grid lies inside a model's trained range ``[sigma_min, sigma_max]``."""
        if self.sigma_min < sigma_min * (1 - rtol) or self.sigma_max > sigma_max * (1 + rtol):
            raise ValueError(
                f"the noise classifier's grid [{self.sigma_min:g}, {self.sigma_max:g}] is outside the model's "
                f"trained sigma range [{sigma_min:g}, {sigma_max:g}]: train the classifier with "
                f"NoiseLevels(sigma_min>={sigma_min:g}, sigma_max<={sigma_max:g}) (dlg-train-classifier "
                f"--sigma-min/--sigma-max) or pass a classifier made for this model."
            )
