"""Reproduce the shipped digits diffusion model: a small diffusers UNet2DModel trained as a standard DDPM.

    python examples/train_digits_model.py --steps 6000 --out digits-model

The result goes to a new folder (default ``digits-model/``); an existing non-empty folder, such as the
shipped ``dlg_sampler/weights/digits/pipeline``, is only replaced with ``--overwrite``.

Data: the training split of scikit-learn's bundled 8x8 digits (``dlg_sampler.digits.load_digits_data``), in
[-1, 1]. Schedule: ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")``: linear, not cosine,
because on a cosine schedule diffusers' DPM-Solver++ and UniPC, the peers the benchmarks compare with, broke down
from their first step (where abar is ~0). Epsilon prediction, AdamW with a one-cycle learning rate, EMA of the
weights (the EMA weights are what is saved). Seeded and deterministic on CPU for a fixed thread count.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import trange

from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.digits import load_digits_data


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """``--help``: this docstring as written, and every option's default."""


def build_unet() -> UNet2DModel:
    """1x8x8 UNet: 32/64 channels, self-attention at 4x4 (~0.9M parameters)."""
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="decay of the EMA of the weights (the EMA is saved)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--out", default="digits-model", help="output folder (a new one, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (e.g. the shipped weights)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} already holds files; pass another --out, or --overwrite to replace them")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = load_digits_data("train")
    unet, scheduler = build_unet(), DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ema = copy.deepcopy(unet).requires_grad_(False)
    print(f"parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, train images: {len(data)}")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    start, bar = time.time(), trange(args.steps, desc="train", mininterval=10)
    for step in bar:
        x0 = data[torch.randint(0, len(data), (args.batch_size,), generator=g)]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA of the weights, warmed up over the first steps
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 200 == 0 or step + 1 == args.steps:  # the bar ends on the final loss
            bar.set_postfix(loss=f"{loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s, last loss {loss.item():.4f}")
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
    print(f"saved the EMA pipeline to {args.out}")


if __name__ == "__main__":
    main()
