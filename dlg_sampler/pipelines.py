"""DLG inside diffusers pipelines (docs/design.md, *Inside diffusers*, routes 3 and 4).

- :class:`DLGScheduler`: a drop-in scheduler for the unconditional pipelines whose loop is "call the model, then
  ``scheduler.step``" (``DDPMPipeline``, ``DDIMPipeline``, ``ScoreSdeVePipeline``):
  ``pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=...)``; ``pipe(batch_size=B, num_inference_steps=N)``
  then returns DLG samples with ``N`` network evaluations per sample, chains persisting across calls (their one-time
  warm-up is counted on top in ``.stats``).
- :class:`DLGPipeline`: conditional and latent pipelines (Stable-Diffusion-style text-to-image with
  classifier-free guidance, DiT-style class-conditional), whose loops double the batch and guide outside the
  scheduler, so a scheduler alone cannot run DLG in them: ``DLGPipeline.from_pipe(pipe, classifier=...)`` reuses
  the pipeline's components (prompt encoding, guided denoiser through the adapters, VAE decode) and returns the
  pipeline's usual output.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_sde_ve import SdeVeOutput

from .classifier import NoiseClassifier, load_classifier
from .levels import NoiseLevels
from .integrators import INTEGRATORS, check_steps, steps_for_nfe
from .sampler import KERNELS, DLGSampler, check_batch_size

#: Pipelines whose own ``__call__`` runs with :class:`DLGScheduler`.
SCHEDULER_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "ScoreSdeVePipeline")
#: Where ``DLGScheduler.save_pretrained`` puts a local classifier, relative to the saved folder.
CLASSIFIER_SUBFOLDER = "classifier"


def _resolve_classifier(classifier: NoiseClassifier | str | Path | None) -> tuple[NoiseClassifier | None, str | None]:
    """A classifier instance and the reference stored in a config (its absolute path / repo id, if it came as one);
    ``(None, None)`` without one (the restart kernel needs none; the Gibbs kernel says so)."""
    if isinstance(classifier, NoiseClassifier):
        return classifier, None
    if classifier is None:
        return None, None
    local = Path(classifier).expanduser()
    return load_classifier(classifier), str(local.resolve()) if local.is_dir() else str(classifier)


def _check_unconditional(pipe: Any) -> None:
    name = type(pipe).__name__
    conditional = any(getattr(pipe, c, None) is not None for c in ("text_encoder", "vae", "transformer"))
    if conditional or name not in SCHEDULER_PIPELINES:
        raise ValueError(f"{name} cannot run DLG through its scheduler (its loop guides, doubles the batch or decodes "
                         f"latents outside the scheduler; DLGScheduler serves {', '.join(SCHEDULER_PIPELINES)}): use "
                         "DLGPipeline.from_pipe(pipe, classifier=...) instead.")


def is_text_to_image(pipe: Any) -> bool:
    """Whether ``pipe`` is a Stable-Diffusion-style text-to-image pipeline (a text encoder and ``encode_prompt``)."""
    return getattr(pipe, "text_encoder", None) is not None and hasattr(pipe, "encode_prompt")


def default_guidance_scale(pipe: Any) -> float:
    """The guidance scale ``pipe(...)`` uses when none is given (Stable Diffusion: 7.5), else 1 (no guidance)."""
    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return float(param.default) if param is not None and isinstance(param.default, (int, float)) else 1.0


def text_conditions(pipe: Any, prompts: list[str], negative_prompts: list[str | None] | None, guidance_scale: float,
                    device: torch.device | str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """The conditioning of each prompt as the pipeline encodes it (its own ``encode_prompt``): one
    ``(cond_kwargs, uncond_kwargs)`` per prompt for :class:`~dlg_sampler.adapters.DiffusersVPScore`, with
    ``encoder_hidden_states`` ``[1, tokens, dim]``; ``uncond_kwargs`` (the negative prompt, default empty) only with
    classifier-free guidance (``guidance_scale > 1``)."""
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{type(pipe).__name__} takes no prompt (no encode_prompt).")
    cfg, out = guidance_scale > 1.0, []
    for p, n in zip(prompts, negative_prompts or [None] * len(prompts)):
        encoded = pipe.encode_prompt(p, device, 1, cfg, negative_prompt=n)
        if len(encoded) != 2:
            raise ValueError(f"{type(pipe).__name__}.encode_prompt returns {len(encoded)} tensors; dlg-sampler "
                             "supports Stable-Diffusion-1/2-style pipelines (prompt and negative embeddings).")
        cond, uncond = encoded
        out.append(({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond} if cfg else None))
    return out


#: What ``DLGSampler`` uses for a setting left out (``None`` in the pipelines' settings).
SAMPLER_DEFAULTS = {k: p.default for k, p in inspect.signature(DLGSampler).parameters.items()
                    if p.default is not inspect.Parameter.empty}


def _gibbs_per_output(kernel: str, gibbs_steps: int | None) -> int:
    """Gibbs steps each output pays for (none with the restart kernel)."""
    return (gibbs_steps or SAMPLER_DEFAULTS["gibbs_steps"]) if kernel == "gibbs" else 0


def _whole_cost(samplers: Iterable[DLGSampler], returned: int | None = None, **own_calls: int) -> dict[str, Any]:
    """Every model evaluation of ``samplers`` (warm-ups included) and the pipeline's ``own_calls`` (by name) over
    the samples returned (default: the samplers' own count): ``nfe_per_sample`` first, then ``nfe_split`` (per
    phase, per sample), ``model_evaluations`` and ``samples``."""
    evaluations, split, samples = sum(own_calls.values()), dict(own_calls), 0
    for sampler in samplers:
        st = sampler.stats
        evaluations += st["model_evaluations"]
        samples += st["samples"]
        for phase, per_sample in st["nfe_split"].items():
            split[phase] = split.get(phase, 0) + (round(per_sample * st["samples"]) if st["samples"] else 0)
    returned = samples if returned is None else returned
    per = (lambda v: v / returned) if returned else (lambda v: float("nan"))
    return {"nfe_per_sample": per(evaluations), "nfe_split": {k: per(v) for k, v in split.items()},
            "model_evaluations": evaluations, "samples": returned}


def _grid_and_shape(classifier: NoiseClassifier | None, score: Any, model: Any) -> tuple[NoiseLevels, tuple[int, ...]]:
    """The noise grid and sample shape a sampler runs on: the classifier's (checked against the model's trained
    range), or without one the model's trained range and its config's sample shape."""
    if classifier is not None:
        classifier.levels.check_covers(score.sigma_min, score.sigma_max)
        return classifier.levels, tuple(classifier.sample_shape)
    size = model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return NoiseLevels(score.sigma_min, score.sigma_max), (model.config.in_channels, *size)


def _new_sampler(score: Any, classifier: NoiseClassifier | None, levels: NoiseLevels, shape: tuple[int, ...], *,
                 budget: int, num_samples: int | None, default_chains: int, **settings: Any) -> DLGSampler:
    """One set of chains for a pipeline. Given ``num_samples`` (the samples the user plans to draw from these
    chains), :meth:`DLGSampler.for_budget`'s route: ``num_samples / 20`` chains (more below 2000, to fill the
    model's calls) unless ``num_chains`` is given and,
    for the restart kernel without a ``restart_sigma``, ``S`` (12 x the data scale) checked by a pilot on the model
    of at most 5% of the run at ``budget`` evaluations per sample, counted in ``.stats``. Otherwise the settings as given, the sampler's
    defaults where ``None`` and ``default_chains`` chains."""
    settings = {k: v for k, v in settings.items() if v is not None}
    if num_samples is not None:
        return DLGSampler.for_budget(score, classifier, shape=shape, nfe=budget, n=num_samples, levels=levels,
                                     **settings)
    settings.setdefault("num_chains", default_chains)
    return DLGSampler(score, classifier, levels, shape=shape, **settings)


#: ``DLGPipeline``'s chains per condition when neither ``num_chains`` nor ``num_samples`` is given.
DEFAULT_PIPELINE_CHAINS = 16


class DLGScheduler(SchedulerMixin, ConfigMixin):
    """Drop-in DLG for ``DDPMPipeline``, ``DDIMPipeline`` and ``ScoreSdeVePipeline``.

    The pipeline's loop makes exactly two model calls per sample, and both are used and counted:

    1. timestep ``T`` on the pipeline's own starting noise. A call on pure noise carries nothing the persistent
       chains need, so it is counted in the budget as the price of running inside the pipeline's loop (the
       :class:`DLGSampler` API and :class:`DLGPipeline` do not pay it); its ``step`` runs the DLG batch with the
       bound model: the chain move (the restart lift, or Gibbs steps and selection), denoising down to the model's
       lowest level, and returns the states there.
    2. timestep 0 on those states: the **Tweedie step**, computed from the pipeline's own model output.

    ``num_inference_steps`` is the budget of model calls per output: ``1 + denoising + 1`` (restart kernel; the
    Gibbs kernel adds ``gibbs_steps``); the denoising steps are the most that fit. The chains persist across calls
    (one set per batch size), so the one-time warm-up is paid by the first call: ``.stats["nfe_per_sample"]``
    counts it, with the first calls, over every sample returned.

    Saving: ``save_pretrained(folder)`` (also through ``pipe.save_pretrained``) writes the settings, the model's
    original schedule and the classifier reference. A Hub repo id is stored as it is; a local classifier (a folder
    or an instance) is saved into ``folder/classifier`` and stored as ``"classifier"``, relative to the saved
    folder, so the folder is complete and portable, like a pipeline folder (move it, push it). ``from_pretrained``
    resolves that reference against the folder it reads; then call ``.bind(pipe.unet)``. To use another classifier,
    make a new one: ``DLGScheduler.from_pipe(pipe, classifier=...)`` (it keeps the model's original schedule).

    Args:
        classifier: noise classifier folder or Hub repo id, needed by the Gibbs kernel only (what
            ``save_pretrained`` stores: the repo id, or ``"classifier"`` relative to the saved folder); ``from_pipe``
            also takes an instance.
        kernel, restart_sigma, integrator, step_size, gibbs_steps, num_chains, seed, warmup_steps: the
            :class:`DLGSampler` settings; ``None`` takes the sampler's own default (``restart_sigma``: from the
            warm-up's data scale; ``num_chains``: the batch size).
        num_samples: the samples you plan to draw per batch size. Given, the chains follow
            :meth:`DLGSampler.for_budget` at ``num_inference_steps`` per sample: ``num_samples / 20`` chains (more
            below 2000, to fill the model's calls) unless
            ``num_chains`` is given and, with ``restart_sigma`` left out, ``S`` checked by a pilot of at most 5% of the
            run (counted in ``.stats``, the choice in ``.stats["tuning"]``).
        base_scheduler: the pipeline's original scheduler (``{"class_name": ..., "config": {...}}``), recorded by
            ``from_pipe``: it defines the model's noise schedule.
        correct_steps: 0, so ``ScoreSdeVePipeline`` makes no corrector calls.
        max_batch_size: the most samples DLG's own model calls (warm-up, pilot, chain moves, denoising) hand the
            model at once (``None``: all the chains); the pipeline's own two calls per sample see its ``batch_size``,
            which you choose in ``pipe(batch_size=...)``.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, classifier: str | None = None, kernel: str = "restart", restart_sigma: float | None = None,
                 integrator: str = "unipc", step_size: float | None = None, gibbs_steps: int | None = None,
                 num_chains: int | None = None, seed: int = 0, warmup_steps: int | None = None,
                 num_samples: int | None = None, base_scheduler: dict | None = None, correct_steps: int = 0,
                 max_batch_size: int | None = None):
        if integrator not in INTEGRATORS:
            raise ValueError(f"unknown integrator {integrator!r}: DLGScheduler uses one of {sorted(INTEGRATORS)}.")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
        if num_samples is not None:
            check_steps(num_samples, "num_samples (the samples you plan to draw per batch size)")
        check_batch_size(max_batch_size)
        self.score, self.classifier = None, None
        self.samplers: dict[int, DLGSampler] = {}
        self._pending: dict[int, torch.Tensor] = {}  # denoised states awaiting their Tweedie step, per batch size
        self._returned = 0  # samples handed back to the pipeline
        self.timesteps = torch.tensor([0])
        self.sigmas = torch.tensor([1.0])
        self.num_inference_steps: int | None = None
        self.denoise_steps: int | None = None
        self.init_noise_sigma = 1.0
        self._step_index = 0
        self._first_calls = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pipe(cls, pipe: Any, classifier: NoiseClassifier | str | Path | None = None, **kwargs: Any) -> "DLGScheduler":
        """``pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=...)`` for an unconditional pipeline; on a pipeline
        that already has a DLGScheduler, its settings are kept unless ``kwargs`` change them."""
        _check_unconditional(pipe)
        base = pipe.scheduler
        if isinstance(base, DLGScheduler):  # e.g. a saved DLG pipeline reloaded: its settings and schedule go on
            settings = inspect.signature(cls.__init__).parameters
            kwargs = {**{k: v for k, v in base.config.items() if k in settings and k != "classifier"}, **kwargs}
            classifier = classifier if classifier is not None else base.config.classifier
        else:
            kwargs["base_scheduler"] = {"class_name": type(base).__name__, "config": dict(base.config)}
        instance, ref = _resolve_classifier(classifier)
        scheduler = cls(classifier=ref, **kwargs)
        scheduler.bind(pipe.unet, instance)
        return scheduler

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs: Any):
        """``SchedulerMixin.from_pretrained``, with a classifier reference relative to the saved folder resolved
        against it (a Hub repo id is kept). The model is not stored: call ``.bind(pipe.unet)`` next."""
        out = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                      return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = out[0] if return_unused_kwargs else out
        ref = scheduler.config.classifier
        folder = Path(pretrained_model_name_or_path or ".") / (subfolder or "")
        if ref is not None and (folder / ref).is_dir():
            scheduler.register_to_config(classifier=str((folder / ref).resolve()))
        return out

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Save the config into ``save_directory``; a local classifier goes into ``save_directory/classifier`` and is
        referenced relative to the folder (a Hub repo id is stored as is). ``kwargs`` as ``SchedulerMixin``'s."""
        ref = self.config.classifier
        local = ref is None or Path(ref).expanduser().is_absolute() or Path(ref).expanduser().exists()
        if local and (ref is not None or self.classifier is not None):  # an instance or a folder (from_pipe and from_pretrained store absolute paths): saved inside
            classifier = self.classifier if self.classifier is not None else load_classifier(ref)
            classifier.save_pretrained(Path(save_directory) / CLASSIFIER_SUBFOLDER)
            ref = CLASSIFIER_SUBFOLDER
        current = self.config.classifier
        self.register_to_config(classifier=ref)
        try:
            super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            self.register_to_config(classifier=current)

    def _base(self):
        import diffusers

        spec = self.config.base_scheduler
        if not spec:
            raise ValueError("this DLGScheduler has no base_scheduler (the model's noise schedule): create it with "
                             "DLGScheduler.from_pipe(pipe, classifier=...).")
        return getattr(diffusers, spec["class_name"]).from_config(spec["config"])

    def bind(self, model: Any, classifier: NoiseClassifier | None = None) -> "DLGScheduler":
        """Attach the denoiser (``pipe.unet``) and the classifier (default: ``config.classifier``)."""
        from .adapters import DiffusersVEScore, DiffusersVPScore

        base = self._base()
        self.vp = type(base).__name__ != "ScoreSdeVeScheduler"
        self.score = DiffusersVPScore(model, base) if self.vp else DiffusersVEScore.from_scheduler(model, base)
        self.classifier = classifier if classifier is not None else _resolve_classifier(self.config.classifier)[0]
        self.levels, self.sample_shape = _grid_and_shape(self.classifier, self.score, model)
        self.samplers, self._pending, self._first_calls, self._returned = {}, {}, 0, 0
        self.num_train_timesteps = base.config.get("num_train_timesteps", 1000)
        self.init_noise_sigma = 1.0 if self.vp else self.score.sigma_max
        return self

    def _sampler(self, batch: int, device: torch.device) -> DLGSampler:
        if batch not in self.samplers:
            c = self.config
            self.samplers[batch] = _new_sampler(
                self.score, self.classifier, self.levels, self.sample_shape, budget=self.num_inference_steps,
                num_samples=c.num_samples, default_chains=batch, num_chains=c.num_chains,
                kernel=c.kernel, integrator=c.integrator, denoise_steps=self.denoise_steps, seed=c.seed,
                tweedie_sigma=self.score.sigma_min, device=device, restart_sigma=c.restart_sigma,
                step_size=c.step_size, gibbs_steps=c.gibbs_steps, warmup_steps=c.warmup_steps,
                max_batch_size=c.max_batch_size, warmup_outputs=False)  # the pipeline Tweedie-steps every output
        sampler = self.samplers[batch]
        sampler.denoise_steps = self.denoise_steps
        return sampler

    # ------------------------------------------------------------------ the pipeline's interface
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs: Any) -> None:
        """Two model calls: timestep ``T`` (the pipeline's starting noise) then 0 (the Tweedie step)."""
        if self.score is None:
            raise ValueError("DLGScheduler is not bound to a model: assign pipe.scheduler = "
                             "DLGScheduler.from_pipe(pipe, classifier=...) (not DLGScheduler() or from_pretrained alone; "
                             "after from_pretrained call .bind(pipe.unet)).")
        gibbs = _gibbs_per_output(self.config.kernel, self.config.gibbs_steps)
        budget = int(num_inference_steps) - 1 - gibbs  # minus the first call and the Gibbs steps
        steps = steps_for_nfe(self.config.integrator, budget, dlg=True) if budget > 0 else None
        if steps is None:
            minimum = 1 + gibbs + min(n for n in range(2, 10) if steps_for_nfe(self.config.integrator, n, dlg=True))
            raise ValueError(f"num_inference_steps={num_inference_steps} is below DLGScheduler's minimum {minimum} "
                             f"(1 pipeline call + {f'{gibbs} Gibbs + ' if gibbs else ''}denoising + Tweedie): raise "
                             f"it{' or lower gibbs_steps' if gibbs else ''}.")
        self.num_inference_steps, self.denoise_steps = int(num_inference_steps), steps
        top = self.num_train_timesteps - 1 if self.vp else 1.0
        self.timesteps = torch.tensor([top, 0], device=device)
        self.set_sigmas(num_inference_steps)
        self._step_index = 0

    def set_sigmas(self, num_inference_steps: int, *args: Any, **kwargs: Any) -> None:
        """VE pipelines read ``sigmas[i]`` as the model's noise level of call ``i``."""
        self.sigmas = torch.tensor([self.score.sigma_max, self.score.sigma_min])

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, **kwargs: Any):
        """Call 1: run the DLG batch, return its states at the lowest level. Call 2: the Tweedie step."""
        batch = sample.shape[0]
        if tuple(sample.shape[1:]) != tuple(self.sample_shape):
            raise ValueError(f"the pipeline samples shape {list(sample.shape[1:])} but this scheduler was bound for "
                             f"{list(self.sample_shape)} (its model's, or its noise classifier's): bind the pipeline's "
                             "own model, or pass a classifier trained for it (dlg-train-classifier --model ...).")
        if self._step_index == 0:
            self._step_index = 1
            self._first_calls += batch
            x = self._dlg_states(batch, sample.device, generator)
            prev = x / (1 + self.score.sigma_min**2) ** 0.5 if self.vp else x
            self._pending[batch] = x
        else:
            x = self._pending.pop(batch)
            prev = self._tweedie(model_output, x)
            self._step_index = 0
            self._returned += batch
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SdeVeOutput(prev_sample=prev, prev_sample_mean=prev) if not self.vp else DDPMSchedulerOutput(prev_sample=prev)

    step_pred = step  # ScoreSdeVePipeline's name for its predictor step

    @torch.no_grad()
    def _dlg_states(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """Gibbs, selection and denoising for ``batch`` samples: states ``[batch, *shape]`` at ``sigma_min``."""
        sampler = self._sampler(batch, device)
        chunks, have = [], 0
        while have < batch:  # diverged chains are never emitted: top up from another batch
            x, sigma = sampler.gibbs_and_select(generator)
            chunks.append(sampler.denoise(x, sigma, generator, tweedie=False))
            have += len(chunks[-1])
        return torch.cat(chunks)[:batch]

    def _tweedie(self, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Tweedie step ``D = x + sigma^2 s`` from the pipeline's model output at the lowest level."""
        sigma = self.score.sigma_min
        out = model_output.to(x.dtype)
        if out.shape[1] == 2 * x.shape[1]:  # learned variance
            out = out[:, : x.shape[1]]
        self.samplers[x.shape[0]].record_tweedie(x.shape[0])
        if not self.vp:
            return x + sigma**2 * out
        sqrt_abar = (1 + sigma**2) ** -0.5
        prediction = self.score.prediction_type
        if prediction == "sample":
            return out
        if prediction == "v_prediction":
            out = sqrt_abar * (out + sigma * x * sqrt_abar)
        return x - sigma * out  # x + sigma^2 (-eps / sigma)

    @property
    def stats(self) -> dict[str, Any]:
        """The whole cost first: ``nfe_per_sample`` is every model call (the pipeline's first calls, the warm-ups,
        the chain moves, denoising and the pipeline's Tweedie calls) over the samples returned to the pipeline;
        ``nfe_split`` the same per phase; then, per batch size, the chains' settings and mixing."""
        return {**_whole_cost(self.samplers.values(), self._returned, pipeline_first_call=self._first_calls),
                "kernel": self.config.kernel,
                "restart_sigma": {b: s.restart_sigma for b, s in self.samplers.items()},
                "tuning": {b: s.tuning for b, s in self.samplers.items() if s.tuning is not None},
                "chains": {b: s.num_chains for b, s in self.samplers.items()},
                "lag1_autocorr": {b: s.stats["lag1_autocorr"] for b, s in self.samplers.items()},
                "warmup_nfe_per_chain": {b: s.stats["warmup_nfe_per_chain"] for b, s in self.samplers.items()}}

    def __len__(self) -> int:
        return self.num_train_timesteps


class DLGPipeline:
    """DLG for conditional and latent diffusers pipelines, reusing the pipeline's components.

    ``DLGPipeline.from_pipe(pipe, classifier=...)`` for Stable-Diffusion-style text-to-image (``encode_prompt``,
    classifier-free guidance, VAE), DiT-style class-conditional (``transformer`` + ``class_labels``, null class for
    guidance) and unconditional pipelines. ``__call__`` returns the pipeline's usual ``.images`` output (PIL / np /
    pt). Chains persist per condition (prompt, negative prompt, class, guidance scale); the noise classifier works on
    the model's samples (latents for latent models). ``.stats`` leads with the whole cost per image, the warm-ups
    included.

    Args:
        pipe, classifier: the loaded pipeline and a noise classifier for its model (needed by the Gibbs kernel only;
            without one the restart kernel runs on the model's trained noise range).
        kernel, restart_sigma, integrator, num_chains, seed: :class:`DLGSampler` settings (``restart_sigma=None``:
            from the warm-up's data scale; ``num_chains=None``: 16 per condition); ``sampler_kwargs``: any other
            (``step_size``, ``gibbs_steps`` for the Gibbs kernel, ``warmup_steps`` ...), the sampler's own defaults
            where left out.
        num_samples: the images you plan to draw per condition. Given, each condition's chains follow
            :meth:`DLGSampler.for_budget` at ``num_inference_steps`` per image: ``num_samples / 20`` chains (more
            below 2000, to fill the model's calls) unless
            ``num_chains`` is given and, with ``restart_sigma`` left out, ``S`` checked by a pilot of at most 5% of the
            run (counted in ``.stats``, the choice in ``.stats["tuning"]``).
        max_batch_size: the most samples the denoiser sees in one call (``None``: all of a condition's chains at
            once); a guided evaluation counts twice (its doubled batch), so ``max_batch_size=16`` evaluates 8 chains
            per call with classifier-free guidance. The VAE decodes at most this many latents at once.
    """

    def __init__(self, pipe: Any, classifier: NoiseClassifier | None = None, *, kernel: str = "restart",
                 restart_sigma: float | None = None, integrator: str = "unipc", num_chains: int | None = None,
                 seed: int = 0, num_samples: int | None = None, max_batch_size: int | None = None,
                 **sampler_kwargs: Any):
        if num_samples is not None:
            check_steps(num_samples, "num_samples (the images you plan to draw per condition)")
        self.pipe, self.classifier, self.num_samples = pipe, classifier, num_samples
        self.max_batch_size = check_batch_size(max_batch_size)
        self.settings = dict(kernel=kernel, restart_sigma=restart_sigma, integrator=integrator, num_chains=num_chains,
                             seed=seed, max_batch_size=max_batch_size, **sampler_kwargs)
        self.samplers: dict[tuple, DLGSampler] = {}
        model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if model is None:
            raise ValueError(f"{type(pipe).__name__} has neither .unet nor .transformer: DLGPipeline needs a denoiser.")
        self.model = model
        size = model.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (model.config.in_channels, *size)
        if classifier is not None and tuple(classifier.sample_shape) != self.shape:
            raise ValueError(f"the classifier is for samples {list(classifier.sample_shape)} but this model samples "
                             f"{list(self.shape)} ({'latents' if getattr(pipe, 'vae', None) else 'images'}): train "
                             "one on the model's samples (dlg-train-classifier --model ...).")

    @classmethod
    def from_pipe(cls, pipe: Any, classifier: NoiseClassifier | str | Path | None = None, **kwargs: Any) -> "DLGPipeline":
        """Wrap a loaded diffusers pipeline; ``kwargs`` are DLG settings (``kernel``, ``num_chains`` ...)."""
        return cls(pipe, _resolve_classifier(classifier)[0], **kwargs)

    def _conditions(self, prompt, negative_prompt, class_labels, guidance_scale: float, device) -> list[tuple]:
        """One ``(key, cond_kwargs, uncond_kwargs)`` per condition."""
        pipe, cfg = self.pipe, guidance_scale > 1.0
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = [negative_prompt] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
                else list(negative_prompt)
            return [((p, n), cond, uncond) for p, n, (cond, uncond)
                    in zip(prompts, negatives, text_conditions(pipe, prompts, negatives, guidance_scale, device))]
        if class_labels is not None:
            labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
            null = getattr(self.model.config, "num_embeds_ada_norm", None) or getattr(self.model.config, "num_class_embeds", None)
            if cfg and null is None:
                raise ValueError("classifier-free guidance needs the model's null class (num_embeds_ada_norm); pass "
                                 "guidance_scale=1.")
            return [(("class", c), {"class_labels": torch.tensor([c], device=device)},
                     {"class_labels": torch.tensor([null], device=device)} if cfg else None) for c in labels]
        if cfg:
            raise ValueError("guidance_scale > 1 needs a condition (prompt= or class_labels=).")
        return [(("unconditional",), {}, None)]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
                 class_labels: int | list[int] | None = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                 num_inference_steps: int = 10, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate ``num_images_per_prompt`` images per condition with ``num_inference_steps`` guided model
        evaluations per image (denoising + Tweedie, and the Gibbs steps of the Gibbs kernel; a guided evaluation is
        one doubled-batch call). The one-time warm-up of each condition's chains comes on top: see ``.stats``."""
        from .adapters import DiffusersVPScore, decode_latents

        device = self.model.device
        integrator = self.settings["integrator"]
        gibbs = _gibbs_per_output(self.settings["kernel"], self.settings.get("gibbs_steps"))
        steps = steps_for_nfe(integrator, num_inference_steps - gibbs, dlg=True) if num_inference_steps > gibbs \
            else None
        if steps is None:
            raise ValueError(f"num_inference_steps={num_inference_steps} leaves no room for {integrator} denoising "
                             f"and the Tweedie step{f' after {gibbs} Gibbs steps' if gibbs else ''}: raise it"
                             f"{' or lower gibbs_steps' if gibbs else ''}.")
        latents = []
        for key, cond, uncond in self._conditions(prompt, negative_prompt, class_labels, guidance_scale, device):
            key = (*key, guidance_scale, guidance_rescale)
            if key not in self.samplers:
                score = DiffusersVPScore(self.model, self.pipe.scheduler, guidance_scale=guidance_scale,
                                         guidance_rescale=guidance_rescale, cond_kwargs=cond, uncond_kwargs=uncond)
                levels, _ = _grid_and_shape(self.classifier, score, self.model)
                self.samplers[key] = _new_sampler(score, self.classifier, levels, self.shape,
                                                  budget=num_inference_steps, num_samples=self.num_samples,
                                                  default_chains=DEFAULT_PIPELINE_CHAINS, denoise_steps=steps,
                                                  device=device, **self.settings)
            sampler = self.samplers[key]
            sampler.denoise_steps = steps
            latents.append(sampler.sample(num_images_per_prompt, generator))
        x = torch.cat(latents)
        vae = getattr(self.pipe, "vae", None)
        images = torch.cat([decode_latents(vae, z) for z in x.split(self.max_batch_size or max(len(x), 1))]) \
            if vae is not None else x.clamp(-1, 1)
        processor = getattr(self.pipe, "image_processor", None)
        if processor is not None:
            images = processor.postprocess(images, output_type=output_type)
        else:
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).float().cpu().numpy()
                images = self.pipe.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @property
    def stats(self) -> dict[str, Any]:
        """The whole cost first: ``nfe_per_sample`` is every guided model evaluation (warm-ups included) over the
        images returned, over all conditions; ``nfe_split`` per phase; then each condition's chains' mixing."""
        return {**_whole_cost(self.samplers.values()), "kernel": self.settings["kernel"],
                "restart_sigma": {k: s.restart_sigma for k, s in self.samplers.items()},
                "tuning": {k: s.tuning for k, s in self.samplers.items() if s.tuning is not None},
                "lag1_autocorr": {k: s.stats["lag1_autocorr"] for k, s in self.samplers.items()}}
