"""score_sde-style models (Song et al. 2021, yang-song/score_sde) as VE scores, and their checkpoints.

A score_sde network is called as ``model(x, labels)``; what ``labels`` are and what the output means is fixed by
the SDE, exactly as score_sde's ``get_score_fn`` and ``marginal_prob`` define them (reproduced in
:class:`ScoreSdeScore`'s docstring).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..hub import unreadable_safetensors, weights_mismatch
from .common import ScoreAdapter, append_dims, interp, model_dtype

#: SDE families of score_sde.
SDES = ("vp", "subvp", "ve")
#: score_sde scales continuous VP / sub-VP time to the network's label range by this constant, whatever N is.
_CONTINUOUS_LABEL_SCALE = 999.0


class ScoreSdeScore(ScoreAdapter):
    """A score_sde network ``model(x, labels)`` as a VE score.

    score_sde's marginals (``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2``, ``t`` in [0, 1]):

    - VP: ``x_t = sqrt(abar) x_0 + std z`` with ``abar = exp(-B(t))``, ``std = sqrt(1 - abar)``;
    - sub-VP: the same mean, ``std = 1 - abar``;
    - VE: ``x_t = x_0 + sigma(t) z``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    ``get_score_fn``: VP continuous and sub-VP: ``labels = 999 t``, ``s_t = -model(x_t, labels) / std(t)``;
    VP discrete: ``labels = t (N - 1)``, ``std`` from the DDPM table of ``betas = linspace(beta_min / N,
    beta_max / N, N)``; VE continuous: ``labels = sigma(t)``, ``s_t = model(x_t, labels)``; VE discrete:
    ``labels = round((1 - t)(N - 1))`` (label 0 is the largest level), ``s_t = model(x_t, labels)``.

    VP and sub-VP marginals are scaled VE marginals: ``x = x_t / sqrt(abar)`` at ``sigma = std / sqrt(abar)``,
    with ``s(x, sigma) = sqrt(abar) s_t(x_t)``; for both, ``s = -model(x_t, labels) / sigma``. For a VE level
    ``sigma`` the time is inverted in closed form: ``B(t) = log(1 + sigma^2)`` (VP) or ``2 asinh(sigma / 2)``
    (sub-VP, from ``sigma = (1 - abar) / sqrt(abar)``), then ``t = 2 B / (beta_min + sqrt(beta_min^2 +
    2 (beta_max - beta_min) B))``, the stable root of the quadratic. VP discrete labels are fractional, located by
    log-sigma interpolation in the table; VE discrete labels are the nearest level, and the score there is
    rescaled to ``sigma`` with the denoiser held (:mod:`dlg_sampler.adapters.common`).

    Trained range: ``t`` in ``[eps, 1]`` (score_sde trains on ``t ~ U(eps, 1)``, ``eps = 1e-5``): VP / sub-VP
    continuous ``[sigma(eps), sigma(1)]``, VP discrete the table's range, VE ``[sigma_min, sigma_max]``.

    Args:
        model: ``model(x [B, C, H, W], labels [B]) -> [B, C, H, W]``, any callable (e.g. NCSN++ / DDPM++ from
            score_sde_pytorch); inputs are cast to its dtype, outputs back to ``x``'s.
        sde: ``"vp"``, ``"subvp"`` or ``"ve"`` (score_sde's ``training.sde``: vpsde, subvpsde, vesde).
        beta_min, beta_max: VP / sub-VP (``model.beta_min``, ``model.beta_max``; defaults 0.1, 20).
        sigma_min, sigma_max: VE (``model.sigma_min``, ``model.sigma_max``; CIFAR-10: 0.01, 50).
        continuous: whether the model was trained with continuous time (``training.continuous``); score_sde
            always treats sub-VP as continuous.
        N: number of discrete levels (``model.num_scales``), for discrete VP / VE.
        eps: smallest training time.
    """

    def __init__(self, model: Any, sde: str = "vp", *, beta_min: float = 0.1, beta_max: float = 20.0,
                 sigma_min: float = 0.01, sigma_max: float = 50.0, continuous: bool = True, N: int = 1000,
                 eps: float = 1e-5):
        super().__init__()
        if sde not in SDES:
            raise ValueError(f"unknown sde {sde!r}: use one of {SDES} (score_sde's vpsde, subvpsde, vesde).")
        if (sde == "ve" and not 0 < sigma_min < sigma_max) or (sde != "ve" and not 0 < beta_min <= beta_max):
            raise ValueError(f"invalid {sde} parameters: need 0 < sigma_min < sigma_max (VE) or 0 < beta_min <= "
                             "beta_max (VP, sub-VP), as in the model's score_sde config.")
        self.model, self.sde, self.continuous = model, sde, continuous or sde == "subvp"
        self.beta_min, self.beta_max, self.N = float(beta_min), float(beta_max), int(N)
        self.ve_sigma_min, self.ve_sigma_max = float(sigma_min), float(sigma_max)
        if sde == "vp" and not self.continuous:
            betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
            abar = torch.cumprod(1 - betas, 0)
            self._log_sigmas = ((1 - abar) / abar).sqrt().log()  # [N], increasing
            self.sigma_min, self.sigma_max = float(self._log_sigmas[0].exp()), float(self._log_sigmas[-1].exp())
        else:
            ends = self.sigma_of_t(torch.tensor([0.0 if sde == "ve" else eps, 1.0], dtype=torch.float64))
            self.sigma_min, self.sigma_max = float(ends[0]), float(ends[1])

    def _integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2`` (``abar = exp(-B)``)."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """VE level of SDE time ``t [B]``: ``std(t) / sqrt(abar(t))`` (VP, sub-VP) or ``sigma(t)`` (VE); float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.sde == "ve":
            return self.ve_sigma_min * (self.ve_sigma_max / self.ve_sigma_min) ** t
        b = self._integrated_beta(t)
        return torch.expm1(b).sqrt() if self.sde == "vp" else 2 * torch.sinh(b / 2)

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`sigma_of_t` in closed form, ``[B]`` float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.sde == "ve":
            return (sigma / self.ve_sigma_min).log() / math.log(self.ve_sigma_max / self.ve_sigma_min)
        b = torch.log1p(sigma**2) if self.sde == "vp" else 2 * torch.asinh(sigma / 2)
        return 2 * b / (self.beta_min + (self.beta_min**2 + 2 * (self.beta_max - self.beta_min) * b).sqrt())

    def model_score(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = model_dtype(self.model, x.dtype)
        # float labels in a half-precision network's own dtype (its embedding layers take no float32), else float32
        label_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
        if self.sde == "ve":
            if self.continuous:
                labels, sigma_m = sigma.to(label_dtype), sigma
            else:  # nearest of N levels, label 0 = sigma_max
                idx = ((self.N - 1) * (1 - self.t_of_sigma(sigma))).round()
                labels, sigma_m = idx.long(), self.sigma_of_t(1 - idx / (self.N - 1))
            return self.model(x.to(dtype), labels.to(x.device)).to(x.dtype), sigma_m
        if self.continuous:
            labels = _CONTINUOUS_LABEL_SCALE * self.t_of_sigma(sigma)
        else:
            labels = interp(sigma.log(), self._log_sigmas, torch.arange(self.N, dtype=torch.float64))
        # sqrt(abar) of the level: 1 / sqrt(1 + sigma^2) (VP); the root of abar + sigma sqrt(abar) - 1 = 0 (sub-VP)
        sqrt_abar = (1 + sigma**2).rsqrt() if self.sde == "vp" else 2 / (sigma + (sigma**2 + 4).sqrt())
        x_t = x * append_dims(sqrt_abar.to(x.device, x.dtype), x.ndim)
        out = self.model(x_t.to(dtype), labels.to(x.device, label_dtype)).to(x.dtype)
        return -out / append_dims(sigma.to(x.device, x.dtype), x.ndim), sigma


def load_score_sde_checkpoint(path: str | Path, model: torch.nn.Module, *, prefer_ema: bool = True) -> torch.nn.Module:
    """Load a score_sde checkpoint into ``model`` (in place; returned for chaining).

    Reads ``checkpoint_*.pth`` / ``checkpoint.pth`` as score_sde writes them (a dict with ``model``: the state dict,
    keys prefixed ``module.`` by ``DataParallel``; ``ema``: ``{"decay", "num_updates", "shadow_params"}``, the EMA
    copies of the trainable parameters in ``model.parameters()`` order; ``optimizer``; ``step``), a plain state dict
    in a ``.pth``, or a ``.safetensors`` state dict. ``.pth`` files are read with ``torch.load(weights_only=True)``:
    tensors and plain containers only, no code from the file runs.

    Args:
        path: the checkpoint file.
        model: the network, built with the checkpoint's config.
        prefer_ema: put the EMA weights into the trainable parameters where the checkpoint has them (score_sde
            samples with EMA weights).
    """
    path = Path(path)
    state = _read_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a score_sde checkpoint dict or a state dict.")
    weights = state["model"] if "model" in state else state
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path} is not a score_sde checkpoint: its {'model entry' if 'model' in state else 'dict'} "
                         "is not a state dict (names to tensors); pass the checkpoint_*.pth score_sde wrote.")
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    expected = model.state_dict()
    if weights.keys() != expected.keys() or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{path} does not fit the network: {weights_mismatch(expected, weights)}; build the network "
                         "with the checkpoint's config (--score-sde-net).")
    model.load_state_dict(weights)
    ema = state.get("ema") if "model" in state else None
    if prefer_ema and ema is not None:
        shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
        if not isinstance(shadow, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in shadow):
            raise ValueError(f"{path}'s ema entry is not score_sde's EMA state (a dict with shadow_params, a list of "
                             "tensors): pass prefer_ema=False to load the raw weights.")
        params = [p for p in model.parameters() if p.requires_grad]
        if len(shadow) != len(params) or any(s.shape != p.shape for s, p in zip(shadow, params)):
            raise ValueError(f"{path}'s EMA has {len(shadow)} shadow parameters that do not match the model's "
                             f"{len(params)} trainable parameters: build the model with the checkpoint's config, "
                             "or pass prefer_ema=False.")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
    return model


