"""Warm-start any diffusers scheduler from per-sample VE states (docs/design.md, *Inside diffusers*, route 2).

:func:`warm_start` has the signature of :func:`dlg_sampler.integrators.integrate` (which dispatches here
when its ``name`` is a scheduler instance). One call:

1. **Common level.** Pick the scheduler's own noise level ``S >= max(sigma_start)`` at which a schedule of
   ``steps`` solver steps starts, and bring every sample there exactly: ``x + sqrt(S^2 - sigma_i^2) z`` is
   distributed as ``p_S`` when ``x ~ p_{sigma_i}``. With ``groups=g`` the batch is first split by sigma into
   ``g`` equal groups, each with its own ``S`` (same NFE per sample; much less re-noising when the levels
   are spread out, as DLG's selected sigmas are).
2. **Schedule from S.** Where ``set_timesteps`` takes a custom schedule that can start anywhere (checked with
   ``inspect``, and read back afterwards), give it one of ``steps`` steps: for DDPM, DPM-Solver, Euler and
   Heun, integer ``timesteps=`` from the first table timestep whose level covers ``max(sigma_start)`` down
   to 0, with levels in Karras et al.'s rho=7 spacing (dense near 0, like the core integrators); for EDM
   Euler a ``sigmas=`` ramp restricted to ``[S, sigma_min]`` (EDM schedulers read ``sigmas=`` as a ramp
   in ``[0, 1]``); for the VE scheduler ``set_sigmas(sigma_max=S)``. Otherwise (or where the config rejects
   or ignores custom schedules, e.g. ``use_karras_sigmas=True``) start the scheduler's own full schedule
   late: the largest ``num_inference_steps`` whose last ``steps`` steps start at or above
   ``max(sigma_start)``, entered with ``set_begin_index`` as diffusers' img2img does (order-2 schedulers
   index their interleaved arrays at ``2 k``); LMS is sliced instead (its order ramp reads the absolute
   step index); DDIM, DDPM and PNDM step from the timestep they are given to ``t - T // num_inference_steps``
   whatever their list holds, so the loop walks that stride (PNDM's PLMS loop repeats its second timestep).
   The truncated schedule's first level can sit well above ``max(sigma_start)`` when ``steps`` is small.
3. **Scheduler space.** VP schedulers (``alphas_cumprod`` tables: DDPM, DDIM, PNDM, DPM-Solver, UniPC, DEIS)
   walk ``x_t = x / sqrt(1 + sigma^2)``; k-diffusion-style schedulers (Euler, Heun, KDPM2, LMS) and EDM
   schedulers walk VE samples and scale model inputs themselves; ``ScoreSdeVeScheduler`` is VE with the
   score as model output.
4. **Model output** at each model call: the VE score at the level the scheduler's update uses, converted
   to its ``prediction_type``: ``epsilon = -sigma s``, ``sample = D = x + sigma^2 s``,
   ``v_prediction = alpha eps - sigma_t D`` (``alpha = 1/sqrt(1+sigma^2)``, ``sigma_t = sigma alpha``);
   EDM: the raw network output ``F = (D - c_skip x) / c_out`` with the scheduler's own preconditioning.
5. **End.** A schedule that stops above 0 (e.g. DDIM/PNDM with ``set_alpha_to_one=False``,
   ``final_sigmas_type="sigma_min"``) is finished with one Tweedie step ``D(x, sigma_end)``, so the result
   is always the clean sample; that call is counted.

``steps`` is the scheduler's ``num_inference_steps`` over the stretch from ``S`` (solver steps, as for the
core integrators); ``nfe`` is counted from actual score calls (Heun/KDPM2: ``2 steps - 1``; PNDM:
``steps + 1``; ScoreSdeVe: ``steps (1 + correct_steps)``; plus 1 for a final Tweedie step).
The user's scheduler is never mutated (a deep copy is driven) and its config is respected (``clip_sample``,
thresholding, ``final_sigmas_type`` ...); a config that cannot be warm-started raises naming the fix.
"""

from __future__ import annotations

