"""Reverse-S/ODE integrators for VE scores, started from a per-sample noise level.

Every integrator is one plain function with one signature (as in k-diffusion):

    sample_xxx(score, x, sigmas, *, generator=None, callback=None, disable=True, **knobs) -> (x, nfe)

``x [B, *shape]`` sits at noise level ``sigmas[0] [B]``; ``sigmas [N+1, B]`` is a per-sample,
decreasing schedule. The functions walk it and return the state at ``sigmas[-1]`` and the number of
score evaluations per sample. When a schedule ends at 0, the last step (``sigma -> 0``) is each solver's own
step to 0: for the one-step solvers the Tweedie step ``D(x, sigma) = x + sigma^2 s(x, sigma)`` (for the Karras
samplers it coincides with their Euler step to 0), for iPNDM and DEIS a multistep step. Schedules are data, built
by the small ``get_sigmas_*`` functions and :func:`get_schedule` (which level the step to 0 starts from:
``FINAL_STEPS``), or fitted to the model for a number of steps (:func:`fit_schedule`, GITS-style, at the end).

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

from .restart import _data_scale
from .schedulers import warm_start
from .scores import CountedScore, Score, append_dims, check_sigma_start, check_steps, randn_like

#: Default end of the integrated stretch before the final Tweedie step (the paper's Tweedie level).
SIGMA_END = 0.01

#: Time schedules: Karras et al.'s ramp (``rho``) or uniform in log-SNR (``-2 log sigma``: geometric in sigma).
SCHEDULES = ("karras", "logsnr")
LOGSNR = SCHEDULES[1]
#: ``integrate``'s schedule fitted to the model for the steps (GITS-style, :func:`fit_schedule`).
FITTED = "fitted"
#: A solve's ``schedule`` in words, after the solver's name (the integrator's own ramp: nothing).
SCHEDULE_WORDS = {None: "", "karras": " on a Karras ramp", LOGSNR: " on log-SNR-uniform levels",
                  FITTED: " on fitted levels"}

#: How a solve to 0 ends: ``"tweedie"``: the schedule's last positive level is ``sigma_end`` (the paper's Tweedie
#: level), evaluated once more for the step to 0; ``"solver"``: the same ramp with one more level, whose last one
#: (``sigma_end``) is replaced by 0, so the solver steps to 0 from the level above with its own data prediction (as
#: diffusers' multistep solvers do) and no evaluation is spent at ``sigma_end``. Same NFE for the same steps.
FINAL_STEPS = ("tweedie", "solver")
#: How the sampler's solves end by default: ``"tweedie"`` (denoise to ``tweedie_sigma``, then one more evaluation there
#: for the Tweedie step); ``"solver"`` spends the same NFE on one more solver level and steps to 0 with the solver's own
#: data prediction. Measured by paired seeds in docs/mixing.md.
FINAL_STEP = "tweedie"


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


def _hold(x_new: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``x_new [B, *shape]`` where the step moves (``sigma_next < sigma [B]``), else ``x``: a sample that starts at
    its end level (a chain selected at the Tweedie level) takes zero-length steps, whose multistep coefficients
    are 0 / 0; it stays where it is."""
    return torch.where(append_dims(sigma_next < sigma, x.ndim), x_new, x)


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
            x = _hold(ratio * x + (1 - ratio) * d, x, sigma, sigma_next)
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
            x = _hold(ratio * x_s + (1 - ratio) * (d_s + correction), x, sigma_s, sigma)
        if (sigma_next == 0).all():  # the Tweedie step
            x_next, prev = denoised, None
        else:  # UniP
            d1 = None
            if prev is not None and i < last:
                h = -sigma_next.log() - lam
                r_k = (prev[2] - lam) / h
                d1 = ((prev[3] - denoised) / append_dims(r_k, x.ndim), r_k)
            ratio = append_dims(sigma_next / sigma, x.ndim)
            x_next = _hold(ratio * x + (1 - ratio) * (denoised + (0.5 * d1[0] if d1 is not None else 0)), x, sigma,
                           sigma_next)
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


