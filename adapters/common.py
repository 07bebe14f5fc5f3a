"""What every adapter shares: the trained range, clamping with a one-time warning, conditioning batches.

An adapter turns a pretrained network into a VE score ``score(x [B, *shape], sigma [B]) -> [B, *shape]``
(``x_sigma = x_0 + sigma z``). Subclasses implement :meth:`ScoreAdapter.model_score`, the score at a level
the network can be evaluated at; the base class does the rest.

Outside the trained range (and, for networks with discrete labels, between labels) the network is evaluated
at a nearby level ``sigma_m`` and the Tweedie denoiser ``D = x + sigma^2 s`` is held at its value there:

    ``s(x, sigma) = (sigma_m / sigma)^2 s(x, sigma_m)``.

For data near a locally flat manifold the denoiser hardly depends on sigma below the data's own scale, and far
above it ``D`` is close to the data mean, so this stays sensible at both ends (``sigma -> 0``: the step to the
manifold; ``sigma -> inf``: ``s ~ -(x - mean) / sigma^2``). Inside the range ``sigma_m = sigma`` and the
score is the network's exactly.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

#: Levels this close to the trained range's ends are clamped without a warning (the tolerance of
#: ``NoiseLevels.check_covers``; e.g. the default Tweedie level 0.01 against a linear DDPM table's 0.0100013).
_RANGE_RTOL = 1e-3


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dims."""
    return v.reshape(v.shape[0], *[1] * (ndim - 1))


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation ``x [B] -> [B]`` through ``(xp [T] increasing, fp [T])``, clamped to the ends."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def model_dtype(model: Any, default: torch.dtype) -> torch.dtype:
    """The dtype a model computes in: its ``.dtype`` (diffusers models), its first parameter's, else ``default``."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    first = next(params, None)
    return first.dtype if first is not None else default


def check_channels(x: torch.Tensor, model: Any, latent_hint: bool = True) -> None:
    """Raise unless ``x [B, C, ...]`` has the ``in_channels`` of ``model.config`` (where the model has one)."""
    config = getattr(model, "config", None)
    expected = getattr(config, "in_channels", None) if config is not None else None
    if expected is not None and (x.ndim < 2 or x.shape[1] != expected):
        got = x.shape[1] if x.ndim >= 2 else None
        hint = (" A latent model works on VAE latents: pass latents (e.g. torch.randn(B, "
                f"{expected}, h, w)) and decode the result with dlg_sampler.adapters.decode_latents(pipe.vae, x)."
                if latent_hint else "")
        raise ValueError(f"x has {got} channels (shape {tuple(x.shape)}) but the model takes "
                         f"in_channels={expected}: pass samples of shape [B, {expected}, ...].{hint}")


def expand_batch(kwargs: Mapping[str, Any], batch: int, path: str = "") -> dict[str, Any]:
    """Conditioning kwargs for a batch of ``batch``: tensors with batch 1 are expanded, batch ``batch`` kept,
    0-d tensors and non-tensors passed as they are; nested dicts (``added_cond_kwargs``) likewise."""
    out = {}
    for key, value in kwargs.items():
        name = f"{path}{key}"
        if isinstance(value, Mapping):
            out[key] = expand_batch(value, batch, f"{name}.")
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != batch:
            if value.shape[0] != 1:
                raise ValueError(f"conditioning {name!r} has batch {value.shape[0]} but x has batch {batch}: "
                                 "pass it with batch 1 (shared by every sample) or with batch B.")
            out[key] = value.expand(batch, *value.shape[1:])
        else:
            out[key] = value
    return out


def concat_batches(first: Mapping[str, Any], second: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Two kwargs dicts of the same keys and batch ``B`` -> one of batch ``2 B`` (tensors concatenated on dim 0)."""
    if first.keys() != second.keys():
        raise ValueError(f"conditional and unconditional kwargs{' in ' + path[:-1] if path else ''} have different "
                         f"keys {sorted(second)} vs {sorted(first)}.")
    out = {}
    for key, a in first.items():
        b, name = second[key], f"{path}{key}"
        if isinstance(a, Mapping):
            out[key] = concat_batches(a, b, f"{name}.")
        elif isinstance(a, torch.Tensor) and a.ndim > 0:
            out[key] = torch.cat([a, b])
        elif isinstance(a, torch.Tensor) and not torch.equal(a, b) or not isinstance(a, torch.Tensor) and a != b:
            raise ValueError(f"conditioning {name!r} differs between the conditional and unconditional branch but has "
                             "no batch dimension: pass it as a tensor with a batch dimension.")
        else:
            out[key] = a
    return out


class ScoreAdapter:
    """Base of the adapters: a VE score with the model's trained range ``[sigma_min, sigma_max]``.

    Subclasses set ``sigma_min``/``sigma_max`` and implement :meth:`model_score`.
    """

    sigma_min: float
    sigma_max: float
    #: Samples the network evaluates per score evaluation (2 with classifier-free guidance: one doubled call);
    #: :class:`~dlg_sampler.sampler.MicroBatched` counts them within its ``max_batch_size``.
    samples_per_evaluation: int = 1

    def __init__(self) -> None:
        self._warned = False

    def model_score(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's VE score for ``x [B, *shape]`` at levels ``sigma [B]`` (float64, CPU, in the trained range).

        Returns ``(score [B, *shape], sigma_m [B])``: the score at the level ``sigma_m`` the network was evaluated
        at (``sigma`` itself, or the nearest level a discrete-label network knows).
        """
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """VE score ``s(x, sigma)``: ``x [B, *shape]``, ``sigma [B]`` or scalar -> ``[B, *shape]`` in ``x``'s dtype."""
        sig = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
        sig = sig.expand(x.shape[0]) if sig.ndim == 0 else sig
        if sig.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [B]=({x.shape[0]},), got {tuple(sig.shape)}.")
        if not (torch.isfinite(sig).all() and (sig > 0).all()):
            raise ValueError("sigma must be positive and finite (VE noise levels).")
        clamped = sig.clamp(self.sigma_min, self.sigma_max)
        outside = (sig < self.sigma_min * (1 - _RANGE_RTOL)) | (sig > self.sigma_max * (1 + _RANGE_RTOL))
        if not self._warned and outside.any():
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}: sigma in [{float(sig.min()):.4g}, {float(sig.max()):.4g}] reaches outside the "
                f"model's trained range [{self.sigma_min:.4g}, {self.sigma_max:.4g}]; the model is evaluated at the "
                "clamped level and its denoiser held there (s = (sigma_c / sigma)^2 s(x, sigma_c)). Keep noise grids "
                "and integrators inside adapter.sigma_min/sigma_max. (Warned once per adapter.)", stacklevel=2)
        score, sigma_m = self.model_score(x, clamped)
        if not torch.equal(sigma_m, sig):  # the denoiser held at sigma_m
            score = score * append_dims(((sigma_m / sig) ** 2).to(score.device, score.dtype), x.ndim)
        return score.to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Tweedie denoiser ``D(x, sigma) = x + sigma^2 s(x, sigma)``, shape of ``x``."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return x + append_dims(sigma, x.ndim) ** 2 * self(x, sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"
