"""``dlg-train-classifier``: a noise classifier for a model, from images or from the model's own samples."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from .. import presets
from ..classifier import NoiseClassifier, train_noise_classifier
from ..models import image_files, load_images, load_model
from ..parallel import cpu_processes
from .common import (DIGITS, ArgumentParser, HelpFormatter, add_threads_argument, check_device, check_writable,
                     choose_threads, positive)


def train_classifier_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="dlg-train-classifier",
        description="Train a noise classifier p(sigma_i | x) for a diffusion model's sigma range (resumable).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", default=DIGITS,
                   help=f"clean training images: a preset's training split ({' or '.join(presets.PRESETS)}), or a "
                        "folder of images (searched recursively, so a datasets-style imagefolder with class "
                        "subfolders works)")
    p.add_argument("--model", default=None,
                   help="the diffusion model whose sigma range and sample shape the classifier gets (a diffusers "
                        "folder or Hub id); default: the preset's model for --data PRESET")
    p.add_argument("--sigma-min", type=float, default=None, help="override the grid's lowest level")
    p.add_argument("--sigma-max", type=float, default=None, help="override the grid's highest level")
    p.add_argument("--num-levels", type=int, default=1000, help="noise levels of the geometric grid (the paper: 1000)")
    p.add_argument("--image-size", type=int, default=None, help="resize folder images (default: the model's size)")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128], help="CNN conv widths")
    p.add_argument("--hidden", type=int, default=128, help="width of the classifier's head")
    p.add_argument("--steps", type=int, default=6000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=256, help="clean images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 1%%)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights, batches, levels and noise")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--out", required=True, help="output folder (save_pretrained); checkpoints go to OUT/checkpoints")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the result to this Hub repo")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="batches per optimiser step (under accelerate launch: per process)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if torch sees one, "
                                                  "else the CPU; under accelerate launch: the process's own)")
    add_threads_argument(p)
    g = p.add_argument_group("training on the model's own samples (no training data needed)")
    g.add_argument("--from-model", default=None, metavar="MODEL",
                   help="train on a pool of this model's own samples instead of --data: a diffusers folder or Hub id "
                        "(or a preset's name); for latent models pool and classifier are latents")
    g.add_argument("--pool-size", type=int, default=10000, help="samples in the pool")
    g.add_argument("--pool-nfe", type=int, default=40, help="network evaluations per pool sample")
    g.add_argument("--pool-integrator", default="karras_heun",
                   help="a core integrator name or a diffusers scheduler class name (configured from the pipeline's "
                        "scheduler), run from sigma_max")
    g.add_argument("--pool-dir", default=None, help="resumable pool shards (default OUT/pool): rerun the same command "
                                                    "after a stop to continue")
    g.add_argument("--pool-shard-size", type=int, default=1024, help="samples per pool shard")
    g.add_argument("--pool-batch-size", type=int, default=256, help="samples per integrator call")
    g.add_argument("--overwrite-pool", action="store_true", help="discard a pool of other settings in --pool-dir")
    g.add_argument("--mix-data", default=None, metavar="FOLDER|PRESET",
                   help="real samples to add to the pool (images; encoded by the VAE for latent models)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="text-to-image models: the prompts the pool is drawn with in turn, one per line (default: 16 "
                        "everyday prompts, dlg_sampler.models.DEFAULT_PROMPTS); pass the prompts you will sample with")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="text-to-image models: the pool's classifier-free guidance scale (default: the pipeline's "
                        "own, 7.5 for Stable Diffusion); use the scale you will sample with")
    return p


def _read_prompts(path: str) -> list[str]:
    """The prompts of a ``--prompts`` file: one per line, surrounding spaces and blank lines dropped."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        sys.exit(f"error: --prompts {path}: cannot read it ({getattr(err, 'strerror', None) or err}); pass a text "
                 "file with one prompt per line.")
    if not prompts:
        sys.exit(f"error: --prompts {path} holds no prompt; write one prompt per line.")
    return prompts


def train_classifier_main(argv: list[str] | None = None) -> None:
    """``dlg-train-classifier``; Ctrl-C ends it with one line saying what was kept and how to resume (exit 130)."""
    try:
        _train_classifier(argv)
    except KeyboardInterrupt:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = train_classifier_parser().parse_args(argv)
        out = Path(args.out)
        kept = [f"{path} ({what})" for path, what in ((out / "checkpoints", "training checkpoints"),
                                                       (Path(args.pool_dir or out / "pool"), "the pool's shards"))
                if path.is_dir() and any(path.iterdir())]
        resume = shlex.join(["dlg-train-classifier", *(a for a in argv if a != "--overwrite-pool")])
        print(f"\ninterrupted: {'kept ' + ' and '.join(kept) if kept else 'nothing was kept yet'}; "
              f"{'resume' if kept else 'start again'} with: {resume}", file=sys.stderr)
        sys.exit(130)


