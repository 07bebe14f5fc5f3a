"""Shared fixtures: a tiny random diffusers pipeline folder and a noise classifier folder for it, and a tiny
Stable-Diffusion-style text-to-image pipeline."""

import json
import os

# Tests run small batches (a few chains of 8 x 8), where a second intra-op thread costs more than it gives, most of
# all on a shared machine (docs/usage.md, *Devices and threads*): one thread, here and in the scripts the tests start,
# unless OMP_NUM_THREADS says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (AutoencoderKL, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel, UNet2DModel)

from dlg_sampler import NoiseClassifier  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``root/pipe``: a tiny random 1x8x8 DDPM pipeline (linear betas); ``root/clf``: a classifier on its range."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    scheduler = DDPMScheduler(beta_schedule="linear")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "pipe")
    ac = scheduler.alphas_cumprod.double()
    sig = ((1 - ac) / ac).sqrt()
    NoiseClassifier(float(sig[0]), float(sig[-1]), 100, channels=(8,), hidden=16).save_pretrained(root / "clf")
    return root


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A Stable-Diffusion-style pipeline folder from configs only: tiny CLIP text model and tokenizer, a
    cross-attention UNet on 4 x 8 x 8 latents, a VAE to 3 x 16 x 16 images, scaled-linear betas."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    words = ["a", "photo", "of", "cat", "dog"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{w}</w>": i + 2 for i, w in enumerate(words)}}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture
def tiny_sd_pipe(tiny_sd):
    """The tiny Stable-Diffusion-style pipeline, loaded afresh (tests may replace its components)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe
