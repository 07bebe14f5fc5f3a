"""Console scripts: ``dlg-sample`` (DLG samples from a pretrained model) and ``dlg-train-classifier``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import digits
from .classifier import NoiseClassifier, train_noise_classifier
from .integrators import INTEGRATORS, steps_for_nfe
from .parallel import cpu_processes, process_seed
from .models import image_files, load_images, load_model, make_integrator

DIGITS = "digits"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, except where there is none to show (``None``, ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _check_device(device: str | None, parser: argparse.ArgumentParser) -> None:
    """Refuse a ``--device`` this torch build or machine cannot use, before anything loads."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device!r} is not a device name: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            parser.error(f"--device {device}: this torch {torch.__version__} is a CPU-only build. Install a CUDA "
                         "build of torch first (the command for your CUDA version is on "
                         "https://pytorch.org/get-started/locally/), or use --device cpu")
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: torch sees no CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES), "
                         "or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {device}: MPS is not available in this torch build or machine; use --device cpu")


def _check_writable(path: str | Path, flag: str, parser: argparse.ArgumentParser, *, folder: bool) -> None:
    """Refuse an output ``path`` (a file, or a ``folder``) that cannot be written, before any compute: its nearest
    existing folder must take a new file, and an existing file must be writable. Creates nothing."""
    path = Path(path)
    if not folder and path.is_dir():
        parser.error(f"{flag} {path} is a folder, not a file; pass a file path")
    if folder and path.exists() and not path.is_dir():
        parser.error(f"{flag} {path} is a file, not a folder; pass a folder path")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        parser.error(f"{flag} {path}: {existing} is a file, so nothing can be written under it; pass another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
        if path.is_file() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        parser.error(f"{flag} {path}: cannot write there ({err.strerror or err}); pass a writable path")


# ---------------------------------------------------------------------------------------------------------------
# dlg-train-classifier


def train_classifier_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlg-train-classifier",
        description="Train a noise classifier p(sigma_i | x) for a diffusion model's sigma range (resumable).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data", default=DIGITS,
                   help="clean training images: 'digits' (the shipped preset's training split), or a folder of "
                        "images (searched recursively, so a datasets-style imagefolder with class subfolders works)")
    p.add_argument("--model", default=None,
                   help="the diffusion model whose sigma range and sample shape the classifier gets (a diffusers "
                        "folder or Hub id); default: the shipped digits model for --data digits")
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
    g = p.add_argument_group("training on the model's own samples (no training data needed)")
    g.add_argument("--from-model", default=None, metavar="MODEL",
                   help="train on a pool of this model's own samples instead of --data: a diffusers folder or Hub id "
                        "('digits': the shipped digits model); for latent models pool and classifier are latents")
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
    g.add_argument("--mix-data", default=None, metavar="FOLDER|digits",
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
    from accelerate import Accelerator, PartialState

    parser = train_classifier_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} is a file; pass a folder path.")
    _check_writable(out, "--out", parser, folder=True)
    _check_device(args.device, parser)
    for flag, folder in (("--data", args.data if args.from_model is None else DIGITS), ("--mix-data", args.mix_data)):
        if folder not in (None, DIGITS):
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
    _positive(args.guidance_scale, "--guidance-scale", parser)
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None
    pool_model = digits.PIPELINE_DIR if args.from_model == DIGITS else args.from_model
    model_spec = pool_model or args.model or (digits.PIPELINE_DIR if args.data == DIGITS else None)
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
        from .pool import build_sample_pool, load_real_samples

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
        is_digits = Path(pool_model).resolve() == digits.PIPELINE_DIR.resolve()
        held_out = digits.load_digits_data("test") if is_digits else None
    elif args.data == DIGITS:
        data, held_out = digits.load_digits_data("train"), digits.load_digits_data("test")
    else:
        from .pool import load_real_samples

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


# ---------------------------------------------------------------------------------------------------------------
# dlg-sample

