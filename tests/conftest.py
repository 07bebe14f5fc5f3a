"""Shared fixtures: a tiny random diffusers pipeline folder and a noise classifier folder for it."""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dlg_sampler import NoiseClassifier


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
