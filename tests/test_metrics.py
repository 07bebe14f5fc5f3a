"""The metrics on distributions with known answers."""

import math

import numpy as np
import pytest
import torch

from dlg_sampler import GaussianMixture
from dlg_sampler.metrics import (CharacteristicMMD, KernelDistance, class_coverage, frechet_distance, kernel_distance,
                                 mode_weight_error, precision_recall, sliced_wasserstein)


def gauss(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_frechet_distance_of_shifted_gaussians_is_squared_shift():
    m = torch.tensor([1.0, -2.0, 0.5, 0.0])
    fd = frechet_distance(gauss(20000, 4, 0), gauss(20000, 4, 1) + m)
    assert fd == pytest.approx(float(m @ m), rel=0.03)  # |m|^2 = 5.25
    assert frechet_distance(gauss(20000, 4, 0), gauss(20000, 4, 1)) < 0.01


def test_frechet_distance_of_scaled_gaussians_matches_closed_form():
    # N(0, I) vs N(0, s^2 I) in d dims: d (1 - s)^2
    fd = frechet_distance(gauss(20000, 3, 0), gauss(20000, 3, 1, scale=2.0))
    assert fd == pytest.approx(3.0, rel=0.05)


def test_frechet_distance_accepts_one_feature_and_rejects_mismatch():
    assert frechet_distance(gauss(5000, 1, 0), gauss(5000, 1, 1, shift=3.0)) == pytest.approx(9.0, rel=0.05)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(gauss(10, 3, 0), gauss(10, 4, 1))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((10, 3), float("nan")), gauss(10, 3, 1))


def test_sliced_wasserstein_is_zero_for_identical_sets_and_the_shift_for_shifted_ones():
    a = gauss(4000, 1, 0)
    g = torch.Generator().manual_seed(0)
    assert sliced_wasserstein(a, a, generator=g) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(a, a + 1.5, generator=g) == pytest.approx(1.5, rel=1e-9)
    # in D dims a shift m averages (theta . m)^2 over the sphere: |m|^2 / D
    x = gauss(3000, 8, 1)
    m = torch.zeros(8, dtype=torch.float64)
    m[0] = 4.0
    sw = sliced_wasserstein(x, x + m, num_projections=4096, generator=g)
    assert sw == pytest.approx(4.0 / math.sqrt(8), rel=0.05)


def test_sliced_wasserstein_interpolates_unequal_sizes_and_flattens_images():
    g = torch.Generator().manual_seed(0)
    small, large = gauss(1000, 1, 0), gauss(3000, 1, 1, shift=2.0)
    assert sliced_wasserstein(small, large, generator=g) == pytest.approx(2.0, abs=0.1)
    images = gauss(500, 16, 2).reshape(500, 1, 4, 4)
    assert sliced_wasserstein(images, images.clone(), generator=g) == pytest.approx(0.0, abs=1e-12)


def test_precision_recall_separates_fidelity_from_diversity():
    real = gauss(1000, 2, 0)
    assert min(precision_recall(real, gauss(1000, 2, 1))) > 0.9
    # a collapsed generator: every sample is faithful but most of the real data is missed
    collapsed = gauss(1000, 2, 2, scale=0.1)
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.3
    # a generator off the data manifold
    precision, recall = precision_recall(real, gauss(1000, 2, 3, shift=10.0))
    assert precision == 0.0 and recall == 0.0
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real[:3], real[:3], k=3)


def test_class_coverage_counts_classes_and_balance():
    balanced = class_coverage(torch.arange(100) % 10)
    assert balanced["coverage"] == 1.0 and balanced["balance"] == 1.0
    assert balanced["entropy"] == pytest.approx(1.0)
    assert balanced["class_counts"] == [10] * 10
    skewed = class_coverage(torch.tensor([0, 0, 0, 1, 2]), num_classes=4)
    assert skewed["coverage"] == 0.75 and skewed["balance"] == 0.0 and skewed["class_counts"] == [3, 1, 1, 0]
    assert 0 < skewed["entropy"] < 1
    assert class_coverage(torch.zeros(7, dtype=torch.long))["entropy"] == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        class_coverage(torch.tensor([0, 10]))


