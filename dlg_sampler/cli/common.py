"""What the console scripts share: the help format, the checks made before anything loads (device, writable paths,
positive numbers, model flags), the model and classifier options and their loading."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from .. import presets
from ..models import load_model

DIGITS = "digits"
#: The budget when ``--nfe`` is not given: model evaluations per sample, everything counted.
DEFAULT_NFE = 10
#: ``--batch-size`` when not given: the most samples one model call sees. A UNet of google/ddpm-cifar10-32's
#: configuration (35.7M parameters) takes about 10 MB per sample in float32, 2.5 GB at 256 (docs/usage.md).
DEFAULT_BATCH_SIZE = 256
#: ``--dtype`` names: the precision the model is evaluated in (the chains and solvers stay float32).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: Model-input elements per call (batch x sample size) per CPU thread. A choice, not an idle-machine measurement: on
#: the project's busy 2-core machine a second thread was 2-9x slower at every batch measured, 13 to 4096 chains of
#: 8 x 8 on the digits model (docs/usage.md, *Devices and threads*); larger calls get more threads where cores are free.
ELEMENTS_PER_THREAD = 64 * 1024


class ArgumentParser(argparse.ArgumentParser):
    """A parser whose errors are the one line that matters, with a pointer to ``--help`` (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, except where there is none to show (``None``, ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """``--help`` for the training examples: the script's docstring as written, and every option's default."""


def check_device(device: str | None, parser: argparse.ArgumentParser) -> None:
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


def add_batching_arguments(p: argparse.ArgumentParser) -> None:
    """``--batch-size`` and ``--dtype``: how the model is evaluated (the samples do not depend on the first)."""
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="the most samples one model call sees (the chains stay in memory; the same seed gives the "
                        "same samples, up to the network's rounding): lower it when the model runs out of memory, "
                        "raise it for a large GPU")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="precision the model is evaluated in; the chains, lifts and solvers stay float32")


def check_batching(args: argparse.Namespace, device, parser: argparse.ArgumentParser) -> None:
    """Refuse a ``--batch-size`` below 1, and a ``--dtype`` the device cannot compute in (a few of a UNet's ops are
    tried on it), before anything loads."""
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be at least 1 (samples per model call), got {args.batch_size}: pass e.g. "
                     f"--batch-size {DEFAULT_BATCH_SIZE}, less if the model runs out of memory")
    dtype = DTYPES[args.dtype]
    if dtype == torch.float32:
        return
    try:
        x = torch.ones(1, 4, 4, 4, device=device, dtype=dtype)
        x = torch.nn.functional.conv2d(x, torch.ones(4, 4, 3, 3, device=device, dtype=dtype), padding=1)
        x = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2))
        q = torch.nn.functional.linear(x.flatten(2).transpose(1, 2), torch.ones(4, 4, device=device, dtype=dtype))
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    except (RuntimeError, TypeError) as err:
        parser.error(f"--dtype {args.dtype}: torch {torch.__version__} cannot compute in {args.dtype} on "
                     f"{torch.device(device)} ({str(err).splitlines()[0]}); use --dtype float32"
                     f"{' or bfloat16' if dtype == torch.float16 else ''} there, or a GPU (--device cuda)")


def check_writable(path: str | Path, flag: str, parser: argparse.ArgumentParser, *, folder: bool) -> None:
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



def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--classifier`` and the score_sde options, shared by ``dlg-sample`` and ``dlg-tune``."""
    p.add_argument("--model", default=None, help="diffusers pipeline folder, Hub repo id or score_sde checkpoint "
                                                 "(default: the shipped digits model)")
    p.add_argument("--preset", default=None, choices=list(presets.PRESETS),
                   help="a model trained in-project, scored by its own evaluator (default: digits when no --model "
                        "is given); photo-digits: 3x16x16 colour digits over photos (another trained folder: "
                        "set DLG_PHOTO_DIGITS_PIPELINE)")
    p.add_argument("--classifier", default=None, help="NoiseClassifier folder or Hub repo id, needed by the Gibbs "
                                                      "kernel (default: the shipped digits classifier with the digits "
                                                      "model, which your own may replace; none with --model: the "
                                                      "restart kernel needs none)")
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


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if torch sees one, "
                                                  "else the CPU; under accelerate launch: the process's own)")
    add_threads_argument(p)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: OMP_NUM_THREADS if set, else one per "
                        f"{ELEMENTS_PER_THREAD // 1024}k model-input elements per call, at most the cores that "
                        "the load average leaves free: small batches run fastest on one thread)")


def choose_threads(requested: int | None, elements: int) -> int:
    """Set and return torch's CPU thread count for model calls of ``elements`` input elements (batch x sample size).

    ``requested`` (``--threads``) wins; then the user's ``OMP_NUM_THREADS``, or a ``torch.set_num_threads`` made
    by the caller's own code; otherwise one thread per ``ELEMENTS_PER_THREAD`` elements, at most the cores this
    process may use (``os.sched_getaffinity``) less the load average's busy ones, at least one.
    """
    if requested is None and ("OMP_NUM_THREADS" in os.environ or torch.get_num_threads() not in _SET_BY_US):
        return torch.get_num_threads()
    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        free = cores - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
        requested = max(1, min(free, elements // ELEMENTS_PER_THREAD))
    torch.set_num_threads(requested)
    _SET_BY_US.add(requested)
    return requested


#: torch's thread count before any script chose one, and those the scripts chose: any other was set by the caller.
_SET_BY_US = {torch.get_num_threads()}


def check_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Whether the run is a shipped preset's model (no ``--model``, or the shipped digits folder: scored by the
    preset's evaluator; without ``--model`` its classifier is the default, which ``--classifier`` may replace);
    refuses the Gibbs kernel without a classifier (the restart kernel needs none). On the preset, sets
    ``args.preset`` (default digits)."""
    if args.preset is not None and args.model is not None:
        parser.error(f"--preset {args.preset} and --model {args.model} name two models; pass one of them")
    preset = args.model is None or Path(args.model).resolve() == presets.PRESETS["digits"].pipeline_dir.resolve()
    args.preset = (args.preset or "digits") if preset else None
    if args.classifier is None and getattr(args, "kernel", None) == "gibbs":
        if args.model is None and presets.PRESETS[args.preset].classifier_dir is None:
            parser.error(f"--kernel gibbs needs a noise classifier and the {args.preset} preset has none; pass "
                         "--classifier, or use the restart kernel, which needs none")
        if args.model is not None:
            parser.error("--kernel gibbs needs --classifier: a noise classifier for that model (train one with "
                         "dlg-train-classifier --model MODEL --data IMAGES --out FOLDER), or use the restart "
                         "kernel, which needs none")
    return preset


