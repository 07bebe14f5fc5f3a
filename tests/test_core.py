"""The DLG core against an exact Gaussian mixture (closed-form score and noise posterior)."""

import math

import pytest
import torch

from dlg_sampler import INTEGRATORS, DLGSampler, GaussianMixture, NoiseLevels, integrate
from dlg_sampler.gibbs import gibbs_step, sample_sigma_index
from dlg_sampler.metrics import sliced_wasserstein

SIGMA_MAX = 80.0


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


@pytest.mark.parametrize("name,budget", [("karras_heun", 9), ("euler_maruyama", 10)])
def test_dlg_beats_vanilla_at_equal_nfe(name, budget, mixture, levels):
    g = torch.Generator().manual_seed(0)
    n = 2000
    ref = mixture.sample(n, generator=g)
    sampler = DLGSampler(mixture.score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=n,
                         integrator=name, denoise_steps=3, gibbs_steps=2, step_size=0.05, seed=0)
    x_dlg = sampler.sample(n)
    nfe_dlg = sampler.stats["nfe_per_sample"]["total"]
    # vanilla with at least the same NFE per sample
    steps = (budget + 1) // 2 if name == "karras_heun" else budget
    x0, nfe_vanilla = integrate(name, mixture.score, SIGMA_MAX * torch.randn(n, 8, generator=g),
                                torch.full((n,), SIGMA_MAX), steps, generator=g)
    assert nfe_dlg <= nfe_vanilla <= budget + 1
    assert sw(x_dlg, ref) < 0.5 * sw(x0, ref), (sw(x_dlg, ref), sw(x0, ref))


def test_dlg_stats_split_and_exact_n(mixture, levels):
    sampler = DLGSampler(mixture.score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=64,
                         denoise_steps=3, gibbs_steps=2, step_size=0.05, seed=0)
    x = sampler.sample(150)
    assert x.shape == (150, 8) and torch.isfinite(x).all()
    st = sampler.stats
    # karras_heun: 3 Heun steps (2 NFE each) down to the Tweedie level, then Tweedie.
    assert st["nfe_per_sample"] == {"gibbs": 2.0, "denoise": 6.0, "tweedie": 1.0, "total": 9.0}
    assert st["batches"] == 3 and st["samples"] == 192 and st["warmup_nfe_per_chain"] == 39 + 20
    assert int(st["selected_sigma_hist"].sum()) == 192 and 0.01 <= st["selected_sigma_mean"] <= SIGMA_MAX


def test_state_dict_resume_is_bit_for_bit(mixture, levels):
    kw = dict(shape=(8,), num_chains=32, denoise_steps=2, gibbs_steps=2, step_size=0.05, integrator="karras_stochastic")
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


def test_nan_chain_is_reinitialised_and_never_emitted(mixture, levels):
    inject = {"on": False}

    def flaky_score(x, sigma):
        s = mixture.score(x, sigma)
        if inject["on"]:  # one Gibbs step of the first batch: chain 3 diverges
            s[3], inject["on"] = float("nan"), False
        return s

    sampler = DLGSampler(flaky_score, mixture.noise_posterior(levels), levels, shape=(8,), num_chains=16,
                         denoise_steps=2, gibbs_steps=2, step_size=0.05, warmup_steps=4, warmup_sweeps=(0, 2), seed=0)
    sampler.warm_up()
    inject["on"] = True
    first = sampler.step()
    assert len(first) == 15 and torch.isfinite(first).all()  # the diverged chain is not emitted
    assert sampler.stats["reinitialised"] == 1 and torch.isfinite(sampler.x).all()
    x = sampler.sample(40)
    assert torch.isfinite(x).all() and x.shape == (40, 8)


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
        DLGSampler(mixture.score, lambda x: torch.zeros(len(x), 10), levels, **ok).sample(4)
    with pytest.raises(ValueError, match="score returned"):
        DLGSampler(lambda x, sig: x.sum(-1), post, levels, **ok).sample(4)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        DLGSampler(mixture.score, post, levels, **ok).sample(0)

    class RangedScore:  # a model trained on sigma in [0.1, 10] cannot serve a grid up to 80
        sigma_min, sigma_max = 0.1, 10.0

        def __call__(self, x, sigma):
            return mixture.score(x, sigma)

    with pytest.raises(ValueError, match="outside the model's trained sigma range"):
        DLGSampler(RangedScore(), post, levels, **ok)
