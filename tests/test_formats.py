"""Output where FID tools read it: `dlg-sample --out-dir DIR --format png|npz` writes numbered PNGs or one
samples.npz (arr_0 uint8 [N, H, W, 3]) as the run goes, resumable like the shards (killed at any point, rerun:
complete, nothing duplicated, bit-identical); `dlg-export DIR --format png|npz` converts a finished shard folder;
mistakes are refused before sampling with nothing lost; every file the CLI writes gets the user's file mode."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlg_sampler import GaussianMixture, cli, shards
from dlg_sampler.models import LoadedModel
from dlg_sampler.shards import ShardWriter, read_images, read_samples
from dlg_sampler.testing import error_of

ROOT = Path(__file__).resolve().parent.parent
N, SHARD = 24, 8  # in-process runs of the tiny 1 x 8 x 8 model: 3 shards
KILL_N = 96  # the killed runs: 12 shards, long enough to be killed in the middle


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the subprocess runs (OMP_NUM_THREADS=1): the same arithmetic, the same
    bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argv(model: Path, out_dir: Path, *extra: str, n: int = N, chains: int = 4) -> list[str]:
    return ["--model", str(model / "pipe"), "--out-dir", str(out_dir), "--n", str(n), "--shard-size", str(SHARD),
            "--chains", str(chains), "--seed", "3", *extra]


def as_uint8(samples: torch.Tensor) -> torch.Tensor:
    """What FID tools get from samples ``[N, 1, H, W]`` in [-1, 1]: ``round((x + 1) * 127.5)``, grey as RGB."""
    x = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3)


def png_folder(folder: Path) -> tuple[list[str], torch.Tensor]:
    """The PNG names in ``folder`` and their pixels ``[N, H, W, 3]``, as FID tools read them (RGB)."""
    names = sorted(p.name for p in folder.glob("*.png"))
    pixels = [np.asarray(Image.open(folder / name).convert("RGB")) for name in names]
    return names, torch.from_numpy(np.stack(pixels)) if pixels else torch.empty(0)


def numbered(n: int) -> list[str]:
    return [f"{i:06d}.png" for i in range(n)]


def adm_read(path: Path) -> np.ndarray:
    """arr_0 read the way the ADM evaluation suite reads it: the npy member of the zip, its header, then the bytes."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_{version[1]}")(f)
        assert not fortran
        return np.frombuffer(f.read(), dtype=dtype).reshape(shape)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# what the formats hold


def test_png_and_npz_runs_and_exports_hold_the_uint8_images_of_the_samples(tiny_model, tmp_path, one_thread):
    cli.sample_main(argv(tiny_model, tmp_path / "raw"))
    expected = as_uint8(read_samples(tmp_path / "raw"))
    assert expected.shape == (N, 8, 8, 3) and len(torch.unique(expected.flatten(1), dim=0)) == N

    cli.sample_main(argv(tiny_model, tmp_path / "png", "--format", "png"))
    names, pixels = png_folder(tmp_path / "png")
    assert names == numbered(N) and torch.equal(pixels, expected)
    assert {Image.open(tmp_path / "png" / name).size for name in names} == {(8, 8)}
    with pytest.raises(ValueError, match="read_images"):
        read_samples(tmp_path / "png")  # the png run keeps images, not raw samples, and says so

    cli.sample_main(argv(tiny_model, tmp_path / "npz", "--format", "npz"))
    npz = np.load(tmp_path / "npz" / "samples.npz")
    assert list(npz.keys()) == ["arr_0"] and npz["arr_0"].dtype == np.uint8
    assert torch.equal(torch.from_numpy(npz["arr_0"]), expected)
    assert np.array_equal(adm_read(tmp_path / "npz" / "samples.npz"), npz["arr_0"])
    assert not list((tmp_path / "npz").glob("*.png"))

    # dlg-export converts the finished shard folder to the same files
    cli.export_main([str(tmp_path / "raw"), "--format", "npz"])
    assert np.array_equal(np.load(tmp_path / "raw" / "samples.npz")["arr_0"], npz["arr_0"])
    cli.export_main([str(tmp_path / "raw"), "--format", "png", "--out", str(tmp_path / "fid")])
    names, pixels = png_folder(tmp_path / "fid")
    assert names == numbered(N) and torch.equal(pixels, expected)
    for name in names:  # PNG encoding is deterministic: the export's files are the png run's, byte for byte
        assert (tmp_path / "fid" / name).read_bytes() == (tmp_path / "png" / name).read_bytes()
    # an interrupted export (a PNG missing, a temporary file left) is completed by rerunning it
    (tmp_path / "fid" / "000005.png").unlink()
    (tmp_path / "fid" / ".000006.png.tmp-999").write_bytes(b"partial")
    cli.export_main([str(tmp_path / "raw"), "--format", "png", "--out", str(tmp_path / "fid")])
    assert png_folder(tmp_path / "fid")[0] == numbered(N) and hidden(tmp_path / "fid") == []
    assert torch.equal(read_images(tmp_path / "png"), expected) and torch.equal(read_images(tmp_path / "npz"), expected)


