"""Train the photo-digits diffusion model: a small diffusers UNet2DModel on colour 3x16x16 images, a standard DDPM.

    python examples/train_photo_digits_model.py --steps 12000 --out photo-digits-model \\
        --checkpoint-dir ~/.cache/dlg-sampler/photo-digits-train

Resumable: every ``--checkpoint-every`` steps the weights, their EMA, the optimiser and learning-rate schedule, the
step and the random state go to ``--checkpoint-dir/checkpoint.pt``; the same command run again continues from there
(with the same ``--steps``, ``--batch-size``, ``--lr``, ``--seed``, which the checkpoint records and checks). The
finished model goes to a new folder (default ``photo-digits-model/``) as a plain ``DDPMPipeline`` folder; an existing
non-empty folder is only replaced with ``--overwrite``.

Data: the training split of the photo-digits set (``dlg_sampler.photo_digits.load_photo_digits_data``), in
[-1, 1]. Schedule: ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")``, as the digits model and for
the same reason (on a cosine schedule diffusers' DPM-Solver++ and UniPC broke down from their first step).
Epsilon prediction, AdamW with a one-cycle learning rate, EMA of the weights (the EMA weights are what is saved).
Seeded and deterministic on CPU for a fixed thread count, across resumes too.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dlg_sampler.photo_digits import SHAPE, load_photo_digits_data

#: Arguments a checkpoint must match to be resumed (they shape the schedule and the random stream).
RESUME_KEYS = ("steps", "batch_size", "lr", "seed", "ema_decay")


def build_unet() -> UNet2DModel:
    """3x16x16 UNet: 32/64/64 channels at 16/8/4 pixels, self-attention at 4x4 (~1.1M parameters)."""
    return UNet2DModel(
        sample_size=SHAPE[-1], in_channels=SHAPE[0], out_channels=SHAPE[0], layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16,
    )


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-dir", default=None, help="folder of checkpoint.pt (resumed from if present)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps of this run, at a checkpoint (run again to go on)")
    parser.add_argument("--out", default="photo-digits-model", help="output folder (a new one, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} already holds files; pass another --out, or --overwrite to replace them")
    if min(args.steps, args.checkpoint_every, args.log_every, args.stop_after or 1) < 1:
        parser.error("--steps, --checkpoint-every, --log-every and --stop-after must be positive")
    if args.stop_after is not None and args.checkpoint_dir is None:
        parser.error("--stop-after needs --checkpoint-dir (where the run goes on from)")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = load_photo_digits_data("train")
    unet, scheduler = build_unet(), DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    start_step = 0
    ckpt = Path(args.checkpoint_dir) / "checkpoint.pt" if args.checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        mismatch = {k: (state["args"][k], getattr(args, k)) for k in RESUME_KEYS if state["args"][k] != getattr(args, k)}
        if mismatch:
            parser.error(f"{ckpt} was made with other settings {mismatch} (checkpoint, now); pass those, or another "
                         "--checkpoint-dir")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_step = state["step"]
        print(f"resumed from {ckpt} at step {start_step}", flush=True)
    elif ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    print(f"parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, train images: {len(data)}", flush=True)

    start = time.time()
    end = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    for step in range(start_step, end):
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
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            rate = (done - start_step) / (time.time() - start)
            print(f"step {done}/{args.steps} loss {loss.item():.4f} {rate:.3f} steps/s "
                  f"eta {(args.steps - done) / rate / 60:.0f} min", flush=True)
        if ckpt is not None and (done % args.checkpoint_every == 0 or done == end):
            save_checkpoint(ckpt, {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                   "sched": sched.state_dict(), "generator": g.get_state(),
                                   "torch_rng": torch.get_rng_state(), "step": done,
                                   "args": {k: getattr(args, k) for k in RESUME_KEYS}})
    print(f"trained to step {end} ({end - start_step} steps in {time.time() - start:.0f}s)", flush=True)
    if end < args.steps:
        print(f"stopped at step {end} of {args.steps}; the same command goes on from {ckpt}", flush=True)
        return
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
    print(f"saved the EMA pipeline to {args.out}", flush=True)


if __name__ == "__main__":
    main()
