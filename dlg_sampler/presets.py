"""Presets: a diffusion model trained in-project together with its evaluator, loadable offline by name.

    from dlg_sampler import presets
    presets.names()                       # the presets whose model is here: ['digits', ...]
    p = presets.load("digits")            # .pipeline (diffusers), .evaluator, .shape, .classifier_dir
    p.evaluator.evaluate(samples)         # FD, precision / recall, class coverage against the held-out split

Both ship whole: ``digits`` (1x8x8 grayscale) and ``photo-digits`` (3x16x16 colour, :mod:`dlg_sampler.photo_digits`).
Another photo-digits model (``examples/train_photo_digits_model.py``) is used from the folder named by ``pipeline=``
or by the environment variable ``DLG_PHOTO_DIGITS_PIPELINE`` (so ``dlg-sample --preset photo-digits`` finds it too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import digits, photo_digits


@dataclass(frozen=True)
class PresetSpec:
    """Where a preset's parts are: the shipped pipeline folder, an environment variable that may name another, the
    noise classifier folder (``None``: the preset has none, only the restart kernel runs), the evaluator's class,
    and the command that trains the model."""

    pipeline_dir: Path
    env: str | None
    classifier_dir: Path | None
    evaluator: Callable[[], digits.DigitsEvaluator]
    train_command: str

    def pipeline_path(self, pipeline: str | Path | None = None) -> Path | None:
        """The model folder in use: ``pipeline`` if given, else the one the environment names, else the shipped
        one; ``None`` where none of these is there."""
        for path in (pipeline, os.environ.get(self.env) if self.env else None, self.pipeline_dir):
            if path:
                return Path(path)
        return None


PRESETS: dict[str, PresetSpec] = {
    "digits": PresetSpec(digits.PIPELINE_DIR, None, digits.CLASSIFIER_DIR, digits.DigitsEvaluator,
                         "python examples/train_digits_model.py --out digits-model"),
    "photo-digits": PresetSpec(photo_digits.PIPELINE_DIR, "DLG_PHOTO_DIGITS_PIPELINE", photo_digits.CLASSIFIER_DIR,
                               photo_digits.PhotoDigitsEvaluator,
                               "python examples/train_photo_digits_model.py --out photo-digits-model "
                               "--checkpoint-dir photo-digits-checkpoints"),
}


@dataclass
class Preset:
    """A loaded preset: ``pipeline`` (the diffusers ``DDPMPipeline``), ``evaluator`` (``features``, ``predict``,
    ``evaluate`` as :class:`~dlg_sampler.digits.DigitsEvaluator`), ``shape`` (one sample's ``(C, H, W)``) and
    ``classifier_dir`` (its noise classifier folder, ``None`` where it has none)."""

    name: str
    pipeline: object
    evaluator: digits.DigitsEvaluator
    shape: tuple[int, ...]
    classifier_dir: Path | None


def names() -> list[str]:
    """The presets whose model is here (shipped, or named by the preset's environment variable)."""
    return [name for name in PRESETS if _model_here(name)]


def _model_here(name: str, pipeline: str | Path | None = None) -> bool:
    path = PRESETS[name].pipeline_path(pipeline)
    return (path / "model_index.json").is_file()


def pipeline_path(name: str, pipeline: str | Path | None = None) -> Path:
    """The model folder of preset ``name`` (see :meth:`PresetSpec.pipeline_path`); a one-line error saying how to
    get it where there is none."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}.")
    spec = PRESETS[name]
    path = spec.pipeline_path(pipeline)
    if not _model_here(name, pipeline):
        where = f"{path} holds no diffusers pipeline (model_index.json)" if pipeline or (
            spec.env and os.environ.get(spec.env)) else f"the {name} model is not shipped in this version"
        env = f" and set {spec.env} to its --out folder" if spec.env else ""
        raise ValueError(f"{where}: train it with `{spec.train_command}`{env} (or pass pipeline=FOLDER).")
    return path


def load(name: str, pipeline: str | Path | None = None, **kwargs) -> Preset:
    """Preset ``name``, offline: its ``DDPMPipeline`` (from ``pipeline``, a folder, where given; ``kwargs`` go to
    ``from_pretrained``), its evaluator and one sample's shape."""
    from diffusers import DDPMPipeline

    spec = PRESETS.get(name)
    path = pipeline_path(name, pipeline)
    pipe = DDPMPipeline.from_pretrained(path, **kwargs)
    evaluator = spec.evaluator()
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    if shape != evaluator.shape:
        raise ValueError(f"{path} makes samples of shape {shape}, but the {name} preset's are {evaluator.shape}: "
                         "pass that preset's model folder.")
    return Preset(name, pipe, evaluator, shape, spec.classifier_dir)