def _train_classifier(argv: list[str] | None) -> None:
    from accelerate import Accelerator, PartialState

    parser = train_classifier_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} is a file; pass a folder path.")
    check_writable(out, "--out", parser, folder=True)
    check_device(args.device, parser)
    for flag, folder in (("--data", args.data if args.from_model is None else DIGITS), ("--mix-data", args.mix_data)):
        if folder is not None and folder not in presets.PRESETS:
            try:
                image_files(folder)
            except ValueError as err:
                sys.exit(f"error: {flag}: {err}")
    if args.from_model is not None and (args.model is not None or args.data != DIGITS):
        sys.exit("error: --from-model names the model and draws the data: drop --model, and pass real images as "
                 "--mix-data instead of --data.")
    if args.from_model is None and (args.prompts is not None or args.guidance_scale is not None):
        sys.exit("error: --prompts and --guidance-scale set how --from-model samples a text-to-image model: add "
                 "--from-model MODEL, or drop them.")
    positive(args.guidance_scale, "--guidance-scale", parser)
    positive(args.threads, "--threads", parser)
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None
    try:
        pool_model = presets.pipeline_path(args.from_model) if args.from_model in presets.PRESETS else args.from_model
        model_spec = pool_model or args.model or (presets.pipeline_path(args.data) if args.data in presets.PRESETS
                                                  else None)
    except ValueError as err:
        sys.exit(f"error: {err}")
    shape, sigma_min, sigma_max = None, args.sigma_min, args.sigma_max
    if model_spec is not None:
        # A pool is drawn on this process's device (GPU where there is one).
        state = PartialState(cpu=cpu_processes(args.device)) if pool_model else None
        try:
            model = load_model(str(model_spec), prompts=prompts, guidance_scale=args.guidance_scale,
                               device=(args.device or state.device) if state else "cpu")
        except ValueError as err:
            sys.exit(f"error: {err}")
        shape, sigma_min, sigma_max = model.shape, sigma_min or model.sigma_min, sigma_max or model.sigma_max
    if pool_model is not None:
        from ..pool import build_sample_pool, load_real_samples

        choose_threads(args.threads, args.pool_batch_size * math.prod(shape))
        try:
            extra = load_real_samples(args.mix_data, model, args.image_size) if args.mix_data else None
            with state.main_process_first():  # one process draws the pool, the others then read it
                data = build_sample_pool(model, args.pool_dir or out / "pool", args.pool_size,
                                         integrator=args.pool_integrator, nfe=args.pool_nfe,
                                         batch_size=args.pool_batch_size, seed=args.seed,
                                         shard_size=args.pool_shard_size, extra=extra, model_id=str(args.from_model),
                                         overwrite=args.overwrite_pool, progress=state.is_main_process)
        except ValueError as err:  # the shard writer's advice names dlg-sample's flags: give this command's
            sys.exit(f"error: {err}".replace("--out-dir", "--pool-dir").replace("--overwrite", "--overwrite-pool"))
        held_out = presets.PRESETS[args.from_model].evaluator.load_data("test") \
            if args.from_model in presets.PRESETS else None
    elif args.data in presets.PRESETS:
        load_data = presets.PRESETS[args.data].evaluator.load_data
        data, held_out = load_data("train"), load_data("test")
    else:
        from ..pool import load_real_samples

        try:  # in the model's space: VAE latents for latent models
            data = load_real_samples(args.data, model, args.image_size) if shape else \
                load_images(args.data, size=args.image_size)
        except ValueError as err:
            sys.exit(f"error: --data: {err}")
        held_out = None
    if shape is not None and tuple(data.shape[1:]) != tuple(shape):
        sys.exit(f"error: the training images have shape {list(data.shape[1:])} but the model samples "
                 f"{list(shape)}: pass --image-size or images with the model's channel count.")
    if sigma_min is None or sigma_max is None:
        sys.exit("error: the noise grid is unknown: pass --model (the diffusion model the classifier is for) or "
                 "both --sigma-min and --sigma-max.")
    choose_threads(args.threads, args.batch_size * data[0].numel())
    torch.manual_seed(args.seed)  # the initial weights follow --seed too
    classifier = NoiseClassifier(sigma_min, sigma_max, args.num_levels, sample_shape=list(data.shape[1:]),
                                 channels=args.channels, hidden=args.hidden)
    # One process, or data-parallel under `accelerate launch` (gradients averaged, main process saves).
    accelerator = Accelerator(cpu=cpu_processes(args.device),
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    if accelerator.is_main_process:
        print(f"noise classifier for {classifier.levels!r} on {len(data)} images of shape {list(data.shape[1:])}"
              f" ({accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''})")
    metrics = train_noise_classifier(classifier, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     seed=args.seed, eval_data=held_out if accelerator.is_main_process else None,
                                     checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every,
                                     accelerator=accelerator)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    classifier.save_pretrained(out)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"saved to {out}")
    if args.push_to_hub:
        classifier.push_to_hub(args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")



main = train_classifier_main