def test_mode_weight_error_is_total_variation():
    assert mode_weight_error(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0.0
    assert mode_weight_error([1.0, 0.0, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(1.0)
    assert mode_weight_error([0.6, 0.4], [0.5, 0.5]) == pytest.approx(0.1)
    mixture = GaussianMixture.random(num_modes=3, dim=2, seed=0)
    x = mixture.sample(20000, generator=torch.Generator().manual_seed(1))
    assert mode_weight_error(mixture.mode_weights(x), mixture.weights) < 0.02
    with pytest.raises(ValueError, match="sum to 1"):
        mode_weight_error([2.0, 0.0], [0.5, 0.5])


def test_kernel_distance_is_the_unbiased_mmd_and_its_error_is_right_where_sets_differ():
    """Against the all-pairs formula; centred on 0 for two samples of one distribution (where the FD is not: it
    carries an offset from the sets' sizes); and ``se`` tracks the spread of the estimate over fresh sample and
    reference draws where the distributions differ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64, generator=g)
    y = torch.randn(400, 8, dtype=torch.float64, generator=g) + 0.3
    k = lambda u, v: (u @ v.T / 8 + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    formula = ((kxx.sum() - kxx.diagonal().sum()) / (300 * 299) + (kyy.sum() - kyy.diagonal().sum()) / (400 * 399)
               - 2 * k(x, y).mean())
    assert kernel_distance(x, y)[0] == pytest.approx(float(formula), rel=1e-9)
    same = [kernel_distance(torch.randn(200, 8, generator=g), torch.randn(400, 8, generator=g)) for _ in range(30)]
    fds = [frechet_distance(torch.randn(200, 8, generator=g), torch.randn(400, 8, generator=g)) for _ in range(30)]
    spread = np.std([v for v, _ in same])
    assert abs(np.mean([v for v, _ in same])) < 3 * spread / 30**0.5 < np.mean(fds) / 10
    apart = [kernel_distance(torch.randn(300, 8, generator=g) + 0.3, torch.randn(600, 8, generator=g))
             for _ in range(30)]
    assert 0.6 < np.mean([se for _, se in apart]) / np.std([v for v, _ in apart]) < 1.6
    with pytest.raises(ValueError, match="feature sizes differ"):
        KernelDistance(y)(torch.zeros(5, 3))


def test_a_mixtures_characteristic_function_is_the_mean_of_its_samples_phases():
    mixture = GaussianMixture.random(3, 4, spread=1.5, std=0.4, seed=3)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g, dtype=torch.float64)
    x = mixture.sample(200_000, generator=g).double()
    empirical = torch.exp(1j * (x @ w.T)).mean(0)
    assert (mixture.characteristic_function(w) - empirical).abs().max() < 4 / 200_000**0.5


def test_the_mmd_to_a_known_distribution_is_the_all_pairs_u_statistic_centred_on_0_for_its_samples():
    """Against the pairs formula for its kernel ``mean_m cos(w_m . (x - y))`` (the target's terms from its
    characteristic function); 0 in expectation for the target's own samples, with no reference sample's noise; and
    ``se`` tracks the spread of the estimate over fresh draws where the distributions differ."""
    mixture = GaussianMixture.random(3, 4, spread=1.5, std=0.4, seed=3)
    shifted = GaussianMixture(mixture.means + 0.3, mixture.stds, mixture.weights)
    g = torch.Generator().manual_seed(0)
    mmd = CharacteristicMMD.gaussian(mixture.characteristic_function, 4, bandwidth=0.8, num_frequencies=64,
                                     generator=g)
    x = shifted.sample(50, generator=g).double()
    phase = x @ mmd.frequencies.T  # [N, M]
    pairs = torch.cos(phase[:, None, :] - phase[None, :, :]).mean(-1)  # k(x_i, x_j)
    phi = mmd.target
    cross = (torch.exp(1j * phase) * phi.conj()).real.mean(1)  # E_y k(x_i, y) under the target
    formula = (pairs.sum() - pairs.diagonal().sum()) / (50 * 49) - 2 * cross.mean() + (phi.abs() ** 2).mean()
    assert mmd(x)[0] == pytest.approx(float(formula), rel=1e-9)
    same = [mmd(mixture.sample(500, generator=g))[0] for _ in range(40)]
    assert abs(np.mean(same)) < 3 * np.std(same) / 40**0.5
    apart = [mmd(shifted.sample(500, generator=g)) for _ in range(40)]
    assert np.mean([v for v, _ in apart]) > 10 * np.std(same)
    assert 0.6 < np.mean([se for _, se in apart]) / np.std([v for v, _ in apart]) < 1.6
    with pytest.raises(ValueError, match="sample dimensions differ"):
        mmd(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        CharacteristicMMD.gaussian(mixture.characteristic_function, 4, bandwidth=0.0)
