"""The whole budget spent on samples: each restart chain's warm-up returned as its first output
(``warmup_outputs``) and the budget left below the next whole step spent on one more step in a share of the output
batches (``extra_step_share``), both set by ``for_budget``; every model call counted."""

import math

import pytest
import torch

from dlg_sampler import DLGSampler
from dlg_sampler import sampler as sampler_module
from dlg_sampler.integrators import count_nfe, fit_evaluations, fit_schedule, get_schedule, ramp_end_keeping_last_level
from dlg_sampler.levels import NoiseLevels
from dlg_sampler.mixture import GaussianMixture
from dlg_sampler.testing import CountingScore
from dlg_sampler.tuning import (CHECK_CHAINS, CHOICE_MAX_NFE, DENOISERS, GAUSSIAN_MAX_NFE, RAMP_DENOISERS, RAMP_ENDS,
                                check_evaluations, choose_denoiser, denoisers, plan_budget)

MIXTURE = GaussianMixture.random(4, 8, spread=3.0, std=0.3, seed=0)
LEVELS = NoiseLevels(0.01, 80.0)
#: The budget's arithmetic for one denoiser (UniPC, k steps + Tweedie): given, it is not chosen by the pilot.
UNIPC = {"integrator": "unipc"}


def _sampler(score=MIXTURE.score, **settings) -> DLGSampler:
    return DLGSampler(score, None, LEVELS, shape=(8,), **{"num_chains": 8, "denoise_steps": 3, "seed": 0, **settings})


def test_the_first_batch_is_the_warm_up_and_costs_only_the_warm_up():
    counted = CountingScore(MIXTURE.score)
    sampler = _sampler(counted, warmup_outputs=True)
    planned = sampler.planned_nfe(8)
    first = sampler.sample(8)
    reference = _sampler()
    reference.warm_up()
    assert torch.equal(first, reference.x)  # the warm-up's states themselves, nothing more spent on them
    assert counted.evaluations == planned == 8 * count_nfe("unipc", 10, dlg=False)
    assert sampler.stats["nfe_split"]["denoise"] == 0 and sampler.stats["samples"] == 8
    # then restart outputs, continuing from the warm-up: one denoising solve per output
    sampler.sample(16)
    assert counted.evaluations - planned == 16 * count_nfe("unipc", 3, dlg=True) == sampler.stats[
        "model_evaluations"] - planned
    assert sampler.stats["lag1_autocorr"] is not None  # the warm-up output pairs with the chain's next one


def test_without_warmup_outputs_the_warm_up_is_paid_and_not_returned():
    counted = CountingScore(MIXTURE.score)
    sampler = _sampler(counted)
    sampler.sample(8)
    assert counted.evaluations == 8 * (count_nfe("unipc", 10, dlg=False) + count_nfe("unipc", 3, dlg=True))


@pytest.mark.parametrize("share", [0.25, 0.4, 0.9])
def test_a_share_of_the_batches_takes_one_step_more_spread_evenly_and_counted(share):
    counted = CountingScore(MIXTURE.score)
    sampler = _sampler(counted, extra_step_share=share, warmup_outputs=True)
    steps = [sampler.batch_steps(b) for b in range(20)]
    assert set(steps) == {3, 4} and steps.count(4) == math.floor(20 * share + 1e-9)
    assert all(steps[:b].count(4) in (math.floor(b * share), math.ceil(b * share)) for b in range(1, 21))
    planned = sampler.planned_nfe(8 * 21)
    sampler.sample(8 * 21)
    warm = 8 * count_nfe("unipc", 10, dlg=False)
    denoise = sum(count_nfe("unipc", k, dlg=True) for k in steps) * 8
    assert counted.evaluations == planned == warm + denoise == sampler.stats["model_evaluations"]


@pytest.mark.parametrize("name, schedule", [("unipc", None), ("ipndm", "karras"), ("unipc", "logsnr"),
                                            ("reverse_diffusion", None)])
