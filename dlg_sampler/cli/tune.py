"""``dlg-tune``: what a budget chooses (``DLGSampler.for_budget``), printed before anything is spent on the run."""

from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm.auto import tqdm

from ..integrators import SCHEDULE_WORDS
from ..restart import RULE
from ..sampler import DLGSampler
from .common import (DEFAULT_NFE, ArgumentParser, HelpFormatter, add_device_argument, add_model_arguments, budget_error,
                     check_device, check_model_flags, choose_threads, load, positive, ramp_end)


def tune_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="dlg-tune",
        description="Show what DLGSampler.for_budget (and dlg-sample, for one process with the same --nfe, --n, "
                    "--chains and --seed) chooses for a budget: the settings, the pilot's measurements on the model "
                    "and the predicted total NFE per sample. With no model: the shipped digits preset.",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--nfe", type=int, default=DEFAULT_NFE,
                   help="budget: model evaluations per sample, everything counted (warm-up, pilot, denoising, Tweedie)")
    p.add_argument("--n", type=int, default=10000, help="samples the run will draw (warm-up and pilot are "
                                                        "amortised over them)")
    p.add_argument("--chains", type=int, default=None, help="persistent chains (default: n / 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the pilot: the choice is deterministic under it")
    p.add_argument("--json", action="store_true", help="print the choice as JSON (the sampler's .tuning)")
    add_device_argument(p)
    return p


def tune_main(argv: list[str] | None = None) -> None:
    """``dlg-tune``; Ctrl-C ends it with one line (exit 130)."""
    try:
        _tune(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: dlg-tune keeps nothing (it prints its choice when the pilot ends); run it again",
              file=sys.stderr)
        sys.exit(130)


def _tune(argv: list[str] | None) -> None:
    import json

    from ..tuning import full_batches_note, plan_budget

    parser = tune_parser()
    args = parser.parse_args(argv)
    for name in ("nfe", "n", "chains", "threads"):
        positive(getattr(args, name), "--" + name, parser)
    preset = check_model_flags(args, parser)
    check_device(args.device, parser)
    try:
        plan = plan_budget(args.nfe, args.n, num_chains=args.chains)
    except ValueError as err:
        sys.exit(budget_error(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, classifier = load(args, device, preset)
    choose_threads(args.threads, plan["settings"]["num_chains"] * math.prod(model.shape))
    # The warm-up and the pilot are the whole cost here: one bar from their first model evaluation.
    with tqdm(unit="NFE", unit_scale=True, desc="dlg-tune: warm-up and pilot") as bar:
        sampler = DLGSampler.for_budget(model.score, classifier, shape=model.shape, nfe=args.nfe, n=args.n,
                                        num_chains=args.chains, seed=args.seed, device=device, progress_bar=bar)
    tuning = sampler.tuning
    pilot, settings = tuning["pilot"], tuning["settings"]
    run = tuning["predicted_nfe_per_sample"] * args.n
    if args.json:
        print(json.dumps({**tuning, "pilot_share_of_run": pilot["evaluations"] / run}, indent=1))
        return
    print(f"budget: {args.nfe} model evaluations per sample, everything counted, for n={args.n} samples "
          f"({f'the {args.preset} preset' if preset else args.model})")
    level = "at the warm-up" if settings["restart_sigma"] is None else f"{settings['restart_sigma']:.4g}"
    ending = " + Tweedie" if settings.get("final_step", "tweedie") == "tweedie" else " to 0"
    levels = SCHEDULE_WORDS[settings.get("denoise_schedule")]
    share = settings.get("extra_step_share") or 0
    longer = f" ({settings['denoise_steps'] + 1} in {share:.0%} of the batches)" if share else ""
    returned = ", returned as each chain's first output" if settings.get("warmup_outputs") else ""
    ending += ", the first from the chains' Gaussian" if settings.get("gaussian_first_step") else ""
    ending += ramp_end(settings.get("tweedie_sigma"), sampler.levels.sigma_min, settings.get("final_step"))
    print(f"settings: {settings['kernel']} kernel, restart_sigma {level}, {settings['num_chains']} chains "
          f"({args.n / settings['num_chains']:.1f} outputs each), {settings['integrator']} "
          f"{settings['denoise_steps']} denoising steps{longer}{levels}{ending}, warm-up {sampler.warmup_integrator} "
          f"{settings['warmup_steps']} steps{returned}")
    if tuning.get("denoiser"):
        check = tuning["denoiser"]
        print(f"denoiser: chosen by the pilot on {check['chains']} held-out chains ({check['evaluations']} model "
              "evaluations), median RMS distance to a teacher solve in data scales: " + ", ".join(
                  f"{_denoiser_name(c, sampler.levels.sigma_min)} {d:.3g}"
                  for c, d in zip(check["candidates"], check["distances"])))
    note = full_batches_note(tuning)
    if note:
        print(note)
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
            f"the rule of thumb, {RULE}; the fitted curve reaches"
        print(f"  chosen S {pilot['restart_sigma']:.4g} ({why} target lag-1 {pilot['target_lag1']:g} at {mixing}): "
              f"lag-1 {_fmt(pilot['lag1'])}, agreement {pilot['agreement']:.3g} (RMS to twice the denoising steps, "
              f"in data scales), {pilot['diverged']} diverged")
    print(f"predicted NFE per sample: {tuning['predicted_nfe_per_sample']:.2f} in total (warm-up and pilot "
          "amortised over n)")


def _denoiser_name(settings: dict, sigma_min: float) -> str:
    """``unipc``, ``ipndm on fitted levels``, ``unipc (ramp to 3x the lowest level)`` ...: a candidate of the
    pilot's check in words."""
    end = settings.get("tweedie_sigma", sigma_min) / sigma_min
    return settings["integrator"] + SCHEDULE_WORDS[settings.get("denoise_schedule")] + (
        f" (ramp to {end:g}x the lowest level)" if not math.isclose(end, 1.0) else "")


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


main = tune_main
