"""Load what the command line names: a diffusion model (diffusers folder / Hub id / score_sde checkpoint) as a VE
score with its sample shape and trained sigma range, a noise classifier, and folders of training images."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .classifier import NoiseClassifier
from .integrators import Score

#: Image files ``load_images`` reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class LoadedModel:
    """A pretrained diffusion model seen as a VE score.

    Attributes:
        score: ``score(x [B, *shape], sigma [B]) -> [B, *shape]``.
        shape: the sample shape the model works on (latents for latent models).
        sigma_min, sigma_max: the model's trained noise range (the classifier grid defaults to it).
        decode: ``samples [B, *shape] -> images [B, C, H, W]`` in ``[-1, 1]`` (the VAE for latent models).
        pipeline: the diffusers pipeline, if the model came from one.
    """

    score: Score
    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    decode: Callable[[torch.Tensor], torch.Tensor]
    pipeline: object | None = None


def _sample_shape(config) -> tuple[int, ...]:
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.in_channels), *size)


def _is_score_sde_checkpoint(spec: str) -> bool:
    return Path(spec).is_file() and Path(spec).suffix in (".pth", ".pt", ".ckpt")


def load_model(spec: str, *, score_sde_net: str | None = None, sde: str = "vp", shape: tuple[int, ...] | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load ``spec``: a local diffusers pipeline folder, a Hub repo id (``from_pretrained``, so the HF cache and
    ``HF_HUB_OFFLINE`` apply) or a score_sde checkpoint file (``checkpoint_*.pth``; its network is built by
    ``score_sde_net="module:function"``, the SDE named by ``sde``, and the sample ``shape`` must be given)."""
    from .adapters import ScoreSdeScore, decode_latents, from_pipeline, load_score_sde_checkpoint

    if _is_score_sde_checkpoint(spec):
        if score_sde_net is None or shape is None:
            raise ValueError(f"{spec} is a score_sde checkpoint: its network must be built by code; pass "
                             "--score-sde-net module:function (returns the untrained nn.Module) and --shape C H W.")
        module_name, _, fn_name = score_sde_net.partition(":")
        net = getattr(importlib.import_module(module_name), fn_name)()
        load_score_sde_checkpoint(spec, net)
        net = net.to(device or "cpu", dtype or torch.float32).eval()
        score = ScoreSdeScore(net, sde=sde)
        return LoadedModel(score, tuple(shape), score.sigma_min, score.sigma_max, lambda x: x)

    from diffusers import DiffusionPipeline

    path = Path(spec)
    if path.exists() and not (path / "model_index.json").exists():
        raise ValueError(f"{spec} is not a diffusers pipeline folder (no model_index.json): pass a folder written by "
                         "pipeline.save_pretrained(...), a Hub repo id, or a score_sde checkpoint file.")
    try:
        pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype)
    except (OSError, EnvironmentError) as err:
        raise ValueError(f"could not load the diffusers pipeline {spec!r} ({err}). A local folder needs "
                         "model_index.json plus each component's config and weights; a Hub id needs network "
                         "access or a populated HF cache (HF_HUB_OFFLINE=1 uses the cache only).") from err
    pipe.to(device or "cpu")
    pipe.set_progress_bar_config(disable=True)
    score = from_pipeline(pipe)
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        decode = lambda latents: decode_latents(vae, latents)  # noqa: E731
    else:
        decode = lambda x: x  # noqa: E731
    return LoadedModel(score, _sample_shape(net.config), float(score.sigma_min), float(score.sigma_max), decode, pipe)


def make_integrator(name: str, model: LoadedModel):
    """A core integrator name (returned as is), or a diffusers scheduler class name: that scheduler configured from
    the model's pipeline scheduler (``cls.from_config(pipe.scheduler.config)``; default config without a pipeline).
    Either can be passed to :func:`dlg_sampler.integrators.integrate`."""
    from .integrators import INTEGRATORS
    from .schedulers import supported_schedulers

    if name in INTEGRATORS:
        return name
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or name not in supported_schedulers():
        raise ValueError(f"unknown integrator {name!r}: use one of {sorted(INTEGRATORS)} or a diffusers scheduler "
                         f"class name from {supported_schedulers()}.")
    base = getattr(model.pipeline, "scheduler", None)
    return cls.from_config(base.config) if base is not None else cls()


def load_classifier(spec: str | Path, device: torch.device | str | None = None) -> NoiseClassifier:
    """``NoiseClassifier.from_pretrained(spec)`` (a local folder or a Hub repo id) with a clear error."""
    try:
        classifier = NoiseClassifier.from_pretrained(str(spec))
    except Exception as err:  # huggingface_hub raises several types for a missing repo / file
        raise ValueError(f"could not load the noise classifier {str(spec)!r} ({type(err).__name__}: {err}). Pass a "
                         "folder written by NoiseClassifier.save_pretrained / dlg-train-classifier, or a Hub repo id "
                         "(available offline only from the HF cache).") from err
    return classifier.to(device or "cpu").eval()


def load_images(folder: str | Path, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Every image under ``folder`` (recursively, sorted) as ``[N, C, H, W]`` in ``[-1, 1]``.

    ``size`` resizes (bicubic, square); ``channels`` 1 or 3 converts to grayscale / RGB (default: from the first
    image).
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass a folder of images (subfolders are searched too).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}.")
    arrays = []
    for f in files:
        img = Image.open(f)
        mode = {1: "L", 3: "RGB"}.get(channels or (1 if img.mode in ("L", "1", "I", "I;16") else 3))
        if mode is None:
            raise ValueError(f"channels must be 1 or 3 for image folders, got {channels}.")
        img = img.convert(mode)
        if size is not None:
            img = img.resize((size, size), Image.BICUBIC)
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images under {folder} have different sizes {sorted(shapes)}: pass --image-size.")
    return torch.from_numpy(np.stack(arrays))
