"""dlg-bench on tiny mixture runs: every model call counted, resume, reference checksum, plot-less path, report."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dlg_sampler.bench import cli, reference, report, runs
from dlg_sampler.bench.registry import WORKLOADS
from dlg_sampler.bench.workloads import mixture_workload
from dlg_sampler.testing import CountingScore

ROOT = Path(__file__).resolve().parents[1]

#: A tiny bench: 2 seeds x (floor + 2 samplers x 2 budgets + DLG at 2 budgets + a lever) on the separated mixture.
TINY = ["--workloads", "separated", "--n", "200", "--seeds", "0", "1", "--nfe", "8", "12", "--lever-nfe", "12",
        "--samplers", "karras_heun", "DPM++2M", "--levers", "restart_sigma-separated", "--configs", "--outputs-per-chain", "10"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny bench run, shared (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("bench")
    cli.main(TINY + ["--out", str(out)])
    return out


def _rows(out):
    return [json.loads(line) for line in (out / report.RESULTS).read_text().splitlines()]


@pytest.mark.parametrize("spec,budget", [
    ({"kind": "vanilla", "sampler": "karras_heun"}, 10),
    ({"kind": "vanilla", "sampler": "DPM++2M"}, 10),
    ({"kind": "dlg", "config": {"outputs_per_chain": 8}}, 12),
    ({"kind": "dlg", "config": {"outputs_per_chain": 8, "integrator": "UniPC", "restart_sigma": 20.0}}, 12),
    ({"kind": "dlg", "config": {"outputs_per_chain": 8, "kernel": "gibbs", "integrator": "karras_heun",
                                "gibbs_steps": 2, "step_size": 0.05}}, 16),
    ({"kind": "dlg", "config": {"outputs_per_chain": 8, "kernel": "gibbs", "integrator": "UniPC", "gibbs_steps": 3,
                                "step_size": 0.05, "sigma_mode": "sample"}}, 20),
    ({"kind": "dlg", "config": {"outputs_per_chain": 1, "denoise_steps": 2, "kernel": "gibbs", "gibbs_steps": 1,
                                "step_size": 0.05}}, None),
    ({"kind": "tuned", "outputs_per_chain": 8}, 12),
])
def test_reported_nfe_is_every_counted_model_evaluation(spec, budget):
    """The row's NFE x n equals every score evaluation the run made (DLG: warm-up, burn-in, Gibbs, denoising,
    Tweedie; the tuned sampler: its pilot too); a fitted DLG row stays within its budget."""
    w = mixture_workload("separated", WORKLOADS["separated"], 64)
    w.score = counting = CountingScore(w.score)
    row = runs.perform(w, runs.Run("separated", spec, budget, 0, 64, "x"), warm={})
    assert counting.evaluations > 0 and row["nfe"] * 64 == pytest.approx(counting.evaluations, abs=1e-9)
    if spec["kind"] == "tuned":
        assert row["nfe"] <= budget and row["outputs_per_chain"] >= 8  # fewer chains where steps need the budget
    if spec["kind"] == "dlg":
        assert 0 < row["warmup_nfe_per_sample"] < row["nfe"]
        assert row["outputs_per_chain"] == spec["config"]["outputs_per_chain"]
        if budget is not None:
            assert row["nfe"] <= budget


def test_shared_warm_up_is_charged_to_every_row_and_changes_nothing():
    """Budgets share one warm-up; each row is charged all of it and equals a run with its own warm-up."""
    w = mixture_workload("separated", WORKLOADS["separated"], 80)
    spec = {"kind": "dlg", "config": {"outputs_per_chain": 20}}
    warm = {}
    shared = [runs.perform(w, runs.Run("separated", spec, b, 0, 80, "x"), warm) for b in (10, 15)]
    alone = runs.perform(w, runs.Run("separated", spec, 15, 0, 80, "x"), {})
    assert shared[1]["nfe"] == alone["nfe"] > shared[0]["nfe"] and shared[1]["sw"] == alone["sw"]


def test_lag1_of_independent_outputs_is_near_0_and_of_repeated_outputs_is_1():
    g = torch.Generator().manual_seed(0)
    independent = [torch.randn(200, 1, 4, 4, generator=g) for _ in range(10)]
    assert abs(runs.lag1_autocorr(independent)) < 0.03
    repeated = [independent[0]] * 10
    assert runs.lag1_autocorr(repeated) == pytest.approx(1.0)
    assert runs.ess_fraction(1.0) == 0.0 and runs.lag1_autocorr(independent[:1]) is None


def test_fit_denoise_steps_spends_what_the_warm_up_leaves():
    # 100 samples, warm-up 300 evaluations (3 per sample), 2 Gibbs: 12 - 3 - 2 = 7 NFE for Heun + Tweedie.
    steps = runs.fit_denoise_steps(12, 100, 300, 2, "karras_heun")
    from dlg_sampler.integrators import count_nfe

    assert count_nfe("karras_heun", steps, dlg=True) <= 7 < count_nfe("karras_heun", steps + 1, dlg=True)
    assert runs.fit_denoise_steps(5, 100, 300, 2, "karras_heun") is None


def test_tiny_run_writes_rows_report_and_plots(tiny_run):
    rows = _rows(tiny_run)
    kinds = {r["spec"]["kind"] for r in rows}
    assert kinds == {"exact", "vanilla", "dlg", "tuned"} and {r["seed"] for r in rows} == {0, 1}
    dlg = [r for r in rows if r["spec"]["kind"] == "dlg" and "skipped" not in r]
    assert dlg and all(r["outputs_per_chain"] == 10 and -1 <= r["lag1"] <= 1 and r["nfe"] <= r["budget"] for r in dlg)
    md = (tiny_run / "RESULTS.md").read_text()
    assert "DLG (chosen)" in md and "## Targets" in md and "at equal total NFE" in md and "lag-1" in md
    assert "DLG tuned (for_budget)" in md and "tuned sampler (for_budget) within 10% of the best hand-searched" in md
    assert (tiny_run / "separated-families.png").stat().st_size > 10_000
    assert (tiny_run / "separated-frontier.png").stat().st_size > 10_000


def test_processes_sharing_an_out_folder_skip_what_another_finished(tmp_path, monkeypatch):
    """Two processes planned the same runs on one --out: while this one runs, the other finishes the next one (rows
    appended to the same results.jsonl); this one skips those it sees finished and does the rest once. A row still
    being written when the file is read is taken in the next time."""
    path = tmp_path / report.RESULTS
    other = runs.Store(path)
    perform, calls = runs.perform, []

    def beside(w, run, warm):
        calls.append(run.key)
        row = perform(w, run, warm)
        later = [r for r in plan if r.key not in other.rows and r.key not in calls]
        if later:  # the other process finishes the next run meanwhile
            other.append({**row, "key": later[0].key})
        return row

    monkeypatch.setattr(runs, "perform", beside)
    plan = runs.plan_runs({"separated": 40}, (0,), {"separated": ("karras_heun", "UniPC")}, (8, 12), (12,), 10, (),
                          (), floors=[], budgets_given=True)
    store = runs.Store(path)
    build = lambda name: mixture_workload(name, WORKLOADS[name], 40)  # noqa: E731
    made = runs.execute(plan, store, build, progress=False)
    finished = {json.loads(line)["key"] for line in path.read_text().splitlines() if line.endswith("}")}
    assert made == len(calls) < len(plan) and finished == {r.key for r in plan}
    assert len(set(calls)) == len(calls) and not set(calls) & (finished - set(calls))
    row = json.dumps({**json.loads(path.read_text().splitlines()[0]), "key": "late"}) + "\n"
    with open(path, "a") as f:
        f.write(row[:20])
        f.flush()
        store.refresh()
        assert "late" not in store.rows
        f.write(row[20:])
    store.refresh()
    assert "late" in store.rows


def test_resume_after_a_failure_runs_only_what_is_missing(tmp_path, monkeypatch):
    """An exception after 5 rows keeps those rows; the same command then runs only the rest, and a row cut off
    by a kill is redone."""
    perform, calls = runs.perform, []

    def failing(w, run, warm):
        if len(calls) == 5:
            raise RuntimeError("injected")
        calls.append(run.key)
        return perform(w, run, warm)

    monkeypatch.setattr(runs, "perform", failing)
    with pytest.raises(RuntimeError, match="injected"):
        cli.main(TINY + ["--out", str(tmp_path)])
    assert len(_rows(tmp_path)) == 5
    lines = (tmp_path / report.RESULTS).read_text().splitlines()
    cut = json.loads(lines[-1])["key"]
    (tmp_path / report.RESULTS).write_text("\n".join(lines[:-1] + [lines[-1][:40]]))  # killed while writing row 5
    calls.clear()
    monkeypatch.setattr(runs, "perform", lambda w, run, warm: calls.append(run.key) or perform(w, run, warm))
    with warnings.catch_warnings(record=True) as seen:  # pytest.warns would re-emit diffusers' filtered warnings
        warnings.simplefilter("always", UserWarning)
        cli.main(TINY + ["--out", str(tmp_path)])
    assert any("cut-off last line" in str(w.message) for w in seen)
    keys = {r["key"] for r in _rows(tmp_path)}
    assert cut in calls and len(calls) == len(keys) - 4
    assert keys == set(calls) | {json.loads(x)["key"] for x in lines[:4]}
    calls.clear()
    cli.main(TINY + ["--out", str(tmp_path)])
    assert calls == []


def test_two_bench_processes_on_one_folder_keep_each_others_records(tmp_path, monkeypatch):
    """Another dlg-bench writing the same --out while this one runs (e.g. mixtures and digits side by side): its
    invocation and workload records survive this run's own writes."""
    execute = cli.execute

    def beside(plan, store, build):
        def other(meta):
            meta["runs"].append({"command": "dlg-bench --out x --workloads digits", "machine": "m", "date": "d"})
            meta["workloads"]["digits"] = {"n": 5}

        runs.update_json(tmp_path / report.META, other)
        return execute(plan, store, build)

    monkeypatch.setattr(cli, "execute", beside)
    cli.main(TINY[:2] + ["--n", "40", "--seeds", "0", "--nfe", "8", "--samplers", "karras_heun", "--levers",
                         "--configs", "--out", str(tmp_path)])
    meta = runs.read_json(tmp_path / report.META)
    assert [r["command"].split()[-1] for r in meta["runs"]] == [str(tmp_path), "digits"]
    assert meta["workloads"]["digits"] == {"n": 5} and "mixture" in meta["workloads"]["separated"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.suffix == ".png") == ["RESULTS.md", "meta.json",
                                                                                      "results.jsonl"]


