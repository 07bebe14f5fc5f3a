"""The DLG core against an exact Gaussian mixture (closed-form score and noise posterior)."""

import io
import math
import warnings

import pytest
import torch
from scipy.optimize import brentq
from tqdm.auto import tqdm

from dlg_sampler import INTEGRATORS, DLGSampler, GaussianMixture, NoiseLevels, integrate
from dlg_sampler.diagnostics import OutputCorrelation, ess_fraction
from dlg_sampler.gibbs import gibbs_step, sample_sigma_index
from dlg_sampler.metrics import sliced_wasserstein
from dlg_sampler.restart import (RESTART_SCALE, RULE_MAX_GROWTH, RULE_STEPS, TARGET_LAG1, _data_scale, restart_rule,
                                  rule_scale, spectral_level)
from dlg_sampler.testing import CountingScore
from dlg_sampler.tuning import RESTART_LADDER, choose_level, plan_budget

SIGMA_MAX = 80.0
#: Integrators whose output is a function of their input alone (no noise drawn).
DETERMINISTIC = ("karras_heun", "dpmpp_2m", "unipc", "ipndm", "deis")


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)


@pytest.fixture(scope="module")
def levels():
    return NoiseLevels(0.01, SIGMA_MAX, 1000)


def sw(a, b, seed=0):
    return sliced_wasserstein(a, b, num_projections=256, generator=torch.Generator().manual_seed(seed))


def test_levels_grid_and_index_round_trip():
    lv = NoiseLevels(0.01, 100.0, 1000)
    assert lv.sigmas.shape == (1000,) and torch.all(lv.sigmas[1:] > lv.sigmas[:-1])
    assert math.isclose(lv.sigmas[0].item(), 0.01, rel_tol=1e-5) and math.isclose(lv.sigmas[-1].item(), 100, rel_tol=1e-5)
    ratios = lv.sigmas[1:] / lv.sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)  # geometric
    idx = torch.tensor([0, 1, 500, 999])
    assert torch.equal(lv.index(lv.sigma(idx)), idx)
    assert lv.index(torch.tensor([1e-6, 1e6])).tolist() == [0, 999]
    assert NoiseLevels.from_config(lv.config) == lv
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        NoiseLevels(1.0, 0.5)


def test_mixture_score_is_gradient_of_log_density(mixture):
    x = mixture.sample(16, sigma=0.7, generator=torch.Generator().manual_seed(1)).double().requires_grad_(True)
    sigma = torch.full((16,), 0.7)
    (grad,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
    assert torch.allclose(mixture.score(x.detach(), sigma), grad, atol=1e-8)


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
def test_integrator_from_exact_noisy_samples_recovers_mixture(name, mixture):
    g = torch.Generator().manual_seed(0)
    n = 2000
    sigma_start = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.0), generator=g))  # per-sample levels
    x = mixture.sample(n, sigma_start, generator=g)
    steps = 6 if name == "ode_rk45" else 40
    x0, nfe = integrate(name, mixture.score, x, sigma_start, steps, generator=g)
    ref = mixture.sample(n, generator=g)
    floor = sw(mixture.sample(n, generator=g), ref)
    assert nfe >= steps and x0.shape == x.shape
    assert sw(x0, ref) < 2.0 * floor + 0.03, (name, sw(x0, ref), floor)
    assert (mixture.mode_weights(x0) - mixture.weights).abs().sum() < 0.06
    # A score with the wrong sign or a missing sigma^2 factor must fail the same check.
    x_bad, _ = integrate(name, lambda x, s: -mixture.score(x, s), x, sigma_start, steps, generator=g)
    assert not sw(x_bad, ref) < 2.0 * floor + 0.03


@pytest.mark.parametrize("steps", [3, 8])
def test_core_unipc_is_diffusers_unipc_on_the_same_schedule(steps, mixture):
    """The per-sample core UniPC against diffusers' UniPCMultistepScheduler (bh2, order 2) driven with the exact
    mixture's epsilon in its own VP space, on the scheduler's own sigmas."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(beta_schedule="linear", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    sigmas = torch.as_tensor(sched.sigmas, dtype=torch.float32)
    x = sigmas[0] * torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    sample = x / (1 + sigmas[0] ** 2).sqrt()
    for k, t in enumerate(sched.timesteps):
        ve = sample * (1 + sigmas[k] ** 2).sqrt()
        sample = sched.step(-sigmas[k] * mixture.score(ve, sigmas[k].expand(300)), t, sample).prev_sample
    ours, nfe = INTEGRATORS["unipc"](mixture.score, x, sigmas[:, None].expand(-1, 300).contiguous())
    assert nfe == steps and torch.allclose(ours, sample, atol=1e-4), float((ours - sample).abs().max())
    # the corrector is what UniPC adds: DPM-Solver++(2M) alone lands elsewhere
    dpm, _ = INTEGRATORS["dpmpp_2m"](mixture.score, x, sigmas[:, None].expand(-1, 300).contiguous())
    assert not torch.allclose(dpm, sample, atol=1e-2)


@pytest.mark.parametrize("final_step", ["tweedie", "solver"])
@pytest.mark.parametrize("name", sorted(set(INTEGRATORS) - {"ode_rk45"}))
def test_a_sample_that_starts_at_its_end_level_stays_finite_and_leaves_the_others_alone(name, final_step, mixture):
    """A Gibbs chain selected at the Tweedie level is denoised from sigma_end itself: zero-length steps, whose multistep
    coefficients are 0 / 0 (unipc, dpmpp_2m and deis gave NaN). Such samples come out finite, the others as alone."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    start = torch.tensor([0.01, 0.01, 0.5, 3.0])
    both, _ = integrate(name, mixture.score, x, start, 4, generator=torch.Generator().manual_seed(0),
                        final_step=final_step)
    alone, _ = integrate(name, mixture.score, x[2:], start[2:], 4, generator=torch.Generator().manual_seed(0),
                         final_step=final_step)
    assert torch.isfinite(both).all()
    if name in DETERMINISTIC:
        assert torch.allclose(both[2:], alone, atol=1e-5)


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
def test_vanilla_error_decreases_with_steps(name, mixture):
    g = torch.Generator().manual_seed(0)
    n = 1000
    ref = mixture.sample(n, generator=g)
    errs = []
    for steps in (4, 40):
        x = SIGMA_MAX * torch.randn(n, 8, generator=g)
        kw = {"rtol": 1e-2, "atol": 1e-2} if steps == 4 and name == "ode_rk45" else {}
        x0, _ = integrate(name, mixture.score, x, torch.full((n,), SIGMA_MAX), steps, generator=g, **kw)
        errs.append(sw(x0, ref))
    assert errs[1] < errs[0], errs


def test_gibbs_kernel_leaves_joint_approximately_invariant(mixture):
    """Exact x|sigma draws would leave p(x, sigma) invariant; Langevin with a small eta does so approximately."""
    g = torch.Generator().manual_seed(0)
    lv = NoiseLevels(0.5, 5.0, 200)
    post = mixture.noise_posterior(lv)
    n = 2000
    idx = torch.randint(0, len(lv), (n,), generator=g)  # uniform prior on the grid
    x = mixture.sample(n, lv.sigma(idx).double(), generator=g)
    x_start, log_sigma_start = x.clone(), lv.sigma(idx).log()
    for _ in range(20):
        x, idx = gibbs_step(mixture.score, post, lv, x, idx, step_size=0.01, mode="sample", generator=g)
    log_sigma = lv.sigma(idx).log()
    assert abs(log_sigma.mean() - log_sigma_start.mean()) < 0.05
    assert abs(log_sigma.std() - log_sigma_start.std()) < 0.05
    floor = sw(mixture.sample(n, lv.sigma(torch.randint(0, len(lv), (n,), generator=g)).double(), generator=g), x_start)
    assert sw(x, x_start) < 1.5 * floor
    # The argmax draw (paper) stays on the same grid and selects the posterior mode.
    am = sample_sigma_index(post, x, lv, "argmax")
    assert torch.equal(am, post(x).argmax(-1))


