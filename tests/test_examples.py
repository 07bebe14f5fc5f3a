"""Every script in examples/ runs as written (small settings), on the shipped preset or tiny local models."""

import argparse
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from dlg_sampler import NoiseClassifier
from dlg_sampler.digits import CLASSIFIER_DIR
from dlg_sampler.tuning import plan_budget

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def launch(script: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def run(script: str, *args: str, cwd: Path, stderr: bool = False) -> str:
    """The script's output (stdout, and stderr after it with ``stderr``); it must succeed."""
    done = launch(script, *args, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + (done.stderr if stderr else "")


def fails(script: str, *args: str, cwd: Path, **env: str) -> str:
    """The one line a script exits with when it cannot go on (no traceback)."""
    done = launch(script, *args, cwd=cwd, **env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def bar_and_printed_loss(out: str) -> tuple[str, str]:
    """The loss the progress bar ends on and the last loss the script printed."""
    return re.findall(r"loss=([\d.]+)", out)[-1], re.findall(r"last loss ([\d.]+)", out)[-1]


def test_sample_digits(tmp_path):
    out = run("sample_digits.py", "--n", "64", "--out", "grid.png", cwd=tmp_path)
    chains, total = re.search(r"DLG restart kernel, S [\d.]+, (\d+) chains: NFE per sample ([\d.]+) in total",
                              out).groups()
    assert int(chains) == plan_budget(10, 64)["settings"]["num_chains"]  # the budget's choice, full batches at n = 64
    total = float(total)
    # the integrator run is the one named (it said DPM-Solver++ 2M and ran unipc)
    assert total <= 10 and f"vanilla dpmpp_2m (DPM-Solver++ 2M), {int(total)} NFE" in out and out.count("'fd'") == 2
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[:2] == (8 * 68, 8 * 68)  # 8 x 8 tiles of 64 px, each with a 2 px border (was one 16 x 4 strip)
    assert (grid[:, [0, 1, 66, 67, 68]] == 255).all() and (grid[[66, 67, 68, 69], :] == 255).all()


def test_warm_start_scheduler(tmp_path):
    out = run("warm_start_scheduler.py", "--scheduler", "UniPCMultistepScheduler", "--nfe", "8", "--n", "64",
              cwd=tmp_path)
    total = float(re.search(r"DLG \+ UniPCMultistepScheduler \(\d+ steps per output\): NFE ([\d.]+) in total", out)[1])
    assert total <= 8 and f"UniPCMultistepScheduler alone: NFE {int(total)}," in out


def test_drop_in_scheduler(tmp_path):
    out = run("drop_in_scheduler.py", "--batch-size", "4", "--steps", "10", cwd=tmp_path)
    assert "call 0: 4 images, NFE per sample 20.00 in total" in out  # 10 per sample + the warm-up of 4 chains
    assert "call 1: 4 images, NFE per sample 15.00 in total" in out  # the warm-up amortised over 8
    config = (tmp_path / "dlg_scheduler" / "scheduler_config.json").read_text()
    assert '"classifier": "classifier"' in config and str(CLASSIFIER_DIR) not in config  # portable, not a local path
    assert NoiseClassifier.from_pretrained(tmp_path / "dlg_scheduler" / "classifier").levels == \
        NoiseClassifier.from_pretrained(CLASSIFIER_DIR).levels


def test_train_classifier_for_your_model(tmp_path):
    from PIL import Image

    from dlg_sampler.digits import PIPELINE_DIR, load_digits_data

    folder = tmp_path / "images" / "class0"
    folder.mkdir(parents=True)
    for i, img in enumerate(load_digits_data("train")[:40]):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy()).save(folder / f"{i}.png")
    run("train_classifier_for_your_model.py", "--model", str(PIPELINE_DIR), "--data", "images", "--steps", "20",
        "--out", "clf", cwd=tmp_path)
    clf = NoiseClassifier.from_pretrained(tmp_path / "clf")
    assert clf.sample_shape == (1, 8, 8) and (tmp_path / "clf" / "checkpoints" / "checkpoint-20").exists()
    # --data digits (the command line's default) trains on the shipped model's training split (it was "no such folder")
    out = run("train_classifier_for_your_model.py", "--data", "digits", "--steps", "3", "--out", "clf-digits",
              cwd=tmp_path)
    assert "-> clf-digits" in out and NoiseClassifier.from_pretrained(tmp_path / "clf-digits").sample_shape == (1, 8, 8)


def test_text_to_image(tmp_path, tiny_sd):
    shutil.copytree(tiny_sd, tmp_path / "sd")
    ac = DDPMScheduler.from_pretrained(tmp_path / "sd", subfolder="scheduler").alphas_cumprod.double()
    sig = ((1 - ac) / ac).sqrt()
    NoiseClassifier(float(sig[0]), float(sig[-1]), 100, sample_shape=(4, 8, 8), channels=(8,), hidden=16
                    ).save_pretrained(tmp_path / "latent-clf")
    out = run("text_to_image.py", "--model", "sd", "--classifier", "latent-clf", "--steps", "6", "--chains", "2",
              cwd=tmp_path)
    assert (tmp_path / "text_to_image.png").exists() and "NFE per image" in out
    # a Hub id that is not cached, offline: one line with the fix (it was diffusers' OSError traceback)
    err = fails("text_to_image.py", "--model", "someone/sd", "--classifier", "latent-clf", cwd=tmp_path,
                HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    assert err.startswith("error: could not load the diffusers pipeline: 'someone/sd' is not in the Hugging Face cache")
    assert "hf download someone/sd --local-dir FOLDER" in err
    # --data digits with a model of another sample shape: one line, before training
    assert "error: --data digits holds images of shape [1, 8, 8], the model samples [4, 8, 8]" in \
        fails("train_classifier_for_your_model.py", "--model", "sd", "--data", "digits", "--out", "x", cwd=tmp_path)


def test_score_sde_checkpoint(tmp_path):
    (tmp_path / "tiny_net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)\n"
        "    def forward(self, x, labels):\n"
        "        return self.conv(x)\n"
        "def build():\n"
        "    return Net()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny_net
    finally:
        sys.path.remove(str(tmp_path))
    net = tiny_net.build()
    with torch.no_grad():  # predicts the noise as x_t itself (a random kernel can make every chain diverge)
        net.conv.weight.zero_()[0, 0, 1, 1] = 1.0
        net.conv.bias.zero_()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    ema = {"decay": 0.999, "num_updates": 3, "shadow_params": [p.detach().clone() for p in net.parameters()]}
    torch.save({"model": state, "ema": ema, "step": 3}, tmp_path / "checkpoint_1.pth")
    from dlg_sampler.adapters import ScoreSdeScore

    score = ScoreSdeScore(net, sde="vp")
    NoiseClassifier(score.sigma_min, score.sigma_max, 100, channels=(8,), hidden=16).save_pretrained(tmp_path / "clf")
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env_path}"
    try:
        out = run("score_sde_checkpoint.py", "--checkpoint", "checkpoint_1.pth", "--net", "tiny_net:build", "--sde",
                  "vp", "--shape", "1", "8", "8", "--classifier", "clf", "--n", "4", cwd=tmp_path)
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert "4 samples [1, 8, 8]" in out and (tmp_path / "score_sde_samples.pt").exists()
    assert fails("score_sde_checkpoint.py", "--checkpoint", "checkpoint_2.pth", "--net", "tiny_net:build", "--shape",
                 "1", "8", "8", "--classifier", "clf", cwd=tmp_path).startswith(
        "error: the score_sde checkpoint 'checkpoint_2.pth' does not exist")


def refused(script: str, *args: str, cwd: Path, monkeypatch, capsys) -> str:
    """Run a reproducer's ``main(argv)`` in-process in ``cwd``; it must refuse: return its message."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exc:
        module.main(list(args))
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_train_digits_model(tmp_path, monkeypatch, capsys):
    """The reproducer writes a new folder by default and never replaces weights without --overwrite (it wrote to
    dlg_sampler/weights/digits/pipeline, the shipped model, when run from the repository)."""
    out = run("train_digits_model.py", "--steps", "2", "--batch-size", "4", cwd=tmp_path, stderr=True)
    bar, printed = bar_and_printed_loss(out)
    assert bar == printed  # the bar showed the loss of step 0 next to the final one
    assert DDPMPipeline.from_pretrained(tmp_path / "digits-model").unet.config.sample_size == 8
    assert "--out digits-model already holds files; pass another --out, or --overwrite" in \
        refused("train_digits_model.py", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)


def test_train_digit_features(tmp_path, monkeypatch, capsys):
    out = run("train_digit_features.py", "--steps", "2", "--batch-size", "4", cwd=tmp_path, stderr=True)
    bar, printed = bar_and_printed_loss(out)
    assert bar == printed
    assert (tmp_path / "digit-features" / "model.safetensors").exists()
    assert "--out digit-features already holds files; pass another --out, or --overwrite" in \
        refused("train_digit_features.py", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)


def photo_digits_script(script: str, images: int = 256):
    """A photo-digits reproducer loaded in-process, on ``images`` images per split instead of the fixed 20,000 / 4,000
    (seconds, not minutes)."""
    from dlg_sampler.photo_digits import make_photo_digits

    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load_photo_digits_data = lambda split, return_labels=False: (
        make_photo_digits(images, split, seed=0) if return_labels else make_photo_digits(images, split, seed=0)[0])
    return module


def test_train_photo_digits_model(tmp_path, capsys):
    """A few steps make a plain DDPM folder (linear betas, epsilon); stopped half way and run again, the result is
    bit for bit the same; other settings than the checkpoint's are refused."""
    script, threads = photo_digits_script("train_photo_digits_model.py"), torch.get_num_threads()
    common = ["--steps", "4", "--batch-size", "4", "--log-every", "1"]
    script.main([*common, "--out", str(tmp_path / "straight")])
    script.main([*common, "--checkpoint-dir", str(tmp_path / "ckpt"), "--stop-after", "2", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists() and "stopped at step 2 of 4" in capsys.readouterr().out
    script.main([*common, "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "r")])
    assert "resumed from" in capsys.readouterr().out
    a, b = DDPMPipeline.from_pretrained(tmp_path / "straight"), DDPMPipeline.from_pretrained(tmp_path / "r")
    assert a.scheduler.config.beta_schedule == "linear" and a.scheduler.config.prediction_type == "epsilon"
    assert a.unet.config.in_channels == 3 and a.unet.config.sample_size == 16
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(SystemExit):
        script.main(["--steps", "6", "--batch-size", "4", "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "other")])
    assert "made with other settings" in capsys.readouterr().err and not (tmp_path / "other").exists()
    torch.set_num_threads(threads)


def test_train_photo_digits_features(tmp_path, monkeypatch, capsys):
    script, threads = photo_digits_script("train_photo_digits_features.py"), torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    script.main(["--steps", "2", "--batch-size", "4"])
    assert "held-out" in capsys.readouterr().out and (tmp_path / "photo-digit-features" / "model.safetensors").exists()
    with pytest.raises(SystemExit):
        script.main(["--steps", "2"])
    assert "--out photo-digit-features already holds files" in capsys.readouterr().err
    torch.set_num_threads(threads)


class _Parsed(Exception):
    """Raised where an example parses its arguments, carrying its parser."""


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The argument parser ``script`` builds (the script stops where it would parse)."""
    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed) as parsed:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return parsed.value.args[0]


EXAMPLE_SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_example_help_shows_every_default(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a default
    parser = parser_of(script, monkeypatch)
    text = parser.format_help()
    defaults = [a for a in parser._actions if a.default not in (None, False, argparse.SUPPRESS)]
    assert defaults and [a.dest for a in defaults if f"(default: {a.default})" not in text] == []


def test_example_outputs_are_ignored_by_git(monkeypatch):
    """Running an example from the checkout leaves nothing for git to pick up (its default outputs)."""
    root = EXAMPLES.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    outputs = [o for o in (parser_of(s, monkeypatch).get_default("out") for s in EXAMPLE_SCRIPTS) if o]
    outputs += ["dlg_scheduler/scheduler_config.json"]  # drop_in_scheduler.py's saved scheduler
    done = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=root, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(outputs)


def test_every_example_is_tested():
    tested = {name.removeprefix("test_") + ".py" for name in globals() if name.startswith("test_")}
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested
