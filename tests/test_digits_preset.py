"""The shipped digits default: real diffusers folder, shipped classifier and features, dlg-sample end to end, and
DLG beating the vanilla integrator at equal NFE on it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image
from safetensors.torch import load_file

from dlg_sampler import DLGSampler, NoiseClassifier, integrate
from dlg_sampler.adapters import from_pipeline
from dlg_sampler.classifier import evaluate_noise_classifier
from dlg_sampler.digits import (CLASSIFIER_DIR, FEATURES_DIR, PIPELINE_DIR, DigitsEvaluator, load_digit_features,
                                load_digits_data)

BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / "dlg-sample"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


def test_shipped_weights_are_plain_hub_folders_and_small():
    pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)  # a real diffusers folder
    assert pipe.unet.config.sample_size == 8 and pipe.scheduler.config.beta_schedule == "linear"
    clf = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
    score = from_pipeline(pipe)
    assert clf.levels.sigma_min == pytest.approx(score.sigma_min) and clf.levels.sigma_max == pytest.approx(score.sigma_max)
    total = sum(f.stat().st_size for d in (PIPELINE_DIR, CLASSIFIER_DIR, FEATURES_DIR) for f in d.rglob("*"))
    assert total < 8e6


def test_feature_network_reads_held_out_digits(evaluator):
    x, y = load_digits_data("test", return_labels=True)
    assert (evaluator.predict(x) == y).float().mean() > 0.97  # measured 0.992
    assert load_digit_features().features(x[:3]).shape == (3, 64)
    noise = evaluator.evaluate(torch.randn(len(x), 1, 8, 8).clamp(-1, 1))
    assert noise["fd"] > 10 * evaluator.real_fd_floor()


def test_shipped_classifier_accuracy_on_held_out_digits():
    """Within +-5 of 1000 geometric levels (a factor 1.046 in sigma) the 64-pixel digits allow little more; measured
    27.5% within +-5 and 66% within +-20 (uniform guessing: 1.1% and 4.1%)."""
    clf = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
    m = evaluate_noise_classifier(clf, load_digits_data("test"), clf.levels, 4096, torch.Generator().manual_seed(1))
    assert m["within_5"] > 0.2 and m["within_20"] > 0.55 and m["ce"] < 0.7 * m["uniform_ce"]


def test_dlg_beats_vanilla_at_ten_nfe(evaluator):
    pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)
    score = from_pipeline(pipe)
    clf = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
    n = 600
    sampler = DLGSampler(score, clf, clf.levels, shape=(1, 8, 8), num_chains=n, denoise_steps=3, gibbs_steps=2,
                         step_size=0.1, seed=0)
    dlg = evaluator.evaluate(sampler.sample(n))
    assert sampler.stats["nfe_per_sample"]["total"] <= 10
    g = torch.Generator().manual_seed(0)
    vanilla, nfe = integrate("karras_heun", score, score.sigma_max * torch.randn(n, 1, 8, 8, generator=g),
                             score.sigma_max, 5, generator=g)
    assert nfe <= 10
    van = evaluator.evaluate(vanilla)
    floor = evaluator.real_fd_floor()
    assert dlg["fd"] < van["fd"], (dlg["fd"], van["fd"])
    assert dlg["fd"] < FD_FACTOR * floor, (dlg["fd"], floor)
    assert dlg["coverage"] == 1.0


#: DLG's FD at 10 NFE stays within this factor of the held-out real digits' FD to the training digits.
FD_FACTOR = 3.0


def test_dlg_sample_end_to_end(tmp_path):
    done = cli("--n", "64", "--chains", "64", "--out", "grid.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    dlg_line = next(line for line in lines if line.startswith("DLG"))
    assert "NFE/sample 9.00" in dlg_line  # Karras Heun fits 9 of the 10 budgeted NFE and "FD" in dlg_line and "classes" in dlg_line
    assert any(line.startswith("vanilla karras_heun") and "FD" in line for line in lines)
    assert Image.open(tmp_path / "grid.png").size[0] >= 64
    saved = load_file(str(tmp_path / "grid.safetensors"))
    assert saved["samples"].shape == (64, 1, 8, 8) and torch.isfinite(saved["samples"]).all()


def test_dlg_sample_with_a_diffusers_scheduler_and_a_local_model_folder(tmp_path):
    done = cli("--model", str(PIPELINE_DIR), "--classifier", str(CLASSIFIER_DIR), "--integrator",
               "DPMSolverMultistepScheduler", "--nfe", "8", "--n", "16", "--out", "x.png", "--no-compare", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NFE/sample 8.00" in done.stdout and (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be positive"),
    (["--nfe", "2"], "leaves no room for denoising"),
    (["--step-size", "nan"], "--step-size must be positive"),
    (["--integrator", "rk4"], "unknown integrator 'rk4': use one of"),
    (["--model", "no/such-folder-or-repo", "--classifier", str(CLASSIFIER_DIR)], "could not load the diffusers pipeline"),
    (["--model", "MODEL_WITHOUT_WEIGHTS", "--classifier", str(CLASSIFIER_DIR)], "weights"),
    (["--model", str(PIPELINE_DIR), "--classifier", "WRONG_GRID"], "outside the model's trained sigma range"),
    (["--model", str(PIPELINE_DIR), "--classifier", "WRONG_SHAPE"], "shape"),
    (["--out", "."], "is a folder"),
    (["--out-dir", "AFILE"], "is a file, not a folder"),
    (["--model", str(PIPELINE_DIR)], "--model needs --classifier"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    broken = tmp_path / "MODEL_WITHOUT_WEIGHTS"
    shutil.copytree(PIPELINE_DIR, broken)
    for f in broken.rglob("*.safetensors"):
        f.unlink()
    NoiseClassifier(0.001, 500.0, 100, channels=(8,)).save_pretrained(tmp_path / "WRONG_GRID")
    NoiseClassifier(0.0100013, 157.4, 100, sample_shape=(3, 8, 8), channels=(8,)).save_pretrained(tmp_path / "WRONG_SHAPE")
    (tmp_path / "AFILE").write_text("not a folder")
    done = cli(*args, cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
