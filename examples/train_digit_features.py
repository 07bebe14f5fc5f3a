"""Reproduce the shipped digit feature network (the Frechet-distance features and digit reader of the digits preset).

    python examples/train_digit_features.py --steps 3000 --out digit-features

The result goes to a new folder (default ``digit-features/``); an existing non-empty folder, such as the
shipped ``dlg_sampler/weights/digits/features``, is only replaced with ``--overwrite``.

A small CNN (``dlg_sampler.digits.DigitFeatureNet``) trained to classify the training split of scikit-learn's
8x8 digits, with light augmentation: random translations of up to one pixel (the background is -1) and,
on half of each batch, Gaussian pixel noise of standard deviation up to ``--max-noise`` so that slightly
imperfect samples are still read. Prints the held-out ("test" split) accuracy. Seeded and deterministic on
CPU for a fixed thread count.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.digits import DigitFeatureNet, load_digits_data


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """``--help``: this docstring as written, and every option's default."""


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x [B, 1, H, W]`` by up to ``max_shift`` pixels, filling with the background -1."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # [B, H], [B, W]
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def accuracy(net: DigitFeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--max-shift", type=int, default=1, help="largest random translation, in pixels")
    parser.add_argument("--max-noise", type=float, default=0.2,
                        help="largest std of the pixel noise added to half of each batch")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--out", default="digit-features", help="output folder (a new one, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (e.g. the shipped weights)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} already holds files; pass another --out, or --overwrite to replace them")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train = load_digits_data("train", return_labels=True)
    x_test, y_test = load_digits_data("test", return_labels=True)
    net = DigitFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    start, bar = time.time(), trange(args.steps, desc="train", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=g)
        x = random_shift(x_train[idx], args.max_shift, g)
        noisy = torch.rand(args.batch_size, 1, 1, 1, generator=g) < 0.5
        noise_std = torch.rand(args.batch_size, 1, 1, 1, generator=g) * args.max_noise * noisy
        x = x + noise_std * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(net(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step + 1 == args.steps:  # the bar ends on the final loss
            bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s, last loss {loss.item():.4f}; accuracy: train "
          f"{accuracy(net, x_train, y_train):.4f}, held-out {accuracy(net, x_test, y_test):.4f}")
    net.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
