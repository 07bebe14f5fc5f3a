"""Load what the command line names: a diffusion model (diffusers folder / Hub id / score_sde checkpoint) as a VE
score with its sample shape and trained sigma range, a noise classifier, and folders of training images."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .classifier import CLASSIFIER_FILES, NoiseClassifier, load_classifier  # noqa: F401  (the CLI loads from here)
from .hub import describe_folder, local_or_repo_id, pipeline_access, pipeline_error
from .integrators import INTEGRATORS, Score
from .schedulers import supported_schedulers

#: Image files ``load_images`` reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: Prompts a text-to-image model is sampled with when none are given: everyday subjects and styles. A classifier
#: is only as good as the pool it learns from, so pass the prompts of your own use (``--prompts FILE``) instead.
DEFAULT_PROMPTS = (
    "a photo of a cat", "a photo of a dog", "a portrait photo of a person", "a landscape with mountains and a lake",
    "a city street at night", "a bowl of fruit on a wooden table", "an oil painting of a ship at sea",
    "a watercolor painting of a forest", "a close-up photo of a flower", "a bird sitting on a branch",
    "a red car on a country road", "a cozy living room interior", "a plate of food in a restaurant",
    "a beach at sunset", "a snowy village in winter", "a digital illustration of a castle",
)


@dataclass
class LoadedModel:
    """A pretrained diffusion model seen as a VE score.

    Attributes:
        score: ``score(x [B, *shape], sigma [B]) -> [B, *shape]``.
        shape: the sample shape the model works on (latents for latent models).
        sigma_min, sigma_max: the model's trained noise range (the classifier grid defaults to it).
        decode: ``samples [B, *shape] -> images [B, C, H, W]`` in ``[-1, 1]`` (the VAE for latent models).
        pipeline: the diffusers pipeline, if the model came from one.
        prompts: text-to-image models: the prompts the model is sampled with; ``prompt_scores[i]`` is the score
            guided by ``prompts[i]`` (``score`` is the first).
        prompt_scores: one guided score per prompt (classifier-free guidance at ``guidance_scale``).
        guidance_scale: the classifier-free guidance scale of ``prompt_scores`` (1: no guidance).
    """

    score: Score
    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    decode: Callable[[torch.Tensor], torch.Tensor]
    pipeline: object | None = None
    prompts: tuple[str, ...] = ()
    prompt_scores: tuple[Score, ...] = ()
    guidance_scale: float = 1.0


def _sample_shape(config) -> tuple[int, ...]:
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.in_channels), *size)


#: File suffixes of score_sde checkpoints.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")


def _is_score_sde_checkpoint(spec: str) -> bool:
    """Whether ``spec`` names a score_sde checkpoint file; ``ValueError`` if it names one that does not exist."""
    path = Path(spec)
    if path.suffix in CHECKPOINT_SUFFIXES and not path.exists():
        raise ValueError(f"the score_sde checkpoint {spec!r} does not exist (looked in {Path.cwd()}): pass the path "
                         f"of the checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}).")
    return path.is_file() and path.suffix in CHECKPOINT_SUFFIXES


def load_model(spec: str, *, score_sde_net: str | None = None, sde: str = "vp", shape: tuple[int, ...] | None = None,
               score_sde_kwargs: dict | None = None, prompts: list[str] | None = None,
               guidance_scale: float | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load ``spec``: a local diffusers pipeline folder, a Hub repo id (``from_pretrained``; the HF cache alone when
    ``HF_HUB_OFFLINE`` is set or the Hub does not answer) or a score_sde checkpoint file (``checkpoint_*.pth``; its
    network is built by ``score_sde_net="module:function"`` (:func:`build_network`), the SDE named by ``sde`` with
    ``score_sde_kwargs`` (``beta_min``, ``beta_max``, ``sigma_min``, ``sigma_max``, ``continuous`` of
    :class:`~dlg_sampler.adapters.ScoreSdeScore`), and the sample ``shape`` must be given).

    A text-to-image pipeline (Stable-Diffusion-style) is sampled the way users sample it: each of ``prompts``
    (default :data:`DEFAULT_PROMPTS`) encoded by the pipeline, with classifier-free guidance at
    ``guidance_scale`` (default: the pipeline's own, 7.5 for Stable Diffusion); see :class:`LoadedModel`.
    """
    from .adapters import ScoreSdeScore, decode_latents, from_pipeline, load_score_sde_checkpoint

    if _is_score_sde_checkpoint(spec):
        if score_sde_net is None or shape is None:
            raise ValueError(f"{spec} is a score_sde checkpoint: its network must be built by code; pass "
                             "--score-sde-net module:function (returns the untrained nn.Module) and --shape C H W.")
        net = build_network(score_sde_net)
        load_score_sde_checkpoint(spec, net)
        net = net.to(device or "cpu", dtype or torch.float32).eval()
        score = ScoreSdeScore(net, sde=sde, **(score_sde_kwargs or {}))
        return LoadedModel(score, tuple(shape), score.sigma_min, score.sigma_max, lambda x: x)

    from diffusers import DiffusionPipeline

    expected = ("a diffusers pipeline folder (model_index.json, written by pipeline.save_pretrained) or a score_sde "
                "checkpoint file (.pth)")
    path = local_or_repo_id(spec, "the model", expected)
    if isinstance(path, Path) and not (path / "model_index.json").exists():
        raise ValueError(f"the model {spec!r} is not {expected}: it holds {describe_folder(path)}.")
    try:
        pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype, **pipeline_access(spec))
    except (OSError, EnvironmentError) as err:
        raise ValueError(pipeline_error(spec, err)) from err
    pipe.to(device or "cpu")
    pipe.set_progress_bar_config(disable=True)
    conditioning = _text_conditioning(pipe, spec, prompts, guidance_scale, device or "cpu")
    score = conditioning["prompt_scores"][0] if conditioning else from_pipeline(pipe)
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        decode = lambda latents: decode_latents(vae, latents)  # noqa: E731
    else:
        decode = lambda x: x  # noqa: E731
    return LoadedModel(score, _sample_shape(net.config), float(score.sigma_min), float(score.sigma_max), decode, pipe,
                       **conditioning)


