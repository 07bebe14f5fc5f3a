"""Scale-out: dlg-sample and dlg-train-classifier under `accelerate launch` with 2 CPU processes (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from dlg_sampler import NoiseClassifier
from dlg_sampler.shards import read_samples

BIN = Path(sys.executable).parent
N = 30


def launch(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 processes; on a machine without CUDA they join over gloo on the CPU."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_write_exactly_n_unique_samples_deterministically(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = launch(str(BIN / "dlg-sample"), "--out-dir", str(out), "--n", str(N), "--chains", "8",
                      "--shard-size", "8", "--seed", "1")
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(out)
    names = sorted(p.name for p in runs[0].iterdir())
    assert "p0-manifest.json" in names and "p1-manifest.json" in names
    a, b = read_samples(runs[0]), read_samples(runs[1])
    assert a.shape == (N, 1, 8, 8) and len(torch.unique(a.flatten(1), dim=0)) == N  # exactly N, no duplicates
    assert torch.equal(a, b)  # the same command gives the same union
    p0 = read_samples_of(runs[0], "p0-")
    p1 = read_samples_of(runs[0], "p1-")
    assert len(p0) + len(p1) == N and abs(len(p0) - len(p1)) <= 1
    assert not torch.equal(p0[: len(p1)], p1[: len(p0)])  # the processes own different chains


def read_samples_of(out: Path, prefix: str) -> torch.Tensor:
    from safetensors.torch import load_file

    shards = sorted(out.glob(f"{prefix}shard-*.safetensors"))
    return torch.cat([load_file(str(p))["samples"] for p in shards])


def test_two_process_classifier_training_saves_one_loadable_result(tmp_path):
    out = tmp_path / "clf"
    done = launch(str(BIN / "dlg-train-classifier"), "--data", "digits", "--steps", "20", "--batch-size", "32",
                  "--checkpoint-every", "20", "--channels", "8", "--hidden", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2 processes)" in done.stdout and done.stdout.count("saved to") == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-20"]
    clf = NoiseClassifier.from_pretrained(out)
    assert clf(torch.zeros(2, 1, 8, 8)).shape == (2, 1000)
