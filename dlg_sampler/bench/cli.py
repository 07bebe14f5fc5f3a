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
from .reference import QUICK_REFERENCE_N, REFERENCE_N, default_reference_dir, make_reference
from .report import META, PLOTS_HINT, RESULTS, have_matplotlib, report
from .runs import Store, execute, plan_runs, update_json
from .workloads import Workload, build_workload

DESCRIPTION = """\
Quality versus total NFE per sample: DLG against the vanilla core integrators and diffusers schedulers, at
equal total NFE (every model evaluation a run makes, DLG's warm-up included, / samples returned), paired by
seed, on exact Gaussian mixtures and the shipped digits model.

commands:
  run        (default) every planned run missing from OUT/results.jsonl, then RESULTS.md and plots in OUT;
             rerunning the same command resumes
  reference  make, finish or verify the digits model reference and record its convergence check
  report     rebuild RESULTS.md and the plots in OUT from the stored rows (no sampling)

Workloads, samplers, budgets, DLG configs and levers live in dlg_sampler/bench/registry.py."""

EPILOG = """\
examples:
  dlg-bench --quick --out bench-quick                smoke run, a few minutes on 2 CPUs
  dlg-bench reference                                the 10k-sample digits reference (slow, once)
  dlg-bench --out benchmarks                         the full benchmark
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
    run.add_argument("--workloads", nargs="+", choices=list(R.WORKLOADS), default=list(R.WORKLOADS),
                     metavar="NAME", help="workloads of the registry (default: all: %(default)s)")
    run.add_argument("--seeds", nargs="+", type=int, default=None,
                     help=f"seeds, the same for every sampler (default: {R.SEEDS}; --quick: {R.QUICK_SEEDS})")
    run.add_argument("--n", type=int, default=None,
                     help="samples per run for every workload (default: the registry's, 20000 per mixture and 5000 "
                          "for digits; --quick: 2000 and 500)")
    run.add_argument("--nfe", nargs="+", type=int, default=None,
                     help=f"total-NFE budgets of the vanilla samplers, the chosen DLG point and the tuned sampler (default: "
                          f"{R.BUDGETS}, digits {R.BUDGETS_BY_WORKLOAD['digits']};"
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
    add_threads_argument(run)
    ref = p.add_argument_group("digits model reference")
    ref.add_argument("--reference-dir", type=Path, default=default_reference_dir(),
                     help="where references are kept (default: $XDG_CACHE_HOME/dlg-sampler/reference, here "
                          "%(default)s)")
    ref.add_argument("--reference-n", type=int, default=None,
                     help=f"reference samples (default: {REFERENCE_N}; --quick: {QUICK_REFERENCE_N})")
    ref.add_argument("--reference-seed", type=int, default=0, help="reference seed (default: %(default)s)")
    ref.add_argument("--stats-out", type=Path, default=None,
                     help="also write the reference's digit-feature mean and covariance here (the shipped "
                          "dlg_sampler/weights/digits/reference_stats.safetensors is made this way; default: %(default)s)")
    ref.add_argument("--check-n", type=int, default=None,
                     help="reference command: samples of its convergence check, 0 to skip (default: 5000, the "
                          "digits runs' n; --quick: 0)")
    return p


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
            f"{torch.__version__}, {platform.platform()}")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Plan, run what is missing (each row stored as it finishes), report."""
    quick, out = args.quick, args.out
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
                     budgets_given=bool(args.nfe) or quick)
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
                           args.reference_n or (QUICK_REFERENCE_N if quick else REFERENCE_N), args.reference_seed)

        def record_workload(meta: dict[str, Any]) -> None:
            meta.setdefault("workloads", {})[name] = {**w.info, "n": ns[name]}

        update_json(out / META, record_workload)
        return w

    start = time.perf_counter()
    made = execute(plan, store, build)
    print(f"{made} runs in {time.perf_counter() - start:.0f} s; wrote {report(out)}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    # One thread unless --threads or OMP_NUM_THREADS say otherwise: DLG's calls are small batches (n / 20 chains, 250
    # of 8 x 8 for digits), and every sampler's wall time is measured on the same count.
    choose_threads(args.threads, 0)
    if args.command == "report":
        print(f"wrote {report(args.out)}")
    elif args.command == "reference":
        check_n = args.check_n if args.check_n is not None else (0 if args.quick else R.WORKLOADS["digits"].n)
        samples, info = make_reference(args.reference_n or (QUICK_REFERENCE_N if args.quick else REFERENCE_N),
                                       args.reference_seed, args.reference_dir, check_n=check_n)
        print(f"digits model reference {info['path']} (sha256 {info['sha256'][:12]}), check: {info.get('check')}")
        if args.stats_out is not None:  # the shipped statistics dlg-sample's summary scores against
            from ..digits import DigitsEvaluator

            DigitsEvaluator().save_reference_stats(samples, args.stats_out, {
                "reference": Path(info["path"]).name, "sha256": info["sha256"], "sampler": "karras_heun 100 steps "
                "(199 NFE) from sigma_max", "made_by": "dlg-bench reference --stats-out"})
            print(f"wrote its feature statistics to {args.stats_out}")
    else:
        run(args, argv)