def test_restart_move_is_exact(mixture):
    """x + sqrt(S^2 - sigma^2) z of exact p_sigma samples is an exact draw of p_S: the restart kernel's lift."""
    g = torch.Generator().manual_seed(0)
    n, S = 4000, 3.0
    sigma = torch.exp(torch.empty(n).uniform_(math.log(0.01), math.log(1.0), generator=g))
    x = mixture.sample(n, sigma, generator=g)
    lifted = x + (S**2 - sigma**2).sqrt()[:, None] * torch.randn(x.shape, generator=g)
    exact, floor_ref = mixture.sample(n, S, generator=g), mixture.sample(n, S, generator=g)
    assert sw(lifted, exact) < 1.5 * sw(floor_ref, exact)
    assert not sw(x + S * torch.randn(x.shape, generator=g) * 0.5, exact) < 1.5 * sw(floor_ref, exact)


def test_restart_kernel_keeps_the_data_distribution(mixture, levels):
    """Started from exact samples, restart moves with an accurate denoiser stay at the exact distribution."""
    g = torch.Generator().manual_seed(1)
    n = 2000
    sampler = DLGSampler(mixture.score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=n,
                         restart_sigma=10.0, denoise_steps=40, seed=0)
    sampler.warm_up(x_init=mixture.sample(n, generator=g))
    x = torch.cat([sampler.step(), sampler.step()])
    ref, floor = mixture.sample(2 * n, generator=g), mixture.sample(2 * n, generator=g)
    assert sw(x, ref) < 1.5 * sw(floor, ref) + 0.02
    assert (mixture.mode_weights(x) - mixture.weights).abs().sum() < 0.05


def test_restart_beats_vanilla_at_equal_total_nfe(mixture, levels):
    """20 outputs per chain, every evaluation counted (warm-up included), against vanilla at the same total."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    ref = mixture.sample(n, generator=g)
    score = CountingScore(mixture.score)
    sampler = DLGSampler(score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=n // 20,
                         denoise_steps=5, seed=0)
    x = sampler.sample(n)
    total = sampler.stats["nfe_per_sample"]
    assert total == score.evaluations / n and total <= 7.5
    x0, nfe = integrate("dpmpp_2m", mixture.score, SIGMA_MAX * torch.randn(n, 8, generator=g), SIGMA_MAX, 7, generator=g)
    assert nfe >= total
    assert sw(x, ref) < 0.7 * sw(x0, ref), (sw(x, ref), sw(x0, ref))
    assert sampler.stats["lag1_autocorr"] < 0.2


@pytest.mark.parametrize("kernel", ["restart", "gibbs"])
def test_every_model_evaluation_is_in_the_reported_nfe(kernel, mixture, levels):
    """Warm-up, re-initialisations, Gibbs, denoising, Tweedie: stats' total times samples equals counted calls."""
    inject = {"on": False}

    def flaky(x, sigma):
        s = mixture.score(x, sigma)
        if inject["on"]:
            s[3], inject["on"] = float("nan"), False
        return s

    score = CountingScore(flaky)
    kw = dict(kernel="gibbs", integrator="karras_heun", gibbs_steps=2, step_size=0.05) if kernel == "gibbs" else {}
    sampler = DLGSampler(score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=16, denoise_steps=3,
                         seed=0, **kw)
    sampler.sample(20)
    inject["on"] = True  # chain 3 diverges in the next batch and is re-initialised (a warm-up counted again)
    sampler.sample(37)
    st = sampler.stats
    assert st["reinitialised"] == 1 and st["samples"] == 57
    assert math.isclose(st["nfe_per_sample"] * st["samples"], score.evaluations)
    assert math.isclose(sum(st["nfe_split"].values()), st["nfe_per_sample"])
    assert st["model_evaluations"] == score.evaluations
    assert st["nfe_split"]["warmup"] * 57 == pytest.approx(st["warmup_nfe_per_chain"] * 16)


def test_an_external_progress_bar_counts_every_evaluation_as_planned(mixture, levels):
    """One caller's bar over several ``sample`` calls: advanced by each model evaluation, sized by planned_nfe."""
    score = CountingScore(mixture.score)
    sampler = DLGSampler(score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=16, denoise_steps=3,
                         seed=0)
    planned = sampler.planned_nfe(50)  # the warm-up and 4 batches of 16
    with tqdm(total=planned, file=io.StringIO()) as bar:
        sampler.sample(30, progress_bar=bar)
        sampler.sample(20, progress_bar=bar)
    assert bar.n == score.evaluations == planned == 16 * (10 + 4 * 4)
    assert sampler.planned_nfe(14) == 0 and sampler.planned_nfe(15) == 16 * 4  # 14 samples are already made


