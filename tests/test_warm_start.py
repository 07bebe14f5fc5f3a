"""Warm-starting diffusers schedulers from exact noisy samples of a Gaussian mixture (docs/design.md, *Inside diffusers*).

Tolerances were measured (n = 8192, 50 steps, S in {0.5, 2, 10}): every supported scheduler gave sliced W1
<= 0.066, mode-weight error <= 0.016 and within-mode spread ratio in [0.88, 1.06] (floor of the metric with
exact samples: W1 ~0.02), while a wrong sample-space scaling at S >= 2 gave W1 >= 0.15 and mode-weight error
>= 0.045 (stochastic schedulers) or spread >= 2.1 (deterministic ones); exact samples scaled by 1.1 give W1
~0.21. ``test_wrong_scaling_fails_the_same_check`` keeps that margin honest.
"""

import copy
import functools
import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       IPNDMScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, ScoreSdeVeScheduler, UniPCMultistepScheduler)

from dlg_sampler import GaussianMixture, integrate
from dlg_sampler.schedulers import supported_schedulers, warm_start

N, STEPS = 8192, 50
TOL_SW, TOL_MODES, SPREAD = 0.10, 0.03, (0.8, 1.25)
MIX = GaussianMixture.random(num_modes=4, dim=4, spread=3.0, std=0.3, seed=3, shape=(1, 2, 2))

NO_CLIP = {"clip_sample": False}  # the mixture spans ~[-6, 6]; DDPM/DDIM clip x0 to [-1, 1] by default
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def same(steps):
    return steps


def plus_tweedie(steps):  # the schedule stops above 0: one Tweedie step finishes it
    return steps + 1


def two_stage(steps):  # Heun / KDPM2: two model calls per step, one for the final step to 0
    return 2 * steps - 1


#: id -> (scheduler factory, expected NFE for `steps` solver steps)
CASES = {
    "ddpm": (lambda: DDPMScheduler(**NO_CLIP), same),
    "ddpm-sample": (lambda: DDPMScheduler(prediction_type="sample", **NO_CLIP), same),
    "ddim": (lambda: DDIMScheduler(**NO_CLIP), same),
    "ddim-v": (lambda: DDIMScheduler(prediction_type="v_prediction", **NO_CLIP), same),
    "ddim-trailing": (lambda: DDIMScheduler(timestep_spacing="trailing", **NO_CLIP), same),
    "ddim-sd": (lambda: DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, steps_offset=1, **NO_CLIP), plus_tweedie),
    "dpm++2m": (lambda: DPMSolverMultistepScheduler(), same),
    "dpm++3m": (lambda: DPMSolverMultistepScheduler(solver_order=3), same),
    "sde-dpm++": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), same),
    "dpm++2m-karras": (lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True), same),
    "dpm++2m-sigma-min": (lambda: DPMSolverMultistepScheduler(final_sigmas_type="sigma_min"), plus_tweedie),
    "dpm-singlestep": (lambda: DPMSolverSinglestepScheduler(), same),
    "unipc": (lambda: UniPCMultistepScheduler(), same),
    "deis": (lambda: DEISMultistepScheduler(), plus_tweedie),  # DEIS ends at the table's sigma_min
    "euler": (lambda: EulerDiscreteScheduler(), same),
    "euler-v": (lambda: EulerDiscreteScheduler(prediction_type="v_prediction"), same),
    "euler-karras": (lambda: EulerDiscreteScheduler(use_karras_sigmas=True), same),
    "euler-ancestral": (lambda: EulerAncestralDiscreteScheduler(), same),
    "heun": (lambda: HeunDiscreteScheduler(), two_stage),
    "kdpm2": (lambda: KDPM2DiscreteScheduler(), two_stage),
    "kdpm2-ancestral": (lambda: KDPM2AncestralDiscreteScheduler(), two_stage),
    "lms": (lambda: LMSDiscreteScheduler(), same),
    "pndm": (lambda: PNDMScheduler(skip_prk_steps=True), lambda s: s + 2),  # PLMS repeat + Tweedie
    "score-sde-ve": (lambda: ScoreSdeVeScheduler(), lambda s: 2 * s),  # corrector + predictor
    "edm-euler": (lambda: EDMEulerScheduler(), same),
    "edm-euler-v": (lambda: EDMEulerScheduler(prediction_type="v_prediction"), same),
    "edm-dpm": (lambda: EDMDPMSolverMultistepScheduler(), same),
}


# ----------------------------------------------------------------------------- metrics
_PROJ = torch.nn.functional.normalize(torch.randn(MIX.dim, 32, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), dim=0)


@functools.lru_cache(maxsize=None)
def _reference_quantiles(n: int) -> torch.Tensor:
    """Quantiles of the projected mixture at ``(i + 1/2) / n`` from 10^5 exact samples, ``[n, P]``."""
    ref = MIX.sample(100_000, generator=torch.Generator().manual_seed(99)).reshape(100_000, -1).double() @ _PROJ
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.stack([torch.quantile(ref[:, j], q) for j in range(_PROJ.shape[1])], 1)


