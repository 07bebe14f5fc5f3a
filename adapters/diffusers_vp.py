"""Discrete-time VP diffusers models (DDPM/DDIM-trained ``UNet2DModel``, ``UNet2DConditionModel``, DiT-style
transformers) as VE scores, with conditioning and classifier-free guidance; VAE decoding for latent models."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .common import ScoreAdapter, append_dims, check_channels, concat_batches, expand_batch, interp, model_dtype

#: Model outputs the VP adapter converts (diffusers' ``prediction_type`` values).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alphas_cumprod_of(schedule: Any) -> torch.Tensor:
    """The training table ``alphas_cumprod [T]`` of a scheduler (or the table itself), float64 on the CPU.

    A scheduler without the attribute but with a beta schedule in its config gets it from
    ``DDPMScheduler.from_config(scheduler.config)`` (same betas, same table).
    """
    if isinstance(schedule, (torch.Tensor, list, tuple)) or hasattr(schedule, "__array__"):
        return torch.as_tensor(schedule).detach().to("cpu", torch.float64)
    table = getattr(schedule, "alphas_cumprod", None)
    config = getattr(schedule, "config", None)
    if table is None and isinstance(config, Mapping) and "beta_schedule" in config:
        from diffusers import DDPMScheduler

        table = DDPMScheduler.from_config(config).alphas_cumprod
    if table is None:
        raise ValueError(
            f"{type(schedule).__name__} has no alphas_cumprod and no beta schedule in its config: the VP adapter "
            "needs the model's discrete training table. Pass alphas_cumprod=... of the schedule the model was "
            "trained with (e.g. DDPMScheduler(beta_schedule='linear').alphas_cumprod). Models with a "
            "ScoreSdeVeScheduler take DiffusersVEScore; flow-matching models (FlowMatch* schedulers) are not VP "
            "diffusion models and have no VE score adapter here.")
    return torch.as_tensor(table).detach().to("cpu", torch.float64)


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE levels ``sigma_t = sqrt((1 - abar_t) / abar_t)`` of a VP table, ``[T'] `` float64.

    Kept: the longest prefix that is finite and strictly increasing. A zero-terminal-SNR schedule
    (``abar_T = 0``, infinite ``sigma_T``) loses its last entry; diffusers' Euler schedulers store ``2^-24``
    there instead, which breaks monotonicity and is dropped the same way.
    """
    abar = alphas_cumprod.to(torch.float64)
    sigmas = ((1 - abar) / abar).sqrt()
    ok = torch.isfinite(sigmas) & (sigmas > 0)
    ok[1:] &= sigmas[1:] > sigmas[:-1]
    n = int(ok.long().cumprod(0).sum())
    if n < 2:
        raise ValueError("alphas_cumprod must decrease from below 1 over at least two timesteps (a VP training "
                         f"table); got {alphas_cumprod[:4].tolist()}...")
    return sigmas[:n]


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    section 3.4), as diffusers' ``rescale_noise_cfg``: match the per-sample std of the guided prediction to the
    conditional one's, then mix ``phi * rescaled + (1 - phi) * guided``. ``[B, ...]`` tensors."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