def test_stats_split_and_exact_n(mixture, levels):
    sampler = DLGSampler(mixture.score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=64,
                         kernel="gibbs", integrator="karras_heun", denoise_steps=3, gibbs_steps=2, step_size=0.05,
                         seed=0)
    x = sampler.sample(150)
    assert x.shape == (150, 8) and torch.isfinite(x).all()
    st = sampler.stats
    # karras_heun: 3 Heun steps (2 NFE each) down to the Tweedie level, then Tweedie; 192 made, 150 returned.
    split = {k: v * 150 / 192 for k, v in st["nfe_split"].items()}
    assert split["gibbs"] == pytest.approx(2.0) and split["denoise"] == pytest.approx(6.0)
    assert split["tweedie"] == pytest.approx(1.0) and st["warmup_nfe_per_chain"] == 39 + 20
    assert st["batches"] == 3 and st["samples"] == 150 and st["outputs_per_chain"] == pytest.approx(150 / 64)
    assert int(st["selected_sigma_hist"].sum()) == 192 and 0.01 <= st["selected_sigma_mean"] <= SIGMA_MAX
    assert list(st)[0] == "nfe_per_sample" and st["nfe_per_sample"] == pytest.approx(9 * 192 / 150 + 59 * 64 / 150)


@pytest.mark.parametrize("kernel", ["restart", "gibbs"])
def test_state_dict_resume_is_bit_for_bit(kernel, mixture, levels):
    kw = dict(shape=(8,), num_chains=32, denoise_steps=2, kernel=kernel, integrator="karras_stochastic")
    if kernel == "gibbs":
        kw.update(gibbs_steps=2, step_size=0.05)
    post = mixture.noise_posterior(levels)
    full = DLGSampler(mixture.score, post, levels, seed=3, **kw)
    ref = torch.cat([full.sample(40), full.sample(40), full.sample(40)])
    first = DLGSampler(mixture.score, post, levels, seed=3, **kw)
    head = first.sample(40)
    state = first.state_dict()
    resumed = DLGSampler(mixture.score, post, levels, seed=123, **kw)
    resumed.load_state_dict(state)
    tail = torch.cat([resumed.sample(40), resumed.sample(40)])
    assert torch.equal(torch.cat([head, tail]), ref)
    assert resumed.stats["lag1_autocorr"] == full.stats["lag1_autocorr"]
    # a user-supplied generator works the same way
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator()
    a = DLGSampler(mixture.score, post, levels, **kw)
    a.sample(10, generator=g1)
    st, gst = a.state_dict(), g1.get_state()
    nxt = a.sample(10, generator=g1)
    b = DLGSampler(mixture.score, post, levels, **kw)
    b.load_state_dict(st)
    g2.set_state(gst)
    assert torch.equal(b.sample(10, generator=g2), nxt)


@pytest.mark.parametrize("kernel", ["restart", "gibbs"])
def test_nan_chain_is_reinitialised_and_never_emitted(kernel, mixture, levels):
    inject = {"on": False}

    def flaky_score(x, sigma):
        s = mixture.score(x, sigma)
        if inject["on"]:  # one evaluation of the first batch: chain 3 diverges
            s[3], inject["on"] = float("nan"), False
        return s

    kw = dict(kernel="gibbs", gibbs_steps=2, step_size=0.05, warmup_sweeps=(0, 2)) if kernel == "gibbs" else {}
    sampler = DLGSampler(flaky_score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=16,
                         denoise_steps=2, warmup_steps=4, seed=0, **kw)
    sampler.warm_up()
    inject["on"] = True
    first = sampler.step()
    assert len(first) == 15 and torch.isfinite(first).all()  # the diverged chain is not emitted
    assert sampler.stats["reinitialised"] == 1 and torch.isfinite(sampler.x).all()
    x = sampler.sample(40)
    assert torch.isfinite(x).all() and x.shape == (40, 8)


