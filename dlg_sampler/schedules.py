"""Time schedules fitted to a model for a step budget, GITS-style (Chen et al. 2024, "On the Trajectory Regularity
of ODE-based Diffusion Sampling").

The probability-flow trajectories of one model between two levels have nearly the same shape for every sample, so
the levels a few-step solver should stop at can be read off a few of them:

1. a **teacher**: a fine solve of ``P`` samples through a candidate grid of ``grid`` levels (Karras rho=7 between
   ``sigma_lo`` and ``sigma_hi``), keeping the state ``x_i`` and the denoiser output ``D_i`` at every level;
2. the **cost** of one first-order step (DDIM, = Euler in sigma on the VE PF-ODE) from the teacher's state at level
   ``i`` to level ``j``, ``x_i -> (sigma_j / sigma_i) x_i + (1 - sigma_j / sigma_i) D_i``, against the teacher's
   own state there: ``c(i, j)`` = its RMS distance to ``x_j``, averaged over the samples, times the share of an
   error made at ``sigma_j`` that survives to the data, ``s / sqrt(s^2 + sigma_j^2)`` (exact for Gaussian data of
   scale ``s``, the teacher's outputs' spread; the curve the restart level's pilot fits too). GITS sums the raw
   distances; on the digits model from its ``sigma_max`` = 157 those put most steps above sigma = 40, where an
   error of the step is large in x but shrinks by ``s / sigma`` on the way down (FD 208 / 186 at 6 / 8 UniPC steps
   against 9.0 / 2.4 for the Karras ramp and 4.0 / 1.9 weighted, docs/mixing.md). The matrix reuses the
   teacher's evaluations: it costs no model call;
3. **dynamic programming** for the path of exactly ``steps`` hops from the top level to the bottom one whose summed
   cost is least: the fitted schedule.

The teacher's evaluations are the fit's whole cost (:func:`fit_evaluations`). Where every output of a run is
solved across the same interval (DLG's restart kernel: from ``S`` to ``sigma_min``; vanilla sampling: from
``sigma_max``), one fit serves the whole run and its cost is amortised over it.
"""

from __future__ import annotations

import math

import torch

from .integrators import FITTED, INTEGRATORS, count_nfe, get_sigmas_karras, steps_for_nfe
from .restart import _data_scale
from .scores import Score, check_steps

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
    steps = check_steps(steps)
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"a schedule is fitted from sigma_hi down to sigma_lo > 0, got sigma_hi={sigma_hi:g}, "
                         f"sigma_lo={sigma_lo:g}.")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}.")
    if grid <= steps:
        raise ValueError(f"grid={grid} candidate levels cannot hold {steps} steps: pass grid > steps.")
    levels = candidate_grid(sigma_hi, sigma_lo, grid)
    states, denoised = teacher_trajectory(score, x, levels, teacher)
    path = cheapest_path(hop_costs(levels, states, denoised), steps)
    return levels[path].to(x.dtype)



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
