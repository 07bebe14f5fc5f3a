"""The shipped digits preset: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .hub import QuietHubMixin
from .metrics import class_coverage, feature_stats, frechet_distance, frechet_distance_from_stats, precision_recall

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


#: The shipped digits weights, inside the package.
DIGITS_DIR = Path(__file__).parent / "weights" / "digits"
#: The digits diffusion model: a diffusers ``DDPMPipeline`` folder (``UNet2DModel`` + linear-beta ``DDPMScheduler``).
PIPELINE_DIR = DIGITS_DIR / "pipeline"
#: The noise classifier trained for the digits model (``NoiseClassifier.from_pretrained``).
CLASSIFIER_DIR = DIGITS_DIR / "classifier"
#: The digit recogniser whose penultimate layer is the feature space of the digits Frechet distance.
FEATURES_DIR = DIGITS_DIR / "features"
#: Feature mean and covariance of the digits model's own distribution (its model reference: 10,000 samples of
#: Karras Heun at 199 NFE, ``dlg-bench reference --stats-out ...``): the FD that separates samplers of this model.
REFERENCE_STATS = DIGITS_DIR / "reference_stats.safetensors"


def load_digits_pipeline(**kwargs):
    """The shipped digits diffusion model: ``DDPMPipeline.from_pretrained(PIPELINE_DIR, **kwargs)``."""
    from diffusers import DDPMPipeline

    return DDPMPipeline.from_pretrained(PIPELINE_DIR, **kwargs)


class DigitFeatureNet(nn.Module, QuietHubMixin, tags=["digits", "feature-extractor"]):
    """Small CNN digit classifier for ``[N, 1, 8, 8]`` images in ``[-1, 1]``.

    ``features(x) -> [N, feature_dim]`` (the penultimate layer, used for the Frechet distance);
    ``forward(x) -> logits [N, num_classes]`` (its argmax reads the digit, used for class coverage).
    """

    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(8 * c, feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 1, 8, 8]`` in ``[-1, 1]`` -> penultimate features ``[N, feature_dim]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 1, 8, 8]`` -> class logits ``[N, num_classes]``."""
        return self.head(self.body(x))


def load_digit_features(path: str | Path = FEATURES_DIR, **kwargs) -> DigitFeatureNet:
    """The shipped digit feature network (``DigitFeatureNet.from_pretrained``), in eval mode."""
    return DigitFeatureNet.from_pretrained(path, **kwargs).eval()


class DigitsEvaluator:
    """Sample quality on the digits preset, against the held-out split (never seen by the shipped models).

    Args:
        net: the feature network; the shipped one if omitted.
        batch_size: images per forward pass.

    Other presets subclass it with their own :attr:`shape`, :meth:`load_data` and :attr:`reference_stats_path`.
    """

    #: One image's shape.
    shape = (1, 8, 8)
    #: Where the model reference statistics are (:meth:`model_reference_stats`).
    reference_stats_path = REFERENCE_STATS

    @staticmethod
    def load_data(split: str) -> torch.Tensor:
        """The real images of ``split`` (``"train"`` or ``"test"``), ``[N, *shape]`` in ``[-1, 1]``."""
        return load_digits_data(split)

    def __init__(self, net: DigitFeatureNet | None = None, batch_size: int = 1000):
        self.net = (net or load_digit_features()).eval()
        self.batch_size = batch_size
        self._real_feats: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _forward(self, images: torch.Tensor, fn) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images must be [N, {', '.join(map(str, self.shape))}] in [-1, 1], got shape "
                             f"{tuple(images.shape)}.")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf values; the sampler diverged for some samples.")
        device = next(self.net.parameters()).device
        chunks = [fn(chunk.to(device, torch.float32)).cpu() for chunk in images.split(self.batch_size)]
        return torch.cat(chunks)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images [N, 1, 8, 8]`` in ``[-1, 1]`` -> features ``[N, F]``."""
        return self._forward(images, self.net.features)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``images [N, 1, 8, 8]`` -> predicted digit ``[N]`` (long)."""
        return self._forward(images, self.net).argmax(-1)

    def real_features(self, split: str = "test") -> torch.Tensor:
        """Features ``[N, F]`` of a real split (cached)."""
        if split not in self._real_feats:
            self._real_feats[split] = self.features(self.load_data(split))
        return self._real_feats[split]

    def save_reference_stats(self, samples: torch.Tensor, path: str | Path, metadata: dict[str, str]) -> None:
        """Write the feature mean ``[F]`` and covariance ``[F, F]`` of ``samples [N, 1, 8, 8]`` (clamped to
        ``[-1, 1]`` as every scored sample is) to ``path`` (safetensors, with ``metadata`` saying how they were made)."""
        from .shards import save_tensors

        mu, cov = feature_stats(self.features(torch.as_tensor(samples).clamp(-1, 1)))
        save_tensors({"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov)}, path,
                     metadata={**metadata, "n": str(len(samples))})

    def model_reference_stats(self, path: str | Path | None = None) -> tuple | None:
        """The stored feature statistics of the model's own distribution (:meth:`save_reference_stats`; default
        :attr:`reference_stats_path`), if any."""
        from safetensors.torch import load_file

        path = self.reference_stats_path if path is None else path
        if not Path(path).exists():
            return None
        stats = load_file(str(path))
        return stats["mu"].numpy(), stats["cov"].numpy()

    def real_fd_floor(self) -> float:
        """FD of the held-out real digits to the training digits: the best a sampler can expect to reach."""
        return frechet_distance(self.real_features("test"), self.real_features("train"))

    def evaluate(self, samples: torch.Tensor, k: int = 3) -> dict:
        """Quality of ``samples [N, 1, 8, 8]`` in ``[-1, 1]`` against the held-out digits.

        Returns ``fd`` (against the held-out digits), ``fd_model`` (against the model's own distribution, where
        :data:`REFERENCE_STATS` is shipped), ``precision``, ``recall`` (k-NN manifolds, ``k``), the class coverage of
        the predicted digits (``coverage``, ``entropy``, ``balance``, ``class_counts``) and ``n``.
        """
        feats, real = self.features(samples), self.real_features("test")
        precision, recall = precision_recall(real, feats, k=k)
        reference = self.model_reference_stats()
        model = {} if reference is None else {"fd_model": frechet_distance_from_stats(*feature_stats(feats), *reference)}
        return {"fd": frechet_distance(feats, real), **model, "precision": precision, "recall": recall,
                **class_coverage(self.predict(samples), num_classes=self.net.head.out_features), "n": len(samples)}