import copy
import inspect
import math
import numpy as np
import torch

from .scores import CountedScore, Score, append_dims, check_sigma_start, check_steps, randn_like

#: Scheduler class name -> (sample space, custom-schedule route or None, truncation route or None).
#: Spaces: "vp" (x / sqrt(1 + sigma^2), alphas_cumprod table), "k" (VE sample, k-diffusion scalings),
#: "edm" (VE sample, EDM preconditioning), "ve" (VE sample, score output).
#: Truncation: "begin_index" (set_begin_index), "slice" (cut the schedule arrays), "stride" (the scheduler
#: steps from the timestep it is given to ``t - T // num_inference_steps``: walk that stride), "plms" (the
#: stride walk with PNDM's repeated second timestep).
_SUPPORTED: dict[str, tuple[str, str | None, str | None]] = {
    "DDPMScheduler": ("vp", "timesteps", "stride"),
    "DDIMScheduler": ("vp", None, "stride"),
    "PNDMScheduler": ("vp", None, "plms"),
    "DPMSolverMultistepScheduler": ("vp", "timesteps", "begin_index"),
    "DPMSolverSinglestepScheduler": ("vp", "timesteps", "begin_index"),
    "UniPCMultistepScheduler": ("vp", None, "begin_index"),
    "DEISMultistepScheduler": ("vp", None, "begin_index"),
    "EulerDiscreteScheduler": ("k", "timesteps", "begin_index"),
    "EulerAncestralDiscreteScheduler": ("k", None, "begin_index"),
    "HeunDiscreteScheduler": ("k", "timesteps", "begin_index"),
    "KDPM2DiscreteScheduler": ("k", None, "begin_index"),
    "KDPM2AncestralDiscreteScheduler": ("k", None, "begin_index"),
    "LMSDiscreteScheduler": ("k", None, "slice"),
    "EDMEulerScheduler": ("edm", "ramp", "begin_index"),
    "EDMDPMSolverMultistepScheduler": ("edm", None, "begin_index"),
    "ScoreSdeVeScheduler": ("ve", "sigma_max", None),
}

#: Largest ``num_inference_steps`` tried when truncating a schedule without a training table (EDM).
_MAX_INFERENCE_STEPS = 1000


def supported_schedulers() -> list[str]:
    """Names of the diffusers scheduler classes :func:`warm_start` accepts (subclasses included)."""
    return sorted(_SUPPORTED)


@torch.no_grad()
def warm_start(scheduler, score: Score, x: torch.Tensor, sigma_start, steps: int, *,
               generator: torch.Generator | None = None, groups: int = 1) -> tuple[torch.Tensor, int]:
    """Denoise VE samples ``x [B, *shape]`` at levels ``sigma_start [B]`` with a diffusers scheduler.

    Args:
        scheduler: a diffusers ``SchedulerMixin`` instance of a supported class (:func:`supported_schedulers`);
            it is copied, never mutated, and its config is respected.
        score: ``score(x [B, *shape], sigma [B]) -> [B, *shape]``, the VE score.
        x: ``[B, *shape]`` samples of ``p_{sigma_start}``; ``sigma_start``: ``[B]`` (or scalar), > 0.
        steps: the scheduler's ``num_inference_steps`` over the stretch from the common level ``S`` to 0.
        generator: randomness for the re-noising to ``S`` and for stochastic schedulers.
        groups: split the batch by ``sigma_start`` into this many equal groups, each run from its own common
            level (same NFE per sample, ``groups`` times the calls on smaller batches). With spread-out
            levels (DLG's selected sigmas) this saves re-noising low-sigma samples up to the batch maximum.

    Returns:
        ``(x0 [B, *shape], nfe)``: clean samples in the VE data space and score calls per sample.
    """
    space, custom, truncation = _spec(scheduler)
    steps = check_steps(steps)
    groups = check_steps(groups, "groups")
    sigma_start = check_sigma_start(sigma_start, x)
    _check_config(scheduler, space, steps)
    _check_covers(type(scheduler).__name__, float(sigma_start.max()), _largest_level(scheduler))
    out, nfe = torch.empty_like(x), 0
    for idx in sigma_start.argsort().chunk(groups):
        out[idx], group_nfe = _warm_start_group(copy.deepcopy(scheduler), space, custom, truncation, score,
                                                x[idx], sigma_start[idx], steps, generator)
        nfe = max(nfe, group_nfe)
    return out, nfe


