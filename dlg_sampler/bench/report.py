"""RESULTS.md and plots from stored rows alone (``dlg-bench report`` reruns this without any sampling)."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import PEERS, WORKLOADS
from .runs import Store, read_json

RESULTS, META = "results.jsonl", "meta.json"
#: Metric names in tables and plots (all: lower is better).
METRIC_NAMES = {"sw": "sliced W2", "mmd": "MMD to the exact mixture", "mmd_se": "MMD s.e.",
                "mode_tv": "mode-weight TV", "mean_err": "mode mean error (std)",
                "cov_err": "mode cov error (rel.)", "fd_ref": "FD vs model reference",
                "fd_ref2": "FD vs 2nd-family reference",
                "kid_ref": "KID vs model reference", "kid_ref_se": "KID s.e.",
                "fd_real": "FD vs held-out digits", "class_tv": "class-proportion TV"}
#: Metrics DLG is judged on against the peers, per workload kind (the first one found in the rows is the headline).
VERDICT_METRICS = (("fd_ref", "fd_ref2", "class_tv"), ("fd_ref", "class_tv"), ("sw", "mmd", "mode_tv"),
                   ("sw", "mode_tv"))
#: The measures a verdict needs to agree on, where they ran (digits: FD against both references; mixtures: the sliced
#: W2 to exact samples and the MMD to the mixture itself).
HEADLINE_METRICS = ("fd_ref", "fd_ref2", "sw", "mmd")
PLOTS_HINT = 'plots need matplotlib: pip install "dlg-sampler[bench]"'


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Group:
    """One sampler spec at one budget on one workload, its rows by seed."""

    label: str
    spec: dict[str, Any]
    budget: int | None
    tags: list[str]
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def nfe(self) -> float:
        """The largest measured total NFE per sample over the seeds."""
        return max(r["nfe"] for r in self.rows.values())

    def values(self, key: str) -> dict[int, float] | None:
        """``key`` by seed, or ``None`` if a seed lacks it (a diverged run)."""
        vals = {s: r.get(key) for s, r in self.rows.items()}
        return None if any(v is None for v in vals.values()) else vals

    def stat(self, key: str) -> tuple[float, float, float] | None:
        """Mean, min, max over seeds."""
        vals = self.values(key)
        if not vals:
            return None
        v = list(vals.values())
        return sum(v) / len(v), min(v), max(v)

    def mean(self, key: str) -> float:
        s = self.stat(key)
        return math.inf if s is None else s[0]


def restrict(g: Group, seeds: list[int]) -> Group:
    """``g`` with only the rows of ``seeds``."""
    return Group(g.label, g.spec, g.budget, g.tags, {s: g.rows[s] for s in seeds})


def paired(a: Group | None, b: Group | None) -> tuple[Group | None, Group | None]:
    """``a`` and ``b`` over the seeds both ran (compared side by side, seed by seed)."""
    if a is None or b is None:
        return a, b
    seeds = sorted(set(a.rows) & set(b.rows))
    return restrict(a, seeds), restrict(b, seeds)


def group_rows(rows: list[dict[str, Any]]) -> dict[str, list[Group]]:
    """Rows that produced samples, grouped by workload, then by (spec, budget), over seeds."""
    out: dict[str, dict[str, Group]] = {}
    for r in rows:
        if "skipped" in r:
            continue
        key = json.dumps([r["spec"], r["budget"]], sort_keys=True)
        g = out.setdefault(r["workload"], {}).setdefault(key, Group(r["label"], r["spec"], r["budget"], []))
        g.rows[r["seed"]] = r
        g.tags = sorted(set(g.tags) | set(r["tags"]))
    return {w: list(gs.values()) for w, gs in out.items()}


def fmt(stat: tuple[float, float, float] | None) -> str:
    if stat is None:
        return "-"
    mean, lo, hi = stat
    return f"{mean:.4g}" if lo == hi else f"{mean:.4g} [{lo:.3g}-{hi:.3g}]"


def metrics_of(groups: list[Group]) -> list[str]:
    return [m for m in METRIC_NAMES if any(m in r for g in groups for r in g.rows.values())]


def verdict_metrics(groups: list[Group]) -> tuple[str, ...]:
    """The first ``VERDICT_METRICS`` entry whose metrics all ran (headline first)."""
    present = set(metrics_of(groups))
    return next((v for v in VERDICT_METRICS if present.issuperset(v)), VERDICT_METRICS[-1])


def is_dlg(g: Group) -> bool:
    """A DLG result (diagnostic rows are not)."""
    return g.kind in ("dlg", "tuned") and "diagnostic" not in g.tags


def best_peer(groups: list[Group], budget: int, metric: str, against: Group | None = None) -> Group | None:
    """The best of every ``PEERS`` sampler that ran at ``budget``: by its mean over the seeds it shares with
    ``against`` (the DLG group it is compared with, seed by seed: a peer that ran more seeds is judged on the ones
    compared), or over its own seeds where ``against`` is ``None``."""
    peers = [g for g in groups if g.kind == "vanilla" and g.spec["sampler"] in PEERS and g.budget == budget]

    def compared_mean(g: Group) -> float:
        if against is None:
            return g.mean(metric)
        return paired(against, g)[1].mean(metric) if set(g.rows) & set(against.rows) else math.inf

    return min(peers, key=compared_mean, default=None)


def peers_run(groups: list[Group]) -> list[str]:
    """The ``PEERS`` labels with rows in ``groups``, in ``PEERS`` order."""
    ran = {g.spec["sampler"] for g in groups if g.kind == "vanilla"}
    return [p for p in PEERS if p in ran]


def best_dlg(groups: list[Group], max_nfe: float, metric: str) -> Group | None:
    cands = [g for g in groups if is_dlg(g) and g.nfe <= max_nfe + 1e-9 and g.stat(metric)]
    return min(cands, key=lambda g: g.mean(metric), default=None)


def better_on(dlg: Group | None, peer: Group | None, metric: str) -> tuple[int, int]:
    """(seeds on which ``dlg`` scores lower than ``peer``, seeds both ran)."""
    a, b = (None, None) if dlg is None or peer is None else (dlg.values(metric), peer.values(metric))
    seeds = set(a or {}) & set(b or {})
    return sum(a[s] < b[s] for s in seeds), len(seeds)


def verdict(dlg: Group | None, peer: Group | None, metric: str) -> str:
    """``wins`` / ``loses`` when every paired seed agrees, else ``mixed``; with the count of seeds DLG is better."""
    k, n = better_on(dlg, peer, metric)
    return f"{_word(k, n)} ({k}/{n} seeds)" if n else "-"


def _word(k: int, n: int) -> str:
    """``wins`` / ``loses`` when all ``n`` paired seeds agree (``k`` of them better), else ``mixed``."""
    return "wins" if k == n else "loses" if k == 0 else "mixed"


# ----------------------------------------------------------------------------- markdown
def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in lines]


def _nfe(g: Group) -> str:
    warm = g.stat("warmup_nfe_per_sample")
    return f"{g.nfe:.2f}" + (f" ({warm[0]:.2f} warm-up)" if warm else "")


def _mean(g: Group, key: str) -> str:
    stat = g.stat(key)
    return "-" if stat is None else f"{stat[0]:.3g}"


def _order(g: Group) -> tuple:
    tags = g.tags
    rank = 0 if "chosen" in tags else 1 if "tuned" in tags else 4 if "diagnostic" in tags else \
        3 if any(t.startswith("config:") for t in tags) else 2
    return rank, g.label, g.budget if g.budget is not None else math.inf


def workload_section(name: str, groups: list[Group], info: dict[str, Any], plots: list[str]) -> list[str]:
    metrics = metrics_of(groups)
    any_row = next(iter(groups[0].rows.values()))
    common = sorted(set.intersection(*(set(g.rows) for g in groups)))
    more = sorted({s for g in groups for s in g.rows} - set(common))
    extra = f"; rows with more in the seeds column also ran seeds {_seed_list(more)}, and are compared over the " \
            "seeds both sides ran" if more else ""
    lines = [f"## {name}", "", f"{any_row['n']} samples per run, seeds {_seed_list(common)} for every sampler{extra}; "
             "mean [min-max] over seeds, lower is better. NFE = every model evaluation the run made / samples "
             "returned (DLG: warm-up included, its share in brackets)."]
    full_n = getattr(WORKLOADS.get(name), "reference_n", 0)  # a preset workload's full reference
    lines += [""] + [f"- {k}: {v}" for k, v in _info_lines(info, full_n)]
    floor = [g for g in groups if g.kind == "exact"]
    if floor:
        lines += ["", "Floor (exact samples scored the same way): " + ", ".join(
            f"{METRIC_NAMES[m]} {fmt(floor[0].stat(m))}" for m in metrics)]
    vanilla = sorted((g for g in groups if g.kind == "vanilla"), key=lambda g: (g.label, g.budget))
    lines += ["", "### Vanilla samplers (from sigma_max)", ""]
    lines += _table(["sampler", "budget", "NFE", "seeds"] + [METRIC_NAMES[m] for m in metrics] + ["wall s"],
                    [[g.label, str(g.budget), _nfe(g), str(len(g.rows))] + [fmt(g.stat(m)) for m in metrics]
                     + [_mean(g, "wall_s")] for g in vanilla])
    dlg = sorted((g for g in groups if g.kind in ("dlg", "tuned")), key=_order)
    lines += ["", "### DLG (chosen point first; the tuned sampler; levers; named configs; diagnostics)", ""]
    lines += _table(["config", "budget", "NFE", "seeds", "denoise steps"] + [METRIC_NAMES[m] for m in metrics]
                    + ["outputs/chain", "lag-1", "ESS fraction", "classifier/sample", "wall s"],
                    [[g.label + (" (chosen)" if "chosen" in g.tags else ""), str(g.budget), _nfe(g),
                      str(len(g.rows)), fmt(g.stat("denoise_steps"))] + [fmt(g.stat(m)) for m in metrics]
                     + [fmt(g.stat("outputs_per_chain")), fmt(g.stat("lag1")), fmt(g.stat("ess_fraction")),
                        _mean(g, "classifier_per_sample"), _mean(g, "wall_s")] for g in dlg])
    diverged = [f"{g.label} @{g.budget} (seed {s}: {r['nonfinite']} samples)" for g in groups
                for s, r in g.rows.items() if r.get("nonfinite")]
    if diverged:
        lines += ["", "Non-finite samples (metrics left out, shown as -): " + "; ".join(diverged)]
    lines += [""] + wins_and_losses(groups) + [""] + [f"![{name}: {p}]({p})" for p in plots] + [""]
    return lines


def _seed_list(seeds: list[int]) -> str:
    """``0, 1, 2`` or, for a run of consecutive seeds longer than three, ``3-9``."""
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _info_lines(info: dict[str, Any], reference_n: int) -> list[tuple[str, str]]:
    """``(key, text)`` lines of a workload's ``info``; a model reference under the workload's full ``reference_n``
    samples is marked as a quick one."""
    out = []
    for k, v in info.items():
        if k == "n":
            continue
        if k in ("reference", "second reference") and isinstance(v, dict):
            title = "model reference" if k == "reference" else "second model reference (another solver family)"
            quick = " (a quick reference: too small to resolve differences, for smoke runs only)" \
                if k == "reference" and v.get("n", 0) < reference_n else ""
            out.append((title, f"{v.get('n')} samples, {v.get('sampler')} {v.get('steps')} steps "
                        f"({v.get('nfe')} NFE) from sigma_max, seed {v.get('seed')}, sha256 "
                        f"{str(v.get('sha256'))[:12]}{quick}"))
            check = v.get("check")
            out.append((f"{title}: convergence check", "not recorded (run `dlg-bench reference`)" if not check else
                        f"at {check['n']} samples: {check['sampler']} FD {check['fd_check']:.4g}, class TV "
                        f"{check['class_tv_check']:.3g}; floor (its own sampler, other seed) FD "
                        f"{check['fd_floor']:.4g}, class TV {check['class_tv_floor']:.3g}"))
        elif isinstance(v, float):
            out.append((k, f"{v:.4g}"))
        else:
            out.append((k, str(v)))
    return out


def wins_and_losses(groups: list[Group]) -> list[str]:
    """Per peer budget: the chosen DLG point and the best DLG row with total NFE <= budget, against the best of
    ``PEERS`` at that budget, paired by seed; then one plain sentence per metric."""
    metrics = verdict_metrics(groups)
    budgets = sorted({g.budget for g in groups if g.kind == "vanilla" and g.spec["sampler"] in PEERS})
    lines = ["### DLG against the best peer (" + "/".join(peers_run(groups)) + ") at equal total NFE", ""]
    table, summary = [], {m: {} for m in metrics}
    for b in budgets:
        chosen = next((g for g in groups if "chosen" in g.tags and g.budget == b), None)
        for m in metrics:
            best = best_dlg(groups, b, m)
            peer = best_peer(groups, b, m, chosen or best)
            if peer is None or (chosen is None and best is None):
                continue
            over = " (over budget)" if chosen is not None and chosen.nfe > b + 1e-9 else ""
            (c, cp), (d, dp) = paired(chosen, peer), paired(best, peer)
            v = verdict(c, cp, m)
            summary[m].setdefault(v.split()[0], []).append(str(b))
            table.append([str(b), METRIC_NAMES[m], f"{peer.label} {fmt((cp or peer).stat(m))}",
                          "-" if c is None else f"{c.nfe:.2f} NFE: {fmt(c.stat(m))}{over}", v,
                          "-" if d is None else f"{d.label} @{d.budget}, {d.nfe:.2f} NFE: {fmt(d.stat(m))}"
                          + ("" if set(dp.rows) == set(cp.rows if cp else peer.rows) else
                             f" (peer {fmt(dp.stat(m))} on its {len(dp.rows)} seeds)"), verdict(d, dp, m)])
    if not table:
        return lines + ["No DLG row and peer row at a common budget."]
    lines += _table(["budget", "metric", "best peer", "chosen DLG", "chosen vs peer", "best DLG (NFE <= budget)",
                     "best vs peer"], table)
    lines.append("")
    for m in metrics:
        parts = [f"{word} at {', '.join(bs)} NFE" for word, bs in summary[m].items() if word != "-"]
        lines.append(f"- {METRIC_NAMES[m]}: the chosen DLG point " + ("; ".join(parts) or "has no comparable row")
                     + ".")
    return lines


def _verdict_cell(groups: list[Group], budget: int, metrics: tuple[str, ...]) -> str:
    """DLG as ``for_budget`` configures it (the tuned row; the chosen point where none ran) against the best peer at
    ``budget`` under each of ``metrics`` (the workload's ``HEADLINE_METRICS`` that ran): one verdict where they
    agree on the word (each measure's best peer named where they differ: beating the best peer by each measure is the
    verdict), each count where they do not."""
    chosen = next((g for g in groups if "tuned" in g.tags and g.budget == budget), None) or \
        next((g for g in groups if "chosen" in g.tags and g.budget == budget), None)
    found = []
    for m in metrics:
        peer = best_peer(groups, budget, m, chosen)
        c, p = paired(chosen, peer)
        k, n = better_on(c, p, m)
        if n:
            found.append((m, _word(k, n), f"{k}/{n}", peer.label))
    if not found:
        return "-"
    if len({w for _, w, _, _ in found}) == 1:
        word = found[0][1]
        counts = " and ".join(dict.fromkeys(c for _, _, c, _ in found))  # each measure's, where they differ
        peers = found[0][3] if len({p for *_, p in found}) == 1 else \
            " and ".join(f"{p} ({METRIC_NAMES[m]})" for m, _, _, p in found)
        both = f", {len(found)} measures agree" if len(found) > 1 else ""
        return f"{word} {counts} vs {peers}{both}"
    return "undecided: " + "; ".join(f"{METRIC_NAMES[m]} {w} {c} vs {p}" for m, w, c, p in found)


def overview(by_workload: dict[str, list[Group]]) -> list[str]:
    """One verdict table: per workload and budget, DLG as ``for_budget`` configures it (what ``dlg-sample`` runs)
    against the best of every peer that ran there, paired by seed, on the workload's headline measures (digits: FD
    against both references; mixtures: sliced W2 and the MMD to the exact mixture)."""
    budgets = sorted({g.budget for gs in by_workload.values() for g in gs
                      if g.kind == "vanilla" and g.spec["sampler"] in PEERS and g.budget is not None})
    lines = []
    for name, groups in by_workload.items():
        vm = verdict_metrics(groups)
        metrics = tuple(m for m in vm if m in HEADLINE_METRICS)
        cells = [_verdict_cell(groups, b, metrics) for b in budgets]
        which = "" if any("tuned" in g.tags for g in groups) else "; the sampler's defaults: for_budget did not run"
        if any(c != "-" for c in cells):
            lines.append([f"{name} ({' and '.join(METRIC_NAMES[m] for m in metrics)}{which})"] + cells)
    if not lines:
        return []
    return (["## Verdict: DLG against the best peer at equal total NFE", "",
             "DLG as `DLGSampler.for_budget` configures it for the budget and n (what `dlg-sample` runs; the tuned "
             "rows below) against the best peer at each budget (the best mean of every peer that ran there; wins / "
             "loses: better / worse on every paired seed, with the count; details per workload below). "
             "Where a workload has two measures (digits: FD against the model reference and against a reference "
             "from another solver family; mixtures: sliced W2 to exact samples and the MMD to the mixture itself), "
             "a verdict stands only where both agree.",
             ""] + _table(["workload (metric)"] + [f"{b} NFE" for b in budgets], lines) + [""])


def targets(by_workload: dict[str, list[Group]]) -> list[list[str]]:
    """The project's targets, computed: ``[target, measured, met]`` rows."""
    out = []

    def compare(title: str, dlg: Group | None, ref: Group | None, metric: str) -> None:
        if dlg is None or ref is None:
            out.append([title, "not measured in this run", "-"])
            return
        dlg, ref = paired(dlg, ref)
        d, r = dlg.mean(metric), ref.mean(metric)
        out.append([title, f"{dlg.label} @{dlg.nfe:.2f} NFE {fmt(dlg.stat(metric))} vs {ref.label} "
                    f"@{ref.budget} {fmt(ref.stat(metric))}; {verdict(dlg, ref, metric)}", "yes" if d <= r else "no"])

    digits = by_workload.get("digits", [])
    for b, word in ((12, ""), (20, " (stretch)")):
        compare(f"digits: best DLG at <= 12 total NFE vs best of {'/'.join(peers_run(digits))} at {b} NFE{word}, "
                "FD vs model reference", best_dlg(digits, 12, "fd_ref"),
                best_peer(digits, b, "fd_ref", best_dlg(digits, 12, "fd_ref")), "fd_ref")
    sep = by_workload.get("separated", [])
    heun = next((g for g in sep if g.kind == "vanilla" and g.spec["sampler"] == "karras_heun" and g.budget == 40), None)
    for m in ("mode_tv", "sw"):
        compare(f"separated mixture: best DLG at <= 15 total NFE vs vanilla karras_heun at 40 NFE, {METRIC_NAMES[m]}",
                best_dlg(sep, 15, m), heun, m)
    for name, groups in by_workload.items():
        metric = verdict_metrics(groups)[0]
        for tuned in sorted((g for g in groups if "tuned" in g.tags and g.stat(metric)), key=lambda g: g.budget):
            # The hand search: every DLG setting run at this budget that mixes (lag-1 <= 0.2, the mixing target);
            # a setting whose outputs are more correlated scores well on these metrics but is worth fewer samples.
            # Compared over the tuned sampler's seeds (a setting run on fewer is left out and counted).
            seeds = sorted(tuned.rows)
            ran = [g for g in groups if g.kind == "dlg" and is_dlg(g) and g.budget == tuned.budget and g.stat(metric)]
            hand = [restrict(g, seeds) for g in ran if set(seeds) <= set(g.rows)]
            mixing = [g for g in hand if g.stat("lag1") is not None and g.stat("lag1")[0] <= 0.2]
            best = min(mixing, key=lambda g: g.mean(metric), default=None)
            if best is None or len(hand) < 2:
                continue
            any_best = min(hand, key=lambda g: g.mean(metric))
            note = "" if any_best is best else (f"; unconstrained best {any_best.label} {fmt(any_best.stat(metric))} "
                                                f"with lag-1 {any_best.stat('lag1')[0]:.2f}")
            fewer = len(ran) - len(hand)
            note += f"; {fewer} setting{'s' * (fewer > 1)} run on fewer seeds left out" if fewer else ""
            out.append([f"{name}: tuned sampler (for_budget) within 10% of the best hand-searched DLG setting with "
                        f"lag-1 <= 0.2 at {tuned.budget} NFE, {METRIC_NAMES[metric]}",
                        f"tuned @{tuned.nfe:.2f} NFE {fmt(tuned.stat(metric))} vs {best.label} @{best.nfe:.2f} "
                        f"{fmt(best.stat(metric))} over {len(seeds)} seeds (ratio "
                        f"{tuned.mean(metric) / best.mean(metric):.2f}; tuned better on "
                        f"{better_on(tuned, best, metric)[0]}/{len(seeds)} seeds){note}",
                        "yes" if tuned.mean(metric) <= 1.1 * best.mean(metric) else "no"])
        lag = [g.stat("lag1") for g in groups if "chosen" in g.tags]
        lag = [s for s in lag if s is not None]
        if lag:
            worst = max(s[2] for s in lag)
            out.append([f"{name}: lag-1 autocorrelation of the chosen DLG point <= 0.2", f"at most {worst:.3f}",
                        "yes" if worst <= 0.2 else "no"])
    return out


