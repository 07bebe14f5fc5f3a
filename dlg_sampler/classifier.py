"""The noise classifier ``c(x) -> logits [B, L]`` over a ``NoiseLevels`` grid: model, training loop, evaluation,
loading (:func:`load_classifier`: a folder or Hub id, with errors that name what is wrong).

``softmax(c(x))`` approximates ``p(sigma_i | x)`` for ``x = x_0 + sigma_i z`` with ``i`` uniform on the grid;
DLG draws sigma | x from it. ``evaluate_noise_classifier`` scores any posterior callable the same way, so a
trained classifier can be compared with the exact (Bayes-optimal) posterior of an analytic distribution.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import trange

from .hub import QuietHubMixin, describe_folder, download_folder, local_or_repo_id, read_config
from .levels import NoiseLevels
from .parallel import process_seed
from .shards import save_tensors

#: Architectures of ``NoiseClassifier``: a conv net for images ``[C, H, W]`` and an MLP for any flat shape.
ARCHS = ("cnn", "mlp")
#: Learning-rate schedules of ``train_noise_classifier``.
LR_SCHEDULES = ("cosine", "constant")
#: Floor under the statistics before their log (an all-zero input stays finite).
_STAT_FLOOR = 1e-12


def _rms(v: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` -> per-sample root mean square ``[B]``, floored."""
    return v.flatten(1).pow(2).mean(-1).sqrt().clamp_min(_STAT_FLOOR)