def _warm_start_group(sched, space: str, custom: str | None, truncation: str | None, score: Score,
                      x: torch.Tensor, sigma_start: torch.Tensor, steps: int, generator) -> tuple[torch.Tensor, int]:
    """One common level ``S >= max(sigma_start)`` and one schedule for the whole of ``x``, driving ``sched``."""
    counted = CountedScore(score)
    target = float(sigma_start.max())
    plan = _custom_schedule(sched, space, custom, target, steps, x.device) if custom else None
    timesteps, S = plan or _truncated_schedule(sched, truncation, target, steps, x.device)

    # Common level: x + sqrt(S^2 - sigma_i^2) z ~ p_S, computed in float64 for small gaps.
    gap = (S**2 - sigma_start.double() ** 2).clamp_min(0).sqrt().to(x.dtype)
    x = x + append_dims(gap, x.ndim) * randn_like(x, generator)
    if space == "ve":
        return _run_score_sde_ve(sched, counted, x, generator), counted.nfe
    sample = x / math.sqrt(1 + S**2) if space == "vp" else x

    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in timesteps:
        sched.scale_model_input(sample, t)  # the pipeline protocol (sets the step index of sigma schedulers)
        sigma = _call_sigma(sched, t)
        x_ve = sample * math.sqrt(1 + sigma**2) if space == "vp" else sample
        out = _model_output(sched, space, counted, x_ve, sigma)
        sample = sched.step(out, t, sample, **step_kwargs).prev_sample

    # End: back to VE data space; a schedule that stops above 0 gets one Tweedie step.
    sigma_end = _end_sigma(sched, space, timesteps[-1])
    x = sample * math.sqrt(1 + sigma_end**2) if space == "vp" else sample
    if sigma_end > 0:
        x = counted.denoise(x, torch.full((x.shape[0],), sigma_end, dtype=x.dtype, device=x.device))
    return x, counted.nfe


