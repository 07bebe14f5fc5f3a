"""Resumable sample shards: long runs that lose and duplicate nothing.

An output folder holds ``manifest.json`` and ``shard-00000.safetensors``, ``shard-00001.safetensors`` ... Each
shard holds the sampler state after its samples (tensors under ``"state.*"``, the rest as JSON metadata) and, by the
run's output format, its samples ``"samples" [k, *shape]`` (``safetensors``, the default), their images
``"images" [k, H, W, 3]`` uint8 (``npz``: assembled into one ``samples.npz`` once the run is complete), or nothing
more (``png``: the images are numbered PNGs beside the shards, ``000000.png`` ..., written before their shard, their
SHA-256 in the manifest). Every file is written to a temporary file and renamed into place, the shard after its PNGs,
then the manifest is replaced the same way. A run killed at any point leaves a folder whose manifest lists only
complete shards and no partial file under a final name; rerunning the same command restores the sampler from the last
listed shard and continues, so the folder ends with exactly ``n`` samples, bit-identical to an uninterrupted run with
the same seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .images import to_uint8

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: Output formats: the raw samples in the shards, numbered PNGs, or one ``.npz`` (``arr_0`` uint8 ``[N, H, W, C]``).
FORMATS = ("safetensors", "png", "npz")
#: The ``.npz`` of a ``--format npz`` run, in its folder.
NPZ = "samples.npz"
#: Files FID tools read from a folder as images: none but the run's own PNGs may sit beside them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".npy")
#: Written first into the folder of a PNG export: which run the PNGs there are (:func:`write_pngs`).
EXPORT_MARKER = "dlg-export.json"
#: A run's PNG, complete (``000042.png``) or a temporary file of one being written (``.000042.png.tmp-PID``).
_PNG = re.compile(r"^\.?(\d{6,})\.png(\.tmp-\d+)?$")


def png_name(index: int) -> str:
    """The file name of image ``index`` of a run (``000042.png``): one numbering over every process's images."""
    return f"{index:06d}.png"


def user_mode() -> int:
    """The mode ``open`` gives a new file: ``0o666 & ~umask``."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` leaving the file with the user's normal mode (:func:`user_mode`), as every
    other file gets: safetensors itself makes its files readable by their owner only (0600)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, user_mode())


def _atomic_write(path: Path, write: Callable[[Path], None], *, sync: bool = True) -> None:
    """Write ``path`` through ``write(tmp)`` then ``os.replace``: readers see the old file or the complete new one.
    ``sync=False`` skips the ``fsync`` (files whose SHA-256 the manifest checks on resume: a kill cannot cut them,
    only a power loss, and then the check redoes them)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(path: Path, image: np.ndarray) -> None:
    """``image [H, W, 3]`` uint8 -> ``path`` (an RGB PNG), through a temporary file."""
    _atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), sync=False)


def sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pngs_sha256(out_dir: Path, first: int, count: int) -> str | None:
    """One SHA-256 over the PNGs ``first .. first + count - 1`` in ``out_dir`` (``None`` if one is missing)."""
    paths = [out_dir / png_name(first + j) for j in range(count)]
    if not all(p.is_file() for p in paths):
        return None
    return hashlib.sha256("".join(sha256(p) for p in paths).encode()).hexdigest()


def _flatten_state(state: dict[str, Any], prefix: str = "state.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a sampler ``state_dict`` into tensors (``state.<key>``, ``state.<key>.<subkey>`` inside nested dicts
    such as the output correlation's) and the JSON-able rest."""
    tensors, rest = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}{key}"] = value.detach().contiguous().cpu()
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            inner, rest[key] = _flatten_state(value, f"{prefix}{key}.")
            tensors.update(inner)
        else:
            rest[key] = value
    return tensors, rest


class ShardWriter:
    """Writes ``n`` samples into ``out_dir`` in shards of ``shard_size``, resuming a previous run of the same config.

    Args:
        out_dir: the output folder (created).
        config: everything that determines the samples (model, classifier, sampler settings, seed, n, shard size);
            a folder written with another config is refused, naming the differing settings, unless ``overwrite``.
            The output ``format`` is added to it.
        derived: keys of ``config`` whose values the run derives from the others (the settings a pilot chose):
            written to the manifest with the rest, not compared on resume, and restored from the manifest then.
            A fresh run sets them (``writer.config[key] = ...``) before its first shard.
        overwrite: discard an existing run in ``out_dir``.
        prefix: shard / manifest name prefix (one writer per process shares a folder: ``"p0-"``, ``"p1-"`` ...).
        format: one of :data:`FORMATS`: what the shards keep besides the sampler state (module docstring).
        images: ``png``: the numbers of this writer's images in the run (its process's share; ``range(n)`` for one
            process), so the processes of one run write one numbering and never the same name.
    """

    def __init__(self, out_dir: str | Path, config: dict[str, Any], *, derived: tuple[str, ...] = (),
                 overwrite: bool = False, prefix: str = "", format: str = "safetensors", images: range = range(0)):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out-dir {self.out_dir} is a file, not a folder: pass a folder path.")
        if format not in FORMATS:
            raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}.")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise ValueError(f"cannot write to {self.out_dir} ({err.strerror}): pass a writable --out-dir.") from err
        self.config = json.loads(json.dumps({**config, "format": format}))
        self.derived = tuple(derived)
        self.prefix = prefix
        self.format = format
        self.images = images
        self.manifest_path = self.out_dir / f"{prefix}{MANIFEST}"
        self.shards: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        if self.manifest_path.exists() and not overwrite:
            self._resume()
        else:
            if self.manifest_path.exists():
                self._discard()
            self._check_fresh()
            self._write_manifest()  # from now on the folder's files of this run are the manifest's, even before shard 0

    # ------------------------------------------------------------------ resume
    def _pngs(self, numbers: range) -> list[Path]:
        """The run's PNGs in the folder (complete or temporary) whose number is in ``numbers``."""
        return [p for p in self.out_dir.iterdir() if (m := _PNG.match(p.name)) and int(m[1]) in numbers]

    def _check_fresh(self) -> None:
        """A new run takes no final name that a file in the folder already has, and its PNGs get no other images
        beside them (FID tools read every image of a folder)."""
        if self.format == "npz" and (self.out_dir / NPZ).exists():
            raise ValueError(f"{self.out_dir} holds {NPZ}, which no run there lists: pass another --out-dir, or move "
                             "it away first.")
        if self.format == "png":
            for p in sorted(self.out_dir.iterdir()):
                m = _PNG.match(p.name)
                if p.suffix.lower() in IMAGE_SUFFIXES and (m is None or int(m[1]) in self.images):
                    raise ValueError(f"{self.out_dir} holds {p.name}, an image no run there lists, which FID tools "
                                     "would read with this run's PNGs: pass an empty or new --out-dir.")

    def _discard(self) -> None:
        try:  # the previous run's PNGs, listed or not; its own numbers if its manifest says them
            numbers = range(*json.loads(self.manifest_path.read_text()).get("images", (0, 0)))
        except (json.JSONDecodeError, TypeError, ValueError):
            numbers = range(0)
        for p in [*self.out_dir.glob(f"{self.prefix}shard-*"), *self._pngs(numbers), *self._pngs(self.images)]:
            p.unlink(missing_ok=True)
        (self.out_dir / NPZ).unlink(missing_ok=True)
        self.manifest_path.unlink()

    def _resume(self) -> None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
            saved, shards = manifest["config"], list(manifest["shards"])
            saved.setdefault("format", "safetensors")  # written before the format was recorded
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{self.manifest_path} is corrupt ({err}): delete it to restart from its shards' "
                             "beginning, or pass --overwrite to start over.") from err
        diff = sorted(k for k in set(saved) | set(self.config)
                      if k not in self.derived and saved.get(k) != self.config.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {self.config.get(k)!r}" for k in diff)
            export = (f" (dlg-export {self.out_dir} --format {self.format} converts a finished run)"
                      if "format" in diff and self.format != "safetensors" else "")
            raise ValueError(f"{self.out_dir} holds a run with a different configuration ({details}): rerun with the "
                             f"same settings to resume, pass another --out-dir, or --overwrite to discard it{export}.")
        self.config.update({k: saved[k] for k in self.derived if k in saved})
        for entry in shards:  # keep the longest prefix of shards that are intact, their PNGs included
            path = self.out_dir / entry["file"]
            if not path.exists() or sha256(path) != entry["sha256"]:
                self.warnings.append(f"shard {path.name} is missing or corrupt: resuming from the shard before it")
                break
            if "images_sha256" in entry and (
                    _pngs_sha256(self.out_dir, entry["first"], entry["count"]) != entry["images_sha256"]):
                self.warnings.append(f"a PNG of shard {path.name} is missing or corrupt: resuming from the shard "
                                     "before it")
                break
            self.shards.append(entry)
        listed = {name for e in self.shards for name in (e["file"], Path(e["file"]).with_suffix(".png").name)}
        leftovers = [*self.out_dir.glob(f"{self.prefix}shard-*"), *self.out_dir.glob(f".{self.prefix}shard-*.tmp-*"),
                     *self.out_dir.glob(f".{self.prefix}{MANIFEST}.tmp-*")]
        for p in leftovers:  # unlisted shards (and their --png grids) and temporary files of a killed write
            if p.name not in listed:
                p.unlink()
        for p in self._pngs(range(self.images.start + self.count, self.images.stop)):  # PNGs of an unlisted shard
            p.unlink()
        for p in self._pngs(self.images):
            if p.name.startswith("."):
                p.unlink()
        if len(self.shards) != len(shards):
            self._write_manifest()

    # ------------------------------------------------------------------ state
    @property
    def count(self) -> int:
        """Samples written so far."""
        return sum(e["count"] for e in self.shards)

    def last_state(self) -> dict[str, Any] | None:
        """The sampler state stored with the last complete shard (``None`` for a fresh run)."""
        if not self.shards:
            return None
        path = self.out_dir / self.shards[-1]["file"]
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            state = json.loads(f.metadata()["state"])
        for name, tensor in tensors.items():
            if name.startswith("state."):
                *outer, key = name[len("state."):].split(".")
                target = state
                for part in outer:
                    target = target.setdefault(part, {})
                target[key] = tensor
        return state

    def write(self, samples: torch.Tensor, state: dict[str, Any], images: torch.Tensor | None = None) -> Path:
        """Append one shard: ``samples [k, *shape]`` and the sampler ``state`` after them; atomic. The png and npz
        formats keep the samples' ``images [k, H, W, C]`` (uint8, :func:`~dlg_sampler.images.to_uint8`) instead
        of the samples: png as numbered PNG files, written before the shard."""
        index = len(self.shards)
        path = self.out_dir / f"{self.prefix}shard-{index:05d}.safetensors"
        tensors, rest = _flatten_state(state)
        entry = {"file": path.name, "count": len(samples)}
        if self.format == "safetensors":
            tensors["samples"] = samples.detach().contiguous().cpu()
        elif self.format == "npz":
            tensors["images"] = images.contiguous().cpu()
        else:
            first = self.images.start + self.count
            for j, image in enumerate(images.cpu().numpy()):
                _write_png(self.out_dir / png_name(first + j), image)
            entry.update(first=first, images_sha256=_pngs_sha256(self.out_dir, first, len(images)))
        metadata = {"state": json.dumps(rest), "format_version": str(FORMAT_VERSION)}
        _atomic_write(path, lambda tmp: save_tensors(tensors, tmp, metadata))
        self.shards.append({**entry, "sha256": sha256(path)})
        self._write_manifest()
        return path

    def _write_manifest(self) -> None:
        manifest = {"format_version": FORMAT_VERSION, "config": self.config, "shards": self.shards,
                    "count": self.count}
        if self.format == "png":
            manifest["images"] = [self.images.start, self.images.stop]
        _atomic_write(self.manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


# ---------------------------------------------------------------------------------------------------------- reading
def manifests(out_dir: str | Path) -> list[dict[str, Any]]:
    """The manifests of every process of the run in ``out_dir``, in process order (``manifest.json``, or
    ``p0-manifest.json``, ``p1-`` ... ``p10-``), each with ``"path"`` added."""
    out_dir = Path(out_dir)
    paths = sorted(out_dir.glob(f"*{MANIFEST}"), key=lambda p: (len(p.name), p.name))
    if not paths:
        raise ValueError(f"no {MANIFEST} in {out_dir}: is it a dlg-sample --out-dir?")
    found = []
    for path in paths:
        try:
            found.append({**json.loads(path.read_text()), "path": path})
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is corrupt ({err}).") from err
    return found


def read_samples(out_dir: str | Path) -> torch.Tensor:
    """All samples listed by every manifest in ``out_dir``, in process order: ``[N, *shape]``."""
    out_dir = Path(out_dir)
    chunks = []
    for m in manifests(out_dir):
        fmt = m["config"].get("format", "safetensors")
        if fmt != "safetensors":
            raise ValueError(f"{out_dir} holds a --format {fmt} run: it keeps the images, not the raw samples "
                             "(read them with dlg_sampler.shards.read_images).")
        for entry in m["shards"]:
            try:
                chunks.append(load_file(str(out_dir / entry["file"]))["samples"])
            except (SafetensorError, OSError) as err:
                raise ValueError(f"shard {entry['file']} in {out_dir} cannot be read ({err}).") from err
    return torch.cat(chunks)


def iter_images(out_dir: str | Path) -> Iterator[torch.Tensor]:
    """The run's images in order, one shard at a time, each checked against its SHA-256: ``[k, H, W, 3]`` uint8,
    ``round((x + 1) * 127.5)`` of the samples clamped to ``[-1, 1]``, one channel repeated to three (what FID
    tools read). Samples that are not images (latents, vectors) are refused."""
    out_dir = Path(out_dir)
    for m in manifests(out_dir):
        fmt = m["config"].get("format", "safetensors")
        if fmt == "safetensors" and m["config"].get("latents"):
            raise ValueError(f"{out_dir} holds latents of a latent model, which need the model's VAE to become "
                             "images: draw them with dlg-sample --format png or npz, which decodes as it goes.")
        for entry in m["shards"]:
            path = out_dir / entry["file"]
            if not path.is_file() or sha256(path) != entry["sha256"] or (
                    fmt == "png" and _pngs_sha256(out_dir, entry["first"], entry["count"]) != entry["images_sha256"]):
                raise ValueError(f"shard {entry['file']} in {out_dir} (or one of its PNGs) is missing or corrupt: "
                                 "rerun the dlg-sample command that wrote it to redo it.")
            if fmt == "png":
                yield torch.from_numpy(np.stack([np.asarray(Image.open(out_dir / png_name(entry["first"] + j))
                                                            .convert("RGB")) for j in range(entry["count"])]))
                continue
            tensors = load_file(str(path))
            if fmt == "npz":
                yield tensors["images"]
                continue
            samples = tensors["samples"]
            if samples.dim() != 4 or samples.shape[1] not in (1, 3):
                raise ValueError(f"{out_dir} holds samples of shape {list(samples.shape[1:])}, not images with 1 or 3 "
                                 "channels: nothing to turn into image files.")
            yield to_uint8(samples, rgb=True)


def read_images(out_dir: str | Path) -> torch.Tensor:
    """Every image of the run in ``out_dir`` (:func:`iter_images`): ``[N, H, W, 3]`` uint8."""
    return torch.cat(list(iter_images(out_dir)))


def run_progress(out_dir: str | Path) -> tuple[int, int]:
    """``(samples written, samples asked for)`` by the run in ``out_dir``, every process together."""
    found = manifests(out_dir)
    return sum(m["count"] for m in found), found[0]["config"]["n"]


def write_npz(out_dir: str | Path, path: str | Path | None = None) -> tuple[int, ...]:
    """Every image of the run in ``out_dir`` (:func:`iter_images`) as one ``.npz`` at ``path`` (default
    ``out_dir / samples.npz``) holding ``arr_0`` uint8 ``[N, H, W, 3]``, the array the ADM evaluation suite reads
    (``np.load(path)["arr_0"]`` reads it too). Streamed shard by shard (one shard in memory) into a temporary file
    renamed into place: a killed write leaves no partial file under ``path``. Returns the array's shape."""
    out_dir = Path(out_dir)
    path = out_dir / NPZ if path is None else Path(path)
    total = sum(m["count"] for m in manifests(out_dir))
    chunks = iter_images(out_dir)
    first = next(chunks, None)
    if first is None:
        raise ValueError(f"{out_dir} holds no samples yet: nothing to write.")
    shape = (total, *first.shape[1:])
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # of a killed write
        stale.unlink()

    def write(tmp: Path) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in itertools.chain([first], chunks):  # one shard in memory at a time
                if chunk.shape[1:] != first.shape[1:]:
                    raise ValueError(f"{out_dir} holds images of two sizes ({list(first.shape[1:])}, "
                                     f"{list(chunk.shape[1:])}): is it one run?")
                f.write(chunk.numpy().tobytes())

    _atomic_write(path, write)
    return shape


def run_id(out_dir: str | Path) -> str:
    """A SHA-256 naming the run in ``out_dir`` by its content (every shard's SHA-256, in order)."""
    return hashlib.sha256(json.dumps([[e["sha256"] for e in m["shards"]] for m in manifests(out_dir)]).encode()
                          ).hexdigest()


def write_pngs(out_dir: str | Path, target: str | Path) -> int:
    """Every image of the run in ``out_dir`` (:func:`iter_images`) as numbered PNGs in ``target`` (``000000.png``
    ..., the numbering of a ``--format png`` run), each through a temporary file. ``target/dlg-export.json`` names
    the run first, so rerunning an interrupted export keeps the PNGs already there; a ``target`` holding other
    images (FID tools would read them with these) or another run's export is refused before anything is written.
    Returns the number of images."""
    out_dir, target = Path(out_dir), Path(target)
    run, marker = run_id(out_dir), target / EXPORT_MARKER
    try:
        exported = json.loads(marker.read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        exported = None
    if exported not in (None, run):
        raise ValueError(f"{target} holds the PNGs of another run ({EXPORT_MARKER}): pass an empty or new --out "
                         "folder.")
    if exported is None:
        images = sorted(p.name for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if target.is_dir() \
            else []
        if images:
            raise ValueError(f"{target} holds {images[0]}, an image that is not this run's, which FID tools would "
                             "read with its PNGs: pass an empty or new --out folder.")
        target.mkdir(parents=True, exist_ok=True)
        _atomic_write(marker, lambda tmp: tmp.write_text(json.dumps({"source": str(out_dir.resolve()), "run": run})))
    for p in target.glob(".*.png.tmp-*"):  # of a killed export
        p.unlink()
    index = 0
    for chunk in iter_images(out_dir):
        for image in chunk.numpy():
            if not (target / png_name(index)).is_file():
                _write_png(target / png_name(index), image)
            index += 1
    return index


def shard_sizes(n: int, shard_size: int) -> Iterator[int]:
    """``n`` split into shards of ``shard_size`` (the last one smaller)."""
    for start in range(0, n, shard_size):
        yield min(shard_size, n - start)
