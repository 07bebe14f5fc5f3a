"""What a new user hits on the command line (issue 23): budget arithmetic that stays arithmetic, outputs that are
checked and never silently replaced, an interrupted run that says what it kept, the progress bar from the first
model evaluation, and the thread count chosen for the batch."""

import re

import pytest

from dlg_sampler import cli, integrators, tuning
from dlg_sampler.integrators import EVALS_PER_STEP, count_nfe, steps_for_nfe
from dlg_sampler.testing import error_of


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
    assert counted_planner[0] <= 100  # a short search down from the most steps, not one count per step
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

    def run_to_zero(steps: int) -> int:  # the solver's own last step to 0, as DLG and integrate run it
        score = integrators.CountedScore(lambda x, sigma: torch.zeros_like(x))
        return integrators.integrate(name, score, torch.zeros(1, 1), torch.ones(1), steps, final_step="solver")[1]

    for dlg, final_step in ((True, "tweedie"), (False, "tweedie"), (True, "solver"), (False, "solver")):
        counts = [run(k, dlg) if final_step == "tweedie" else run_to_zero(k) for k in range(1, 8)]
        assert [count_nfe(name, k, dlg=dlg, final_step=final_step) for k in range(1, 8)] == counts
        for budget in range(0, counts[-1] + 1):
            fitting = [k for k, c in enumerate(counts, 1) if c <= budget]
            assert steps_for_nfe(name, budget, dlg=dlg, final_step=final_step) == (max(fitting) if fitting else None)


def test_dlg_sample_refuses_a_huge_budget_before_loading(counted_planner, no_loading, capsys):
    err = error_of(cli.sample_main, ["--nfe", "1000000", "--n", "4"], capsys)
    assert "more than denoising can use" in err and re.search(r"pass --nfe \d+ or less", err)


# ---------------------------------------------------------------------------------------------------------------
# outputs: checked before sampling, never replaced silently

def tiny_run(tiny_model, *extra: str) -> list[str]:
    """dlg-sample on the tiny random model: a few seconds on one thread."""
    return ["--model", str(tiny_model / "pipe"), "--n", "8", "--chains", "4", "--denoise-steps", "2", *extra]


@pytest.mark.parametrize("out, message", [
    ("x", "--out x: no image extension; end it in .png"),
    ("x.txt", "--out x.txt: '.txt' is not an image type; end it in .png"),
])
def test_an_out_without_an_image_extension_is_refused_before_loading(out, message, no_loading, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = error_of(cli.sample_main, ["--out", out], capsys)
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_named_out_that_exists_is_refused_and_overwrite_replaces_it(no_loading, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for existing in ("x.png", "x.safetensors"):
        (tmp_path / existing).write_bytes(b"mine")
        err = error_of(cli.sample_main, ["--out", "x.png"], capsys)
        assert f"{existing} exists; pass --overwrite to replace it, or another --out" in err
        assert (tmp_path / existing).read_bytes() == b"mine"
        (tmp_path / existing).unlink()


def test_the_default_out_is_written_beside_an_existing_one(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.png").write_bytes(b"mine")
    cli.sample_main(tiny_run(tiny_model, "--chains", "1"))
    out, err = capsys.readouterr()
    assert "8 samples from 1 chain," in out
    assert (tmp_path / "samples.png").read_bytes() == b"mine"
    assert (tmp_path / "samples-1.png").exists() and (tmp_path / "samples-1.safetensors").exists()
    assert "samples.png exists, so this run writes samples-1.png" in err
    assert "wrote samples-1.png and samples-1.safetensors" in out
    cli.sample_main(tiny_run(tiny_model, "--overwrite"))
    assert (tmp_path / "samples.png").read_bytes() != b"mine"


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: one line with what was kept and how to go on

def test_ctrl_c_says_which_shards_were_kept_and_the_command_that_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    from dlg_sampler.shards import ShardWriter

    monkeypatch.chdir(tmp_path)
    write = ShardWriter.write

    def write_then_interrupt(self, *args, **kwargs):
        path = write(self, *args, **kwargs)
        if len(self.shards) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ShardWriter, "write", write_then_interrupt)
    argv = tiny_run(tiny_model, "--out-dir", "run", "--shard-size", "2", "--overwrite")
    with pytest.raises(SystemExit) as exc:
        cli.sample_main(argv)
    assert exc.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in line and "interrupted: 2 shards (4 of 8 samples) kept in run" in line
    resume = line.split("resume with: ")[1]
    assert "--overwrite" not in resume and resume.split()[0] == "dlg-sample"
    monkeypatch.setattr(ShardWriter, "write", write)
    cli.sample_main(resume.split()[1:])  # the command given resumes: only the missing shards are drawn
    assert "resuming run: 4 of 8 samples already written" in capsys.readouterr().out


def test_ctrl_c_with_out_says_nothing_was_saved(tiny_model, tmp_path, monkeypatch, capsys):
    from dlg_sampler.sampler import DLGSampler

    monkeypatch.chdir(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DLGSampler, "sample", interrupt)
    with pytest.raises(SystemExit) as exc:
        cli.sample_main(tiny_run(tiny_model))
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was saved" in err and "--out-dir" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# progress from the first model evaluation, the planned cost first

class RecordingBar:
    """A tqdm stand-in: the total it is given and every evaluation it is advanced by."""

    def __init__(self, total=None, **kwargs):
        self.total, self.n, self.initial, self.last_print_n = total, 0, 0, 0
        self.first_total = total

    def update(self, k: int) -> None:
        self.n += k

    def refresh(self) -> None:
        pass

    def write(self, text: str) -> None:
        print(text)

    def __enter__(self):
        RecordingBar.last = self
        return self

    def __exit__(self, *exc):
        return False


def test_for_budget_counts_its_warm_up_and_pilot_on_the_callers_bar():
    from dlg_sampler import DLGSampler, GaussianMixture, NoiseLevels

    mixture = GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)
    bar = RecordingBar()
    sampler = DLGSampler.for_budget(mixture.score, None, shape=(8,), nfe=10, n=10_000, seed=0, progress_bar=bar,
                                    levels=NoiseLevels(0.01, 50.0, 1000))
    assert sampler.tuning["pilot"]["chains"] > 0
    assert bar.n == sampler.stats["model_evaluations"] > sampler.tuning["pilot"]["evaluations"]
    assert bar.total >= bar.n  # its total was set to the planned warm-up and pilot


def test_dlg_sample_prints_its_plan_and_one_bar_counts_every_evaluation(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.sample, "tqdm", RecordingBar)
    cli.sample_main(["--model", str(tiny_model / "pipe"), "--n", "40", "--nfe", "10"])
    out, err = capsys.readouterr()
    planned = int(re.search(r"planned: ([\d,]+) model evaluations", err).group(1).replace(",", ""))
    used = int(re.search(r"; (\d+) model evaluations / 40 samples", out).group(1))
    bar = RecordingBar.last
    assert bar.first_total == planned == used == bar.n == bar.total


# ---------------------------------------------------------------------------------------------------------------
# threads

def test_threads_follow_the_batch_and_the_free_cores_and_never_override_the_user(monkeypatch):
    import os

    import torch

    from dlg_sampler.cli import common

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common, "_SET_BY_US", {torch.get_num_threads()})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 0.0, 0.0))
    before = torch.get_num_threads()
    try:
        assert common.choose_threads(None, 13 * 64) == 1 == torch.get_num_threads()  # the README's 13 chains
        assert common.choose_threads(None, 100 * common.ELEMENTS_PER_THREAD) == 6  # 8 cores, 2 busy
        assert common.choose_threads(3, 13 * 64) == 3 == torch.get_num_threads()  # --threads wins
        torch.set_num_threads(5)  # the caller's own choice is kept
        assert common.choose_threads(None, 100 * common.ELEMENTS_PER_THREAD) == 5
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(common, "_SET_BY_US", {torch.get_num_threads()})
        assert common.choose_threads(None, 100 * common.ELEMENTS_PER_THREAD) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# smaller

