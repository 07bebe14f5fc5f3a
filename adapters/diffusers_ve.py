"""NCSN++-style VE diffusers models (``UNet2DModel`` with ``time_embedding_type="fourier"``, the models of
``ScoreSdeVePipeline``, e.g. ``google/ncsnpp-celebahq-256``) as VE scores."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .common import ScoreAdapter, check_channels, expand_batch, model_dtype


class DiffusersVEScore(ScoreAdapter):
    """A VE diffusers model as a VE score, with ``ScoreSdeVeScheduler``'s conventions.

    The timestep *is* the noise level and the output is already the score (the fourier ``UNet2DModel`` divides
    its output by the timestep):

        ``s(x, sigma) = model(x, sigma)``, ``sigma`` passed as a float tensor ``[B]``

    (a Python float would be cast to a long timestep). The trained range is the scheduler config's
    ``[sigma_min, sigma_max]``; levels outside are clamped with a warning once.

    Args:
        model: called as ``model(x, sigma, **cond_kwargs, return_dict=False)[0]``; inputs are cast to its dtype,
            outputs back to ``x``'s.
        sigma_min, sigma_max: the trained range (``ScoreSdeVeScheduler`` config; see :meth:`from_scheduler`).
        cond_kwargs: keyword arguments of every call (e.g. ``class_labels``); batch-1 tensors are expanded.
    """

    def __init__(self, model: Any, sigma_min: float, sigma_max: float, *, cond_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}: pass the model's trained "
                             "range (its ScoreSdeVeScheduler config's sigma_min / sigma_max).")
        self.model, self.sigma_min, self.sigma_max = model, float(sigma_min), float(sigma_max)
        self.cond_kwargs = dict(cond_kwargs or {})

    @classmethod
    def from_scheduler(cls, model: Any, scheduler: Any, **kwargs: Any) -> "DiffusersVEScore":
        """The adapter with the trained range of ``scheduler.config`` (``sigma_min``, ``sigma_max``)."""
        return cls(model, scheduler.config.sigma_min, scheduler.config.sigma_max, **kwargs)

    def model_score(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_channels(x, self.model, latent_hint=False)
        kwargs = expand_batch(self.cond_kwargs, x.shape[0])
        out = self.model(x.to(model_dtype(self.model, x.dtype)), sigma.to(x.device, torch.float32), **kwargs,
                         return_dict=False)[0]
        return out.to(x.dtype), sigma
