"""The ``dlg-bench`` command line: run (resumable), reference, report."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..cli.common import add_threads_argument, choose_threads
from . import registry as R
from .reference import (QUICK_REFERENCE_N, REFERENCE_N, REFERENCE_SAMPLER, REFERENCE_STEPS, SECOND_SAMPLER,
                        SECOND_STEPS, default_reference_dir, make_reference)
from .report import META, PLOTS_HINT, RESULTS, have_matplotlib, report
from .runs import RUN_KINDS, Store, execute, plan_runs, update_json
from .workloads import Workload, build_workload

DESCRIPTION = """\
Quality versus total NFE per sample: DLG against the vanilla core integrators and diffusers schedulers, at
equal total NFE (every model evaluation a run makes, DLG's warm-up included, / samples returned), paired by
seed, on exact Gaussian mixtures and the shipped digits and photo-digits models.

commands:
  run        (default) every planned run missing from OUT/results.jsonl, then RESULTS.md and plots in OUT;
             rerunning the same command resumes
  reference  make, finish or verify a preset's model reference (--workloads, default digits) and record its
             convergence check
  report     rebuild RESULTS.md and the plots in OUT from the stored rows (no sampling)

photo-digits (3x16x16 colour, ~4x the cost of digits per model evaluation) is not in the default workloads nor in
--quick: run it by name, dlg-bench --workloads photo-digits --out OUT (its 5000-sample reference is made first if
missing; dlg-bench reference --workloads photo-digits makes it and records its convergence check).

Workloads, samplers, budgets, DLG configs and levers live in dlg_sampler/bench/registry.py."""

EPILOG = """\
examples:
  dlg-bench --quick --out bench-quick                smoke run, a few minutes on 2 CPUs
  dlg-bench reference                                the 10k-sample digits reference (slow, once)
  dlg-bench reference --workloads photo-digits       the 5k-sample photo-digits reference (slow, once)
  dlg-bench --out benchmarks                         the full benchmark (all workloads but photo-digits)
  dlg-bench --workloads photo-digits --out bench-photo   the photo-digits benchmark
  dlg-bench report --out benchmarks                  tables and plots again, no sampling"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlg-bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "reference", "report"),
                   help="what to do (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder of results.jsonl, meta.json, RESULTS.md and plots (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: seeds {R.QUICK_SEEDS}, small n, samplers {R.QUICK_VANILLA}, budgets "
                        f"{R.QUICK_BUDGETS}, levers {R.QUICK_LEVERS}, a {QUICK_REFERENCE_N}-sample digits reference")
    run = p.add_argument_group("run")
    run.add_argument("--workloads", nargs="+", choices=list(R.WORKLOADS), default=None, metavar="NAME",
                     help=f"workloads of the registry, {', '.join(R.WORKLOADS)} (default: all but photo-digits, "
                          f"{', '.join(R.DEFAULT_WORKLOADS)}; reference command: digits)")
    run.add_argument("--seeds", nargs="+", type=int, default=None,
                     help=f"seeds, the same for every sampler (default: {R.SEEDS}; --quick: {R.QUICK_SEEDS})")
    run.add_argument("--n", type=int, default=None,
                     help="samples per run for every workload (default: the registry's, 20000 per mixture, 5000 "
                          "for digits, 2000 for photo-digits; --quick: 2000, 500, 300)")
    run.add_argument("--nfe", nargs="+", type=int, default=None,
                     help=f"total-NFE budgets of the vanilla samplers, the chosen DLG point and the tuned sampler (default: "
                          f"{R.BUDGETS}, digits and photo-digits {R.BUDGETS_BY_WORKLOAD['digits']};"
                          f" --quick: {R.QUICK_BUDGETS})")
    run.add_argument("--lever-nfe", nargs="+", type=int, default=None,
                     help=f"budgets of lever points and named DLG configs (default: {R.LEVER_BUDGETS}; --quick: "
                          f"{R.QUICK_LEVER_BUDGETS})")
    run.add_argument("--outputs-per-chain", type=int, default=20,
                     help="consecutive outputs of each DLG chain: chains = n // this (default: %(default)s; the "
                          "reference implementation uses 250)")
    run.add_argument("--samplers", nargs="+", choices=R.VANILLA, default=None, metavar="NAME",
                     help=f"vanilla samplers (default: all, {', '.join(R.VANILLA)}; --quick: {R.QUICK_VANILLA})")
    run.add_argument("--levers", nargs="*", choices=list(R.LEVERS), default=None, metavar="NAME",
                     help=f"DLG levers, none if given empty (default: all, {', '.join(R.LEVERS)}; --quick: "
                          f"{R.QUICK_LEVERS})")
    run.add_argument("--configs", nargs="*", choices=list(R.DLG_CONFIGS), default=None, metavar="NAME",
                     help=f"named DLG configs, none if given empty (default: all, {', '.join(R.DLG_CONFIGS)}; "
                          "--quick: none)")
    run.add_argument("--kinds", nargs="+", choices=RUN_KINDS, default=None, metavar="KIND",
                     help=f"only runs of these kinds, {', '.join(RUN_KINDS)} (default: all; e.g. --kinds tuned "
                          "after a change to for_budget, whose old rows were set aside)")
    add_threads_argument(run)
    ref = p.add_argument_group("model reference (digits, photo-digits)")
    ref.add_argument("--reference-dir", type=Path, default=default_reference_dir(),
                     help="where references are kept (default: $XDG_CACHE_HOME/dlg-sampler/reference, here "
                          "%(default)s)")
    ref.add_argument("--reference-n", type=int, default=None,
                     help=f"reference samples (default: the workload's, digits {REFERENCE_N}, photo-digits "
                          f"{R.WORKLOADS['photo-digits'].reference_n}; --quick: {QUICK_REFERENCE_N})")
    ref.add_argument("--reference-seed", type=int, default=0, help="reference seed (default: %(default)s)")
    ref.add_argument("--reference-sampler", choices=(REFERENCE_SAMPLER, SECOND_SAMPLER), default=REFERENCE_SAMPLER,
                     help=f"reference command: which reference, {REFERENCE_SAMPLER} (the primary) or {SECOND_SAMPLER} "
                          "(the second solver family, which digits runs are also scored against; its --reference-n "
                          "defaults to the workload's second_reference_n) (default: %(default)s)")
    ref.add_argument("--reference-steps", type=int, default=None,
                     help=f"reference command: steps of --reference-sampler (default: {REFERENCE_STEPS}, "
                          f"{SECOND_SAMPLER} {SECOND_STEPS})")
    ref.add_argument("--stats-out", type=Path, default=None,
                     help="reference command, one workload: also write the reference's feature mean and covariance "
                          "under its preset's evaluator here (the shipped dlg_sampler/weights/<preset>/"
                          "reference_stats.safetensors is made this way; default: %(default)s)")
    ref.add_argument("--check-n", type=int, default=None,
                     help="reference command: samples of its convergence check, 0 to skip (default: the workload "
                          "runs' n, digits 5000, photo-digits 2000; --quick: 0)")
    return p


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
            f"{torch.__version__}, {platform.platform()}")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Plan, run what is missing (each row stored as it finishes), report."""
    quick, out = args.quick, args.out
    args.workloads = args.workloads or list(R.DEFAULT_WORKLOADS)
    out.mkdir(parents=True, exist_ok=True)
    if not have_matplotlib():
        print(f"{PLOTS_HINT}; writing {RESULTS} and RESULTS.md only.")
    ns = {w: args.n or (R.WORKLOADS[w].quick_n if quick else R.WORKLOADS[w].n) for w in args.workloads}
    vanilla = {w: args.samplers or (R.QUICK_VANILLA if quick else R.VANILLA_BY_WORKLOAD.get(w, R.VANILLA))
               for w in args.workloads}
    plan = plan_runs(ns, args.seeds or (R.QUICK_SEEDS if quick else R.SEEDS), vanilla,
                     args.nfe or (R.QUICK_BUDGETS if quick else R.BUDGETS),
                     args.lever_nfe or (R.QUICK_LEVER_BUDGETS if quick else R.LEVER_BUDGETS), args.outputs_per_chain,
                     (R.QUICK_LEVERS if quick else R.LEVERS) if args.levers is None else args.levers,
                     (() if quick else R.DLG_CONFIGS) if args.configs is None else args.configs,
                     floors=[w for w in args.workloads if isinstance(R.WORKLOADS[w], R.MixtureSpec)],
                     budgets_given=bool(args.nfe) or quick, kinds=args.kinds)
    store = Store(out / RESULTS)
    invocation = {"command": "dlg-bench " + " ".join(argv), "machine": machine(), "date": time.strftime("%Y-%m-%d")}

    def record_invocation(meta: dict[str, Any]) -> None:
        meta.setdefault("runs", []).append(invocation)
        for w, n in ns.items():
            meta.setdefault("workloads", {}).setdefault(w, {})["n"] = n

    update_json(out / META, record_invocation)
    todo = [r for r in plan if r.key not in store.rows]
    cost = ", ".join(f"{w} {sum(r.n * (r.budget or 0) for r in todo if r.workload == w) / 1e6:.2f}M"
                     for w in ns)
    print(f"{len(plan)} runs planned, {len(plan) - len(todo)} already in {store.path}, {len(todo)} to run; model "
          f"evaluations of the budgeted ones: {cost}.", flush=True)

    def build(name: str) -> Workload:
        w = build_workload(name, ns[name], quick, args.reference_dir,
                           args.reference_n or (QUICK_REFERENCE_N if quick else None), args.reference_seed)

        def record_workload(meta: dict[str, Any]) -> None:
            meta.setdefault("workloads", {})[name] = {**w.info, "n": ns[name]}

        update_json(out / META, record_workload)
        return w

    start = time.perf_counter()
    made = execute(plan, store, build)
    print(f"{made} runs in {time.perf_counter() - start:.0f} s; wrote {report(out)}")


def make_references(args: argparse.Namespace) -> None:
    """``dlg-bench reference``: make, finish or verify the model reference of each workload named (default digits),
    with its convergence check; ``--stats-out`` (one workload) also writes its feature statistics."""
    names = args.workloads or ["digits"]
    wrong = [w for w in names if not isinstance(R.WORKLOADS[w], R.DigitsSpec)]
    if wrong:
        models = [w for w in R.WORKLOADS if isinstance(R.WORKLOADS[w], R.DigitsSpec)]
        sys.exit(f"dlg-bench reference: {', '.join(wrong)} has no model reference (exact samples score it); pass "
                 f"--workloads with one of {', '.join(models)}.")
    if args.stats_out is not None and len(names) > 1:
        sys.exit(f"dlg-bench reference: --stats-out writes one workload's statistics, got {', '.join(names)}; run "
                 "it once per workload.")
    for name in names:
        spec = R.WORKLOADS[name]
        check_n = args.check_n if args.check_n is not None else (0 if args.quick else spec.n)
        second = args.reference_sampler == SECOND_SAMPLER
        n = args.reference_n or (QUICK_REFERENCE_N if args.quick else
                                 spec.second_reference_n if second else spec.reference_n)
        if not n:
            sys.exit(f"dlg-bench reference: the {name} workload has no {SECOND_SAMPLER} reference "
                     "(second_reference_n 0); pass --reference-n to make one anyway.")
        samples, info = make_reference(n, args.reference_seed, args.reference_dir, check_n=check_n,
                                       preset=spec.preset, sampler=args.reference_sampler, steps=args.reference_steps)
        print(f"{name} model reference {info['path']} (sha256 {info['sha256'][:12]}), check: {info.get('check')}")
        if args.stats_out is not None:  # the shipped statistics dlg-sample's summary scores against
            from ..presets import PRESETS

            PRESETS[spec.preset].evaluator().save_reference_stats(samples, args.stats_out, {
                "reference": Path(info["path"]).name, "sha256": info["sha256"], "sampler": f"{info['sampler']} "
                f"{info['steps']} steps ({info['nfe']} NFE) from sigma_max", "made_by": "dlg-bench reference "
                f"--workloads {name} --stats-out"})
            print(f"wrote its feature statistics to {args.stats_out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    # One thread unless --threads or OMP_NUM_THREADS say otherwise: DLG's calls are small batches (n / 20 chains, 250
    # of 8 x 8 for digits), and every sampler's wall time is measured on the same count.
    choose_threads(args.threads, 0)
    if args.command == "report":
        print(f"wrote {report(args.out)}")
    elif args.command == "reference":
        make_references(args)
    else:
        run(args, argv)
