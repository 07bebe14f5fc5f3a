"""The photo-digits data set (deterministic, known class proportions, a held-out split that never reaches training)
and its evaluator (reads the digits; the FD sees blur). Its training scripts: tests/test_examples.py."""

import pytest
import torch
import torch.nn.functional as F

from dlg_sampler import photo_digits
from dlg_sampler.metrics import frechet_distance
from dlg_sampler.photo_digits import (HELD_OUT_BLOCKS, NUM_CLASSES, SHAPE, PhotoDigitsEvaluator, make_photo_digits,
                                      photo_blocks)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_builder_is_deterministic_under_its_seed():
    x, y = make_photo_digits(64, "train", seed=3)
    x2, y2 = make_photo_digits(64, "train", seed=3)
    x3, _ = make_photo_digits(64, "train", seed=4)
    assert x.shape == (64, *SHAPE) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3  # images, not a constant


def test_classes_are_equally_likely():
    _, y = make_photo_digits(2000, "test", seed=0)
    counts = torch.bincount(y, minlength=NUM_CLASSES).double()
    expected = len(y) / NUM_CLASSES
    assert ((counts - expected).abs() < 4 * (expected * (1 - 1 / NUM_CLASSES)) ** 0.5).all(), counts


def test_photo_blocks_split_each_photo():
    train, test = photo_blocks("train"), photo_blocks("test")
    assert not set(map(tuple, train.tolist())) & set(map(tuple, test.tolist()))
    assert torch.bincount(test[:, 0]).tolist() == [HELD_OUT_BLOCKS, HELD_OUT_BLOCKS]
    assert len(train) + len(test) == 2 * (142 // 32) * (213 // 32)


def test_held_out_digits_and_photo_blocks_never_reach_training(monkeypatch):
    """Marked sources: held-out digits are all ink, training digits none; held-out photo blocks are white, the rest
    black. A training image built from any held-out pixel (a digit, or a bilinear tap across a block edge) would not
    be pure black."""
    from dlg_sampler import digits

    photos = torch.zeros(2, 3, 142, 213)
    for photo, top, left in photo_blocks("test").tolist():
        photos[photo, :, top:top + 32, left:left + 32] = 1.0

    def marked_digits(split, return_labels=False):
        x, y = digits.load_digits_data(split, return_labels=True)
        return torch.full_like(x, 1.0 if split == "test" else -1.0), y

    monkeypatch.setattr(photo_digits, "_photos", lambda: photos)
    monkeypatch.setattr(photo_digits, "load_digits_data", marked_digits)
    train, _ = make_photo_digits(2000, "train", seed=0)
    test, _ = make_photo_digits(200, "test", seed=0)
    assert (train == -1).all()
    assert (test > -1).float().mean() > 0.5  # the marks do show where they are used


@pytest.fixture(scope="module")
def evaluator():
    return PhotoDigitsEvaluator()


def test_evaluator_reads_held_out_digits(evaluator, one_thread):
    x, y = make_photo_digits(500, "test", seed=5)
    assert (evaluator.predict(x) == y).float().mean() > 0.9
    assert evaluator.features(x).shape[0] == 500
    with pytest.raises(ValueError, match=r"\[N, 3, 16, 16\]"):
        evaluator.features(torch.zeros(2, 1, 8, 8))


def test_evaluator_fd_sees_blur(evaluator, one_thread):
    """Held-out images are closer (FD) to the training images than a blurred copy of the same held-out images."""
    test, _ = make_photo_digits(1500, "test", seed=1)
    train, _ = make_photo_digits(3000, "train", seed=0)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(test, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    train_feats = evaluator.features(train)
    fd_held_out = frechet_distance(evaluator.features(test), train_feats)
    fd_blurred = frechet_distance(evaluator.features(blurred), train_feats)
    assert fd_held_out < 0.5 * fd_blurred, (fd_held_out, fd_blurred)
