"""Full batches at small n: where the paper's protocol (n / 20 chains, 20 outputs each) would make many rounds of
tiny model calls one after the other (n = 256: 20 rounds of 13-sample calls where a peer solver makes one round of
256), the budget raises the restart chains so a few rounds produce the samples, within the same whole-cost budget,
and the command line says what that traded. Large runs keep the protocol."""

import json
import math

import pytest
import torch

from dlg_sampler import DLGSampler, GaussianMixture, NoiseLevels, models
from dlg_sampler.cli import common
from dlg_sampler.cli import sample as sample_cli
from dlg_sampler.cli.sample import _settings_line
from dlg_sampler.models import LoadedModel
from dlg_sampler.shards import read_samples
from dlg_sampler.tuning import (FULL_BATCH_MIN_STEPS, MIN_WARMUP_STEPS, OUTPUTS_PER_CHAIN, full_batches_note,
                                plan_budget)


@pytest.fixture
def mixture():
    return GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)


@pytest.fixture
def levels():
    return NoiseLevels(0.01, 80.0, 1000)


#: The budget's arithmetic with each chain's warm-up paid and not returned (``warmup_outputs=False``), UniPC + Tweedie.
PAID = {"warmup_outputs": False, "integrator": "unipc"}
PAID_DENOISER = {"integrator": "unipc"}


def rounds(plan: dict, n: int) -> int:
    """Output rounds of a plan: one model call per solver step each, one after the other."""
    return math.ceil(n / plan["settings"]["num_chains"])


def test_n_256_runs_a_few_rounds_of_full_calls_within_the_budget():
    """With the warm-up paid and not returned, full batches shorten it; returned, it stays whole (see below)."""
    plan, protocol = plan_budget(10, 256, **PAID), plan_budget(10, 256, outputs_per_chain=OUTPUTS_PER_CHAIN, **PAID)
    assert rounds(protocol, 256) == OUTPUTS_PER_CHAIN  # what n = 256 ran before: 20 rounds
    assert rounds(plan, 256) <= 3 and plan["settings"]["num_chains"] >= 64
    assert plan["predicted_nfe_per_sample"] <= 10  # the warm-up of the extra chains is paid from the budget
    assert MIN_WARMUP_STEPS <= plan["settings"]["warmup_steps"] < protocol["settings"]["warmup_steps"]
    assert plan["settings"]["denoise_steps"] >= protocol["settings"]["denoise_steps"] - 1  # at most one step traded
    assert plan["full_batches"] == {
        "protocol_chains": protocol["settings"]["num_chains"], "protocol_rounds": rounds(protocol, 256),
        "protocol_warmup_steps": protocol["settings"]["warmup_steps"],
        "protocol_denoise_steps": protocol["settings"]["denoise_steps"], "rounds": rounds(plan, 256)}
    # n = 1000 keeps the protocol's steps and warm-up but runs fewer rounds; large runs are the protocol exactly
    mid, mid_protocol = plan_budget(10, 1000, **PAID), plan_budget(10, 1000, outputs_per_chain=OUTPUTS_PER_CHAIN,
                                                                   **PAID)
    assert rounds(mid, 1000) < rounds(mid_protocol, 1000) and mid["predicted_nfe_per_sample"] <= 10
    assert mid["settings"]["denoise_steps"] == mid_protocol["settings"]["denoise_steps"]
    for n in (5000, 50_000):
        assert plan_budget(10, n) == {**plan_budget(10, n, outputs_per_chain=OUTPUTS_PER_CHAIN), "full_batches": None}
        assert rounds(plan_budget(10, n), n) == OUTPUTS_PER_CHAIN
    # returned warm-ups stay whole: full batches trade at most one step, and that only in part; by default they are
    # not returned here (3 outputs per chain: a third of the samples would be vanilla solves)
    returned = plan_budget(10, 256, warmup_outputs=True, **PAID_DENOISER)
    assert rounds(returned, 256) <= 3 and returned["settings"]["warmup_steps"] == 10
    assert returned["predicted_nfe_per_sample"] <= 10 and returned["settings"]["denoise_steps"] + returned[
        "settings"].get("extra_step_share", 0) > returned["full_batches"]["protocol_denoise_steps"] - 1
    assert plan_budget(10, 256)["settings"]["warmup_outputs"] is False


def test_chains_and_kernels_given_are_not_raised_nor_tight_budgets_traded():
    """Chains, outputs per chain or denoising steps given stay as given; Gibbs chains are never raised (their warm-up
    is 40 evaluations each); where a traded step would leave fewer than FULL_BATCH_MIN_STEPS, steps win (warm-ups
    paid, not returned: returned ones make room for more steps, for which chains may be traded)."""
    assert plan_budget(10, 256, num_chains=13, **PAID)["settings"]["num_chains"] == 13
    assert plan_budget(10, 256, outputs_per_chain=50, **PAID)["settings"]["num_chains"] == math.ceil(256 / 50)
    given = plan_budget(10, 256, denoise_steps=8, **PAID)
    assert given["full_batches"] is None and given["settings"]["num_chains"] == math.ceil(256 / OUTPUTS_PER_CHAIN)
    assert plan_budget(10, 256, kernel="gibbs")["full_batches"] is None
    for nfe in (4, 6, 7):
        tight = plan_budget(nfe, 256, **PAID)
        protocol = plan_budget(nfe, 256, outputs_per_chain=OUTPUTS_PER_CHAIN, **PAID)
        assert protocol["settings"]["denoise_steps"] - 1 < FULL_BATCH_MIN_STEPS
        assert tight == {**protocol, "full_batches": None}
    with pytest.raises(ValueError, match="raise nfe to at least 3"):  # the smallest budget is what it was
        plan_budget(2, 256, **PAID)


