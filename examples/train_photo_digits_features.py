"""Reproduce the shipped photo-digit feature network (the Frechet-distance features and digit reader of the
photo-digits preset).

    python examples/train_photo_digits_features.py --steps 1200 --out photo-digit-features

The result goes to a new folder (default ``photo-digit-features/``); an existing non-empty folder, such as the
shipped ``dlg_sampler/weights/photo-digits/features``, is only replaced with ``--overwrite``.

A small CNN (``dlg_sampler.photo_digits.PhotoDigitFeatureNet``) trained on the training split of the photo-digits
set with two heads on one feature layer: the digit (cross-entropy) and the image redrawn at 4x4 (squared error
against its average pool, weight ``--thumb-weight``), so that the features see colours and backgrounds as well as
the digit. On half of each batch, Gaussian pixel noise of standard deviation up to ``--max-noise``, so that slightly
imperfect samples are still read. Prints the held-out ("test" split) accuracy. Seeded and deterministic on CPU for a
fixed thread count.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from dlg_sampler.photo_digits import PhotoDigitFeatureNet, load_photo_digits_data


@torch.no_grad()
def accuracy(net: PhotoDigitFeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.cat([net(chunk).argmax(-1) for chunk in x.split(1000)]).eq(y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-noise", type=float, default=0.2)
    parser.add_argument("--thumb-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="photo-digit-features", help="output folder (a new one, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (e.g. the shipped weights)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} already holds files; pass another --out, or --overwrite to replace them")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train = load_photo_digits_data("train", return_labels=True)
    x_test, y_test = load_photo_digits_data("test", return_labels=True)
    net = PhotoDigitFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    start, bar = time.time(), trange(args.steps, desc="train", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=g)
        x = x_train[idx]
        noisy = torch.rand(args.batch_size, 1, 1, 1, generator=g) < 0.5
        noise_std = torch.rand(args.batch_size, 1, 1, 1, generator=g) * args.max_noise * noisy
        x = x + noise_std * torch.randn(x.shape, generator=g)
        feats = net.features(x)
        loss = (F.cross_entropy(net.head(feats), y_train[idx])
                + args.thumb_weight * F.mse_loss(net.thumb(feats).view(-1, 3, 4, 4), F.avg_pool2d(x_train[idx], 4)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s; accuracy: train {accuracy(net, x_train, y_train):.4f},"
          f" held-out {accuracy(net, x_test, y_test):.4f}")
    net.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
