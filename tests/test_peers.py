"""The few-step peers (iPNDM, DEIS tAB, Restart sampling, diffusers' order-3 solvers) and the solver's own final step:
every model evaluation counted, the bench's best peer over all of them."""

import math

import pytest
import torch

from dlg_sampler import DLGSampler, GaussianMixture, NoiseLevels, integrate
from dlg_sampler.bench import report, runs
from dlg_sampler.bench.registry import CORE_PEERS, PEERS, SCHEDULERS, WORKLOADS
from dlg_sampler.bench.workloads import mixture_workload
from dlg_sampler.integrators import (INTEGRATORS, _lagrange_integrals, count_nfe, get_schedule, sample_restart,
                                     steps_for_nfe)
from dlg_sampler.testing import CountingScore


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)


@pytest.fixture(scope="module")
def levels():
    return NoiseLevels(0.01, 80.0, 1000)


class LevelLog:
    """A score that records the levels it is evaluated at (``[B]`` each call)."""

    def __init__(self, score):
        self.score, self.levels = score, []

    def __call__(self, x, sigma):
        self.levels.append(sigma.clone())
        return self.score(x, sigma)


def test_the_solver_final_step_spends_no_evaluation_at_sigma_end_and_keeps_the_nfe():
    start = torch.full((3,), 5.0)
    tweedie = get_schedule("unipc", 6, start, 0.01)
    solver = get_schedule("unipc", 6, start, 0.01, final_step="solver")
    assert tweedie.shape == solver.shape == (7, 3) and float(tweedie[-1].max()) == float(solver[-1].max()) == 0
    assert torch.allclose(tweedie[-2], torch.tensor(0.01)) and bool((solver[-2] > 0.01).all())
    # the solver's ramp is the tweedie ramp one level longer, its last level (sigma_end) replaced by 0
    assert torch.allclose(solver[:-1], get_schedule("unipc", 6, start, 0.01, append_zero=False)[:-1])
    for name in ("unipc", "dpmpp_2m", "ipndm", "deis", "karras_heun"):
        for final_step in ("tweedie", "solver"):
            log = LevelLog(lambda x, s: -x / (1 + s[:, None] ** 2))
            _, nfe = integrate(name, log, torch.randn(3, 2), 5.0, 6, final_step=final_step)
            assert nfe == count_nfe(name, 6, dlg=False, final_step=final_step) == len(log.levels)
            at_end = any(bool(torch.isclose(s, torch.tensor(0.01)).all()) for s in log.levels)
            assert at_end == (final_step == "tweedie"), (name, final_step)
    # DLG: tweedie pays one evaluation more than its solver steps, the solver ending none
    assert count_nfe("unipc", 5, dlg=True) == 6 and count_nfe("unipc", 5, dlg=True, final_step="solver") == 5
    assert steps_for_nfe("unipc", 8, dlg=True, final_step="solver") == 8
    with pytest.raises(ValueError, match="final_step must be one of"):
        get_schedule("unipc", 3, start, final_step="last")
    with pytest.raises(ValueError, match="schedule must be one of"):
        get_schedule("unipc", 3, start, schedule="cosine")


@pytest.mark.filterwarnings("ignore:consecutive outputs of one chain are correlated")
@pytest.mark.parametrize("kernel", ["restart", "gibbs"])
@pytest.mark.parametrize("integrator", ["unipc", "ipndm"])
def test_with_the_solver_final_step_every_model_evaluation_is_in_the_reported_nfe(kernel, integrator, mixture,
                                                                                 levels):
    """Warm-up, Gibbs, denoising: stats' total times samples equals the calls counted outside the library, no
    Tweedie phase is left, and the plan (planned_nfe) is what ran."""
    score = CountingScore(mixture.score)
    kw = dict(kernel="gibbs", gibbs_steps=2, step_size=0.05) if kernel == "gibbs" else {}
    sampler = DLGSampler(score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=16, denoise_steps=4,
                         integrator=integrator, final_step="solver", seed=0, **kw)
    planned = sampler.planned_nfe(40)
    sampler.sample(40)
    st = sampler.stats
    assert st["model_evaluations"] == score.evaluations == planned
    assert math.isclose(st["nfe_per_sample"] * st["samples"], score.evaluations)
    assert st["nfe_split"]["tweedie"] == 0 and st["nfe_split"]["denoise"] == pytest.approx(4 * 48 / 40)


