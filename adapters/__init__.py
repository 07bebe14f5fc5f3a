"""Adapters: pretrained diffusion models as noise-conditional VE scores ``score(x [B, *shape], sigma [B])``.

One class per model family, each exposing the model's trained ``sigma_min`` / ``sigma_max``:

- :class:`DiffusersVEScore`: NCSN++-style fourier ``UNet2DModel`` (``ScoreSdeVePipeline``);
- :class:`DiffusersVPScore`: discrete-time VP models (DDPM, DDIM, Stable-Diffusion-style UNets and DiT
  transformers), epsilon / v / sample prediction, conditioning and classifier-free guidance;
- :class:`ScoreSdeScore`: score_sde networks (VE, VP, sub-VP) and :func:`load_score_sde_checkpoint`.

:func:`from_pipeline` (alias :func:`adapter_for`) picks the right one for a loaded diffusers pipeline;
:func:`decode_latents` decodes a latent model's samples with the pipeline's VAE.
"""

from __future__ import annotations

from typing import Any

from .common import ScoreAdapter
from .diffusers_ve import DiffusersVEScore
from .diffusers_vp import PREDICTION_TYPES, DiffusersVPScore, decode_latents, rescale_noise_cfg
from .score_sde import SDES, ScoreSdeScore, load_score_sde_checkpoint

__all__ = ["ScoreAdapter", "DiffusersVEScore", "DiffusersVPScore", "ScoreSdeScore", "from_pipeline", "adapter_for",
           "decode_latents", "load_score_sde_checkpoint", "rescale_noise_cfg", "PREDICTION_TYPES", "SDES"]


def from_pipeline(pipe: Any, **kwargs: Any) -> ScoreAdapter:
    """The VE score adapter for a loaded diffusers pipeline, from its denoiser and scheduler config.

    - VE (:class:`DiffusersVEScore`): the scheduler is a ``ScoreSdeVeScheduler``, or the denoiser has
      ``time_embedding_type="fourier"`` (then pass ``sigma_min`` / ``sigma_max`` unless the scheduler has them);
    - otherwise VP (:class:`DiffusersVPScore`) with the scheduler's ``alphas_cumprod`` and ``prediction_type``.

    The denoiser is ``pipe.unet``, else ``pipe.transformer``. ``kwargs`` go to the adapter (e.g. ``guidance_scale``,
    ``cond_kwargs``, ``uncond_kwargs``; for VE ``sigma_min`` / ``sigma_max`` override the scheduler's).
    """
    model = getattr(pipe, "unet", None)
    model = model if model is not None else getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"{type(pipe).__name__} has neither a .unet nor a .transformer: build the adapter from its "
                         "denoiser directly (DiffusersVPScore(model, scheduler) or DiffusersVEScore(model, sigma_min, "
                         "sigma_max)).")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no .scheduler: the adapter needs the training schedule; build it "
                         "directly with DiffusersVPScore(model, alphas_cumprod) or DiffusersVEScore.")
    scheduler_config = getattr(scheduler, "config", {})
    fourier = getattr(getattr(model, "config", None), "time_embedding_type", None) == "fourier"
    if type(scheduler).__name__ == "ScoreSdeVeScheduler" or fourier:
        sigma_min = kwargs.pop("sigma_min", scheduler_config.get("sigma_min"))
        sigma_max = kwargs.pop("sigma_max", scheduler_config.get("sigma_max"))
        if sigma_min is None or sigma_max is None:
            raise ValueError(f"{type(pipe).__name__} has a VE (fourier) denoiser but its {type(scheduler).__name__} "
                             "config has no sigma_min / sigma_max: pass from_pipeline(pipe, sigma_min=..., "
                             "sigma_max=...) with the model's trained range.")
        return DiffusersVEScore(model, sigma_min, sigma_max, **kwargs)
    return DiffusersVPScore(model, scheduler, **kwargs)


#: Alias of :func:`from_pipeline`.
adapter_for = from_pipeline