#: Adams-Bashforth coefficients for equal steps, newest derivative first (iPNDM's fixed multistep weights).
_AB_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_ipndm(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, max_order: int = 4, generator=None,
                 callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """iPNDM (Zhang & Chen 2023, the DEIS paper's improved PNDM): Adams-Bashforth on the PF-ODE in sigma.

    ``d_i = (x - D(x, sigma_i)) / sigma_i`` (= ``dx/dsigma``) at each level; ``x_{i+1} = x_i + (sigma_{i+1} -
    sigma_i) sum_j a_j d_{i-j}`` with the equal-step AB weights of order ``min(i + 1, max_order)`` (lower-order warm
    start, no pseudo Runge-Kutta steps). One model evaluation per step; the step to 0 is a multistep step too.
    """
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"max_order must be 1, 2, 3 or 4 (iPNDM's Adams-Bashforth orders), got {max_order!r}.")
    score = CountedScore(score)
    history: list[torch.Tensor] = []  # newest first
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = score.denoise(x, sigma)
        history = [to_d(x, sigma, denoised)] + history[:max_order - 1]
        d = sum(a * h for a, h in zip(_AB_COEFFICIENTS[len(history) - 1], history))
        x = x + append_dims(sigma_next - sigma, x.ndim) * d
        _report(callback, x, i, sigma, denoised)
    return x, score.nfe


