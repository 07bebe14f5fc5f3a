"""Exact stand-ins for pretrained networks, built from a :class:`~dlg_sampler.mixture.GaussianMixture`.

They have the calling conventions of real models but return the *exact* prediction of the mixture, so adapters,
scheduler bridges and pipelines can be tested without weights:

- :class:`MixtureUNet`: a diffusers-UNet look-alike (``model(sample, timestep, ...) -> UNet2DOutput``) returning
  the exact epsilon / v / x0 under a DDPM table (VP), or the exact VE score with ``timestep = sigma`` (VE);
- :class:`MixtureScoreSdeModel`: a score_sde network ``model(x, labels)`` returning what score_sde's
  networks return for continuous VP / sub-VP / VE and discrete VE.

Both compute in float64 and return the input's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput

from .mixture import GaussianMixture

#: Prediction types :class:`MixtureUNet` can return in VP mode.
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _per_sample(value: Any, batch: int) -> torch.Tensor:
    """A scalar or ``[B]`` timestep/label -> ``[B]`` float64 on the CPU."""
    v = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
    return v.expand(batch) if v.numel() == 1 else v


class MixtureUNet(torch.nn.Module):
    """A fake diffusers UNet whose output is exact for ``mixture`` (of image shape ``(C, H, W)``).

    VP mode (``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps``, table ``alphas_cumprod``): a timestep ``t`` (any float)
    stands for the level ``sigma(t)`` obtained by linear interpolation of ``log sigma_t`` between table entries
    (``sigma_t = sqrt((1 - abar_t) / abar_t)``; only the finite, increasing prefix of the table is used, as for a
    zero-terminal-SNR schedule). With ``x = x_t sqrt(1 + sigma^2)``, ``s`` the mixture's VE score at ``(x, sigma)``
    and ``x0 = x + sigma^2 s``, the output is ``eps = -sigma s``, ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` or
    ``x0`` (``prediction_type``). VE mode: the timestep is ``sigma`` and the output is ``s`` (NCSN++ conventions).

    Args:
        mixture: the ground truth; its ``shape`` must be ``(C, H, W)``.
        alphas_cumprod: VP table ``[T]`` (default: ``DDPMScheduler().alphas_cumprod``, linear betas, T = 1000).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (VP mode).
        mode: ``"vp"`` or ``"ve"``.
        out_channels_factor: 2 mimics a learned-variance model: ``2 C`` output channels, the second half garbage.
        dtype: the dtype reported as ``.dtype`` (float64 makes an adapter's round trip exact to ~1e-12).

    Attributes:
        calls: number of forward calls; evaluations: samples evaluated (sum of batch sizes).
        config: ``in_channels``, ``out_channels``, ``sample_size``, ``time_embedding_type`` (``"fourier"`` in VE mode).
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor | None = None,
                 prediction_type: str = "epsilon", mode: str = "vp", out_channels_factor: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(mixture.shape) != 3:
            raise ValueError(f"MixtureUNet needs an image-shaped mixture (C, H, W), got shape {mixture.shape}.")
        if mode not in ("vp", "ve") or prediction_type not in PREDICTIONS or out_channels_factor not in (1, 2):
            raise ValueError("mode must be 'vp' or 've', prediction_type one of "
                             f"{PREDICTIONS}, out_channels_factor 1 or 2.")
        self.mixture, self.mode, self.prediction_type = mixture, mode, prediction_type
        if alphas_cumprod is None:
            alphas_cumprod = DDPMScheduler().alphas_cumprod
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).numpy()
        with np.errstate(divide="ignore"):  # zero-terminal SNR: abar_T = 0
            sigmas = np.sqrt((1 - abar) / abar)
        ok = np.isfinite(sigmas) & (sigmas > 0)
        ok[1:] &= sigmas[1:] > sigmas[:-1]
        self.log_sigmas = np.log(sigmas[: int(np.cumprod(ok).sum())])  # finite, increasing prefix
        channels, size = mixture.shape[0], mixture.shape[1]
        self.config = FrozenDict(in_channels=channels, out_channels=channels * out_channels_factor, sample_size=size,
                                 time_embedding_type="fourier" if mode == "ve" else "positional")
        self.calls, self.evaluations, self._dtype = 0, 0, dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the fake reports, so adapters cast its inputs to it (it computes in float64 regardless)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """VE level ``[B]`` (float64) of VP timesteps ``[B]``: log-sigma interpolated in the table."""
        return torch.from_numpy(np.exp(np.interp(timestep.numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)))

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, return_dict: bool = True, **kwargs: Any):
        """``sample [B, C, H, W]``, ``timestep`` scalar or ``[B]`` -> ``UNet2DOutput(sample=[B, C', H, W])``
        (conditioning arguments are accepted and ignored)."""
        self.calls, self.evaluations = self.calls + 1, self.evaluations + sample.shape[0]
        t = _per_sample(timestep, sample.shape[0])
        x = sample.detach().cpu().double()
        if self.mode == "ve":
            out = self.mixture.score(x, t)
        else:
            sigma = self.sigma(t)
            scale = (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)  # x = x_t sqrt(1 + sigma^2)
            x_ve, sig = x * scale, sigma.reshape(-1, 1, 1, 1)
            s = self.mixture.score(x_ve, sigma)
            eps, x0 = -sig * s, x_ve + sig**2 * s
            if self.prediction_type == "epsilon":
                out = eps
            elif self.prediction_type == "sample":
                out = x0
            else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0, sqrt(abar) = 1 / scale, sqrt(1 - abar) = sigma / scale
                out = (eps - sig * x0) / scale
        if self.config.out_channels != self.config.in_channels:  # learned variance: garbage second half
            out = torch.cat([out, torch.full_like(out, 1e3)], 1)
        out = out.to(sample.device, sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class MixtureScoreSdeModel(torch.nn.Module):
    """A fake score_sde network ``model(x, labels) -> [B, *shape]``, exact for ``mixture``.

    Returns what score_sde's ``get_score_fn`` expects (continuous time unless ``sde="ve", continuous=False``):
    VP / sub-VP: ``t = labels / 999``, ``B = beta_min t + (beta_max - beta_min) t^2 / 2``, ``abar = exp(-B)``,
    ``std = sqrt(1 - abar)`` (VP) or ``1 - abar`` (sub-VP); output ``-std s_t(x_t)`` with
    ``s_t(x_t) = s(x_t / sqrt(abar), std / sqrt(abar)) / sqrt(abar)``. VE: output ``s(x, sigma)`` with
    ``sigma = labels`` (continuous) or ``sigma_max (sigma_min / sigma_max)^(labels / (N - 1))`` (discrete).

    Attributes: ``calls`` (forward calls).
    """

    def __init__(self, mixture: GaussianMixture, sde: str = "vp", *, beta_min: float = 0.1, beta_max: float = 20.0,
                 sigma_min: float = 0.01, sigma_max: float = 50.0, continuous: bool = True, N: int = 1000):
        super().__init__()
        self.mixture, self.sde, self.continuous, self.N = mixture, sde, continuous, N
        self.beta_min, self.beta_max, self.sigma_min, self.sigma_max = beta_min, beta_max, sigma_min, sigma_max
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        lab, xd = _per_sample(labels, x.shape[0]), x.detach().cpu().double()
        if self.sde == "ve":
            sigma = lab if self.continuous else \
                self.sigma_max * (self.sigma_min / self.sigma_max) ** (lab / (self.N - 1))
            return self.mixture.score(xd, sigma).to(x.device, x.dtype)
        t = lab / 999
        abar = torch.exp(-(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2))
        std = (1 - abar).sqrt() if self.sde == "vp" else 1 - abar
        root = abar.sqrt().reshape(-1, *[1] * (x.ndim - 1))
        s_t = self.mixture.score(xd / root, std / abar.sqrt()) / root
        return (-std.reshape(root.shape) * s_t).to(x.device, x.dtype)


class CountingScore:
    """A score that counts every sample it evaluates (``x.shape[0]`` per call) in ``.evaluations``, independently
    of the library's own counters; every other attribute (``sigma_min``, ``sigma_max`` ...) is the wrapped score's."""

    def __init__(self, score: Any):
        self.score, self.evaluations = score, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.evaluations += x.shape[0]
        return self.score(x, sigma)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.score, name)


def error_of(main, argv: list[str], capsys) -> str:
    """Run a console script's ``main(argv)`` in-process; it must exit with an error (a non-zero code or a message):
    returns what it said (pytest's ``capsys`` stderr, and the exit message)."""
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    else:
        raise AssertionError(f"{getattr(main, '__name__', main)}({argv}) returned instead of exiting with an error")
    assert code not in (0, None), f"exited with {code!r}, not an error"
    return capsys.readouterr().err + (code if isinstance(code, str) else "")
