"""What a new user hits on the command line (issue 23): budget arithmetic that stays arithmetic, outputs that are
checked and never silently replaced, an interrupted run that says what it kept, the progress bar from the first
model evaluation, and the thread count chosen for the batch."""

import re

import pytest

from dlg_sampler import cli, integrators, tuning
from dlg_sampler.integrators import EVALS_PER_STEP, count_nfe, steps_for_nfe


def error_of(main, argv, capsys) -> str:
    """Run a console script's main in-process; it must exit with an error: return the message (stderr and exit)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    assert code not in (0, None)
    return capsys.readouterr().err + (code if isinstance(code, str) else "")


@pytest.fixture
def no_loading(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(cli.common, "load_model", loaded)


def _no_solver(*args, **kwargs):
    raise AssertionError("a solver ran on a dummy model to count evaluations the arithmetic knows")


@pytest.fixture
def counted_planner(monkeypatch):
    """No fixed-step solver may run; ``calls[0]`` counts the planner's evaluation counts."""
    for name in EVALS_PER_STEP:
        monkeypatch.setitem(integrators.INTEGRATORS, name, _no_solver)
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return count_nfe(*args, **kwargs)

    monkeypatch.setattr(tuning, "count_nfe", counting)
    return calls


@pytest.mark.parametrize("n", [4, 256, 10_000])
def test_a_huge_budget_is_refused_in_a_few_counts_naming_the_most_that_makes_sense(counted_planner, n):
    with pytest.raises(ValueError, match="more than denoising can use") as err:
        tuning.plan_budget(1_000_000, n)
    assert counted_planner[0] <= 10
    most = int(re.search(r"pass nfe (\d+) or less", str(err.value)).group(1))
    counted_planner[0] = 0
    plan = tuning.plan_budget(most, n)  # the most named is accepted, with a bounded search
    assert plan["settings"]["denoise_steps"] <= tuning.MAX_DENOISE_STEPS
    assert plan["predicted_nfe_per_sample"] <= most
    assert counted_planner[0] <= 3 * 200
    with pytest.raises(ValueError, match="more than denoising can use"):
        tuning.plan_budget(most + 1, n)


@pytest.mark.parametrize("name", sorted(EVALS_PER_STEP))
def test_closed_form_counts_are_the_solvers_own(name):
    """The arithmetic against the solver run on a zero score, and steps_for_nfe as its inverse."""
    import torch

    def run(steps: int, dlg: bool) -> int:
        score = integrators.CountedScore(lambda x, sigma: torch.zeros_like(x))
        sigmas = integrators.get_schedule(name, steps, torch.ones(1), append_zero=not dlg)
        return integrators.INTEGRATORS[name](score, torch.zeros(1, 1), sigmas)[1] + dlg

    for dlg in (True, False):
        counts = [run(k, dlg) for k in range(1, 8)]
        assert [count_nfe(name, k, dlg=dlg) for k in range(1, 8)] == counts
        for budget in range(0, counts[-1] + 1):
            fitting = [k for k, c in enumerate(counts, 1) if c <= budget]
            assert steps_for_nfe(name, budget, dlg=dlg) == (max(fitting) if fitting else None)


def test_dlg_sample_refuses_a_huge_budget_before_loading(counted_planner, no_loading, capsys):
    err = error_of(cli.sample_main, ["--nfe", "1000000", "--n", "4"], capsys)
    assert "more than denoising can use" in err and re.search(r"pass --nfe \d+ or less", err)