# ----------------------------------------------------------------------------- checks
def _spec(scheduler) -> tuple[str, str | None, str | None]:
    """The bridge for ``scheduler``'s class (or its nearest supported base class); TypeError if none."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in _SUPPORTED and cls.__module__.startswith("diffusers"):
            return _SUPPORTED[cls.__name__]
    raise TypeError(
        f"{type(scheduler).__name__} cannot be warm-started: supported diffusers schedulers are "
        f"{', '.join(supported_schedulers())}. Build one from your pipeline's config, e.g. "
        "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config), or use a core integrator name "
        "(dlg_sampler.INTEGRATORS)."
    )


def _check_config(scheduler, space: str, steps: int) -> None:
    """Raise for configs a score cannot drive (naming the config key to change); never change the config."""
    name, cfg = type(scheduler).__name__, scheduler.config

    def fix(change: str) -> str:
        return f"use {name}.from_config(scheduler.config, {change})"

    if cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction":
        raise ValueError(f"{name} is configured for flow matching (use_flow_sigmas / flow_prediction), which is not "
                         f"a VP or VE schedule: {fix('use_flow_sigmas=False, prediction_type=...')}.")
    if space != "ve" and cfg.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"{name} has prediction_type={cfg.prediction_type!r}; warm start converts the score to "
                         f"'epsilon', 'v_prediction' or 'sample': {fix('prediction_type=...')}.")
    if cfg.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(f"{name} has variance_type={cfg.variance_type!r}, which reads a variance from the model "
                         "output, and a score has none: " + fix("variance_type='fixed_small'") + ".")
    if cfg.get("skip_prk_steps") is False:  # PNDM
        raise ValueError(f"{name}'s Runge-Kutta warm-up steps are tied to the top of its full schedule and "
                         f"cannot start mid-schedule: {fix('skip_prk_steps=True')} (the PLMS variant Stable "
                         "Diffusion uses).")
    if space == "ve" and steps < 2:
        raise ValueError("ScoreSdeVeScheduler needs steps >= 2 (its geometric schedule from S to sigma_min has "
                         "`steps` levels; with one level it steps with sigma_min's size at S).")


def _check_covers(name: str, target: float, top: float, steps: int | None = None) -> None:
    """Raise unless the scheduler can start at ``target`` (``steps`` given: within its own schedule); float32
    rounding of the same level is tolerated."""
    if target <= top * (1 + 1e-5):
        return
    where = f"{name}'s largest level {top:.4g}" if steps is None else \
        f"{top:.4g}, the highest level from which {name}'s own schedule runs {steps} steps"
    more = "" if steps is None else "more steps, "
    raise ValueError(
        f"the batch's largest noise level {target:.4g} is above {where}: a scheduler cannot start above its own "
        f"schedule. Use {more}a scheduler config covering it (e.g. a larger num_train_timesteps / sigma_max), "
        "or a noise grid (NoiseLevels) whose sigma_max is within the model's range."
    )


# ----------------------------------------------------------------------------- schedules
def _largest_level(sched) -> float:
    """The top of the scheduler's noise range: its training table's last level, else ``config.sigma_max``."""
    return float(_table_sigmas(sched)[-1]) if hasattr(sched, "alphas_cumprod") else float(sched.config.sigma_max)


def _table_sigmas(sched) -> torch.Tensor:
    """VE levels of a VP training table, ``sigma_t = sqrt((1 - abar_t) / abar_t)``, ``[T]`` float64."""
    abar = sched.alphas_cumprod.double().cpu()
    return ((1 - abar) / abar).sqrt()


def _covering_timestep(table: torch.Tensor, target: float) -> int:
    """The first timestep whose level covers ``target`` (the last one for a level at the top, up to rounding)."""
    return min(int(torch.searchsorted(table, torch.tensor(target, dtype=torch.float64))), len(table) - 1)


def _step_sigmas(sched) -> torch.Tensor:
    """VE level at the start of each solver step of the scheduler's current schedule, ``[n]`` float64
    (interleaved order-2 arrays are read at ``2 k``; table schedulers at each distinct timestep)."""
    if not hasattr(sched, "sigmas"):
        return _table_sigmas(sched)[torch.unique_consecutive(torch.as_tensor(sched.timesteps).cpu().long())]
    order = sched.order
    return sched.sigmas[::order][: len(sched.timesteps[::order])].double().cpu()


def _karras_timesteps(table: torch.Tensor, t_start: int, steps: int, rho: float = 7.0) -> list[int]:
    """``steps`` distinct integer timesteps from ``t_start`` down to 0 whose levels follow Karras et al.'s
    ``rho`` spacing between ``table[t_start]`` and ``table[0]`` (dense near 0, as the core integrators)."""
    hi, lo = float(table[t_start]) ** (1 / rho), float(table[0]) ** (1 / rho)
    sigmas = (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho
    t = np.interp(np.log(sigmas), table.log().numpy(), np.arange(len(table))).round().astype(np.int64)
    t[0] = t_start
    for j in range(1, steps):  # distinct where rounding collides near 0, leaving room for the rest
        t[j] = max(min(t[j], t[j - 1] - 1), steps - 1 - j)
    return t.tolist()


def _custom_schedule(sched, space: str, custom: str, target: float, steps: int, device) -> tuple[list, float] | None:
    """Give ``sched`` a schedule of ``steps`` steps from the first level ``S >= target``; returns the loop's
    timesteps and ``S``, or None where the scheduler (version or config) does not take or honour it."""
    name, params = type(sched).__name__, inspect.signature(sched.set_timesteps).parameters
    if custom == "sigma_max":  # ScoreSdeVe: geometric from S to sigma_min in `steps` levels
        S = max(target, sched.config.sigma_min)
        sched.set_timesteps(steps, device=device)
        sched.set_sigmas(steps, sigma_max=S)
        return list(sched.timesteps), S
    if custom == "timesteps" and "timesteps" in params:
        table = _table_sigmas(sched)
        if steps > len(table):
            raise ValueError(f"steps={steps} is more than the {len(table)} timesteps of {name}'s table.")
        t_start = max(_covering_timestep(table, target), steps - 1)
        expected = float(table[t_start])
        try:
            sched.set_timesteps(timesteps=_karras_timesteps(table, t_start, steps), device=device)
        except ValueError:  # e.g. use_karras_sigmas=True rejects custom timesteps: truncate instead
            return None
    elif custom == "ramp" and "sigmas" in params:  # EDM: sigmas= is a ramp in [0, 1] over [sigma_max, sigma_min]
        cfg = sched.config
        expected, inv = max(target, cfg.sigma_min), 1 / cfg.rho
        r0 = (expected**inv - cfg.sigma_max**inv) / (cfg.sigma_min**inv - cfg.sigma_max**inv)
        sched.set_timesteps(sigmas=torch.linspace(r0, 1, steps, dtype=torch.float64), device=device)
    else:
        return None
    # Read back: the scheduler must walk exactly `steps` steps from the intended level (e.g. an exponential
    # EDM schedule ignores the ramp's values, Euler's log_linear interpolation ignores custom timesteps).
    got = _step_sigmas(sched)
    if len(got) != steps or not math.isclose(float(got[0]), expected, rel_tol=1e-4):
        return None
    return list(sched.timesteps), float(got[0])


def _stride_schedule(sched, truncation: str, target: float, steps: int, device) -> tuple[list, float]:
    """DDIM, DDPM and PNDM step from the timestep they are given to ``t - T // num_inference_steps`` whatever
    their list holds, so walk that stride: the finest one whose ``steps`` steps reach the first table
    timestep covering ``target`` and end below 0 (at ``final_alpha_cumprod``); returns the walk and ``S``."""
    name, table = type(sched).__name__, _table_sigmas(sched)
    T = len(table)
    if steps > T:
        raise ValueError(f"steps={steps} is more than the {T} timesteps of {name}'s table.")
    t_target = _covering_timestep(table, target)
    n = T // math.ceil((t_target + 1) / steps)  # largest n whose stride T // n gives steps * stride > t_target
    stride = T // n
    if n < steps or (steps - 1) * stride > T - 1:
        raise ValueError(f"{name} cannot walk {steps} steps of its stride T // num_inference_steps from level "
                         f"{target:.4g} (timestep {t_target} of {T}): use more steps.")
    sched.set_timesteps(n, device=device)
    t_start = max(t_target, (steps - 1) * stride)
    walk = [t_start - j * stride for j in range(steps)]
    if truncation == "plms":  # PLMS repeats its second timestep (a Heun-like start)
        walk = walk[:2] + walk[1:]
    return walk, float(table[t_start])


def _truncated_schedule(sched, truncation: str, target: float, steps: int, device) -> tuple[list, float]:
    """Start the scheduler's own full schedule late: the largest ``num_inference_steps`` whose last ``steps``
    steps start at a level ``S >= target``; returns the loop's timesteps and ``S``."""
    if truncation in ("stride", "plms"):
        return _stride_schedule(sched, truncation, target, steps, device)
    name = type(sched).__name__
    n_max = int(sched.config.get("num_train_timesteps", _MAX_INFERENCE_STEPS))
    if steps > n_max:
        raise ValueError(f"steps={steps} is more than {name} can take (num_inference_steps <= {n_max}).")

    def tail(n: int) -> tuple[float, int] | None:
        """Level and index of the first of the last ``steps`` steps of the ``n``-step schedule."""
        sched.set_timesteps(n, device=device)
        sig = _step_sigmas(sched)
        return (float(sig[len(sig) - steps]), len(sig) - steps) if len(sig) >= steps else None

    top = tail(steps)
    _check_covers(name, target, top[0] if top else 0.0, steps)
    lo, hi = steps, n_max  # invariant: tail(lo) starts at or above target; binary search for the largest n
    last = tail(hi)
    if last is not None and last[0] >= target:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = tail(mid)
        lo, hi = (mid, hi) if cand is not None and cand[0] >= target else (lo, mid)
    S, k = tail(lo)
    if truncation == "slice":  # LMS: its order ramp reads the absolute step index, so cut the arrays instead
        sched.timesteps, sched.sigmas = sched.timesteps[k:], sched.sigmas[k:]
        return list(sched.timesteps), S
    sched.set_begin_index(k * sched.order)  # as diffusers' img2img (order-2: interleaved arrays, index 2 k)
    return list(sched.timesteps)[k * sched.order:], S


