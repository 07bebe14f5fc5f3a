"""A noise classifier from the model alone: the sample pool is as good as real data on an exact mixture, resumes
after a stop or a SIGKILL to exactly the uninterrupted pool, refuses changed settings, and lives in latent space for
latent models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from dlg_sampler import GaussianMixture, NoiseClassifier, NoiseLevels
from dlg_sampler.adapters import DiffusersVPScore, decode_latents
from dlg_sampler.classifier import evaluate_noise_classifier, train_noise_classifier
from dlg_sampler.models import LoadedModel, load_model
from dlg_sampler.pool import build_sample_pool, encode_to_model_space, load_real_samples
from dlg_sampler.shards import ShardWriter, read_samples

LEVELS = NoiseLevels(0.01, 80.0, 100)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)


class CountingScore:
    """The mixture's exact score, counting evaluated samples (calls x batch)."""

    def __init__(self, mixture):
        self.mixture, self.samples = mixture, 0

    def __call__(self, x, sigma):
        self.samples += x.shape[0]
        return self.mixture.score(x, sigma)


def mixture_model(mixture, score=None) -> LoadedModel:
    return LoadedModel(score or mixture.score, (mixture.dim,), LEVELS.sigma_min, LEVELS.sigma_max, lambda x: x)


def test_classifier_from_the_models_own_pool_matches_one_from_true_samples(mixture, tmp_path):
    """Same MLP, same training, 20000 clean samples each, scored on held-out true samples. Measured cross-entropy
    (nats; exact posterior 3.146, uniform 4.605): true samples 3.196, pool of Karras Heun at 39 NFE 3.197 (gap
    0.001); broken pools: 5 NFE (mode weights 0.12/0.20/0.11/0.56 for 0.1/0.2/0.3/0.4) 3.573, 1 NFE (every
    sample at the mixture's mean) 11.27."""
    held_out = mixture.sample(4000, generator=torch.Generator().manual_seed(1))

    def cross_entropy(data):
        clf = NoiseClassifier(LEVELS.sigma_min, LEVELS.sigma_max, len(LEVELS), sample_shape=[8], arch="mlp")
        train_noise_classifier(clf, data, steps=1000, batch_size=256, lr=3e-3, progress=False)
        return evaluate_noise_classifier(clf, held_out, LEVELS, 4000, torch.Generator().manual_seed(5))["ce"]

    def pool(nfe):
        return build_sample_pool(mixture_model(mixture), tmp_path / f"nfe{nfe}", 20000, nfe=nfe, batch_size=2048,
                                 shard_size=4096, progress=False)

    true_ce = cross_entropy(mixture.sample(20000, generator=torch.Generator().manual_seed(0)))
    pool_ce = cross_entropy(pool(40))
    assert pool_ce < true_ce + 0.05, (pool_ce, true_ce)
    for bad_nfe in (5, 1):  # a pool from a poor sampler fails the same margin clearly
        assert cross_entropy(pool(bad_nfe)) > true_ce + 0.3