def test_the_restart_kernel_needs_no_noise_posterior_and_the_gibbs_kernel_says_it_does(mixture, levels):
    sampler = DLGSampler(mixture.score, None, levels, shape=(8,), num_chains=20, denoise_steps=4, seed=0)
    assert sampler.sample(40).shape == (40, 8)

    class Adapter:  # a score that knows its trained range gives for_budget the grid
        sigma_min, sigma_max = 0.01, SIGMA_MAX

        def __call__(self, x, sigma):
            return mixture.score(x, sigma)

    tuned = DLGSampler.for_budget(Adapter(), None, shape=(8,), nfe=10, n=400, seed=0)
    assert tuned.levels == NoiseLevels(0.01, SIGMA_MAX) and tuned.sample(40).shape == (40, 8)
    with pytest.raises(ValueError, match="Gibbs kernel draws sigma.*kernel='restart', which needs none"):
        DLGSampler(mixture.score, None, levels, shape=(8,), kernel="gibbs")


def test_a_score_that_always_diverges_stops_with_a_clear_error(mixture, levels):
    sampler = DLGSampler(lambda x, s: torch.full_like(x, float("nan")), mixture.noise_posterior(levels), levels,
                         shape=(8,), num_chains=4, denoise_steps=2, seed=0)
    with pytest.raises(RuntimeError, match="every chain diverged.*Check the model"):
        sampler.sample(8)


