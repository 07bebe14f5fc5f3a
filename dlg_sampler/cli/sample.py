"""``dlg-sample``: DLG samples from a pretrained model (the shipped digits preset by default), with the run's whole
cost and, on the preset, its quality against the vanilla integrator and diffusers' peers at the same total NFE."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import presets
from ..diagnostics import ess_fraction
from ..integrators import FITTED, INTEGRATORS, SCHEDULE_WORDS, SCHEDULES, count_nfe, integrate, vanilla_plan
from ..models import make_integrator
from ..parallel import cpu_processes, process_seed
from ..restart import RULE
from ..sampler import KERNELS, DLGSampler, micro_batched
from ..tuning import full_batches_note
from .common import (DEFAULT_NFE, ArgumentParser, HelpFormatter, add_batching_arguments, add_device_argument,
                     add_model_arguments, budget_error, check_batching, check_device, check_image_path,
                     check_model_flags, check_writable, choose_threads, load, output_format, positive, ramp_end)

#: The few-step peers the summary measures at DLG's total NFE: printed name -> (``dlg-bench`` label: its
#: ``SCHEDULERS`` / ``CORE_PEERS`` entry, with the schedule each one's authors use at few steps; what the line says).
#: diffusers schedulers are configured from the pipeline's scheduler with trailing spacing (their schedule starts at
#: sigma_max, where the noise is). The last line names the strongest of them.
PEERS = {"DPM-Solver++ 2M": ("DPM++2M", "diffusers, trailing spacing"),
         "UniPC": ("UniPC", "diffusers, trailing spacing"),
         "UniPC order 3": ("UniPC-3", "diffusers, trailing spacing"),
         "DPM-Solver++ 3M": ("DPM++3M-logSNR", "diffusers, uniform in log-SNR"),
         "DEIS order 3": ("DEIS-3", "diffusers, Karras sigmas"),
         "iPNDM": ("iPNDM", "core, Karras rho=7, solver's own step to 0"),
         "DEIS tAB3": ("DEIS-tAB3", "core, Karras rho=7, solver's own step to 0"),
         "Restart sampling": ("Restart", "core, Heun with one restart in [0.06, 0.3]"),
         "UniPC, fitted levels": ("UniPC-GITS", "core, levels fitted to the model on 8 of its samples, the fit paid "
                                                "from the budget")}


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
    p = ArgumentParser(
        prog="dlg-sample",
        description="Draw samples from a pretrained diffusion model with Denoising MCMC: persistent chains, each "
                    "output lifted by the restart kernel (or the paper's Langevin-Gibbs kernel) and denoised. The "
                    "settings follow from the budget --nfe (dlg-tune shows them). With no arguments: the shipped "
                    "digits model and classifier, compared at the same total NFE with the vanilla integrator and "
                    "the few-step peers (diffusers' DPM-Solver++, UniPC and DEIS; iPNDM, DEIS tAB, Restart sampling).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--nfe", type=int, default=None,
                   help=f"budget: model evaluations per sample, everything counted (warm-up, pilot, Gibbs, "
                        f"denoising, Tweedie); chooses the chains, the denoising steps and the restart level "
                        f"(default {DEFAULT_NFE})")
    k = p.add_argument_group("kernel settings (default: chosen from --nfe and --n; any given here wins)")
    k.add_argument("--kernel", default=None, choices=KERNELS,
                   help="chain kernel: restart (the default: lift each chain to S exactly, denoise back) or gibbs "
                        "(the paper's Langevin-Gibbs sweeps and min-sigma selection)")
    k.add_argument("--restart-sigma", type=float, default=None,
                   help=f"restart kernel: the lift level S (default: {RULE}, raised where a short pilot on the model says consecutive outputs would keep a "
                        "lag-1 autocorrelation above 0.2; no pilot when --n is too small for one)")
    k.add_argument("--step-size", type=float, default=None,
                   help=f"gibbs kernel: Langevin step size eta (default {sampler_defaults['step_size'].default:g}, "
                        "the paper's); it sets the chains' working noise level")
    k.add_argument("--gibbs-steps", type=int, default=None, help="gibbs kernel: Gibbs steps per output (default 2)")
    k.add_argument("--denoise-steps", type=int, default=None,
                   help="denoising solver steps per output (instead of --nfe)")
    k.add_argument("--integrator", default=None,
                   help="denoising integrator: one of the core names or a diffusers scheduler class name "
                        "(configured from the pipeline's scheduler), e.g. UniPCMultistepScheduler (default, restart "
                        "kernel: the pilot's choice between unipc on its ramp, its first step from the chains' "
                        "Gaussian, and ipndm on fitted levels (above 8 NFE: ipndm on its ramp from the chains' "
                        "Gaussian), both ending with the solver's own step to 0, each ramp ending at the grid's "
                        "lowest level or at 3x it; unipc where n is too small to pay "
                        "for the check; gibbs kernel: unipc)")
    k.add_argument("--denoise-schedule", choices=(FITTED, *SCHEDULES), default=None,
                   help="restart kernel: 'fitted' fits the denoising solve's levels to the model once per run "
                        "(GITS-style, on 8 lifted chains, counted in the budget); 'logsnr': levels uniform in "
                        "log-SNR; 'karras': the Karras ramp; default: the integrator's own ramp, or log-SNR levels "
                        "where the pilot finds the chains' spread in few directions (image models)")
    k.add_argument("--chains", type=int, default=None,
                   help="persistent chains (default: n / 20, few chains with many outputs each, as in the paper)")
    p.add_argument("--n", type=int, default=256, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the pilot and the chains (each process of accelerate "
                                                       "launch derives its own)")
    p.add_argument("--out", default="samples.png", help="PNG grid (the raw samples go next to it as .safetensors); "
                                                        "an existing one is kept: the default is written beside it "
                                                        "(samples-1.png ...), a named one is refused")
    p.add_argument("--out-dir", default=None, help="write resumable shards + manifest here instead of --out")
    p.add_argument("--format", type=output_format("png", "npz", "safetensors"), default=None,
                   metavar="{png,npz,safetensors}",
                   help="with --out-dir: the raw samples in the shards (safetensors, the default), numbered PNGs "
                        "(000000.png ...) or one samples.npz (arr_0 uint8 [N, H, W, 3]), as FID tools read them")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard with --out-dir")
    p.add_argument("--png", action="store_true", help="with --out-dir, also write one PNG grid per shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and its .safetensors); "
                                                            "with --out-dir, discard a previous run there")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the vanilla integrator and the few-step peers at DLG's total NFE and compare "
                        "(default: on for digits)")
    add_device_argument(p)
    add_batching_arguments(p)
    return p



def _kernel_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The kernel settings given on the command line (they win over the budget's choice); refuses a setting of the
    other kernel."""
    kernel = args.kernel or "restart"
    other = {"restart": [("--step-size", args.step_size), ("--gibbs-steps", args.gibbs_steps)],
             "gibbs": [("--restart-sigma", args.restart_sigma), ("--denoise-schedule", args.denoise_schedule)]}[kernel]
    given = [flag for flag, value in other if value is not None]
    if given:
        parser.error(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} the "
                     f"{'gibbs' if kernel == 'restart' else 'restart'} kernel, but the {kernel} kernel is used: "
                     f"add --kernel {'gibbs' if kernel == 'restart' else 'restart'}, or drop "
                     f"{'it' if len(given) == 1 else 'them'}")
    if args.denoise_schedule is not None and (args.integrator or "unipc") not in INTEGRATORS:
        parser.error(f"--denoise-schedule fits the levels of a core integrator, and {args.integrator} sets its own: "
                     "pass a core --integrator (e.g. unipc, the default), or drop --denoise-schedule")
    flags = {"kernel": args.kernel, "restart_sigma": args.restart_sigma, "step_size": args.step_size,
             "gibbs_steps": args.gibbs_steps, "denoise_steps": args.denoise_steps, "integrator": args.integrator,
             "denoise_schedule": args.denoise_schedule}
    return {k: v for k, v in flags.items() if v is not None}


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """``images [N, C, H, W]`` in ``[-1, 1]`` -> one square-ish, padded PNG grid (:func:`~dlg_sampler.images.image_grid`)."""
    from ..images import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)


def _images(model, samples: torch.Tensor, device, batch_size: int | None = None) -> torch.Tensor:
    """The one post-processing every sampler's samples get, before saving and scoring: decoded (latent models, at
    most ``batch_size`` at once) and clamped to ``[-1, 1]``: ``[N, *shape] -> [N, C, H, W]``."""
    return torch.cat([model.decode(x.to(device)) for x in samples.split(batch_size or max(len(samples), 1))]
                     ).clamp(-1, 1)


def _tuning_record(sampler: DLGSampler) -> dict:
    """``sampler.tuning`` with the restart level in use (set at the warm-up when no pilot chose it)."""
    tuning = sampler.tuning
    return {**tuning, "settings": {**tuning["settings"], "restart_sigma": sampler.restart_sigma}}


def sample_main(argv: list[str] | None = None) -> None:
    """``dlg-sample``; Ctrl-C ends it with one line on stderr saying what was kept and how to resume (exit 130)."""
    try:
        _sample(argv)
    except KeyboardInterrupt:
        argv = sys.argv[1:] if argv is None else list(argv)
        print(f"\n{_interrupted(sample_parser().parse_args(argv), argv)}", file=sys.stderr)
        sys.exit(130)


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted run kept, and the command that goes on from there."""
    if args.out_dir is None:
        return ("interrupted: nothing was saved (--out is written when the run ends); --out-dir FOLDER writes "
                "shards as it goes, and the same command resumes from them")
    from ..shards import MANIFEST

    shards = [e for m in sorted(Path(args.out_dir).glob(f"*{MANIFEST}")) for e in json.loads(m.read_text())["shards"]]
    if not shards:
        return f"interrupted: no shard was finished in {args.out_dir}; run the command again to start over"
    resume = shlex.join(["dlg-sample", *(a for a in argv if a != "--overwrite")])
    return (f"interrupted: {len(shards)} shard{'s' if len(shards) > 1 else ''} ({sum(e['count'] for e in shards)} "
            f"of {args.n} samples) kept in {args.out_dir}; resume with: {resume}")


def _out_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Where ``--out`` is written: never over an existing grid or ``.safetensors`` without ``--overwrite``. A named
    ``--out`` is refused; the default is written beside it (``samples-1.png`` ...), said on stderr."""
    out = Path(args.out)

    def taken(path: Path) -> bool:
        return path.exists() or path.with_suffix(".safetensors").exists()

    if args.overwrite or not taken(out):
        return out
    if args.out != parser.get_default("out"):
        parser.error(f"--out {out}: {out if out.exists() else out.with_suffix('.safetensors')} exists; pass "
                     "--overwrite to replace it, or another --out")
    beside = next(p for k in range(1, 10**6) if not taken(p := out.with_stem(f"{out.stem}-{k}")))
    print(f"note: {out} exists, so this run writes {beside} (--overwrite replaces {out})", file=sys.stderr)
    return beside


def _sample(argv: list[str] | None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from ..images import to_uint8
    from ..shards import NPZ, ShardWriter, save_tensors, shard_sizes, write_npz
    from ..tuning import plan_budget

    parser = sample_parser()
    args = parser.parse_args(argv)
    for name in ("nfe", "denoise_steps", "gibbs_steps", "step_size", "restart_sigma", "chains", "n", "shard_size",
                 "threads"):
        positive(getattr(args, name), "--" + name.replace("_", "-"), parser)
    if args.nfe is not None and args.denoise_steps is not None:
        parser.error("pass --nfe or --denoise-steps, not both")
    overrides = _kernel_overrides(args, parser)
    preset = check_model_flags(args, parser)
    if args.out_dir is None and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; pass a .png file path (or --out-dir for shards)")
    if args.out_dir is None:
        check_image_path(args.out, "--out", parser)
        check_writable(args.out, "--out", parser, folder=False)
        out = _out_path(args, parser)
    else:
        check_writable(args.out_dir, "--out-dir", parser, folder=True)
    if args.format is not None and args.out_dir is None:
        parser.error(f"--format {args.format} writes into --out-dir: add --out-dir DIR (--out is one grid to look at)")
    if args.format == "png" and args.png:
        parser.error("--png grids would sit among the --format png samples, and FID tools would read them as "
                     "samples: drop --png")
    check_device(args.device, parser)
    if args.integrator == "ode_rk45" and args.denoise_steps is None:
        sys.exit("error: ode_rk45 is adaptive, its NFE cannot be budgeted: pass --denoise-steps instead of --nfe.")
    # One process, or one of `accelerate launch --num_processes K`: own device, own chains, own share of n.
    accelerator = Accelerator(cpu=cpu_processes(args.device))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = args.device or accelerator.device
    check_batching(args, device, parser)
    seed = process_seed(args.seed, rank, world)
    n = args.n // world + (rank < args.n % world)
    first = rank * (args.n // world) + min(rank, args.n % world)  # this process's first sample in the run
    nfe = args.nfe or DEFAULT_NFE
    plan = None
    if args.denoise_steps is None and (args.integrator or "unipc") in INTEGRATORS:  # schedulers: configured below
        try:  # the budget's arithmetic needs no model: a budget below the minimum is refused before loading
            plan = plan_budget(nfe, max(n, 1), num_chains=args.chains, **overrides)
        except ValueError as err:
            sys.exit(budget_error(err))
    torch.manual_seed(seed)
    model, classifier = load(args, device, preset)
    try:  # none given: for_budget chooses (a core name)
        integrator = None if args.integrator is None else make_integrator(args.integrator, model)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if integrator is not None:
        overrides["integrator"] = integrator
    if args.denoise_steps is not None:  # the budget the given steps imply per output: it sizes the pilot
        denoiser = integrator or "unipc"
        nfe = count_nfe(denoiser, args.denoise_steps, dlg=isinstance(denoiser, str))
    fmt = args.format or "safetensors"
    if fmt != "safetensors":  # one decoded sample says whether the model's samples make image files
        probe = _images(model, torch.zeros(1, *model.shape), device)
        if probe.dim() != 4 or probe.shape[1] not in (1, 3):
            sys.exit(f"error: --format {fmt} writes images with 1 or 3 channels, and this model's samples decode to "
                     f"{list(probe.shape[1:])}: use --format safetensors.")

    start = time.perf_counter()
    writer = state = None
    if args.out_dir is not None:
        config = {"model": str(args.model or args.preset), "classifier": str(args.classifier or args.preset),
                  "nfe": None if args.denoise_steps is not None else nfe, "kernel": args.kernel,
                  "restart_sigma": args.restart_sigma, "step_size": args.step_size, "gibbs_steps": args.gibbs_steps,
                  "denoise_steps": args.denoise_steps, "integrator": args.integrator, "chains": args.chains,
                  "n": args.n, "seed": args.seed, "shard_size": args.shard_size, "processes": world, "tuning": None,
                  "latents": getattr(model.pipeline, "vae", None) is not None,
                  **({} if args.dtype == "float32" else {"dtype": args.dtype}),
                  **({} if args.denoise_schedule is None else {"denoise_schedule": args.denoise_schedule})}  # absent: float32, as before --dtype
        try:
            writer = ShardWriter(args.out_dir, config, derived=("tuning", "latents"), overwrite=args.overwrite,
                                 prefix="" if world == 1 else f"p{rank}-", format=fmt, images=range(first, first + n))
        except ValueError as err:
            sys.exit(f"error: {err}")
        for warning in writer.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        state = writer.last_state()
    num_chains = args.chains
    if state is not None:  # the choice of the interrupted run, restored: no second pilot
        chosen = state["tuning"]["settings"]
        num_chains = chosen["num_chains"]
        overrides.update(denoise_steps=chosen["denoise_steps"], warmup_steps=chosen["warmup_steps"],
                         restart_sigma=state["restart_sigma"], extra_step_share=chosen.get("extra_step_share", 0.0),
                         warmup_outputs=chosen.get("warmup_outputs", False),  # absent: a run from before them
                         gaussian_first_step=chosen.get("gaussian_first_step", False))
        if integrator is None:  # the denoiser the interrupted run's pilot chose, and where its ramp ends
            overrides.update(integrator=chosen["integrator"], final_step=chosen.get("final_step", "tweedie"),
                             denoise_schedule=chosen.get("denoise_schedule"),
                             **({"tweedie_sigma": chosen["tweedie_sigma"]} if chosen.get("tweedie_sigma") else {}))
    chains = num_chains or (plan["settings"]["num_chains"] if plan else math.ceil(max(n, 1) / 20))
    threads = choose_threads(args.threads, min(chains, args.batch_size or chains) * math.prod(model.shape))
    planned = None if plan is None or state is not None else math.ceil(plan["predicted_nfe_per_sample"] * n)
    if main and planned is not None:
        print(f"planned: {planned:,} model evaluations ({planned / max(n, 1):.2f} per sample, warm-up and pilot "
              f"included) on {chains} chain{'s' if chains > 1 else ''}, {threads} CPU thread"
              f"{'s' if threads > 1 else ''}; the bar's time left follows from the first batches", file=sys.stderr)
    samples = torch.empty(0, *model.shape)
    # One bar over the whole job, in model evaluations, from the first one: the warm-up, the pilot and every shard.
    with warnings.catch_warnings(record=True) as caught, \
            tqdm(total=planned, disable=not main, unit="NFE", unit_scale=True,
                 desc="dlg-sample" + (f" (process 0 of {world})" if world > 1 else "")) as bar, \
            accelerator.autocast():
        try:
            sampler = DLGSampler.for_budget(model.score, classifier, shape=model.shape, nfe=nfe, n=max(n, 1),
                                            num_chains=num_chains, seed=seed, device=device, progress_bar=bar,
                                            max_batch_size=args.batch_size, **overrides)
        except ValueError as err:
            sys.exit(budget_error(err))
        if state is not None:
            sampler.load_state_dict(state)
            bar.write(f"resuming {args.out_dir}: {writer.count} of {n} samples already written"
                      + (f" by process {rank}" if world > 1 else ""))
            # everything of the interrupted run
            bar.n = bar.initial = bar.last_print_n = sampler.stats["model_evaluations"]
        remaining = n - (writer.count if writer is not None else 0)
        bar.total = bar.n + sampler.planned_nfe(remaining)  # the plan's estimate, made exact
        bar.refresh()
        if writer is not None:
            for k, size in enumerate(shard_sizes(n, args.shard_size)):
                if k < len(writer.shards):
                    continue
                batch = sampler.sample(size, progress_bar=bar)
                writer.config["tuning"] = _tuning_record(sampler)
                images = _images(model, batch, device, args.batch_size) if args.png or fmt != "safetensors" else None
                path = writer.write(batch, sampler.state_dict(),
                                    None if fmt == "safetensors" else to_uint8(images, rgb=True))
                if args.png:
                    _save_grid(images, path.with_suffix(".png"))
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
    name = args.integrator or sampler.integrator  # the core name for_budget chose where none was given
    print(_settings_line(sampler, name, summary, world))
    line = _cost_line(summary, wall, resumed=state is not None)
    if writer is not None:
        print(line)
        as_files = ""
        if fmt == "png":
            as_files = " as 000000.png ..."
        elif fmt == "npz":
            if not (writer.out_dir / NPZ).exists():  # every process's shards, in one file
                write_npz(writer.out_dir)
            as_files = f" as {NPZ} (arr_0 uint8 [{args.n}, {probe.shape[-2]}, {probe.shape[-1]}, 3])"
        print(f"wrote {args.n} samples to {args.out_dir}{as_files}")
        return
    images = _images(model, samples, device, args.batch_size)
    try:
        _save_grid(images, out)
        save_tensors({"samples": samples.contiguous().clone(), "images": images.contiguous().cpu().clone()},
                     out.with_suffix(".safetensors"))
    except OSError as err:
        sys.exit(f"error: cannot write {out} ({err.strerror}): pass a writable --out path.")
    evaluator = presets.PRESETS[args.preset].evaluator() if preset else None
    quality = None
    if evaluator is not None:
        quality = evaluator.evaluate(images.cpu())
        line += "; " + _quality(quality)
        if world == 1 and sampler.stats["reinitialised"] == 0:
            line += "; " + _class_repeats(evaluator.predict(images.cpu()), sampler.num_chains)
    print(line)
    if preset if args.compare is None else args.compare:
        _compare(model, integrator or name, name, args, summary["nfe_per_sample"], evaluator, device, quality)
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
    """What ran: the kernel and its level, the denoiser, samples, chains and outputs per chain, and why the chains
    are not n / 20 where the budget raised them to fill the model's calls (of process 0 under accelerate)."""
    tweedie = integrator in INTEGRATORS and sampler.final_step == "tweedie"
    levels = SCHEDULE_WORDS[sampler.denoise_schedule] if sampler.denoise_schedule != FITTED or sampler.schedule_fit \
        else ""
    if sampler.tuning and sampler.tuning.get("denoiser"):  # the pilot's choice
        others = len(sampler.tuning["denoiser"]["candidates"]) - 1
        levels += f" (chosen by the pilot over {others} other{'s' if others > 1 else ''})"
    longer = f" ({sampler.denoise_steps + 1} in {sampler.extra_step_share:.0%} of the batches)" \
        if sampler.extra_step_share else ""
    gaussian = ", the first from the chains' Gaussian" if sampler.gaussian_first_step else ""
    steps = f"{integrator} {sampler.denoise_steps} steps{longer}{levels}" + (
        " + Tweedie" if tweedie else " to 0" if integrator in INTEGRATORS else "") + gaussian + ramp_end(
        sampler.tweedie_sigma, sampler.levels.sigma_min, sampler.final_step if integrator in INTEGRATORS else None)
    first = f" (the first its warm-up, {sampler.warmup_integrator} {sampler.warmup_steps} steps)" \
        if sampler.warmup_outputs else ""
    if sampler.kernel == "restart":
        pilot = sampler.tuning["pilot"]
        source = ("given" if pilot is None else
                  f"{RULE}; n too small for a pilot" if not pilot["chains"] else
                  f"raised by the pilot to lag-1 {pilot['lag1']:.2f} on {pilot['chains']} chains"
                  if pilot["restart_sigma"] > pilot["rule_of_thumb"] else
                  f"{RULE}, checked by the pilot: lag-1 {pilot['lag1']:.2f} on "
                  f"{pilot['chains']} chains")
        kernel = f"restart kernel, S {sampler.restart_sigma:.3g} ({source})"
    else:
        kernel = (f"gibbs kernel, step size {sampler.step_size:g}, {sampler.gibbs_steps} Gibbs steps, selected sigma "
                  f"median {sampler.stats['selected_sigma_median']:.3g}")
    chains = summary["chains"]
    note = full_batches_note(sampler.tuning) if sampler.tuning else None
    return (f"DLG {kernel}, {steps}: {summary['samples']} samples from {chains} chain{'s' if chains != 1 else ''}, "
            f"{summary['samples'] / chains:.1f} outputs per chain{first} ({world} process{'es' if world > 1 else ''})"
            + (f"; {note}{' (per process)' if world > 1 else ''}" if note else ""))


def _cost_line(summary: dict, wall: float, resumed: bool = False) -> str:
    """The whole cost per sample with its split, how much consecutive outputs share, and the wall time (of this run:
    a resumed one's pilot and warm-up were paid before)."""
    split = " + ".join(f"{k} {v:.2f}" for k, v in summary["nfe_split"].items() if v > 0)
    r = summary["lag1_autocorr"]
    mixing = ("lag-1 autocorrelation n/a (one output per chain)" if r is None else
              f"lag-1 autocorrelation {r:.2f} (worth {summary['ess_fraction']:.0%} as many independent samples)")
    return (f"DLG: NFE/sample {_down(summary['nfe_per_sample'])} in total, warm-up and pilot included ({split}; "
            f"{summary['model_evaluations']} model evaluations / {summary['samples']} samples), {mixing}, "
            f"wall {wall:.1f}s {'since resuming' if resumed else 'with warm-up'}")


def _down(nfe: float) -> str:
    """An NFE with two decimals, rounded down (9.997 reads 9.99, not 10.00: the budget it fits is 9)."""
    return f"{math.floor(nfe * 100 + 1e-9) / 100:.2f}"


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


def _compare(model, integrator, name: str, args: argparse.Namespace, dlg_nfe: float, evaluator, device,
             dlg_quality: dict | None = None) -> None:
    """Vanilla runs from pure noise at sigma_max at the most steps whose NFE per sample does not exceed DLG's total:
    the integrator DLG denoised with, then the peers (``PEERS``); same noise, same post-processing as DLG's samples.
    With an evaluator, a last line names the strongest peer and sets DLG's score (``dlg_quality``) beside it."""
    from ..bench.registry import CORE_PEERS
    from ..bench.runs import make_scheduler

    budget = math.floor(dlg_nfe + 1e-9)
    if not isinstance(integrator, str):  # its own schedule must start at the top level, where the noise is
        integrator = type(integrator).from_config({**integrator.config, "timestep_spacing": "trailing"})
    runs = [(f"vanilla {name} from sigma_max", None, integrator, {})]
    base = getattr(model.pipeline, "scheduler", None)
    for label, (name, how) in PEERS.items():
        if name in CORE_PEERS:
            runs.append((f"peer {label} ({how})", label, *CORE_PEERS[name]))
        elif base is None:
            print(f"peer {label}: skipped, no diffusers pipeline scheduler to configure it from")
        else:
            sampler = make_scheduler(name, base.config)
            if not isinstance(integrator, str) and dict(sampler.config) == dict(integrator.config):
                continue  # the vanilla run is that peer already
            runs.append((f"peer {label} ({how})", label, sampler, {}))
    print(f"at DLG's total NFE ({budget} per sample, the most steps that fit {_down(dlg_nfe)}):")
    scored = []  # (FD, peer name) of the peers
    for line_label, peer, sampler, knobs in runs:
        steps, knobs = vanilla_plan(sampler, budget, args.n, **knobs)  # a fitted schedule's fit paid first
        if steps is None:
            print(f"{line_label}: cannot run within {budget} NFE per sample")
            continue
        g = torch.Generator(device).manual_seed(args.seed)
        x = model.sigma_max * torch.randn(args.n, *model.shape, generator=g, device=device)
        start = time.perf_counter()
        x0, used = integrate(sampler, micro_batched(model.score, args.batch_size), x, model.sigma_max, steps,
                             generator=g, **knobs)
        line = f"{line_label}, {steps} steps: NFE/sample {used:g}, wall {time.perf_counter() - start:.1f}s"
        if evaluator is not None:
            q = evaluator.evaluate(_images(model, x0, device, args.batch_size).cpu())
            line += "; " + _quality(q)
            if peer is not None:
                scored.append((q.get("fd_model", q["fd"]), peer))
        print(line)
    if scored and dlg_quality is not None:
        what = "FD vs the model's own samples" if "fd_model" in dlg_quality else "FD vs held-out digits"
        fd, peer = min(scored)
        mine = dlg_quality.get("fd_model", dlg_quality["fd"])
        print(f"strongest peer at {budget} NFE by {what}: {peer} {fd:.2f}; DLG {mine:.2f} at {_down(dlg_nfe)} NFE "
              f"({'lower' if mine < fd else 'not lower'}; one seed, n={args.n})")


main = sample_main