def test_a_ramp_walked_in_one_step_more_can_keep_the_level_it_leaves_for_0(name, schedule):
    start, end = torch.tensor([20.0], dtype=torch.float64), 0.03
    for k in (3, 8):
        base = get_schedule(name, k, start, end, final_step="solver", schedule=schedule)[:, 0]
        moved = ramp_end_keeping_last_level(name, k + 1, k, 20.0, end, schedule)
        longer = get_schedule(name, k + 1, start, moved, final_step="solver", schedule=schedule)[:, 0]
        assert len(longer) == len(base) + 1 and longer[-1] == 0 and (longer[1:] < longer[:-1]).all()
        assert torch.isclose(longer[-2], base[-2], rtol=1e-9)  # the same level left for 0, one level more above it
        assert end < moved < float(base[-2])
    assert ramp_end_keeping_last_level(name, 2, 1, 20.0, end, schedule) == end  # one step: its last level is 20


def test_the_longer_batches_leave_for_0_from_the_level_the_run_leaves_from(monkeypatch):
    """The longer batches' step goes inside the ramp: the level the solver leaves for 0 (where for_budget's check
    chose the ramp to end) stays the run's; with the end kept instead, one step more ended lower."""
    walked = []
    unipc = sampler_module.INTEGRATORS["unipc"]

    def spy(score, x, sigmas, **kwargs):
        if abs(float(sigmas[0, 0]) - 20.0) < 1e-3:  # a restart solve (the warm-up walks from sigma_max)
            walked.append((len(sigmas) - 1, float(sigmas[-2, 0])))
        return unipc(score, x, sigmas, **kwargs)

    monkeypatch.setitem(sampler_module.INTEGRATORS, "unipc", spy)
    for schedule in (None, "logsnr"):
        walked.clear()
        sampler = _sampler(extra_step_share=0.5, final_step="solver", restart_sigma=20.0, tweedie_sigma=0.03,
                           denoise_schedule=schedule)
        sampler.sample(8 * 6)
        assert {k for k, _ in walked} == {3, 4}
        levels = [level for _, level in walked]
        assert max(levels) == pytest.approx(min(levels), rel=1e-5)  # float32 ramps


def test_a_resumed_run_continues_the_same_warm_up_outputs_and_longer_batches():
    settings = dict(extra_step_share=0.5, warmup_outputs=True)
    whole = _sampler(**settings).sample(40)
    first = _sampler(**settings)
    first.warm_up()  # warmed up, nothing returned yet (a for_budget pilot stops here)
    state = first.state_dict()
    resumed = _sampler(**settings, seed=7)
    resumed.load_state_dict(state)
    part = [resumed.sample(12)]
    again = _sampler(**settings, seed=9)
    again.load_state_dict(resumed.state_dict())
    part.append(again.sample(28))
    assert torch.equal(torch.cat(part), whole)


def test_for_budget_spends_the_whole_budget_and_reports_every_call():
    n, budget = 2000, 6
    counted = CountingScore(MIXTURE.score)
    sampler = DLGSampler.for_budget(counted, None, shape=(8,), nfe=budget, n=n, seed=0, levels=LEVELS, **UNIPC)
    chosen = sampler.tuning["settings"]
    assert chosen["warmup_outputs"] and 0 < chosen["extra_step_share"] < 1
    sampler.sample(n)
    nfe = counted.evaluations / n
    assert sampler.stats["nfe_per_sample"] == pytest.approx(nfe) == pytest.approx(
        sampler.tuning["predicted_nfe_per_sample"])
    # within the budget, and less than one more longer batch (one evaluation per chain) below it
    assert budget - sampler.num_chains / n < nfe <= budget


@pytest.mark.parametrize("n", [256, 1000, 5000, 20000])
@pytest.mark.parametrize("nfe", [5, 6, 8, 10, 12, 15, 20])
def test_the_plan_leaves_less_of_the_budget_than_one_more_longer_batch(n, nfe):
    plan = plan_budget(nfe, n, **UNIPC)
    settings = plan["settings"]
    chains, steps = settings["num_chains"], settings["denoise_steps"]
    one_step = (count_nfe("unipc", steps + 1, dlg=True) - count_nfe("unipc", steps, dlg=True)) * chains / n
    batches = math.ceil(n / chains) - 1  # after the warm-up's outputs
    capped = math.floor(batches * settings.get("extra_step_share", 0) + 1e-9) == batches - 1
    assert plan["predicted_nfe_per_sample"] <= nfe
    assert capped or nfe - plan["predicted_nfe_per_sample"] < one_step