def test_correlated_chains_warn_and_mixing_ones_do_not(mixture, levels):
    post = mixture.noise_posterior(levels)
    sticky = DLGSampler(mixture.score, post, levels, shape=(8,), num_chains=50, kernel="gibbs", integrator="karras_heun",
                        denoise_steps=3, gibbs_steps=2, step_size=0.05, seed=0)
    with pytest.warns(UserWarning, match=r"lag-1 autocorrelation 0\.9.*worth about \d+ independent"):
        sticky.sample(200)
    mixing = DLGSampler(mixture.score, post, levels, shape=(8,), num_chains=50, denoise_steps=5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixing.sample(200)
    assert mixing.stats["lag1_autocorr"] < 1 / 3 < sticky.stats["lag1_autocorr"]


def test_step_size_that_puts_chains_at_the_top_of_the_grid_warns(mixture, levels):
    sampler = DLGSampler(mixture.score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=32,
                         kernel="gibbs", integrator="karras_heun", denoise_steps=2, gibbs_steps=2, step_size=2000.0,
                         seed=0)
    with pytest.warns(UserWarning, match="top of the grid.*lower step_size"):
        sampler.sample(32)


def test_output_correlation_of_copies_and_independent_draws():
    g = torch.Generator().manual_seed(0)
    copies, independent = OutputCorrelation(200, 16), OutputCorrelation(200, 16)
    chains = torch.arange(200)
    x = torch.randn(200, 16, generator=g)
    for _ in range(3):
        copies.update(chains, x)
        independent.update(chains, torch.randn(200, 16, generator=g))
    assert copies.lag1 == pytest.approx(1.0) and abs(independent.lag1) < 0.05
    assert ess_fraction(copies.lag1) == pytest.approx(0.0, abs=1e-9) and ess_fraction(0.0) == 1.0


# ----------------------------------------------------------------------------- settings from a budget
def test_for_budget_fits_the_budget_counts_its_pilot_and_is_deterministic(mixture, levels):
    score = CountingScore(mixture.score)
    a = DLGSampler.for_budget(score, mixture.noise_posterior(levels), shape=(8,), nfe=12, n=10_000, seed=0,
                              integrator="unipc")  # UniPC with the Tweedie step: its arithmetic below
    pilot, counts = a.tuning["pilot"], dict(a._counts)
    assert 0 < pilot["evaluations"] == counts["pilot"] <= 0.05 * 12 * 10_000  # at most 5% of the run
    # The pilot started from the run's own warm-up (counted once, as warm-up): sampling warms up nothing more.
    assert score.evaluations == counts["pilot"] + counts["warmup"] == pilot["evaluations"] + 11 * a.num_chains
    # the warm-up is each chain's first output, as long as an output (10 steps + Tweedie; 11 in some batches)
    assert a.tuning["predicted_nfe_per_sample"] <= 12 and a.denoise_steps == 10 and a.warmup_steps == 11
    assert 0 < a.extra_step_share < 1
    b = DLGSampler.for_budget(mixture.score, mixture.noise_posterior(levels), shape=(8,), nfe=12, n=10_000, seed=0,
                              integrator="unipc")
    assert a.restart_sigma == b.restart_sigma and a.tuning == b.tuning
    x = a.sample(10_000)
    assert torch.isfinite(x).all() and a._counts["warmup"] == counts["warmup"]
    assert a.stats["nfe_per_sample"] == pytest.approx(a.tuning["predicted_nfe_per_sample"])  # the whole run
    assert a.stats["nfe_per_sample"] <= 12
    assert a.stats["nfe_per_sample"] * 10_000 == pytest.approx(score.evaluations)
    assert a.stats["nfe_split"]["pilot"] * 10_000 == pilot["evaluations"]
    assert a.state_dict()["tuning"] == a.tuning


def test_a_tight_budget_trades_restart_chains_for_denoising_steps():
    """Steps first: with the warm-up paid and not returned, 11.5 NFE leave 0.5 per sample beside 10 steps +
    Tweedie, exactly the warm-up of n / 20 chains, so the pilot takes fewer chains; without a pilot (S given) n / 20
    fit. Chains given stay as given; Gibbs chains are never traded (their consecutive outputs are near-copies)."""
    tight, roomy = (plan_budget(11.5, 10_000, warmup_outputs=False, integrator="unipc", **given)
                    for given in ({}, {"restart_sigma": 5.0}))
    assert tight["settings"]["denoise_steps"] == roomy["settings"]["denoise_steps"] == 10
    assert 10_000 / 250 <= tight["settings"]["num_chains"] < 500 == roomy["settings"]["num_chains"]
    assert tight["pilot_chains"] >= 8 and roomy["pilot_chains"] == 0
    assert tight["predicted_nfe_per_sample"] <= 11.5 and roomy["predicted_nfe_per_sample"] == 11.5
    assert plan_budget(12, 10_000, warmup_outputs=False, integrator="unipc")["settings"]["num_chains"] == 500
    given = plan_budget(11.5, 10_000, num_chains=500, warmup_outputs=False, integrator="unipc")
    assert given["settings"]["num_chains"] == 500 and given["settings"]["denoise_steps"] == 9
    assert plan_budget(10, 5000, num_chains=4)["pilot_chains"] == 0  # a pilot needs 8 of the run's chains
    assert plan_budget(10, 5000, kernel="gibbs")["settings"]["num_chains"] == 250


def test_the_pilot_keeps_the_rule_of_thumb_where_chains_mix_and_raises_s_where_they_would_not():
    """Ladder lags that follow r(S) = s_eff / sqrt(s_eff^2 + S^2): with s_eff = the data scale the rule of thumb
    (12 x scale, lag-1 0.08) mixes and stays; with s_eff = 5 x scale it would leave lag-1 0.38, so S rises to where
    the curve reaches 0.2 (5 x sqrt(24) = 24.5 x scale); capped at sigma_max; no usable estimate: the rule."""
    def ladder(s_eff, scale=2.0):
        return [{"restart_sigma": c * scale, "lag1": s_eff / math.hypot(s_eff, c * scale), "diverged": 0}
                for c in RESTART_LADDER]

    assert choose_level(ladder(2.0), 24.0, 80.0) == (pytest.approx(2.0), pytest.approx(2.0 * 24 ** 0.5), 24.0)
    s_eff, mixing, chosen = choose_level(ladder(10.0), 24.0, 80.0)
    assert s_eff == pytest.approx(10.0) and chosen == mixing == pytest.approx(10.0 * 24 ** 0.5)
    assert choose_level(ladder(10.0), 24.0, 30.0)[2] == 30.0
    assert choose_level([{**c, "diverged": 1} for c in ladder(10.0)], 24.0, 80.0) == (None, None, 24.0)


def test_for_budget_scales_with_the_model(mixture):
    """The same mixture scaled 10x: the chosen restart level is 10x, everything else equal."""
    big = GaussianMixture(10 * mixture.means, 10 * mixture.stds, mixture.weights)
    lv, lv_big = NoiseLevels(0.01, SIGMA_MAX, 1000), NoiseLevels(0.1, 10 * SIGMA_MAX, 1000)
    a = DLGSampler.for_budget(mixture.score, mixture.noise_posterior(lv), shape=(8,), nfe=10, n=5000, seed=1)
    b = DLGSampler.for_budget(big.score, big.noise_posterior(lv_big), shape=(8,), nfe=10, n=5000, seed=1)
    assert b.restart_sigma == pytest.approx(10 * a.restart_sigma, rel=1e-3)
    assert a.denoise_steps == b.denoise_steps and a.num_chains == b.num_chains


def test_plan_budget_is_for_budgets_choice_without_a_model(mixture, levels):
    """What a command line checks before it loads a model is what for_budget then builds."""
    plan = plan_budget(12, 10_000, kernel="restart")
    sampler = DLGSampler.for_budget(mixture.score, mixture.noise_posterior(levels), shape=(8,), nfe=12, n=10_000,
                                    kernel="restart", seed=0)
    assert plan["settings"]["denoise_steps"] == sampler.denoise_steps
    assert plan["settings"]["num_chains"] == sampler.num_chains
    assert plan["predicted_nfe_per_sample"] == sampler.tuning["predicted_nfe_per_sample"]
    assert plan["pilot_chains"] == sampler.tuning["pilot"]["chains"] > 0
    with pytest.raises(ValueError, match="too small.*raise nfe to at least 2"):  # 1 step to 0 costs 1
        plan_budget(1, 1000)


def test_for_budget_refuses_a_budget_too_small(mixture, levels):
    with pytest.raises(ValueError, match="too small.*raise nfe to at least 2"):
        DLGSampler.for_budget(mixture.score, mixture.noise_posterior(levels), shape=(8,), nfe=1, n=1000)
    with pytest.raises(ValueError, match="nfe must be a positive number"):
        DLGSampler.for_budget(mixture.score, mixture.noise_posterior(levels), shape=(8,), nfe=0, n=1000)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(mixture, levels):
    post = mixture.noise_posterior(levels)
    ok = dict(shape=(8,), num_chains=8, denoise_steps=2, gibbs_steps=2, step_size=0.05)
    x, s = torch.zeros(4, 8), torch.ones(4)
    with pytest.raises(ValueError, match="unknown integrator 'heun'.*karras_heun"):
        integrate("heun", mixture.score, x, s, 5)
    with pytest.raises(ValueError, match="unknown integrator"):
        DLGSampler(mixture.score, post, levels, integrator="dpm", **{k: v for k, v in ok.items()})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        integrate("karras_heun", mixture.score, x, s, 0)
    with pytest.raises(ValueError, match="sigma_start must be positive"):
        integrate("karras_heun", mixture.score, x, -s, 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        integrate("karras_heun", mixture.score, torch.full((4, 8), float("nan")), s, 5)
    with pytest.raises(ValueError, match="score returned"):
        integrate("karras_heun", lambda x, sig: x[:, :4], x, s, 5)
    for key, bad in (("step_size", 0.0), ("step_size", float("nan")), ("gibbs_steps", 0), ("denoise_steps", -1),
                     ("num_chains", 0)):
        with pytest.raises(ValueError, match=key):
            DLGSampler(mixture.score, post, levels, **{**ok, key: bad})
    with pytest.raises(ValueError, match="expected logits of shape"):
        DLGSampler(mixture.score, lambda x: torch.zeros(len(x), 10), levels, kernel="gibbs", **ok).sample(4)
    with pytest.raises(ValueError, match="score returned"):
        DLGSampler(lambda x, sig: x.sum(-1), post, levels, **ok).sample(4)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        DLGSampler(mixture.score, post, levels, **ok).sample(0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        DLGSampler(mixture.score, post, levels, kernel="langevin", **ok)
    with pytest.raises(ValueError, match="restart_sigma=100 is above the grid's sigma_max=80"):
        DLGSampler(mixture.score, post, levels, restart_sigma=100.0, **ok)

    class RangedScore:  # a model trained on sigma in [0.1, 10] cannot serve a grid up to 80
        sigma_min, sigma_max = 0.1, 10.0

        def __call__(self, x, sigma):
            return mixture.score(x, sigma)

    with pytest.raises(ValueError, match="outside the model's trained sigma range"):
        DLGSampler(RangedScore(), post, levels, **ok)


def test_the_lift_rule_follows_where_the_spread_sits():
    """Gaussian data whose spread sits in one direction (a photo background's brightness): the rule rises above
    12 x the per-coordinate scale to the level at which the pooled lag-1 sum l sqrt(l / (l + S^2)) / sum l of an exact
    restart move is 0.2, estimated from 256 chains within 15% of the exact spectrum's level; isotropic data keeps 12 x
    the scale (its spectral level is lower), and so does a run of two chains (no spectrum to read)."""
    g = torch.Generator().manual_seed(0)
    dim, spike = 768, 8.0  # one direction of std 8 among 767 of std 0.3 (the photo-digits training images: 8.2, 0.42)
    direction = torch.randn(dim, generator=g)
    direction /= direction.norm()
    x = 0.3 * torch.randn(256, dim, generator=g) + spike * torch.randn(256, 1, generator=g) * direction
    lam = torch.tensor([spike**2 + 0.09] + [0.09] * (dim - 1), dtype=torch.float64)

    def pooled_lag1(S: float) -> float:
        return float((lam * (lam / (lam + S * S)).sqrt()).sum() / lam.sum())

    exact = brentq(lambda S: pooled_lag1(S) - TARGET_LAG1, 0.1, 1000.0)
    assert spectral_level(x) == pytest.approx(exact, rel=0.15)
    assert restart_rule(x) == spectral_level(x) > 3 * RESTART_SCALE * _data_scale(x)
    iso = torch.randn(64, dim, generator=g)
    assert spectral_level(iso) < RESTART_SCALE * _data_scale(iso) == restart_rule(iso)
    assert restart_rule(x[:2]) == RESTART_SCALE * _data_scale(x[:2])


def test_the_sampler_lifts_to_the_rule_of_its_warmed_up_chains():
    """``restart_sigma=None`` is the rule of the warmed-up chains (capped at sigma_max), here (three modes far apart in
    16-d) its spectral level, above 12 x the data scale; a given level is kept."""
    mix = GaussianMixture.random(3, 16, 8.0, 0.5, seed=3)
    levels = NoiseLevels(0.01, 80.0, 1000)
    s = DLGSampler(mix.score, mix.noise_posterior(levels), levels, shape=(16,), num_chains=32, denoise_steps=4, seed=0)
    s.warm_up()
    assert s.restart_sigma == pytest.approx(min(restart_rule(s.x), 80.0))
    assert s.restart_sigma == pytest.approx(spectral_level(s.x)) and s.restart_sigma > RESTART_SCALE * _data_scale(s.x)
    given = DLGSampler(mix.score, mix.noise_posterior(levels), levels, shape=(16,), num_chains=32, denoise_steps=4,
                       restart_sigma=5.0, seed=0)
    given.warm_up()
    assert given.restart_sigma == 5.0


def test_the_rule_of_thumb_rises_with_the_denoising_steps_up_to_twice():
    """``RESTART_SCALE`` x the data scale up to ``RULE_STEPS`` denoising steps, then in proportion to the steps, at most
    twice that; the spectral level (where the chains mix) does not grow; the sampler applies it with its own steps."""
    assert RULE_MAX_GROWTH == 2.0
    k = RULE_STEPS + 3
    assert [rule_scale(k) for k in (1, RULE_STEPS, k, 2 * RULE_STEPS, 5 * RULE_STEPS)] == pytest.approx(
        [RESTART_SCALE, RESTART_SCALE, RESTART_SCALE * k / RULE_STEPS, RESTART_SCALE * 2, RESTART_SCALE * 2])
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(64, 16, generator=g)
    assert restart_rule(iso, steps=k) == pytest.approx(k / RULE_STEPS * restart_rule(iso))
    assert restart_rule(iso) == pytest.approx(RESTART_SCALE * _data_scale(iso))
    spiky = torch.randn(64, 256, generator=g) * 0.1 + torch.randn(64, 1, generator=g) * 10 * torch.eye(256)[0]
    assert restart_rule(spiky, steps=2 * RULE_STEPS) == spectral_level(spiky) > 2 * RESTART_SCALE * _data_scale(spiky)
    mix = GaussianMixture.random(1, 16, 0.0, 1.0, seed=3)  # one Gaussian: the data scale rules
    levels = NoiseLevels(0.01, 80.0, 1000)
    for steps in (4, RULE_STEPS + 3):
        s = DLGSampler(mix.score, None, levels, shape=(16,), num_chains=32, denoise_steps=steps, seed=0)
        s.warm_up()
        assert s.restart_sigma == pytest.approx(rule_scale(steps) * _data_scale(s.x))
