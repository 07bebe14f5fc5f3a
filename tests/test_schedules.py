"""Fitted denoising schedules (GITS-style, dlg_sampler.integrators.fit_schedule): the fit itself, its use by every fixed-step
integrator, DLG's fitted restart solve and the vanilla peer that fits its own, with every model call counted."""

import itertools

import pytest
import torch

from dlg_sampler import DLGSampler
from dlg_sampler.levels import NoiseLevels
from dlg_sampler.mixture import GaussianMixture
from dlg_sampler.restart import spread_in_few_directions
from dlg_sampler.integrators import (candidate_grid, cheapest_path, count_nfe, fit_evaluations, fit_schedule,
                                     get_schedule, get_sigmas_karras, hop_costs, integrate, path_cost,
                                     teacher_trajectory, vanilla_plan)
from dlg_sampler.testing import CountingScore
from dlg_sampler.tuning import RAMP_ENDS

MIXTURE = GaussianMixture.random(4, 8, spread=3.0, std=0.3, seed=0)
LEVELS = NoiseLevels(0.01, 80.0)


def _noise(n: int, sigma: float, seed: int) -> torch.Tensor:
    return sigma * torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def test_a_fitted_schedule_is_deterministic_under_a_seed_descending_with_exact_ends():
    fits = [fit_schedule(MIXTURE.score, _noise(8, 30.0, seed), 30.0, 0.01, 5) for seed in (0, 0, 1)]
    assert torch.equal(fits[0], fits[1])
    for levels in fits:
        assert levels.shape == (6,) and (levels[1:] < levels[:-1]).all()
        assert float(levels[0]) == pytest.approx(30.0, rel=1e-6) and float(levels[-1]) == pytest.approx(0.01, rel=1e-6)
    # the sampler's fit: same seed, same levels (the chains and the lift noise come from its generator)
    fitted = []
    for _ in range(2):
        sampler = DLGSampler(MIXTURE.score, None, LEVELS, shape=(8,), num_chains=16, denoise_steps=4,
                             denoise_schedule="fitted", seed=3)
        sampler.sample(16)
        fitted.append(sampler.schedule_fit["levels"])
    assert torch.equal(*fitted) and fitted[0].shape == (5,)
    # the fit draws from its own stream: the run's generator ends where a run without the fit leaves it
    plain = DLGSampler(MIXTURE.score, None, LEVELS, shape=(8,), num_chains=16, denoise_steps=4, seed=3)
    plain.sample(16)
    assert torch.equal(plain.generator.get_state(), sampler.generator.get_state())


def test_dynamic_programming_finds_the_cheapest_path_of_exactly_k_hops():
    g = torch.Generator().manual_seed(0)
    for grid, steps in ((7, 1), (7, 3), (9, 4), (9, 8)):
        cost = torch.rand(grid, grid, generator=g, dtype=torch.float64).triu(1)
        cost[torch.ones(grid, grid).tril().bool()] = float("inf")
        paths = [[0, *inner, grid - 1] for inner in itertools.combinations(range(1, grid - 1), steps - 1)]
        best = min(path_cost(cost, p) for p in paths)
        found = cheapest_path(cost, steps)
        assert len(found) == steps + 1 and found[0] == 0 and found[-1] == grid - 1
        assert path_cost(cost, found) == pytest.approx(best)


