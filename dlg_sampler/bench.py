"""``dlg-bench``: quality versus NFE per sample, DLG against every integrator and diffusers scheduler, side by side.

Workloads: an exact Gaussian mixture (exact score, exact noise posterior), the same mixture with a noise classifier
trained in the run, and the shipped digits preset. For each sampler and NFE budget one run with a fixed seed:
vanilla (from pure noise at sigma_max) and DLG (persistent chains; Gibbs + denoising + Tweedie within the budget).
Writes ``results.json`` (every number), ``RESULTS.md`` (tables, target checks) and one PNG plot per workload.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch

from .classifier import NoiseClassifier, train_noise_classifier
from .integrators import INTEGRATORS, integrate, steps_for_nfe
from .levels import NoiseLevels
from .metrics import mode_weight_error, sliced_wasserstein
from .mixture import GaussianMixture
from .sampler import DLGSampler

#: diffusers schedulers run vanilla and warm-started by DLG: label -> (class name, config overrides).
SCHEDULERS = {
    "DPM++2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "DPM++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}
#: Tolerances of the adaptive RK45 (its NFE is measured, not budgeted).
RK45_RTOLS = (1e-1, 1e-2, 1e-3)


class TimedScore:
    """A score that records its wall time and calls, to split a run's time into network vs. everything else."""

    def __init__(self, score: Callable):
        self.score, self.seconds, self.calls = score, 0.0, 0
        for attr in ("sigma_min", "sigma_max"):
            if hasattr(score, attr):
                setattr(self, attr, getattr(score, attr))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.score(x, sigma)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@dataclass
class Workload:
    """What a sampler runs on and how its samples are scored."""

    name: str
    score: Callable
    posterior: Callable
    levels: NoiseLevels
    shape: tuple[int, ...]
    evaluate: Callable[[torch.Tensor], dict[str, float]]
    metric: str  # the headline metric (lower is better)
    n: int
    step_size: float
    gibbs_steps: int
    scheduler_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    exact: Callable[[int, torch.Generator], torch.Tensor] | None = None  # draws true samples, where known