def test_report_rebuilds_markdown_from_stored_rows_without_sampling(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    before = (out / "RESULTS.md").read_text()
    for f in out.glob("*.png"):
        f.unlink()
    (out / "RESULTS.md").unlink()
    monkeypatch.setattr(runs, "perform", lambda *a: pytest.fail("report must not sample"))
    cli.main(["report", "--out", str(out)])
    assert (out / "RESULTS.md").read_text() == before and len(list(out.glob("*.png"))) == 2


def test_without_matplotlib_results_and_markdown_are_still_written(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    for f in out.glob("*.png"):
        f.unlink()
    cli.main(TINY + ["--out", str(out), "--nfe", "8", "12", "15"])  # a few new rows computed without matplotlib
    assert 'pip install "dlg-sampler[bench]"' in capsys.readouterr().out
    assert any(r["budget"] == 15 for r in _rows(out)) and not list(out.glob("*.png"))
    assert "No plots" in (out / "RESULTS.md").read_text()


def test_corrupted_reference_is_named_with_the_command_that_remakes_it(tmp_path, monkeypatch):
    path = tmp_path / f"{reference.reference_name(30, 0)}.safetensors"
    reference.save_reference(torch.randn(30, 1, 8, 8), path, {"n": 30, "seed": 0})
    x, info = reference.load_reference(30, 0, tmp_path)
    assert x.shape == (30, 1, 8, 8) and info["sha256"] == reference.sha256(path)
    monkeypatch.setattr(reference, "make_reference", lambda *a, **k: pytest.fail("must not be regenerated"))
    assert torch.equal(reference.ensure_reference(30, 0, tmp_path)[0], x)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(reference.ReferenceError, match="SHA-256") as err:
        reference.ensure_reference(30, 0, tmp_path)
    assert str(path) in str(err.value) and f"dlg-bench reference --reference-n 30 --reference-seed 0 " \
                                           f"--reference-dir {tmp_path}" in str(err.value)


def test_reference_chunks_resume_after_a_kill(tmp_path):
    drawn, kill_at = [], 2

    def draw(m, g):
        drawn.append(m)
        if len(drawn) == kill_at:
            raise RuntimeError("killed")
        return torch.randn(m, 2, generator=g)

    with pytest.raises(RuntimeError, match="killed"):
        reference.sample_in_chunks(draw, 1200, "test", 0, tmp_path, "test")
    drawn, kill_at = [], None
    resumed = reference.sample_in_chunks(draw, 1200, "test", 0, tmp_path, "test")
    assert drawn == [500, 200] and resumed.shape == (1200, 2)
    whole = reference.sample_in_chunks(lambda m, g: torch.randn(m, 2, generator=g), 1200, "test", 0,
                                       tmp_path / "whole", "test")
    assert torch.equal(resumed, whole)


def test_reference_cache_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert reference.default_reference_dir() == tmp_path / "dlg-sampler" / "reference"


def test_help_shows_every_option_with_its_default_and_no_rest_markup():
    text = cli.parser().format_help()
    assert "``" not in text
    for action in cli.parser()._actions:
        if action.option_strings and action.dest not in ("help", "quick"):
            assert "default" in action.help, action.dest


def test_plan_merges_a_lever_point_equal_to_the_chosen_one_and_pairs_seeds():
    plan = runs.plan_runs({"mixture": 100}, [0, 1], {"mixture": ["UniPC"]}, [10], [10], 100, ["outputs_per_chain"], [])
    chosen = [r for r in plan if "chosen" in r.tags]
    assert len(chosen) == 2 and all("lever:outputs_per_chain=100" in r.tags for r in chosen)
    assert sum("tuned" in r.tags for r in plan) == 2
    assert len({r.key for r in plan}) == len(plan) and {r.seed for r in plan if r.spec["kind"] == "vanilla"} == {0, 1}
    only = runs.plan_runs({"mixture": 100}, [0, 1], {"mixture": ["UniPC"]}, [10], [10], 100, ["outputs_per_chain"], [],
                          floors=["mixture"], kinds=("tuned", "exact"))
    assert {r.key for r in only} == {r.key for r in plan + runs.plan_runs(
        {"mixture": 100}, [0, 1], {"mixture": []}, [], [], 100, [], [], floors=["mixture"])
        if r.spec["kind"] in ("tuned", "exact")} and {r.spec["kind"] for r in only} == {"tuned", "exact"}


def test_verdicts_are_paired_by_seed_and_the_frontier_keeps_improvements():
    def group(kind, values):
        return report.Group("x", {"kind": kind, "sampler": "UniPC"}, 10, [],
                            {s: {"nfe": 10.0, "sw": v} for s, v in enumerate(values)})

    assert report.verdict(group("dlg", [1, 2, 3]), group("vanilla", [2, 3, 4]), "sw") == "wins (3/3 seeds)"
    assert report.verdict(group("dlg", [1, 4, 3]), group("vanilla", [2, 3, 4]), "sw") == "mixed (2/3 seeds)"
    assert report.pareto([(10, 3.0), (8, 4.0), (12, 3.5), (15, 1.0)]) == [(8, 4.0), (10, 3.0), (15, 1.0)]


def test_the_verdict_table_names_the_best_peer_and_stands_only_where_both_measures_agree():
    def group(label, kind, budget, ref, ref2, tags=()):
        spec = {"kind": kind, "sampler": label} if kind == "vanilla" else {"kind": kind}
        return report.Group(label, spec, budget, list(tags), {s: {"nfe": budget - 0.5, "fd_ref": a, "fd_ref2": b,
                                                                   "class_tv": 0.1} for s, (a, b) in
                                                               enumerate(zip(ref, ref2))})

    digits = [group("UniPC", "vanilla", 8, [2, 2, 2], [2, 2, 2]), group("UniPC-3", "vanilla", 8, [3, 3, 3], [1, 1, 1]),
              group("DLG", "dlg", 8, [9, 9, 9], [9, 9, 9], ["chosen"]),  # the tuned row speaks where it ran
              group("DLG tuned", "tuned", 8, [1, 1, 1], [1.5, 1.5, 0.5], ["tuned"]),
              group("UniPC", "vanilla", 10, [2, 2, 2], [2, 2, 2]), group("DLG", "dlg", 10, [1, 1, 3], [1, 1, 3],
                                                                         ["chosen"])]
    text = "\n".join(report.overview({"digits": digits}))
    assert "| digits (FD vs model reference and FD vs 2nd-family reference) |" in text
    # At 8 the references name different best peers and disagree: no verdict; at 10 both say 2 of 3 seeds.
    assert ("undecided: FD vs model reference wins 3/3 vs UniPC; FD vs 2nd-family reference mixed 1/3 vs "
            "UniPC-3") in text  # UniPC-3 has the better mean on the second reference (1 < 2)
    assert "| mixed 2/3 vs UniPC, 2 measures agree |" in text
    mixture = [group("iPNDM", "vanilla", 8, [2, 2], [2, 2]), group("DLG", "dlg", 8, [1, 1], [1, 1], ["chosen"])]
    for g in mixture:
        for r in g.rows.values():
            r["sw"] = r.pop("fd_ref")
            del r["fd_ref2"], r["class_tv"]
    both = "\n".join(report.overview({"mixture": mixture, "digits": digits}))
    assert "| mixture (sliced W2; the sampler's defaults: for_budget did not run) | wins 2/2 vs iPNDM | - |" in both
    # Where the MMD to the exact mixture ran beside the sliced W2, both must agree: at 8 they do, at 10 they do not,
    # at 12 they agree on the word with different counts (both shown).
    measured = [group("iPNDM", "vanilla", b, [2, 2, 2], [2, 2, 2]) for b in (8, 10, 12)] + \
        [group("DLG tuned", "tuned", 8, [1, 1, 1], [1, 1, 1], ["tuned"]),
         group("DLG tuned", "tuned", 10, [1, 1, 1], [3, 1, 3], ["tuned"]),
         group("DLG tuned", "tuned", 12, [1, 3, 1], [1, 3, 3], ["tuned"])]
    for g in measured:
        for r in g.rows.values():
            r["sw"], r["mmd"], r["mode_tv"] = r.pop("fd_ref"), r.pop("fd_ref2"), r.pop("class_tv")
    text = "\n".join(report.overview({"mixture": measured}))
    assert ("| mixture (sliced W2 and MMD to the exact mixture) | wins 3/3 vs iPNDM, 2 measures agree | "
            "undecided: sliced W2 wins 3/3 vs iPNDM; MMD to the exact mixture mixed 1/3 vs iPNDM | "
            "mixed 2/3 and 1/3 vs iPNDM, 2 measures agree |") in text
    # Ahead of each measure's own best peer is a verdict: the peers are named, each with its measure.
    unipc = group("UniPC", "vanilla", 8, [3, 3, 3], [1.5, 1.5, 1.5])
    for r in unipc.rows.values():
        r["sw"], r["mmd"], r["mode_tv"] = r.pop("fd_ref"), r.pop("fd_ref2"), r.pop("class_tv")
    measured.append(unipc)
    text = "\n".join(report.overview({"mixture": measured}))
    assert ("| wins 3/3 vs iPNDM (sliced W2) and UniPC (MMD to the exact mixture), 2 measures agree | "
            "undecided:") in text


def test_the_best_peer_is_the_best_on_the_seeds_compared():
    """A peer that ran more seeds than DLG is judged on the seeds DLG ran: its extra seeds can make its mean the
    lowest without making it the strongest opponent on the seeds the verdict pairs."""
    def group(label, kind, values, tags=()):
        spec = {"kind": kind, "sampler": label} if kind == "vanilla" else {"kind": kind}
        return report.Group(label, spec, 10, list(tags), {s: {"nfe": 10.0, "sw": v} for s, v in enumerate(values)})

    dlg = group("DLG tuned", "tuned", [1.5, 1.5, 1.5], ["tuned"])
    many = group("UniPC", "vanilla", [2.0, 2.0, 2.0, 0.1, 0.1, 0.1])  # best over its six seeds, not over 0-2
    few = group("DEIS-3", "vanilla", [1.0, 1.8, 1.8])
    assert report.best_peer([dlg, many, few], 10, "sw") is many
    assert report.best_peer([dlg, many, few], 10, "sw", dlg) is few
    assert "| mixed 2/3 vs DEIS-3 |" in "\n".join(report.overview({"mixture": [dlg, many, few]}))


def test_the_tuned_target_compares_over_the_tuned_seeds_and_says_what_it_leaves_out():
    """A setting run on fewer seeds than the tuned sampler is not its yardstick (it is counted instead), a sticky
    one (lag-1 > 0.2) is named apart, and the section says which rows ran more seeds."""
    def group(label, kind, values, lag=0.1, tags=()):
        return report.Group(label, {"kind": kind}, 12, list(tags),
                            {s: {"nfe": 11.5, "n": 100, "sw": v, "lag1": lag} for s, v in values.items()})

    tuned = group("DLG tuned (for_budget)", "tuned", {0: 1.0, 1: 1.0, 2: 1.2, 3: 1.0}, tags=["tuned"])
    hand = group("DLG a", "dlg", {0: 1.1, 1: 0.9, 2: 1.0, 3: 1.0})
    fewer = group("DLG b", "dlg", {0: 0.5, 1: 0.5})
    sticky = group("DLG c", "dlg", {0: 0.8, 1: 0.8, 2: 0.8, 3: 0.8}, lag=0.5)
    [row] = [r for r in report.targets({"separated": [tuned, hand, fewer, sticky]}) if "tuned sampler" in r[0]]
    assert "vs DLG a @11.50 1 [0.9-1.1] over 4 seeds (ratio 1.05; tuned better on 1/4 seeds)" in row[1]
    assert "unconstrained best DLG c" in row[1] and "1 setting run on fewer seeds left out" in row[1]
    assert row[2] == "yes"
    text = "\n".join(report.workload_section("separated", [tuned, hand, fewer, sticky], {}, []))
    assert "seeds 0, 1 for every sampler; rows with more in the seeds column also ran seeds 2, 3" in text


def test_a_scheduler_that_cannot_start_at_the_top_is_a_skipped_row_not_a_crash():
    w = mixture_workload("wide", WORKLOADS["wide"], 50)
    x, info = runs.run_vanilla(w, "DDIM", 15, 0, 50)
    assert x is None and "cannot walk 15 steps" in info["skipped"]


def test_committed_results_are_what_the_report_makes_from_the_committed_rows(tmp_path):
    """benchmarks/RESULTS.md is generated, never edited by hand: the README's digest quotes it."""
    committed = ROOT / "benchmarks"
    for name in (report.RESULTS, report.META):
        shutil.copy(committed / name, tmp_path / name)
    assert report.report(tmp_path).read_text() == (committed / "RESULTS.md").read_text()