#: DLG settings of the shipped digits preset (eta 0.1 keeps the chains near sigma ~0.7).
DIGITS_PRESET = {"step_size": 0.1, "gibbs_steps": 2, "nfe": 10}


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlg-sample",
        description="Draw samples from a pretrained diffusion model with Denoising Langevin Gibbs (DLG). With no "
                    "arguments: the shipped digits model and classifier, compared with the vanilla integrator.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default=None, help="diffusers pipeline folder, Hub repo id or score_sde checkpoint "
                                                 "(default: the shipped digits model)")
    p.add_argument("--classifier", default=None, help="NoiseClassifier folder or Hub repo id (default: the shipped "
                                                      "digits classifier with the digits model)")
    g = p.add_argument_group("score_sde checkpoints (--model checkpoint_*.pth): the values of the model's config")
    g.add_argument("--score-sde-net", default=None, metavar="MODULE:FUNCTION",
                   help="builds the untrained network: FUNCTION() of MODULE, imported from the current directory "
                        "first (e.g. my_models:build_ncsnpp for ./my_models.py); MODULE may be a .py path")
    g.add_argument("--sde", default="vp", choices=["vp", "subvp", "ve"], help="the SDE the model was trained with")
    g.add_argument("--shape", type=int, nargs="+", default=None, metavar="C H W", help="sample shape")
    g.add_argument("--beta-min", type=float, default=0.1, help="vp / subvp: config.model.beta_min")
    g.add_argument("--beta-max", type=float, default=20.0, help="vp / subvp: config.model.beta_max")
    g.add_argument("--sde-sigma-min", type=float, default=0.01, help="ve: config.model.sigma_min")
    g.add_argument("--sde-sigma-max", type=float, default=50.0, help="ve: config.model.sigma_max (CIFAR-10: 50, "
                                                                       "CelebA-HQ-256: 348)")
    g.add_argument("--continuous", action=argparse.BooleanOptionalAction, default=True,
                   help="config.training.continuous: the network takes continuous times (--no-continuous: "
                        "discrete labels, as NCSN / DDPM-style score_sde models)")
    p.add_argument("--integrator", default="karras_heun",
                   help="denoising integrator: one of the core names or a diffusers scheduler class name "
                        "(configured from the pipeline's scheduler), e.g. DPMSolverMultistepScheduler")
    p.add_argument("--nfe", type=int, default=None, help="network evaluations per sample (Gibbs + denoising + "
                                                         "Tweedie); sets --denoise-steps (default 10 for digits)")
    p.add_argument("--denoise-steps", type=int, default=None, help="denoising solver steps (instead of --nfe)")
    p.add_argument("--gibbs-steps", type=int, default=None, help="Gibbs steps per batch (default 2)")
    p.add_argument("--step-size", type=float, default=None, help="Langevin step size eta (default 0.1); it sets "
                                                                 "the chains' working noise level")
    p.add_argument("--chains", type=int, default=256, help="persistent chains (at most --n are used)")
    p.add_argument("--n", type=int, default=256, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the chains (each process of accelerate launch derives "
                                                       "its own)")
    p.add_argument("--out", default="samples.png", help="PNG grid (the raw samples go next to it as .safetensors)")
    p.add_argument("--out-dir", default=None, help="write resumable shards + manifest here instead of --out")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard with --out-dir")
    p.add_argument("--png", action="store_true", help="with --out-dir, also write one PNG grid per shard")
    p.add_argument("--overwrite", action="store_true", help="with --out-dir, discard a previous run there")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the vanilla integrator at the same NFE and compare (default: on for digits)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if torch sees one, "
                                                  "else the CPU; under accelerate launch: the process's own)")
    return p


def _positive(value, name: str, parser: argparse.ArgumentParser) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        parser.error(f"{name} must be positive, got {value}")


def _denoise_steps(integrator, budget: int, gibbs: int, name: str) -> int:
    """The denoising steps that fit ``--nfe budget`` after ``gibbs`` Gibbs steps; exits naming the minimum."""
    steps = steps_for_nfe(integrator, budget - gibbs, dlg=True) if budget > gibbs else None
    if steps is None:
        minimum = gibbs + min(n for n in range(1, 20) if steps_for_nfe(integrator, n, dlg=True))
        sys.exit(f"error: --nfe {budget} leaves no room for denoising after {gibbs} Gibbs steps: {name} needs at "
                 f"least --nfe {minimum} ({gibbs} Gibbs + denoising + Tweedie); raise --nfe or lower --gibbs-steps.")
    return steps


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """``images [N, C, H, W]`` in ``[-1, 1]`` -> one square-ish, padded PNG grid (:func:`~dlg_sampler.images.image_grid`)."""
    from .images import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)


