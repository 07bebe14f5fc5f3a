"""The preset API: both shipped presets load offline (photo-digits also from another trained folder), clear errors where a model is missing or mismatched, and dlg-sample --preset."""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from dlg_sampler import presets
from dlg_sampler.cli import sample_main
from dlg_sampler.digits import DigitsEvaluator
from dlg_sampler.models import load_classifier, load_model
from dlg_sampler.photo_digits import PIPELINE_DIR, SHAPE, PhotoDigitsEvaluator, make_photo_digits

ENV = "DLG_PHOTO_DIGITS_PIPELINE"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_photo_model(tmp_path_factory) -> Path:
    """A tiny 3x16x16 DDPM folder, trained two steps by the example script (the smoke run of its real use)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "train_photo_digits_model.py"
    spec = importlib.util.spec_from_file_location("train_photo_digits_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.load_photo_digits_data = lambda split: make_photo_digits(64, split, seed=0)[0]
    script.build_unet = lambda: UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    out = tmp_path_factory.mktemp("photo") / "model"
    threads = torch.get_num_threads()
    script.main(["--steps", "2", "--batch-size", "4", "--out", str(out)])
    torch.set_num_threads(threads)
    return out


def test_digits_preset_loads_offline():
    assert "digits" in presets.names()
    p = presets.load("digits")
    assert isinstance(p.pipeline, DDPMPipeline) and p.shape == (1, 8, 8) and p.classifier_dir is not None
    assert type(p.evaluator) is DigitsEvaluator and p.evaluator.features(torch.zeros(3, *p.shape)).shape[0] == 3


def test_photo_digits_preset_ships_whole():
    assert presets.names() == ["digits", "photo-digits"]
    p = presets.load("photo-digits")
    assert p.shape == SHAPE and p.pipeline.unet.config.sample_size == 16 and isinstance(p.evaluator, PhotoDigitsEvaluator)
    mu, cov = p.evaluator.model_reference_stats()  # the model's own samples: dlg-sample's "FD vs the model's own"
    assert mu.shape == (64,) and cov.shape == (64, 64)
    clf = load_classifier(p.classifier_dir)
    assert tuple(clf.sample_shape) == SHAPE and clf.levels.sigma_max == pytest.approx(
        load_model(str(PIPELINE_DIR)).sigma_max, rel=1e-6)


def test_photo_digits_preset_loads_a_trained_folder(tiny_photo_model, monkeypatch):
    p = presets.load("photo-digits", pipeline=tiny_photo_model)
    assert p.shape == SHAPE and isinstance(p.evaluator, PhotoDigitsEvaluator)
    x, y = make_photo_digits(8, "test", seed=0)
    assert p.evaluator.predict(x).shape == y.shape and p.evaluator.features(x).shape[0] == 8
    monkeypatch.setenv(ENV, str(tiny_photo_model))  # the environment names it: listed and loaded by name alone
    assert "photo-digits" in presets.names()
    assert presets.load("photo-digits").pipeline.unet.config.block_out_channels == [8, 16]


def test_missing_unknown_or_mismatched_models_are_clear_errors(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "photo-digits",
                        dataclasses.replace(presets.PRESETS["photo-digits"], pipeline_dir=tmp_path / "none"))
    assert presets.names() == ["digits"]
    with pytest.raises(ValueError, match="train it with `python examples/train_photo_digits_model.py"):
        presets.load("photo-digits")
    monkeypatch.setenv(ENV, str(tiny_model))  # a folder, but no pipeline at its top
    with pytest.raises(ValueError, match=f"holds no diffusers pipeline.*set {ENV}"):
        presets.load("photo-digits")
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\), but the photo-digits preset's are \(3, 16, 16\)"):
        presets.load("photo-digits", pipeline=tiny_model / "pipe")  # the 1x8x8 test model
    with pytest.raises(ValueError, match="unknown preset 'nope'; the presets are digits, photo-digits"):
        presets.load("nope")


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # the FD of 8 samples in 64 feature dimensions
def test_dlg_sample_preset_photo_digits(tiny_photo_model, tmp_path, monkeypatch, capsys):
    """In-process, as the digits preset's CLI tests: the samples are scored by the photo-digits evaluator."""
    scored = []
    evaluate = PhotoDigitsEvaluator.evaluate
    monkeypatch.setattr(PhotoDigitsEvaluator, "evaluate", lambda self, x: scored.append(x) or evaluate(self, x))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV, str(tiny_photo_model))
    threads = torch.get_num_threads()
    sample_main(["--preset", "photo-digits", "--n", "8", "--nfe", "10", "--no-compare"])
    torch.set_num_threads(threads)
    assert "FD vs held-out digits" in capsys.readouterr().out and (tmp_path / "samples.png").exists()
    assert len(scored) == 1 and scored[0].shape == (8, *SHAPE)


def test_gibbs_on_a_preset_without_classifier_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(presets.PRESETS, "photo-digits",
                        dataclasses.replace(presets.PRESETS["photo-digits"], classifier_dir=None))
    with pytest.raises(SystemExit) as exit_:
        sample_main(["--preset", "photo-digits", "--kernel", "gibbs", "--n", "8"])
    assert "the photo-digits preset has none" in f"{exit_.value.code} {capsys.readouterr().err}"


@pytest.mark.parametrize("args, env, message", [
    (["--preset", "photo-digits", "--model", "x"], {}, "--preset photo-digits and --model x name two models"),
    (["--preset", "photo-digits"], {ENV: "no-such-folder"}, "no-such-folder holds no diffusers pipeline"),
    (["--preset", "nope"], {}, "invalid choice: 'nope'"),
])
def test_dlg_sample_preset_errors(tmp_path, monkeypatch, capsys, args, env, message):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        sample_main([*args, "--n", "8"])
    assert message in f"{exit_.value.code} {capsys.readouterr().err}" and not (tmp_path / "samples.png").exists()
