"""Reverse-S/ODE integrators for VE scores, started from a per-sample noise level.

Every integrator is one plain function with one signature (as in k-diffusion):

    sample_xxx(score, x, sigmas, *, generator=None, callback=None, disable=True, **knobs) -> (x, nfe)

``x [B, *shape]`` sits at noise level ``sigmas[0] [B]``; ``sigmas [N+1, B]`` is a per-sample,
decreasing schedule. The functions walk it and return the state at ``sigmas[-1]`` and the number of
score evaluations per sample. When a schedule ends at 0, the last step (``sigma -> 0``) is the
Tweedie step ``D(x, sigma) = x + sigma^2 s(x, sigma)`` (for the Karras samplers it coincides with
their Euler step to 0). Schedules are data, built by the small ``get_sigmas_*`` functions.

``integrate(name, ...)`` builds the schedule, dispatches by name (or to a diffusers scheduler,
see :mod:`dlg_sampler.schedulers`) and is what "vanilla" sampling and DLG's denoising both call.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm.auto import trange

from .schedulers import warm_start
from .scores import CountedScore, Score, append_dims, check_sigma_start, check_steps, randn_like

#: Default end of the integrated stretch before the final Tweedie step (the paper's Tweedie level).
SIGMA_END = 0.01


# ----------------------------------------------------------------------------- helpers
def _noise_unless_last(std: torch.Tensor, sigma_next: torch.Tensor, x: torch.Tensor, generator) -> torch.Tensor:
    """``std * z``, except for samples whose next level is 0 (the step to 0 is the noise-free Tweedie step)."""
    return std * append_dims((sigma_next > 0).to(x.dtype), x.ndim) * randn_like(x, generator)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The PF-ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma`` (= ``-sigma s``)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


# ----------------------------------------------------------------------------- schedules
def get_sigmas_karras(n: int, sigma_start: torch.Tensor, sigma_end: torch.Tensor | float, rho: float = 7.0,
                      append_zero: bool = True) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 per sample: ``n`` levels from ``sigma_start [B]`` to ``sigma_end``, ``[n(+1), B]``."""
    sigma_end = torch.minimum(torch.as_tensor(sigma_end, dtype=sigma_start.dtype, device=sigma_start.device), sigma_start)
    ramp = torch.linspace(0, 1, n, device=sigma_start.device, dtype=sigma_start.dtype)[:, None] if n > 1 else \
        torch.zeros(1, 1, device=sigma_start.device, dtype=sigma_start.dtype)
    lo, hi = sigma_end ** (1 / rho), sigma_start ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])]) if append_zero else sigmas


def get_sigmas_geometric(n: int, sigma_start: torch.Tensor, sigma_end: torch.Tensor | float,
                         append_zero: bool = True) -> torch.Tensor:
    """The VE SDE's own discretisation (score_sde): ``n`` levels geometric from ``sigma_start [B]`` to ``sigma_end``."""
    sigma_end = torch.minimum(torch.as_tensor(sigma_end, dtype=sigma_start.dtype, device=sigma_start.device), sigma_start)
    ramp = torch.linspace(0, 1, n, device=sigma_start.device, dtype=sigma_start.dtype)[:, None] if n > 1 else \
        torch.zeros(1, 1, device=sigma_start.device, dtype=sigma_start.dtype)
    sigmas = torch.exp(sigma_start.log() + ramp * (sigma_end.log() - sigma_start.log()))
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])]) if append_zero else sigmas


