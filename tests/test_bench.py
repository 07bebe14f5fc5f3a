"""dlg-bench in a tiny configuration: files written, numbers consistent with counted model calls."""

import json

import torch

from dlg_sampler import bench


class Counting:
    """Counts sample evaluations of a score."""

    def __init__(self, score):
        self.score, self.evaluations = score, 0

    def __call__(self, x, sigma):
        self.evaluations += x.shape[0]
        return self.score(x, sigma)


def test_tiny_run_writes_tables_plots_and_json(tmp_path):
    bench.main(["--quick", "--workloads", "mixture", "--n", "120", "--nfe", "5", "10", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["results"]["mixture (exact posterior)"]["rows"]
    samplers = {r["sampler"] for r in rows}
    assert set(bench.SCHEDULERS) | {"karras_heun", "euler_maruyama", "ode_rk45"} <= samplers
    assert any(r["dlg"] for r in rows) and any(r.get("reference") for r in rows)
    persistent = next(r for r in rows if r.get("persistence"))
    assert -1 <= persistent["lag1_autocorr"] <= 1 and persistent["batches"] > 1
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| DLG + karras_heun |" in md and "## Targets" in md and "lag-1 autocorrelation" in md
    assert (tmp_path / "mixture.png").stat().st_size > 10_000


def test_reported_nfe_equals_counted_model_calls():
    w = bench.mixture_workload(64, 0, trained=False, quick=True)
    w.score = counting = Counting(w.score)
    for label, integrator in [("karras_heun", "karras_heun"), ("euler_maruyama", "euler_maruyama"),
                              ("DPM++2M", bench.make_scheduler("DPM++2M", w.scheduler_config)),
                              ("Heun", bench.make_scheduler("Heun", w.scheduler_config))]:
        counting.evaluations = 0
        row = bench.run_vanilla(w, label, integrator, 10, 0)
        assert counting.evaluations == row["nfe"] * w.n and row["nfe"] <= 10
        counting.evaluations = 0
        row = bench.run_dlg(w, label, integrator, 10, 0, chains=32)
        per_sample = row["nfe"] * w.n + row["warmup_nfe_per_chain"] * 32
        assert abs(counting.evaluations - per_sample) < 1e-6 and row["nfe"] <= 10


def test_exact_samples_score_near_zero_and_noise_does_not():
    w = bench.mixture_workload(1000, 0, trained=False, quick=True)
    exact = w.evaluate(w.exact(1000, torch.Generator().manual_seed(7)))
    noise = w.evaluate(3 * torch.randn(1000, 16, generator=torch.Generator().manual_seed(7)))
    assert exact["sw"] < 0.25 < 1.0 < noise["sw"] and exact["mode_error"] < 0.05