def test_the_sampler_makes_few_full_model_calls_counts_them_all_and_is_deterministic(mixture, levels):
    calls = []

    def score(x, sigma):
        calls.append(len(x))
        return mixture.score(x, sigma)

    a = DLGSampler.for_budget(score, None, shape=(8,), nfe=10, n=256, seed=0, levels=levels)
    xa = a.sample(256)
    tuning = a.tuning
    # one call per warm-up step (the first round's outputs), then per denoising and Tweedie step of each round (the
    # first step's from the chains' Gaussian: no call)
    assert a.gaussian_first_step and len(calls) == tuning["settings"]["warmup_steps"] + sum(
        a.batch_steps(b) + (a.final_step == "tweedie") - 1
        for b in range(tuning["full_batches"]["rounds"] - a.warmup_outputs))
    assert len(calls) <= 4 * 10 and min(calls) >= 64  # the protocol: 190 calls of 13 samples
    assert sum(calls) == a.stats["model_evaluations"] and a.warmup_steps == tuning["settings"]["warmup_steps"]
    assert a.stats["nfe_per_sample"] == pytest.approx(tuning["predicted_nfe_per_sample"]) and \
        a.stats["nfe_per_sample"] <= 10
    assert a.stats["lag1_autocorr"] is not None  # every chain gives at least two outputs
    b = DLGSampler.for_budget(mixture.score, None, shape=(8,), nfe=10, n=256, seed=0, levels=levels)
    assert b.tuning == tuning and torch.equal(b.sample(256), xa)


def test_the_summary_says_what_full_batches_traded_and_a_resumed_run_keeps_its_warm_up(mixture, levels, monkeypatch,
                                                                                       tmp_path, capsys):
    sampler = DLGSampler.for_budget(mixture.score, None, shape=(8,), nfe=10, n=256, seed=0, levels=levels)
    sampler.warm_up()  # sets S, which the line shows
    summary = {"samples": 256, "chains": sampler.num_chains}
    line = _settings_line(sampler, "unipc", summary, 1)
    fb, settings = sampler.tuning["full_batches"], sampler.tuning["settings"]
    assert line.endswith("; " + full_batches_note(sampler.tuning))
    assert f"unipc {sampler.denoise_steps} steps to 0, the first from the chains' Gaussian: 256 samples" in line
    assert (f"chains raised from n / 20 = {fb['protocol_chains']} to fill the model's calls ({fb['rounds']} rounds "
            f"of calls instead of {fb['protocol_rounds']}), paid for with a {settings['warmup_steps']}-step warm-up "
            f"instead of {fb['protocol_warmup_steps']}") in line
    returned = DLGSampler.for_budget(mixture.score, None, shape=(8,), nfe=10, n=256, seed=0, levels=levels,
                                     warmup_outputs=True, integrator="unipc")
    tuned = returned.tuning["settings"]
    assert (f"paid for with {tuned['denoise_steps']} denoising steps ({tuned['denoise_steps'] + 1} in "
            f"{tuned['extra_step_share']:.0%} of the batches) instead of") in full_batches_note(returned.tuning)
    protocol = DLGSampler.for_budget(mixture.score, None, shape=(8,), nfe=10, n=256, seed=0, levels=levels,
                                     num_chains=13)
    protocol.warm_up()
    assert "raised" not in _settings_line(protocol, "unipc", {"samples": 256, "chains": 13}, 1)

    # a run with shards at small n, killed after its first shard, resumes with the warm-up it chose
    model = LoadedModel(mixture.score, (8,), 0.01, 80.0, lambda x: x)
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(models, "load_classifier", lambda *args, **kwargs: mixture.noise_posterior(levels))
    built = []
    original = DLGSampler.for_budget.__func__

    def spy(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(DLGSampler, "for_budget", classmethod(spy))

    def run(name: str) -> str:
        sample_cli.sample_main(["--model", "mixture", "--classifier", "exact", "--out-dir", str(tmp_path / name),
                                "--n", "256", "--shard-size", "128", "--seed", "3"])
        return capsys.readouterr().out

    out = run("full")
    assert "chains raised from n / 20 = 13" in out
    killed = tmp_path / "killed"
    killed.mkdir()
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    first = manifest["shards"][0]["file"]
    (killed / first).write_bytes((tmp_path / "full" / first).read_bytes())
    (killed / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:1], "count": 128}))
    assert "resuming" in run("killed")
    chosen = manifest["config"]["tuning"]["settings"]
    assert built[-1].warmup_steps == chosen["warmup_steps"] == built[0].warmup_steps < 10
    assert built[-1].warmup_outputs == chosen["warmup_outputs"] == built[0].warmup_outputs
    assert built[-1].extra_step_share == chosen.get("extra_step_share", 0.0) == built[0].extra_step_share
    assert (built[-1].integrator, built[-1].final_step) == (chosen["integrator"], chosen["final_step"]) == (
        built[0].integrator, built[0].final_step)
    assert built[-1].num_chains == chosen["num_chains"] == built[0].num_chains
    assert torch.equal(read_samples(killed), read_samples(tmp_path / "full"))