def test_stopped_pool_resumes_to_the_uninterrupted_pool_without_redrawing(mixture, tmp_path, monkeypatch, capsys):
    kw = dict(integrator="karras_stochastic", nfe=7, batch_size=4, shard_size=8, seed=3)
    reference = build_sample_pool(mixture_model(mixture), tmp_path / "ref", 50, **kw)
    out = capsys.readouterr().out
    assert "50 samples x 7 NFE (karras_stochastic, 4 steps) = 350 NFE" in out and "samples/s on the first batch" in out

    write, written = ShardWriter.write, []

    def stop_at_third_shard(self, samples, state):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is drawn
        written.append(len(samples))
        return write(self, samples, state)

    monkeypatch.setattr(ShardWriter, "write", stop_at_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_sample_pool(mixture_model(mixture), tmp_path / "run", 50, **kw)
    monkeypatch.undo()
    assert len(read_samples(tmp_path / "run")) == 16

    score = CountingScore(mixture)
    resumed = build_sample_pool(mixture_model(mixture, score), tmp_path / "run", 50, **kw)
    assert "34 samples (238 NFE) to draw" in capsys.readouterr().out
    assert score.samples == (50 - 16) * 7  # only the missing shards are drawn
    assert torch.equal(resumed, reference) and len(torch.unique(resumed, dim=0)) == 50
    again = build_sample_pool(mixture_model(mixture, score), tmp_path / "run", 50, **kw)
    assert torch.equal(again, reference) and score.samples == (50 - 16) * 7  # a complete pool is only read


def test_changed_settings_are_refused_and_real_samples_are_appended(mixture, tmp_path):
    model, kw = mixture_model(mixture), dict(nfe=5, batch_size=8, shard_size=8, progress=False)
    pool = build_sample_pool(model, tmp_path, 16, **kw)
    for change, message in (({"nfe": 9}, "steps: 3 -> 5"), ({"seed": 1}, "seed: 0 -> 1"),
                            ({"integrator": "euler_maruyama"}, "integrator: 'karras_heun' -> 'euler_maruyama'")):
        with pytest.raises(ValueError, match=message):
            build_sample_pool(model, tmp_path, 16, **{**kw, **change})
    with pytest.raises(ValueError, match="model: None -> 'other'"):
        build_sample_pool(model, tmp_path, 16, **kw, model_id="other")
    assert torch.equal(read_samples(tmp_path), pool)  # nothing the user had is lost
    real = mixture.sample(5)
    mixed = build_sample_pool(model, tmp_path, 16, **kw, extra=real)
    assert torch.equal(mixed, torch.cat([pool, real]))
    with pytest.raises(ValueError, match=r"extra samples have shape \[4\]"):
        build_sample_pool(model, tmp_path, 16, **kw, extra=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="ode_rk45 is adaptive"):
        build_sample_pool(model, tmp_path / "rk", 16, integrator="ode_rk45")
    redone = build_sample_pool(model, tmp_path, 16, **{**kw, "seed": 1}, overwrite=True)
    assert redone.shape == pool.shape and not torch.equal(redone, pool)


# ---------------------------------------------------------------------------------------------------------------
# diffusers models: a scheduler as the pool's sampler, the CLI under SIGKILL, a latent model with a tiny VAE

POOL, SHARD = 96, 8


@pytest.fixture
def tiny_pipe(tiny_model):
    """The shared tiny random DDPM pipeline folder (1 x 8 x 8)."""
    return tiny_model / "pipe"


def test_diffusers_scheduler_draws_the_pool(tiny_pipe, tmp_path):
    model = load_model(str(tiny_pipe))
    pool = build_sample_pool(model, tmp_path, 6, integrator="DDIMScheduler", nfe=4, progress=False)
    assert pool.shape == (6, 1, 8, 8) and torch.isfinite(pool).all()
    config = json.loads((tmp_path / "manifest.json").read_text())["config"]
    scheduler = config["integrator"]["DDIMScheduler"]  # the pipeline's config, with its schedule from the top
    assert scheduler["beta_schedule"] == "linear" and scheduler["timestep_spacing"] == "trailing"


def command(pipe: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "dlg-train-classifier"), "--from-model", str(pipe), "--out", str(out),
            "--pool-size", str(POOL), "--pool-shard-size", str(SHARD), "--pool-batch-size", "4", "--pool-nfe", "9",
            "--steps", "5", "--batch-size", "16", "--num-levels", "50", "--channels", "8", "--hidden", "16",
            "--seed", "2"]


