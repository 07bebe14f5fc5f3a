"""A noise classifier's training data from the model alone: a pool of the model's own samples.

DLG needs a noise classifier matched to the model, trained on clean samples of the model's distribution; most
users of a pretrained model do not have its training data. :func:`build_sample_pool` draws that data from the model
itself with a vanilla integrator (a core one or a diffusers scheduler) started from pure noise at ``sigma_max``,
and writes it as resumable safetensors shards (:class:`dlg_sampler.shards.ShardWriter`): stop it at any point and
the same call continues without losing or repeating a finished shard. Shard ``k`` is drawn with a generator seeded
from ``(seed, k)``, so a resumed pool is bit-identical to an uninterrupted one. For latent models the pool holds
latents (``model.shape``, the score's space), so the classifier trained on it lives in latent space too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .integrators import SIGMA_END, count_nfe, integrate, steps_for_nfe
from .models import LoadedModel, load_images, make_integrator
from .shards import ShardWriter, read_samples, shard_sizes


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard`` of a pool with seed ``seed`` (numpy ``SeedSequence([seed, shard])``)."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


@torch.no_grad()
def draw(model: LoadedModel, n: int, integrator, steps: int, generator: torch.Generator,
         device: torch.device | str, first: int = 0) -> tuple[torch.Tensor, int]:
    """``n`` samples of the model, integrated from ``sigma_max * z`` to 0: ``(x0 [n, *model.shape], nfe per sample)``.

    Core integrators end at the model's ``sigma_min`` (at least the default ``SIGMA_END``) before their final
    Tweedie step. Text-to-image models: sample ``j`` is the pool's sample ``first + j`` and is drawn with prompt
    ``(first + j) mod P`` of ``model.prompts`` (one integrator call per prompt, so no integrator can mix up the
    conditioning of reordered samples).
    """
    x = model.sigma_max * torch.randn(n, *model.shape, generator=generator, device=device)
    kwargs = dict(generator=generator, sigma_end=max(model.sigma_min, SIGMA_END))
    if not model.prompt_scores:
        return integrate(integrator, model.score, x, model.sigma_max, steps, **kwargs)
    prompt = (first + torch.arange(n, device=x.device)) % len(model.prompt_scores)
    nfe = 0
    for i in prompt.unique().tolist():
        rows = prompt == i
        x[rows], nfe = integrate(integrator, model.prompt_scores[i], x[rows], model.sigma_max, steps, **kwargs)
    return x, nfe


def encode_to_model_space(model: LoadedModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Real ``images [N, C, H, W]`` in ``[-1, 1]`` -> samples in the model's space ``[N, *model.shape]``.

    Pixel-space models: unchanged. Latent models (a pipeline with a ``vae``): the VAE posterior mean, shifted and
    scaled as :func:`dlg_sampler.adapters.decode_latents` undoes it: ``(mean - shift_factor) * scaling_factor``.
    """
    vae = getattr(model.pipeline, "vae", None)
    if vae is None:
        return images
    param = next(vae.parameters())
    chunks = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            z = vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mean.float()
            if vae.config.get("shift_factor") is not None:
                z = z - vae.config.shift_factor
            chunks.append((z * vae.config.scaling_factor).cpu())
    return torch.cat(chunks)


