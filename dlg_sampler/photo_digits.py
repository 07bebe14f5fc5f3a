"""The photo-digits data set: colour 3x16x16 images built from scikit-learn's bundled data (no download).

Each image is one of scikit-learn's 8x8 handwritten digits, upsampled to a random size, placed at a random
position and painted in a random bright colour, composited over a random, dimmed crop of one of scikit-learn's two
bundled sample photographs (``load_sample_images``: a temple and a flower). The digit is the class: the ten
classes are drawn with equal probability (known proportions, 1/10 each).

Held-out split: the held-out images are built only from the digits' own held-out split
(:func:`dlg_sampler.digits.load_digits_data` ``"test"``) and from :data:`HELD_OUT_BLOCKS` of the
:data:`PHOTO_BLOCK`-pixel blocks of each photograph (a fixed, seeded choice, spread over the whole picture so
both splits see the same kinds of background); the training images only from the digits' training split and the
other blocks, so no held-out digit or photo pixel reaches training (every background crop lies inside one block).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .digits import DigitsEvaluator, load_digits_data
from .hub import QuietHubMixin

#: Shape of one image: 3 colour channels of 16x16 pixels, in ``[-1, 1]``.
SHAPE = (3, 16, 16)
NUM_CLASSES = 10
#: Fixed size of each split (:func:`load_photo_digits_data`).
SPLIT_SIZES = {"train": 20000, "test": 4000}
#: Seed of each split's composition (which digit, crop, colour, size and position each image gets).
SPLIT_SEEDS = {"train": 0, "test": 1}
#: The photographs are average-pooled by this factor (427x640 -> 142x213) before cropping.
PHOTO_POOL = 3
#: Each pooled photograph is cut into square blocks of this side (4 x 6 of them); a crop never crosses a block edge.
PHOTO_BLOCK = 32
#: Number of blocks of each photograph (of 24) that only held-out images use (about 20%).
HELD_OUT_BLOCKS = 5
#: Seed of the choice of held-out blocks.
BLOCK_SEED = 0
#: Side of a background crop in pooled photo pixels (resized to 16): a zoom of 0.67x to 1.33x.
CROP_SIDES = (12, 24)
#: Side of the upsampled digit on the 16x16 canvas, in pixels.
DIGIT_SIDES = (9, 15)
#: The photo background is scaled into ``[0, BACKGROUND_CONTRAST]`` (on a 0..1 scale) so the digit stays readable.
BACKGROUND_CONTRAST = 0.6


@lru_cache(maxsize=1)
def _photos() -> torch.Tensor:
    """scikit-learn's two sample photographs, average-pooled: ``[2, 3, 142, 213]`` in ``[0, 1]``."""
    from sklearn.datasets import load_sample_images

    photos = torch.from_numpy(np.stack(load_sample_images().images)).float().permute(0, 3, 1, 2) / 255.0
    return F.avg_pool2d(photos, PHOTO_POOL)


