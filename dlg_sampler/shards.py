"""Resumable sample shards: long runs that lose and duplicate nothing.

An output folder holds ``manifest.json`` and ``shard-00000.safetensors``, ``shard-00001.safetensors`` ... Each
shard holds its samples (``"samples" [k, *shape]``) *and* the sampler state after them (tensors under
``"state.*"``, the rest as JSON metadata), written to a temporary file and renamed into place, then the manifest
is replaced the same way. A run killed at any point leaves a folder whose manifest lists only complete shards;
rerunning the same command restores the sampler from the last listed shard and continues, so the folder ends with
exactly ``n`` samples, bit-identical to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` then ``os.replace``: readers see the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        derived: keys of ``config`` whose values the run derives from the others (the settings a pilot chose):
            written to the manifest with the rest, not compared on resume, and restored from the manifest then.
            A fresh run sets them (``writer.config[key] = ...``) before its first shard.
        overwrite: discard an existing run in ``out_dir``.
        prefix: shard / manifest name prefix (one writer per process shares a folder: ``"p0-"``, ``"p1-"`` ...).
    """

    def __init__(self, out_dir: str | Path, config: dict[str, Any], *, derived: tuple[str, ...] = (),
                 overwrite: bool = False, prefix: str = ""):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out-dir {self.out_dir} is a file, not a folder: pass a folder path.")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise ValueError(f"cannot write to {self.out_dir} ({err.strerror}): pass a writable --out-dir.") from err
        self.config = json.loads(json.dumps(config))
        self.derived = tuple(derived)
        self.prefix = prefix
        self.manifest_path = self.out_dir / f"{prefix}{MANIFEST}"
        self.shards: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        if self.manifest_path.exists():
            if overwrite:
                self._discard()
            else:
                self._resume()

    # ------------------------------------------------------------------ resume
    def _discard(self) -> None:
        for p in self.out_dir.glob(f"{self.prefix}shard-*"):
            p.unlink()
        self.manifest_path.unlink()

    def _resume(self) -> None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
            saved, shards = manifest["config"], list(manifest["shards"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.manifest_path} is corrupt ({err}): delete it to restart from its shards' "
                             "beginning, or pass --overwrite to start over.") from err
        diff = sorted(k for k in set(saved) | set(self.config)
                      if k not in self.derived and saved.get(k) != self.config.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {self.config.get(k)!r}" for k in diff)
            raise ValueError(f"{self.out_dir} holds a run with a different configuration ({details}): rerun with the "
                             "same settings to resume, pass another --out-dir, or --overwrite to discard it.")
        self.config.update({k: saved[k] for k in self.derived if k in saved})
        for entry in shards:  # keep the longest prefix of shards that are intact
            path = self.out_dir / entry["file"]
            if not path.exists() or sha256(path) != entry["sha256"]:
                self.warnings.append(f"shard {path.name} is missing or corrupt: resuming from the shard before it")
                break
            self.shards.append(entry)
        listed = {e["file"] for e in self.shards}
        leftovers = [*self.out_dir.glob(f"{self.prefix}shard-*"), *self.out_dir.glob(f".{self.prefix}shard-*.tmp-*"),
                     *self.out_dir.glob(f".{self.prefix}{MANIFEST}.tmp-*")]
        for p in leftovers:  # unlisted shards and temporary files of a killed write
            if p.name not in listed:
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

    def write(self, samples: torch.Tensor, state: dict[str, Any]) -> Path:
        """Append one shard ``samples [k, *shape]`` with the sampler ``state`` after it; atomic."""
        index = len(self.shards)
        path = self.out_dir / f"{self.prefix}shard-{index:05d}.safetensors"
        tensors, rest = _flatten_state(state)
        tensors["samples"] = samples.detach().contiguous().cpu()
        metadata = {"state": json.dumps(rest), "format_version": str(FORMAT_VERSION)}
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self.shards.append({"file": path.name, "count": len(samples), "sha256": sha256(path)})
        self._write_manifest()
        return path

    def _write_manifest(self) -> None:
        manifest = {"format_version": FORMAT_VERSION, "config": self.config, "shards": self.shards,
                    "count": self.count}
        _atomic_write(self.manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def read_samples(out_dir: str | Path) -> torch.Tensor:
    """All samples listed by every manifest in ``out_dir``, in order (manifests sorted by name): ``[N, *shape]``."""
    out_dir = Path(out_dir)
    manifests = sorted(out_dir.glob(f"*{MANIFEST}"))
    if not manifests:
        raise ValueError(f"no {MANIFEST} in {out_dir}: is it a dlg-sample --out-dir?")
    chunks = []
    for m in manifests:
        for entry in json.loads(m.read_text())["shards"]:
            try:
                chunks.append(load_file(str(out_dir / entry["file"]))["samples"])
            except (SafetensorError, OSError) as err:
                raise ValueError(f"shard {entry['file']} in {out_dir} cannot be read ({err}).") from err
    return torch.cat(chunks)


def shard_sizes(n: int, shard_size: int) -> Iterator[int]:
    """``n`` split into shards of ``shard_size`` (the last one smaller)."""
    for start in range(0, n, shard_size):
        yield min(shard_size, n - start)
