"""Long runs: dlg-sample --out-dir writes atomic shards that survive SIGKILL and resume to exactly N samples,
identical to an uninterrupted run, with the settings the budget chose stored and restored; corrupt shards and changed
settings are caught."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from dlg_sampler import GaussianMixture, NoiseLevels, cli, models
from dlg_sampler.models import LoadedModel
from dlg_sampler.shards import ShardWriter, read_samples

N, SHARD = 96, 8


def command(model: Path, out_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dlg-sample"), "--model", str(model / "pipe"), "--classifier",
            str(model / "clf"), "--out-dir", str(out_dir), "--n", str(N), "--shard-size", str(SHARD), "--chains", "8",
            "--seed", "3", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def listed(out_dir: Path) -> int:
    try:
        return len(json.loads((out_dir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_result(tiny_model, tmp_path):
    reference = run(command(tiny_model, tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    expected = read_samples(tmp_path / "ref")
    assert expected.shape == (N, 1, 8, 8) and len(torch.unique(expected.flatten(1), dim=0)) == N

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kill_after_shards in (1, 4, 8):  # three kills at different points of the run
        proc = subprocess.Popen(command(tiny_model, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while listed(out) < kill_after_shards and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert listed(out) < N // SHARD, "the run finished before it could be killed; make it longer"
    # A shard write interrupted between the temporary file and the rename leaves only a temporary file.
    (out / f".shard-{listed(out):05d}.safetensors.tmp-999").write_bytes(b"partial")
    resumed = run(command(tiny_model, out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    got = read_samples(out)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_corrupt_shard_is_named_and_resumed_from_the_last_good_one(tiny_model, tmp_path):
    out = tmp_path / "run"
    assert run(command(tiny_model, out)).returncode == 0
    expected = read_samples(out)
    shard = out / "shard-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, e.g. a disk that filled up
    resumed = run(command(tiny_model, out))
    assert resumed.returncode == 0 and "shard-00005.safetensors is missing or corrupt" in resumed.stderr
    assert torch.equal(read_samples(out), expected)


def test_changed_setting_on_resume_is_refused_unless_overwrite(tiny_model, tmp_path):
    out = tmp_path / "run"
    assert run(command(tiny_model, out)).returncode == 0
    refused = run(command(tiny_model, out, "--nfe", "12"))
    assert refused.returncode != 0 and "nfe: 10 -> 12" in refused.stderr and "--overwrite" in refused.stderr
    assert read_samples(out).shape[0] == N  # nothing the user had is lost
    redone = run(command(tiny_model, out, "--nfe", "12", "--overwrite"))
    assert redone.returncode == 0 and read_samples(out).shape[0] == N


def test_shard_writer_refuses_a_file_and_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ShardWriter(tmp_path / "file", {})
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write"):
            ShardWriter(locked / "out", {})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is corrupt"):
        ShardWriter(bad, {})


# ---------------------------------------------------------------------------------------------------------------
# the budget's choice (pilot included) is stored with the shards and restored, never chosen twice


@pytest.fixture
def mixture_run(monkeypatch, tmp_path):
    """dlg-sample in-process on an exact Gaussian mixture (fast enough for a run with a pilot): returns a
    function running it into ``tmp_path / name``; ``counter["evaluations"]`` counts every model evaluation."""
    mixture = GaussianMixture.random(num_modes=4, dim=8, spread=2.0, std=0.5, seed=0)
    levels, counter = NoiseLevels(0.01, 80.0, 1000), {"evaluations": 0}

    def score(x, sigma):
        counter["evaluations"] += x.shape[0]
        return mixture.score(x, sigma)

    model = LoadedModel(score, (8,), 0.01, 80.0, lambda x: x)
    monkeypatch.setattr(cli.common, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(models, "load_classifier", lambda *args, **kwargs: mixture.noise_posterior(levels))
    bars = counter["bars"] = []

    class KeptBar(tqdm):  # the command's progress bar, kept to read its count and size afterwards
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(cli.sample, "tqdm", KeptBar)

    def sample(name: str, *extra: str) -> Path:
        cli.sample_main(["--model", "mixture", "--classifier", "exact", "--out-dir", str(tmp_path / name),
                         "--n", "2000", "--shard-size", "500", "--seed", "3", *extra])
        return tmp_path / name

    return sample, counter


def shard_state(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def test_tuning_is_stored_with_the_shards_and_restored_on_resume(mixture_run, capsys):
    """With the denoising levels fitted once per run (``--denoise-schedule fitted``): the fit is stored with the
    tuning and the state, and a resumed run neither repeats the pilot nor the fit."""
    sample, counter = mixture_run
    full = sample("full", "--denoise-schedule", "fitted")
    bar = counter["bars"].pop()  # one bar over the whole job, the pilot and the warm-up included, sized exactly
    assert bar.n == bar.total == counter["evaluations"] and bar.initial == 0  # from the warm-up's first evaluation
    manifest = json.loads((full / "manifest.json").read_text())
    tuning = manifest["config"]["tuning"]
    assert tuning["pilot"]["chains"] >= 8 and 2000 / 250 <= tuning["settings"]["num_chains"] <= 100  # <= n / 20
    last = shard_state(full / manifest["shards"][-1]["file"])
    assert tuning["settings"]["restart_sigma"] == last["restart_sigma"] == tuning["pilot"]["restart_sigma"]
    # The budget's denoiser: its schedule fitted once, counted with the pilot, kept in every shard's state.
    fit = tuning["schedule_fit"]
    with safe_open(str(full / manifest["shards"][-1]["file"]), "pt") as f:
        levels = f.get_tensor("state.schedule_fit.levels")
    assert levels.tolist() == fit["levels"]
    assert last["schedule_fit"]["evaluations"] == fit["evaluations"] == 8 * 63
    assert last["tuning"] == tuning and last["counts"]["pilot"] == tuning["pilot"]["evaluations"] + fit["evaluations"]
    # Killed after two of four shards: the manifest lists two, the other shard files never landed.
    killed = full.parent / "killed"
    shutil.copytree(full, killed)
    for entry in manifest["shards"][2:]:
        (killed / entry["file"]).unlink()
    (killed / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:2], "count": 1000}))
    capsys.readouterr()
    counter["evaluations"] = 0
    sample("killed", "--denoise-schedule", "fitted")
    assert "resuming" in capsys.readouterr().out
    assert torch.equal(read_samples(killed), read_samples(full))
    assert json.loads((killed / "manifest.json").read_text())["config"] == manifest["config"]
    # Only the two missing shards were computed: no second pilot, no second warm-up.
    before = shard_state(killed / manifest["shards"][1]["file"])["counts"]
    phases = ("pilot", "warmup", "gibbs", "denoise", "tweedie")
    assert counter["evaluations"] == sum(last["counts"][k] - before[k] for k in phases) > 0
    bar = counter["bars"].pop()  # the resumed bar starts where the interrupted job stood
    assert bar.initial == sum(before[k] for k in phases) and bar.n == bar.total == sum(last["counts"][k] for k in phases)


def test_a_resumed_run_ends_its_ramps_where_the_pilot_chose(mixture_run, capsys):
    """The pilot's check chose where the ramps end (3x the grid's lowest level at 12 NFE on this mixture): said in
    the settings line, stored with the tuning, and a run killed after two shards resumes to the same samples."""
    sample, counter = mixture_run
    full = sample("full", "--nfe", "12")
    assert "(3x the lowest level)" in capsys.readouterr().out
    manifest = json.loads((full / "manifest.json").read_text())
    tuning = manifest["config"]["tuning"]
    assert tuning["settings"]["tweedie_sigma"] == tuning["denoiser"]["chosen"]["tweedie_sigma"] == pytest.approx(0.03)
    killed = full.parent / "killed"
    shutil.copytree(full, killed)
    for entry in manifest["shards"][2:]:
        (killed / entry["file"]).unlink()
    (killed / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:2], "count": 1000}))
    sample("killed", "--nfe", "12")
    out = capsys.readouterr().out
    assert "resuming" in out and "(3x the lowest level)" in out
    assert torch.equal(read_samples(killed), read_samples(full))