def _text_conditioning(pipe, spec: str, prompts: list[str] | None, guidance_scale: float | None, device) -> dict:
    """``LoadedModel`` fields of a text-to-image pipeline (empty for others): one guided score per prompt."""
    from .adapters import from_pipeline
    from .pipelines import default_guidance_scale, is_text_to_image, text_conditions

    if not is_text_to_image(pipe):
        if prompts is not None or guidance_scale is not None:
            raise ValueError(f"the model {spec!r} ({type(pipe).__name__}) takes no text prompt: drop --prompts and "
                             "--guidance-scale.")
        return {}
    prompts = tuple(prompts or DEFAULT_PROMPTS)
    scale = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
    with torch.no_grad():
        conditions = text_conditions(pipe, list(prompts), None, scale, device)
    scores = tuple(from_pipeline(pipe, guidance_scale=scale, cond_kwargs=cond, uncond_kwargs=uncond)
                   for cond, uncond in conditions)
    return {"prompts": prompts, "prompt_scores": scores, "guidance_scale": scale}


def build_network(spec: str) -> torch.nn.Module:
    """The untrained network of a score_sde checkpoint from ``"module:function"``: ``function()`` of ``module``,
    imported from the current directory first (console scripts do not put it on the import path), then from
    ``PYTHONPATH`` and the installed packages. ``module`` may also be a ``.py`` file path."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"--score-sde-net {spec!r} must be MODULE:FUNCTION, e.g. my_models:build_ncsnpp (a file "
                         "my_models.py in the current directory with a function build_ncsnpp() returning the network).")
    folder, module_name = (str(Path(module_name).parent), Path(module_name).stem) if module_name.endswith(".py") \
        else (os.getcwd(), module_name)
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):  # found, but an import inside it failed
            raise ValueError(f"--score-sde-net {spec!r}: importing {module_name!r} failed: {err}; install the "
                             "package it needs.") from err
        raise ValueError(f"--score-sde-net {spec!r}: no module {module_name!r} in {folder} or on PYTHONPATH: run from "
                         f"the folder holding {module_name.replace('.', '/')}.py, or add its folder to PYTHONPATH."
                         ) from err
    finally:
        sys.path.remove(folder)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"--score-sde-net {spec!r}: module {module_name!r} ({module.__file__}) has no function "
                         f"{fn_name!r}; its functions and classes: {', '.join(public) or 'none'}.")
    net = fn()
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"--score-sde-net {spec!r} returned {type(net).__name__}, not a torch.nn.Module: the "
                         "function must build and return the (untrained) network.")
    return net


def make_integrator(name: str, model: LoadedModel):
    """A core integrator name (returned as is), or a diffusers scheduler class name: that scheduler configured from
    the model's pipeline scheduler (``cls.from_config(pipe.scheduler.config)``; default config without a pipeline).
    Either can be passed to :func:`dlg_sampler.integrators.integrate`."""
    if name in INTEGRATORS:
        return name
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or name not in supported_schedulers():
        raise ValueError(f"unknown integrator {name!r}: use one of {sorted(INTEGRATORS)} or a diffusers scheduler "
                         f"class name from {supported_schedulers()}.")
    base = getattr(model.pipeline, "scheduler", None)
    return cls.from_config(base.config) if base is not None else cls()


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted); ``ValueError`` if it is no folder or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder{' (no such path)' if not folder.exists() else ''}: pass a folder "
                         "of images (subfolders are searched too).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}: pass the folder that holds the "
                         "training images.")
    return files


def load_images(folder: str | Path, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Every image under ``folder`` (recursively, sorted) as ``[N, C, H, W]`` in ``[-1, 1]``.

    ``size`` resizes (bicubic, square); ``channels`` 1 or 3 converts to grayscale / RGB (default: from the first
    image).
    """
    from PIL import Image

    arrays = []
    files = image_files(folder)
    for f in files:
        try:
            img = Image.open(f)
            img.load()
        except OSError as err:  # PIL.UnidentifiedImageError, truncated files
            raise ValueError(f"cannot read the image {f} ({err}): remove or replace it.") from err
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