def sliced_w1(x: torch.Tensor) -> float:
    """Sliced W1 between the samples ``x`` and the mixture (the reference's noise is negligible)."""
    proj = (x.reshape(len(x), -1).double() @ _PROJ).sort(0).values
    return float((proj - _reference_quantiles(len(x))).abs().mean())


def mismatch(x: torch.Tensor) -> str | None:
    """None if ``x`` matches the mixture (sliced W1, mode weights, within-mode spread), else what is off."""
    flat = x.reshape(len(x), -1).double()
    label = MIX.responsibilities(flat).argmax(-1)
    spread = float(((flat - MIX.means[label]) ** 2).mean().sqrt() / MIX.stds[0])
    sw, modes = sliced_w1(x), float((MIX.mode_weights(x) - MIX.weights).abs().max())
    if not torch.isfinite(x).all() or sw > TOL_SW or modes > TOL_MODES or not SPREAD[0] < spread < SPREAD[1]:
        return f"sliced W1 {sw:.3f}, mode-weight error {modes:.3f}, spread ratio {spread:.2f}"
    return None


def counting(score):
    """``score`` with a call counter (``.calls``)."""
    def wrapped(x, sigma):
        wrapped.calls += 1
        return score(x, sigma)
    wrapped.calls = 0
    return wrapped


def start(level, n=N, seed=0):
    """Exact samples of ``p_sigma`` at ``level`` (a number, or "mixed": log-uniform per sample in [0.2, 5])."""
    g = torch.Generator().manual_seed(seed)
    if level == "mixed":
        sigma = torch.empty(n).uniform_(math.log(0.2), math.log(5.0), generator=g).exp()
    else:
        sigma = torch.full((n,), float(level))
    return MIX.sample(n, sigma, generator=g), sigma


# ----------------------------------------------------------------------------- tests
def test_every_supported_class_is_covered():
    covered = {type(factory()).__name__ for factory, _ in CASES.values()}
    assert covered == set(supported_schedulers())


@pytest.mark.parametrize("level", [0.5, 2.0, 10.0, "mixed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_warm_start_matches_mixture_and_counts_nfe(case, level):
    factory, expected_nfe = CASES[case]
    x, sigma = start(level)
    score = counting(MIX.score)
    x0, nfe = warm_start(factory(), score, x, sigma, STEPS, generator=torch.Generator().manual_seed(1))
    assert x0.shape == x.shape and x0.dtype == x.dtype
    assert nfe == score.calls == expected_nfe(STEPS)
    assert mismatch(x0) is None, mismatch(x0)


@pytest.mark.parametrize("case, bug", [
    ("ddim", "vp"), ("dpm++2m", "vp"), ("ddpm", "vp"), ("sde-dpm++", "vp"),  # VE samples fed as x_t
    ("euler", "k"), ("euler-ancestral", "k"), ("edm-euler", "k"), ("score-sde-ve", "k"),  # x_t fed as VE
])
def test_wrong_scaling_fails_the_same_check(case, bug):
    x, sigma = start(2.0)
    assert mismatch(MIX.sample(N, generator=torch.Generator().manual_seed(5))) is None
    assert mismatch(1.1 * MIX.sample(N, generator=torch.Generator().manual_seed(5))) is not None
    # A bridge that skipped (VP) or wrongly applied (sigma-space) the 1/sqrt(1 + S^2) map: the scheduler
    # would see exactly what the right bridge sees from these inputs.
    factor = math.sqrt(1 + 2.0**2) if bug == "vp" else 1 / math.sqrt(1 + 2.0**2)
    x0, _ = warm_start(CASES[case][0](), MIX.score, x * factor, sigma, STEPS, generator=torch.Generator().manual_seed(1))
    assert mismatch(x0) is not None


@pytest.mark.parametrize("case", ["heun", "kdpm2", "kdpm2-ancestral", "euler", "lms", "euler-ancestral",
                                  "edm-euler", "edm-dpm"])
def test_score_is_evaluated_where_the_scheduler_scales_its_input(case, monkeypatch):
    """At every model call, the scheduler's own ``scale_model_input`` implies the level we evaluate at."""
    factory, _ = CASES[case]
    scheduler = factory()
    cls, scales, sigmas = type(scheduler), [], []
    original = cls.scale_model_input

    def spy(self, sample, timestep):
        out = original(self, sample, timestep)
        scales.append(float((out / sample).flatten()[0]))
        return out

    def score(x, sigma):
        sigmas.append(float(sigma[0]))
        return MIX.score(x, sigma)

    monkeypatch.setattr(cls, "scale_model_input", spy)
    x, sigma = start(2.0, n=16)
    warm_start(scheduler, score, x, sigma, 6)
    sigma_data = scheduler.config.get("sigma_data", 1.0)
    expected = [1 / math.sqrt(s**2 + sigma_data**2) for s in sigmas]
    assert len(scales) == len(sigmas) and np.allclose(scales, expected, rtol=1e-5), (scales, expected)


def state(scheduler) -> dict:
    return copy.deepcopy({k: v for k, v in vars(scheduler).items() if k != "_internal_dict"})


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))  # KDPM2 keeps a NaN in sigmas_interpol
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_scheduler_is_not_mutated_and_history_does_not_leak(case):
    scheduler = CASES[case][0]()
    scheduler.set_timesteps(7)
    before, config = state(scheduler), dict(scheduler.config)
    x, sigma = start("mixed", n=64)
    runs = [warm_start(scheduler, MIX.score, x, sigma, 5, generator=torch.Generator().manual_seed(3))[0]
            for _ in range(2)]
    assert same_state(state(scheduler), before) and dict(scheduler.config) == config
    assert torch.equal(runs[0], runs[1])  # a multistep history left over from the first call would differ


