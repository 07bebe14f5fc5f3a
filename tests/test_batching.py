"""Micro-batched model evaluation (``max_batch_size`` / ``--batch-size``) and half precision (``--dtype``): no model
call sees more than B samples, the samples do not depend on B, and a half-precision model leaves the chains float32."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from dlg_sampler import DLGSampler, GaussianMixture, NoiseLevels, cli
from dlg_sampler.adapters import DiffusersVPScore
from dlg_sampler.cli.sample import sample_main
from dlg_sampler.models import LoadedModel
from dlg_sampler.pipelines import DLGPipeline, DLGScheduler
from dlg_sampler.sampler import MicroBatched, micro_batched
from dlg_sampler.testing import MixtureUNet, error_of

MIXTURE = GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)
LEVELS = NoiseLevels(0.01, 80.0, 1000)


def recording(fn, sizes: list):
    """``fn`` that appends the batch of every call to ``sizes``."""
    def call(x, *args, **kwargs):
        sizes.append(len(x))
        return fn(x, *args, **kwargs)
    return call


def one_at_a_time(score):
    """A score evaluated sample by sample inside: its outputs do not depend on the batch to the last bit (the
    mixture's own score does not above 25 samples, where ``torch.cdist`` switches to a matrix-product path)."""
    def call(x, sigma):
        return torch.cat([score(xi[None], si[None]) for xi, si in zip(x, sigma)])
    return call


@contextmanager
def unet_calls(cls=UNet2DModel):
    """``(batch, dtype)`` of every forward call of any ``cls`` module while the block runs."""
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append((len(args[0]), args[0].dtype)) if isinstance(module, cls) else None)
    try:
        yield seen
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# the wrapper

def test_micro_batched_slices_per_sample_arguments_in_order():
    sizes = []
    x, sigma = torch.randn(23, 8), torch.rand(23) + 0.1
    wrapped = micro_batched(recording(MIXTURE.score, sizes), 5)
    assert torch.equal(wrapped(x, sigma), MIXTURE.score(x, sigma))
    assert sizes == [5, 5, 5, 5, 3]
    sizes.clear()
    assert torch.equal(wrapped(x, torch.tensor(0.7)), MIXTURE.score(x, torch.full((23,), 0.7)))  # scalar: whole
    assert sizes == [5, 5, 5, 5, 3]
    score = MIXTURE.score
    assert micro_batched(score, None) is score


def test_micro_batched_keeps_the_models_attributes_and_counts_a_guided_batch_twice():
    guided = DiffusersVPScore(MixtureUNet(GaussianMixture.random(3, 16, shape=(1, 4, 4))), DDPMScheduler(),
                              guidance_scale=3.0, cond_kwargs={"encoder_hidden_states": torch.ones(1, 2, 4)},
                              uncond_kwargs={"encoder_hidden_states": torch.zeros(1, 2, 4)})
    wrapped = MicroBatched(guided, 7)
    assert wrapped.sigma_max == guided.sigma_max and wrapped.slice == 3
    x = torch.randn(10, 1, 4, 4)
    with unet_calls(MixtureUNet) as seen:
        wrapped(x, torch.full((10,), 2.0))
    assert [b for b, _ in seen] == [6, 6, 6, 2]  # 3 samples per call, conditional and unconditional
    with pytest.raises(ValueError, match="max_batch_size=1 cannot hold one evaluation.*max_batch_size >= 2"):
        DLGSampler(guided, None, NoiseLevels(guided.sigma_min, guided.sigma_max), shape=(1, 4, 4), max_batch_size=1)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "16"])
def test_a_max_batch_size_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        DLGSampler(MIXTURE.score, None, LEVELS, shape=(8,), max_batch_size=bad)


# ---------------------------------------------------------------------------------------------------------------
# the sampler: bit-identical for any B