def photo_blocks(split: str) -> torch.Tensor:
    """The photo blocks a split's backgrounds come from: ``[B, 3]`` rows of (photo, top, left) in pooled pixels."""
    _, _, h, w = _photos().shape
    rows, cols = h // PHOTO_BLOCK, w // PHOTO_BLOCK
    g = torch.Generator().manual_seed(BLOCK_SEED)
    blocks = []
    for photo in range(len(_photos())):
        order = torch.randperm(rows * cols, generator=g)
        chosen = order[:HELD_OUT_BLOCKS] if split == "test" else order[HELD_OUT_BLOCKS:]
        blocks += [(photo, int(b) // cols * PHOTO_BLOCK, int(b) % cols * PHOTO_BLOCK) for b in chosen.sort().values]
    return torch.tensor(blocks)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hue, saturation, value ``[N]`` in ``[0, 1]`` -> RGB ``[N, 3]`` in ``[0, 1]``."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6.0 * h[:, None]) % 6.0
    return v[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def _place(images: torch.Tensor, side: torch.Tensor, corner: torch.Tensor, canvas: int) -> torch.Tensor:
    """Resample ``images [N, C, h, w]`` so that each fills a ``side [N]`` pixel square at ``corner [N, 2]`` (x, y,
    pixels) of a ``canvas`` x ``canvas`` output ``[N, C, canvas, canvas]`` (zero outside), bilinearly."""
    n = len(images)
    scale = canvas / side  # output canvas size in units of the image size
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    centre = corner + side[:, None] / 2  # in canvas pixels
    theta[:, :, 2] = (canvas / 2 - centre) * 2 / side[:, None]
    grid = F.affine_grid(theta, [n, images.shape[1], canvas, canvas], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _crop(photos: torch.Tensor, which: torch.Tensor, side: torch.Tensor, corner: torch.Tensor, out: int) -> torch.Tensor:
    """Square crops of ``photos [P, 3, H, W]``: photo ``which [N]``, ``side [N]`` pixels at ``corner [N, 2]`` (x, y),
    resized to ``[N, 3, out, out]``."""
    _, _, h, w = photos.shape
    theta = torch.zeros(len(which), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
    theta[:, 0, 2] = (corner[:, 0] + side / 2) * 2 / w - 1
    theta[:, 1, 2] = (corner[:, 1] + side / 2) * 2 / h - 1
    grid = F.affine_grid(theta, [len(which), 3, out, out], align_corners=False)
    return F.grid_sample(photos[which], grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_photo_digits(n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` photo-digit images ``[n, 3, 16, 16]`` in ``[-1, 1]`` and their digit labels ``[n]`` (long).

    Deterministic under ``seed``; ``split`` (``"train"`` or ``"test"``) picks which digits and which photo blocks
    the images are made of (see the module docstring).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    g = torch.Generator().manual_seed(seed)
    digits, labels = load_digits_data(split, return_labels=True)  # [M, 1, 8, 8] in [-1, 1]
    blocks = photo_blocks(split)

    # Classes with equal probability, then a digit image of that class from this split.
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
    counts = torch.tensor([len(idx) for idx in by_class])
    pick = (torch.rand(n, generator=g) * counts[y]).long()
    digit_idx = torch.stack([by_class[c][i] for c, i in zip(y.tolist(), pick.tolist())])

    # Background: a crop lying wholly inside one of this split's photo blocks, dimmed.
    photo, top, left = blocks[torch.randint(0, len(blocks), (n,), generator=g)].T
    crop_side = torch.randint(CROP_SIDES[0], CROP_SIDES[1] + 1, (n,), generator=g).float()
    # (x, y) inside the block, half a pixel clear of its edges so bilinear taps never read a neighbouring block
    offset = 0.5 + torch.rand(n, 2, generator=g) * (PHOTO_BLOCK - 1 - crop_side[:, None])
    corner = torch.stack([left, top], 1) + offset
    background = _crop(_photos(), photo, crop_side, corner, SHAPE[-1]) * BACKGROUND_CONTRAST

    # Digit: its ink (0..1) as alpha, upsampled to a random size at a random position, in a bright colour.
    size = torch.randint(DIGIT_SIDES[0], DIGIT_SIDES[1] + 1, (n,), generator=g).float()
    corner = torch.rand(n, 2, generator=g) * (SHAPE[-1] - size[:, None])
    alpha = _place((digits[digit_idx] + 1) / 2, size, corner, SHAPE[-1])  # [n, 1, 16, 16]
    colour = _hsv_to_rgb(torch.rand(n, generator=g), 0.5 + 0.5 * torch.rand(n, generator=g),
                         0.85 + 0.15 * torch.rand(n, generator=g))
    image = background * (1 - alpha) + colour[:, :, None, None] * alpha
    return (image * 2 - 1).clamp(-1, 1), y


@lru_cache(maxsize=2)
def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return make_photo_digits(SPLIT_SIZES[split], split, SPLIT_SEEDS[split])


def load_photo_digits_data(split: str = "train", return_labels: bool = False):
    """The fixed photo-digits split as images ``[N, 3, 16, 16]`` in ``[-1, 1]`` (and labels ``[N]`` long).

    Args:
        split: ``"train"`` (:data:`SPLIT_SIZES` images) or ``"test"`` (held out: never seen by the shipped models).
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    x, y = _split(split)
    return (x.clone(), y.clone()) if return_labels else x.clone()


#: The shipped photo-digits weights, inside the package.
PHOTO_DIGITS_DIR = Path(__file__).parent / "weights" / "photo-digits"
#: The photo-digits diffusion model: a diffusers ``DDPMPipeline`` folder (``UNet2DModel`` + linear-beta scheduler),
#: made by ``examples/train_photo_digits_model.py``.
PIPELINE_DIR = PHOTO_DIGITS_DIR / "pipeline"
#: The photo-digits noise classifier (for the Gibbs kernel): ``dlg-train-classifier --data photo-digits`` (6000 steps,
#: about 4 min on one CPU thread; held-out cross-entropy 3.34 nats against 6.91 for a uniform guess).
CLASSIFIER_DIR = PHOTO_DIGITS_DIR / "classifier"
#: The feature network of the photo-digits Frechet distance and digit reader (``examples/train_photo_digits_features.py``).
FEATURES_DIR = PHOTO_DIGITS_DIR / "features"
#: Feature mean and covariance of the photo-digits model's own distribution, where made (as the digits'
#: :data:`dlg_sampler.digits.REFERENCE_STATS`).
REFERENCE_STATS = PHOTO_DIGITS_DIR / "reference_stats.safetensors"


class PhotoDigitFeatureNet(nn.Module, QuietHubMixin, tags=["photo-digits", "feature-extractor"]):
    """Small CNN for ``[N, 3, 16, 16]`` photo-digit images in ``[-1, 1]``: reads the digit, and (trained with a second
    head that redraws the image at 4x4) keeps its colours and background in the features too.

    ``features(x) -> [N, feature_dim]`` (the penultimate layer, used for the Frechet distance);
    ``forward(x) -> logits [N, num_classes]``; ``thumb(features) -> [N, 48]``: the training-only second head, the
    image's 4x4 average pool ``[N, 3, 4, 4]`` flattened.
    """

    def __init__(self, channels: int = 16, feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(8 * c, feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.thumb = nn.Linear(feature_dim, 3 * 4 * 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 3, 16, 16]`` in ``[-1, 1]`` -> penultimate features ``[N, feature_dim]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 3, 16, 16]`` -> class logits ``[N, num_classes]``."""
        return self.head(self.body(x))


def load_photo_digit_features(path: str | Path = FEATURES_DIR, **kwargs) -> PhotoDigitFeatureNet:
    """The shipped photo-digit feature network (``PhotoDigitFeatureNet.from_pretrained``), in eval mode."""
    return PhotoDigitFeatureNet.from_pretrained(path, **kwargs).eval()


class PhotoDigitsEvaluator(DigitsEvaluator):
    """Sample quality on the photo-digits preset, against its held-out split (as :class:`DigitsEvaluator`)."""

    shape = SHAPE
    reference_stats_path = REFERENCE_STATS

    def __init__(self, net: PhotoDigitFeatureNet | None = None, batch_size: int = 1000):
        super().__init__(net or load_photo_digit_features(), batch_size)

    @staticmethod
    def load_data(split: str) -> torch.Tensor:
        return load_photo_digits_data(split)