def test_processes_number_their_pngs_in_one_sequence_and_merge_into_one_npz(tmp_path):
    """Under accelerate each process writes its own shards and the PNGs of its share of the run's numbering; the
    .npz and the exports follow the processes in order (p2 before p10)."""
    world, share = 11, 2
    for rank in range(world):
        writer = ShardWriter(tmp_path, {"n": world * share, "processes": world}, prefix=f"p{rank}-", format="png",
                             images=range(rank * share, (rank + 1) * share))
        for j in range(share):  # one image per shard, its value says which sample of the run it is
            value = torch.full((1, 4, 4, 3), rank * share + j, dtype=torch.uint8)
            writer.write(torch.zeros(1, 1, 4, 4), {"step": j}, value)
    names, pixels = png_folder(tmp_path)
    assert names == numbered(world * share)
    assert pixels[:, 0, 0, 0].tolist() == list(range(world * share))
    assert torch.equal(read_images(tmp_path), pixels)
    assert shards.write_npz(tmp_path) == (world * share, 4, 4, 3)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "samples.npz")["arr_0"]), pixels)


def test_two_accelerate_processes_write_one_png_numbering_and_one_npz(tiny_model, tmp_path):
    bin_dir = Path(sys.executable).parent
    for fmt in ("png", "npz"):
        done = subprocess.run(
            [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
             str(bin_dir / "dlg-sample"), *argv(tiny_model, tmp_path / fmt, "--format", fmt, n=30)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    names, pixels = png_folder(tmp_path / "png")
    assert names == numbered(30) and len(torch.unique(pixels.flatten(1), dim=0)) == 30  # no name or image twice
    ranges = [json.loads((tmp_path / "png" / f"p{k}-manifest.json").read_text())["images"] for k in (0, 1)]
    assert ranges == [[0, 15], [15, 30]]
    assert sorted(p.name for p in (tmp_path / "npz").glob("*.npz")) == ["samples.npz"]  # one file for the run
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "npz" / "samples.npz")["arr_0"]), pixels)


# ---------------------------------------------------------------------------------------------------------------
# killed and rerun


