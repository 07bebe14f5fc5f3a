"""Sample-quality metrics: Frechet distance, kernel distance (KID), MMD to a known distribution, sliced Wasserstein,
k-NN precision/recall, class coverage, mode weights.

All functions take torch tensors (or anything ``torch.as_tensor`` accepts), compute in float64 on the CPU and
return Python numbers, so results do not depend on the device or dtype the samples were made in.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch


def _as_matrix(x, name: str, *, flatten: bool = False) -> torch.Tensor:
    """``x`` as a float64 CPU matrix ``[N, F]`` (``flatten``: ``[N, *shape]`` is flattened first)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if flatten and x.dim() > 2:
        x = x.flatten(1)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a matrix [N, F], got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; drop or fix those samples first.")
    return x


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and covariance ``[F, F]`` (float64) of a feature set ``[N, F]``: all the Frechet distance keeps."""
    a = _as_matrix(feats, "feats").numpy()
    if len(a) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples in each set to estimate a covariance.")
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` and ``[M, F]``.

    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` (the FID formula), in float64 with
    ``scipy.linalg.sqrtm``; for ``N(0, I)`` vs ``N(m, I)`` it is ``|m|^2``.
    """
    a, b = _as_matrix(feats_a, "feats_a"), _as_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}; use the same feature extractor.")
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """:func:`frechet_distance` from two sets' :func:`feature_stats` (e.g. a reference's, stored once)."""
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as in the reference FID code
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean.real)
    return float(max(fd, 0.0))


def kernel_distance(feats_a, feats_b) -> tuple[float, float]:
    """Kernel distance (KID, Binkowski et al. 2018) between feature sets ``[N, F]`` and ``[M, F]``, with its standard
    error: ``(mmd2, se)``. See :class:`KernelDistance`, which keeps ``feats_b``'s own kernel terms for many calls."""
    return KernelDistance(feats_b)(feats_a)