def test_the_settings_are_refused_where_they_cannot_serve():
    with pytest.raises(ValueError, match="restart-kernel settings"):
        DLGSampler(MIXTURE.score, lambda x: torch.zeros(len(x), len(LEVELS)), LEVELS, shape=(8,), kernel="gibbs",
                   warmup_outputs=True)
    with pytest.raises(ValueError, match="raise denoise_steps"):
        _sampler(extra_step_share=1.0)
    with pytest.raises(TypeError, match="warmup_outputs"):
        _sampler(warmup_outputs=1)


def test_a_returned_warm_up_is_at_least_as_long_as_an_output_unless_given():
    for nfe, warmup in ((6, 10), (12, None)):
        settings = plan_budget(nfe, 5000, **UNIPC)["settings"]
        # UniPC's warm-up of k steps costs k evaluations, an output of k steps + Tweedie k + 1
        assert settings["warmup_outputs"] and settings["warmup_steps"] == (warmup or settings["denoise_steps"] + 1)
    assert plan_budget(12, 5000, warmup_steps=6, **UNIPC)["settings"]["warmup_steps"] == 6
    assert plan_budget(12, 5000, warmup_outputs=False, **UNIPC)["settings"]["warmup_steps"] == 10


@pytest.mark.parametrize("n, nfe, gains, returned", [(5000, 6, True, True), (5000, 15, True, True),
                                                     (5000, 20, False, False), (20000, 40, False, False),
                                                     (256, 20, True, False)])
def test_warm_ups_are_returned_where_they_buy_the_other_outputs_denoising(n, nfe, gains, returned):
    """At n = 5000 from 20 NFE the same steps fit beside a paid warm-up: a returned one (a vanilla sample) would
    only take a restart output's place. Below 20 outputs per chain (full batches at small n) the warm-ups would be
    too large a share of the samples. Given, the choice stands."""
    plans = {w: plan_budget(nfe, n, warmup_outputs=w, **UNIPC) for w in (True, False)}
    denoising = {w: p["settings"]["denoise_steps"] + p["settings"].get("extra_step_share", 0) for w, p in plans.items()}
    assert (denoising[True] > denoising[False]) == gains
    assert plan_budget(nfe, n, **UNIPC) == plans[returned]
    assert returned <= (n / plans[True]["settings"]["num_chains"] >= 20)


def test_fitted_levels_serve_both_step_counts_from_one_teacher_solve():
    counted = CountingScore(MIXTURE.score)
    sampler = _sampler(counted, extra_step_share=0.5, denoise_schedule="fitted", fit_samples=4, restart_sigma=20.0)
    planned = sampler.planned_nfe(8 * 4)
    sampler.sample(8 * 4)
    fit = sampler.schedule_fit
    assert fit["levels"].shape == (4,) and fit["longer"].shape == (5,)
    assert fit["evaluations"] == fit_evaluations(4)  # the same cost as a fit for one step count
    assert counted.evaluations == planned == sampler.stats["model_evaluations"]
    for steps, levels in ((3, fit["levels"]), (4, fit["longer"])):
        assert torch.equal(levels.to(torch.float32), sampler._levels(torch.full((8,), 20.0), steps))
        alone = fit_schedule(MIXTURE.score, torch.zeros(1, 8), 20.0, 0.01, steps)  # a fit of its own: same shape
        assert alone.shape == levels.shape
    # a resumed sampler keeps both, and for_budget fits both where it dithers the steps
    resumed = _sampler(extra_step_share=0.5, denoise_schedule="fitted", fit_samples=4, restart_sigma=20.0, seed=5)
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(resumed.schedule_fit["longer"], fit["longer"])
    tuned = DLGSampler.for_budget(MIXTURE.score, None, shape=(8,), nfe=6, n=2000, seed=0, levels=LEVELS,
                                  denoise_schedule="fitted", **UNIPC)
    assert tuned.extra_step_share > 0 and len(tuned.tuning["schedule_fit"]["longer"]) == tuned.denoise_steps + 2