@pytest.mark.parametrize("kernel", [
    {},
    # karras_heun: unipc / dpmpp_2m return NaN for a chain selected at the Tweedie level itself (a zero-length step)
    {"kernel": "gibbs", "gibbs_steps": 2, "step_size": 0.05, "warmup_sweeps": (2, 2), "integrator": "karras_heun"},
])
def test_samples_are_bit_identical_for_any_max_batch_size(kernel):
    """The mixture's exact score and posterior (24 chains: one code path of torch.cdist) compute each sample on its
    own, so any difference would come from the sampler: its random draws must not depend on B."""
    runs = {}
    for B in (None, 1, 7, 16):
        sizes = []
        posterior = recording(MIXTURE.noise_posterior(LEVELS), sizes) if kernel else None
        sampler = DLGSampler(recording(MIXTURE.score, sizes), posterior, LEVELS, shape=(8,), num_chains=24,
                             denoise_steps=3, seed=0, max_batch_size=B, **kernel)
        runs[B] = sampler.sample(60), sampler.stats["model_evaluations"], sampler.x.clone()
        assert max(sizes) == (B or 24)
    for B in (1, 7, 16):
        assert torch.equal(runs[B][0], runs[None][0]) and torch.equal(runs[B][2], runs[None][2])
        assert runs[B][1] == runs[None][1]


def test_for_budget_passes_max_batch_size_to_its_pilot():
    runs = {}
    for B in (None, 8):
        sizes = []
        sampler = DLGSampler.for_budget(recording(one_at_a_time(MIXTURE.score), sizes), None, shape=(8,), nfe=10,
                                        n=2000, seed=0, levels=LEVELS, max_batch_size=B, integrator="unipc")
        pilot_sizes = list(sizes)
        runs[B] = sampler.sample(200), sampler.tuning
        assert sampler.tuning["pilot"]["chains"] > 8 and max(pilot_sizes) == (B or 100)
        assert max(sizes) == (B or 100) and sampler.max_batch_size == B
    assert torch.equal(runs[8][0], runs[None][0]) and runs[8][1] == runs[None][1]


# ---------------------------------------------------------------------------------------------------------------
# diffusers routes