def load(args: argparse.Namespace, device, preset: bool):
    """The model (:class:`~dlg_sampler.models.LoadedModel`) and its classifier (``None`` when none was named: the
    restart kernel runs on the model's trained range); exits with the loader's message."""
    from ..models import load_classifier

    dtype = getattr(args, "dtype", "float32")  # dlg-sample --dtype: the model's precision
    score_sde_kwargs = {"beta_min": args.beta_min, "beta_max": args.beta_max, "sigma_min": args.sde_sigma_min,
                        "sigma_max": args.sde_sigma_max, "continuous": args.continuous}
    try:
        spec = args.classifier or (presets.PRESETS[args.preset].classifier_dir if args.model is None else None)
        classifier = None if spec is None else load_classifier(spec, device)
        model = load_model(str(presets.pipeline_path(args.preset) if preset else args.model),
                           score_sde_net=args.score_sde_net,
                           sde=args.sde, shape=tuple(args.shape) if args.shape else None,
                           score_sde_kwargs=score_sde_kwargs, device=device,
                           dtype=None if dtype == "float32" else DTYPES[dtype])
    except ValueError as err:
        sys.exit(f"error: {err}")
    if model.prompts:
        sys.exit(f"error: --model {args.model} is a text-to-image pipeline; dlg-sample draws from unconditional "
                 "models. Sample it with DLGPipeline.from_pipe(pipe, classifier=...) (examples/text_to_image.py).")
    return model, classifier


def ramp_end(level: float | None, sigma_min: float, final_step: str | None) -> str:
    """``, its ramp down to 0.03 (3x the lowest level)`` where a solve to 0 leaves a ramp that ends above the
    grid's lowest level (the pilot's check chose it: tuning.RAMP_ENDS); else nothing."""
    if level is None or final_step != "solver" or math.isclose(level, sigma_min):
        return ""
    return f", its ramp down to {level:.3g} ({level / sigma_min:.3g}x the lowest level)"


def budget_error(err: ValueError) -> str:
    """``for_budget``'s budget message in the command line's words."""
    return (f"error: {err}".replace("raise nfe to", "raise --nfe to").replace("pass nfe", "pass --nfe")
            .replace("draw more samples per chain", "draw more samples per chain (more --n or fewer --chains)"))



def output_format(*allowed: str):
    """The ``--format`` argument type: one of ``allowed``, anything else refused with the choices named."""
    def parse(value: str) -> str:
        if value not in allowed:
            lossy = " (JPEG's lossy compression shifts FID; png is lossless)" if value.lower() in ("jpg", "jpeg") else ""
            raise argparse.ArgumentTypeError(f"{value!r} is not an output format: use {', '.join(allowed)}{lossy}")
        return value
    return parse


def check_image_path(path: str | Path, flag: str, parser: argparse.ArgumentParser) -> None:
    """Refuse an output image path whose extension Pillow cannot write, before any compute."""
    from PIL import Image

    ext = Path(path).suffix.lower()
    if ext not in {e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}:
        parser.error(f"{flag} {path}: {f'{ext!r} is not an image type' if ext else 'no image extension'}; end it in "
                     ".png (or .jpg, .webp, .bmp, .tif, .gif), e.g. "
                     f"{flag} {Path(path).with_suffix('.png')}")


def positive(value, name: str, parser: argparse.ArgumentParser) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        parser.error(f"{name} must be positive, got {value}")

