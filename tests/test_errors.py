"""Damaged or mismatched files get one line naming the file, what is wrong with it and the fix, not a traceback:
noise classifier folders, score_sde checkpoints, through the library and through the command line."""

import json
from pathlib import Path

import pytest
import torch

from dlg_sampler import NoiseClassifier, cli, testing
from dlg_sampler.adapters import load_score_sde_checkpoint
from dlg_sampler.digits import PIPELINE_DIR
from dlg_sampler.models import load_classifier, load_model


def one_line_error_of(main, argv, capsys) -> str:
    """Run a console script's main in-process; it must exit with one line (no traceback): return it."""
    message = testing.error_of(main, argv, capsys)
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    return message


def classifier_folder(path: Path, **kwargs) -> Path:
    NoiseClassifier(0.01, 50.0, 10, channels=(8,), hidden=kwargs.pop("hidden", 16), **kwargs).save_pretrained(path)
    return path


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------------------------
# noise classifier folders

def corrupt(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 100)  # the first 8 bytes read as a huge header length


def truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


def other_width(folder: Path) -> None:
    edit_config(folder, lambda c: c.update(hidden=32))  # the weights were saved for hidden=16


@pytest.mark.parametrize("damage, message", [
    (corrupt, "model.safetensors is not a safetensors file (header too large): the file is corrupt or truncated; "
              "re-download it, or save it again."),
    (truncated, "model.safetensors is not a safetensors file ("),
    (other_width, "model.safetensors does not fit the NoiseClassifier its config.json describes: 3 of another shape "
                  "(head.0.weight is [16, 12], not [32, 12], head.0.bias is [16], not [32], head.2.weight is "
                  "[10, 16], not [10, 32]); the two files come from different models: save them again together"),
    (lambda f: (f / "config.json").write_text("{not json"), "its config.json is not a JSON object"),
    (lambda f: edit_config(f, lambda c: c.pop("num_levels")), "its config.json lacks num_levels."),
    (lambda f: edit_config(f, lambda c: c.update(width=3)), "its config.json has keys NoiseClassifier does not "
                                                            "take: width."),
    (lambda f: (f / "model.safetensors").unlink(), "it has no model.safetensors; it holds README.md, config.json."),
    (lambda f: (f / "config.json").unlink(), "it has no config.json; it holds README.md, model.safetensors."),
])
def test_a_damaged_classifier_folder_says_what_is_wrong_with_its_files(damage, message, tmp_path):
    """A corrupt model.safetensors raised SafetensorError with a traceback; a folder with a bad config.json was
    'not config.json + model.safetensors: it holds config.json, model.safetensors'."""
    folder = classifier_folder(tmp_path / "clf")
    damage(folder)
    with pytest.raises(ValueError) as err:
        load_classifier(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_corrupt_classifier_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    corrupt(classifier_folder(tmp_path / "clf"))
    monkeypatch.chdir(tmp_path)
    err = one_line_error_of(cli.sample_main, ["--model", str(PIPELINE_DIR), "--classifier", "clf", "--n", "2"], capsys)
    assert err.startswith("error: the noise classifier 'clf' could not be loaded: clf/model.safetensors is not a "
                          "safetensors file (header too large)")


def test_the_library_loader_says_the_same(tmp_path):
    """NoiseClassifier.from_pretrained itself (the examples call it) raises the one-line ValueError."""
    folder = classifier_folder(tmp_path / "clf")
    corrupt(folder)
    with pytest.raises(ValueError, match=r"clf/model.safetensors is not a safetensors file \(header too large\)"):
        NoiseClassifier.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# score_sde checkpoints

class _Net(torch.nn.Module):
    def __init__(self, width: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1)

    def forward(self, x, labels):
        return self.conv(x)


def _write(path: Path, content) -> Path:
    if content is None:  # no file
        return path
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def _zip_cut(path: Path) -> bytes:
    torch.save({"model": _Net().state_dict()}, path)
    data = path.read_bytes()
    return data[:len(data) // 2]


@pytest.mark.parametrize("name, content, message", [
    ("text.pth", b"hello\n", "is not a checkpoint torch.load can read (KeyError: 101): the file is corrupt, "
                             "truncated or not a PyTorch checkpoint; re-download it, or save it again with "
                             "torch.save."),
    ("empty.pth", b"", "is not a checkpoint torch.load can read (EOFError)"),
    ("random.pth", bytes([0x80, 0x02, 0x7c]) + b"\x00" * 50, "is not a checkpoint torch.load can read (Unsupported "
                                                             "operand 124)"),
    ("cut.pth", "zip", "is not a checkpoint torch.load can read (RuntimeError: PytorchStreamReader failed reading zip "
                       "archive: failed finding central directory)"),
    ("bad.safetensors", b"\xff" * 100, "bad.safetensors is not a safetensors file (header too large)"),
    ("keys.pth", {"model": {"module.weight": torch.zeros(1)}}, "does not fit the network: 2 missing (conv.weight, "
                                                               "conv.bias), 1 unexpected (weight); build the network"),
    ("shape.pth", {"model": _Net(2).state_dict()}, "does not fit the network: 2 of another shape (conv.weight is "
                                                   "[2, 1, 3, 3], not [1, 1, 3, 3], conv.bias is [2], not [1])"),
    ("numbers.pth", {"model": 5}, "is not a score_sde checkpoint: its model entry is not a state dict"),
    ("ema.pth", {"model": _Net().state_dict(), "ema": {"decay": 0.9}}, "'s ema entry is not score_sde's EMA state"),
    ("missing.pth", None, "missing.pth: there is no such file; pass the checkpoint file."),
])
def test_an_unreadable_or_mismatched_checkpoint_says_what_is_wrong(name, content, message, tmp_path):
    """A text file raised KeyError: 101 from the unpickler; random bytes were reported as needing pickle code;
    a checkpoint of another network printed torch's multi-line key lists."""
    path = tmp_path / name
    _write(path, _zip_cut(path) if content == "zip" else content)
    with pytest.raises(ValueError) as err:
        load_score_sde_checkpoint(path, _Net())
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_garbage_checkpoint_with_a_working_network_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "errors_tiny_net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Conv2d(1, 1, 3, padding=1)\n")
    (tmp_path / "garbage.pth").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    err = one_line_error_of(cli.sample_main, ["--model", "garbage.pth", "--score-sde-net", "errors_tiny_net:build", "--shape",
                                     "1", "8", "8", "--n", "2"], capsys)
    assert err.startswith("error: garbage.pth is not a checkpoint torch.load can read (KeyError: 101)")


def test_a_missing_checkpoint_file_is_named_as_one(tmp_path, monkeypatch):
    """It was reported as 'not a Hub repo id: pass a diffusers pipeline folder'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"the score_sde checkpoint 'ckpt/checkpoint_8.pth' does not exist \(looked "
                                         r"in .*\): pass the path of the checkpoint file"):
        load_model("ckpt/checkpoint_8.pth", score_sde_net="m:f", shape=(1, 8, 8))