def _read_checkpoint(path: Path) -> Any:
    """What ``path`` holds: a ``.safetensors`` state dict, or a ``.pth`` read with ``torch.load(weights_only=True)``.

    Raises ``ValueError`` with the fix for a file that cannot be read (damaged, truncated, another format) and for
    one that needs pickle to run code.
    """
    if not path.is_file():
        raise ValueError(f"{path}: there is no such file; pass the checkpoint file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(unreadable_safetensors(path, err)) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the bytes of a damaged or foreign file make the unpickler fail in any way
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        needs_code = next((line.split(" was not")[0] for line in lines if "Unsupported global" in line), None)
        if needs_code is None:
            after = [line for prev, line in zip(lines, lines[1:]) if prev.endswith("WeightsUnpickler error:")]
            first = lines[0].split(". ")[0] if lines else ""  # torch's messages run on for several sentences
            reason = after[0] if after else f"{type(err).__name__}: {first}".rstrip(": ")
            raise ValueError(f"{path} is not a checkpoint torch.load can read ({reason}): the file is corrupt, "
                             "truncated or not a PyTorch checkpoint; re-download it, or save it again with "
                             "torch.save.") from err
        raise ValueError(
            f"{path} needs pickle to run code to load ({needs_code}), and was refused: checkpoints "
            "are read with torch.load(weights_only=True), so nothing from the file executes. If you trust the "
            "file, convert it once in a trusted environment: ckpt = torch.load(path, weights_only=False); "
            "torch.save({'model': ckpt['model'], 'ema': ckpt['ema'].state_dict() if hasattr(ckpt['ema'], "
            "'state_dict') else ckpt['ema'], 'step': int(ckpt['step'])}, 'converted.pth'), then load that."
        ) from None