def listed(pool_dir: Path) -> int:
    try:
        return len(json.loads((pool_dir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_cli_pool_survives_sigkill_and_trains_the_same_classifier(tiny_pipe, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(command(tiny_pipe, tmp_path / "ref"), capture_output=True, text=True, env=env,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr
    assert f"{POOL} samples x 9 NFE (karras_heun, 5 steps)" in reference.stdout and "saved to" in reference.stdout
    expected = read_samples(tmp_path / "ref" / "pool")
    assert expected.shape == (POOL, 1, 8, 8) and len(torch.unique(expected.flatten(1), dim=0)) == POOL

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(tiny_pipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while listed(out / "pool") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed_before = listed(out / "pool")
    assert 2 <= listed_before < POOL // SHARD, "the pool finished before it could be killed; make it longer"
    resumed = subprocess.run(command(tiny_pipe, out), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{POOL - SHARD * listed_before} samples (" in resumed.stdout  # only the missing shards are drawn
    assert torch.equal(read_samples(out / "pool"), expected)
    weights = [load_file(str(d / "model.safetensors")) for d in (tmp_path / "ref", out)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # then trained exactly as before

    changed = subprocess.run([*command(tiny_pipe, out), "--pool-nfe", "20"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert changed.returncode != 0 and "steps: 5 -> 10" in changed.stderr and "--overwrite-pool" in changed.stderr


def test_latent_pool_and_classifier_live_in_latent_space(tmp_path):
    """A latent model (4 x 4 x 4 latents, a tiny AutoencoderKL to 3 x 8 x 8 images): the pool holds latents, real
    images mixed in are VAE-encoded into the same scaled space (decode_latents inverts it), and the classifier
    trains on latents."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8, scaling_factor=0.5, shift_factor=0.1).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    score = DiffusersVPScore(unet, scheduler)
    pipe = type("LatentPipeline", (), {"vae": vae, "scheduler": scheduler})()
    model = LoadedModel(score, (4, 4, 4), float(score.sigma_min), float(score.sigma_max),
                        lambda z: decode_latents(vae, z), pipe)
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    for i, img in enumerate(images):
        arr = ((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp_path / f"{i}.png")
    real = load_real_samples(str(tmp_path), model)
    assert real.shape == (5, 4, 4, 4)
    with torch.no_grad():
        own = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        assert torch.allclose(decode_latents(vae, encode_to_model_space(model, images)), own, atol=1e-5)

    pool = build_sample_pool(model, tmp_path / "pool", 12, nfe=3, batch_size=4, progress=False, extra=real)
    assert pool.shape == (17, 4, 4, 4) and torch.isfinite(pool).all() and torch.equal(pool[12:], real)
    assert model.decode(pool[:2]).shape == (2, 3, 8, 8)
    clf = NoiseClassifier(model.sigma_min, model.sigma_max, 50, sample_shape=list(model.shape), channels=(8,),
                          hidden=16)
    metrics = train_noise_classifier(clf, pool, steps=5, batch_size=8, progress=False)
    assert np.isfinite(metrics["train_loss"]) and clf(pool[:3]).shape == (3, 50)


# ---------------------------------------------------------------------------------------------------------------
# text-to-image models (the tiny Stable-Diffusion-style pipeline): prompts in turn with guidance, latents, and the
# whole route from the model alone to DLGPipeline images

def test_text_to_image_pool_draws_each_prompt_in_turn_with_guidance(tiny_sd, tmp_path):
    from dlg_sampler.models import DEFAULT_PROMPTS

    default = load_model(str(tiny_sd))
    assert default.prompts == DEFAULT_PROMPTS and default.guidance_scale == 7.5  # as pipe(...) samples by default
    prompts = ["a", "a a", "a a a"]  # distinct embeddings under the tiny tokenizer's five-word vocabulary
    model = load_model(str(tiny_sd), prompts=prompts, guidance_scale=3.0)
    embeddings = [s.cond_kwargs["encoder_hidden_states"][0] for s in model.prompt_scores]
    empty = model.prompt_scores[0].uncond_kwargs["encoder_hidden_states"][0]
    seen = []

    def record(module, args, kwargs):
        states = kwargs["encoder_hidden_states"]
        uncond, cond = states.chunk(2)  # classifier-free guidance: one doubled batch, unconditional half first
        assert all(torch.equal(u, empty) for u in uncond)
        seen.extend(next(i for i, e in enumerate(embeddings) if torch.equal(c, e)) for c in cond)

    model.pipeline.unet.register_forward_pre_hook(record, with_kwargs=True)
    pool = build_sample_pool(model, tmp_path, 8, nfe=3, batch_size=4, shard_size=4, progress=False)
    assert pool.shape == (8, 4, 8, 8) and torch.isfinite(pool).all()
    # samples 0..7 take prompts 0, 1, 2, 0, 1, 2, 0, 1; each is evaluated 3 times (3 NFE)
    assert [seen.count(i) for i in range(3)] == [3 * 3, 3 * 3, 2 * 3]
    config = json.loads((tmp_path / "manifest.json").read_text())["config"]
    assert config["prompts"] == prompts and config["guidance_scale"] == 3.0
    with pytest.raises(ValueError, match=r"prompts: \[.*\] -> \['a'\]"):  # another prompt set is another pool
        build_sample_pool(load_model(str(tiny_sd), prompts=["a"], guidance_scale=3.0), tmp_path, 8, nfe=3,
                          batch_size=4, shard_size=4, progress=False)


def test_text_to_image_classifier_from_the_model_alone_then_dlg_pipeline_images(tiny_sd, tmp_path, monkeypatch,
                                                                                  capsys):
    """The documented route for text-to-image (no classifier is published): dlg-train-classifier --from-model ->
    DLGPipeline.from_pipe(pipe, classifier=FOLDER) -> images."""
    from diffusers import StableDiffusionPipeline

    from dlg_sampler.cli import train_classifier_main
    from dlg_sampler.pipelines import DLGPipeline

    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a photo of a cat\n\n  a photo of a dog  \n")
    train_classifier_main(["--from-model", str(tiny_sd), "--prompts", "prompts.txt", "--guidance-scale", "3",
                           "--pool-size", "8", "--pool-batch-size", "4", "--pool-shard-size", "4", "--pool-nfe", "5",
                           "--steps", "5", "--batch-size", "8", "--num-levels", "50", "--channels", "8",
                           "--hidden", "16", "--out", "clf"])
    out = capsys.readouterr().out
    assert "with 2 prompts in turn, guidance scale 3 (2 network passes per NFE)" in out and "saved to clf" in out
    assert NoiseClassifier.from_pretrained("clf").sample_shape == (4, 8, 8)  # the classifier works on latents

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    dlg = DLGPipeline.from_pipe(pipe, classifier="clf", num_chains=2, warmup_steps=2)
    images = dlg("a photo of a cat", guidance_scale=3.0, num_inference_steps=6, num_images_per_prompt=2).images
    assert len(images) == 2 and images[0].size == (16, 16)


def test_text_to_image_classifier_from_real_images_is_trained_on_latents(tiny_sd, tmp_path, monkeypatch, capsys):
    from dlg_sampler.cli import train_classifier_main

    monkeypatch.chdir(tmp_path)
    Path("images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(f"images/{i}.png")
    train_classifier_main(["--model", str(tiny_sd), "--data", "images", "--steps", "2", "--batch-size", "4",
                           "--num-levels", "50", "--channels", "8", "--hidden", "16", "--out", "clf"])
    assert "on 3 images of shape [4, 8, 8]" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--from-model", "PIPE", "--prompts", "prompts.txt"], "takes no text prompt: drop --prompts and --guidance-scale"),
    (["--from-model", "SD", "--prompts", "missing.txt"], "--prompts missing.txt: cannot read it"),
    (["--from-model", "SD", "--prompts", "empty.txt"], "--prompts empty.txt holds no prompt"),
    (["--from-model", "SD", "--guidance-scale", "0"], "--guidance-scale must be positive"),
    (["--data", "digits", "--prompts", "prompts.txt"], "add --from-model MODEL, or drop them"),
])
def test_text_to_image_mistakes_are_clear(args, message, tiny_sd, tiny_pipe, tmp_path, monkeypatch, capsys):
    from dlg_sampler.cli import train_classifier_main

    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a photo of a cat\n")
    Path("empty.txt").write_text("\n  \n")
    args = [{"SD": str(tiny_sd), "PIPE": str(tiny_pipe)}.get(a, a) for a in args]
    with pytest.raises(SystemExit) as exc:
        train_classifier_main([*args, "--out", "clf"])
    assert message in capsys.readouterr().err + str(exc.value.code)


def test_dlg_sample_points_text_to_image_models_to_dlg_pipeline(tiny_sd, tmp_path, monkeypatch, capsys):
    from dlg_sampler.cli import sample_main

    monkeypatch.chdir(tmp_path)
    NoiseClassifier(0.03, 14.0, 50, sample_shape=(4, 8, 8), channels=(8,)).save_pretrained("clf")
    with pytest.raises(SystemExit) as exc:
        sample_main(["--model", str(tiny_sd), "--classifier", "clf"])
    assert "is a text-to-image pipeline" in str(exc.value.code) and "DLGPipeline.from_pipe" in str(exc.value.code)
