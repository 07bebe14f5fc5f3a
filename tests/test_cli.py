"""Ordinary mistakes on the command line get one line naming the problem and the fix, no traceback, and the checks
run before anything is loaded or computed."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image

from dlg_sampler import NoiseClassifier, cli, models
from dlg_sampler.digits import CLASSIFIER_DIR, PIPELINE_DIR, load_digit_features
from dlg_sampler.testing import error_of

BIN = Path(sys.executable).parent


def not_before_checks(*args, **kwargs):
    raise AssertionError("a model or classifier was loaded before the inputs were checked")


@pytest.fixture
def no_loading(monkeypatch):
    for module in (cli.common, cli.train_classifier):
        monkeypatch.setattr(module, "load_model", not_before_checks)
    monkeypatch.setattr(models, "load_classifier", not_before_checks)


def tiny_classifier_folder(path: Path) -> Path:
    NoiseClassifier(0.0100013, 157.4, 100, channels=(8,), hidden=16).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# checked before any compute

@pytest.mark.parametrize("args, message", [
    (["--out", "/proc/x.png"], "--out /proc/x.png: cannot write there"),
    (["--out", "AFILE/x.png"], "AFILE is a file, so nothing can be written under it"),
    (["--out-dir", "/proc/run"], "--out-dir /proc/run: cannot write there"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device name: use cpu, cuda, cuda:N or mps"),
    (["--nfe", "1"], "a budget of 1 model evaluations per sample is too small: one restart output costs at least "
                     "1.07 (one denoising step and the warm-up of 2 chains amortised over n=256); "
                     "raise --nfe to at least 2"),
    (["--nfe", "5", "--kernel", "gibbs", "--n", "100"], "raise --nfe to at least 7, or draw more samples per chain "
                                                        "(more --n or fewer --chains)"),
    (["--step-size", "0.3"], "--step-size sets the gibbs kernel, but the restart kernel is used: add --kernel gibbs"),
    (["--kernel", "gibbs", "--restart-sigma", "3"], "--restart-sigma sets the restart kernel, but the gibbs kernel"),
])
def test_sample_refuses_bad_outputs_and_budgets_before_loading(args, message, tmp_path, monkeypatch, capsys,
                                                               no_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "AFILE").write_text("a file")
    assert message in error_of(cli.sample_main, args, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch has no CUDA")
@pytest.mark.parametrize("main, extra", [(cli.sample_main, []), (cli.train_classifier_main, ["--out", "clf"])])
def test_cuda_without_cuda_is_refused_with_the_fix(main, extra, tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.chdir(tmp_path)
    err = error_of(main, ["--device", "cuda", *extra], capsys)
    assert "--device cuda: " in err and "or use --device cpu" in err and "Traceback" not in err


def test_train_classifier_refuses_an_unwritable_out_before_loading(capsys, no_loading):
    err = error_of(cli.train_classifier_main, ["--out", "/proc/clf", "--from-model", "digits"], capsys)
    assert "--out /proc/clf: cannot write there" in err


# ---------------------------------------------------------------------------------------------------------------
# what a classifier or model reference names

@pytest.mark.parametrize("classifier, message", [
    ("missing/dir/clf", "the noise classifier 'missing/dir/clf': there is no such file or folder"),
    ("./clf", "the noise classifier './clf': there is no such file or folder"),
    (str(PIPELINE_DIR / "unet"), "it holds a diffusers UNet2DModel (config.json)"),
    (str(PIPELINE_DIR), "it holds a diffusers pipeline (model_index.json)"),
    ("EMPTY", "it holds nothing (an empty folder)"),
])
def test_classifier_reference_errors_say_what_was_expected_and_found(classifier, message, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    for module in (cli.common, cli.train_classifier):
        monkeypatch.setattr(module, "load_model", not_before_checks)
    (tmp_path / "EMPTY").mkdir()
    err = error_of(cli.sample_main, ["--model", str(PIPELINE_DIR), "--classifier", classifier], capsys)
    assert message in err and "NoiseClassifier folder (config.json + model.safetensors" in err


def hf_cache_with(tmp_path: Path, repo_id: str) -> Path:
    """A Hugging Face cache holding a NoiseClassifier under ``repo_id`` (as a download leaves it)."""
    commit = "0" * 40
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    tiny_classifier_folder(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_hub_ids_load_from_the_cache_when_offline_and_a_missing_one_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache_with(tmp_path, "someone/clf")))
    assert len(models.load_classifier("someone/clf").levels) == 100
    with pytest.raises(ValueError) as err:
        models.load_classifier("someone/other")
    assert "'someone/other' is not in the Hugging Face cache and the Hub is not used (HF_HUB_OFFLINE is set)" in \
        str(err.value) and "hf download someone/other --local-dir FOLDER" in str(err.value)


def test_unreachable_hub_fails_fast_instead_of_retrying(tmp_path):
    """huggingface_hub retries a failed connection five times (~32 s); one quick check sends it to the cache."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "dlg-sample"), "--model", str(PIPELINE_DIR), "--classifier", "someone/clf"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.perf_counter() - start < 20
    assert "http://127.0.0.1:9 cannot be reached" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "Traceback" not in done.stderr


def test_local_loads_print_nothing(capsys):
    NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
    load_digit_features()
    assert capsys.readouterr().out == ""  # huggingface_hub's mixin printed "Loading weights from local directory"


# ---------------------------------------------------------------------------------------------------------------
# training data

