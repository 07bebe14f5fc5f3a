"""DLG inside diffusers pipelines: the drop-in DLGScheduler and DLGPipeline, with tiny random components."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

from dlg_sampler import NoiseClassifier
from dlg_sampler.pipelines import DLGPipeline, DLGScheduler

SMALL_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def count_calls(model):
    """Count samples the model evaluates (a forward pre-hook)."""
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(len(args[0] if args else kwargs["sample"])),
                                    with_kwargs=True)
    return seen


def vp_parts(in_channels=1):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels, **SMALL_UNET).eval()
    scheduler = DDPMScheduler(beta_schedule="linear")
    sig = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    clf = NoiseClassifier(float(sig[0]), float(sig[-1]), 200, sample_shape=(in_channels, 8, 8), channels=(8,), hidden=16)
    return unet, scheduler, clf


@pytest.mark.parametrize("pipeline_cls, kernel", [(DDPMPipeline, {}), (DDIMPipeline, {}),
                                                  (DDPMPipeline, {"kernel": "gibbs", "gibbs_steps": 2, "step_size": 0.05})])
def test_drop_in_scheduler_runs_the_pipelines_own_call(pipeline_cls, kernel):
    unet, scheduler, clf = vp_parts()
    pipe = pipeline_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=clf, warmup_steps=3, **kernel)
    calls = count_calls(unet)
    out = pipe(batch_size=4, num_inference_steps=10, output_type="np")
    assert isinstance(out.images, np.ndarray) and out.images.shape == (4, 8, 8, 1)
    assert np.isfinite(out.images).all()
    stats = pipe.scheduler.stats
    assert list(stats)[0] == "nfe_per_sample" and isinstance(stats["nfe_per_sample"], float)
    # every model call is counted: the pipeline's calls, the chain moves, denoising and the one-time warm-up
    assert sum(calls) == stats["nfe_per_sample"] * stats["samples"] == stats["model_evaluations"]
    warmup = stats["warmup_nfe_per_chain"][4]
    assert stats["nfe_per_sample"] == 10 + warmup and stats["nfe_split"]["warmup"] == warmup  # 4 chains, 4 samples
    assert stats["nfe_split"]["pipeline_first_call"] == 1 and stats["nfe_split"]["tweedie"] == 1
    assert stats["nfe_split"]["gibbs"] == kernel.get("gibbs_steps", 0) and stats["kernel"] == kernel.get("kernel", "restart")
    chains, first = pipe.scheduler.samplers[4].x.clone(), sum(calls)
    second = pipe(batch_size=4, num_inference_steps=10, output_type="pt").images
    assert sum(calls) - first == 4 * 10  # the chains persist: no second warm-up
    assert second.shape == (4, 1, 8, 8) and not torch.equal(pipe.scheduler.samplers[4].x, chains)
    stats = pipe.scheduler.stats
    assert stats["samples"] == 8 and sum(calls) == stats["nfe_per_sample"] * 8 and stats["nfe_per_sample"] < 10 + warmup


def test_drop_in_scheduler_for_score_sde_ve_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, time_embedding_type="fourier", **SMALL_UNET).eval()
    scheduler = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)
    clf = NoiseClassifier(0.01, 50.0, 100, sample_shape=(3, 8, 8), channels=(8,), hidden=16)
    pipe = ScoreSdeVePipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=clf, warmup_steps=3)
    calls = count_calls(unet)
    images = pipe(batch_size=2, num_inference_steps=8, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    stats = pipe.scheduler.stats
    assert stats["nfe_per_sample"] == 8 + stats["warmup_nfe_per_chain"][2]
    assert sum(calls) == stats["nfe_per_sample"] * 2


def test_scheduler_save_and_load_round_trip(tmp_path, monkeypatch):
    """The saved folder holds its classifier and refers to it relative to itself (it stored the absolute path of
    the user's folder): moved, with the original classifier gone, loaded from another working directory, it binds."""
    unet, scheduler, clf = vp_parts()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    clf.save_pretrained("clf")
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier="clf", kernel="gibbs", step_size=0.2, gibbs_steps=3)
    pipe.scheduler.save_pretrained("sched")
    text = Path("sched/scheduler_config.json").read_text()
    config = json.loads(text)
    assert config["classifier"] == "classifier" and str(tmp_path) not in text
    assert config["base_scheduler"]["class_name"] == "DDPMScheduler" and config["kernel"] == "gibbs"
    assert pipe.scheduler.config.classifier == str(tmp_path / "work" / "clf")  # saving leaves the live config
    shutil.move("sched", tmp_path / "moved")
    shutil.rmtree("clf")
    monkeypatch.chdir(tmp_path)
    loaded = DLGScheduler.from_pretrained("moved").bind(unet)
    assert loaded.config.kernel == "gibbs" and loaded.config.step_size == 0.2 and loaded.config.gibbs_steps == 3
    assert loaded.classifier.levels == clf.levels
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.classifier(x), clf(x))
    # A Hub repo id is stored as it is; a classifier given as an instance is saved into the folder too.
    DLGScheduler(classifier="someone/clf").save_pretrained(tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "scheduler_config.json").read_text())["classifier"] == "someone/clf"
    DLGScheduler.from_pipe(DDPMPipeline(unet=unet, scheduler=scheduler), classifier=clf,
                           restart_sigma=5.0).save_pretrained("inst")
    restart = DLGScheduler.from_pretrained("inst").bind(unet)
    assert restart.classifier.levels == clf.levels
    assert (restart.config.kernel, restart.config.restart_sigma, restart.config.integrator) == ("restart", 5.0, "unipc")
    # The whole pipeline round-trips too, and from_pipe on a DLG pipeline keeps its settings and original schedule.
    pipe.save_pretrained(tmp_path / "pipe")
    again = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    again.scheduler = DLGScheduler.from_pipe(again)
    assert again.scheduler.config.kernel == "gibbs" and again.scheduler.config.step_size == 0.2
    again.set_progress_bar_config(disable=True)
    assert again(batch_size=2, num_inference_steps=9, output_type="np").images.shape == (2, 8, 8, 1)
    assert again.scheduler.samplers[2].kernel == "gibbs" and again.scheduler.samplers[2].gibbs_steps == 3


