"""Denoising MCMC with persistent chains (Kim & Ye, "Denoising MCMC", ICML 2023): Denoising Langevin Gibbs and the
restart move."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from . import tuning
from .diagnostics import CORRELATION_WARNING, OutputCorrelation, ess_fraction
from .gibbs import SIGMA_MODES, NoisePosterior, diverged, langevin_step, sample_sigma_index
from .integrators import (FINAL_STEP, FINAL_STEPS, FIT_SAMPLES, FITTED, INTEGRATORS, SCHEDULES, CountedScore, Score,
                          append_dims, check_integrator, check_steps, count_nfe, fit_evaluations, fit_schedules,
                          get_schedule, integrate, ramp_end_keeping_last_level, randn_like)
from .levels import NoiseLevels
from .restart import GaussianFirstStep, restart_rule

#: Chain kernels: ``"restart"`` (exact lift to ``restart_sigma``, then the denoising solve back; the default, measured
#: to mix in one output on the digits model and the mixtures) and ``"gibbs"`` (the paper's Langevin-Gibbs sweeps).
KERNELS = ("restart", "gibbs")

#: The denoising solve's levels: ``None`` (the integrator's own ramp), a ramp of ``SCHEDULES``, or ``"fitted"``: fitted
#: once to the model for the restart kernel's interval ``[tweedie_sigma, restart_sigma]`` and the denoising steps
#: (:func:`dlg_sampler.integrators.fit_schedule`, counted as ``pilot``).
DENOISE_SCHEDULES = (None, *SCHEDULES, FITTED)

#: The fit's lift noise is seeded this far from the sampler's seed (its own stream: the run's draws stay the same).
FIT_SEED_OFFSET = 7919

#: Warm-started schedulers denoise the batch in this many groups of similar sigma (measured on the exact mixture,
#: levels 0.2-5, 4 steps: sliced W1 0.48 -> 0.14 for DPM-Solver++ 2M, 0.32 -> 0.09 for Euler; same NFE per sample).
SCHEDULER_GROUPS = 4

#: ``sample`` gives up with a clear error after this many batches in a row in which every chain diverged.
MAX_EMPTY_BATCHES = 3

#: Warn when the Gibbs kernel's chains sit above this fraction of the grid's log-range: the step size has pushed
#: the working level to the top of the grid, where denoising starts from nearly pure noise.
TOP_OF_GRID = 0.8


def _check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def check_batch_size(max_batch_size: int | None) -> int | None:
    """``None`` (every chain in one model call) or a positive int; anything else is refused."""
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size <= 0):
        raise ValueError(f"max_batch_size must be a positive int (samples per model call) or None, got "
                         f"{max_batch_size!r}: pass e.g. max_batch_size=256, less if the model runs out of memory.")
    return max_batch_size


class MicroBatched:
    """A model call ``fn(x [N, *shape], *per_sample) -> [N, ...]`` (a score ``fn(x, sigma [N])``, a noise posterior
    ``fn(x)``) made in consecutive slices, so that the network never sees more than ``max_batch_size`` samples in
    one call; the outputs are concatenated in order.

    A score with classifier-free guidance evaluates each sample twice in one doubled call
    (``fn.samples_per_evaluation == 2``): its slices hold ``max_batch_size // 2`` samples. Arguments with the batch
    dimension of ``x`` are sliced with it, others (a scalar ``sigma``) passed whole. Nothing random happens inside,
    so a sampler's draws do not depend on the slicing; the outputs are those of one call wherever the model computes
    each sample independently of its batch (exact scores; a network on a CPU may differ in the last bits). Every
    other attribute is ``fn``'s (``sigma_min``, ``sigma_max`` ...).
    """

    def __init__(self, fn, max_batch_size: int):
        self.fn, self.max_batch_size = fn, check_batch_size(max_batch_size)
        per = getattr(fn, "samples_per_evaluation", 1)
        self.slice = max_batch_size // per
        if self.slice < 1:
            raise ValueError(f"max_batch_size={max_batch_size} cannot hold one evaluation of this score: each makes "
                             f"a model call on {per} samples (classifier-free guidance: conditional and "
                             f"unconditional); pass max_batch_size >= {per}.")

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        n, b = x.shape[0], self.slice
        if n <= b:
            return self.fn(x, *args)
        sliced = [isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == n for a in args]
        return torch.cat([self.fn(x[i:i + b], *(a[i:i + b] if s else a for a, s in zip(args, sliced)))
                          for i in range(0, n, b)])

    def __getattr__(self, name: str) -> Any:
        if name == "fn":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)


def micro_batched(fn, max_batch_size: int | None):
    """``fn`` evaluated in slices of at most ``max_batch_size`` samples (:class:`MicroBatched`); ``None``: ``fn``."""
    return fn if check_batch_size(max_batch_size) is None else MicroBatched(fn, max_batch_size)


def _cloned_levels(fit: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """The level tensors of a ``schedule_fit``, copied (``longer`` absent in a state from before it: ``None``)."""
    longer = fit.get("longer")
    return {"levels": fit["levels"].clone(), "longer": None if longer is None else longer.clone()}


class _PhaseCounter:
    """The sampler's one view of the score: every evaluation (``x.shape[0]`` per call) is counted under the current
    phase (``warmup``, ``gibbs``, ``denoise``, ``tweedie``), so no model call can be left out of the reported NFE."""

    def __init__(self, score: Score, counts: dict[str, int], bar: tqdm | None = None):
        self.score, self.counts, self.phase, self.bar = score, counts, "warmup", bar
        for attr in ("sigma_min", "sigma_max"):
            if hasattr(score, attr):
                setattr(self, attr, getattr(score, attr))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.score(x, sigma)
        self.counts[self.phase] += x.shape[0]
        if self.bar is not None:
            self.bar.update(x.shape[0])
        return out


class DLGSampler:
    """Persistent chains ``(x, sigma)`` in the product space of data and noise level, each output denoised.

    Per output batch (one sample per chain), with ``kernel="restart"`` (default):

    1. **Warm-up** (once per chain, :meth:`warm_up`): integrate from pure noise at ``sigma_max`` (UniPC, 10 steps).
    2. **Restart move**: lift each chain exactly to ``S = restart_sigma``: ``x + sqrt(S^2 - sigma^2) z`` is a draw
       of ``p_S`` when ``x`` is a draw of ``p_sigma`` (the move of restart sampling, Xu et al. 2023).
    3. **Denoising** from ``S`` down to ``tweedie_sigma`` in ``denoise_steps`` steps, then the **Tweedie** step.
       The chain continues from its output, so consecutive outputs share only what survives the lift.

    With ``warmup_outputs=True`` each chain's warm-up solve is its first output (it is a sample of the warm-up
    solver, already paid for), and with ``extra_step_share`` a share of the output batches takes one denoising step
    more, so that a budget between two step counts is spent whole (:meth:`for_budget` sets both).

    With ``kernel="gibbs"`` (the paper's Denoising Langevin Gibbs, Algorithm 1):

    1. **Warm-up**: integrate from ``sigma_max``, perturb by ``warmup_noise``, classify, burn in with Gibbs sweeps.
    2. **Gibbs steps** (``gibbs_steps``): x | sigma by one Langevin step ``x + (eta/2) s + sqrt(eta) z``
       (``eta = step_size``); sigma | x from the noise posterior (argmax, or a draw with ``sigma_mode="sample"``).
    3. **Selection**: per chain, the state of this batch with the smallest sigma.
    4. **Denoising** from each chain's own selected sigma, then the **Tweedie** step ``D(x, s) = x + s^2 s(x, s)``.
       The chain continues from its last Gibbs state.

    Every model evaluation is counted: ``.stats["nfe_per_sample"]`` is all of them (warm-up included) over the
    samples returned, and ``.stats["lag1_autocorr"]`` says how much consecutive outputs of one chain share.

    Args:
        score: VE score ``score(x [B, *shape], sigma [B]) -> [B, *shape]`` (an adapter or any callable).
        noise_posterior: ``x [B, *shape] -> logits [B, L]`` over ``levels`` (e.g. a ``NoiseClassifier``); the
            Gibbs kernel draws sigma from it; the restart kernel needs none (``None``).
        levels: the noise grid of the posterior (without one: the model's trained range, e.g.
            ``NoiseLevels(score.sigma_min, score.sigma_max)``); its ``sigma_max`` is where the warm-up starts, its
            ``sigma_min`` the default Tweedie level.
        shape: sample shape, e.g. ``(1, 8, 8)``.
        num_chains: persistent chains (= samples per batch).
        kernel: ``"restart"`` or ``"gibbs"`` (see above).
        restart_sigma: the restart kernel's lift level ``S`` (default: set at the warm-up by
            :func:`~dlg_sampler.restart.restart_rule`, ``RESTART_SCALE`` times the data scale of the warmed-up chains,
            growing with ``denoise_steps`` beyond ``RULE_STEPS`` to twice that, or more where their spread sits in few
            directions). Higher decorrelates consecutive outputs more and needs more denoising steps.
        integrator, denoise_steps, integrator_kwargs: the denoising integrator, its steps and knobs. A diffusers
            scheduler instance is warm-started (in ``SCHEDULER_GROUPS`` groups of similar sigma for the Gibbs kernel;
            ``groups`` in ``integrator_kwargs`` overrides).
        gibbs_steps: Gibbs sweeps per batch (Gibbs kernel; paper: 10).
        step_size: Langevin step ``eta`` (Gibbs kernel; paper, CIFAR-10 in [0, 1]: 0.8); it sets the working level.
        sigma_mode: ``"argmax"`` (paper) or ``"sample"`` (Gibbs kernel).
        tweedie_sigma: level of the final Tweedie step (default: the grid's ``sigma_min``, the paper's 0.01); with
            ``final_step="solver"``, where the ramp ends (its last level, replaced by 0; ``for_budget``'s check
            offers it and 3x it, ``tuning.RAMP_ENDS``).
        final_step: how each solve ends (core integrators): ``"tweedie"`` (the paper's: to ``tweedie_sigma``, then
            the Tweedie step there) or ``"solver"`` (the Tweedie evaluation spent on one more solver level, whose
            last step to 0 uses the solver's own data prediction; same NFE). Default ``FINAL_STEP``.
        denoise_schedule: the denoising solve's levels (core integrators): ``None`` (the integrator's own ramp),
            ``"karras"``, ``"logsnr"`` or ``"fitted"`` (restart kernel): before the first output, the levels from
            ``restart_sigma`` to ``tweedie_sigma`` for ``denoise_steps`` steps (and ``denoise_steps + 1`` with
            ``extra_step_share``, from the same teacher solve) are fitted on the first ``fit_samples`` warmed-up
            chains lifted there (GITS-style: a fine teacher solve and dynamic programming,
            :func:`dlg_sampler.integrators.fit_schedules`), once for the run; its model evaluations are counted as
            ``pilot``. Other solves (warm-up, a ``for_budget`` pilot's ladder) keep the integrator's ramp.
        warmup_integrator, warmup_steps: the warm-up solve from ``sigma_max`` (default: ``unipc`` with 10 steps for
            the restart kernel; the paper's Karras Alg. 2 with 20 steps for the Gibbs kernel).
        burn_in: restart moves per chain after the warm-up whose outputs are discarded (restart kernel; on the
            digits model one such move changed nothing measurable, docs/mixing.md).
        warmup_outputs: restart kernel: return each chain's warm-up (after ``burn_in``) as its first output, from
            :meth:`step` / :meth:`sample` (chains warmed up again after diverging are not returned).
        extra_step_share: restart kernel, share in [0, 1) of the output batches denoised with ``denoise_steps + 1``
            steps, spread evenly (batch ``b`` is longer where ``floor((b + 1) * share)`` steps up); on a ramp
            ending with the solver's step to 0 the step goes inside it, the level left for 0 kept.
        gaussian_first_step: restart kernel, core integrators: each solve from ``restart_sigma`` takes its first
            evaluation from the posterior mean under a Gaussian with the chains' mean and covariance
            (:class:`~dlg_sampler.restart.GaussianFirstStep`) instead of the model: one model evaluation fewer per
            output (:meth:`for_budget` spends it on one more step).
        warmup_noise: std of the perturbation after the warm-up integration (Gibbs kernel; paper: 0.5).
        warmup_sweeps: ``(k1, k2)`` burn-in sweeps: ``k1`` at ``warmup_step_size`` then ``k2`` at ``step_size``.
        warmup_step_size: step size of the first burn-in sweeps (paper: 0.5; default: ``step_size``).
        seed: seed of the sampler's own generator (used when ``sample`` gets none; saved in ``state_dict``).
        device, dtype: where and in which precision the chains live (the model computes in its own dtype: load it in
            half precision, e.g. ``from_pretrained(..., torch_dtype=torch.bfloat16)``, and the adapters hand its
            outputs back in the chains' dtype).
        max_batch_size: the most samples the model sees in one call (``None``, the default: all the chains at once).
            Every model call (warm-up, a ``for_budget`` pilot, Gibbs, denoising, Tweedie, the noise posterior) is
            made in slices of at most this many samples (:class:`MicroBatched`; a score with classifier-free
            guidance counts its doubled batch); the chains stay in memory whole, and the random draws, hence the
            samples, do not depend on it.
        progress: show one tqdm bar (model evaluations, warm-up included) while sampling.
    """

    def __init__(self, score: Score, noise_posterior: NoisePosterior | None, levels: NoiseLevels, *,
                 shape: tuple[int, ...],
                 num_chains: int = 128, kernel: str = "restart", restart_sigma: float | None = None,
                 integrator="unipc", denoise_steps: int = 9, gibbs_steps: int = 10, step_size: float = 0.8,
                 sigma_mode: str = "argmax", tweedie_sigma: float | None = None, final_step: str = FINAL_STEP,
                 denoise_schedule: str | None = None, fit_samples: int = FIT_SAMPLES,
                 integrator_kwargs: dict[str, Any] | None = None, warmup_integrator: str | None = None,
                 warmup_steps: int | None = None, burn_in: int = 0, warmup_outputs: bool = False,
                 extra_step_share: float = 0.0, gaussian_first_step: bool = False, warmup_noise: float = 0.5,
                 warmup_sweeps: tuple[int, int] = (10, 10), warmup_step_size: float | None = None,
                 seed: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 max_batch_size: int | None = None, progress: bool = False):
        if not callable(score):
            raise TypeError(f"score must be callable as score(x, sigma), got {type(score).__name__}.")
        if noise_posterior is None and kernel == "gibbs":
            raise ValueError("the Gibbs kernel draws sigma | x from a noise posterior: pass a NoiseClassifier trained for "
                             "this model (dlg-train-classifier) or use kernel='restart', which needs none.")
        if noise_posterior is not None and not callable(noise_posterior):
            raise TypeError(f"noise_posterior must be callable as posterior(x) -> logits, got {type(noise_posterior).__name__}.")
        if not isinstance(levels, NoiseLevels):
            raise TypeError(f"levels must be a NoiseLevels, got {type(levels).__name__}.")
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError("shape must be a non-empty tuple of positive ints, the shape of one sample (e.g. (1, 8, 8)).")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
        gibbs = kernel == "gibbs"
        warmup_integrator = warmup_integrator or ("karras_stochastic" if gibbs else "unipc")
        check_integrator(integrator)
        check_integrator(warmup_integrator)
        if sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode must be one of {SIGMA_MODES}, got {sigma_mode!r}.")
        self._check_model_match(score, noise_posterior, levels, shape)
        self.noise_posterior, self.levels, self.shape = noise_posterior, levels, shape
        self.num_chains = check_steps(num_chains, "num_chains")
        self.kernel = kernel
        self.restart_sigma = None if restart_sigma is None else _check_positive_float(restart_sigma, "restart_sigma")
        if self.restart_sigma is not None and self.restart_sigma > levels.sigma_max:
            raise ValueError(f"restart_sigma={restart_sigma:g} is above the grid's sigma_max={levels.sigma_max:g}: "
                             "the model was not trained there; pass a smaller restart_sigma.")
        self.integrator, self.integrator_kwargs = integrator, dict(integrator_kwargs or {})
        self.denoise_steps = check_steps(denoise_steps, "denoise_steps")
        self.gibbs_steps = check_steps(gibbs_steps, "gibbs_steps")
        self.step_size = _check_positive_float(step_size, "step_size")
        self.sigma_mode = sigma_mode
        self.tweedie_sigma = _check_positive_float(levels.sigma_min if tweedie_sigma is None else tweedie_sigma,
                                                   "tweedie_sigma")
        if final_step not in FINAL_STEPS:
            raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}.")
        self.final_step = final_step
        if denoise_schedule not in DENOISE_SCHEDULES:
            raise ValueError(f"denoise_schedule must be one of {DENOISE_SCHEDULES}, got {denoise_schedule!r}.")
        if denoise_schedule is not None and not isinstance(integrator, str):
            raise ValueError("denoise_schedule needs a core integrator: a diffusers scheduler sets its own levels; "
                             "pass integrator='unipc' (or another core name) or leave denoise_schedule unset.")
        if denoise_schedule == FITTED and gibbs:
            raise ValueError("denoise_schedule='fitted' fits one schedule for solves that all start at one level, the "
                             "restart kernel's: use kernel='restart' or another denoise_schedule.")
        self.denoise_schedule = denoise_schedule
        self.fit_samples = check_steps(fit_samples, "fit_samples")
        #: The fitted denoising levels and what they were fitted for (``denoise_schedule="fitted"``), else ``None``.
        self.schedule_fit: dict[str, Any] | None = None
        self.warmup_integrator = warmup_integrator
        self.warmup_steps = check_steps(warmup_steps or (20 if gibbs else 10), "warmup_steps")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative int, got {burn_in!r}.")
        self.burn_in = burn_in
        if not isinstance(warmup_outputs, bool):
            raise TypeError(f"warmup_outputs must be True or False, got {warmup_outputs!r}.")
        if isinstance(extra_step_share, bool) or not isinstance(extra_step_share, (int, float)) \
                or not 0 <= extra_step_share < 1:
            raise ValueError(f"extra_step_share must be a share in [0, 1) of the output batches, got "
                             f"{extra_step_share!r}; for one more step in every batch raise denoise_steps.")
        if (warmup_outputs or extra_step_share) and gibbs:
            raise ValueError("warmup_outputs and extra_step_share are restart-kernel settings: a Gibbs chain's warm-up "
                             "ends in a perturbed state and its denoising starts at each chain's own level; use "
                             "kernel='restart' or leave them unset.")
        if not isinstance(gaussian_first_step, bool):
            raise TypeError(f"gaussian_first_step must be True or False, got {gaussian_first_step!r}.")
        if gaussian_first_step and (gibbs or not isinstance(integrator, str) or denoise_steps < 2):
            raise ValueError("gaussian_first_step answers the first of at least 2 steps of a core integrator's solve "
                             "from the restart kernel's lift level: use kernel='restart', a core integrator (e.g. "
                             "'unipc') and denoise_steps >= 2, or leave it unset.")
        self.gaussian_first_step = gaussian_first_step
        self.warmup_outputs, self.extra_step_share = warmup_outputs, float(extra_step_share)
        self._warmup_pending = False  # the warm-up's states are the chains' next outputs (warmup_outputs)
        self._steps_now: int | None = None  # denoising steps of the batch gibbs_and_select handed out
        self.warmup_noise = float(warmup_noise)
        if len(warmup_sweeps) != 2 or any(k < 0 for k in warmup_sweeps):
            raise ValueError(f"warmup_sweeps must be two non-negative counts (k1, k2), got {warmup_sweeps!r}.")
        self.warmup_sweeps = tuple(int(k) for k in warmup_sweeps)
        self.warmup_step_size = _check_positive_float(step_size if warmup_step_size is None else warmup_step_size,
                                                      "warmup_step_size")
        self.device, self.dtype, self.progress = torch.device(device or "cpu"), dtype, progress
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed) if seed is not None else self.generator.seed()
        self.x: torch.Tensor | None = None  # [C, *shape], the chains' data states
        self.sigma: torch.Tensor | None = None  # [C], the chains' noise levels
        self._buffer = torch.empty(0, *shape, dtype=dtype, device=self.device)  # samples made but not yet returned
        self._counts = {"samples": 0, "batches": 0, "pilot": 0, "warmup": 0, "gibbs": 0, "denoise": 0,
                        "tweedie": 0, "reinitialised": 0}
        self.tuning: dict[str, Any] | None = None  # what DLGSampler.for_budget chose and measured
        self._selected_hist = torch.zeros(len(levels), dtype=torch.long)
        self._batch_chains: torch.Tensor | None = None  # chains whose states the last selection handed out
        self.correlation = OutputCorrelation(self.num_chains, math.prod(shape), self.device)
        self._warned: set[str] = set()
        self.max_batch_size = check_batch_size(max_batch_size)
        self.score = _PhaseCounter(micro_batched(score, max_batch_size), self._counts)
        self._posterior = None if noise_posterior is None else micro_batched(noise_posterior, max_batch_size)

    @staticmethod
    def _check_model_match(score, noise_posterior, levels: NoiseLevels, shape: tuple[int, ...]) -> None:
        """Refuse a classifier made for another grid or sample shape, or a grid outside the model's range."""
        if hasattr(score, "sigma_min") and hasattr(score, "sigma_max"):
            levels.check_covers(float(score.sigma_min), float(score.sigma_max))
        post_levels = getattr(noise_posterior, "levels", None)
        if isinstance(post_levels, NoiseLevels) and post_levels != levels:
            raise ValueError(f"the noise posterior was trained on {post_levels!r} but the sampler got {levels!r}: "
                             "pass levels=classifier.levels.")
        for owner, name in ((noise_posterior, "noise classifier"), (score, "score model")):
            expected = getattr(owner, "sample_shape", None) or (getattr(owner, "shape", None) if owner is score else None)
            if expected is not None and tuple(expected) != shape:
                raise ValueError(f"the {name} is for samples of shape {tuple(expected)} but shape={shape} was given: "
                                 f"pass shape={tuple(expected)} or a {name} made for {shape}.")

    @classmethod
    def for_budget(cls, score: Score, noise_posterior: NoisePosterior | None, *, shape: tuple[int, ...], nfe: float,
                   n: int,
                   num_chains: int | None = None, seed: int | None = None, **overrides: Any) -> "DLGSampler":
        """Settings from a budget of ``nfe`` model evaluations per sample (everything counted) for ``n`` samples,
        chosen by a short pilot on the model itself: see :func:`dlg_sampler.tuning.for_budget`. ``overrides`` are
        sampler settings (e.g. ``max_batch_size``, which the pilot's model calls respect too)."""
        return tuning.for_budget(cls, score, noise_posterior, shape=shape, nfe=nfe, n=n, num_chains=num_chains,
                                 seed=seed, **overrides)

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def warm_up(self, generator: torch.Generator | None = None, chains: torch.Tensor | None = None,
                x_init: torch.Tensor | None = None) -> None:
        """Step 1, once per chain: bring chains ``chains`` (indices, default all) near the data manifold.

        Integrates from pure noise at ``sigma_max`` (or starts from ``x_init [C, *shape]``, e.g. data). Restart
        kernel: the result is the chain's state (at the Tweedie level), followed by ``burn_in`` restart moves.
        Gibbs kernel: perturb, classify and burn in with Gibbs sweeps.
        """
        g = generator or self.generator
        idx = torch.arange(self.num_chains, device=self.device) if chains is None else chains
        m = len(idx)
        self.score.phase = "warmup"
        if x_init is not None:
            if tuple(x_init.shape) != (m, *self.shape):
                raise ValueError(f"x_init must have shape {(m, *self.shape)} (one state per chain), got {tuple(x_init.shape)}.")
            if not torch.isfinite(x_init).all():
                raise ValueError("x_init contains NaN or Inf: pass finite initial states.")
            x = x_init.to(self.device, self.dtype)
        else:
            # Integrate from pure noise at sigma_max.
            sigma_max = torch.full((m,), self.levels.sigma_max, device=self.device, dtype=self.dtype)
            x = self.levels.sigma_max * torch.randn(m, *self.shape, generator=g, device=self.device, dtype=self.dtype)
            x, _ = integrate(self.warmup_integrator, self.score, x, sigma_max, self.warmup_steps, generator=g,
                             sigma_end=self.tweedie_sigma, final_step=self.final_step)
        if self.x is None:
            self.x = torch.zeros(self.num_chains, *self.shape, device=self.device, dtype=self.dtype)
            self.sigma = torch.zeros(self.num_chains, device=self.device, dtype=self.dtype)
        self.correlation.forget(idx)
        if self.kernel == "restart":
            if self.restart_sigma is None:
                self.restart_sigma = min(restart_rule(x, steps=self.denoise_steps), self.levels.sigma_max)
            self.x[idx], self.sigma[idx] = x, 0.0
            for _ in range(self.burn_in):  # restart moves whose outputs are discarded
                lifted, level = self._lift(idx, g)
                self.x[idx] = self._denoise(lifted, level, g, phases=("warmup", "warmup"), first_step=True)
            self._warmup_pending = self.warmup_outputs and chains is None
            return
        # Perturb and classify.
        x = x + self.warmup_noise * torch.randn(x.shape, generator=g, device=self.device, dtype=self.dtype)
        s = sample_sigma_index(self._posterior, x, self.levels, self.sigma_mode, g)
        # Burn in: Gibbs sweeps, first at warmup_step_size, then at step_size.
        for k, eta in zip(self.warmup_sweeps, (self.warmup_step_size, self.step_size)):
            for _ in range(k):
                x = langevin_step(self.score, x, self.levels.sigma(s).to(self.dtype), eta, g)
                s = sample_sigma_index(self._posterior, x, self.levels, self.sigma_mode, g)
        self.x[idx], self.sigma[idx] = x, self.levels.sigma(s).to(self.dtype)

    @torch.no_grad()
    def step(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One output batch: returns ``[k, *shape]`` samples, one per chain that stayed finite (k <= C)."""
        g = generator or self.generator
        if self.x is None:
            self.warm_up(g)
        if self._warmup_pending:
            return self.warmup_batch(g)
        x, sigma = self.gibbs_and_select(g)
        return self.denoise(x, sigma, g)

    @torch.no_grad()
    def warmup_batch(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The chains' warm-up states as outputs ``[k, *shape]`` (``warmup_outputs``): each chain's first sample,
        the warm-up solver's, already paid for; chains whose warm-up diverged are warmed up again, not returned."""
        self._warmup_pending = False
        chains = torch.arange(self.num_chains, device=self.device)
        lost = diverged(self.x, self.levels)
        x0 = self.x[~lost].clone()
        self.correlation.update(chains[~lost], x0)
        self._counts["samples"] += len(x0)
        if lost.any():
            self._reinitialise(chains[lost], generator or self.generator)
        return x0

    def _gaussian_first(self) -> bool:
        """Whether a restart solve from the lift level takes its first evaluation from the chains' Gaussian."""
        return self.gaussian_first_step and self.kernel == "restart" and isinstance(self.integrator, str)

    def batch_steps(self, batch: int) -> int:
        """Denoising steps of output batch ``batch`` (0, 1, ...): ``denoise_steps``, one more where
        ``floor((batch + 1) * extra_step_share)`` steps up (a share ``extra_step_share`` of the batches, evenly)."""
        return self.denoise_steps + tuning.longer_batches(self.extra_step_share, 1, batch)

    @torch.no_grad()
    def gibbs_and_select(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chain move of one batch: ``(x [k, *shape], sigma [k])``, each finite chain's state to denoise.

        Restart kernel: every chain lifted to ``restart_sigma``. Gibbs kernel: steps 2-3 (Gibbs sweeps, then each
        chain's min-sigma state). :meth:`denoise` must follow: the restart chains continue from its output.
        """
        g = generator or self.generator
        if self.x is None:
            self.warm_up(g)
        self._counts["batches"] += 1
        if self.kernel == "restart":
            if self.denoise_schedule == FITTED and self._fitted_levels() is None:
                self.fit_denoise_schedule()
            self._steps_now = self.batch_steps(self._counts["batches"] - 1)
            chains = torch.arange(self.num_chains, device=self.device)
            x, sigma = self._lift(chains, g)
            self._batch_chains = chains
            self._record_selected(sigma)
            return x, sigma
        return self._gibbs_sweeps(g)

    @torch.no_grad()
    def fit_denoise_schedule(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fit the denoising levels ``[denoise_steps + 1]`` (with ``extra_step_share`` also ``[denoise_steps + 2]``,
        kept as ``schedule_fit["longer"]``) from ``restart_sigma`` to ``tweedie_sigma`` on the first
        ``fit_samples`` chains lifted to ``restart_sigma`` (warmed up first if due); counted as ``pilot``. The chains
        are left as they are; :meth:`denoise` follows the levels from then on. The lift's noise comes from
        ``generator``, by default one seeded from the sampler's seed (``FIT_SEED_OFFSET`` on): the run's own random
        stream is left as it is, so a run with the fitted levels and one without draw the same noise."""
        if self.x is None:
            self.warm_up(generator)
        g = generator or torch.Generator(self.device).manual_seed(self.generator.initial_seed() + FIT_SEED_OFFSET)
        chains = torch.arange(min(self.fit_samples, self.num_chains), device=self.device)
        lifted, _ = self._lift(chains, g)
        phase, self.score.phase = self.score.phase, "pilot"
        before = self._counts["pilot"]
        try:
            steps = (self.denoise_steps, self.denoise_steps + 1) if self.extra_step_share else (self.denoise_steps,)
            levels, *longer = fit_schedules(self.score, lifted, self.restart_sigma, self.tweedie_sigma, steps)
        finally:
            self.score.phase = phase
        self.schedule_fit = {"levels": levels.cpu().double(), "longer": longer[0].cpu().double() if longer else None,
                             "restart_sigma": self.restart_sigma,
                             "tweedie_sigma": self.tweedie_sigma, "steps": self.denoise_steps, "samples": len(chains),
                             "evaluations": self._counts["pilot"] - before}
        return levels

    def _fitted_levels(self) -> torch.Tensor | None:
        """The fitted levels where they were fitted for the current level, Tweedie level and steps, else ``None``."""
        fit = self.schedule_fit
        if fit is None or (fit["restart_sigma"], fit["tweedie_sigma"], fit["steps"]) != (
                self.restart_sigma, self.tweedie_sigma, self.denoise_steps):
            return None
        return fit["levels"]

    def _levels(self, sigma: torch.Tensor, steps: int) -> str | torch.Tensor | None:
        """The ``schedule`` of a denoising solve from ``sigma [k]`` in ``steps`` steps: the fitted levels where they
        serve it (every chain at ``restart_sigma``, the fitted steps), else the ramp of ``denoise_schedule``."""
        if self.denoise_schedule != FITTED:
            return self.denoise_schedule
        levels = self._fitted_levels()
        if levels is None or not bool((sigma == self.restart_sigma).all()):
            return None
        return {self.denoise_steps: levels, self.denoise_steps + 1: self.schedule_fit.get("longer")}.get(steps)

    def _ramp_end(self, sigma: torch.Tensor, steps: int) -> float:
        """Where a solver-ended ramp from ``sigma [k]`` in ``steps`` steps ends: ``tweedie_sigma``, except for a
        longer batch's restart solve (``denoise_steps + 1`` steps from ``restart_sigma`` on a ramp), whose end keeps
        the level it leaves for 0 where the run's ``denoise_steps`` leave it, the step going inside (that level is
        what ``for_budget``'s check chose; at the same end one step more was worse on the wide mixture,
        docs/mixing.md)."""
        ramp = self._levels(sigma, steps)
        if (steps != self.denoise_steps + 1 or self.restart_sigma is None or isinstance(ramp, torch.Tensor)
                or not bool((sigma == self.restart_sigma).all())):
            return self.tweedie_sigma
        return ramp_end_keeping_last_level(self.integrator, steps, self.denoise_steps, self.restart_sigma,
                                           self.tweedie_sigma, ramp)

    def _lift(self, chains: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Restart move: ``x + sqrt(S^2 - sigma^2) z`` for chains ``chains``, an exact draw of ``p_S``."""
        S = torch.full((len(chains),), self.restart_sigma, device=self.device, dtype=self.dtype)
        gap = (S.double() ** 2 - self.sigma[chains].double() ** 2).clamp_min(0).sqrt().to(self.dtype)
        x = self.x[chains]
        return x + append_dims(gap, x.ndim) * randn_like(x, g), S

    def _gibbs_sweeps(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Gibbs steps (x | sigma by Langevin, sigma | x by the posterior), then per chain the min-sigma state."""
        levels, x = self.levels, self.x
        s = levels.index(self.sigma).to(self.device)
        lost = torch.zeros(self.num_chains, dtype=torch.bool, device=self.device)
        best_x, best_s = x, torch.full_like(s, len(levels))
        self.score.phase = "gibbs"
        for _ in range(self.gibbs_steps):
            # Gibbs step: x | sigma (Langevin), then sigma | x (noise posterior).
            x = langevin_step(self.score, x, levels.sigma(s).to(self.dtype), self.step_size, g)
            lost |= diverged(x, levels)
            x = torch.where(append_dims(lost, x.ndim), torch.zeros_like(x), x)  # re-initialised below
            s = sample_sigma_index(self._posterior, x, levels, self.sigma_mode, g)
            # Selection: per chain, keep the state with the smallest sigma.
            better = s < best_s
            best_x = torch.where(append_dims(better, x.ndim), x, best_x)
            best_s = torch.where(better, s, best_s)
        self.x, self.sigma = x, levels.sigma(s).to(self.dtype)  # the chains persist from their last state
        keep = ~lost
        self._batch_chains = keep.nonzero().squeeze(1)
        selected = best_x[keep], levels.sigma(best_s[keep]).to(self.dtype)
        self._record_selected(selected[1])
        if lost.any():  # diverged chains restart from the warm-up path and are never emitted
            self._reinitialise(lost.nonzero().squeeze(1), g)
        return selected

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None, *,
                tweedie: bool = True) -> torch.Tensor:
        """Steps 4-5: ``x [k, *shape]`` at its own levels ``sigma [k]`` -> clean samples ``[k, *shape]``.

        With ``tweedie=False`` (core integrators only) the samples are returned at ``tweedie_sigma``, before the
        Tweedie step, for a caller that makes that last model call itself (``DLGScheduler``, which then calls
        :meth:`record_tweedie`).
        """
        if len(x) == 0:
            return x
        x0 = self._denoise(x, sigma, generator, tweedie=tweedie, steps=self._steps_now,
                           first_step=self.kernel == "restart")
        chains, self._batch_chains, self._steps_now = self._batch_chains, None, None
        if chains is not None and len(chains) == len(x0):
            if self.kernel == "restart":  # the chains continue from their outputs; diverged ones start afresh
                lost = diverged(x0, self.levels)
                x0, lost_chains, chains = x0[~lost], chains[lost], chains[~lost]
                self.x[chains] = x0.to(self.dtype)
                self.sigma[chains] = 0.0 if tweedie else self.tweedie_sigma
                if len(lost_chains):
                    self._reinitialise(lost_chains, generator or self.generator)
            self.correlation.update(chains, x0)
        self._counts["samples"] += len(x0)
        return x0

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, g: torch.Generator | None, *, tweedie: bool = True,
                 phases: tuple[str, str] = ("denoise", "tweedie"), steps: int | None = None,
                 first_step: bool = False) -> torch.Tensor:
        """Denoising (and Tweedie) of ``x [k, *shape]`` from ``sigma [k]`` in ``steps`` steps (default
        ``denoise_steps``), counted under ``phases``; with ``first_step`` (a restart solve from ``restart_sigma``)
        the first evaluation is the chains' Gaussian where ``gaussian_first_step`` is set."""
        steps = steps or self.denoise_steps
        self.score.phase = phases[0]
        score = GaussianFirstStep(self.score, self.x) if first_step and self._gaussian_first() else self.score
        if isinstance(self.integrator, str) and tweedie and self.final_step == "solver":
            # Denoising to 0: the solver's last step from the level above tweedie_sigma uses its own data prediction.
            sigmas = get_schedule(self.integrator, steps, sigma, self._ramp_end(sigma, steps), final_step="solver",
                                  schedule=self._levels(sigma, steps))
            x, _ = INTEGRATORS[self.integrator](score, x, sigmas, generator=g, **self.integrator_kwargs)
        elif isinstance(self.integrator, str):
            # Denoising: integrate from each chain's own sigma down to the Tweedie level.
            sigmas = get_schedule(self.integrator, steps, sigma, self.tweedie_sigma, append_zero=False,
                                  schedule=self._levels(sigma, steps))
            x, _ = INTEGRATORS[self.integrator](score, x, sigmas, generator=g, **self.integrator_kwargs)
            if tweedie:  # Tweedie step: D(x, sigma_end) = x + sigma_end^2 s(x, sigma_end).
                self.score.phase = phases[1]
                x = CountedScore(self.score).denoise(x, sigmas[-1])
        elif not tweedie:
            raise ValueError("tweedie=False needs a core integrator: a diffusers scheduler denoises to 0 itself.")
        else:  # a diffusers scheduler denoises to 0 by itself
            groups = SCHEDULER_GROUPS if self.kernel == "gibbs" else 1
            kwargs = {"groups": min(groups, len(x)), **self.integrator_kwargs}
            x, _ = integrate(self.integrator, self.score, x, sigma, steps, generator=g, **kwargs)
        return x

    def _reinitialise(self, chains: torch.Tensor, g: torch.Generator) -> None:
        self._counts["reinitialised"] += len(chains)
        phase = self.score.phase
        self.warm_up(g, chains=chains)
        self.score.phase = phase

    def _record_selected(self, sigma: torch.Tensor) -> None:
        self._selected_hist += torch.bincount(self.levels.index(sigma.cpu()), minlength=len(self.levels))

    def record_tweedie(self, k: int) -> None:
        """Count ``k`` Tweedie steps made by a caller after ``denoise(..., tweedie=False)``."""
        self._counts["tweedie"] += k

    def sample(self, n: int, generator: torch.Generator | None = None, *, progress_bar: tqdm | None = None
               ) -> torch.Tensor:
        """Exactly ``n`` samples ``[n, *shape]`` from as many batches as needed (leftovers are kept for the next call).

        ``progress_bar``: a caller's tqdm bar (e.g. one over several calls, sized with :meth:`planned_nfe`), advanced
        by every model evaluation instead of the sampler's own bar; the caller closes it.
        """
        n = check_steps(n, "n")
        out, have = [self._buffer], len(self._buffer)
        context = tqdm(total=self.planned_nfe(n), disable=not self.progress, desc="DLG", unit="NFE", unit_scale=True) \
            if progress_bar is None else nullcontext(progress_bar)
        with context as bar:
            self.score.bar = bar
            try:
                empty = 0
                while have < n:
                    batch = self.step(generator)
                    out.append(batch)
                    have += len(batch)
                    empty = 0 if len(batch) else empty + 1
                    if empty == MAX_EMPTY_BATCHES:
                        raise RuntimeError(
                            f"every chain diverged in {MAX_EMPTY_BATCHES} batches in a row (non-finite states or RMS "
                            f"beyond 10 x sigma_max): the score returns NaN/Inf or explodes. Check the model and its "
                            "adapter on a few noisy samples (score(x, sigma) should be about -(x - x0) / sigma^2).")
            finally:
                self.score.bar = None
        samples = torch.cat(out)
        self._buffer = samples[n:]
        self._check_health()
        return samples[:n]

    def planned_nfe(self, n: int) -> int:
        """Model evaluations (all samples together) the next ``n`` samples will cost, warm-up included if due
        (samples already made and kept for the next call cost nothing)."""
        need = max(n - len(self._buffer), 0)
        if n and self.warmup_outputs and (self.x is None or self._warmup_pending):
            need = max(need - self.num_chains, 0)  # the warm-up's outputs come first
        batches = math.ceil(need / self.num_chains)
        core = isinstance(self.integrator, str)  # a core integrator's knobs can change its count (restarts)

        def per_output(steps: int) -> int:
            gibbs = self.gibbs_steps if self.kernel == "gibbs" else 0
            return gibbs + count_nfe(self.integrator, steps, dlg=core, final_step=self.final_step,
                                     **(self.integrator_kwargs if core else {})) - self._gaussian_first()

        per_batch = per_output(self.denoise_steps)
        longer = tuning.longer_batches(self.extra_step_share, batches, self._counts["batches"])
        total = (batches * per_batch + longer * (per_output(self.denoise_steps + 1) - per_batch)) * self.num_chains
        if self.denoise_schedule == FITTED and self._fitted_levels() is None and batches:
            total += fit_evaluations(min(self.fit_samples, self.num_chains))
        if self.x is None:
            warm = count_nfe(self.warmup_integrator, self.warmup_steps, dlg=False, final_step=self.final_step)
            warm += per_batch * self.burn_in if self.kernel == "restart" else sum(self.warmup_sweeps)
            total += warm * self.num_chains
        return total

    def _check_health(self) -> None:
        """Warn (once each) when the outputs are near-copies of each other or the chains sit at the top of the grid."""
        st = self.stats
        r = st["lag1_autocorr"]
        if r is not None and r > CORRELATION_WARNING and "correlation" not in self._warned:
            self._warned.add("correlation")
            fix = ("a higher restart_sigma" if self.kernel == "restart" else
                   "the restart kernel (kernel='restart'; larger step_size / gibbs_steps help less)")
            warnings.warn(f"consecutive outputs of one chain are correlated (lag-1 autocorrelation {r:.2f} after "
                          f"{st['outputs_per_chain']:.1f} outputs per chain): {st['samples']} samples are worth "
                          f"about {st['samples'] * st['ess_fraction']:.0f} independent ones. Use more chains "
                          f"(num_chains) or {fix}.", stacklevel=3)
        if self.kernel == "gibbs" and "top" not in self._warned and st["selected_sigma_median"] > self._top_level():
            self._warned.add("top")
            warnings.warn(f"the chains' selected noise level (median sigma {st['selected_sigma_median']:.3g}) sits "
                          f"near the top of the grid (sigma_max {self.levels.sigma_max:g}): step_size={self.step_size:g}"
                          " is too large for this model (the working level grows like sqrt(step_size)), and the "
                          "samples are denoised from nearly pure noise; lower step_size.", stacklevel=3)

    def _top_level(self) -> float:
        lo, hi = math.log(self.levels.sigma_min), math.log(self.levels.sigma_max)
        return math.exp(lo + TOP_OF_GRID * (hi - lo))

    # ------------------------------------------------------------------ bookkeeping
    @property
    def stats(self) -> dict[str, Any]:
        """The whole cost first: every model evaluation over the samples returned; then its split and diagnostics.

        ``nfe_per_sample``: all evaluations (a tuning pilot, warm-up, burn-in, re-initialisations, Gibbs, denoising,
        Tweedie) / samples returned; ``nfe_split``: the same per phase (``warmup`` and ``pilot`` amortised);
        ``lag1_autocorr`` / ``ess_fraction``: how much consecutive outputs of one chain share (``None`` before a
        chain has two outputs); ``outputs_per_chain``: samples returned / chains.
        """
        c = self._counts
        returned = c["samples"] - len(self._buffer)
        phases = ("pilot", "warmup", "gibbs", "denoise", "tweedie")
        evaluations = sum(c[k] for k in phases)
        per = (lambda v: v / returned) if returned else (lambda v: float("nan"))
        hist = self._selected_hist
        total = int(hist.sum())
        sig = self.levels.sigmas.double()
        mean_sigma = float((hist.double() * sig).sum() / total) if total else float("nan")
        median_sigma = float(sig[int((hist.cumsum(0) >= (total + 1) // 2).nonzero()[0])]) if total else float("nan")
        r = self.correlation.lag1
        return {
            "nfe_per_sample": per(evaluations),
            "nfe_split": {k: per(c[k]) for k in phases},
            "model_evaluations": evaluations,
            "samples": returned, "chains": self.num_chains, "outputs_per_chain": returned / self.num_chains,
            "lag1_autocorr": r, "ess_fraction": None if r is None else ess_fraction(r),
            "warmup_nfe_per_chain": c["warmup"] / self.num_chains, "batches": c["batches"],
            "reinitialised": c["reinitialised"], "kernel": self.kernel, "restart_sigma": self.restart_sigma,
            "selected_sigma_mean": mean_sigma, "selected_sigma_median": median_sigma,
            "selected_sigma_hist": hist.clone(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: chains, unreturned samples, counters, own generator state."""
        return {
            "x": None if self.x is None else self.x.clone(), "sigma": None if self.sigma is None else self.sigma.clone(),
            "buffer": self._buffer.clone(), "counts": dict(self._counts), "selected_hist": self._selected_hist.clone(),
            "correlation": self.correlation.state_dict(), "restart_sigma": self.restart_sigma,
            "generator": self.generator.get_state(), "shape": self.shape, "num_chains": self.num_chains,
            "warmup_pending": self._warmup_pending,
            "levels": self.levels.config, "kernel": self.kernel, "tuning": self.tuning,
            "schedule_fit": None if self.schedule_fit is None else {**self.schedule_fit,
                                                                    **_cloned_levels(self.schedule_fit)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a sampler built with the same shape, chains, grid and kernel."""
        for key, mine in (("shape", self.shape), ("num_chains", self.num_chains), ("levels", self.levels.config),
                          ("kernel", self.kernel)):
            if key not in state or (tuple(state[key]) if key == "shape" else state[key]) != mine:
                raise ValueError(f"cannot load a DLGSampler state with {key}={state.get(key)!r} into a sampler with "
                                 f"{key}={mine!r}.")
        to = dict(device=self.device)
        self.x = None if state["x"] is None else state["x"].to(**to, dtype=self.dtype)
        self.sigma = None if state["sigma"] is None else state["sigma"].to(**to, dtype=self.dtype)
        self._buffer = state["buffer"].to(**to, dtype=self.dtype)
        self._counts.clear()
        self._counts.update(state["counts"])
        self._selected_hist = state["selected_hist"].clone()
        self.correlation.load_state_dict(state["correlation"])
        self.restart_sigma, self.tuning = state["restart_sigma"], state.get("tuning")
        self._warmup_pending = state.get("warmup_pending", False)
        fit = state.get("schedule_fit")
        self.schedule_fit = None if fit is None else {**fit, **_cloned_levels(fit)}
        self.generator.set_state(state["generator"])