@pytest.mark.parametrize("steps", [4, 8])
def test_on_a_mixture_the_fitted_hops_follow_the_teacher_at_least_as_closely_as_the_default_ramp(steps):
    """The DP's own objective: on a 65-level grid the default Karras ramp of ``steps`` hops is a path of the grid
    (every 64 / steps-th level), so the fitted path's summed hop error can be no larger."""
    levels = candidate_grid(80.0, 0.01, 65)
    ramp = get_sigmas_karras(steps + 1, torch.tensor([80.0], dtype=torch.float64), 0.01, append_zero=False)[:, 0]
    default = list(range(0, 65, 64 // steps))
    assert torch.allclose(levels[default], ramp)
    states, denoised = teacher_trajectory(MIXTURE.score, _noise(8, 80.0, 0), levels)
    cost = hop_costs(levels, states, denoised)
    fitted = cheapest_path(cost, steps)
    assert path_cost(cost, fitted) <= path_cost(cost, default) and fitted != default


@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m", "karras_heun", "ipndm", "deis"])
@pytest.mark.parametrize("final_step", ["tweedie", "solver"])
def test_every_fixed_step_integrator_walks_given_levels_at_its_usual_count(name, final_step):
    steps = 4
    n_levels = steps if final_step == "tweedie" else steps + 1
    levels = torch.tensor([20.0, 5.0, 1.5, 0.3, 0.01][:n_levels])
    walked = []
    counted = CountingScore(MIXTURE.score)
    x, nfe = integrate(name, counted, _noise(6, 20.0, 0), 20.0, steps, schedule=levels, final_step=final_step,
                       callback=lambda step: walked.append(float(step["sigma"][0])))
    assert walked == pytest.approx(levels[:steps].tolist())
    assert nfe == count_nfe(name, steps, dlg=False, final_step=final_step) == counted.evaluations / 6
    with pytest.raises(ValueError, match="must have 5 of them"):
        get_schedule(name, steps, torch.full((2,), 20.0), schedule=torch.tensor([20.0, 5.0, 1.0]), append_zero=False)
    with pytest.raises(ValueError, match="strictly descending"):
        get_schedule(name, 2, torch.full((2,), 20.0), schedule=torch.tensor([20.0, 30.0, 1.0]), append_zero=False)
    with pytest.raises(ValueError, match="starts at 20"):
        get_schedule(name, 2, torch.full((2,), 10.0), schedule=torch.tensor([20.0, 5.0, 1.0]), append_zero=False)


@pytest.mark.filterwarnings("ignore:consecutive outputs")
def test_dlg_fit_is_counted_in_the_pilot_and_the_reported_nfe_is_every_model_call():
    counted = CountingScore(MIXTURE.score)
    sampler = DLGSampler(counted, None, LEVELS, shape=(8,), num_chains=20, denoise_steps=3,
                         denoise_schedule="fitted", fit_samples=5, seed=0)
    planned = sampler.planned_nfe(60)
    sampler.sample(60)
    st = sampler.stats
    fit = sampler.schedule_fit
    assert fit["samples"] == 5 and fit["evaluations"] == fit_evaluations(5) > 0
    assert st["nfe_split"]["pilot"] * 60 == pytest.approx(fit["evaluations"])
    assert st["model_evaluations"] == counted.evaluations == planned
    assert st["nfe_per_sample"] == pytest.approx(counted.evaluations / 60)
    # later outputs reuse the fit: no model call but the denoising's own
    before = counted.evaluations
    sampler.sample(20)
    assert counted.evaluations - before == 20 * count_nfe("unipc", 3, dlg=True) and sampler.schedule_fit is fit


def test_for_budget_with_a_fitted_schedule_stays_within_the_budget():
    n, budget = 1000, 8
    counted = CountingScore(MIXTURE.score)
    sampler = DLGSampler.for_budget(counted, None, shape=(8,), nfe=budget, n=n, seed=0, levels=LEVELS,
                                    denoise_schedule="fitted")
    fit = sampler.tuning["schedule_fit"]
    assert fit["evaluations"] == fit_evaluations(fit["samples"]) and fit["restart_sigma"] == sampler.restart_sigma
    assert len(fit["levels"]) == sampler.denoise_steps + 1
    sampler.sample(n)
    assert counted.evaluations / n <= budget
    assert sampler.stats["nfe_per_sample"] == pytest.approx(counted.evaluations / n)
    assert sampler.tuning["predicted_nfe_per_sample"] == pytest.approx(counted.evaluations / n)


def test_a_resumed_sampler_follows_the_same_fitted_schedule_without_fitting_again():
    def build(score):
        return DLGSampler(score, None, LEVELS, shape=(8,), num_chains=16, denoise_steps=4, denoise_schedule="fitted",
                          seed=1)

    first = build(MIXTURE.score)
    first.sample(16)
    state = first.state_dict()
    expected = first.sample(32)
    counted = CountingScore(MIXTURE.score)
    resumed = build(counted)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(32), expected)
    assert counted.evaluations == 32 * count_nfe("unipc", 4, dlg=True)  # no second fit
    assert torch.equal(resumed.schedule_fit["levels"], first.schedule_fit["levels"])


def test_the_vanilla_fitted_solve_counts_its_fit_and_pays_it_from_the_budget():
    n, budget = 400, 8
    steps, knobs = vanilla_plan("unipc", budget, n, schedule="fitted", final_step="solver")
    plain, _ = vanilla_plan("unipc", budget, n, final_step="solver")
    assert knobs["fit_samples"] >= 1 and steps == plain - 1  # the fit's share costs a step at an integer budget
    counted = CountingScore(MIXTURE.score)
    _, nfe = integrate("unipc", counted, _noise(n, 80.0, 0), 80.0, steps, **knobs)
    assert nfe == pytest.approx(counted.evaluations / n) and counted.evaluations / n <= budget
    assert counted.evaluations == n * count_nfe("unipc", steps, dlg=False, final_step="solver") + fit_evaluations(
        knobs["fit_samples"])


def test_a_fitted_schedule_is_refused_where_it_cannot_serve():
    with pytest.raises(ValueError, match="restart kernel"):
        DLGSampler(MIXTURE.score, MIXTURE.noise_posterior(LEVELS), LEVELS, shape=(8,), kernel="gibbs",
                   denoise_schedule="fitted")
    with pytest.raises(ValueError, match="denoise_schedule must be one of"):
        DLGSampler(MIXTURE.score, None, LEVELS, shape=(8,), denoise_schedule="gits")
    with pytest.raises(ValueError, match="every sample must start at one level"):
        integrate("unipc", MIXTURE.score, _noise(4, 10.0, 0), torch.tensor([10.0, 10.0, 5.0, 5.0]), 4,
                  schedule="fitted")
    with pytest.raises(ValueError, match="teacher must be one of"):
        fit_schedule(MIXTURE.score, _noise(4, 10.0, 0), 10.0, 0.01, 3, teacher="unipc")


@pytest.mark.parametrize("teacher", ["dpmpp_2m", "karras_heun", "ipndm", "deis"])
def test_each_teacher_costs_what_fit_evaluations_says_and_ends_on_the_grid(teacher):
    counted = CountingScore(MIXTURE.score)
    levels = fit_schedule(counted, _noise(3, 20.0, 0), 20.0, 0.05, 3, grid=16, teacher=teacher)
    assert counted.evaluations == fit_evaluations(3, grid=16, teacher=teacher)
    assert torch.isin(levels.double(), candidate_grid(20.0, 0.05, 16).to(levels.dtype).double()).all()


def test_for_budget_walks_log_snr_levels_where_the_chains_spread_sits_in_few_directions():
    """Two modes far apart along one axis of 64 (the spread in one direction): UniPC's solves walk levels uniform in
    log-SNR, said in the settings, and the check weighs the ramps' candidates on them; spread over every direction (or
    a denoiser given): the integrator's own ramp."""
    axis = torch.zeros(2, 64)
    axis[:, 0] = torch.tensor([5.0, -5.0])
    one_direction = GaussianMixture(axis, torch.full((2,), 0.1))
    spread = GaussianMixture.random(4, 64, spread=3.0, std=0.3, seed=0)
    for nfe in (10, 6):  # the check between UniPC and iPNDM on their ramps; UniPC and iPNDM on fitted levels
        s = DLGSampler.for_budget(one_direction.score, None, shape=(64,), nfe=nfe, n=20000, seed=0, levels=LEVELS)
        assert spread_in_few_directions(s.x)
        candidates = s.tuning["denoiser"]["candidates"]
        assert [c.get("denoise_schedule") for c in candidates] == ["logsnr"] * len(RAMP_ENDS) * (
            2 if nfe == 10 else 1) + ([] if nfe == 10 else ["fitted"])  # each ramp at each end
        assert s.denoise_schedule == s.tuning["denoiser"]["chosen"]["denoise_schedule"]
        assert s.tuning["settings"]["denoise_schedule"] == s.denoise_schedule
        wide = DLGSampler.for_budget(spread.score, None, shape=(64,), nfe=nfe, n=20000, seed=0, levels=LEVELS)
        assert not spread_in_few_directions(wide.x)
        assert wide.denoise_schedule in ((None,) if nfe == 10 else (None, "fitted"))
    given = DLGSampler.for_budget(one_direction.score, None, shape=(64,), nfe=10, n=20000, seed=0, levels=LEVELS,
                                  integrator="unipc")
    assert given.denoise_schedule is None