@torch.no_grad()
def sample_deis(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 3, generator=None,
                callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """DEIS tAB (Zhang & Chen 2023) on the VE PF-ODE ``dx/dsigma = eps(x, sigma)``, ``eps = (x - D) / sigma``.

    Each step integrates the Lagrange polynomial through the last ``order`` evaluations ``(sigma_j, eps_j)`` exactly
    over ``[sigma_i, sigma_{i+1}]`` (per sample, any spacing): ``x_{i+1} = x_i + sum_j c_j eps_j``, ``c_j`` the
    integral of the j-th Lagrange basis polynomial (:func:`_lagrange_integrals`). Lower order while the history
    fills; one model evaluation per step.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 (DEIS tAB orders), got {order!r}.")
    score = CountedScore(score)
    eps: list[torch.Tensor] = []  # newest first
    knots: list[torch.Tensor] = []  # their levels [B]
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = score.denoise(x, sigma)
        eps, knots = ([to_d(x, sigma, denoised)] + eps)[:order], ([sigma] + knots)[:order]
        coefficients = _lagrange_integrals(knots, sigma, sigma_next)
        if len(knots) > 1:  # a sample whose history sits at one level (it started at its end level): an Euler step
            distinct = torch.stack([a != b for k, a in enumerate(knots) for b in knots[k + 1:]]).all(0)
            coefficients = [torch.where(distinct, c, sigma_next - sigma if j == 0 else torch.zeros_like(c))
                            for j, c in enumerate(coefficients)]
        x = _hold(x + sum(append_dims(c, x.ndim) * e for c, e in zip(coefficients, eps)), x, sigma, sigma_next)
        _report(callback, x, i, sigma, denoised)
    return x, score.nfe


def _lagrange_integrals(knots: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """``int_a^b l_j(s) ds`` for the Lagrange basis ``l_j`` on ``knots`` (up to 3 levels ``[B]`` each), by Simpson's
    rule, which is exact for these polynomials of degree <= 2: ``(b - a) / 6 (l_j(a) + 4 l_j(m) + l_j(b))``."""
    def basis(j: int, s: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(s)
        for k, knot in enumerate(knots):
            if k != j:
                out = out * (s - knot) / (knots[j] - knot)
        return out

    m = (a + b) / 2
    return [(b - a) / 6 * (basis(j, a) + 4 * basis(j, m) + basis(j, b)) for j in range(len(knots))]


@torch.no_grad()
def sample_restart(score: Score, x: torch.Tensor, sigmas: torch.Tensor, *, restart_min: float = 0.06,
                   restart_max: float = 0.3, restart_steps: int = 2, restarts: int = 1, rho: float = 7.0,
                   generator=None, callback=None, disable: bool = True) -> tuple[torch.Tensor, int]:
    """Restart sampling (Xu et al. 2023): Karras Heun steps along ``sigmas``, and ``restarts`` times, on reaching the
    level nearest ``restart_min`` (``sigma_j``, in log), a restart inside the one trajectory: lift exactly to
    ``t_max = max(restart_max, sigma_j)`` (``x + sqrt(t_max^2 - sigma_j^2) z``), then ``restart_steps`` Heun steps
    back to ``sigma_j`` on a Karras ramp. Defaults: the paper's interval [0.06, 0.30] (EDM sigma units); no chain
    persists between calls. NFE: the main Heun steps (``2 n - 1``) plus ``restarts * 2 restart_steps``.
    """
    score = CountedScore(score)
    j = int((sigmas[:-1].log().mean(1) - math.log(restart_min)).abs().argmin())  # among the levels steps start from
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        if i == j:
            for _ in range(restarts):
                t_max = t_cur.clamp_min(restart_max)
                x = x + append_dims((t_max**2 - t_cur**2).sqrt(), x.ndim) * randn_like(x, generator)
                ramp = get_sigmas_karras(restart_steps + 1, t_max, t_cur, rho, append_zero=False)
                for k in range(restart_steps):
                    x, _ = _heun_step(score, x, ramp[k], ramp[k + 1])
        x, denoised = _heun_step(score, x, t_cur, t_next)
        _report(callback, x, i, t_cur, denoised)
    return x, score.nfe


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
    "ipndm": sample_ipndm,
    "deis": sample_deis,
    "restart": sample_restart,
}

#: The score_sde integrators walk the VE SDE's geometric grid; the Karras samplers (and RK45's clock) use rho=7.
_GEOMETRIC = {"reverse_diffusion", "pc", "euler_maruyama"}


def get_schedule(name: str, steps: int, sigma_start: torch.Tensor, sigma_end: float = SIGMA_END,
                 append_zero: bool = True, rho: float = 7.0, *, schedule: str | torch.Tensor | None = None,
                 final_step: str = "tweedie") -> torch.Tensor:
    """The per-sample schedule ``[steps + 1, B]`` integrator ``name`` walks: ``steps`` intervals from ``sigma_start``.

    ``schedule``: ``"karras"`` (rho ramp) or ``"logsnr"`` (geometric); default: the integrator's own (the score_sde
    integrators walk the VE SDE's geometric grid, the others Karras'); or the levels themselves, a descending tensor
    of the :func:`schedule_levels` positive levels from ``sigma_start`` (e.g. :func:`fit_schedule`'s),
    shared by every sample. With ``append_zero`` the last interval steps
    to 0: from ``sigma_end`` (``final_step="tweedie"``, the Tweedie step) or from the level above it on a ramp one
    level longer (``final_step="solver"``, see ``FINAL_STEPS``); otherwise the schedule ends at
    ``min(sigma_start, sigma_end)``.
    """
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}.")
    solver_end = append_zero and final_step == "solver"
    n = schedule_levels(steps, append_zero, final_step)
    if isinstance(schedule, torch.Tensor):
        sigmas = _given_levels(schedule, n, sigma_start)
        sigmas = torch.cat([sigmas, torch.zeros_like(sigmas[:1])]) if append_zero and not solver_end else sigmas
    elif schedule not in (None, *SCHEDULES):
        raise ValueError(f"schedule must be one of {SCHEDULES}, a tensor of levels (or None: the integrator's own), "
                         f"got {schedule!r}.")
    elif schedule == "logsnr" or (schedule is None and name in _GEOMETRIC):
        sigmas = get_sigmas_geometric(n, sigma_start, sigma_end, append_zero and not solver_end)
    else:
        sigmas = get_sigmas_karras(n, sigma_start, sigma_end, rho, append_zero and not solver_end)
    if solver_end:  # the last level (sigma_end) becomes 0: the solver's own step to 0, no evaluation there
        sigmas = torch.cat([sigmas[:-1], torch.zeros_like(sigmas[:1])])
    return sigmas


def ramp_end_keeping_last_level(name: str, steps: int, base_steps: int, sigma_start: float, sigma_end: float,
                                schedule: str | None = None, rho: float = 7.0) -> float:
    """Where integrator ``name``'s solver-ended ramp (``final_step="solver"``, ``schedule`` as in
    :func:`get_schedule`) of ``steps`` steps from ``sigma_start`` must end for its last level before 0 to be that of
    its ``base_steps``-step ramp to ``sigma_end``: the same stretch walked in another number of steps. ``sigma_end``
    itself where ``base_steps`` or ``steps`` is below 2 (the last level is the start)."""
    n, m = base_steps + 1, steps + 1  # the ramps' levels, the last replaced by 0
    if base_steps < 2 or steps < 2 or n == m:
        return sigma_end
    if schedule == LOGSNR or (schedule is None and name in _GEOMETRIC):
        last = sigma_start * (sigma_end / sigma_start) ** ((n - 2) / (n - 1))
        return sigma_start * (last / sigma_start) ** ((m - 1) / (m - 2))
    if schedule not in (None, SCHEDULES[0]):
        raise ValueError(f"schedule must be one of {SCHEDULES} (or None: a Karras ramp), got {schedule!r}.")
    hi = sigma_start ** (1 / rho)
    last = hi + (n - 2) / (n - 1) * (sigma_end ** (1 / rho) - hi)
    end = hi + (m - 1) / (m - 2) * (last - hi)
    return end ** rho if end > 0 else sigma_end  # fewer steps than the base can extrapolate past 0: the end kept


def schedule_levels(steps: int, append_zero: bool = True, final_step: str = "tweedie") -> int:
    """How many positive levels a schedule of ``steps`` intervals builds its ramp from: ``steps`` where the last
    interval is the Tweedie step to 0, ``steps + 1`` where it ends at ``sigma_end`` or (``final_step="solver"``) its
    last level is replaced by 0."""
    return steps if append_zero and final_step == "tweedie" else steps + 1


def _given_levels(levels: torch.Tensor, n: int, sigma_start: torch.Tensor) -> torch.Tensor:
    """Levels ``[n]`` given as data, checked (descending, positive, starting at every sample's ``sigma_start [B]``)
    and shared: ``[n, B]``."""
    levels = levels.to(sigma_start.device, sigma_start.dtype)
    if levels.shape != (n,):
        raise ValueError(f"a schedule given as levels must have {n} of them here (the steps and the final step set "
                         f"it), got shape {tuple(levels.shape)}: fit it for this many steps.")
    if not (torch.isfinite(levels).all() and (levels > 0).all() and (levels[1:] < levels[:-1]).all()):
        raise ValueError("a schedule given as levels must be positive, finite and strictly descending.")
    if not torch.allclose(sigma_start, levels[0].expand_as(sigma_start), rtol=1e-5):
        raise ValueError(f"the schedule starts at {float(levels[0]):g} but the samples sit at other levels: a given "
                         "schedule serves samples that all start at its first level (fit it from their level).")
    return levels[:, None].expand(-1, len(sigma_start))


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
              sigma_end: float = SIGMA_END, rho: float = 7.0, schedule: str | torch.Tensor | None = None,
              final_step: str = "tweedie", fit_samples: int | None = None, callback=None, disable: bool = True,
              **kwargs) -> tuple[torch.Tensor, float]:
    """Integrate the reverse S/ODE from ``x [B, *shape]`` at levels ``sigma_start [B]`` to clean samples.

    Args:
        name: a key of ``INTEGRATORS`` or a diffusers scheduler instance (warm start, see
            :func:`dlg_sampler.schedulers.warm_start`).
        score: ``score(x [B, *shape], sigma [B]) -> [B, *shape]``, the VE score.
        x: ``[B, *shape]`` noisy samples; ``sigma_start``: ``[B]`` (or scalar) their noise levels.
        steps: solver steps: ``steps - 1`` steps down to ``sigma_end`` plus the final Tweedie step to 0
            (``final_step="solver"``: down to the level above ``sigma_end``, then the solver's own step to 0; a
            diffusers scheduler: its ``num_inference_steps`` over the stretch it integrates).
        generator: randomness for the stochastic integrators.
        sigma_end: last positive level of the schedule (ignored by schedulers).
        schedule, final_step: the time schedule and how the solve ends (core integrators; see
            :func:`get_schedule`, ``SCHEDULES`` and ``FINAL_STEPS``). ``schedule="fitted"``: the levels are first
            fitted for these steps on the first ``fit_samples`` samples (default ``FIT_SAMPLES``; every sample must
            start at one level), :func:`fit_schedule`, whose model evaluations are counted in
            ``nfe``, shared over the batch.
        kwargs: integrator knobs (``snr``, ``S_churn``, ``rtol`` ...).

    Returns:
        ``(x0 [B, *shape], nfe)`` with ``nfe`` the score evaluations per sample (with a fit, its share included).
    """
    check_integrator(name)
    steps = check_steps(steps)
    sigma_start = check_sigma_start(sigma_start, x)
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf: pass finite initial samples (check the upstream sampler or data).")
    fitted = isinstance(schedule, str) and schedule == FITTED
    if fitted and not isinstance(name, str):
        raise ValueError("schedule='fitted' needs a core integrator: a diffusers scheduler sets its own levels.")
    if fit_samples is not None and not fitted:
        raise ValueError("fit_samples is the size of a schedule fit: pass it with schedule='fitted'.")
    if not isinstance(name, str):
        return warm_start(name, score, x, sigma_start, steps, generator=generator, **kwargs)
    fit_nfe = 0.0
    if fitted:
        fit_samples = check_steps(FIT_SAMPLES if fit_samples is None else fit_samples, "fit_samples")
        hops = schedule_levels(steps, final_step=final_step) - 1
        if not torch.allclose(sigma_start, sigma_start[:1].expand_as(sigma_start)):
            raise ValueError("schedule='fitted' fits one schedule for the batch: every sample must start at one level.")
        if hops == 0:  # one Tweedie step: no level to choose
            schedule = sigma_start[:1]
        else:
            counted = CountedScore(score)
            schedule = fit_schedule(counted, x[:fit_samples], float(sigma_start[0]), sigma_end, hops)
            fit_nfe = counted.nfe * len(x[:fit_samples]) / len(x)
    sigmas = get_schedule(name, steps, sigma_start, sigma_end, append_zero=True, rho=rho, schedule=schedule,
                          final_step=final_step)
    x, nfe = INTEGRATORS[name](score, x, sigmas, generator=generator, callback=callback, disable=disable, **kwargs)
    return x, nfe + fit_nfe if fitted else nfe


#: Model evaluations per solver step of the fixed-step integrators (``pc``: one corrector and one predictor
#: evaluation), and of their step to 0 where it differs (the Heun samplers' last step is one Euler = Tweedie step).
EVALS_PER_STEP = {"reverse_diffusion": 1, "pc": 2, "euler_maruyama": 1, "karras_heun": 2, "karras_stochastic": 2,
                  "dpmpp_2m": 1, "unipc": 1, "ipndm": 1, "deis": 1}
_EVALS_TO_ZERO = {"pc": 2}


def _closed_form(integrator, final_step: str, knobs: dict) -> int | None:
    """Evaluations per step of ``integrator`` where its count is arithmetic (a fixed-step integrator with no knob that
    changes the count, either ending), else ``None``."""
    if isinstance(integrator, str) and integrator in EVALS_PER_STEP and final_step in FINAL_STEPS \
            and not set(knobs) - {"schedule"}:
        return EVALS_PER_STEP[integrator]
    return None


def count_nfe(integrator, steps: int, *, dlg: bool, final_step: str = "tweedie", **knobs) -> int:
    """Score evaluations per sample of ``steps`` denoising steps.

    ``dlg=True``: as ``DLGSampler.denoise`` runs it (down to the Tweedie level, plus the Tweedie step; with
    ``final_step="solver"`` the solver's own step to 0, as :func:`integrate`); ``dlg=False``: as :func:`integrate`
    runs it (with its own last step to 0). ``knobs``: the integrator's (e.g. ``restarts``). The fixed-step
    integrators are counted in closed form (:data:`EVALS_PER_STEP`); the others (adaptive ``ode_rk45``: its minimum;
    iPNDM, DEIS, Restart, diffusers schedulers) by running them on a zero score.
    """
    steps = check_steps(steps)
    knobs.pop("fit_samples", None)  # the levels (given or fitted) do not change the solve's count; a fit's own cost
    if not (isinstance(knobs.get("schedule"), str) and knobs["schedule"] in SCHEDULES):  # is its caller's to add
        knobs.pop("schedule", None)
    per = _closed_form(integrator, final_step, knobs)
    if per is not None:  # down to sigma_end and the Tweedie step; or the solver's own last step to 0
        tweedie = dlg and final_step == "tweedie"
        return per * steps + 1 if tweedie else per * (steps - 1) + _EVALS_TO_ZERO.get(integrator, 1)
    x, sigma = torch.zeros(1, 1), torch.ones(1)
    score = CountedScore(lambda x, sigma: torch.zeros_like(x))
    if isinstance(integrator, str) and dlg and final_step == "tweedie":
        sigmas = get_schedule(integrator, steps, sigma, SIGMA_END, append_zero=False, schedule=knobs.pop("schedule", None))
        INTEGRATORS[integrator](score, x, sigmas, **knobs)
        return score.nfe + 1
    if isinstance(integrator, str):
        knobs["final_step"] = final_step
    return integrate(integrator, score, x, sigma, steps, **knobs)[1]


def steps_for_nfe(integrator, budget: int, *, dlg: bool, final_step: str = "tweedie", **knobs) -> int | None:
    """The most solver steps whose NFE per sample (:func:`count_nfe`) fits ``budget``; ``None`` if one step does not.
    Closed form for the fixed-step integrators; otherwise a bisection (the count grows with the steps), so a large
    budget costs a few counts, not one per step."""
    per = _closed_form(integrator, final_step, knobs)
    if per is not None:
        tweedie = dlg and final_step == "tweedie"
        steps = (budget - 1) // per if tweedie else 1 + (budget - _EVALS_TO_ZERO.get(integrator, 1)) // per
        return steps if steps >= 1 else None

    def fits(steps: int) -> bool:
        return count_nfe(integrator, steps, dlg=dlg, final_step=final_step, **knobs) <= budget

    if budget < 1 or not fits(1):
        return None
    lo, hi = 1, budget + 1  # fits(lo); every solver step costs at least one evaluation, so budget + 1 does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- fitted schedules
# Time schedules fitted to a model for a step budget, GITS-style (Chen et al. 2024, "On the Trajectory Regularity
# of ODE-based Diffusion Sampling").
#
# The probability-flow trajectories of one model between two levels have nearly the same shape for every sample, so
# the levels a few-step solver should stop at can be read off a few of them:
#
# 1. a **teacher**: a fine solve of ``P`` samples through a candidate grid of ``grid`` levels (Karras rho=7 between
#    ``sigma_lo`` and ``sigma_hi``), keeping the state ``x_i`` and the denoiser output ``D_i`` at every level;
# 2. the **cost** of one first-order step (DDIM, = Euler in sigma on the VE PF-ODE) from the teacher's state at level
#    ``i`` to level ``j``, ``x_i -> (sigma_j / sigma_i) x_i + (1 - sigma_j / sigma_i) D_i``, against the teacher's
#    own state there: ``c(i, j)`` = its RMS distance to ``x_j``, averaged over the samples, times the share of an
#    error made at ``sigma_j`` that survives to the data, ``s / sqrt(s^2 + sigma_j^2)`` (exact for Gaussian data of
#    scale ``s``, the teacher's outputs' spread; the curve the restart level's pilot fits too). GITS sums the raw
#    distances; on the digits model from its ``sigma_max`` = 157 those put most steps above sigma = 40, where an
#    error of the step is large in x but shrinks by ``s / sigma`` on the way down (FD 208 / 186 at 6 / 8 UniPC steps
#    against 9.0 / 2.4 for the Karras ramp and 4.0 / 1.9 weighted, docs/mixing.md). The matrix reuses the
#    teacher's evaluations: it costs no model call;
# 3. **dynamic programming** for the path of exactly ``steps`` hops from the top level to the bottom one whose summed
#    cost is least: the fitted schedule.
#
# The teacher's evaluations are the fit's whole cost (:func:`fit_evaluations`). Where every output of a run is
# solved across the same interval (DLG's restart kernel: from ``S`` to ``sigma_min``; vanilla sampling: from
# ``sigma_max``), one fit serves the whole run and its cost is amortised over it.

#: Candidate levels of the fitted schedules' grid (its ends included).
FIT_GRID = 64
#: Samples the teacher solves by default: trajectories are regular enough that a few fix the schedule.
FIT_SAMPLES = 8
#: A vanilla run's fit takes at most this share of its evaluations (fewer samples where ``FIT_SAMPLES`` would take
#: more), as DLG's pilot does (:data:`dlg_sampler.tuning.PILOT_SHARE`).
FIT_SHARE = 0.05
#: Solvers that can serve as the teacher: deterministic, and each reports its denoiser output at the very state it
#: steps from (UniPC's corrector moves the state after its evaluation, so it cannot).
TEACHERS = ("dpmpp_2m", "karras_heun", "ipndm", "deis")
#: The teacher's solver through the grid (DPM-Solver++(2M): second order, one model evaluation per level).
FIT_TEACHER = "dpmpp_2m"
#: The candidate grid's Karras ramp.
FIT_RHO = 7.0


def candidate_grid(sigma_hi: float, sigma_lo: float, grid: int = FIT_GRID, rho: float = FIT_RHO) -> torch.Tensor:
    """``grid`` candidate levels ``[grid]`` (float64), descending from ``sigma_hi`` to ``sigma_lo`` (Karras ramp)."""
    return get_sigmas_karras(grid, torch.tensor([float(sigma_hi)], dtype=torch.float64), float(sigma_lo), rho,
                             append_zero=False)[:, 0]


def fit_evaluations(samples: int, grid: int = FIT_GRID, teacher: str = FIT_TEACHER) -> int:
    """Model evaluations (all samples together) of one fit: the teacher's solve of ``samples`` samples."""
    return samples * count_nfe(teacher, grid - 1, dlg=True) - samples  # down to sigma_lo; no step to 0


@torch.no_grad()
def teacher_trajectory(score: Score, x: torch.Tensor, levels: torch.Tensor, teacher: str = FIT_TEACHER
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's solve of ``x [P, *shape]`` (at ``levels[0]``) through ``levels [G]``: its states ``[G, P,
    *shape]`` at every level and its denoiser outputs ``[G - 1, P, *shape]`` at every level but the last."""
    states, denoised = [x], []

    def keep(step: dict) -> None:
        states.append(step["x"])
        denoised.append(step["denoised"])

    sigmas = levels.to(x.dtype)[:, None].expand(-1, len(x))
    INTEGRATORS[teacher](score, x, sigmas, callback=keep)
    return torch.stack(states), torch.stack(denoised)


def hop_costs(levels: torch.Tensor, states: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """``c [G, G]``: ``c[i, j]`` (``i < j``) the RMS distance, averaged over the samples, between one DDIM step from
    the teacher's state at ``levels[i]`` to ``levels[j]`` and the teacher's state there, times the share of it that
    survives to the data (``s / sqrt(s^2 + sigma_j^2)``, ``s`` the spread of the teacher's outputs ``states[-1]``);
    ``inf`` for ``i >= j``."""
    g = len(levels)
    flat, d = states.flatten(2).double(), denoised.flatten(2).double()  # [G, P, D], [G - 1, P, D]
    levels = levels.double()
    scale = _data_scale(states[-1])
    survives = scale / (scale**2 + levels**2).sqrt()  # [G]
    cost = torch.full((g, g), float("inf"), dtype=torch.float64)
    for i in range(g - 1):
        ratio = (levels[i + 1:] / levels[i])[:, None, None]  # [G - i - 1, 1, 1]
        step = ratio * flat[i] + (1 - ratio) * d[i]
        cost[i, i + 1:] = (step - flat[i + 1:]).pow(2).mean(-1).sqrt().mean(-1) * survives[i + 1:]
    return cost


def cheapest_path(cost: torch.Tensor, steps: int) -> list[int]:
    """The grid indices ``[steps + 1]`` of the path from level 0 to level ``G - 1`` in exactly ``steps`` hops whose
    summed ``cost [G, G]`` is least (dynamic programming; ties to the earliest level)."""
    g = cost.shape[0]
    if not 1 <= steps <= g - 1:
        raise ValueError(f"steps must be between 1 and {g - 1} (the grid's intervals), got {steps}: pass a finer grid.")
    best = torch.full((g,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    came_from = []
    for _ in range(steps):  # best[j]: least cost of reaching level j in the hops so far
        total = best[:, None] + cost  # [from, to]
        best, arg = total.min(0)
        came_from.append(arg)
    path = [g - 1]
    for arg in reversed(came_from):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def path_cost(cost: torch.Tensor, path: list[int]) -> float:
    """The summed ``cost [G, G]`` of the hops of ``path`` (grid indices)."""
    return float(sum(cost[i, j] for i, j in zip(path, path[1:])))


@torch.no_grad()
def fit_schedule(score: Score, x: torch.Tensor, sigma_hi: float, sigma_lo: float, steps: int, *,
                 grid: int = FIT_GRID, teacher: str = FIT_TEACHER) -> torch.Tensor:
    """The levels ``[steps + 1]`` (descending, ``sigma_hi`` first and ``sigma_lo`` last, in ``x``'s dtype) whose
    ``steps`` first-order hops follow the teacher's trajectories of ``x [P, *shape]`` (drawn at ``sigma_hi``) most
    closely: see the module's docstring. Costs ``P * (grid - 1)`` model evaluations (:func:`fit_evaluations`);
    deterministic given ``x``."""
    return fit_schedules(score, x, sigma_hi, sigma_lo, (steps,), grid=grid, teacher=teacher)[0]


def fit_schedules(score: Score, x: torch.Tensor, sigma_hi: float, sigma_lo: float, steps: tuple[int, ...], *,
                  grid: int = FIT_GRID, teacher: str = FIT_TEACHER) -> list[torch.Tensor]:
    """:func:`fit_schedule` for each step count of ``steps`` from one teacher solve (the same cost as one fit: only
    the dynamic programming runs per count); a list of levels ``[k + 1]`` per ``k``."""
    steps = tuple(check_steps(k) for k in steps)
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"a schedule is fitted from sigma_hi down to sigma_lo > 0, got sigma_hi={sigma_hi:g}, "
                         f"sigma_lo={sigma_lo:g}.")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}.")
    if grid <= max(steps):
        raise ValueError(f"grid={grid} candidate levels cannot hold {max(steps)} steps: pass grid > steps.")
    levels = candidate_grid(sigma_hi, sigma_lo, grid)
    states, denoised = teacher_trajectory(score, x, levels, teacher)
    costs = hop_costs(levels, states, denoised)
    return [levels[cheapest_path(costs, k)].to(x.dtype) for k in steps]



def vanilla_plan(integrator, budget: float, n: int, **knobs) -> tuple[int | None, dict]:
    """The most steps of a vanilla solve (:func:`~dlg_sampler.integrators.integrate` with ``knobs``) of ``n``
    samples whose model evaluations per sample fit ``budget`` (``None``: not one), and the knobs to run it with.

    Without a fit: :func:`~dlg_sampler.integrators.steps_for_nfe`. With ``schedule="fitted"`` the fit is paid from
    the budget first, amortised over ``n``: on ``fit_samples`` of the samples (default: ``FIT_SAMPLES``, fewer where
    that would take more than ``FIT_SHARE`` of the run's evaluations, at least one), which the knobs then name."""
    fit = 0.0
    if knobs.get("schedule") == FITTED:
        affordable = int(FIT_SHARE * budget * n // fit_evaluations(1))
        knobs = {**knobs, "fit_samples": knobs.get("fit_samples") or max(1, min(FIT_SAMPLES, affordable, n))}
        fit = fit_evaluations(knobs["fit_samples"]) / n
    left = math.floor(budget - fit + 1e-9)
    return (steps_for_nfe(integrator, left, dlg=False, **knobs) if left >= 1 else None), knobs