def test_without_a_classifier_the_restart_kernel_runs_and_the_gibbs_kernel_asks_for_one(tiny_sd_pipe, tmp_path):
    unet, scheduler, _ = vp_parts()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DLGScheduler.from_pipe(pipe, warmup_steps=3)  # the model's trained range, its sample shape
    calls = count_calls(unet)
    assert pipe(batch_size=3, num_inference_steps=6, output_type="np").images.shape == (3, 8, 8, 1)
    assert sum(calls) == pipe.scheduler.stats["model_evaluations"]
    pipe.scheduler.save_pretrained(tmp_path / "sched")  # nothing to copy: the config alone
    assert not (tmp_path / "sched" / "classifier").exists()
    reloaded = DLGScheduler.from_pretrained(tmp_path / "sched").bind(unet)
    assert reloaded.classifier is None and reloaded.sample_shape == (1, 8, 8)
    dlg = DLGPipeline.from_pipe(tiny_sd_pipe, num_chains=2, warmup_steps=2)
    assert len(dlg("a cat", guidance_scale=2.0, num_inference_steps=5, num_images_per_prompt=2).images) == 2
    gibbs = DDPMPipeline(unet=unet, scheduler=scheduler)
    gibbs.scheduler = DLGScheduler.from_pipe(gibbs, kernel="gibbs", gibbs_steps=1, step_size=0.05)
    with pytest.raises(ValueError, match="Gibbs kernel draws sigma.*needs none"):
        gibbs(batch_size=2, num_inference_steps=6)


def test_scheduler_misuse_is_a_clear_error():
    unet, scheduler, clf = vp_parts()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    wrong_grid = NoiseClassifier(0.001, 500.0, 100, sample_shape=(1, 8, 8), channels=(8,))
    with pytest.raises(ValueError, match="outside the model's trained sigma range"):
        DLGScheduler.from_pipe(pipe, classifier=wrong_grid)
    pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=clf)
    with pytest.raises(ValueError, match=r"below DLGScheduler's minimum 3 \(1 pipeline call \+ denoising \+ Tweedie\)"):
        pipe(batch_size=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        DLGScheduler.from_pipe(pipe, classifier=clf, kernel="langevin")
    wrong_shape = NoiseClassifier(clf.levels.sigma_min, clf.levels.sigma_max, 200, sample_shape=(3, 8, 8), channels=(8,))
    with pytest.raises(ValueError, match="shape"):
        pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=wrong_shape)
        pipe(batch_size=2, num_inference_steps=10)
    with pytest.raises(ValueError, match="not bound"):
        DLGScheduler().set_timesteps(10)


