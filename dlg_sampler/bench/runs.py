"""One benchmark run = one sampler spec at one budget and seed on one workload, with every model call counted.

Specs are plain JSON: ``{"kind": "vanilla", "sampler": label}``, ``{"kind": "dlg", "config": {...}}`` (the
``DLGSampler`` kwargs plus ``outputs_per_chain``) or ``{"kind": "exact"}`` (the floor: true samples). A run's key
is ``(workload, spec, budget, seed, n)``; finished rows are appended to ``results.jsonl`` and skipped on rerun.
"""

from __future__ import annotations

import copy
import fcntl
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..diagnostics import OutputCorrelation
from ..diagnostics import ess_fraction as _ess_fraction
from ..integrators import integrate, steps_for_nfe, vanilla_plan
from ..sampler import FINAL_STEP, DLGSampler
from .common import make_scheduler, write_json
from .registry import BUDGETS_BY_WORKLOAD, CORE_PEERS, DEFAULT_DLG, DLG_CONFIGS, LEVERS, SCHEDULERS, DLGConfig, Lever
from .workloads import Workload

#: Bench-level keys of a DLG config, removed before the sampler is built.
OUTPUTS_PER_CHAIN = "outputs_per_chain"
#: ``.stats`` fields kept for display (read with ``.get``: the sampler's stats are not the bench's cost).
STATS_SHOWN = ("nfe_per_sample", "nfe_split", "lag1_autocorr", "outputs_per_chain", "selected_sigma_mean",
               "reinitialised")


class Counter:
    """Wraps a score ``(x, sigma)`` or posterior ``(x)``: ``evals`` += ``x.shape[0]`` per call; other attributes
    (``levels``, ``sigma_max`` ...) are the wrapped object's."""

    def __init__(self, fn: Callable):
        self.fn, self.evals = fn, 0

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        self.evals += x.shape[0]
        return self.fn(x, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.fn, name)


def resolve_integrator(name: str, w: Workload):
    """A core integrator name as is; a ``SCHEDULERS`` label as that scheduler on the workload's config; a
    ``CORE_PEERS`` label as its core integrator's name."""
    return make_scheduler(name, w.scheduler_config) if name in SCHEDULERS else CORE_PEERS.get(name, (name,))[0]


# ----------------------------------------------------------------------------- diagnostics
def lag1_autocorr(batches: list[torch.Tensor]) -> float | None:
    """Lag-1 autocorrelation of consecutive outputs of the same chains, the estimator ``DLGSampler.stats`` uses
    (:class:`dlg_sampler.diagnostics.OutputCorrelation`): ``batches [T][C, *shape]``, row ``c`` of every full batch
    from chain ``c`` (a batch that lost a diverged chain breaks the row order: the next pairs start afresh).
    ``None`` with fewer than two full batches."""
    full = max(len(b) for b in batches)
    corr = OutputCorrelation(full, batches[0][0].numel())
    chains = torch.arange(full)
    for b in batches:
        if len(b) == full:
            corr.update(chains, b)
        else:
            corr.forget(chains)
    return corr.lag1


def ess_fraction(rho: float | None) -> float | None:
    """AR(1) effective sample size per output: ``(1 - rho) / (1 + rho)`` (clipped to [0, 1])."""
    return None if rho is None else _ess_fraction(rho)


def _shown_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The sampler's own ``.stats`` display fields that are plain numbers (or dicts of them)."""
    def plain(v):
        return v is None or isinstance(v, (int, float)) or (isinstance(v, dict) and all(
            isinstance(x, (int, float)) for x in v.values()))
    return {k: stats.get(k) for k in STATS_SHOWN if k in stats and plain(stats.get(k))}


