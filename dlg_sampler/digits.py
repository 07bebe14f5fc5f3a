"""The shipped digits preset: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import torch

#: Fraction of the 1797 digits held out for evaluation (never seen by any shipped model).
HELD_OUT_FRACTION = 0.2
#: Seed of the fixed train / held-out split.
SPLIT_SEED = 0


def load_digits_data(split: str = "train", return_labels: bool = False):
    """The digits as images in ``[-1, 1]``: ``[N, 1, 8, 8]`` float32 (and labels ``[N]`` long).

    Args:
        split: ``"train"`` (80%), ``"test"`` (the fixed 20% held out) or ``"all"``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(HELD_OUT_FRACTION * len(x)))
    idx = {"train": perm[n_test:], "test": perm[:n_test], "all": torch.arange(len(x))}[split]
    return (x[idx], y[idx]) if return_labels else x[idx]