def write_markdown(by_workload: dict[str, list[Group]], meta: dict[str, Any], plots: dict[str, list[str]],
                   path: Path) -> None:
    lines = ["# dlg-bench results", ""]
    invocations = Counter(f"`{r['command']}` on {r['machine']}, {r['date']}" for r in meta.get("runs", []))
    for text, times in invocations.items():  # a resumed run is the same invocation again
        lines.append(f"- {text}" + (f" ({times} invocations, each resuming the last)" if times > 1 else ""))
    wall = sum(r.get("wall_s", 0.0) for gs in by_workload.values() for g in gs for r in g.rows.values())
    lines += [f"- sampling wall time of all rows: {wall:.0f} s", ""]
    if not any(plots.values()):
        lines += [f"No plots: {PLOTS_HINT}.", ""]
    lines += overview(by_workload)
    for name, groups in by_workload.items():
        lines += workload_section(name, groups, meta.get("workloads", {}).get(name, {}), plots.get(name, []))
    lines += ["## Targets", ""] + _table(["target", "measured (mean [min-max] over seeds)", "met"],
                                         targets(by_workload))
    skipped = meta.get("skipped", [])
    if skipped:
        lines += ["", "## Runs that did not fit their budget", ""] + [f"- {s}" for s in skipped]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- plots