def sample_main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from .models import load_classifier
    from .sampler import DLGSampler
    from .shards import ShardWriter, shard_sizes

    parser = sample_parser()
    args = parser.parse_args(argv)
    for name in ("nfe", "denoise_steps", "gibbs_steps", "step_size", "chains", "n", "shard_size"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"), parser)
    if args.nfe is not None and args.denoise_steps is not None:
        parser.error("pass --nfe or --denoise-steps, not both")
    preset = args.model is None
    if preset and args.classifier is not None:
        parser.error("--classifier needs --model (the shipped classifier belongs to the shipped model)")
    if not preset and args.classifier is None:
        parser.error("--model needs --classifier: a noise classifier for that model (train one with "
                     "dlg-train-classifier --model MODEL --data IMAGES --out FOLDER)")
    if args.out_dir is None and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; pass a .png file path (or --out-dir for shards)")
    if args.out_dir is None:
        _check_writable(args.out, "--out", parser, folder=False)
    else:
        _check_writable(args.out_dir, "--out-dir", parser, folder=True)
    _check_device(args.device, parser)
    if args.denoise_steps is None and args.integrator in INTEGRATORS:  # scheduler names: once configured, below
        if args.integrator == "ode_rk45":
            sys.exit("error: ode_rk45 is adaptive, its NFE cannot be budgeted: pass --denoise-steps instead of --nfe.")
        _denoise_steps(args.integrator, args.nfe or DIGITS_PRESET["nfe"],
                       args.gibbs_steps or DIGITS_PRESET["gibbs_steps"], args.integrator)
    # One process, or one of `accelerate launch --num_processes K`: own device, own chains, own share of n.
    accelerator = Accelerator(cpu=cpu_processes(args.device))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = args.device or accelerator.device
    seed = process_seed(args.seed, rank, world)
    n = args.n // world + (rank < args.n % world)
    torch.manual_seed(seed)
    score_sde_kwargs = {"beta_min": args.beta_min, "beta_max": args.beta_max, "sigma_min": args.sde_sigma_min,
                        "sigma_max": args.sde_sigma_max, "continuous": args.continuous}
    try:
        classifier = load_classifier(digits.CLASSIFIER_DIR if preset else args.classifier, device)
        model = load_model(str(digits.PIPELINE_DIR if preset else args.model), score_sde_net=args.score_sde_net,
                           sde=args.sde, shape=tuple(args.shape) if args.shape else None,
                           score_sde_kwargs=score_sde_kwargs, device=device)
        integrator = make_integrator(args.integrator, model)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if model.prompts:
        sys.exit(f"error: --model {args.model} is a text-to-image pipeline; dlg-sample draws from unconditional "
                 "models. Sample it with DLGPipeline.from_pipe(pipe, classifier=...) (examples/text_to_image.py).")
    gibbs = args.gibbs_steps or DIGITS_PRESET["gibbs_steps"]
    if args.denoise_steps is not None:
        steps = args.denoise_steps
    else:
        budget = args.nfe or DIGITS_PRESET["nfe"]
        steps = _denoise_steps(integrator, budget, gibbs, args.integrator)
    try:
        sampler = DLGSampler(model.score, classifier, classifier.levels, shape=model.shape,
                             num_chains=min(args.chains, max(n, 1)), integrator=integrator, denoise_steps=steps,
                             gibbs_steps=gibbs, step_size=args.step_size or DIGITS_PRESET["step_size"],
                             seed=seed, device=device, progress=main)
    except ValueError as err:
        sys.exit(f"error: {err}")

    start = time.perf_counter()
    samples = None
    with accelerator.autocast():
        if args.out_dir is not None:
            config = {"model": str(args.model or "digits"), "classifier": str(args.classifier or "digits"),
                      "integrator": args.integrator, "denoise_steps": steps, "gibbs_steps": gibbs,
                      "step_size": sampler.step_size, "chains": sampler.num_chains, "n": args.n, "seed": args.seed,
                      "shard_size": args.shard_size, "processes": world}
            try:
                writer = ShardWriter(args.out_dir, config, overwrite=args.overwrite,
                                     prefix="" if world == 1 else f"p{rank}-")
            except ValueError as err:
                sys.exit(f"error: {err}")
            for warning in writer.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            state = writer.last_state()
            if state is not None:
                sampler.load_state_dict(state)
                print(f"resuming {args.out_dir}: {writer.count} of {n} samples already written"
                      + (f" by process {rank}" if world > 1 else ""))
            for k, size in enumerate(shard_sizes(n, args.shard_size)):
                if k < len(writer.shards):
                    continue
                batch = sampler.sample(size)
                path = writer.write(batch, sampler.state_dict())
                if args.png:
                    _save_grid(model.decode(batch), path.with_suffix(".png"))
        elif n > 0:
            samples = sampler.sample(n)
    if args.out_dir is None:
        gathered = gather_object([samples.cpu()] if samples is not None else [])
        samples = torch.cat(gathered)
    accelerator.wait_for_everyone()
    if not main:
        return
    wall = time.perf_counter() - start
    st = sampler.stats
    nfe = st["nfe_per_sample"]
    line = (f"DLG {args.integrator}: {args.n} samples ({world} process{'es' if world > 1 else ''}), NFE/sample "
            f"{nfe['total']:.2f} (gibbs {nfe['gibbs']:.2f} + denoise {nfe['denoise']:.2f} + tweedie "
            f"{nfe['tweedie']:.2f}; warm-up {st['warmup_nfe_per_chain']:.0f} per chain, once), selected sigma "
            f"{st['selected_sigma_mean']:.3f}, wall {wall:.1f}s")
    if args.out_dir is not None:
        print(line)
        print(f"wrote {args.n} samples to {args.out_dir}")
        return
    out = Path(args.out)
    images = model.decode(samples.to(device))
    try:
        _save_grid(images, out)
        save_file({"samples": samples.contiguous().clone(), "images": images.contiguous().cpu().clone()},
                  str(out.with_suffix(".safetensors")))
    except OSError as err:
        sys.exit(f"error: cannot write {out} ({err.strerror}): pass a writable --out path.")
    if preset:
        line += "; " + _quality(digits.DigitsEvaluator().evaluate(images.cpu()))
    print(line)
    if preset if args.compare is None else args.compare:
        _print_vanilla(model, integrator, args, round(nfe["total"]), preset, device)
    print(f"wrote {out} and {out.with_suffix('.safetensors')}")


def _quality(q: dict) -> str:
    return (f"FD {q['fd']:.3f}, precision {q['precision']:.2f}, recall {q['recall']:.2f}, "
            f"classes {round(q['coverage'] * 10)}/10 (entropy {q['entropy']:.3f})")


def _print_vanilla(model, integrator, args, nfe: int, preset: bool, device) -> None:
    """The same integrator from pure noise at sigma_max with at most the same NFE per sample."""
    from .integrators import integrate

    if not isinstance(integrator, str):  # its own schedule must start at the top level (see bench.make_scheduler)
        integrator = type(integrator).from_config({**integrator.config, "timestep_spacing": "trailing"})
    steps = steps_for_nfe(integrator, nfe, dlg=False)
    if steps is None:
        print(f"vanilla {args.integrator}: cannot run within {nfe} NFE per sample")
        return
    g = torch.Generator(device).manual_seed(args.seed)
    x = model.sigma_max * torch.randn(args.n, *model.shape, generator=g, device=device)
    start = time.perf_counter()
    x0, used = integrate(integrator, model.score, x, model.sigma_max, steps, generator=g)
    line = f"vanilla {args.integrator}: NFE/sample {used}, wall {time.perf_counter() - start:.1f}s"
    if preset:
        line += "; " + _quality(digits.DigitsEvaluator().evaluate(model.decode(x0)))
    print(line)