def listed(out_dir: Path) -> int:
    try:
        return len(json.loads((out_dir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_kill_9_during_a_png_or_npz_run_then_rerun_gives_the_uninterrupted_images(fmt, tiny_model, tmp_path,
                                                                                   one_thread):
    out = tmp_path / "killed"
    cmd = [str(Path(sys.executable).parent / "dlg-sample"),
           *argv(tiny_model, out, "--format", fmt, n=KILL_N, chains=8)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while listed(out) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < listed(out) < KILL_N // SHARD, "the run was not killed in its middle"
    # nothing partial under a final name: every PNG there is whole, and no .npz before the run is complete
    for png in out.glob("*.png"):
        Image.open(png).load()
    assert not (out / "samples.npz").exists()

    cli.sample_main(argv(tiny_model, out, "--format", fmt, n=KILL_N, chains=8))  # the same command, rerun
    cli.sample_main(argv(tiny_model, tmp_path / "ref", n=KILL_N, chains=8))  # uninterrupted, raw samples
    expected = as_uint8(read_samples(tmp_path / "ref"))
    if fmt == "png":
        names, pixels = png_folder(out)
        assert names == numbered(KILL_N) and torch.equal(pixels, expected)
    else:
        assert torch.equal(torch.from_numpy(np.load(out / "samples.npz")["arr_0"]), expected)
    assert hidden(out) == []


def test_a_png_run_killed_between_its_pngs_and_their_shard_resumes_exactly(tiny_model, tmp_path, monkeypatch,
                                                                          one_thread):
    cli.sample_main(argv(tiny_model, tmp_path / "ref", "--format", "png"))
    expected = png_folder(tmp_path / "ref")[1]
    out = tmp_path / "run"
    save, calls = shards.save_tensors, []

    def killed_at_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second shard's PNGs are written, the shard itself is not
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(shards, "save_tensors", killed_at_the_second_shard)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C ends dlg-sample with one line and exit code 130
        cli.sample_main(argv(tiny_model, out, "--format", "png"))
    monkeypatch.undo()
    assert listed(out) == 1 and png_folder(out)[0] == numbered(2 * SHARD)  # 8 PNGs no shard lists
    (out / "000003.png").write_bytes(b"not a png")  # and a listed one damaged: the run restarts before it
    cli.sample_main(argv(tiny_model, out, "--format", "png"))
    names, pixels = png_folder(out)
    assert names == numbered(N) and torch.equal(pixels, expected) and hidden(out) == []


def test_an_npz_run_killed_while_it_writes_the_npz_resumes_exactly(tiny_model, tmp_path, monkeypatch, one_thread):
    cli.sample_main(argv(tiny_model, tmp_path / "ref", "--format", "npz"))
    expected = np.load(tmp_path / "ref" / "samples.npz")["arr_0"]
    out = tmp_path / "run"
    images = shards.iter_images

    def killed_after_one_shard(out_dir):
        chunks = images(out_dir)
        yield next(chunks)
        raise KeyboardInterrupt  # Ctrl-C after the first shard's images went into the temporary file

    monkeypatch.setattr(shards, "iter_images", killed_after_one_shard)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C ends dlg-sample with one line and exit code 130
        cli.sample_main(argv(tiny_model, out, "--format", "npz", "--png"))
    monkeypatch.undo()
    assert listed(out) == N // SHARD and not (out / "samples.npz").exists()
    (out / ".samples.npz.tmp-999").write_bytes(b"PK partial")  # what a kill -9 in the write leaves
    cli.sample_main(argv(tiny_model, out, "--format", "npz", "--png"))
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], expected) and hidden(out) == []
    assert sorted(p.name for p in out.glob("*.png")) == [f"shard-0000{k}.png" for k in range(3)]  # grids kept


# ---------------------------------------------------------------------------------------------------------------
# mistakes: one line, before any sampling, nothing lost


def no_sampling(*args, **kwargs):
    raise AssertionError("sampling started before the inputs were checked")


@pytest.mark.parametrize("args, message", [
    (["--format", "jpeg", "--out-dir", "run"], "'jpeg' is not an output format: use png, npz, safetensors (JPEG's"),
    (["--format", "png"], "--format png writes into --out-dir: add --out-dir DIR"),
    (["--format", "png", "--out-dir", "run", "--png"], "FID tools would read them as samples: drop --png"),
])
def test_sample_format_mistakes_are_refused_before_loading(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.common, "load_model", no_sampling)
    assert message in error_of(cli.sample_main, args, capsys)
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_an_out_dir_holding_other_images_or_another_run(tiny_model, tmp_path, monkeypatch, capsys,
                                                                       one_thread):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"the user's cat")
    (photos / "samples.npz").write_bytes(b"the user's npz")
    monkeypatch.setattr(cli.sample.DLGSampler, "for_budget", no_sampling)
    for fmt, name in (("png", "cat.png"), ("npz", "samples.npz")):
        err = error_of(cli.sample_main, argv(tiny_model, photos, "--format", fmt), capsys)
        assert f"holds {name}" in err and "pass" in err and "Traceback" not in err
    assert sorted(p.name for p in photos.iterdir()) == ["cat.png", "samples.npz"]  # nothing written, nothing lost
    assert (photos / "cat.png").read_bytes() == b"the user's cat"
    monkeypatch.undo()
    cli.sample_main(argv(tiny_model, tmp_path / "run", "--format", "png"))
    err = error_of(cli.sample_main, argv(tiny_model, tmp_path / "run", "--format", "npz"), capsys)
    assert "format: 'png' -> 'npz'" in err and "dlg-export" in err
    assert png_folder(tmp_path / "run")[0] == numbered(N)


def test_sample_refuses_png_for_samples_that_are_not_images(tmp_path, monkeypatch, capsys):
    mixture = GaussianMixture.random(num_modes=2, dim=8, spread=2.0, std=0.5, seed=0)
    model = LoadedModel(mixture.score, (8,), 0.01, 80.0, lambda x: x)
    monkeypatch.setattr(cli.common, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(cli.sample.DLGSampler, "for_budget", no_sampling)
    err = error_of(cli.sample_main, ["--model", "mixture", "--out-dir", str(tmp_path / "run"), "--format", "npz"],
                   capsys)
    assert "--format npz writes images with 1 or 3 channels" in err and "use --format safetensors" in err


def finished_run(out_dir: Path, n: int = 6, *, written: int | None = None, seed: int = 0, **config) -> torch.Tensor:
    """A dlg-sample-style shard folder of ``n`` image samples ``[n, 1, 4, 4]`` (only ``written`` of them)."""
    samples = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    writer = ShardWriter(out_dir, {"n": n, "processes": 1, **config})
    for start in range(0, n if written is None else written, 4):
        writer.write(samples[start:start + 4], {"step": start})
    return samples


def test_export_mistakes_are_refused_and_nothing_is_lost(tmp_path, capsys):
    expected = as_uint8(finished_run(tmp_path / "a"))
    finished_run(tmp_path / "b", seed=1)
    finished_run(tmp_path / "half", written=4)
    finished_run(tmp_path / "latent", latents=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"the user's cat")
    (tmp_path / "taken.npz").write_bytes(b"someone's npz")
    cli.export_main([str(tmp_path / "b"), "--format", "png", "--out", str(tmp_path / "fid-b")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "fid-b").iterdir()}
    a = str(tmp_path / "a")
    for args, message in [
        ([a, "--format", "jpeg"], "'jpeg' is not an output format: use png, npz"),
        ([str(tmp_path / "nothing"), "--format", "npz"], "is not a folder: pass the --out-dir of a dlg-sample run"),
        ([str(photos), "--format", "npz"], "is not a dlg-sample --out-dir"),
        ([str(tmp_path / "half"), "--format", "npz"], "holds an unfinished run (4 of 6 samples): rerun its "
                                                      "dlg-sample command to finish it"),
        ([str(tmp_path / "latent"), "--format", "npz"], "need the model's VAE to become images"),
        ([a, "--format", "png", "--out", str(photos)], "holds cat.jpg, an image that is not this run's, which FID "
                                                       "tools would read with its PNGs: pass an empty or new --out"),
        ([a, "--format", "png", "--out", str(tmp_path / "fid-b")], "holds the PNGs of another run"),
        ([a, "--format", "npz", "--out", str(tmp_path / "taken.npz")], "exists already: pass another --out"),
        ([a, "--format", "npz", "--out", str(tmp_path / "x.zip")], "pass an .npz file path"),
    ]:
        err = error_of(cli.export_main, args, capsys)
        assert message in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"]
    assert (tmp_path / "taken.npz").read_bytes() == b"someone's npz"
    assert {p.name: p.read_bytes() for p in (tmp_path / "fid-b").iterdir()} == before
    cli.export_main([a, "--format", "png"])  # into the run's own folder, beside its shards
    names, pixels = png_folder(tmp_path / "a")
    assert names == numbered(6) and torch.equal(pixels, expected)
    # a latent model's png run holds decoded images: those export
    writer = ShardWriter(tmp_path / "decoded", {"n": 6, "processes": 1, "latents": True}, format="png",
                         images=range(6))
    writer.write(torch.zeros(6, 4, 2, 2), {"step": 0}, expected)
    cli.export_main([str(tmp_path / "decoded"), "--format", "npz"])
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "decoded" / "samples.npz")["arr_0"]), expected)