def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no cheaper point beats: the lower-left envelope of (NFE, metric)."""
    out, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def floor_value(groups: list[Group], info: dict[str, Any], metric: str) -> float | None:
    """The metric's floor: the exact-samples row, or the digits reference check's floor at the runs' n."""
    exact = next((g for g in groups if g.kind == "exact" and g.stat(metric)), None)
    if exact is not None:
        return exact.stat(metric)[0]
    check = info.get("reference", {}).get("check") or {}
    n = next(iter(groups[0].rows.values()))["n"]
    key = {"fd_ref": "fd_floor", "class_tv": "class_tv_floor"}.get(metric)
    return check.get(key) if key and check.get("n") == n else None


def _style(ax, groups: list[Group]) -> None:
    """Log axes labelled with plain numbers, x ticks at the budgets."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set(xscale="log", yscale="log")
    budgets = sorted({g.budget for g in groups if g.budget is not None})
    if budgets:
        ax.set_xticks(budgets)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _errorbar(ax, groups: list[Group], metric: str, **style) -> None:
    pts = sorted((g.nfe, g.stat(metric)) for g in groups if g.stat(metric))
    if pts:
        x, s = zip(*pts)
        y = [v[0] for v in s]
        err = [[v[0] - v[1] for v in s], [v[2] - v[0] for v in s]]
        ax.errorbar(x, y, yerr=err, capsize=2, **style)


def plot_families(groups: list[Group], metric: str, floor: float | None, title: str, path: Path) -> None:
    """One small panel per sampler family, shared axes: vanilla (solid) and DLG with it (dashed), same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(t[7:] for g in groups for t in g.tags if t.startswith("family:")))
    cols = min(4, len(families))
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True, sharey=True, squeeze=False)
    for i, (ax, fam) in enumerate(zip(axes.flat, families)):
        color = plt.cm.tab10(i % 10)
        members = [g for g in groups if f"family:{fam}" in g.tags]
        _errorbar(ax, [g for g in members if g.kind == "vanilla"], metric, color=color, ls="-", marker=".",
                  label="vanilla")
        _errorbar(ax, [g for g in members if is_dlg(g)], metric, color=color, ls="--", marker="o", ms=3, label="DLG")
        if floor is not None:
            ax.axhline(floor, color="gray", lw=0.8)
        ax.set_title(fam, fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(families):]:
        ax.set_visible(False)
    _style(axes[0, 0], groups)
    fig.supxlabel("total NFE per sample")
    fig.supylabel(METRIC_NAMES[metric])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(groups: list[Group], metric: str, floor: float | None, title: str, path: Path) -> None:
    """Quality vs total NFE: one curve per lever (the envelope of its points, all points faint), the chosen point
    marked, the peers as reference curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    levers = sorted({t[6:].split("=")[0] for g in groups for t in g.tags if t.startswith("lever:")})
    for i, lever in enumerate(levers):
        pts = [(g.nfe, g.mean(metric)) for g in groups if any(t.startswith(f"lever:{lever}=") for t in g.tags)
               and g.stat(metric)]
        color = plt.cm.tab10(i % 10)
        ax.scatter(*zip(*pts), color=color, s=8, alpha=0.35)
        ax.plot(*zip(*pareto(pts)), color=color, ls="--", marker="o", ms=3, label=f"lever {lever}")
    chosen = sorted((g.nfe, g.mean(metric)) for g in groups if "chosen" in g.tags and g.stat(metric))
    if chosen:
        ax.plot(*zip(*chosen), color="black", marker="*", ms=10, ls=":", label="DLG chosen point")
    for ls, peer in zip(itertools.cycle(("-", "-.", ":")), peers_run(groups)):
        _errorbar(ax, [g for g in groups if g.kind == "vanilla" and g.spec["sampler"] == peer], metric, color="gray",
                  ls=ls, marker=".", label=f"{peer} (vanilla)")
    if floor is not None:
        ax.axhline(floor, color="gray", lw=0.8, label="floor")
    _style(ax, groups)
    ax.set(xlabel="total NFE per sample", ylabel=METRIC_NAMES[metric], title=title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(by_workload: dict[str, list[Group]], meta: dict[str, Any], out: Path) -> dict[str, list[str]]:
    """Both plots per workload (headline metric), or none without matplotlib (the hint is printed)."""
    if not have_matplotlib():
        print(f"no plots: {PLOTS_HINT}")
        return {}
    plots = {}
    for name, groups in by_workload.items():
        metric = verdict_metrics(groups)[0]
        floor = floor_value(groups, meta.get("workloads", {}).get(name, {}), metric)
        names = [f"{name}-families.png", f"{name}-frontier.png"]
        plot_families(groups, metric, floor, f"{name}: vanilla vs DLG per sampler family", out / names[0])
        plot_frontier(groups, metric, floor, f"{name}: DLG levers vs peers", out / names[1])
        plots[name] = names
    return plots


def load(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stored rows and meta of an output folder."""
    if not (out / RESULTS).exists():
        raise FileNotFoundError(f"no {RESULTS} in {out}: run dlg-bench --out {out} first.")
    return list(Store(out / RESULTS).rows.values()), read_json(out / META)


def report(out: Path) -> Path:
    """Rebuild ``RESULTS.md`` and the plots in ``out`` from its stored rows."""
    out = Path(out)
    rows, meta = load(out)
    ns = {w: info.get("n") for w, info in meta.get("workloads", {}).items()}
    other_n = [r for r in rows if ns.get(r["workload"], r["n"]) != r["n"]]
    if other_n:
        print(f"report: leaving out {len(other_n)} rows made with another n than the last run's (use one --out per n)")
    rows = [r for r in rows if r not in other_n]
    skipped: dict[str, list[str]] = {}
    for r in rows:
        if "skipped" in r:
            what = f"{r['workload']}: {r['label']} @{r['budget']}: {r['skipped']}"
            skipped.setdefault(what, []).append(str(r["seed"]))
    meta["skipped"] = [f"{k} (seeds {', '.join(v)})" for k, v in skipped.items()]
    by_workload = group_rows(rows)
    plots = make_plots(by_workload, meta, out)
    write_markdown(by_workload, meta, plots, out / "RESULTS.md")
    return out / "RESULTS.md"