def test_argparse_errors_are_one_line_without_the_usage_block(capsys):
    err = error_of(cli.sample_main, ["--n", "many"], capsys)
    assert err.strip().splitlines() == ["dlg-sample: error: argument --n: invalid int value: 'many' "
                                        "(see dlg-sample --help)"]


def test_nfe_is_printed_rounded_down():
    from dlg_sampler.cli.sample import _down

    assert _down(9.997) == "9.99" and _down(9.65) == "9.65" and _down(10.0) == "10.00"


def test_a_users_classifier_runs_on_the_digits_preset_with_its_scoring(monkeypatch, tmp_path):
    from dlg_sampler.cli import common

    class Model:
        prompts = None

    monkeypatch.setattr(common, "load_model", lambda spec, **kwargs: Model())
    monkeypatch.setattr("dlg_sampler.models.load_classifier", lambda spec, device: spec)
    parser = cli.sample_parser()
    args = parser.parse_args(["--classifier", "mine"])
    assert common.check_model_flags(args, parser)  # the preset's model: scored against the preset's references
    assert common.load(args, "cpu", True)[1] == "mine"  # with the user's classifier


def test_ctrl_c_in_train_classifier_names_the_checkpoints_kept_and_the_resume_command(tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.chdir(tmp_path)

    def train_then_interrupt(classifier, data, *, checkpoint_dir, **kwargs):
        (checkpoint_dir / "checkpoint-10").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.train_classifier, "train_noise_classifier", train_then_interrupt)
    with pytest.raises(SystemExit) as exc:
        cli.train_classifier_main(["--out", "clf", "--steps", "20"])
    assert exc.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("interrupted: kept clf/checkpoints (training checkpoints); resume with: dlg-train-classifier "
                    "--out clf --steps 20")


def test_ctrl_c_in_dlg_tune_is_one_line(monkeypatch, capsys):
    from dlg_sampler.sampler import DLGSampler

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DLGSampler, "for_budget", interrupt)
    with pytest.raises(SystemExit) as exc:
        cli.tune_main(["--n", "100"])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: dlg-tune keeps nothing")


def test_the_shipped_digits_folder_as_model_keeps_the_presets_scoring(monkeypatch):
    from dlg_sampler import presets
    from dlg_sampler.cli import common

    parser = cli.sample_parser()
    args = parser.parse_args(["--model", str(presets.PRESETS["digits"].pipeline_dir), "--classifier", "mine"])
    assert common.check_model_flags(args, parser) and args.preset == "digits"
