"""A preset's model reference: many samples of its model (``digits``, ``photo-digits``) from an accurate sampler.

Made once by ``dlg-bench reference [--workloads NAME]`` (or by the bench when missing), written in chunks so that a
killed run continues, then kept as ``<name>.safetensors`` (``samples [N, *shape]``, metadata: sampler, steps, NFE,
n, seed, model checksum, torch version) beside ``<name>.json`` (its SHA-256, the metadata and the convergence
check), in ``$XDG_CACHE_HOME/dlg-sampler/reference`` (default ``~/.cache/...``). ``<name>`` encodes the preset, its
model's weights checksum, the sampler, n and the seed, so a retrained model never meets an old reference. Every load
verifies the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..integrators import count_nfe, integrate
from ..shards import save_tensors, sha256
from .common import class_proportions, make_scheduler, write_json
from .registry import SCHEDULERS, WORKLOADS

#: The reference sampler: vanilla Karras Heun, 100 steps from sigma_max (199 NFE).
REFERENCE_SAMPLER, REFERENCE_STEPS = "karras_heun", 100
#: The second reference, from another solver family (diffusers' multistep DPM-Solver++ instead of Heun's
#: predictor-corrector; its own noise): a digits verdict stands where both references agree.
SECOND_SAMPLER, SECOND_STEPS = "DPM++2M", 100
#: Samples in a full digits reference (each workload's: its ``reference_n``) and in the ``--quick`` one (enough for a
#: smoke run, not for conclusions).
REFERENCE_N, QUICK_REFERENCE_N = WORKLOADS["digits"].reference_n, 2000
#: Samples per chunk file (one batch).
CHUNK = 500
#: The convergence check: a different accurate sampler and its steps.
CHECK_SAMPLER, CHECK_STEPS = "DPM++2M", 100


class ReferenceError(ValueError):
    """The model reference is missing its checksum, fails it, or was made differently."""


def default_reference_dir() -> Path:
    """``$XDG_CACHE_HOME/dlg-sampler/reference``, default ``~/.cache/dlg-sampler/reference``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlg-sampler" / "reference"


def _pipeline_dir(preset: str) -> Path:
    """The model folder of ``preset`` in use (the shipped one unless its environment variable names another)."""
    from ..presets import pipeline_path

    return pipeline_path(preset)


def model_checksum(preset: str = "digits") -> str:
    """SHA-256 of the preset model's weights, ``pipeline/unet/*.safetensors`` (12 hex digits name the reference)."""
    files = sorted((_pipeline_dir(preset) / "unet").glob("*.safetensors"))
    return hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()


def _sampler(sampler: str | None, steps: int | None) -> tuple[str, int]:
    """``(sampler, steps)`` of a reference: the primary where no sampler is given, a sampler's own steps where no
    steps are."""
    sampler = sampler or REFERENCE_SAMPLER
    return sampler, steps or (SECOND_STEPS if sampler == SECOND_SAMPLER else REFERENCE_STEPS)


def reference_name(n: int, seed: int, preset: str = "digits", sampler: str | None = None,
                   steps: int | None = None) -> str:
    sampler, steps = _sampler(sampler, steps)
    return f"{preset}-{model_checksum(preset)[:12]}-{sampler}{steps}-n{n}-seed{seed}"


def remake_command(n: int, seed: int, folder: Path, preset: str = "digits", sampler: str | None = None,
                   steps: int | None = None) -> str:
    """The command that makes the reference (the preset's workload of the registry bears its name)."""
    sampler, steps = _sampler(sampler, steps)
    which = "" if (sampler, steps) == (REFERENCE_SAMPLER, REFERENCE_STEPS) else \
        f" --reference-sampler {sampler} --reference-steps {steps}"
    return (f"dlg-bench reference --reference-n {n} --reference-seed {seed} --reference-dir {folder} "
            f"--workloads {preset}{which}")


def chunk_kind(sampler: str | None = None) -> str:
    """The random stream of a reference's chunks: the primary's ``reference``, another sampler's its own (a second
    reference shares no noise with the first)."""
    return "reference" if sampler in (None, REFERENCE_SAMPLER) else f"reference-{sampler}"