# ----------------------------------------------------------------------------- the denoiser chosen by the pilot
def test_the_plan_prices_the_choice_where_the_run_can_pay_for_it():
    chosen = plan_budget(6, 5000)
    assert chosen["denoisers"] == [dict(d) for d in denoisers(6)] == [
        dict(DENOISERS[0]), {**DENOISERS[0], "ramp_end": RAMP_ENDS[1]}, dict(DENOISERS[1])]  # fitted: one end
    settings = chosen["settings"]  # priced as the fitted candidate: its fit and the check are in the budget
    assert settings["denoise_schedule"] == "fitted" and settings["final_step"] == "solver"
    assert chosen["predicted_nfe_per_sample"] <= 6
    unchecked = plan_budget(6, 5000, choose_denoiser=False, **DENOISERS[-1])  # the check's cost is a share of the
    assert unchecked["settings"]["denoise_steps"] == settings["denoise_steps"]  # longer batches ...
    assert unchecked["settings"]["extra_step_share"] > settings["extra_step_share"]
    small = plan_budget(6, 256)  # ... is more than 5% of a small run: the first candidate, unchecked
    assert small["denoisers"] is None and {k: small["settings"][k] for k in DENOISERS[0]} == DENOISERS[0]
    above = plan_budget(CHOICE_MAX_NFE + 1, 20000)  # above: UniPC and iPNDM on their ramps, no fit to pay
    assert above["denoisers"] == [dict(d) for d in denoisers(CHOICE_MAX_NFE + 1)] == [
        {**c, "ramp_end": end} if end != 1 else dict(c) for c in RAMP_DENOISERS for end in RAMP_ENDS]
    assert above["settings"].get("denoise_schedule") is None and above["settings"]["integrator"] == "ipndm"
    assert denoisers(GAUSSIAN_MAX_NFE + 1)[0] == {**RAMP_DENOISERS[0], "gaussian_first_step": False}
    small_above = plan_budget(10, 256)  # the README's run: the check would be a fifth of it
    assert small_above["denoisers"] is None and small_above["settings"]["integrator"] == "unipc"
    given = plan_budget(6, 5000, integrator="unipc")
    assert given["denoisers"] is None and given["settings"].get("final_step") is None  # given: taken as given
    assert plan_budget(12, 5000, kernel="gibbs")["denoisers"] is None


def test_above_8_nfe_the_pilot_chooses_between_the_ramps_and_every_evaluation_is_counted():
    counted = CountingScore(MIXTURE.score)
    n = 5000
    sampler = DLGSampler.for_budget(counted, None, shape=(8,), nfe=12, n=n, seed=0, levels=LEVELS)
    check, settings = sampler.tuning["denoiser"], sampler.tuning["settings"]
    assert check["candidates"] == [{**c, "tweedie_sigma": end * LEVELS.sigma_min} for c in RAMP_DENOISERS
                                   for end in RAMP_ENDS] and check["evaluations"] > 0
    assert {k: settings[k] for k in check["chosen"]} == check["chosen"] and sampler.schedule_fit is None
    assert DLGSampler.for_budget(MIXTURE.score, None, shape=(8,), nfe=12, n=n, seed=0, levels=LEVELS
                                 ).tuning == sampler.tuning  # deterministic under the seed
    sampler.sample(n)
    assert counted.evaluations / n <= 12 and sampler.stats["nfe_per_sample"] == pytest.approx(counted.evaluations / n)
    assert sampler.stats["nfe_split"]["pilot"] * n >= check["evaluations"]  # the check is in the pilot's share
    # Too small a run for a pilot: the check lifts the run's own warmed-up chains, still within the budget; where the
    # check would cost the run chains (n = 2500 at 20 NFE: 125 -> 25), UniPC runs unchecked.
    counted = CountingScore(MIXTURE.score)
    small = DLGSampler.for_budget(counted, None, shape=(8,), nfe=15, n=1000, seed=0, levels=LEVELS)
    assert small.tuning["pilot"]["chains"] == 0 and small.tuning["denoiser"]["evaluations"] > 0
    small.sample(1000)
    assert counted.evaluations / 1000 == pytest.approx(small.tuning["predicted_nfe_per_sample"])
    assert counted.evaluations / 1000 <= 15
    crowded = plan_budget(20, 2500, outputs_per_chain=20)
    assert crowded["denoisers"] is None and crowded["settings"]["integrator"] == "unipc"
    assert plan_budget(20, 2500, outputs_per_chain=20, choose_denoiser=True)["settings"]["num_chains"] < crowded[
        "settings"]["num_chains"]


