"""The first step of each restart solve from the chains' Gaussian (``gaussian_first_step``): exact for Gaussian data,
one model evaluation saved per output and counted as saved, resumable, and priced by the plan."""

import pytest
import torch

from dlg_sampler import DLGSampler
from dlg_sampler.integrators import count_nfe
from dlg_sampler.levels import NoiseLevels
from dlg_sampler.mixture import GaussianMixture
from dlg_sampler.restart import GaussianFirstStep
from dlg_sampler.testing import CountingScore
from dlg_sampler.tuning import DENOISERS, GAUSSIAN_MAX_NFE, plan_budget

LEVELS = NoiseLevels(0.01, 80.0)
MIXTURE = GaussianMixture.random(4, 8, spread=3.0, std=0.3, seed=0)


def _sampler(score=MIXTURE.score, **settings) -> DLGSampler:
    return DLGSampler(score, None, LEVELS, shape=(8,), **{"num_chains": 16, "denoise_steps": 4, "seed": 0,
                                                          "restart_sigma": 20.0, **settings})


def test_the_gaussian_answers_the_first_call_with_the_exact_posterior_mean_of_gaussian_data():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([3.0, 1.0, 0.5, 0.1])
    mean = torch.tensor([1.0, -2.0, 0.0, 4.0])
    chains = mean + scale * torch.randn(100_000, 4, generator=g, dtype=torch.float64)
    calls = []
    first = GaussianFirstStep(lambda x, sigma: calls.append(len(x)) or torch.zeros_like(x), chains)
    x = mean + torch.randn(5, 4, generator=g, dtype=torch.float64) * (scale**2 + 20.0**2).sqrt()
    sigma = torch.full((5,), 20.0, dtype=torch.float64)
    exact = mean + scale**2 / (scale**2 + 400.0) * (x - mean)  # E[x0 | x] for x0 ~ N(mean, diag(scale^2))
    torch.testing.assert_close(first.denoise(x, sigma), exact, atol=0.02, rtol=0)
    torch.testing.assert_close(x + 400.0 * first(x, sigma), first.denoise(x, sigma))  # the score of that mean
    assert calls == []  # the model was not called ...
    first(x, sigma)
    assert calls == [5]  # ... until the second call, which is the model's


def test_each_output_saves_one_evaluation_and_the_count_says_so():
    counted, plain = CountingScore(MIXTURE.score), CountingScore(MIXTURE.score)
    sampler, without = _sampler(counted, gaussian_first_step=True), _sampler(plain)
    sampler.warm_up(), without.warm_up()
    before = counted.evaluations
    planned = sampler.planned_nfe(48)
    out = sampler.sample(48)
    assert counted.evaluations - before == planned == 3 * 16 * (count_nfe("unipc", 4, dlg=True) - 1)
    assert sampler.stats["model_evaluations"] == counted.evaluations
    without.sample(48)
    assert plain.evaluations - before == 3 * 16 * count_nfe("unipc", 4, dlg=True)
    assert torch.isfinite(out).all() and out.std(0).mean() > 0.3  # samples, not the Gaussian's mean


def test_a_resumed_run_continues_bit_for_bit():
    whole = _sampler(gaussian_first_step=True).sample(64)
    first = _sampler(gaussian_first_step=True)
    part = [first.sample(24)]
    resumed = _sampler(gaussian_first_step=True, seed=7)
    resumed.load_state_dict(first.state_dict())
    part.append(resumed.sample(40))
    assert torch.equal(torch.cat(part), whole)


@pytest.mark.parametrize("settings", [{"kernel": "gibbs"}, {"denoise_steps": 1}])
def test_it_is_refused_where_it_cannot_serve(settings):
    posterior = lambda x: torch.zeros(len(x), len(LEVELS))  # noqa: E731 (the Gibbs kernel needs one)
    with pytest.raises(ValueError, match="gaussian_first_step answers the first of at least 2 steps"):
        DLGSampler(MIXTURE.score, posterior, LEVELS, shape=(8,), gaussian_first_step=True, **settings)
    with pytest.raises(TypeError, match="gaussian_first_step must be True or False"):
        _sampler(gaussian_first_step=1)


def test_for_budget_spends_the_saved_evaluation_on_one_more_step():
    on, off = (plan_budget(8, 5000, integrator="unipc", warmup_outputs=False, gaussian_first_step=g)
               for g in (True, False))
    assert on["settings"]["gaussian_first_step"] and on["settings"]["denoise_steps"] == off["settings"][
        "denoise_steps"] + 1
    # for_budget's own denoiser unchecked (a small run): UniPC with it up to GAUSSIAN_MAX_NFE; offered to the pilot's
    # check (UniPC up to 8 NFE, iPNDM on its ramp above: tuning.denoisers) with it
    assert plan_budget(10, 256)["settings"]["gaussian_first_step"]
    assert not plan_budget(GAUSSIAN_MAX_NFE + 1, 256)["settings"]["gaussian_first_step"]
    assert plan_budget(GAUSSIAN_MAX_NFE + 1, 5000)["settings"]["gaussian_first_step"]  # priced as iPNDM's
    assert DENOISERS[0]["gaussian_first_step"] and all(  # UniPC at each end with it, iPNDM on fitted levels without
        c["gaussian_first_step"] == (c["integrator"] == "unipc") for c in plan_budget(8, 5000)["denoisers"])
    assert not plan_budget(10, 5000, integrator="unipc")["settings"]["gaussian_first_step"]  # a denoiser given
    assert "gaussian_first_step" not in plan_budget(12, 5000, kernel="gibbs")["settings"]
    assert not plan_budget(10, 5000, denoise_steps=1)["settings"]["gaussian_first_step"]  # one step: the model's
    assert plan_budget(2, 256)["settings"]["denoise_steps"] == 2  # one model evaluation per output
    counted = CountingScore(MIXTURE.score)
    sampler = DLGSampler.for_budget(counted, None, shape=(8,), nfe=10, n=2000, seed=0, levels=LEVELS)
    assert sampler.gaussian_first_step and sampler.tuning["settings"]["gaussian_first_step"]
    sampler.sample(2000)
    nfe = counted.evaluations / 2000
    assert nfe == pytest.approx(sampler.tuning["predicted_nfe_per_sample"]) and nfe <= 10