# ----------------------------------------------------------------------------- runs
def run_exact(w: Workload, seed: int, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The floor: ``n`` true samples (seeded; no model call)."""
    return w.exact(n, torch.Generator().manual_seed(seed)), {"nfe": 0.0, "wall_s": 0.0}


def run_vanilla(w: Workload, label: str, budget: int, seed: int, n: int) -> tuple[torch.Tensor | None, dict]:
    """``label`` from pure noise at the grid's sigma_max with the most steps whose NFE fits ``budget``."""
    integrator, knobs = resolve_integrator(label, w), CORE_PEERS.get(label, (None, {}))[1]
    steps, knobs = vanilla_plan(integrator, budget, n, **knobs)  # a fitted schedule's fit paid from the budget
    if steps is None:
        return None, {"skipped": f"one step of {label} needs more than {budget} NFE"}
    g = torch.Generator().manual_seed(seed)
    score = Counter(w.score)
    x = w.levels.sigma_max * torch.randn(n, *w.shape, generator=g)
    start = time.perf_counter()
    try:
        x0, _ = integrate(integrator, score, x, w.levels.sigma_max, steps, generator=g, **knobs)
    except ValueError as err:  # a scheduler that cannot start at this level with this many steps
        return None, {"skipped": str(err)}
    return x0, {"nfe": score.evals / n, "steps": steps, "wall_s": time.perf_counter() - start}


def fit_denoise_steps(budget: float, n: int, warmup_evals: int, gibbs_steps: int, integrator,
                      final_step: str = FINAL_STEP) -> int | None:
    """The most denoising steps with ``warmup_evals / n + gibbs_steps + denoise NFE (+ Tweedie) <= budget``.

    ``warmup_evals``: every model evaluation of the warm-up of all chains (known after ``warm_up()``), so with
    ``n = chains * outputs_per_chain`` its share per sample is ``warmup_per_chain / outputs_per_chain``. ``None``
    if not even one step fits. An estimate: the run's row is placed at its measured total.
    """
    left = math.floor(budget - warmup_evals / n - gibbs_steps + 1e-9)
    return steps_for_nfe(integrator, left, dlg=True, final_step=final_step) if left >= 1 else None


def _gibbs_steps(kwargs: dict[str, Any]) -> int:
    """Model evaluations per output of the chain move before denoising: the Gibbs kernel's sweeps, else none."""
    params = inspect.signature(DLGSampler).parameters
    if kwargs.get("kernel", params["kernel"].default) != "gibbs":
        return 0
    return kwargs.get("gibbs_steps", params["gibbs_steps"].default)


def run_dlg(w: Workload, config: dict[str, Any], budget: int | None, seed: int, n: int,
            warm: dict[str, tuple] | None = None) -> tuple[torch.Tensor | None, dict]:
    """DLG with ``config`` (``DLGSampler`` kwargs + ``outputs_per_chain``): ``n // outputs_per_chain`` chains
    warmed up once, then consecutive ``step()`` batches until ``n`` outputs. Without ``denoise_steps`` in
    ``config`` they are fitted to ``budget`` after the warm-up is counted.

    ``warm``: cache of warmed-up chains by (config without ``denoise_steps``, chains, seed). The warm-up does not
    depend on the denoising steps, so budgets share it; each row is still charged its full count and time.
    """
    kwargs = dict(config)
    opc = kwargs.pop(OUTPUTS_PER_CHAIN)
    chains = n // opc
    if chains < 1:
        return None, {"skipped": f"n={n} is smaller than outputs_per_chain={opc}"}
    fixed = kwargs.pop("denoise_steps", None)
    integrator = kwargs.pop("integrator", "karras_heun")
    kwargs["integrator"] = resolve_integrator(integrator, w)
    score, posterior = Counter(w.score), Counter(w.posterior)

    def build(steps: int) -> DLGSampler:
        return DLGSampler(score, posterior, w.levels, shape=w.shape, num_chains=chains, seed=seed,
                          denoise_steps=steps, **kwargs)

    warm = {} if warm is None else warm
    key = json.dumps([{k: v for k, v in config.items() if k != "denoise_steps"}, chains, seed], sort_keys=True)
    if key not in warm:
        sampler, start = build(fixed or 1), time.perf_counter()
        sampler.warm_up()
        warm[key] = (sampler.state_dict(), score.evals, posterior.evals, time.perf_counter() - start)
    state, warm_evals, warm_clf, warm_wall = warm[key]
    steps = fixed or fit_denoise_steps(budget, n, warm_evals, _gibbs_steps(kwargs), kwargs["integrator"],
                                       kwargs.get("final_step", FINAL_STEP))
    if steps is None:
        return None, {"skipped": f"warm-up ({warm_evals / n:.2f} per sample) + Gibbs steps + one denoising step "
                                 f"exceed {budget} NFE"}
    score.evals = posterior.evals = 0
    sampler = build(steps)
    sampler.load_state_dict(copy.deepcopy(state))  # the cached warm state serves other budgets too
    batches, have, start = [], 0, time.perf_counter()
    while have < n:
        batches.append(sampler.step())
        have += len(batches[-1])
    wall = time.perf_counter() - start
    x0 = torch.cat(batches)[:n]
    rho = lag1_autocorr([w.postprocess(b) for b in batches]) if len(batches) > 1 else None
    return x0, {"nfe": (warm_evals + score.evals) / n, "denoise_steps": steps, "chains": chains,
                "outputs_per_chain": len(batches), "warmup_nfe_per_sample": warm_evals / n,
                "classifier_per_sample": (warm_clf + posterior.evals) / n, "lag1": rho,
                "ess_fraction": ess_fraction(rho),
                "lost_outputs": chains * len(batches) - have, "wall_s": warm_wall + wall,
                "sampler_stats": _shown_stats(sampler.stats)}


def run_tuned(w: Workload, budget: int, seed: int, n: int, outputs_per_chain: int) -> tuple[torch.Tensor | None, dict]:
    """``DLGSampler.for_budget`` on the workload: settings from ``budget`` and ``n`` by its pilot, whose model
    evaluations are counted with the rest; then consecutive ``step()`` batches until ``n`` outputs."""
    score, posterior = Counter(w.score), Counter(w.posterior)
    start = time.perf_counter()
    try:
        sampler = DLGSampler.for_budget(score, posterior, shape=w.shape, nfe=budget, n=n, seed=seed, levels=w.levels,
                                        outputs_per_chain=outputs_per_chain)
    except ValueError as err:
        return None, {"skipped": str(err)}
    batches, have = [], 0
    while have < n:
        batches.append(sampler.step())
        have += len(batches[-1])
    x0 = torch.cat(batches)[:n]
    rho = lag1_autocorr([w.postprocess(b) for b in batches]) if len(batches) > 1 else None
    tuning = sampler.tuning
    return x0, {"nfe": score.evals / n, "denoise_steps": sampler.denoise_steps, "chains": sampler.num_chains,
                "outputs_per_chain": len(batches), "restart_sigma": sampler.restart_sigma,
                "pilot_nfe_per_sample": (tuning["pilot"] or {}).get("evaluations", 0) / n,
                "predicted_nfe": tuning["predicted_nfe_per_sample"], "lag1": rho, "ess_fraction": ess_fraction(rho),
                "classifier_per_sample": posterior.evals / n, "wall_s": time.perf_counter() - start,
                "sampler_stats": _shown_stats(sampler.stats)}


def evaluate(w: Workload, x: torch.Tensor) -> dict[str, Any]:
    """Post-process and score ``x``; non-finite samples are counted and the metrics left out (never dropped)."""
    x = w.postprocess(x)
    bad = int((~torch.isfinite(x.flatten(1)).all(1)).sum())
    return {"nonfinite": bad} if bad else w.evaluate(x)


# ----------------------------------------------------------------------------- the plan
@dataclass
class Run:
    """One planned run; ``tags`` say which tables and curves it belongs to (``chosen``, ``lever:NAME=VALUE``,
    ``config:NAME``, ``family:INTEGRATOR``, ``diagnostic``, ``floor``)."""

    workload: str
    spec: dict[str, Any]
    budget: int | None
    seed: int
    n: int
    label: str
    tags: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return run_key(self.workload, self.spec, self.budget, self.seed, self.n)


def run_key(workload: str, spec: dict[str, Any], budget: int | None, seed: int, n: int) -> str:
    return json.dumps([workload, spec, budget, seed, n], sort_keys=True)


def _applies(item: Lever | DLGConfig, workload: str) -> bool:
    return item.workloads is None or workload in item.workloads


def dlg_specs(workload: str, outputs_per_chain: int, budgets: Iterable[int], lever_budgets: Iterable[int],
              levers: Iterable[str], configs: Iterable[str]) -> list[tuple[dict, int | None, str, list[str]]]:
    """``(spec, budget, label, tags)`` of every DLG run of a workload: the chosen point at ``budgets``, each lever's
    values and each named config at ``lever_budgets`` (once, unbudgeted, where a config fixes ``denoise_steps``)."""
    base = {OUTPUTS_PER_CHAIN: outputs_per_chain, **DEFAULT_DLG[workload]}
    family = lambda cfg: [f"family:{cfg.get('integrator', 'karras_heun')}"]  # noqa: E731
    out = [({"kind": "dlg", "config": base}, b, "DLG", ["chosen"] + family(base)) for b in budgets]
    out += [({"kind": "tuned", OUTPUTS_PER_CHAIN: outputs_per_chain}, b, "DLG tuned (for_budget)", ["tuned"])
            for b in budgets]
    for name in levers:
        lever = LEVERS[name]
        if not _applies(lever, workload):
            continue
        for value in lever.values:
            cfg = {**base, **(lever.base or {}), lever.param: value}
            tags = [f"lever:{name}={value}"] + (family(cfg) if lever.param == "integrator" else [])
            label = f"DLG {'Gibbs kernel ' if (lever.base or {}).get('kernel') == 'gibbs' else ''}{lever.param}={value}"
            out += [({"kind": "dlg", "config": cfg}, b, label, tags) for b in lever_budgets]
    for name in configs:
        item = DLG_CONFIGS[name]
        if not _applies(item, workload):
            continue
        cfg = {**base, **item.overrides}
        tags = [f"config:{name}"] + (["diagnostic"] if item.diagnostic else [])
        out += [({"kind": "dlg", "config": cfg}, b, f"DLG {name}", tags)
                for b in ([None] if "denoise_steps" in cfg else lever_budgets)]
    return out


#: The kinds of run a plan holds: true samples (the floor), a vanilla sampler, a DLG config, ``for_budget``.
RUN_KINDS = ("exact", "vanilla", "dlg", "tuned")


def plan_runs(workloads: dict[str, int], seeds: Iterable[int], vanilla: dict[str, Iterable[str]],
              budgets: Iterable[int], lever_budgets: Iterable[int], outputs_per_chain: int, levers: Iterable[str],
              configs: Iterable[str], floors: Iterable[str] = (), budgets_given: bool = True,
              kinds: Iterable[str] | None = None) -> list[Run]:
    """Every run, workload by workload (``workloads``: name -> samples per run), the same seeds for every sampler;
    runs that coincide (a lever value equal to the default) are merged and keep all their tags. Unless
    ``budgets_given``, a workload of ``BUDGETS_BY_WORKLOAD`` runs its own budgets. ``kinds``: only runs of these
    spec kinds (``RUN_KINDS``; e.g. ``("tuned",)`` after a change to ``for_budget``), default all."""
    runs: dict[str, Run] = {}
    budgets, lever_budgets, levers, configs = list(budgets), list(lever_budgets), list(levers), list(configs)
    for name, n in workloads.items():
        mine = budgets if budgets_given else BUDGETS_BY_WORKLOAD.get(name, budgets)
        specs: list[tuple[dict, int | None, str, list[str]]] = []
        if name in floors:
            specs.append(({"kind": "exact"}, None, "exact samples (floor)", ["floor"]))
        specs += [({"kind": "vanilla", "sampler": s}, b, s, [f"family:{s}"]) for s in vanilla[name] for b in mine]
        specs += dlg_specs(name, outputs_per_chain, mine, lever_budgets, levers, configs)
        specs = [s for s in specs if kinds is None or s[0]["kind"] in kinds]
        for seed in seeds:
            for spec, budget, label, tags in specs:
                run = Run(name, spec, budget, seed, n, label, list(tags))
                if run.key in runs:
                    runs[run.key].tags += [t for t in tags if t not in runs[run.key].tags]
                else:
                    runs[run.key] = run
    return list(runs.values())


# ----------------------------------------------------------------------------- results store
def read_json(path: Path) -> dict[str, Any]:
    """``path``'s JSON object, or ``{}`` if there is no such file."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def update_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read ``path``'s JSON object, ``change`` it in place and write it back, holding a lock: two bench processes
    writing one ``--out`` folder (say, mixtures and digits side by side) keep each other's records."""
    folder = os.open(Path(path).parent, os.O_RDONLY)  # the lock is on the folder: no lock file is left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        data = read_json(path)
        change(data)
        write_json(data, path)
    finally:
        os.close(folder)  # releases the lock


class Store:
    """``results.jsonl``: one finished row per line, appended and flushed as soon as it exists. On reading, the
    last line of a key wins, and a last line cut off by a kill is removed (its run is redone)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path} line {i + 1} is not JSON: fix or delete that line.") from None
                warnings.warn(f"{self.path}: removing a cut-off last line (an interrupted write); its run is redone.")
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(x + "\n" for x in lines[:-1]))
                os.replace(tmp, self.path)
                continue
            self.rows[row["key"]] = row
        self._read = self.path.stat().st_size if self.path.exists() else 0  # bytes seen (refresh reads what follows)

    def refresh(self) -> None:
        """Take in the whole rows other processes appended since this store last read the file (several ``dlg-bench``
        processes on one ``--out`` share the plan: a run one of them finished is skipped by the others)."""
        if not self.path.exists() or self.path.stat().st_size <= self._read:
            return
        with open(self.path, "rb") as f:
            f.seek(self._read)
            new = f.read()
        complete = new[:new.rfind(b"\n") + 1]  # a line still being written is read next time
        for line in complete.decode().splitlines():
            row = json.loads(line)
            self.rows[row["key"]] = row
        self._read += len(complete)

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row


def perform(w: Workload, run: Run, warm: dict) -> dict[str, Any]:
    """Do ``run`` on ``w`` and return its row (spec, counts, metrics)."""
    kind = run.spec["kind"]
    if kind == "exact":
        x, info = run_exact(w, run.seed, run.n)
    elif kind == "vanilla":
        x, info = run_vanilla(w, run.spec["sampler"], run.budget, run.seed, run.n)
    elif kind == "tuned":
        x, info = run_tuned(w, run.budget, run.seed, run.n, run.spec["outputs_per_chain"])
    else:
        x, info = run_dlg(w, run.spec["config"], run.budget, run.seed, run.n, warm)
    metrics = {} if x is None else evaluate(w, x)
    return {"key": run.key, "workload": run.workload, "spec": run.spec, "budget": run.budget, "seed": run.seed,
            "n": run.n, "label": run.label, "tags": run.tags, **info, **metrics}


def execute(plan: list[Run], store: Store, build: Callable[[str], Workload], progress: bool = True) -> int:
    """Run what ``store`` lacks, workload by workload (each built only if it has runs left), one tqdm bar over all
    of them; refresh the tags of finished rows a new plan puts in more curves. Before each run the store takes in what
    other processes on the same folder finished, and skips it. Returns the number of runs made here."""
    todo = [r for r in plan if r.key not in store.rows]
    for run in plan:
        row = store.rows.get(run.key)
        if row is not None and not set(run.tags) <= set(row["tags"]):
            store.append({**row, "tags": sorted(set(row["tags"]) | set(run.tags))})
    made = 0
    with tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for name in dict.fromkeys(r.workload for r in todo):
            w, warm = build(name), {}
            for run in (r for r in todo if r.workload == name):
                store.refresh()
                if run.key not in store.rows:  # else another process on the same --out has done it
                    bar.set_description(f"{name} {run.label} @{run.budget} seed {run.seed}")
                    store.append(perform(w, run, warm))
                    made += 1
                bar.update()
    return made
