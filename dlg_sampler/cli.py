"""Console scripts: ``dlg-sample`` (DLG samples from a pretrained model), ``dlg-tune`` (what a budget chooses) and
``dlg-train-classifier``."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import digits
from .classifier import NoiseClassifier, train_noise_classifier
from .diagnostics import ess_fraction
from .integrators import INTEGRATORS, count_nfe, integrate, steps_for_nfe
from .models import image_files, load_images, load_model, make_integrator
from .parallel import cpu_processes, process_seed
from .sampler import KERNELS, RESTART_SCALE, DLGSampler

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

#: The budget when ``--nfe`` is not given: model evaluations per sample, everything counted.
DEFAULT_NFE = 10
#: The few-step peers the summary measures at DLG's total NFE: label -> (diffusers scheduler, config overrides), each
#: configured from the pipeline's scheduler with trailing spacing (its schedule starts at sigma_max, where the noise is).
PEERS = {"DPM-Solver++ 2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
         "UniPC": ("UniPCMultistepScheduler", {})}


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--classifier`` and the score_sde options, shared by ``dlg-sample`` and ``dlg-tune``."""
    p.add_argument("--model", default=None, help="diffusers pipeline folder, Hub repo id or score_sde checkpoint "
                                                 "(default: the shipped digits model)")
    p.add_argument("--classifier", default=None, help="NoiseClassifier folder or Hub repo id, needed by the Gibbs "
                                                      "kernel (default: the shipped digits classifier with the digits "
                                                      "model; none with --model: the restart kernel needs none)")
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


def _add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if torch sees one, "
                                                  "else the CPU; under accelerate launch: the process's own)")