# ----------------------------------------------------------------------------- model calls
def _call_sigma(sched, t) -> float:
    """The VE level at which the scheduler's update reads the model output at timestep ``t``."""
    if not hasattr(sched, "sigmas"):  # VP table schedulers index alphas_cumprod by the timestep
        return float(_table_sigmas(sched)[int(t)])
    idx = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
    if hasattr(sched, "sigmas_interpol") and not sched.state_in_first_order:
        # KDPM2's midpoint evaluation reads sigmas_interpol[i], the ancestral variant's sigmas_interpol[i - 1]
        ancestral = any(c.__name__ == "KDPM2AncestralDiscreteScheduler" for c in type(sched).__mro__)
        return float(sched.sigmas_interpol[idx - 1 if ancestral else idx])
    return float(sched.sigmas[idx])


def _model_output(sched, space: str, score: CountedScore, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The VE score at ``(x, sigma)`` converted to what ``sched.step`` expects from the model."""
    s = score(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
    if space == "ve":
        return s
    denoised = x + sigma**2 * s
    if space == "edm":  # invert D = c_skip x + c_out F with the scheduler's own preconditioning
        one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        sig = torch.tensor(sigma, dtype=torch.float64)
        c_skip = float(sched.precondition_outputs(one, zero, sig))
        c_out = float(sched.precondition_outputs(zero, one, sig))
        return (denoised - c_skip * x) / c_out
    prediction = sched.config.prediction_type
    eps = -sigma * s
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return denoised
    alpha = 1 / math.sqrt(1 + sigma**2)  # v_prediction: v = alpha eps - sigma_t x0
    return alpha * eps - sigma * alpha * denoised


def _end_sigma(sched, space: str, t_last) -> float:
    """The VE level the schedule stops at (0 unless the config ends above 0)."""
    if space == "ve":
        return 0.0  # the last predictor step's mean is the Tweedie step at sigma_min
    if hasattr(sched, "sigmas"):
        return float(sched.sigmas[len(sched.timesteps)])
    if hasattr(sched, "previous_timestep"):  # DDPM
        prev = int(sched.previous_timestep(t_last))
        abar = float(sched.alphas_cumprod[prev]) if prev >= 0 else 1.0
    else:  # DDIM, PNDM: one fixed stride, then final_alpha_cumprod
        prev = int(t_last) - sched.config.num_train_timesteps // sched.num_inference_steps
        abar = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
    return math.sqrt(max(1 - abar, 0.0) / abar)


def _run_score_sde_ve(sched, score: CountedScore, x: torch.Tensor, generator) -> torch.Tensor:
    """ScoreSdeVePipeline's loop: ``correct_steps`` Langevin corrector steps, then the reverse-diffusion
    predictor; the last predictor mean (a Tweedie step at ``sigma_min``) is the result."""
    for i, t in enumerate(sched.timesteps):
        sigma = torch.full((x.shape[0],), float(sched.sigmas[i]), dtype=x.dtype, device=x.device)
        for _ in range(sched.config.correct_steps):
            x = sched.step_correct(score(x, sigma), x, generator=generator).prev_sample
        out = sched.step_pred(score(x, sigma), t, x, generator=generator)
        x, x_mean = out.prev_sample, out.prev_sample_mean
    return x_mean