def chunk_seed(kind: str, seed: int, index: int) -> int:
    """Seed of chunk ``index`` of a sample set ``kind`` (its own stream: never the bench runs' seeds)."""
    return int(np.random.SeedSequence([zlib.crc32(kind.encode()), seed, index]).generate_state(1)[0])


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_tensors(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def sample_in_chunks(draw: Callable[[int, torch.Generator], torch.Tensor], n: int, kind: str, seed: int,
                     folder: Path, desc: str) -> torch.Tensor:
    """``n`` samples ``[n, *shape]`` from ``draw(m, generator)`` in chunks of ``CHUNK``, each saved to ``folder`` as
    it is done; chunks already there are loaded, not redrawn (chunk ``i`` is seeded by ``(kind, seed, i)``)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = len(list(folder.glob("chunk-*.safetensors")))
    if done:
        print(f"{desc}: resuming, {done} chunks already in {folder}", flush=True)
    out = []
    for i, start in enumerate(tqdm(range(0, n, CHUNK), desc=desc, unit="chunk", dynamic_ncols=True)):
        m, path = min(CHUNK, n - start), folder / f"chunk-{i:05d}.safetensors"
        try:
            x = load_file(path)["samples"]
            if len(x) == m:
                out.append(x)
                continue
        except Exception:  # missing, or cut off by a kill: draw it
            pass
        x = draw(m, torch.Generator().manual_seed(chunk_seed(kind, seed, i))).contiguous()
        _atomic_save({"samples": x}, path)
        out.append(x)
    return torch.cat(out)


def _vanilla_draw(model, integrator, steps: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    sigma_max = model.sigma_max

    def draw(m: int, g: torch.Generator) -> torch.Tensor:
        x = sigma_max * torch.randn(m, *model.shape, generator=g)
        return integrate(integrator, model.score, x, sigma_max, steps, generator=g)[0]

    return draw


def _integrator(label: str, model):
    """A core integrator's name as it is, a diffusers scheduler label (``SCHEDULERS``) as a scheduler instance."""
    return make_scheduler(label, dict(model.pipeline.scheduler.config)) if label in SCHEDULERS else label


def _load_model(preset: str):
    from ..models import load_model

    return load_model(str(_pipeline_dir(preset)))


def _announce(model, n: int, nfe: int, what: str) -> None:
    x = torch.randn(CHUNK, *model.shape)
    start = time.perf_counter()
    with torch.no_grad():
        model.score(x, torch.ones(CHUNK))
    per_eval = (time.perf_counter() - start) / CHUNK
    print(f"{what}: {n} samples x {nfe} NFE = {n * nfe / 1e6:.2f}M model evaluations, about "
          f"{n * nfe * per_eval / 60:.0f} min here ({per_eval * 1e3:.2f} ms per evaluation, "
          f"{torch.get_num_threads()} threads); chunks of {CHUNK}, a killed run continues.", flush=True)


def save_reference(samples: torch.Tensor, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``samples`` (metadata ``meta`` as strings) and the sidecar ``path.json`` with its SHA-256 and ``meta``."""
    _atomic_save({"samples": samples.contiguous()}, path, {k: str(v) for k, v in meta.items()})
    info = {"sha256": sha256(path), **meta}
    write_json(info, path.with_suffix(".json"))
    return info


def load_reference(n: int = REFERENCE_N, seed: int = 0, reference_dir: Path | None = None, preset: str = "digits",
                   sampler: str | None = None, steps: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The preset's reference samples ``[n, *shape]`` (raw, unclamped) and its sidecar, after verifying the checksum;
    ``sampler``/``steps``: which reference (default the primary, ``REFERENCE_SAMPLER``; e.g. ``SECOND_SAMPLER``).

    Raises ``FileNotFoundError`` if it was never made and :class:`ReferenceError` (naming the file and the command
    that remakes it) if its sidecar is missing or the SHA-256 does not match.
    """
    folder = Path(reference_dir or default_reference_dir())
    path = folder / f"{reference_name(n, seed, preset, sampler, steps)}.safetensors"
    remake = remake_command(n, seed, folder, preset, sampler, steps)
    if not path.exists():
        raise FileNotFoundError(f"no {preset} model reference at {path}: make it with {remake}")
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        raise ReferenceError(f"the {preset} model reference {path} has no checksum file {sidecar.name}; remake it "
                             f"with: {remake}")
    info = json.loads(sidecar.read_text())
    got = sha256(path)
    if got != info.get("sha256"):
        raise ReferenceError(f"the {preset} model reference {path} fails its SHA-256 check (expected "
                             f"{str(info.get('sha256'))[:16]}..., got {got[:16]}...): the file is corrupt or was "
                             f"changed. Remake it with: {remake}")
    return load_file(path)["samples"], {**info, "path": str(path)}


def make_reference(n: int = REFERENCE_N, seed: int = 0, reference_dir: Path | None = None,
                   check_n: int = 0, preset: str = "digits", sampler: str | None = None, steps: int | None = None
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Make (or finish, or verify) the preset's reference of ``n`` samples of ``sampler`` at ``steps`` steps
    (default the primary's, ``REFERENCE_SAMPLER``); with ``check_n``, also record its convergence check at
    ``check_n`` samples: FD of ``CHECK_SAMPLER`` at ``CHECK_STEPS`` steps against it, and the FD floor (fresh
    samples of its own sampler, another seed). A reference failing its checksum is remade; chunks already drawn
    (``<name>.chunks``) are adopted."""
    folder = Path(reference_dir or default_reference_dir())
    name = reference_name(n, seed, preset, sampler, steps)
    path, sidecar = folder / f"{name}.safetensors", folder / f"{name}.json"
    label, steps = _sampler(sampler, steps)
    try:
        samples, info = load_reference(n, seed, folder, preset, label, steps)
    except ReferenceError as err:
        print(f"{err}\nremaking it.", flush=True)
        samples = None
    except FileNotFoundError:
        samples = None
    model = None
    if samples is None:
        model = _load_model(preset)
        integrator = _integrator(label, model)
        nfe = count_nfe(integrator, steps, dlg=False)
        _announce(model, n, nfe, f"making the {preset} model reference {path}")
        draw = _vanilla_draw(model, integrator, steps)
        samples = sample_in_chunks(draw, n, chunk_kind(label), seed, folder / f"{name}.chunks", "reference")
        info = save_reference(samples, path, {
            "preset": preset, "sampler": label, "steps": steps, "nfe": nfe, "n": n,
            "seed": seed, "model_sha256": model_checksum(preset), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "start": f"sigma_max, batches of {CHUNK}"})
        shutil.rmtree(folder / f"{name}.chunks")
    if check_n and info.get("check", {}).get("n") != check_n:
        info["check"] = convergence_check(samples, model or _load_model(preset), check_n, seed, folder, name, preset,
                                          label, steps)
        write_json({k: v for k, v in info.items() if k != "path"}, sidecar)
    return samples, {**info, "path": str(path)}


def convergence_check(reference: torch.Tensor, model, n: int, seed: int, folder: Path, name: str,
                      preset: str = "digits", sampler: str | None = None, steps: int | None = None) -> dict[str, Any]:
    """``n`` samples of another accurate sampler (``CHECK_SAMPLER`` at ``CHECK_STEPS`` steps; for a reference made
    by it, ``REFERENCE_SAMPLER``) and ``n`` fresh samples of the reference's own ``sampler`` (another seed: the floor
    any run of ``n`` samples sits on), scored against the reference as the bench scores runs (clamped to [-1, 1]):
    FD in the preset evaluator's feature space and total variation of the predicted-class proportions. Chunks in
    ``folder``."""
    from ..metrics import frechet_distance
    from ..presets import PRESETS

    evaluator = PRESETS[preset].evaluator()
    classes = evaluator.net.head.out_features
    ref = reference.clamp(-1, 1)
    ref_feats, ref_props = evaluator.features(ref), class_proportions(evaluator.predict(ref), classes)
    label, steps = _sampler(sampler, steps)
    other, other_steps = (CHECK_SAMPLER, CHECK_STEPS) if label != CHECK_SAMPLER else (REFERENCE_SAMPLER,
                                                                                      REFERENCE_STEPS)
    check, own = _integrator(other, model), _integrator(label, model)
    check_nfe, ref_nfe = count_nfe(check, other_steps, dlg=False), count_nfe(own, steps, dlg=False)
    _announce(model, n, check_nfe + ref_nfe, "convergence check of the reference")
    result: dict[str, Any] = {"n": n, "sampler": f"{other} {other_steps} steps ({check_nfe} NFE)"}
    for kind, integrator, k in (("check", check, other_steps), ("floor", own, steps)):
        chunks = folder / f"{name}.{kind}.chunks"
        x = sample_in_chunks(_vanilla_draw(model, integrator, k), n, kind, seed, chunks, kind).clamp(-1, 1)
        props = class_proportions(evaluator.predict(x), classes)
        result[f"fd_{kind}"] = frechet_distance(evaluator.features(x), ref_feats)
        result[f"class_tv_{kind}"] = float(0.5 * (props - ref_props).abs().sum())
        shutil.rmtree(chunks)
    return result


def ensure_reference(n: int | None = None, seed: int = 0, reference_dir: Path | None = None, preset: str = "digits",
                     sampler: str | None = None, steps: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The preset's reference (``n``: default the ``reference_n`` of the workload named after it; ``sampler``,
    ``steps``: default the primary's), made first (announcing its cost, adopting chunks already drawn) if it does
    not exist yet; never regenerated otherwise."""
    n = n or WORKLOADS[preset].reference_n
    try:
        return load_reference(n, seed, reference_dir, preset, sampler, steps)
    except FileNotFoundError:
        return make_reference(n, seed, reference_dir, preset=preset, sampler=sampler, steps=steps)