def load_real_samples(spec: str, model: LoadedModel, image_size: int | None = None) -> torch.Tensor:
    """Real samples to mix into a pool, in the model's space ``[N, *model.shape]``: a preset's name (its training
    split, :mod:`dlg_sampler.presets`) or a folder of images (:func:`dlg_sampler.models.load_images`, resized to ``image_size``, by
    default the model's pixel size: the latent size times the VAE's downsampling for latent models), encoded by
    :func:`encode_to_model_space`."""
    from .presets import PRESETS

    if spec in PRESETS:
        images = PRESETS[spec].evaluator.load_data("train")
    else:
        vae = getattr(model.pipeline, "vae", None)
        scale = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        channels = model.shape[0] if vae is None else vae.config.in_channels
        images = load_images(spec, size=image_size or model.shape[-1] * scale, channels=channels)
    return encode_to_model_space(model, images)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def build_sample_pool(model: LoadedModel, out_dir: str | Path, size: int, *, integrator="karras_heun",
                      nfe: int = 40, steps: int | None = None, batch_size: int = 256, seed: int = 0,
                      shard_size: int = 1024, extra: torch.Tensor | None = None, model_id: str | None = None,
                      overwrite: bool = False, progress: bool = True,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Draw (or finish drawing) ``size`` samples of ``model`` into ``out_dir`` and return them.

    A text-to-image model is sampled with its prompts in turn (sample ``k`` with prompt ``k mod P``, see
    :func:`draw`) and classifier-free guidance, as users sample it; prompts and guidance scale are part of the
    configuration.

    Before drawing, prints the cost: ``size x NFE/sample`` score evaluations; then the time the rest will take,
    measured on the first batch (a timed probe that is kept; it includes one-time warm-up, so it errs high); a tqdm
    bar follows the rest. The folder holds ``manifest.json`` and ``shard-*.safetensors`` (``"samples"
    [k, *model.shape]``, float32); a folder written with another configuration is refused (``ValueError`` naming
    the differing settings) unless ``overwrite``.

    Args:
        model: the model (:func:`dlg_sampler.models.load_model`, or a ``LoadedModel`` around any score).
        out_dir: the pool folder.
        size: samples in the pool.
        integrator: a core integrator name, a diffusers scheduler class name (configured from
            ``model.pipeline.scheduler`` with ``timestep_spacing="trailing"``, so that its schedule starts at the top)
            or a scheduler instance (used as configured); it runs from ``sigma_max`` to 0.
        nfe: score evaluations per sample; sets ``steps`` (the most solver steps within it).
        steps: solver steps, instead of ``nfe`` (required for the adaptive ``"ode_rk45"``).
        batch_size: samples per integrator call (part of the configuration: it changes the random draws).
        seed: the pool's seed; shard ``k`` is drawn with :func:`shard_seed` ``(seed, k)``.
        shard_size: samples per shard, the unit that a stopped run keeps.
        extra: real samples already in the model's space ``[M, *model.shape]`` (see :func:`encode_to_model_space`),
            appended to the returned pool (not written to the folder).
        model_id: the model's name (folder, Hub id) recorded in the manifest, so a pool of another model is refused.
        overwrite: discard a pool of another configuration in ``out_dir``.
        progress: print the cost and show the progress bar.
        device: where noise is drawn (default: the pipeline's device, else CPU).

    Returns:
        ``[size (+ M), *model.shape]`` float32 on the CPU: the pool, then ``extra``.
    """
    for name, value in (("size", size), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if extra is not None and tuple(extra.shape[1:]) != tuple(model.shape):
        raise ValueError(f"extra samples have shape {list(extra.shape[1:])}, the model samples {list(model.shape)}: "
                         "encode real images into the model's space first (encode_to_model_space).")
    scheduler = make_integrator(integrator, model) if isinstance(integrator, str) else integrator
    if isinstance(integrator, str) and not isinstance(scheduler, str):
        # A scheduler named here runs its own schedule from the top level, as vanilla runs do in dlg-bench.
        scheduler = type(scheduler).from_config({**scheduler.config, "timestep_spacing": "trailing"})
    if steps is None:
        if isinstance(scheduler, str) and scheduler == "ode_rk45":
            raise ValueError("ode_rk45 is adaptive, its NFE cannot be budgeted: pass steps instead of nfe.")
        steps = steps_for_nfe(scheduler, nfe, dlg=False)
        if steps is None:
            raise ValueError(f"nfe={nfe} is less than one step of {integrator}: raise it.")
    device = device or getattr(model.pipeline, "device", None) or "cpu"
    batch_size = min(batch_size, shard_size)
    config = {"model": model_id, "shape": list(model.shape), "sigma_max": model.sigma_max,
              "integrator": scheduler if isinstance(scheduler, str) else
              {type(scheduler).__name__: json.loads(scheduler.to_json_string())},
              "steps": steps, "seed": seed, "size": size, "shard_size": shard_size, "batch_size": batch_size}
    if model.prompts:
        config.update(prompts=list(model.prompts), guidance_scale=model.guidance_scale)
    writer = ShardWriter(out_dir, config, overwrite=overwrite)
    for warning in writer.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    remaining = size - writer.count
    if remaining > 0:
        per_sample = count_nfe(scheduler, steps, dlg=False)
        adaptive = "at least " if isinstance(scheduler, str) and scheduler == "ode_rk45" else ""
        if progress:
            guided = (f" with {len(model.prompts)} prompts in turn, guidance scale {model.guidance_scale:g}"
                      + (" (2 network passes per NFE)" if model.guidance_scale > 1 else "")) if model.prompts else ""
            print(f"sample pool {out_dir}: {size} samples x {adaptive}{per_sample} NFE ({integrator}, {steps} steps) = "
                  f"{size * per_sample} NFE{guided}; {remaining} samples ({remaining * per_sample} NFE) to draw",
                  flush=True)
        bar = None
        for k, count in enumerate(shard_sizes(size, shard_size)):
            if k < len(writer.shards):
                continue
            generator = torch.Generator(device).manual_seed(shard_seed(seed, k))
            chunks, first = [], k * shard_size
            for n in shard_sizes(count, batch_size):
                start = time.perf_counter()
                x0 = draw(model, n, scheduler, steps, generator, device, first)[0].float().cpu()
                first += n
                if not torch.isfinite(x0).all():
                    raise ValueError(f"{integrator} diverged (non-finite samples in shard {k}): try another "
                                     "integrator or more steps.")
                chunks.append(x0)
                if bar is None:  # the first batch is the timed probe
                    rate = n / max(time.perf_counter() - start, 1e-9)
                    if progress:
                        print(f"measured {rate:.3g} samples/s on the first batch: about "
                              f"{_duration((remaining - n) / rate)} for the rest", flush=True)
                    bar = tqdm(total=size, initial=writer.count, disable=not progress, desc="sample pool",
                               unit="sample", mininterval=5)
                bar.update(n)
            writer.write(torch.cat(chunks), {"shard_seed": shard_seed(seed, k)})
        bar.close()
    pool = read_samples(out_dir)
    if extra is not None:
        pool = torch.cat([pool, extra.float().cpu()])
    return pool