def tiny_unet(channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_drop_in_scheduler_hands_the_model_at_most_max_batch_size():
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DLGScheduler.from_pipe(pipe, num_chains=10, max_batch_size=4)
    with unet_calls() as seen:
        pipe(batch_size=4, num_inference_steps=5, output_type="np")
    assert max(b for b, _ in seen) == 4 and pipe.scheduler.samplers[4].num_chains == 10
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        DLGScheduler.from_pipe(pipe, max_batch_size=0)


def test_dlg_pipeline_counts_guidance_within_max_batch_size_and_decodes_in_slices(tiny_sd_pipe):
    from diffusers import UNet2DConditionModel

    vae, decoded = tiny_sd_pipe.vae, []
    vae.decode = recording(vae.decode, decoded)
    dlg = DLGPipeline.from_pipe(tiny_sd_pipe, num_chains=5, max_batch_size=4)
    with unet_calls(UNet2DConditionModel) as unet:
        images = dlg("a photo of a cat", guidance_scale=7.5, num_inference_steps=4, num_images_per_prompt=5,
                     output_type="np").images
    assert images.shape == (5, 16, 16, 3)
    assert {b for b, _ in unet} == {4, 2}  # 2 chains per doubled call, then the last one
    assert decoded == [4, 1]


# ---------------------------------------------------------------------------------------------------------------
# half precision through the API

def test_a_bfloat16_model_keeps_the_chains_float32():
    unet32, unet16 = tiny_unet(), tiny_unet().to(torch.bfloat16)
    runs = {}
    for name, unet in (("float32", unet32), ("bfloat16", unet16)):
        score = DiffusersVPScore(unet, DDPMScheduler(beta_schedule="linear"))
        sampler = DLGSampler(score, None, NoiseLevels(score.sigma_min, score.sigma_max), shape=(1, 8, 8),
                             num_chains=8, denoise_steps=4, seed=0, max_batch_size=3)
        with unet_calls() as seen:
            runs[name] = sampler.sample(16)
        assert {d for _, d in seen} == {getattr(torch, name)} and max(b for b, _ in seen) == 3
        assert sampler.x.dtype == runs[name].dtype == torch.float32
    low, ref = runs["bfloat16"], runs["float32"]
    assert (low.to(torch.bfloat16).float() != low).float().mean() > 0.9  # float32 states, not bfloat16 ones
    assert (low - ref).abs().mean() < 0.05 * ref.abs().mean()


class LabelEmbeddingNet(torch.nn.Module):
    """A score_sde-style network: its float labels go through a Linear embedding, as NCSN++ / DDPM++'s do."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv = torch.nn.Linear(1, 2), torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, labels):
        return self.conv(x) + self.embed(labels[:, None])[..., None, None]


@pytest.mark.parametrize("sde", ["vp", "ve"])
def test_a_half_precision_score_sde_network_gets_its_labels_in_its_dtype(sde):
    from dlg_sampler.adapters import ScoreSdeScore

    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor([0.05, 1.0, 20.0])
    torch.manual_seed(0)
    net = LabelEmbeddingNet()
    reference = ScoreSdeScore(net, sde=sde)(x, sigma)
    low = ScoreSdeScore(net.to(torch.bfloat16), sde=sde)(x, sigma)
    assert low.dtype == torch.float32 and torch.allclose(low, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# the command line

def test_cli_never_calls_the_model_with_more_than_batch_size(tiny_model, tmp_path):
    """The issue's check: DLG, its pilot-free budget, and the vanilla and diffusers peers of --compare."""
    runs = {}
    for B, compare in ((16, "--compare"), (7, "--no-compare")):
        with unet_calls() as seen:
            sample_main(["--model", str(tiny_model / "pipe"), "--n", "120", "--chains", "40", "--batch-size", str(B),
                         "--nfe", "6", compare, "--out", str(tmp_path / f"b{B}.png")])
        assert max(b for b, _ in seen) == B
        runs[B] = load_file(tmp_path / f"b{B}.safetensors")["samples"]
    # A network on a CPU rounds differently for different batch splits: measured up to 4e-4 here (samples of
    # scale 3; the exact model below is bit-identical).
    torch.testing.assert_close(runs[7], runs[16], rtol=1e-3, atol=1e-3)


class ExactModel:
    """A 1x4x4 mixture's exact score with a trained range, evaluated one sample at a time (batch-independent)."""

    sigma_min, sigma_max = 0.01, 20.0

    def __init__(self):
        self.mixture = GaussianMixture.random(num_modes=3, dim=16, spread=0.5, std=0.2, seed=1, shape=(1, 4, 4))
        self.sizes = []

    def __call__(self, x, sigma):
        self.sizes.append(len(x))
        return one_at_a_time(self.mixture.score)(x, sigma)


def test_cli_same_seed_gives_bit_identical_samples_for_any_batch_size(tmp_path, monkeypatch):
    model = ExactModel()
    monkeypatch.setattr(cli.common, "load_model", lambda *a, **k: LoadedModel(model, (1, 4, 4), 0.01, 20.0,
                                                                              lambda x: x))
    runs = {}
    for B in (1000, 16, 5):
        model.sizes.clear()
        sample_main(["--model", "exact", "--n", "120", "--chains", "40", "--batch-size", str(B), "--no-compare",
                     "--out", str(tmp_path / f"b{B}.png")])
        assert max(model.sizes) == min(B, 40)
        runs[B] = load_file(tmp_path / f"b{B}.safetensors")["samples"]
    assert torch.equal(runs[16], runs[1000]) and torch.equal(runs[5], runs[1000])


def test_cli_bfloat16_evaluates_the_model_in_bfloat16_and_keeps_float32_samples(tiny_model, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        with unet_calls() as seen:
            sample_main(["--model", str(tiny_model / "pipe"), "--n", "32", "--chains", "8", "--dtype", dtype,
                         "--no-compare", "--out", str(tmp_path / f"{dtype}.png")])
        assert {d for _, d in seen} == {getattr(torch, dtype)}
        runs[dtype] = load_file(tmp_path / f"{dtype}.safetensors")["samples"]
    low, ref = runs["bfloat16"], runs["float32"]
    assert low.dtype == torch.float32 and (low.to(torch.bfloat16).float() != low).float().mean() > 0.9
    assert (low - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_a_resume_in_another_precision_is_refused(tiny_model, tmp_path, capsys):
    argv = ["--model", str(tiny_model / "pipe"), "--n", "8", "--chains", "4", "--shard-size", "4",
            "--out-dir", str(tmp_path / "run")]
    sample_main([*argv, "--dtype", "bfloat16"])
    assert "dtype: 'bfloat16' -> None" in error_of(sample_main, argv, capsys)
    sample_main([*argv, "--dtype", "bfloat16", "--batch-size", "3"])  # the batch size is no part of the samples
    assert "already written" in capsys.readouterr().out


@pytest.fixture
def no_loading(monkeypatch):
    def not_before_checks(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(cli.common, "load_model", not_before_checks)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1 (samples per model call), got 0: pass e.g. "
                            "--batch-size 256, less if the model runs out of memory"),
    (["--batch-size", "-8"], "--batch-size must be at least 1 (samples per model call), got -8"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8' (choose from"),
])
def test_bad_batching_flags_are_refused_before_loading(argv, message, capsys, no_loading, tmp_path):
    err = error_of(sample_main, [*argv, "--out", str(tmp_path / "x.png")], capsys)
    assert message in err and len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err


def test_float16_on_a_cpu_without_its_kernels_is_refused_with_the_fix(monkeypatch, capsys, no_loading, tmp_path):
    group_norm = torch.nn.functional.group_norm

    def no_half(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError('"GroupNorm" not implemented for \'Half\'')
        return group_norm(x, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "group_norm", no_half)
    err = error_of(sample_main, ["--dtype", "float16", "--device", "cpu", "--out", str(tmp_path / "x.png")], capsys)
    assert (f"--dtype float16: torch {torch.__version__} cannot compute in float16 on cpu (\"GroupNorm\" not "
            "implemented for 'Half'); use --dtype float32 or bfloat16 there, or a GPU (--device cuda)") in err


# ---------------------------------------------------------------------------------------------------------------
# a real-size model

@pytest.fixture(scope="module")
def cifar10_sized(tmp_path_factory):
    """google/ddpm-cifar10-32's configuration (its config.json, where it differs from diffusers' defaults:
    downsample_padding 0, flip_sin_to_cos False, freq_shift 1, norm_eps 1e-6, attention_head_dim None), random
    weights, linear betas over 1000 steps: 35.7M parameters, no download."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                             "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                       attention_head_dim=None)
    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    folder = tmp_path_factory.mktemp("cifar10-sized") / "pipe"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def test_a_cifar10_sized_unet_through_the_cli_never_sees_more_than_batch_size(cifar10_sized, tmp_path):
    with unet_calls() as seen:
        sample_main(["--model", str(cifar10_sized), "--n", "4", "--chains", "2", "--batch-size", "1",
                     "--denoise-steps", "1", "--no-compare", "--device", "cpu", "--out", str(tmp_path / "c.png")])
    # 2 chains: the warm-up (their first outputs), then one restart output each: denoising and Tweedie
    assert {b for b, _ in seen} == {1} and len(seen) == 2 * (10 + 2)
    samples = load_file(tmp_path / "c.safetensors")["samples"]
    assert samples.shape == (4, 3, 32, 32) and torch.isfinite(samples).all()