def test_the_check_offers_each_ramp_at_each_end_and_the_run_ends_its_solves_at_the_chosen_one():
    # Tight modes (std 0.3) are resolved only near the grid's lowest level, broad ones (std 1) well above it: the
    # teacher tells UniPC's two ends apart in opposite directions.
    broad = GaussianMixture.random(4, 8, spread=3.0, std=1.0, seed=0)
    for mixture, closer in ((MIXTURE, 1.0), (broad, RAMP_ENDS[1])):
        counted = CountingScore(mixture.score)
        sampler = DLGSampler.for_budget(counted, None, shape=(8,), nfe=8, n=5000, seed=0, levels=LEVELS)
        check = sampler.tuning["denoiser"]
        ends = {c["tweedie_sigma"]: d for c, d in zip(check["candidates"], check["distances"])
                if c["integrator"] == "unipc"}
        assert set(ends) == {end * LEVELS.sigma_min for end in RAMP_ENDS}
        assert min(ends, key=ends.get) == closer * LEVELS.sigma_min
        assert sampler.tweedie_sigma == check["chosen"]["tweedie_sigma"] == sampler.tuning["settings"]["tweedie_sigma"]
        fitted = next(c for c in check["candidates"] if c.get("denoise_schedule") == "fitted")
        assert fitted["tweedie_sigma"] == LEVELS.sigma_min  # fitted levels: at the run's own end only
        per_output = count_nfe(sampler.integrator, sampler.denoise_steps, dlg=True, final_step=sampler.final_step
                               ) - sampler.gaussian_first_step  # every candidate's, the chosen's among them
        assert check["evaluations"] == check_evaluations(per_output, len(denoisers(8)))
        sampler.sample(5000)
        assert counted.evaluations / 5000 <= 8
        assert sampler.stats["nfe_per_sample"] == pytest.approx(counted.evaluations / 5000)
    # A given tweedie_sigma is where the ramps end: one end offered, the check's cost priced for those candidates.
    given = plan_budget(8, 5000, tweedie_sigma=0.05)
    assert given["denoisers"] == [dict(d) for d in DENOISERS] and given["settings"]["tweedie_sigma"] == 0.05
    sampler = DLGSampler.for_budget(MIXTURE.score, None, shape=(8,), nfe=8, n=5000, seed=0, levels=LEVELS,
                                    tweedie_sigma=0.05)
    assert sampler.tweedie_sigma == 0.05 and len(sampler.tuning["denoiser"]["candidates"]) == len(DENOISERS)


def test_choose_denoiser_takes_the_candidate_closest_to_the_teacher_and_counts_it():
    good = {"integrator": "unipc", "final_step": "solver"}
    bad = {"integrator": "reverse_diffusion", "final_step": "solver"}
    picks = []
    for candidates in ([good, bad], [bad, good]):
        counted = CountingScore(MIXTURE.score)
        sampler = _sampler(counted, num_chains=16, restart_sigma=20.0)
        sampler.warm_up()
        before = counted.evaluations
        check = choose_denoiser(sampler, candidates, seed=0)
        assert counted.evaluations - before == check["evaluations"] == sampler._counts["pilot"] == check_evaluations(
            count_nfe("unipc", 3, dlg=True), 2)  # each candidate at the sampler's evaluations per output
        assert check["chains"] == CHECK_CHAINS and min(check["distances"]) < max(check["distances"])
        picks.append((check["chosen"], sampler.integrator, sampler.final_step))
    assert picks == [(good, "unipc", "solver")] * 2


def test_for_budget_chooses_per_model_and_a_resumed_run_keeps_the_choice():
    counted = CountingScore(MIXTURE.score)
    n = 5000
    sampler = DLGSampler.for_budget(counted, None, shape=(8,), nfe=6, n=n, seed=0, levels=LEVELS)
    check, settings = sampler.tuning["denoiser"], sampler.tuning["settings"]
    assert check["chosen"] in check["candidates"] and len(check["distances"]) == len(denoisers(6))
    assert {k: settings[k] for k in ("integrator", "final_step")} == {k: check["chosen"][k] for k in
                                                                       ("integrator", "final_step")}
    assert settings["denoise_schedule"] == check["chosen"].get("denoise_schedule") == sampler.denoise_schedule
    again = DLGSampler.for_budget(MIXTURE.score, None, shape=(8,), nfe=6, n=n, seed=0, levels=LEVELS)
    assert again.tuning == sampler.tuning  # deterministic under the seed
    sampler.sample(n)
    assert counted.evaluations / n <= 6 and sampler.stats["nfe_per_sample"] == pytest.approx(counted.evaluations / n)
    assert sampler.stats["nfe_split"]["pilot"] * n >= check["evaluations"] + sampler.tuning["pilot"]["evaluations"]