class DiffusersVPScore(ScoreAdapter):
    """A discrete-time VP diffusers model as a VE score.

    VP samples are scaled VE samples: ``x_t = sqrt(abar_t) (x_0 + sigma_t z)`` with
    ``sigma_t = sqrt((1 - abar_t) / abar_t)``. For a VE state ``x`` at level ``sigma``:

    - model input ``x_t = x / sqrt(1 + sigma^2)`` (``abar = 1 / (1 + sigma^2)``);
    - timestep: ``sigma`` located in the table ``sigma_t``, ``t = 0 .. T-1``, by linear interpolation in
      ``log sigma`` (a fractional timestep between entries; sinusoidal embeddings take any float);
    - model output -> VE score:

      - ``epsilon``: ``s = -eps / sigma``;
      - ``v_prediction``: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``, then ``s = -eps / sigma``;
      - ``sample``: the prediction ``x0`` is the same in both spaces, ``s = (x0 - x) / sigma^2``;
      - learned variance (output with ``2 C`` channels): the first ``C`` channels are the prediction.

    Classifier-free guidance: the conditional and unconditional branches run as one doubled batch and the
    *prediction* is guided before the conversion, ``pred = uncond + g (cond - uncond)``, optionally followed by
    diffusers' guidance rescale (:func:`rescale_noise_cfg` with ``guidance_rescale``), as diffusers' pipelines do.

    The trained range is the table's ``[sigma_0, sigma_{T-1}]`` (zero-terminal-SNR: up to the last finite
    level); levels outside are clamped with a warning once (see :mod:`dlg_sampler.adapters.common`).

    Args:
        model: a diffusers denoiser called as ``model(x_t, t, **kwargs, return_dict=False)[0]`` (``UNet2DModel``,
            ``UNet2DConditionModel``, DiT-style transformers). ``x`` must be on its device; inputs are cast to its
            dtype, outputs back to ``x``'s.
        schedule: the scheduler the model was trained with (its ``alphas_cumprod``) or the table ``[T]`` itself.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; default: the scheduler config's, else
            ``"epsilon"``.
        guidance_scale: classifier-free guidance scale ``g``; ``1`` runs the conditional branch only.
        guidance_rescale: ``phi`` in [0, 1] of diffusers' guidance rescale (0: off).
        cond_kwargs: keyword arguments of every model call (``encoder_hidden_states``, ``class_labels``,
            ``added_cond_kwargs`` ...); tensors with batch 1 are expanded to the batch.
        uncond_kwargs: what differs in the unconditional branch (e.g. ``encoder_hidden_states`` of the empty
            prompt); other keys are taken from ``cond_kwargs``. Required when ``guidance_scale != 1``.
    """

    def __init__(self, model: Any, schedule: Any, *, prediction_type: str | None = None, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0, cond_kwargs: Mapping[str, Any] | None = None,
                 uncond_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        config = getattr(schedule, "config", None)
        if prediction_type is None:
            prediction_type = config.get("prediction_type", "epsilon") if isinstance(config, Mapping) else "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}: the VP adapter converts "
                             f"{', '.join(PREDICTION_TYPES)}. Pass prediction_type= as the model was trained "
                             "(its scheduler config's prediction_type).")
        if guidance_scale != 1.0 and not uncond_kwargs:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional branch: pass uncond_kwargs "
                             "(e.g. uncond_kwargs={'encoder_hidden_states': negative_prompt_embeds}, the empty "
                             "prompt's embeddings), or guidance_scale=1.0.")
        extra = sorted(set(uncond_kwargs or {}) - set(cond_kwargs or {}))
        if extra:
            raise ValueError(f"uncond_kwargs has {extra} that cond_kwargs lacks: give the conditional branch's value "
                             "in cond_kwargs too (uncond_kwargs only overrides it).")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}.")
        self.model, self.prediction_type = model, prediction_type
        self.guidance_scale, self.guidance_rescale = float(guidance_scale), float(guidance_rescale)
        self.cond_kwargs = dict(cond_kwargs or {})
        self.uncond_kwargs = {**self.cond_kwargs, **(uncond_kwargs or {})}
        sigmas = vp_sigmas(alphas_cumprod_of(schedule))
        self._log_sigmas = sigmas.log()  # [T'] float64, increasing
        self._timesteps = torch.arange(len(sigmas), dtype=torch.float64)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    @property
    def samples_per_evaluation(self) -> int:
        """2 with classifier-free guidance (the conditional and unconditional branch in one doubled call), else 1."""
        return 1 if self.guidance_scale == 1.0 else 2

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timesteps ``[B]`` (float64) of VE levels ``sigma [B]`` (log-sigma interpolation)."""
        return interp(torch.as_tensor(sigma, dtype=torch.float64).log(), self._log_sigmas, self._timesteps)

    def prediction(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's (guided) prediction for VP samples ``x_t [B, C, ...]`` at timesteps ``t [B]``, ``x_t``'s dtype."""
        batch = x_t.shape[0]
        cond = expand_batch(self.cond_kwargs, batch)
        if self.guidance_scale == 1.0:
            return self._forward(x_t, t, cond)
        both = concat_batches(expand_batch(self.uncond_kwargs, batch), cond)
        uncond_out, cond_out = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        guided = uncond_out + self.guidance_scale * (cond_out - uncond_out)
        return rescale_noise_cfg(guided, cond_out, self.guidance_rescale) if self.guidance_rescale > 0 else guided

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """One model call: inputs in the model's dtype, learned-variance channels dropped, output in ``x_t``'s dtype."""
        dtype = model_dtype(self.model, x_t.dtype)
        out = self.model(x_t.to(dtype), t.to(x_t.device, torch.float32), **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned variance: [prediction, variance]
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)

    def model_score(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_channels(x, self.model)
        sqrt_abar = (1 + sigma**2).rsqrt()  # [B] float64
        x_t = x * append_dims(sqrt_abar.to(x.device, x.dtype), x.ndim)
        pred = self.prediction(x_t, self.timestep(sigma))
        sig = append_dims(sigma.to(x.device, x.dtype), x.ndim)
        if self.prediction_type == "sample":
            return (pred - x) / sig**2, sigma
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) (v + sigma x_t), as sqrt(1 - abar) = sigma sqrt(abar)
            pred = append_dims(sqrt_abar.to(x.device, x.dtype), x.ndim) * (pred + sig * x_t)
        return -pred / sig, sigma


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode VE latents (clean samples of a latent model) with the pipeline's VAE: images ``[B, 3, H, W]`` in [-1, 1].

    ``z = latents / scaling_factor (+ shift_factor where the config has one)``, then ``vae.decode(z)``, as diffusers'
    pipelines do; computed in the VAE's dtype, returned as float32 (``pipe.image_processor.postprocess`` takes it on
    to PIL).
    """
    config = vae.config
    z = latents / config.scaling_factor
    if config.get("shift_factor") is not None:
        z = z + config.shift_factor
    image = vae.decode(z.to(model_dtype(vae, latents.dtype)), return_dict=False)[0]
    return image.float().clamp(-1, 1)