# ----------------------------------------------------------------------------- integrators
@torch.no_grad()
def sample_reverse_diffusion(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                             callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Reverse-diffusion predictor (Song et al. 2021, VE): ``x <- x + (s_i^2 - s_{i+1}^2) s + sqrt(s_i^2 - s_{i+1}^2) z``."""
    score = CountedScore(score)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, x_mean = _reverse_diffusion_step(score, x, sigmas[i], sigmas[i + 1], generator)
        _report(callback, x, i, sigmas[i], x_mean)
    return x, score.nfe


def _reverse_diffusion_step(score: Score, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                            generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse-diffusion step from ``sigma`` to ``sigma_next``: the new state and its noise-free mean."""
    var = append_dims(sigma**2 - sigma_next**2, x.ndim)
    x_mean = x + var * score(x, sigma)
    return x_mean + _noise_unless_last(var.sqrt(), sigma_next, x, generator), x_mean


@torch.no_grad()
def sample_pc(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, snr: float = 0.16, corrector_steps: int = 1,
              generator=None, callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Predictor-corrector (Song et al. 2021): Langevin corrector with signal-to-noise ratio ``snr``, then the RD predictor."""
    score = CountedScore(score)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Corrector: Langevin steps at sigma_i with the step size set by snr.
        for _ in range(corrector_steps):
            grad, noise = score(x, sigma), randn_like(x, generator)
            grad_norm = grad.flatten(1).norm(dim=-1)
            noise_norm = noise.flatten(1).norm(dim=-1)
            eps = append_dims(2 * (snr * noise_norm / grad_norm.clamp_min(1e-12)) ** 2, x.ndim)
            x = x + eps * grad + (2 * eps).sqrt() * noise
        # Predictor: reverse diffusion to sigma_{i+1}.
        x, x_mean = _reverse_diffusion_step(score, x, sigma, sigma_next, generator)
        _report(callback, x, i, sigma, x_mean)
    return x, score.nfe


@torch.no_grad()
def sample_euler_maruyama(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                          callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Euler-Maruyama on the reverse VE SDE ``dx = -g^2 s dt + g dw``, ``g^2 dt = d(sigma^2) = 2 sigma^2 dlog(sigma)``.

    The drift and diffusion are evaluated at the current level (unlike the reverse-diffusion predictor,
    which uses the exact variance gap); the final step to 0 is the Tweedie step.
    """
    score = CountedScore(score)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if (sigma_next > 0).all():
            g2dt = append_dims(2 * sigma**2 * (sigma / sigma_next).log(), x.ndim)
            x_mean = x + g2dt * score(x, sigma)
            x = x_mean + g2dt.sqrt() * randn_like(x, generator)
        else:
            x = x_mean = score.denoise(x, sigma)
        _report(callback, x, i, sigma, x_mean)
    return x, score.nfe


@torch.no_grad()
def sample_ode_rk45(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                    generator=None, callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Probability-flow ODE ``dx/dsigma = -sigma s(x, sigma)`` with scipy's adaptive RK45 (Song et al. 2021).

    Each sample travels from ``sigmas[0]`` to its last positive level along ``sigma(u) = sigma_0^(1-u) sigma_end^u``,
    ``u in [0, 1]`` (a common clock for per-sample levels); the solver takes at most ``1 / (len(sigmas) - 1)``
    in ``u`` per step, so the schedule's length sets a minimum number of steps. NFE is the solver's count.
    A schedule ending at 0 finishes with the Tweedie step.
    """
    score = CountedScore(score)
    ends_at_zero = bool((sigmas[-1] == 0).all())
    sigma_0, sigma_end = sigmas[0].double(), (sigmas[-2] if ends_at_zero else sigmas[-1]).double()
    log_ratio = (sigma_0 / sigma_end).log()  # [B], >= 0
    shape, device, dtype = x.shape, x.device, x.dtype

    def sigma_at(u: float) -> torch.Tensor:
        return sigma_0 * torch.exp(-u * log_ratio)

    def ode_func(u: float, y: np.ndarray) -> np.ndarray:
        sigma = sigma_at(u)
        xt = torch.from_numpy(y).reshape(shape).to(device, dtype)
        dx_du = append_dims(sigma**2 * log_ratio, len(shape)).to(dtype) * score(xt, sigma.to(dtype))
        return dx_du.double().cpu().numpy().reshape(-1)

    n_intervals = max(len(sigmas) - 1 - int(ends_at_zero), 1)
    if (log_ratio > 0).any():
        sol = solve_ivp(ode_func, (0.0, 1.0), x.double().cpu().numpy().reshape(-1), rtol=rtol, atol=atol,
                        method="RK45", max_step=1.0 / n_intervals)
        x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device, dtype)
    if ends_at_zero:
        x = score.denoise(x, sigma_end.to(dtype))
    _report(callback, x, len(sigmas) - 2, sigmas[-1], x)
    return x, score.nfe


@torch.no_grad()
def sample_karras_heun(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                       callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Karras et al. (2022) Algorithm 1: deterministic Heun steps; Euler (= Tweedie) for a step to 0."""
    score = CountedScore(score)
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x, denoised = _heun_step(score, x, t_cur, t_next)
        _report(callback, x, i, t_cur, denoised)
    return x, score.nfe


def _heun_step(score: CountedScore, x: torch.Tensor, t_cur: torch.Tensor,
               t_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Karras et al.'s Algorithm 1 from ``t_cur [B]`` to ``t_next [B]``: ``(x_next, denoised at t_cur)``."""
    # Euler step.
    denoised = score.denoise(x, t_cur)
    d_cur = to_d(x, t_cur, denoised)
    x_next = x + append_dims(t_next - t_cur, x.ndim) * d_cur
    # Apply 2nd order correction.
    if (t_next > 0).all():
        d_prime = to_d(x_next, t_next, score.denoise(x_next, t_next))
        x_next = x + append_dims(t_next - t_cur, x.ndim) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, denoised


@torch.no_grad()
def sample_karras_stochastic(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, S_churn: float = 30.0,
                             S_tmin: float = 0.01, S_tmax: float = 1.0, S_noise: float = 1.007, generator=None,
                             callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Karras et al. (2022) Algorithm 2 (defaults: the paper's CIFAR-10 settings)."""
    score = CountedScore(score)
    n = len(sigmas) - 1
    for i in trange(n, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        # Increase noise temporarily.
        in_range = (t_cur >= S_tmin) & (t_cur <= S_tmax)
        gamma = torch.where(in_range, min(S_churn / n, math.sqrt(2) - 1), 0.0).to(t_cur.dtype)
        t_hat = t_cur + gamma * t_cur
        x_hat = x + append_dims((t_hat**2 - t_cur**2).sqrt(), x.ndim) * S_noise * randn_like(x, generator)
        # Euler step from t_hat, then the 2nd order correction.
        x, denoised = _heun_step(score, x_hat, t_hat, t_next)
        _report(callback, x, i, t_cur, denoised)
    return x, score.nfe


@torch.no_grad()
def sample_dpmpp_2m(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None,
                    disable: bool = True) -> tuple[torch.Tensor, int]:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) on per-sample VE levels.

    With ``t = -log sigma`` and ``h = t_next - t``: ``x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D'``,
    where ``D' = D`` on the first step and ``(1 + 1 / 2r) D - (1 / 2r) D_prev`` after it (``r = h_prev / h``). One
    model evaluation per step; the step to 0 is the Tweedie step ``x = D(x, sigma)``.
    """
    score = CountedScore(score)
    denoised_prev, h_prev = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = score.denoise(x, sigma)
        if (sigma_next == 0).all():
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            d = denoised
            if denoised_prev is not None:  # second-order multistep correction
                r = append_dims(h_prev / h, x.ndim)
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
            ratio = append_dims(sigma_next / sigma, x.ndim)
            x = ratio * x + (1 - ratio) * d
            h_prev = h
        denoised_prev = denoised
        _report(callback, x, i, sigma, denoised)
    return x, score.nfe


@torch.no_grad()
def sample_unipc(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None,
                 disable: bool = True) -> tuple[torch.Tensor, int]:
    """UniPC (Zhao et al. 2023; order 2, ``B(h) = e^h - 1``, data prediction) on per-sample VE levels.

    With ``lambda = -log sigma``, ``h = lambda_t - lambda_s`` and ``r = sigma_t / sigma_s = e^-h``:

    - **UniP** (predictor; the update of DPM-Solver++(2M)): ``x_t = r x_s + (1 - r) (D_s + D1 / 2)`` with
      ``D1 = (D_prev - D_s) / r_k``, ``r_k = (lambda_prev - lambda_s) / h``; first order on the first and the last
      step (a step to 0 is the Tweedie step ``x = D_s``).
    - **UniC** (corrector): once ``D_t`` is evaluated at the predicted ``x_t`` for the next step, the step
      ``s -> t`` is redone with it, ``x_t = r x_s + (1 - r) (D_s + c_0 D1 + c_1 (D_t - D_s))``, ``(c_0, c_1)``
      matching the Taylor terms to order 2 (:func:`_unic_coefficients`). ``D_t`` is not re-evaluated at the
      corrected point, so UniPC costs one model evaluation per step, as the predictor alone does.
    """
    score = CountedScore(score)
    last = len(sigmas) - 2
    prev = None  # the step that produced x: (x_s, sigma_s, lambda_s, D_s, (D1, r_k) or None)
    for i in trange(last + 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = score.denoise(x, sigma)
        lam = -sigma.log()
        if prev is not None:  # UniC: redo the last step with the evaluation just made
            x_s, sigma_s, lam_s, d_s, d1 = prev
            c0, c1 = _unic_coefficients(lam - lam_s, None if d1 is None else d1[1])
            correction = append_dims(c1, x.ndim) * (denoised - d_s)
            if d1 is not None:
                correction = correction + append_dims(c0, x.ndim) * d1[0]
            ratio = append_dims(sigma / sigma_s, x.ndim)
            x = ratio * x_s + (1 - ratio) * (d_s + correction)
        if (sigma_next == 0).all():  # the Tweedie step
            x_next, prev = denoised, None
        else:  # UniP
            d1 = None
            if prev is not None and i < last:
                h = -sigma_next.log() - lam
                r_k = (prev[2] - lam) / h
                d1 = ((prev[3] - denoised) / append_dims(r_k, x.ndim), r_k)
            ratio = append_dims(sigma_next / sigma, x.ndim)
            x_next = ratio * x + (1 - ratio) * (denoised + (0.5 * d1[0] if d1 is not None else 0))
            prev = (x, sigma, lam, denoised, d1)
        _report(callback, x_next, i, sigma, denoised)
        x = x_next
    return x, score.nfe


def _unic_coefficients(h: torch.Tensor, r_k: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """UniC's ``(c_0, c_1)`` for a step of length ``h [B]`` (``B(h) = e^h - 1``); ``c_1 = 1/2`` without an earlier
    point, else the solution of ``c_0 + c_1 = phi_2 / B``, ``r_k c_0 + c_1 = 2 phi_3 / B`` with
    ``phi_2 = (e^-h - 1) / -h - 1`` and ``phi_3 = phi_2 / -h - 1/2`` (UniPC's ``bh2`` rule in data prediction)."""
    if r_k is None:
        return None, torch.full_like(h, 0.5)
    hh = -h
    b_h = torch.expm1(hh)
    phi_2 = b_h / hh - 1
    phi_3 = phi_2 / hh - 0.5
    b0, b1 = phi_2 / b_h, 2 * phi_3 / b_h
    c0 = (b0 - b1) / (1 - r_k)
    return c0, b0 - c0


def _report(callback, x, i, sigma, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})


#: name -> (integrator function, schedule builder).
INTEGRATORS: dict[str, Callable[..., tuple[torch.Tensor, int]]] = {
    "reverse_diffusion": sample_reverse_diffusion,
    "pc": sample_pc,
    "euler_maruyama": sample_euler_maruyama,
    "ode_rk45": sample_ode_rk45,
    "karras_heun": sample_karras_heun,
    "karras_stochastic": sample_karras_stochastic,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
}

#: The score_sde integrators walk the VE SDE's geometric grid; the Karras samplers (and RK45's clock) use rho=7.
_GEOMETRIC = {"reverse_diffusion", "pc", "euler_maruyama"}


def get_schedule(name: str, steps: int, sigma_start: torch.Tensor, sigma_end: float = SIGMA_END,
                 append_zero: bool = True, rho: float = 7.0) -> torch.Tensor:
    """The per-sample schedule ``[steps + 1, B]`` integrator ``name`` walks: ``steps`` intervals from ``sigma_start``.

    With ``append_zero`` the last interval is the Tweedie step from ``sigma_end`` to 0, otherwise the
    schedule ends at ``min(sigma_start, sigma_end)``.
    """
    n = steps if append_zero else steps + 1
    if name in _GEOMETRIC:
        return get_sigmas_geometric(n, sigma_start, sigma_end, append_zero)
    return get_sigmas_karras(n, sigma_start, sigma_end, rho, append_zero)


def check_integrator(name) -> None:
    """Raise a clear error unless ``name`` is a core integrator name or a diffusers scheduler instance."""
    if isinstance(name, str) and name in INTEGRATORS:
        return
    from diffusers import SchedulerMixin

    if not isinstance(name, SchedulerMixin):
        raise ValueError(
            f"unknown integrator {name!r}: use one of {sorted(INTEGRATORS)} or a diffusers scheduler instance "
            "(e.g. DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))."
        )


def integrate(name, score: Score, x: torch.Tensor, sigma_start, steps: int, *, generator: torch.Generator | None = None,
              sigma_end: float = SIGMA_END, rho: float = 7.0, callback=None, disable: bool = True,
              **kwargs) -> tuple[torch.Tensor, int]:
    """Integrate the reverse S/ODE from ``x [B, *shape]`` at levels ``sigma_start [B]`` to clean samples.

    Args:
        name: a key of ``INTEGRATORS`` or a diffusers scheduler instance (warm start, see
            :func:`dlg_sampler.schedulers.warm_start`).
        score: ``score(x [B, *shape], sigma [B]) -> [B, *shape]``, the VE score.
        x: ``[B, *shape]`` noisy samples; ``sigma_start``: ``[B]`` (or scalar) their noise levels.
        steps: solver steps: ``steps - 1`` steps down to ``sigma_end`` plus the final Tweedie step to 0
            (a diffusers scheduler: its ``num_inference_steps`` over the stretch it integrates).
        generator: randomness for the stochastic integrators.
        sigma_end: last positive level of the schedule (ignored by schedulers).
        kwargs: integrator knobs (``snr``, ``S_churn``, ``rtol`` ...).

    Returns:
        ``(x0 [B, *shape], nfe)`` with ``nfe`` the score evaluations per sample.
    """
    check_integrator(name)
    steps = check_steps(steps)
    sigma_start = check_sigma_start(sigma_start, x)
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf: pass finite initial samples (check the upstream sampler or data).")
    if not isinstance(name, str):
        return warm_start(name, score, x, sigma_start, steps, generator=generator, **kwargs)
    sigmas = get_schedule(name, steps, sigma_start, sigma_end, append_zero=True, rho=rho)
    return INTEGRATORS[name](score, x, sigmas, generator=generator, callback=callback, disable=disable, **kwargs)


def count_nfe(integrator, steps: int, *, dlg: bool) -> int:
    """Score evaluations per sample of ``steps`` denoising steps, counted by running ``integrator`` on a zero score.

    ``dlg=True``: as ``DLGSampler.denoise`` runs it (down to the Tweedie level, plus the Tweedie step);
    ``dlg=False``: as :func:`integrate` runs it (with its own last step to 0). Adaptive ``ode_rk45`` counts the
    minimum.
    """
    x, sigma = torch.zeros(1, 1), torch.ones(1)
    score = CountedScore(lambda x, sigma: torch.zeros_like(x))
    if isinstance(integrator, str) and dlg:
        INTEGRATORS[integrator](score, x, get_schedule(integrator, steps, sigma, SIGMA_END, append_zero=False))
        return score.nfe + 1
    return integrate(integrator, score, x, sigma, steps)[1]


def steps_for_nfe(integrator, budget: int, *, dlg: bool) -> int | None:
    """The most solver steps whose NFE per sample (:func:`count_nfe`) fits ``budget``; ``None`` if one step does not."""
    best = None
    for steps in range(1, budget + 1):
        if count_nfe(integrator, steps, dlg=dlg) > budget:
            break
        best = steps
    return best