def test_for_budget_with_the_solver_final_step_fits_the_budget_and_spends_it_on_solver_steps(mixture):
    score = CountingScore(mixture.score)
    sampler = DLGSampler.for_budget(score, None, shape=(8,), nfe=8, n=400, seed=0,
                                    levels=NoiseLevels(0.01, 80.0), final_step="solver")
    sampler.sample(400)
    tweedie_steps = DLGSampler.for_budget(mixture.score, None, shape=(8,), nfe=8, n=400, seed=0,
                                          levels=NoiseLevels(0.01, 80.0), final_step="tweedie").denoise_steps
    assert sampler.stats["nfe_per_sample"] == score.evaluations / 400 <= 8
    assert sampler.denoise_steps == tweedie_steps + 1  # the Tweedie evaluation bought one more solver step


def test_deis_and_ipndm_are_exact_where_their_polynomials_are():
    """DEIS's Lagrange integrals are exact for a quadratic derivative on any knots; on dx/dsigma = a + b sigma both
    solvers err only on their first (Euler) step, by b h^2 / 2: DEIS order 2 on any grid, iPNDM's equal-step
    Adams-Bashforth weights on an equal one."""
    a, b = 0.3, -0.7
    p = lambda s: 0.3 - 0.7 * s + 0.2 * s**2  # noqa: E731
    knots = [torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([5.0])]
    ints = _lagrange_integrals(knots, torch.tensor([2.0]), torch.tensor([1.0]))
    exact = -(0.3 * 1 - 0.7 * (4 - 1) / 2 + 0.2 * (8 - 1) / 3)  # int_2^1 p
    assert float(sum(c * p(k) for c, k in zip(ints, knots))) == pytest.approx(exact, abs=1e-6)
    # the score whose PF-ODE derivative -sigma s is a + b sigma
    score = lambda x, s: -(a + b * s)[:, None] / s[:, None]  # noqa: E731
    solve = a * (0 - 4.0) + b * (0 - 16.0) / 2
    uneven = torch.tensor([4.0, 2.5, 1.7, 0.9, 0.4, 0.0])[:, None]
    x, _ = INTEGRATORS["deis"](score, torch.zeros(1, 1), uneven, order=2)
    assert float(x) == pytest.approx(solve - b * 1.5**2 / 2, abs=1e-5)
    x, _ = INTEGRATORS["ipndm"](score, torch.zeros(1, 1), torch.linspace(4.0, 0.0, 6)[:, None], max_order=2)
    assert float(x) == pytest.approx(solve - b * 0.8**2 / 2, abs=1e-5)
    x, _ = INTEGRATORS["ipndm"](score, torch.zeros(1, 1), uneven, max_order=2)
    assert float(x) != pytest.approx(solve - b * 1.5**2 / 2, abs=1e-3)  # fixed weights: exact on equal steps only


def test_restart_lifts_exactly_and_counts_its_restarts(mixture):
    """Restart sampling: the main Heun steps (2 n - 1) plus restarts x 2 x restart_steps evaluations; the lift from
    sigma_j to t_max adds the exact noise (a zero score makes the whole solve visible)."""
    g = torch.Generator().manual_seed(0)
    sigmas = get_schedule("restart", 8, torch.full((4000,), 10.0), 0.01)
    j = int((sigmas[:-1].log().mean(1) - math.log(0.06)).abs().argmin())
    x, nfe = sample_restart(lambda x, s: torch.zeros_like(x), torch.zeros(4000, 1), sigmas, restarts=2,
                            restart_steps=3, generator=g)
    assert nfe == (2 * 8 - 1) + 2 * 2 * 3 == count_nfe("restart", 8, dlg=False, restarts=2, restart_steps=3)
    t_j = float(sigmas[j, 0])
    assert float(x.var()) == pytest.approx(2 * (0.3**2 - t_j**2), rel=0.1)  # two exact lifts, nothing else