def _check_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Whether the run is the shipped preset; refuses a classifier without its model, and the Gibbs kernel
    without a classifier (the restart kernel needs none)."""
    preset = args.model is None
    if preset and args.classifier is not None:
        parser.error("--classifier needs --model (the shipped classifier belongs to the shipped model)")
    if not preset and args.classifier is None and getattr(args, "kernel", "restart") == "gibbs":
        parser.error("--kernel gibbs needs --classifier: a noise classifier for that model (train one with "
                     "dlg-train-classifier --model MODEL --data IMAGES --out FOLDER), or use the restart kernel, "
                     "which needs none")
    return preset


def _load(args: argparse.Namespace, device, preset: bool):
    """The model (:class:`~dlg_sampler.models.LoadedModel`) and its classifier (``None`` when none was named: the
    restart kernel runs on the model's trained range); exits with the loader's message."""
    from .models import load_classifier

    score_sde_kwargs = {"beta_min": args.beta_min, "beta_max": args.beta_max, "sigma_min": args.sde_sigma_min,
                        "sigma_max": args.sde_sigma_max, "continuous": args.continuous}
    try:
        spec = digits.CLASSIFIER_DIR if preset else args.classifier
        classifier = None if spec is None else load_classifier(spec, device)
        model = load_model(str(digits.PIPELINE_DIR if preset else args.model), score_sde_net=args.score_sde_net,
                           sde=args.sde, shape=tuple(args.shape) if args.shape else None,
                           score_sde_kwargs=score_sde_kwargs, device=device)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if model.prompts:
        sys.exit(f"error: --model {args.model} is a text-to-image pipeline; dlg-sample draws from unconditional "
                 "models. Sample it with DLGPipeline.from_pipe(pipe, classifier=...) (examples/text_to_image.py).")
    return model, classifier


def _budget_error(err: ValueError) -> str:
    """``for_budget``'s budget message in the command line's words."""
    return (f"error: {err}".replace("raise nfe to", "raise --nfe to")
            .replace("draw more samples per chain", "draw more samples per chain (more --n or fewer --chains)"))


#: The sampler's setting names in its advice, and the flags that set them.
_FLAG_WORDS = {"num_chains": "--chains", "kernel='restart'": "--kernel restart", "restart_sigma": "--restart-sigma",
               "step_size": "--step-size", "gibbs_steps": "--gibbs-steps"}


def _in_flag_words(message: str) -> str:
    """A sampler warning's advice in the command line's words (``num_chains`` -> ``--chains`` ...)."""
    for name, flag in _FLAG_WORDS.items():
        message = message.replace(name, flag)
    return message


def sample_parser() -> argparse.ArgumentParser:
    sampler_defaults = inspect.signature(DLGSampler).parameters
    p = argparse.ArgumentParser(
        prog="dlg-sample",
        description="Draw samples from a pretrained diffusion model with Denoising MCMC: persistent chains, each "
                    "output lifted by the restart kernel (or the paper's Langevin-Gibbs kernel) and denoised. The "
                    "settings follow from the budget --nfe (dlg-tune shows them). With no arguments: the shipped "
                    "digits model and classifier, compared at the same total NFE with the vanilla integrator and "
                    "diffusers' DPM-Solver++ 2M and UniPC.",
        formatter_class=_HelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("--nfe", type=int, default=None,
                   help=f"budget: model evaluations per sample, everything counted (warm-up, pilot, Gibbs, "
                        f"denoising, Tweedie); chooses the chains, the denoising steps and the restart level "
                        f"(default {DEFAULT_NFE})")
    k = p.add_argument_group("kernel settings (default: chosen from --nfe and --n; any given here wins)")
    k.add_argument("--kernel", default=None, choices=KERNELS,
                   help="chain kernel: restart (the default: lift each chain to S exactly, denoise back) or gibbs "
                        "(the paper's Langevin-Gibbs sweeps and min-sigma selection)")
    k.add_argument("--restart-sigma", type=float, default=None,
                   help=f"restart kernel: the lift level S (default: {RESTART_SCALE:g} x the data scale the warm-up "
                        "measures, raised where a short pilot on the model says consecutive outputs would keep a "
                        "lag-1 autocorrelation above 0.2; no pilot when --n is too small for one)")
    k.add_argument("--step-size", type=float, default=None,
                   help=f"gibbs kernel: Langevin step size eta (default {sampler_defaults['step_size'].default:g}, "
                        "the paper's); it sets the chains' working noise level")
    k.add_argument("--gibbs-steps", type=int, default=None, help="gibbs kernel: Gibbs steps per output (default 2)")
    k.add_argument("--denoise-steps", type=int, default=None,
                   help="denoising solver steps per output (instead of --nfe)")
    k.add_argument("--integrator", default="unipc",
                   help="denoising integrator: one of the core names or a diffusers scheduler class name "
                        "(configured from the pipeline's scheduler), e.g. UniPCMultistepScheduler")
    k.add_argument("--chains", type=int, default=None,
                   help="persistent chains (default: n / 20, few chains with many outputs each, as in the paper)")
    p.add_argument("--n", type=int, default=256, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the pilot and the chains (each process of accelerate "
                                                       "launch derives its own)")
    p.add_argument("--out", default="samples.png", help="PNG grid (the raw samples go next to it as .safetensors)")
    p.add_argument("--out-dir", default=None, help="write resumable shards + manifest here instead of --out")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard with --out-dir")
    p.add_argument("--png", action="store_true", help="with --out-dir, also write one PNG grid per shard")
    p.add_argument("--overwrite", action="store_true", help="with --out-dir, discard a previous run there")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the vanilla integrator and the diffusers peers at DLG's total NFE and compare "
                        "(default: on for digits)")
    _add_device_argument(p)
    return p


def _positive(value, name: str, parser: argparse.ArgumentParser) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        parser.error(f"{name} must be positive, got {value}")


def _kernel_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The kernel settings given on the command line (they win over the budget's choice); refuses a setting of the
    other kernel."""
    kernel = args.kernel or "restart"
    other = {"restart": [("--step-size", args.step_size), ("--gibbs-steps", args.gibbs_steps)],
             "gibbs": [("--restart-sigma", args.restart_sigma)]}[kernel]
    given = [flag for flag, value in other if value is not None]
    if given:
        parser.error(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} the "
                     f"{'gibbs' if kernel == 'restart' else 'restart'} kernel, but the {kernel} kernel is used: "
                     f"add --kernel {'gibbs' if kernel == 'restart' else 'restart'}, or drop "
                     f"{'it' if len(given) == 1 else 'them'}")
    flags = {"kernel": args.kernel, "restart_sigma": args.restart_sigma, "step_size": args.step_size,
             "gibbs_steps": args.gibbs_steps, "denoise_steps": args.denoise_steps, "integrator": args.integrator}
    return {k: v for k, v in flags.items() if v is not None}


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """``images [N, C, H, W]`` in ``[-1, 1]`` -> one square-ish, padded PNG grid (:func:`~dlg_sampler.images.image_grid`)."""
    from .images import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)


