"""Folders and Hugging Face Hub repo ids as users name them: quiet local loads, errors that say what was expected
and what was found, and no retry loop when the Hub cannot be reached.

A name is a local folder when one exists under it, else a Hub repo id (``owner/name``); anything else is a
mistyped path and is reported as one. Before a Hub id is downloaded, :func:`hub_unavailable` asks once whether the
Hub can be used at all (``HF_HUB_OFFLINE`` unset and one quick request answered); if not, the download runs from
the local HF cache only (``local_files_only=True``), so a missing repo fails at once with the fix instead of
after huggingface_hub's five retries (~32 s).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, get_session, snapshot_download
from huggingface_hub.utils import (GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                   validate_repo_id)
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model

#: Seconds the reachability check waits for the Hub.
PROBE_TIMEOUT = 5.0


class QuietHubMixin(PyTorchModelHubMixin):
    """``PyTorchModelHubMixin`` whose ``from_pretrained`` of a local folder prints nothing (the mixin prints
    "Loading weights from local directory" on every such load) and loads the weights strictly, and whose
    ``save_pretrained`` leaves the weights with the user's normal file mode (safetensors writes 0600)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        from .shards import user_mode

        super()._save_pretrained(save_directory)
        os.chmod(Path(save_directory) / constants.SAFETENSORS_SINGLE_FILE, user_mode())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token, map_location=map_location, strict=strict, **model_kwargs)
        path = Path(model_id) / constants.SAFETENSORS_SINGLE_FILE
        model = cls(**model_kwargs)
        try:
            load_model(model, path, strict=strict, device=map_location)
        except SafetensorError as err:
            raise ValueError(unreadable_safetensors(path, err)) from err
        except RuntimeError as err:  # names or shapes that do not fit the network config.json describes
            raise ValueError(f"{path} does not fit the {cls.__name__} its config.json describes: "
                             f"{weights_mismatch(model.state_dict(), load_file(path))}; the two files come from "
                             f"different models: save them again together ({cls.__name__}.save_pretrained).") from err
        return model


def unreadable_safetensors(path: str | Path, err: SafetensorError) -> str:
    """One line saying that ``path`` could not be read as safetensors (``err``), and the fix."""
    reason = str(err).rpartition(": ")[2] or type(err).__name__
    return (f"{path} is not a safetensors file ({reason}): the file is corrupt or truncated; re-download it, or "
            "save it again.")


def weights_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """How the tensors ``found`` in a file differ from the ``expected`` state dict of a network, in a few words:
    names missing, names unexpected, shapes that differ (a few of each)."""
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} is {list(found[k].shape)}, not {list(expected[k].shape)}" for k in expected
                if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(names)} {label} ({some(names)})" for names, label in
             ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if names]
    return ", ".join(parts) or "the tensors match"


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> str | None:
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT)  # one request, no retries
    except Exception as err:  # DNS, refused, timeout, proxy: the transport's error types vary between versions
        return f"{endpoint} cannot be reached ({type(err).__name__}: {err})"
    return None


def hub_unavailable() -> str | None:
    """Why the Hub cannot be used (``HF_HUB_OFFLINE`` set, or the endpoint does not answer), else ``None``."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


def local_or_repo_id(spec: str | Path, what: str, expected: str) -> Path | str:
    """``spec`` as an existing local folder (a ``Path``) or a Hub repo id ``owner/name`` (a ``str``).

    Raises ``ValueError`` for a file, or for a name that is neither: ``what`` names the thing (e.g. "the noise
    classifier"), ``expected`` what a folder of it holds.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{what} {str(spec)!r} is a file; pass {expected}, or a Hub repo id (owner/name).")
    text = str(spec)
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1
    try:
        validate_repo_id(text)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise ValueError(f"{what} {text!r}: there is no such file or folder (looked in {Path.cwd()}), and it is not "
                         f"a Hub repo id (owner/name): pass {expected}, or a Hub repo id.")
    return text


def _offline_fix(repo_id: str, reason: str) -> str:
    return (f"{repo_id!r} is not in the Hugging Face cache and the Hub is not used ({reason}): run once with "
            f"network access (the download is cached; HF_HUB_OFFLINE=1 then reads the cache), or download it where "
            f"there is network (hf download {repo_id} --local-dir FOLDER) and pass the folder.")


def download_folder(repo_id: str, what: str, files: list[str]) -> Path:
    """The local snapshot of ``files`` of Hub repo ``repo_id`` (from the cache alone when the Hub is unavailable).

    Raises ``ValueError`` naming the fix: not cached while offline, no such repo, or files missing in the repo.
    """
    reason = hub_unavailable()
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=reason is not None))
    except LocalEntryNotFoundError as err:
        raise ValueError(f"could not load {what}: " + _offline_fix(repo_id, reason or "it was not found")) from err
    except GatedRepoError as err:
        raise ValueError(f"could not load {what} {repo_id!r}: the repo is gated; accept its terms on the Hub and "
                         "log in (hf auth login).") from err
    except RepositoryNotFoundError as err:
        raise ValueError(f"could not load {what} {repo_id!r}: there is no such Hub repo (or it is private: log in "
                         "with hf auth login); pass an existing repo id or a local folder.") from err
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"could not load {what} {repo_id!r}: the Hub repo has no {', '.join(missing)}.")
    return folder


def pipeline_access(spec: str) -> dict:
    """``from_pretrained`` keywords for a diffusers pipeline name: the cache alone when a Hub id cannot be
    downloaded (see :func:`hub_unavailable`)."""
    if Path(spec).expanduser().exists():
        return {}
    return {"local_files_only": hub_unavailable() is not None}


def pipeline_error(spec: str, err: Exception) -> str:
    """Why ``DiffusionPipeline.from_pretrained(spec)`` failed, with the fix."""
    reason = None if Path(spec).expanduser().exists() else hub_unavailable()
    if reason is not None:
        return "could not load the diffusers pipeline: " + _offline_fix(spec, reason)
    return (f"could not load the diffusers pipeline {spec!r} ({type(err).__name__}: {err}). A local folder needs "
            "model_index.json plus each component's config and weights; a Hub id must name an existing diffusers "
            "repo (private ones need hf auth login).")


def read_config(folder: Path) -> dict | None:
    """``folder/config.json`` as a dict, or ``None`` when absent or not a JSON object."""
    try:
        config = json.loads((folder / constants.CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def describe_folder(folder: Path) -> str:
    """What a folder holds, in a few words, for error messages."""
    if (folder / "model_index.json").is_file():
        return "a diffusers pipeline (model_index.json)"
    config = read_config(folder)
    if config is not None and "_class_name" in config:
        return f"a diffusers {config['_class_name']} (config.json)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (an empty folder)"
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