class NoiseClassifier(nn.Module, QuietHubMixin, library_name="dlg-sampler",
                      tags=["dlg-sampler", "denoising-mcmc", "noise-classifier"]):
    """Noise-level classifier ``x [B, *sample_shape] -> logits [B, L]`` over ``NoiseLevels(sigma_min, sigma_max, L)``.

    Input normalisation. Sigma spans four or more decades (0.01 to ~150), so no fixed input scale suits every
    level: ``x / sqrt(1 + sigma_max^2)`` shrinks a clean [-1, 1] image to ~1e-2 and the low levels drown in the
    first layer's bias. Instead the network sees

    - ``u = x / rms(x)``: the sample at unit scale at every level (scale-free shape: data structure vs white noise);
    - scale features, the logs of per-sample statistics that carry the magnitude: ``rms(x)``, the standard deviation
      about the sample's mean and, for images, the RMS of horizontal and vertical finite differences (/sqrt 2, so
      white noise of level sigma gives ~sigma). Noise adds ``sigma^2`` to each squared statistic, so at high levels
      they read sigma off directly, and the ratio of high-frequency to total energy separates smooth data from
      white noise at low levels. Each log is centred and scaled by the grid's log-range, so it is O(1) on the grid.

    ``x = rms(x) * u``, so nothing is lost; the network refines what the statistics give. The CNN also receives
    the scale features as constant input channels, so its convolutions see the magnitude too.

    Bodies (the paper's SimpleCNN design for images): ``arch="cnn"``: one 3x3 conv + SiLU per entry of
    ``channels`` (stride 2 while the map is larger than 4x4), global average pooling, then a 2-layer head to L
    logits; ``arch="mlp"``: ``mlp_layers`` hidden layers of width ``hidden`` on the flattened input.

    Args:
        sigma_min, sigma_max, num_levels: the noise grid (``.levels``); saved in ``config.json``.
        sample_shape: shape of one sample, e.g. ``[1, 8, 8]`` (``arch="cnn"`` needs ``[C, H, W]``, H, W >= 2).
        arch: ``"cnn"`` or ``"mlp"``.
        channels: CNN conv widths.
        hidden: width of the CNN head and of the MLP layers.
        mlp_layers: hidden layers of the MLP body.

    Every argument is JSON-able, so ``save_pretrained``/``from_pretrained``/``push_to_hub`` (huggingface_hub) carry
    the grid and the architecture in ``config.json`` next to ``model.safetensors``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, num_levels: int = 1000,
                 sample_shape: list[int] | tuple[int, ...] = (1, 8, 8), arch: str = "cnn",
                 channels: list[int] | tuple[int, ...] = (32, 64, 128), hidden: int = 128, mlp_layers: int = 3):
        super().__init__()
        self.levels = NoiseLevels(sigma_min, sigma_max, num_levels)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}.")
        if not self.sample_shape or min(self.sample_shape) < 1:
            raise ValueError(f"sample_shape must be a non-empty list of positive sizes, got {list(sample_shape)}.")
        if arch == "cnn" and (len(self.sample_shape) != 3 or min(self.sample_shape[1:]) < 2):
            raise ValueError(
                f"arch='cnn' needs sample_shape [C, H, W] with H, W >= 2, got {list(self.sample_shape)}; "
                "use arch='mlp' for flat vectors."
            )
        if hidden < 1 or mlp_layers < 1 or not channels or min(channels) < 1:
            raise ValueError(f"hidden, mlp_layers and every entry of channels must be >= 1, got hidden={hidden}, "
                             f"mlp_layers={mlp_layers}, channels={list(channels)}.")
        self.arch = arch
        log_min, log_max = math.log(self.levels.sigma_min), math.log(self.levels.sigma_max)
        self.register_buffer("_log_center", torch.tensor(0.5 * (log_min + log_max)), persistent=False)
        self.register_buffer("_log_halfwidth", torch.tensor(0.5 * (log_max - log_min)), persistent=False)
        num_features = 4 if arch == "cnn" else 2
        if arch == "cnn":
            layers: list[nn.Module] = []
            c_in, size = self.sample_shape[0] + num_features, max(self.sample_shape[1:])
            for c_out in channels:
                stride = 2 if size > 4 else 1
                layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU()]
                c_in, size = c_out, (size + stride - 1) // stride
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Sequential(nn.Linear(c_in + num_features, hidden), nn.SiLU(), nn.Linear(hidden, num_levels))
        else:
            layers, width = [], math.prod(self.sample_shape) + num_features
            for _ in range(mlp_layers):
                layers += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(hidden, num_levels)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a batch ``[B, *sample_shape]``."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.sample_shape or x.dim() < 2:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"NoiseClassifier expects a batch [B, *sample_shape] = [B, {', '.join(map(str, self.sample_shape))}], "
                f"got {got}: add the batch dimension (x[None]), reshape to the sample shape, or use a classifier "
                f"trained with sample_shape={list(x.shape[1:]) if isinstance(x, torch.Tensor) else '...'}."
            )

    def scale_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, *sample_shape]`` -> normalised log-statistics ``[B, F]`` (F = 4 for the CNN, 2 for the MLP)."""
        stats = [_rms(x), _rms(x - x.flatten(1).mean(-1).view(-1, *[1] * (x.dim() - 1)))]
        if self.arch == "cnn":
            stats += [_rms(x.diff(dim=-1)) / math.sqrt(2), _rms(x.diff(dim=-2)) / math.sqrt(2)]
        return (torch.stack(stats, -1).log() - self._log_center) / self._log_halfwidth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, *sample_shape]`` -> logits ``[B, num_levels]`` over ``self.levels``."""
        self.check_input(x)
        x = x.to(self._log_center.dtype)
        feats = self.scale_features(x)
        u = x / _rms(x).view(-1, *[1] * (x.dim() - 1))
        if self.arch == "cnn":
            maps = feats[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            return self.head(torch.cat([self.body(torch.cat([u, maps], 1)), feats], -1))
        return self.head(self.body(torch.cat([u.flatten(1), feats], -1)))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _device_of(posterior: Callable, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(posterior, nn.Module):
        param = next(posterior.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _as_tensor_data(data: Any) -> torch.Tensor:
    """Clean samples as one tensor ``[N, *shape]`` (a tensor, or an iterable of batches / ``(x, label)`` pairs)."""
    if isinstance(data, torch.Tensor):
        return data
    batches = [item[0] if isinstance(item, (tuple, list)) else item for item in data]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise TypeError("data must be a tensor [N, *shape] or an iterable of tensor batches (or (x, label) pairs).")
    return torch.cat(batches)


@torch.no_grad()
def evaluate_noise_classifier(posterior: Callable[[torch.Tensor], torch.Tensor], data: Any, levels: NoiseLevels,
                              num_samples: int = 4096, generator: torch.Generator | None = None, *,
                              batch_size: int = 512, tolerances: tuple[int, ...] = (5, 20),
                              device: torch.device | str | None = None) -> dict[str, float]:
    """Score any noise posterior on held-out noisy samples ``x_0 + sigma_i z``.

    Every level appears equally often (``i = n mod L``, an unbiased, lower-variance version of ``i`` uniform);
    ``x_0`` is drawn from ``data`` and ``z`` from ``generator``, so two posteriors evaluated with equally seeded
    generators see the same samples (e.g. a ``NoiseClassifier`` against ``GaussianMixture.noise_posterior``).

    Args:
        posterior: ``x [B, *shape] -> logits [B, L]`` over ``levels``.
        data: clean samples, a tensor ``[N, *shape]`` or an iterable of batches.
        levels: the grid the posterior is defined on.
        num_samples: noisy samples to score.
        generator: CPU generator for ``x_0``, ``z``.
        tolerances: ``k`` of the reported ``within_k`` accuracies (argmax within +-k levels).
        device: where the posterior runs (default: the module's device, else CPU).

    Returns:
        ``ce`` (mean cross-entropy, nats), ``uniform_ce`` (``log L``, the uninformed baseline), ``accuracy``
        (argmax exact), ``within_<k>``, ``within_10pct_sigma`` (argmax sigma within a factor 1.1),
        ``mean_abs_log_sigma_error`` (``|log sigma_argmax - log sigma_true|``), ``num_samples``.
    """
    data = _as_tensor_data(data)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    device = _device_of(posterior, device)
    was_training = posterior.training if isinstance(posterior, nn.Module) else False
    if isinstance(posterior, nn.Module):
        posterior.eval()
    nll, preds = [], []
    idx = torch.arange(num_samples) % len(levels)
    try:
        for start in range(0, num_samples, batch_size):
            i = idx[start:start + batch_size]
            x0 = data[torch.randint(len(data), (len(i),), generator=generator)].float()
            x = x0 + levels.sigmas[i].view(-1, *[1] * (x0.dim() - 1)) * torch.randn(x0.shape, generator=generator)
            logits = posterior(x.to(device))
            if not isinstance(logits, torch.Tensor) or logits.shape != (len(i), len(levels)):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the posterior returned {got}, expected logits [B, L]=({len(i)}, {len(levels)}) "
                                 f"over {levels!r}: evaluate it on the grid it was trained on.")
            logits = logits.double().cpu()
            if not torch.isfinite(logits).all():
                raise ValueError("the posterior returned non-finite logits; check its input scaling and weights.")
            nll.append(logits.logsumexp(-1) - logits.gather(1, i[:, None]).squeeze(1))
            preds.append(logits.argmax(-1))
    finally:
        if isinstance(posterior, nn.Module):
            posterior.train(was_training)
    nll_t, err = torch.cat(nll), (torch.cat(preds) - idx).abs()
    step = (levels.log_sigmas[1] - levels.log_sigmas[0]).item()
    metrics = {"ce": nll_t.mean().item(), "uniform_ce": math.log(len(levels)),
               "accuracy": (err == 0).double().mean().item()}
    metrics.update({f"within_{k}": (err <= k).double().mean().item() for k in tolerances})
    metrics["within_10pct_sigma"] = (err * step <= math.log(1.1) + 1e-12).double().mean().item()
    metrics["mean_abs_log_sigma_error"] = (err * step).mean().item()
    metrics["num_samples"] = num_samples
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Training


class _BatchStream:
    """Clean training batches ``[B, *shape]`` from a tensor (drawn with replacement) or a re-iterable source."""

    def __init__(self, data: Any, sample_shape: tuple[int, ...], batch_size: int, generator: torch.Generator):
        self.shape, self.batch_size, self.generator = sample_shape, batch_size, generator
        self.tensor = data if isinstance(data, torch.Tensor) else None
        self.data = data
        if self.tensor is not None and tuple(self.tensor.shape[1:]) != sample_shape:
            raise ValueError(f"data has shape {list(self.tensor.shape)}, the classifier's sample_shape is "
                             f"{list(sample_shape)}: pass clean samples [N, {', '.join(map(str, sample_shape))}].")
        if self.tensor is None and not isinstance(data, Iterable):
            raise TypeError(f"data must be a tensor [N, *shape] or an iterable of batches, got {type(data).__name__}.")
        self._iter: Iterator[torch.Tensor] | None = None

    def _batches(self) -> Iterator[torch.Tensor]:
        """Cycle over the source (one pass per epoch, so a shuffling DataLoader reshuffles), grouping samples."""
        while True:
            pending, produced = [], False
            for item in self.data:
                x = item[0] if isinstance(item, (tuple, list)) else item
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"data yielded {type(x).__name__}; expected tensors (or (x, label) pairs).")
                if tuple(x.shape) == self.shape:
                    pending.append(x)
                    if len(pending) == self.batch_size:
                        produced = True
                        yield torch.stack(pending)
                        pending = []
                elif tuple(x.shape[1:]) == self.shape:
                    produced = True
                    yield x
                else:
                    raise ValueError(f"data yielded shape {list(x.shape)}; expected a sample {list(self.shape)} or "
                                     f"a batch [B, {', '.join(map(str, self.shape))}] (the classifier's sample_shape).")
            if not produced:
                raise ValueError("data yielded no full batch in one pass: pass a re-iterable source (a tensor, a "
                                 "list, a DataLoader) with at least batch_size samples, not a one-shot iterator.")

    def next(self) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[torch.randint(len(self.tensor), (self.batch_size,), generator=self.generator)]
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter)

    def skip(self, n: int) -> None:
        """Fast-forward an iterable source by ``n`` batches (resume); tensor batches come from the generator state."""
        if self.tensor is None:
            for _ in range(n):
                self.next()


def lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """Learning rate of ``step`` (0-based) out of ``steps``: ``"constant"``, or ``"cosine"`` decay to 1% of ``lr``."""
    if schedule == "constant":
        return lr
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    return sorted(checkpoint_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(path: Path, classifier: NoiseClassifier, optimizer: torch.optim.Optimizer,
                     generators: list[torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``model.safetensors``, ``optimizer.safetensors`` (+ every process's RNG state) and
    ``trainer_state.json`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors({k: v.contiguous() for k, v in classifier.state_dict().items()}, tmp / "model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"state.{pid}.{name}": v for pid, s in opt["state"].items() for name, v in s.items()}
    tensors.update({f"generator_state.{rank}": g for rank, g in enumerate(generators)})
    save_tensors(tensors, tmp / "optimizer.safetensors")
    state = {**state, "param_groups": opt["param_groups"]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_checkpoint(path: Path, classifier: NoiseClassifier, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, rank: int = 0) -> dict[str, Any]:
    state = json.loads((path / "trainer_state.json").read_text())
    classifier.load_state_dict(load_file(str(path / "model.safetensors"), device=str(_device_of(classifier, None))))
    tensors = load_file(str(path / "optimizer.safetensors"))
    generators = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("generator_state.")]}
    generator.set_state(generators[f"generator_state.{rank}"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


def train_noise_classifier(classifier: NoiseClassifier, data: Any, *, steps: int, batch_size: int = 256,
                           lr: float = 1e-3, lr_schedule: str = "cosine", seed: int = 0, eval_data: Any = None,
                           eval_samples: int = 4096, checkpoint_dir: str | Path | None = None,
                           checkpoint_every: int = 1000, keep_checkpoints: int = 2, progress: bool = True,
                           device: torch.device | str | None = None, accelerator=None) -> dict[str, float]:
    """Train ``classifier`` by cross-entropy on ``(x_0 + sigma_i z, i)``, ``i`` uniform on ``classifier.levels``.

    Adam, one batch of clean samples per step, fresh ``i`` and ``z`` per sample from a generator seeded by ``seed``.
    With ``checkpoint_dir``, every ``checkpoint_every`` steps (and at the end) ``checkpoint-<step>/`` receives the
    weights, the Adam state and the generator state (safetensors) plus ``trainer_state.json``; a later call with the
    same arguments resumes from the newest one and ends with exactly the weights of an uninterrupted run (on the
    same device; an iterable ``data`` must replay the same batches, e.g. a DataLoader with a seeded generator).

    Args:
        classifier: the model to train (updated in place, left in eval mode).
        data: clean samples: a tensor ``[N, *sample_shape]`` (batches drawn with replacement), or a re-iterable
            source (DataLoader, list) of batches ``[B, *sample_shape]``, of single samples, or of ``(x, label)``.
        steps: optimiser steps in total (including those restored from a checkpoint).
        batch_size: batch size for tensor data and for grouping single samples.
        lr, lr_schedule: Adam learning rate and its schedule (``"cosine"`` to 1% of ``lr``, or ``"constant"``).
        seed: seeds the training generator (data draws, levels, noise).
        eval_data: held-out clean samples; if given, ``evaluate_noise_classifier`` runs at the end.
        eval_samples: noisy samples for that evaluation (generator seeded with ``seed + 1``).
        checkpoint_dir, checkpoint_every, keep_checkpoints: periodic, resumable checkpoints (the newest
            ``keep_checkpoints`` are kept).
        progress: show a tqdm bar.
        device: training device (default: the classifier's).
        accelerator: an ``accelerate.Accelerator`` for data-parallel training (``accelerate launch``): every process
            draws its own batches (generator seeded from ``(seed, rank)``), gradients are averaged, the optimizer
            steps every ``accelerator.gradient_accumulation_steps`` batches, the main process writes checkpoints
            (with every process's generator state; resume needs the same number of processes).

    Returns:
        ``steps``, ``train_loss`` (EMA of the batch cross-entropy over the last ~100 steps) and, with ``eval_data``,
        ``eval_<metric>`` for every metric of ``evaluate_noise_classifier``.
    """
    if not isinstance(classifier, NoiseClassifier):
        raise TypeError(f"classifier must be a NoiseClassifier, got {type(classifier).__name__}.")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("keep_checkpoints", keep_checkpoints)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}.")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    if accelerator is not None:
        device = accelerator.device
    if device is not None:
        classifier.to(device)
    device = _device_of(classifier, None)
    generator = torch.Generator().manual_seed(process_seed(seed, rank, world))
    stream = _BatchStream(data, classifier.sample_shape, batch_size, generator)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    run = {"config": classifier._hub_mixin_config, "steps": steps, "batch_size": batch_size, "lr": lr,
           "lr_schedule": lr_schedule, "seed": seed}
    if accelerator is not None:
        run.update(processes=world, gradient_accumulation_steps=accelerator.gradient_accumulation_steps)
    start, train_loss = 0, None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and _checkpoints(ckpt_dir):
        latest = _checkpoints(ckpt_dir)[-1]
        saved = json.loads((latest / "trainer_state.json").read_text())
        if {k: saved.get(k) for k in run} != json.loads(json.dumps(run)):
            raise ValueError(
                f"{latest} was written by a different run ({ {k: saved.get(k) for k in run} }) than this one ({run}): "
                "pass the same classifier config and training arguments to resume, or a new checkpoint_dir."
            )
        state = _load_checkpoint(latest, classifier, optimizer, generator, rank)
        start, train_loss = state["step"], state["train_loss"]
        stream.skip(start)
    sigmas = classifier.levels.sigmas
    classifier.train()
    model = classifier
    if accelerator is not None:
        model, optimizer = accelerator.prepare(classifier, optimizer)
    bar = trange(start, steps, initial=start, total=steps, disable=not progress or rank != 0,
                 desc="noise classifier", mininterval=5)
    for step in bar:
        x0 = stream.next().float()
        i = torch.randint(len(sigmas), (x0.shape[0],), generator=generator)
        z = torch.randn(x0.shape, generator=generator)
        x = (x0 + sigmas[i].view(-1, *[1] * (x0.dim() - 1)) * z).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, lr_schedule)
        with accelerator.accumulate(model) if accelerator is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), i.to(device))
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        train_loss = loss.item() if train_loss is None else 0.99 * train_loss + 0.01 * loss.item()
        if step % 50 == 0 or step + 1 == steps:  # the bar ends on the final loss
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if ckpt_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            generators = [generator.get_state()]
            if accelerator is not None and world > 1:
                from accelerate.utils import gather_object

                generators = gather_object(generators)
            if rank == 0:
                _save_checkpoint(ckpt_dir / f"checkpoint-{step + 1}", classifier, optimizer, generators,
                                 {**run, "step": step + 1, "train_loss": train_loss})
                for old in _checkpoints(ckpt_dir)[:-keep_checkpoints]:
                    shutil.rmtree(old)
            if accelerator is not None:
                accelerator.wait_for_everyone()
    classifier.eval()
    metrics: dict[str, float] = {"steps": steps, "train_loss": train_loss}
    if eval_data is not None:
        result = evaluate_noise_classifier(classifier, eval_data, classifier.levels, eval_samples,
                                           torch.Generator().manual_seed(seed + 1))
        metrics.update({f"eval_{k}": v for k, v in result.items()})
    return metrics


#: What a noise classifier folder holds.
CLASSIFIER_FILES = ["config.json", "model.safetensors"]
_CLASSIFIER_EXPECTED = ("a NoiseClassifier folder (config.json + model.safetensors, written by dlg-train-classifier "
                        "or NoiseClassifier.save_pretrained)")
#: What a classifier's config.json must hold: the noise grid and the sample shape.
_CLASSIFIER_CONFIG_KEYS = ("sigma_min", "sigma_max", "num_levels", "sample_shape")


def _classifier_folder_problem(folder: Path) -> str | None:
    """What keeps ``folder`` from being a NoiseClassifier folder, in a few words; ``None`` when nothing does."""
    config = read_config(folder)
    if (folder / "model_index.json").is_file() or (config is not None and "_class_name" in config):
        return f"it holds {describe_folder(folder)}"
    if not (folder / "config.json").is_file():
        return f"it has no config.json; it holds {describe_folder(folder)}"
    if config is None:
        return "its config.json is not a JSON object (the file is damaged)"
    missing = [k for k in _CLASSIFIER_CONFIG_KEYS if k not in config]
    if missing:
        return f"its config.json lacks {', '.join(missing)}"
    unknown = sorted(set(config) - set(inspect.signature(NoiseClassifier.__init__).parameters) - {"self"})
    if unknown:
        return f"its config.json has keys NoiseClassifier does not take: {', '.join(unknown)}"
    if not (folder / "model.safetensors").is_file():
        return f"it has no model.safetensors; it holds {describe_folder(folder)}"
    return None


def load_classifier(spec: str | Path, device: torch.device | str | None = None) -> NoiseClassifier:
    """A ``NoiseClassifier`` from a local folder or a Hub repo id, in eval mode on ``device``.

    Raises ``ValueError`` naming what was expected, what is wrong and the fix: no such folder, a folder of another
    model, a config.json or model.safetensors that is missing, damaged or does not fit the other, a repo that is not
    cached while the Hub is unavailable (see :mod:`dlg_sampler.hub`).
    """
    what = "the noise classifier"
    ref = local_or_repo_id(spec, what, _CLASSIFIER_EXPECTED)
    folder = ref if isinstance(ref, Path) else download_folder(ref, what, CLASSIFIER_FILES)
    problem = _classifier_folder_problem(folder)
    if problem is not None:
        raise ValueError(f"{what} {str(spec)!r} is not {_CLASSIFIER_EXPECTED}: {problem}.")
    try:
        classifier = NoiseClassifier.from_pretrained(folder)
    except ValueError as err:  # unreadable or mismatched weights (hub.QuietHubMixin), values NoiseClassifier refuses
        raise ValueError(f"{what} {str(spec)!r} could not be loaded: {err}") from err
    except (TypeError, RuntimeError, OSError) as err:
        raise ValueError(f"{what} {str(spec)!r} could not be loaded ({type(err).__name__}: {err}): save it again "
                         "with NoiseClassifier.save_pretrained.") from err
    return classifier.to(device or "cpu").eval()