def _images(model, samples: torch.Tensor, device) -> torch.Tensor:
    """The one post-processing every sampler's samples get, before saving and scoring: decoded (latent models) and
    clamped to ``[-1, 1]``: ``[N, *shape] -> [N, C, H, W]``."""
    return model.decode(samples.to(device)).clamp(-1, 1)


def _tuning_record(sampler: DLGSampler) -> dict:
    """``sampler.tuning`` with the restart level in use (set at the warm-up when no pilot chose it)."""
    tuning = sampler.tuning
    return {**tuning, "settings": {**tuning["settings"], "restart_sigma": sampler.restart_sigma}}


def sample_main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from .shards import ShardWriter, shard_sizes
    from .tuning import plan_budget

    parser = sample_parser()
    args = parser.parse_args(argv)
    for name in ("nfe", "denoise_steps", "gibbs_steps", "step_size", "restart_sigma", "chains", "n", "shard_size"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"), parser)
    if args.nfe is not None and args.denoise_steps is not None:
        parser.error("pass --nfe or --denoise-steps, not both")
    overrides = _kernel_overrides(args, parser)
    preset = _check_model_flags(args, parser)
    if args.out_dir is None and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; pass a .png file path (or --out-dir for shards)")
    if args.out_dir is None:
        _check_writable(args.out, "--out", parser, folder=False)
    else:
        _check_writable(args.out_dir, "--out-dir", parser, folder=True)
    _check_device(args.device, parser)
    if args.integrator == "ode_rk45" and args.denoise_steps is None:
        sys.exit("error: ode_rk45 is adaptive, its NFE cannot be budgeted: pass --denoise-steps instead of --nfe.")
    # One process, or one of `accelerate launch --num_processes K`: own device, own chains, own share of n.
    accelerator = Accelerator(cpu=cpu_processes(args.device))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = args.device or accelerator.device
    seed = process_seed(args.seed, rank, world)
    n = args.n // world + (rank < args.n % world)
    nfe = args.nfe or DEFAULT_NFE
    if args.denoise_steps is None and args.integrator in INTEGRATORS:  # scheduler names: once configured, below
        try:  # the budget's arithmetic needs no model: a budget below the minimum is refused before loading
            plan_budget(nfe, max(n, 1), num_chains=args.chains, **overrides)
        except ValueError as err:
            sys.exit(_budget_error(err))
    torch.manual_seed(seed)
    model, classifier = _load(args, device, preset)
    try:
        integrator = make_integrator(args.integrator, model)
    except ValueError as err:
        sys.exit(f"error: {err}")
    overrides["integrator"] = integrator
    if args.denoise_steps is not None:  # the budget the given steps imply per output: it sizes the pilot
        nfe = count_nfe(integrator, args.denoise_steps, dlg=isinstance(integrator, str))

    start = time.perf_counter()
    writer = state = None
    if args.out_dir is not None:
        config = {"model": str(args.model or "digits"), "classifier": str(args.classifier or "digits"),
                  "nfe": None if args.denoise_steps is not None else nfe, "kernel": args.kernel,
                  "restart_sigma": args.restart_sigma, "step_size": args.step_size, "gibbs_steps": args.gibbs_steps,
                  "denoise_steps": args.denoise_steps, "integrator": args.integrator, "chains": args.chains,
                  "n": args.n, "seed": args.seed, "shard_size": args.shard_size, "processes": world, "tuning": None}
        try:
            writer = ShardWriter(args.out_dir, config, derived=("tuning",), overwrite=args.overwrite,
                                 prefix="" if world == 1 else f"p{rank}-")
        except ValueError as err:
            sys.exit(f"error: {err}")
        for warning in writer.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        state = writer.last_state()
    num_chains = args.chains
    if state is not None:  # the choice of the interrupted run, restored: no second pilot
        chosen = state["tuning"]["settings"]
        num_chains = chosen["num_chains"]
        overrides.update(denoise_steps=chosen["denoise_steps"], restart_sigma=state["restart_sigma"])
    try:
        sampler = DLGSampler.for_budget(model.score, classifier, shape=model.shape, nfe=nfe, n=max(n, 1),
                                        num_chains=num_chains, seed=seed, device=device, **overrides)
    except ValueError as err:
        sys.exit(_budget_error(err))
    if state is not None:
        sampler.load_state_dict(state)
        print(f"resuming {args.out_dir}: {writer.count} of {n} samples already written"
              + (f" by process {rank}" if world > 1 else ""))
    done = sampler.stats["model_evaluations"]  # the pilot's, or everything of the interrupted run
    remaining = n - (writer.count if writer is not None else 0)
    samples = torch.empty(0, *model.shape)
    # One bar over the whole job, in model evaluations: the pilot (done), the warm-up and every shard.
    with warnings.catch_warnings(record=True) as caught, \
            tqdm(total=done + sampler.planned_nfe(remaining), initial=done, disable=not main, unit="NFE",
                 unit_scale=True, desc="dlg-sample" + (f" (process 0 of {world})" if world > 1 else "")) as bar, \
            accelerator.autocast():
        if writer is not None:
            for k, size in enumerate(shard_sizes(n, args.shard_size)):
                if k < len(writer.shards):
                    continue
                batch = sampler.sample(size, progress_bar=bar)
                writer.config["tuning"] = _tuning_record(sampler)
                path = writer.write(batch, sampler.state_dict())
                if args.png:
                    _save_grid(_images(model, batch, device), path.with_suffix(".png"))
        elif n > 0:
            samples = sampler.sample(n, progress_bar=bar)
    for message in dict.fromkeys(str(w.message) for w in caught):  # e.g. outputs that are near-copies, once
        print(f"warning: {'' if world == 1 else f'process {rank}: '}{_in_flag_words(message)}", file=sys.stderr)
    wall = time.perf_counter() - start
    summary = _gather_stats(sampler, gather_object)
    if writer is None:
        samples = torch.cat(gather_object([samples.cpu()]))
    accelerator.wait_for_everyone()
    if not main:
        return
    print(_settings_line(sampler, args.integrator, summary, world))
    line = _cost_line(summary, wall, resumed=state is not None)
    if writer is not None:
        print(line)
        print(f"wrote {args.n} samples to {args.out_dir}")
        return
    out = Path(args.out)
    images = _images(model, samples, device)
    try:
        _save_grid(images, out)
        save_file({"samples": samples.contiguous().clone(), "images": images.contiguous().cpu().clone()},
                  str(out.with_suffix(".safetensors")))
    except OSError as err:
        sys.exit(f"error: cannot write {out} ({err.strerror}): pass a writable --out path.")
    evaluator = digits.DigitsEvaluator() if preset else None
    if evaluator is not None:
        line += "; " + _quality(evaluator.evaluate(images.cpu()))
        if world == 1 and sampler.stats["reinitialised"] == 0:
            line += "; " + _class_repeats(evaluator.predict(images.cpu()), sampler.num_chains)
    print(line)
    if preset if args.compare is None else args.compare:
        _compare(model, integrator, args, summary["nfe_per_sample"], evaluator, device)
    print(f"wrote {out} and {out.with_suffix('.safetensors')}")


def _gather_stats(sampler: DLGSampler, gather_object) -> dict:
    """The cost and mixing of every process's sampler together: evaluations, samples and chains summed, the split
    and the lag-1 autocorrelation weighted by samples (one process: its own ``.stats``)."""
    st = sampler.stats
    split = {k: v * st["samples"] for k, v in st["nfe_split"].items()} if st["samples"] else {}
    parts = gather_object([{"evaluations": st["model_evaluations"], "samples": st["samples"],
                            "chains": st["chains"], "split": split, "lag1": st["lag1_autocorr"]}])
    samples = sum(p["samples"] for p in parts)
    per = max(samples, 1)
    lag = [(p["lag1"], p["samples"]) for p in parts if p["lag1"] is not None]
    lag1 = sum(r * m for r, m in lag) / sum(m for _, m in lag) if lag and sum(m for _, m in lag) else None
    return {"nfe_per_sample": sum(p["evaluations"] for p in parts) / per,
            "nfe_split": {k: sum(p["split"].get(k, 0.0) for p in parts) / per for k in st["nfe_split"]},
            "model_evaluations": sum(p["evaluations"] for p in parts), "samples": samples,
            "chains": sum(p["chains"] for p in parts), "lag1_autocorr": lag1,
            "ess_fraction": None if lag1 is None else ess_fraction(lag1)}


def _settings_line(sampler: DLGSampler, integrator: str, summary: dict, world: int) -> str:
    """What ran: the kernel and its level, the denoiser, samples, chains and outputs per chain."""
    steps = f"{integrator} {sampler.denoise_steps} steps" + (" + Tweedie" if integrator in INTEGRATORS else "")
    if sampler.kernel == "restart":
        pilot = sampler.tuning["pilot"]
        source = ("given" if pilot is None else
                  f"{RESTART_SCALE:g} x the warm-up's data scale; n too small for a pilot" if not pilot["chains"] else
                  f"raised by the pilot to lag-1 {pilot['lag1']:.2f} on {pilot['chains']} chains"
                  if pilot["restart_sigma"] > pilot["rule_of_thumb"] else
                  f"{RESTART_SCALE:g} x the warm-up's data scale, checked by the pilot: lag-1 {pilot['lag1']:.2f} on "
                  f"{pilot['chains']} chains")
        kernel = f"restart kernel, S {sampler.restart_sigma:.3g} ({source})"
    else:
        kernel = (f"gibbs kernel, step size {sampler.step_size:g}, {sampler.gibbs_steps} Gibbs steps, selected sigma "
                  f"median {sampler.stats['selected_sigma_median']:.3g}")
    chains = summary["chains"]
    return (f"DLG {kernel}, {steps}: {summary['samples']} samples from {chains} chains, "
            f"{summary['samples'] / chains:.1f} outputs per chain ({world} process{'es' if world > 1 else ''})")


def _cost_line(summary: dict, wall: float, resumed: bool = False) -> str:
    """The whole cost per sample with its split, how much consecutive outputs share, and the wall time (of this run:
    a resumed one's pilot and warm-up were paid before)."""
    split = " + ".join(f"{k} {v:.2f}" for k, v in summary["nfe_split"].items() if v > 0)
    r = summary["lag1_autocorr"]
    mixing = ("lag-1 autocorrelation n/a (one output per chain)" if r is None else
              f"lag-1 autocorrelation {r:.2f} (worth {summary['ess_fraction']:.0%} as many independent samples)")
    return (f"DLG: NFE/sample {summary['nfe_per_sample']:.2f} in total, warm-up and pilot included ({split}; "
            f"{summary['model_evaluations']} model evaluations / {summary['samples']} samples), {mixing}, "
            f"wall {wall:.1f}s {'since resuming' if resumed else 'with warm-up'}")


def _class_repeats(labels: torch.Tensor, chains: int) -> str:
    """How often consecutive outputs of one chain show the same digit, against independent draws with the same
    class proportions (``sum p_k^2``): the pixel lag-1 autocorrelation misses a chain that keeps its digit.
    ``labels [N]`` in batch order (sample ``j`` from chain ``j % chains``)."""
    if len(labels) <= chains:
        return "digit repeats n/a (one output per chain)"
    same = (labels[chains:] == labels[:-chains]).double().mean()
    p = torch.bincount(labels).double() / len(labels)
    return (f"consecutive outputs of a chain show the same digit in {float(same):.0%} of pairs (independent "
            f"samples: {float((p * p).sum()):.0%})")


def _quality(q: dict) -> str:
    model = f"FD vs the model's own samples {q['fd_model']:.2f}, " if "fd_model" in q else ""
    return (f"{model}FD vs held-out digits {q['fd']:.2f}, precision {q['precision']:.2f}, recall {q['recall']:.2f}, "
            f"classes {round(q['coverage'] * 10)}/10 (entropy {q['entropy']:.3f})")


def _compare(model, integrator, args: argparse.Namespace, dlg_nfe: float, evaluator, device) -> None:
    """Vanilla runs from pure noise at sigma_max at the most steps whose NFE per sample does not exceed DLG's total:
    the integrator DLG denoised with, then the diffusers peers; same noise, same post-processing as DLG's samples."""
    import diffusers

    budget = math.floor(dlg_nfe + 1e-9)
    if not isinstance(integrator, str):  # its own schedule must start at the top level, where the noise is
        integrator = type(integrator).from_config({**integrator.config, "timestep_spacing": "trailing"})
    runs = [(f"vanilla {args.integrator} from sigma_max", integrator)]
    base = getattr(model.pipeline, "scheduler", None)
    for label, (name, extra) in PEERS.items():
        if name == args.integrator:  # the vanilla run is that peer already
            continue
        if base is None:
            print(f"peer {label}: skipped, no diffusers pipeline scheduler to configure it from")
            continue
        runs.append((f"peer {label} (diffusers, trailing spacing)",
                     getattr(diffusers, name).from_config({**base.config, "timestep_spacing": "trailing", **extra})))
    print(f"at DLG's total NFE ({budget} per sample, the most steps that fit {dlg_nfe:.2f}):")
    for label, sampler in runs:
        steps = steps_for_nfe(sampler, budget, dlg=False)
        if steps is None:
            print(f"{label}: cannot run within {budget} NFE per sample")
            continue
        g = torch.Generator(device).manual_seed(args.seed)
        x = model.sigma_max * torch.randn(args.n, *model.shape, generator=g, device=device)
        start = time.perf_counter()
        x0, used = integrate(sampler, model.score, x, model.sigma_max, steps, generator=g)
        line = f"{label}, {steps} steps: NFE/sample {used}, wall {time.perf_counter() - start:.1f}s"
        if evaluator is not None:
            line += "; " + _quality(evaluator.evaluate(_images(model, x0, device).cpu()))
        print(line)


# ---------------------------------------------------------------------------------------------------------------
# dlg-tune


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlg-tune",
        description="Show what DLGSampler.for_budget (and dlg-sample, for one process with the same --nfe, --n, "
                    "--chains and --seed) chooses for a budget: the settings, the pilot's measurements on the model "
                    "and the predicted total NFE per sample. With no model: the shipped digits preset.",
        formatter_class=_HelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("--nfe", type=int, default=DEFAULT_NFE,
                   help="budget: model evaluations per sample, everything counted (warm-up, pilot, denoising, Tweedie)")
    p.add_argument("--n", type=int, default=10000, help="samples the run will draw (warm-up and pilot are "
                                                        "amortised over them)")
    p.add_argument("--chains", type=int, default=None, help="persistent chains (default: n / 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the pilot: the choice is deterministic under it")
    p.add_argument("--json", action="store_true", help="print the choice as JSON (the sampler's .tuning)")
    _add_device_argument(p)
    return p


def tune_main(argv: list[str] | None = None) -> None:
    import json

    from .tuning import plan_budget

    parser = tune_parser()
    args = parser.parse_args(argv)
    for name in ("nfe", "n", "chains"):
        _positive(getattr(args, name), "--" + name, parser)
    preset = _check_model_flags(args, parser)
    _check_device(args.device, parser)
    try:
        plan_budget(args.nfe, args.n, num_chains=args.chains)
    except ValueError as err:
        sys.exit(_budget_error(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, classifier = _load(args, device, preset)
    sampler = DLGSampler.for_budget(model.score, classifier, shape=model.shape, nfe=args.nfe, n=args.n,
                                    num_chains=args.chains, seed=args.seed, device=device)
    tuning = sampler.tuning
    pilot, settings = tuning["pilot"], tuning["settings"]
    run = tuning["predicted_nfe_per_sample"] * args.n
    if args.json:
        print(json.dumps({**tuning, "pilot_share_of_run": pilot["evaluations"] / run}, indent=1))
        return
    print(f"budget: {args.nfe} model evaluations per sample, everything counted, for n={args.n} samples "
          f"({'the digits preset' if preset else args.model})")
    level = "at the warm-up" if settings["restart_sigma"] is None else f"{settings['restart_sigma']:.4g}"
    print(f"settings: {settings['kernel']} kernel, restart_sigma {level}, {settings['num_chains']} chains "
          f"({args.n / settings['num_chains']:.1f} outputs each), {settings['integrator']} "
          f"{settings['denoise_steps']} denoising steps + Tweedie, warm-up {sampler.warmup_integrator} "
          f"{settings['warmup_steps']} steps")
    if not pilot["chains"]:
        print(f"pilot: none ({pilot['skipped']})")
    else:
        print(f"pilot: {pilot['chains']} chains, {pilot['evaluations']} model evaluations "
              f"({pilot['evaluations'] / run:.1%} of the run's predicted {run:.0f})")
        s_eff = "n/a (no usable ladder level)" if pilot["effective_scale"] is None else \
            f"{pilot['effective_scale']:.4g}"
        print(f"  data scale {pilot['data_scale']:.4g} (the warmed-up chains' spread), effective scale {s_eff}")
        print("  ladder, one restart move each: " + ", ".join(
            f"S {c['restart_sigma']:.3g} lag-1 {_fmt(c['lag1'])}" + (f" ({c['diverged']} diverged)" if c["diverged"]
                                                                      else "") for c in pilot["candidates"]))
        mixing = "no fit" if pilot["mixing_level"] is None else f"{pilot['mixing_level']:.4g}"
        why = "raised to where the fitted curve reaches" if pilot["restart_sigma"] > pilot["rule_of_thumb"] else \
            f"the rule of thumb, {RESTART_SCALE:g} x the data scale; the fitted curve reaches"
        print(f"  chosen S {pilot['restart_sigma']:.4g} ({why} target lag-1 {pilot['target_lag1']:g} at {mixing}): "
              f"lag-1 {_fmt(pilot['lag1'])}, agreement {pilot['agreement']:.3g} (RMS to twice the denoising steps, "
              f"in data scales), {pilot['diverged']} diverged")
    print(f"predicted NFE per sample: {tuning['predicted_nfe_per_sample']:.2f} in total (warm-up and pilot "
          "amortised over n)")


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"