@pytest.mark.parametrize("make, message", [
    (lambda d: None, "MISSING is not a folder (no such path)"),
    (lambda d: d.mkdir(), "no images (.png, .jpg"),
    (lambda d: (d.mkdir(), (d / "bad.png").write_text("not an image")), "cannot read the image"),
])
def test_bad_training_folders_are_clear_errors(make, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "MISSING")
    err = error_of(cli.train_classifier_main, ["--data", "MISSING", "--model", str(PIPELINE_DIR), "--out", "clf"],
                   capsys)
    assert "error: --data: " in err and message in err
    assert not (tmp_path / "clf").exists()


# ---------------------------------------------------------------------------------------------------------------
# score_sde networks named MODULE:FUNCTION

NET = """import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    def forward(self, x, labels):
        return self.conv(x)
def build():
    return Net()
"""


@pytest.fixture
def score_sde_run(tmp_path):
    """A folder with ``my_models.py``, a score_sde checkpoint of its network and a classifier for it."""
    (tmp_path / "my_models.py").write_text(NET)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():  # predicts the noise as x_t itself: a score pulling towards 0, so every chain stays finite
        net.weight.zero_()[0, 0, 1, 1] = 1.0
        net.bias.zero_()
    state = {f"module.conv.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": state, "ema": {"shadow_params": [p.detach() for p in net.parameters()]}, "step": 1},
               tmp_path / "checkpoint_1.pth")
    from dlg_sampler.adapters import ScoreSdeScore

    score = ScoreSdeScore(net, sde="vp")
    NoiseClassifier(score.sigma_min, score.sigma_max, 100, channels=(8,), hidden=16).save_pretrained(tmp_path / "clf")
    return tmp_path


def test_score_sde_network_module_is_found_in_the_current_directory(score_sde_run):
    """The README's own example: a console script does not have the current directory on its import path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(BIN / "dlg-sample"), "--model", "checkpoint_1.pth", "--score-sde-net", "my_models:build",
                           "--shape", "1", "8", "8", "--classifier", "clf", "--n", "8", "--out", "x.png"], cwd=score_sde_run, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (score_sde_run / "x.png").exists()


def test_a_model_without_classifier_samples_with_the_restart_kernel_and_gibbs_asks_for_one(score_sde_run, capsys,
                                                                                         monkeypatch):
    """The default kernel needs no noise classifier: --model alone runs on the model's trained range."""
    monkeypatch.chdir(score_sde_run)
    cli.sample_main(["--model", "checkpoint_1.pth", "--score-sde-net", "my_models:build", "--shape", "1", "8", "8",
                     "--n", "8", "--chains", "4", "--out", "x.png"])
    assert "DLG restart kernel" in capsys.readouterr().out and (score_sde_run / "x.png").exists()
    err = error_of(cli.sample_main, ["--model", "checkpoint_1.pth", "--score-sde-net", "my_models:build", "--shape",
                                     "1", "8", "8", "--kernel", "gibbs"], capsys)
    assert "--kernel gibbs needs --classifier" in err and "restart kernel, which needs none" in err
    sys.modules.pop("my_models", None)


@pytest.mark.parametrize("net, message", [
    ("my_models:build_ncsnpp", "module 'my_models' ("),
    ("my_models:build_ncsnpp", "has no function 'build_ncsnpp'; its functions and classes: Net, build"),
    ("no_such_module:build", "no module 'no_such_module' in "),
    ("my_models", "must be MODULE:FUNCTION"),
])
def test_score_sde_network_mistakes_are_clear(net, message, score_sde_run, monkeypatch, capsys):
    monkeypatch.chdir(score_sde_run)
    err = error_of(cli.sample_main, ["--model", "checkpoint_1.pth", "--score-sde-net", net, "--shape", "1", "8", "8",
                                     "--classifier", "clf"], capsys)
    assert message in err
    sys.modules.pop("my_models", None)


# ---------------------------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize("parser", [cli.sample_parser(), cli.train_classifier_parser(), cli.tune_parser()])
def test_help_explains_every_option_and_shows_defaults(parser):
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    text = " ".join(parser.format_help().split())
    shown = [f"{a.option_strings[0]}" for a in parser._actions
             if isinstance(a.default, (int, float)) and not isinstance(a.default, bool)]
    assert shown and all(f"(default: {parser.get_default(o.lstrip('-').replace('-', '_'))})" in text for o in shown)


# ---------------------------------------------------------------------------------------------------------------
# the PNG grid

def test_sample_grid_is_square_and_padded(tmp_path):
    cli.sample._save_grid(torch.rand(500, 1, 8, 8) * 2 - 1, tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[:2] == (22 * 68, 23 * 68)  # 500 tiles of 64 px + 2 px borders in 23 columns: about square
    assert (grid[:, 66:70] == 255).all() and (grid[66:70, :] == 255).all()  # a light border between tiles


def test_digit_repeats_of_consecutive_outputs_against_independent_draws():
    """A chain that keeps its digit shows in the summary even where the pixel lag-1 autocorrelation is small."""
    sticky = torch.arange(10).repeat(5)  # 10 chains, each always the same digit
    assert cli.sample._class_repeats(sticky, 10).startswith("consecutive outputs of a chain show the same digit in 100% "
                                                     "of pairs (independent samples: 10%)")
    independent = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(0))
    shown = cli.sample._class_repeats(independent, 10)
    same = int(shown.split("same digit in ")[1].split("%")[0])
    assert abs(same - 10) <= 2 and shown.endswith("(independent samples: 10%)")
    assert cli.sample._class_repeats(sticky[:10], 10) == "digit repeats n/a (one output per chain)"