def mixture_workload(n: int, seed: int, trained: bool, quick: bool) -> Workload:
    """8 modes in 16 dimensions with unequal weights: exact score; exact or trained noise posterior."""
    g = torch.Generator().manual_seed(seed)
    base = GaussianMixture.random(num_modes=8, dim=16, spread=2.0, std=0.5, seed=seed)
    weights = torch.rand(8, generator=g) + 0.5
    mixture = GaussianMixture(base.means, base.stds, weights / weights.sum())
    levels = NoiseLevels(0.01, 80.0, 1000)
    reference = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    extra: dict[str, Any] = {}
    posterior: Callable = mixture.noise_posterior(levels)
    if trained:
        clf = NoiseClassifier(0.01, 80.0, 1000, sample_shape=[16], arch="mlp", hidden=256, mlp_layers=3)
        train = mixture.sample(50000, generator=torch.Generator().manual_seed(seed + 2))
        held_out = mixture.sample(4000, generator=torch.Generator().manual_seed(seed + 3))
        result = train_noise_classifier(clf, train, steps=800 if quick else 3000, batch_size=512, lr=2e-3, seed=seed,
                                        eval_data=held_out, progress=False)
        from .classifier import evaluate_noise_classifier

        exact = evaluate_noise_classifier(posterior, held_out, levels, 4096, torch.Generator().manual_seed(seed + 1))
        extra = {"classifier_ce": result["eval_ce"], "exact_posterior_ce": exact["ce"]}
        posterior = clf

    def evaluate(x: torch.Tensor) -> dict[str, float]:
        sw = sliced_wasserstein(x, reference, 256, torch.Generator().manual_seed(0))
        return {"sw": sw, "mode_error": mode_weight_error(mixture.mode_weights(x), mixture.weights)}

    return Workload("mixture (trained classifier)" if trained else "mixture (exact posterior)", mixture.score,
                    posterior, levels, (16,), evaluate, "sw", n, step_size=0.05, gibbs_steps=2,
                    scheduler_config={"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                      "num_train_timesteps": 1000, "clip_sample": False}, extra=extra,
                    exact=lambda n, g: mixture.sample(n, generator=g))


def digits_workload(n: int) -> Workload:
    """The shipped digits preset: its diffusers model, its classifier, FD / precision / recall / coverage."""
    from . import digits
    from .cli import DIGITS_PRESET
    from .models import load_classifier, load_model

    model = load_model(str(digits.PIPELINE_DIR))
    clf = load_classifier(digits.CLASSIFIER_DIR)
    evaluator = digits.DigitsEvaluator()

    def evaluate(x: torch.Tensor) -> dict[str, float]:
        q = evaluator.evaluate(x.clamp(-1, 1))
        return {k: q[k] for k in ("fd", "precision", "recall", "coverage", "entropy")}

    return Workload("digits", model.score, clf, clf.levels, model.shape, evaluate, "fd", n,
                    step_size=DIGITS_PRESET["step_size"], gibbs_steps=DIGITS_PRESET["gibbs_steps"],
                    scheduler_config=dict(model.pipeline.scheduler.config),
                    extra={"real_fd_floor": evaluator.real_fd_floor()})


def make_scheduler(label: str, config: dict[str, Any]):
    """Scheduler ``label`` on the model's training schedule, with ``timestep_spacing="trailing"`` so that its own
    schedule starts at the top level (the "leading" default of DDPM-era configs starts from pure noise at
    t = 900 of 1000 for 10 steps; Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed") and vanilla runs start where DLG's warm-up does."""
    import diffusers

    name, overrides = SCHEDULERS[label]
    return getattr(diffusers, name).from_config({**config, "timestep_spacing": "trailing", **overrides})


def run_vanilla(w: Workload, label: str, integrator, nfe: int | None, seed: int, rtol: float | None = None) -> dict:
    """The integrator from pure noise at sigma_max with at most ``nfe`` evaluations per sample."""
    kwargs = {} if rtol is None else {"rtol": rtol, "atol": rtol}
    steps = 2 if rtol is not None else steps_for_nfe(integrator, nfe, dlg=False)  # RK45: one ODE stretch + Tweedie
    if steps is None:
        return {}
    g = torch.Generator().manual_seed(seed)
    score = TimedScore(w.score)
    x = w.levels.sigma_max * torch.randn(w.n, *w.shape, generator=g)
    start = time.perf_counter()
    x0, used = integrate(integrator, score, x, w.levels.sigma_max, steps, generator=g, **kwargs)
    wall = time.perf_counter() - start
    return {"sampler": label, "dlg": False, "nfe": used, "wall_s": wall, **w.evaluate(x0)}


def chain_diagnostics(batches: list[torch.Tensor], seed: int) -> dict[str, float]:
    """Across consecutive DLG batches (``[T][C, *shape]``, chain order): lag-1 autocorrelation of the chains'
    outputs (on 16 random projections), the AR(1) effective sample size per chain-batch, and the fraction of
    outputs whose nearest other output is closer than 1% of the median nearest-neighbour distance."""
    c = min(len(b) for b in batches)
    y = torch.stack([b[:c].flatten(1) for b in batches]).double()  # [T, C, D]
    proj = torch.randn(y.shape[-1], 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = y @ proj  # [T, C, 16]
    p = (p - p.mean((0, 1))) / p.std((0, 1)).clamp_min(1e-12)
    rho = float((p[1:] * p[:-1]).mean((0, 1)).mean()) if len(batches) > 1 else float("nan")
    flat = y.reshape(-1, y.shape[-1])
    dist = torch.cdist(flat, flat)
    dist.fill_diagonal_(float("inf"))
    nn = dist.min(1).values
    return {"lag1_autocorr": rho, "ess_fraction": (1 - rho) / (1 + rho) if rho == rho else float("nan"),
            "near_duplicates": float((nn < 0.01 * nn.median()).double().mean())}


def run_dlg(w: Workload, label: str, integrator, nfe: int | None, seed: int, chains: int,
            rtol: float | None = None, warm: dict | None = None) -> dict:
    """DLG with ``integrator`` denoising: ``gibbs_steps`` + the most denoising steps that fit in ``nfe``.

    ``warm``: a cache of warmed-up chain states by chain count. The warm-up does not depend on the denoising
    integrator or the budget, so a sweep pays it once (its NFE and time are reported with every row).
    """
    kwargs = {} if rtol is None else {"rtol": rtol, "atol": rtol}
    budget = None if nfe is None else nfe - w.gibbs_steps
    if rtol is not None:
        steps = 1
    elif isinstance(integrator, str):
        steps = steps_for_nfe(integrator, budget, dlg=True) if budget > 0 else None
    else:
        steps = steps_for_nfe(integrator, budget, dlg=False) if budget > 0 else None
    if steps is None:
        return {}
    score = TimedScore(w.score)
    sampler = DLGSampler(score, w.posterior, w.levels, shape=w.shape, num_chains=chains, integrator=integrator,
                         denoise_steps=steps, gibbs_steps=w.gibbs_steps, step_size=w.step_size, seed=seed,
                         integrator_kwargs=kwargs)
    if warm is not None and chains in warm:
        sampler.load_state_dict(warm[chains]["state"])
        warm_wall = warm[chains]["wall_s"]
    else:
        start = time.perf_counter()
        sampler.warm_up()
        warm_wall = time.perf_counter() - start
        if warm is not None:
            warm[chains] = {"state": sampler.state_dict(), "wall_s": warm_wall}
    start, score_start = time.perf_counter(), score.seconds
    batches, have = [], 0
    while have < w.n:
        batches.append(sampler.step())
        have += len(batches[-1])
    wall = time.perf_counter() - start
    x0 = torch.cat(batches)[: w.n]
    st = sampler.stats
    nfe_split = st["nfe_per_sample"]
    warmup = st["warmup_nfe_per_chain"]
    return {"sampler": label, "dlg": True, "nfe": nfe_split["total"], "nfe_split": nfe_split, "wall_s": wall,
            "overhead_share": 1 - (score.seconds - score_start) / wall, "warmup_nfe_per_chain": warmup,
            "warmup_nfe_amortised": warmup * chains / w.n, "warmup_wall_s": warm_wall,
            "selected_sigma_mean": st["selected_sigma_mean"], "reinitialised": st["reinitialised"],
            "chains": chains, "batches": len(batches),
            **(chain_diagnostics(batches, seed) if len(batches) > 1 else {}), **w.evaluate(x0)}


def run_workload(w: Workload, nfes: list[int], reference_nfe: int, seed: int, log) -> list[dict]:
    """Every sampler, vanilla and DLG, at every NFE budget, plus a high-NFE vanilla Karras Heun reference.

    The quality sweep gives DLG one chain per output sample (one batch after the warm-up), so its numbers measure
    the per-sample quality at the stated per-sample NFE; the warm-up is reported apart. A separate persistence run
    (DLG + Karras Heun at 10 NFE, a quarter of the chains emitting four consecutive batches) measures what reusing
    the chains costs: lag-1 autocorrelation, ESS, near-duplicates and the quality of the correlated outputs.
    """
    rows, warm = [], {}
    chains = w.n
    samplers: list[tuple[str, Any]] = [(name, name) for name in INTEGRATORS if name != "ode_rk45"]
    samplers += [(label, make_scheduler(label, w.scheduler_config)) for label in SCHEDULERS]
    for label, integrator in samplers:
        for nfe in nfes:
            for run in (run_vanilla, run_dlg):
                row = run_dlg(w, label, integrator, nfe, seed, chains, warm=warm) if run is run_dlg else \
                    run_vanilla(w, label, integrator, nfe, seed)
                if row:
                    rows.append(row)
                    log(w, row)
    for rtol in RK45_RTOLS:  # adaptive: its NFE is measured
        rows.append(run_vanilla(w, "ode_rk45", "ode_rk45", None, seed, rtol))
        log(w, rows[-1])
        rows.append(run_dlg(w, "ode_rk45", "ode_rk45", None, seed, chains, rtol, warm=warm))
        log(w, rows[-1])
    persistent = run_dlg(w, "karras_heun", "karras_heun", 10, seed, max(w.n // 4, 1))
    persistent["persistence"] = True
    rows.append(persistent)
    log(w, persistent)
    reference = run_vanilla(w, "karras_heun", "karras_heun", reference_nfe, seed)
    reference["reference"] = True
    rows.append(reference)
    log(w, reference)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def _special(row: dict) -> bool:
    """The reference and persistence runs sit outside the sweep's tables and curves."""
    return bool(row.get("reference") or row.get("persistence"))


def check_targets(results: dict[str, dict]) -> list[dict]:
    """The issue's targets as measured ratios: met or not, with the numbers."""
    targets = []
    mix = results.get("mixture (exact posterior)")
    if mix:
        rows = mix["rows"]
        for label in sorted({r["sampler"] for r in rows if r["sampler"] != "ode_rk45"}):
            dlg = [r for r in rows if r["sampler"] == label and r["dlg"] and r["nfe"] <= 10 and not _special(r)]
            van = [r for r in rows if r["sampler"] == label and not r["dlg"] and r["nfe"] >= 40
                   and not _special(r)]
            if dlg and van:
                d, v = min(dlg, key=lambda r: r["sw"]), min(van, key=lambda r: r["nfe"])
                targets.append({"target": f"mixture: DLG {label} <=10 NFE vs vanilla >=40 NFE",
                                "dlg": d["sw"], "vanilla": v["sw"], "ratio": d["sw"] / v["sw"],
                                "met": d["sw"] <= v["sw"]})
    dig = results.get("digits")
    if dig:
        rows = dig["rows"]
        d = [r for r in rows if r["dlg"] and r["nfe"] <= 10 and not _special(r)]
        peers = [r for r in rows if not r["dlg"] and r["sampler"] in ("DPM++2M", "UniPC") and 15 < r["nfe"] <= 20]
        if d and peers:
            best_d, best_p = min(d, key=lambda r: r["fd"]), min(peers, key=lambda r: r["fd"])
            targets.append({"target": f"digits: DLG ({best_d['sampler']}) at 10 NFE vs best of DPM++2M/UniPC at 20",
                            "dlg": best_d["fd"], "vanilla": best_p["fd"], "ratio": best_d["fd"] / best_p["fd"],
                            "met": best_d["fd"] <= best_p["fd"]})
        preset = [r for r in rows if r["dlg"] and r["sampler"] == "karras_heun" and r["nfe"] <= 10 and not _special(r)]
        if preset:
            share = max(preset, key=lambda r: r["nfe"])["overhead_share"]
            targets.append({"target": "digits preset: classifier + Gibbs bookkeeping share of wall time",
                            "dlg": share, "vanilla": 0.05, "ratio": share / 0.05, "met": share <= 0.05})
    for name, res in results.items():
        metric = res["metric"]
        worse = []
        for r in res["rows"]:
            if r["dlg"] and not _special(r):
                v = [x for x in res["rows"] if x["sampler"] == r["sampler"] and not x["dlg"] and not _special(x)
                     and abs(x["nfe"] - r["nfe"]) <= 1]
                if v and r[metric] > v[0][metric]:
                    worse.append(f"{r['sampler']}@{r['nfe']:.0f} ({r[metric]:.3g} vs {v[0][metric]:.3g})")
        targets.append({"target": f"{name}: DLG never worse than its vanilla integrator at equal NFE",
                        "violations": worse, "met": not worse})
    return targets


def write_markdown(results: dict, targets: list[dict], meta: dict, path: Path) -> None:
    lines = ["# dlg-bench results", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}, wall time {meta['wall_s']:.0f} s", ""]
    for name, res in results.items():
        metric = res["metric"]
        lines += [f"## {name}", "", f"{res['n']} samples per run; {metric} (lower is better); NFE per sample. "
                  + ", ".join(f"{k} {v:.4g}" for k, v in res.get("extra", {}).items()), ""]
        nfes = sorted({round(r["nfe"]) for r in res["rows"] if r["sampler"] != "ode_rk45" and not _special(r)})
        lines += ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for label in dict.fromkeys(r["sampler"] for r in res["rows"] if r["sampler"] != "ode_rk45"):
            for dlg in (False, True):
                cells = []
                for n in nfes:
                    hit = [r for r in res["rows"] if r["sampler"] == label and r["dlg"] == dlg
                           and round(r["nfe"]) == n and not _special(r)]
                    cells.append(f"{hit[0][metric]:.4g}" if hit else "")
                if any(cells):
                    lines.append(f"| {'DLG + ' if dlg else ''}{label} | " + " | ".join(cells) + " |")
        rk = [r for r in res["rows"] if r["sampler"] == "ode_rk45"]
        if rk:
            lines += ["", "RK45 (adaptive, NFE measured): " + "; ".join(
                f"{'DLG' if r['dlg'] else 'vanilla'} {r['nfe']:.0f} NFE -> {r[metric]:.4g}" for r in rk)]
        ref = [r for r in res["rows"] if r.get("reference")]
        if ref:
            lines += [f"Reference: vanilla Karras Heun at {ref[0]['nfe']} NFE -> {ref[0][metric]:.4g}"]
        one = next((r for r in res["rows"] if r["dlg"] and r["sampler"] == "karras_heun" and not _special(r)
                    and round(r["nfe"]) <= 10), None)
        if one:
            lines += ["", f"DLG warm-up (sweep runs, one chain per sample): {one['warmup_nfe_per_chain']:.0f} NFE per "
                      f"chain, paid once ({one['warmup_wall_s']:.1f} s for {one['chains']} chains); mean selected "
                      f"sigma {one['selected_sigma_mean']:.3f}; non-network share of DLG wall time "
                      f"{one['overhead_share']:.3f} (Karras Heun, {one['nfe']:.0f} NFE)."]
        p = next((r for r in res["rows"] if r.get("persistence")), None)
        if p:
            lines += ["", f"Persistent chains ({p['chains']} chains x {p['batches']} consecutive batches, DLG + Karras "
                      f"Heun {p['nfe']:.0f} NFE): {metric} {p[metric]:.4g}, lag-1 autocorrelation "
                      f"{p['lag1_autocorr']:.3f}, AR(1) ESS fraction {p['ess_fraction']:.3f}, near-duplicates "
                      f"{p['near_duplicates']:.3f}; warm-up amortised {p['warmup_nfe_amortised']:.1f} NFE per sample "
                      f"over {res['n']} samples."]
        lines += ["", f"![{name}]({res['plot']})", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        if "violations" in t:
            lines.append(f"| {t['target']} | {', '.join(t['violations']) or 'none'} | {'yes' if t['met'] else 'no'} |")
        else:
            lines.append(f"| {t['target']} | {t['dlg']:.4g} vs {t['vanilla']:.4g} (ratio {t['ratio']:.2f}) | "
                         f"{'yes' if t['met'] else 'no'} |")
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = res["metric"]
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(r["sampler"] for r in res["rows"] if not _special(r)))
    colors = plt.cm.tab20(range(len(labels)))
    for label, color in zip(labels, colors):
        for dlg, style in ((False, "-"), (True, "--")):
            pts = sorted((r["nfe"], r[metric]) for r in res["rows"]
                         if r["sampler"] == label and r["dlg"] == dlg and not _special(r))
            if pts:
                ax.plot(*zip(*pts), style, marker="o" if dlg else ".", color=color,
                        label=f"{'DLG + ' if dlg else ''}{label}")
    ref = [r for r in res["rows"] if r.get("reference")]
    if ref:
        ax.axhline(ref[0][metric], color="gray", lw=0.8, label=f"Karras Heun {ref[0]['nfe']} NFE")
    ax.set(xscale="log", yscale="log", xlabel="NFE per sample", ylabel=metric, title=name)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dlg-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sample counts and sweep (a few minutes, 2 CPUs)")
    parser.add_argument("--workloads", nargs="+", default=["mixture", "mixture-trained", "digits"],
                        choices=["mixture", "mixture-trained", "digits"])
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets per sample")
    parser.add_argument("--n", type=int, default=None, help="samples per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", help="output folder")
    args = parser.parse_args(argv)
    nfes = args.nfe or ([5, 10, 20, 40] if args.quick else [5, 10, 20, 40, 80])
    reference_nfe = 100 if args.quick else 200
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(w: Workload, r: dict) -> None:
        print(f"[{w.name}] {'DLG + ' if r['dlg'] else ''}{r['sampler']}: NFE {r['nfe']:.1f}, {w.metric} "
              f"{r[w.metric]:.4g}, {r['wall_s']:.1f}s", flush=True)

    results = {}
    for key in args.workloads:
        if key == "digits":  # a real network: the sweep stops at 40 NFE to keep the full run under an hour on 2 CPUs
            w = digits_workload(args.n or (500 if args.quick else 1000))
            sweep = [n for n in nfes if n <= 40]
        else:
            w = mixture_workload(args.n or (1000 if args.quick else 4000), args.seed, key == "mixture-trained",
                                 args.quick)
            sweep = nfes
        rows = run_workload(w, sweep, reference_nfe, args.seed, log)
        plot_name = f"{key}.png"
        results[w.name] = {"rows": rows, "metric": w.metric, "n": w.n, "extra": w.extra, "plot": plot_name}
        plot(results[w.name], w.name, out / plot_name)
    targets = check_targets(results)
    meta = {"command": "dlg-bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"torch {torch.__version__}, {platform.platform()}",
            "date": date.today().isoformat(), "wall_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "targets": targets}, indent=1,
                                                 default=float))
    write_markdown(results, targets, meta, out / "RESULTS.md")
    print(f"wrote {out / 'RESULTS.md'}, {out / 'results.json'} and the plots ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