@pytest.mark.parametrize("label", [p for p in PEERS if p in CORE_PEERS or p not in ("DPM++2M", "DPM++3M", "UniPC")])
def test_every_new_peer_runs_within_its_budget_and_counts_every_evaluation(label):
    w = mixture_workload("separated", WORKLOADS["separated"], 64)
    w.score = counting = CountingScore(w.score)
    row = runs.perform(w, runs.Run("separated", {"kind": "vanilla", "sampler": label}, 8, 0, 64, label), warm={})
    assert "skipped" not in row and row["nfe"] <= 8 and row["nfe"] * 64 == counting.evaluations
    assert label in SCHEDULERS or label in CORE_PEERS


def test_the_best_peer_is_the_best_of_every_peer_that_ran():
    def group(sampler, value, budget=8):
        return report.Group(sampler, {"kind": "vanilla", "sampler": sampler}, budget, [],
                            {0: {"nfe": float(budget), "sw": value}})

    groups = [group("UniPC", 0.5), group("DPM++2M", 0.6), group("iPNDM", 0.3), group("Restart", 0.2, budget=10),
              group("karras_heun", 0.1)]
    assert report.best_peer(groups, 8, "sw").label == "iPNDM"  # not a non-peer, nor another budget's
    assert report.peers_run(groups) == ["DPM++2M", "UniPC", "iPNDM", "Restart"]
    lines = report.wins_and_losses(groups + [report.Group("DLG", {"kind": "dlg"}, 8, ["chosen"],
                                                          {0: {"nfe": 7.5, "sw": 0.4}})])
    assert "best peer (DPM++2M/UniPC/iPNDM/Restart)" in lines[0]
    assert any("iPNDM 0.3" in line and "loses (0/1 seeds)" in line for line in lines)


@pytest.mark.parametrize("final_step", ["tweedie", "solver"])
def test_dlg_sample_budgets_6_and_8_fit_on_the_preset_arithmetic(final_step):
    """What ``dlg-sample --nfe 6`` / ``--nfe 8`` (256 samples) will spend, warm-up included, stays within the budget,
    and the solver ending buys one more denoising step for the same evaluations."""
    from dlg_sampler.tuning import plan_budget

    for nfe in (6, 8):
        plan = plan_budget(nfe, 256, final_step=final_step)
        steps = plan["settings"]["denoise_steps"]
        per_output = count_nfe("unipc", steps, dlg=True, final_step=final_step)
        assert plan["predicted_nfe_per_sample"] <= nfe and per_output <= nfe
        assert nfe - plan["predicted_nfe_per_sample"] < 1  # no whole step left unspent
        # the protocol's steps (n / 20 chains); full batches at this small n may trade one of them for more chains
        protocol = (plan["full_batches"] or {}).get("protocol_denoise_steps", steps)
        assert protocol == nfe - 2 + (final_step == "solver") and steps in (protocol, protocol - 1)


def test_the_plan_and_the_sampler_count_a_restart_denoiser_with_its_knobs(mixture, levels):
    """Restart sampling as DLG's denoiser: its restarts are in the plan (plan_budget, planned_nfe) and in the count."""
    score = CountingScore(mixture.score)
    knobs = {"restarts": 2, "restart_steps": 2}  # 8 evaluations against the default 4
    sampler = DLGSampler(score, None, levels, shape=(8,), num_chains=10, denoise_steps=3, integrator="restart",
                         integrator_kwargs=knobs, seed=0)
    planned = sampler.planned_nfe(30)
    sampler.sample(30)
    assert score.evaluations == planned == sampler.stats["model_evaluations"]
    assert sampler.stats["nfe_split"]["denoise"] == 2 * 3 + 2 * 2 * 2  # Heun to the Tweedie level + restarts
    from dlg_sampler.tuning import plan_budget

    plain, with_knobs = (plan_budget(12, 200, integrator="restart", **extra)["settings"]["denoise_steps"]
                         for extra in ({}, {"integrator_kwargs": knobs}))
    assert with_knobs < plain