def test_export_help_and_usage_guide_explain_every_option():
    parser = cli.export_parser()
    assert [a.option_strings for a in parser._actions if a.option_strings and not a.help] == []
    guide = (ROOT / "docs" / "usage.md").read_text()
    section = guide[guide.index("## Output for FID tools"):]
    assert all(f"`{o}" in section for o in ("dlg-export DIR", "--format", "--out"))


# ---------------------------------------------------------------------------------------------------------------
# file modes


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_files_the_cli_writes_get_the_users_mode(tiny_model, tmp_path, monkeypatch, one_thread):
    """safetensors writes its files 0600 and a temporary file renamed into place keeps its mode: every output
    must get ``0o666 & ~umask`` instead, as a PNG does."""
    monkeypatch.chdir(tmp_path)
    umask = os.umask(0o027)
    try:
        cli.sample_main(argv(tiny_model, tmp_path / "run", "--format", "npz"))
        cli.sample_main(argv(tiny_model, tmp_path / "png", "--format", "png"))
        cli.sample_main(["--model", str(tiny_model / "pipe"), "--n", "8", "--chains", "4", "--out", "grid.png"])
        cli.train_classifier_main(["--data", "digits", "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2",
                                   "--channels", "8", "--hidden", "16", "--num-levels", "10", "--out", "clf"])
    finally:
        os.umask(umask)
    written = [*(tmp_path / "run").iterdir(), *(tmp_path / "png").iterdir(), tmp_path / "grid.png",
               tmp_path / "grid.safetensors", *(tmp_path / "clf").rglob("*.*")]
    assert {p.suffix for p in written} >= {".safetensors", ".json", ".npz", ".png"}
    assert {p.relative_to(tmp_path).as_posix(): oct(mode(p)) for p in written if p.is_file()} == {
        p.relative_to(tmp_path).as_posix(): oct(0o640) for p in written if p.is_file()}