class KernelDistance:
    """Kernel distance (KID) to a fixed reference feature set ``[M, F]``: ``kd(feats) -> (mmd2, se)``.

    ``mmd2``: the unbiased estimate of the squared MMD with the cubic polynomial kernel ``k(x, y) = (x . y / F + 1)^3``
    on all pairs (diagonal terms left out); unlike the Frechet distance it has no offset from the sets' sizes, and
    its expectation is 0 for two samples of one distribution. ``se``: the first-order (Hoeffding) error of that
    U-statistic, ``sqrt(4 var(h_a) / N + 4 var(h_b) / M)``, ``h_a(x) = mean k(x, a') - mean k(x, b)`` over the
    samples, ``h_b(y) = mean k(y, b') - mean k(a, y)`` over the reference: right where the distributions differ
    (where they are equal the error is of order ``1 / N`` and ``se`` understates it). The reference's own kernel
    means are computed once; kernel rows are made ``chunk`` at a time.
    """

    def __init__(self, reference, chunk: int = 2048):
        self.ref, self.chunk = _as_matrix(reference, "reference"), chunk
        if len(self.ref) < 2:
            raise ValueError(f"the kernel distance needs at least 2 reference samples, got {len(self.ref)}.")
        self.ref_self = self._self_means(self.ref)  # [M]: mean_j!=i k(b_i, b_j)

    def _kernel(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u @ v.T / self.ref.shape[1] + 1) ** 3

    def _means(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[len(x)]``: mean over ``y`` of ``k(x_i, y_j)``."""
        return torch.cat([self._kernel(x[s:s + self.chunk], y).mean(1) for s in range(0, len(x), self.chunk)])

    def _self_means(self, x: torch.Tensor) -> torch.Tensor:
        """``[len(x)]``: mean over ``j != i`` of ``k(x_i, x_j)``."""
        diagonal = ((x * x).sum(1) / x.shape[1] + 1) ** 3
        return (self._means(x, x) * len(x) - diagonal) / (len(x) - 1)

    def __call__(self, feats) -> tuple[float, float]:
        a = _as_matrix(feats, "feats")
        if a.shape[1] != self.ref.shape[1]:
            raise ValueError(f"feature sizes differ: {a.shape[1]} vs {self.ref.shape[1]}; use the same feature "
                             "extractor.")
        if len(a) < 2:
            raise ValueError(f"the kernel distance needs at least 2 samples, got {len(a)}.")
        h_a = self._self_means(a) - self._means(a, self.ref)
        h_b = self.ref_self - self._means(self.ref, a)
        mmd2 = float(h_a.mean() + h_b.mean())  # = mean k(a, a') + mean k(b, b') - 2 mean k(a, b)
        return mmd2, float((4 * h_a.var() / len(a) + 4 * h_b.var() / len(self.ref)).sqrt())


class CharacteristicMMD:
    """Squared MMD from samples to a distribution known through its characteristic function:
    ``mmd(samples) -> (mmd2, se)``.

    The kernel is ``k(x, y) = mean_m cos(w_m . (x - y))`` at fixed ``frequencies w [M, D]``: drawn from
    ``N(0, I / bandwidth^2)`` (:meth:`gaussian`), it is the random-feature form of the Gaussian kernel of that
    bandwidth, and a kernel in its own right, so the distance is exact for it. With the empirical characteristic
    function ``psi_m = mean_i exp(i w_m . x_i)`` of ``N`` samples and the target's ``phi_m``,
    ``MMD^2 = mean_m |phi_q(w_m) - phi_m|^2`` is estimated without bias by
    ``mean_m [(N |psi_m|^2 - 1) / (N - 1) - 2 Re(psi_m conj(phi_m)) + |phi_m|^2]`` (the pairs ``i != j`` only):
    0 in expectation for exact samples, with no offset from ``N`` and no second sample's noise, unlike a distance to
    a finite reference set. ``se``: the first-order error ``std_i(g_i) / sqrt(N)``,
    ``g_i = 2 mean_m Re(exp(i w_m . x_i) conj(psi_m - phi_m))`` (for independent samples; where the target is met
    the error is of order ``1 / N`` and ``se`` understates it).

    Args:
        frequencies: ``[M, D]``.
        target: the target's characteristic function at ``frequencies``, ``[M]`` complex.
        chunk: samples whose phases ``[chunk, M]`` are held at once.
    """

    def __init__(self, frequencies: torch.Tensor, target: torch.Tensor, chunk: int = 4096):
        self.frequencies = torch.as_tensor(frequencies, dtype=torch.float64)
        self.target = torch.as_tensor(target).to(torch.complex128)
        if self.frequencies.ndim != 2 or self.target.shape != (len(self.frequencies),):
            raise ValueError(f"frequencies must be [M, D] and target [M], got {tuple(self.frequencies.shape)} and "
                             f"{tuple(self.target.shape)}.")
        self.chunk = chunk

    @classmethod
    def gaussian(cls, characteristic_function, dim: int, bandwidth: float, num_frequencies: int = 2048,
                 generator: torch.Generator | None = None) -> "CharacteristicMMD":
        """The Gaussian kernel of ``bandwidth`` (``num_frequencies`` random features) against a target whose
        ``characteristic_function(frequencies [M, D]) -> [M]`` is known (e.g. :class:`GaussianMixture`'s)."""
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}.")
        w = torch.randn(num_frequencies, dim, generator=generator, dtype=torch.float64) / bandwidth
        return cls(w, characteristic_function(w))

    def _features(self, x: torch.Tensor):
        """``cos(w . x)`` and ``sin(w . x)`` of ``chunk`` samples at a time: two ``[chunk, M]``."""
        for s in range(0, len(x), self.chunk):
            phase = x[s:s + self.chunk] @ self.frequencies.T
            yield phase.cos(), phase.sin()

    def __call__(self, samples) -> tuple[float, float]:
        x = _as_matrix(samples, "samples", flatten=True)
        if x.shape[1] != self.frequencies.shape[1]:
            raise ValueError(f"sample dimensions differ: {x.shape[1]} vs {self.frequencies.shape[1]}.")
        n = len(x)
        if n < 2:
            raise ValueError(f"the MMD needs at least 2 samples, got {n}.")
        sums = [(c.sum(0), s.sum(0)) for c, s in self._features(x)]
        psi = torch.complex(sum(c for c, _ in sums), sum(s for _, s in sums)) / n  # [M]
        phi = self.target
        mmd2 = float(((n * psi.abs() ** 2 - 1) / (n - 1) - 2 * (psi * phi.conj()).real + phi.abs() ** 2).mean())
        d = psi - phi  # g_i = 2 mean_m Re(exp(i w_m . x_i) conj(d_m))
        g = torch.cat([2 * (c * d.real + s * d.imag).mean(1) for c, s in self._features(x)])
        return mmd2, float(g.std() / math.sqrt(n))


def sliced_wasserstein(a, b, num_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between samples ``a [N, D]`` and ``b [M, D]`` (``[N, *shape]`` is flattened).

    ``SW_2 = (E_theta W_2^2(theta.a, theta.b))^{1/2}`` over ``num_projections`` random unit directions; each 1-D
    ``W_2`` compares sorted projections (``N == M``) or, for unequal sizes, both quantile functions at
    ``max(N, M)`` midpoints (linear interpolation). A shift ``m`` gives ``|m| / sqrt(D)`` (``|m|`` in 1-D).
    """
    return SlicedWasserstein(b, num_projections, generator)(a)


class SlicedWasserstein:
    """:func:`sliced_wasserstein` against a fixed ``reference [M, D]``: its directions and sorted projections are
    computed once, so scoring many sample sets against one reference sorts only the samples."""

    def __init__(self, reference, num_projections: int = 256, generator: torch.Generator | None = None):
        b = _as_matrix(reference, "b", flatten=True)
        if num_projections < 1:
            raise ValueError(f"num_projections must be >= 1, got {num_projections}.")
        theta = torch.randn(b.shape[1], num_projections, generator=generator, dtype=torch.float64)
        self.theta = theta / theta.norm(dim=0, keepdim=True)
        self.sorted = (b @ self.theta).sort(0).values  # [M, P]

    def __call__(self, samples) -> float:
        """``SW_2`` between ``samples [N, D]`` and the reference."""
        a = _as_matrix(samples, "a", flatten=True)
        if a.shape[1] != self.theta.shape[0]:
            raise ValueError(f"sample dimensions differ: {a.shape[1]} vs {self.theta.shape[0]}.")
        pa, pb = (a @ self.theta).sort(0).values, self.sorted
        if len(pa) != len(pb):
            n = max(len(pa), len(pb))
            q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            pa, pb = _quantiles(pa, q), _quantiles(pb, q)
        return float(((pa - pb) ** 2).mean().sqrt())


def _quantiles(sorted_x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Empirical quantiles of each column of ``sorted_x [N, P]`` at levels ``q [Q]`` (midpoint rule): ``[Q, P]``."""
    n = len(sorted_x)
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).numpy()
    return torch.from_numpy(np.stack([np.interp(q.numpy(), grid, col) for col in sorted_x.T.numpy()], 1))


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake_feats [M, F]`` against ``real_feats [N, F]``.

    Each set's manifold is the union of balls around its points with radius the distance to the point's k-th
    nearest neighbour in the same set. Precision: fraction of fake points inside the real manifold (fidelity);
    recall: fraction of real points inside the fake manifold (diversity).
    """
    real, fake = _as_matrix(real_feats, "real_feats"), _as_matrix(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}.")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k must be in [1, min(N, M) - 1] = [1, {min(len(real), len(fake)) - 1}], got {k}.")

    def radii(x: torch.Tensor) -> torch.Tensor:  # [N]: distance to the k-th neighbour (index 0 is the point itself)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    d = torch.cdist(fake, real)  # [M, N]
    precision = (d <= radii(real)[None, :]).any(1).double().mean()
    recall = (d.T <= radii(fake)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def class_coverage(labels, num_classes: int = 10) -> dict:
    """How well predicted class labels ``[N]`` cover ``num_classes`` classes.

    Returns a dict: ``coverage`` (fraction of classes present), ``entropy`` (entropy of the class histogram over
    ``log(num_classes)``: 1 is perfectly balanced), ``balance`` (smallest / largest class count: 0 if a class is
    missing) and ``class_counts`` (list of ``num_classes`` ints).
    """
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}.")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be non-empty and in [0, {num_classes}); pass the right num_classes.")
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum() / math.log(num_classes) if num_classes > 1 else torch.tensor(1.0)
    return {
        "coverage": float((counts > 0).double().mean()),
        "entropy": float(entropy),
        "balance": float(counts.min() / counts.max()),
        "class_counts": [int(c) for c in counts],
    }


def mode_weight_error(weights_est, weights_true) -> float:
    """Total-variation distance ``0.5 * sum_k |w_est_k - w_true_k|`` between two mode-weight vectors ``[K]``.

    Both must be probability vectors (e.g. ``GaussianMixture.mode_weights(samples)`` and ``mixture.weights``).
    """
    est = torch.as_tensor(weights_est).detach().to("cpu", torch.float64)
    true = torch.as_tensor(weights_true).detach().to("cpu", torch.float64)
    if est.dim() != 1 or est.shape != true.shape:
        raise ValueError(f"weights must be two vectors [K] of equal size, got {tuple(est.shape)} and {tuple(true.shape)}.")
    for name, w in (("weights_est", est), ("weights_true", true)):
        if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"{name} must be non-negative and sum to 1 (got sum {float(w.sum()):.6g}); normalise it.")
    return float(0.5 * (est - true).abs().sum())