def test_groups_run_each_sigma_group_from_its_own_level():
    """``groups=4``: four sub-batches by sigma, each from its own common level; same NFE per sample, and far
    less re-noising of low-sigma samples (measured: sliced W1 0.204 -> 0.063 for Euler, 5 steps)."""
    x, sigma = start("mixed")
    calls = []

    def score(x, s):
        calls.append((len(x), float(s.max())))
        return MIX.score(x, s)

    x1, nfe1 = warm_start(EulerDiscreteScheduler(), MIX.score, x, sigma, 5, generator=torch.Generator().manual_seed(1))
    x4, nfe4 = warm_start(EulerDiscreteScheduler(), score, x, sigma, 5, generator=torch.Generator().manual_seed(1),
                          groups=4)
    assert nfe1 == nfe4 == 5 and len(calls) == 4 * 5 and {n for n, _ in calls} == {N // 4}
    first_levels = [level for _, level in calls[::5]]  # each group starts just above its own largest sigma
    quartiles = sigma.sort().values.reshape(4, -1).max(1).values.tolist()
    assert all(q <= s < 1.01 * q for q, s in zip(quartiles, first_levels)), (quartiles, first_levels)
    assert sliced_w1(x4) < 0.5 * sliced_w1(x1)


def test_integrate_dispatches_schedulers_here():
    x, sigma = start("mixed", n=256)
    a = integrate(DPMSolverMultistepScheduler(), MIX.score, x, sigma, 8, generator=torch.Generator().manual_seed(0))
    b = warm_start(DPMSolverMultistepScheduler(), MIX.score, x, sigma, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == 8


def test_config_is_respected_clip_sample():
    """DDPM/DDIM's default ``clip_sample=True`` clips x0 predictions to [-1, 1]: kept, not silently turned off."""
    x, sigma = start(2.0, n=512)
    for scheduler in (DDIMScheduler(), DDPMScheduler()):
        x0, _ = warm_start(scheduler, MIX.score, x, sigma, 10, generator=torch.Generator().manual_seed(0))
        assert x0.abs().max() <= 1 + 1e-5 and x.abs().max() > 3
        assert scheduler.config.clip_sample is True


def test_unsupported_scheduler_or_object_raises():
    x, sigma = start(1.0, n=8)
    for bad in (IPNDMScheduler(), object()):
        with pytest.raises(TypeError, match="cannot be warm-started: supported diffusers schedulers"):
            warm_start(bad, MIX.score, x, sigma, 5)
    with pytest.raises(TypeError, match="IPNDMScheduler cannot be warm-started"):
        integrate(IPNDMScheduler(), MIX.score, x, sigma, 5)


@pytest.mark.parametrize("scheduler, level, steps, match", [
    (PNDMScheduler(), 1.0, 5, "skip_prk_steps=True"),
    (DDPMScheduler(variance_type="learned_range"), 1.0, 5, "variance_type='fixed_small'"),
    (DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"), 1.0, 5, "flow matching"),
    (DDIMScheduler(**SD_BETAS), 20.0, 5, "above DDIMScheduler's largest level 14.6"),  # scaled_linear tops at 14.6
    (EulerDiscreteScheduler(**SD_BETAS), 20.0, 5, "above EulerDiscreteScheduler's largest level"),  # custom route
    (UniPCMultistepScheduler(**SD_BETAS), 20.0, 5, "above UniPCMultistepScheduler's largest level 14.6"),
    (UniPCMultistepScheduler(**SD_BETAS, timestep_spacing="leading"), 10.0, 3,  # "leading" tops out lower
     "above 4.099, the highest level from which UniPCMultistepScheduler's own schedule runs 3 steps: .* Use more"),
    (EDMEulerScheduler(), 100.0, 5, "above EDMEulerScheduler's largest level 80"),
    (ScoreSdeVeScheduler(), 1.0, 1, "steps >= 2"),
    (DDIMScheduler(), 1.0, 0, "steps must be a positive integer"),
])
def test_configs_that_cannot_warm_start_raise_naming_the_fix(scheduler, level, steps, match):
    x, sigma = start(level, n=8)
    with pytest.raises(ValueError, match=match):
        warm_start(scheduler, MIX.score, x, sigma, steps)