def test_dlg_pipeline_text_to_image_with_guidance(tiny_sd_pipe):
    pipe = tiny_sd_pipe
    ac = pipe.scheduler.alphas_cumprod.double()
    sig = ((1 - ac) / ac).sqrt()
    clf = NoiseClassifier(float(sig[0]), float(sig[-1]), 100, sample_shape=(4, 8, 8), channels=(8,), hidden=16)
    dlg = DLGPipeline.from_pipe(pipe, classifier=clf, num_chains=3, warmup_steps=2)
    calls = count_calls(pipe.unet)
    out = dlg(["a photo of a cat", "a dog"], guidance_scale=3.0, num_inference_steps=6, num_images_per_prompt=2)
    assert len(out.images) == 4 and out.images[0].size == (16, 16)  # PIL, decoded by the VAE (8x8 latents)
    assert len(dlg.samplers) == 2  # one set of chains per prompt
    assert all(n % 2 == 0 for n in calls)  # guidance: conditional + unconditional in one doubled batch
    first = {k: s.x.clone() for k, s in dlg.samplers.items()}
    images = dlg("a photo of a cat", guidance_scale=3.0, num_inference_steps=6, num_images_per_prompt=2,
                 output_type="pt").images  # one leftover sample of the first batch + a new batch
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    key = next(k for k in dlg.samplers if k[0] == "a photo of a cat")
    assert not torch.equal(dlg.samplers[key].x, first[key])  # the same chains went on
    stats = dlg.stats  # one guided evaluation is one doubled-batch call; every one counted, warm-ups included
    assert list(stats)[0] == "nfe_per_sample" and stats["samples"] == 6 and stats["kernel"] == "restart"
    assert sum(calls) // 2 == stats["nfe_per_sample"] * stats["samples"] == stats["model_evaluations"]
    assert stats["nfe_split"]["warmup"] > 0 and stats["nfe_split"]["gibbs"] == 0
    gibbs = DLGPipeline.from_pipe(pipe, classifier=clf, kernel="gibbs", gibbs_steps=4, num_chains=2, warmup_steps=2,
                                  warmup_sweeps=(1, 1))
    with pytest.raises(ValueError, match="leaves no room for unipc denoising and the Tweedie step after 4 Gibbs"):
        gibbs("a dog", guidance_scale=3.0, num_inference_steps=5)
    calls.clear()
    gibbs("a dog", guidance_scale=3.0, num_inference_steps=7, num_images_per_prompt=2, output_type="pt")
    assert gibbs.stats["nfe_split"]["gibbs"] == 4 and sum(calls) // 2 == gibbs.stats["model_evaluations"]
    with pytest.raises(ValueError, match="DLGPipeline"):
        pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=clf)
    with pytest.raises(ValueError, match="latents"):
        DLGPipeline.from_pipe(pipe, classifier=NoiseClassifier(sample_shape=(3, 16, 16), channels=(8,)))


def test_scheduler_told_the_run_size_takes_the_budget_route():
    """num_samples given, restart_sigma left out: chains num_samples / 20 and S from for_budget's pilot, which is
    counted like every other model call and is the same under the same seed."""
    chosen = []
    for _ in range(2):
        unet, scheduler, _ = vp_parts()
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DLGScheduler.from_pipe(pipe, num_samples=2000, warmup_steps=3, seed=1)
        calls = count_calls(unet)
        pipe(batch_size=4, num_inference_steps=10, output_type="np")
        sampler, stats = pipe.scheduler.samplers[4], pipe.scheduler.stats
        pilot = sampler.tuning["pilot"]
        assert sampler.num_chains == 100 and pilot["chains"] >= 8 and stats["tuning"][4] is sampler.tuning
        assert sampler.restart_sigma == pilot["restart_sigma"]
        assert stats["nfe_split"]["pilot"] * stats["samples"] == pilot["evaluations"] > 0
        assert sum(calls) == stats["model_evaluations"]
        assert pilot["evaluations"] <= 0.05 * 2000 * 10  # at most 5% of the planned run
        chosen.append(sampler.restart_sigma)
    assert chosen[0] == chosen[1]
    pipe.scheduler = DLGScheduler.from_pipe(pipe, num_samples=2000, restart_sigma=3.0, warmup_steps=3)
    pipe(batch_size=4, num_inference_steps=10, output_type="np")  # S given: no pilot, the chains from the run size
    given = pipe.scheduler.samplers[4]
    assert given.restart_sigma == 3.0 and given.tuning["pilot"] is None and given.num_chains == 100
    with pytest.raises(ValueError, match="num_samples"):
        DLGScheduler.from_pipe(pipe, num_samples=0)


def test_dlg_pipeline_told_the_run_size_takes_the_budget_route(tiny_sd_pipe):
    dlg = DLGPipeline.from_pipe(tiny_sd_pipe, num_samples=2000, warmup_steps=2)
    calls = count_calls(tiny_sd_pipe.unet)
    dlg("a photo of a cat", guidance_scale=3.0, num_inference_steps=6, num_images_per_prompt=2, output_type="pt")
    (sampler,) = dlg.samplers.values()
    assert sampler.num_chains == 100 and sampler.tuning["pilot"]["chains"] >= 8
    stats = dlg.stats
    assert stats["nfe_split"]["pilot"] > 0 and sum(calls) // 2 == stats["model_evaluations"]
    assert DLGPipeline.from_pipe(tiny_sd_pipe).settings["num_chains"] is None  # 16 per condition, as before
    with pytest.raises(ValueError, match="num_samples"):
        DLGPipeline.from_pipe(tiny_sd_pipe, num_samples=-5)
