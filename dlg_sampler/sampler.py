"""Denoising Langevin Gibbs (DLG; Kim & Ye, "Denoising MCMC", ICML 2023, Algorithm 1 with persistent chains)."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .gibbs import SIGMA_MODES, NoisePosterior, diverged, langevin_step, sample_sigma_index
from .integrators import (INTEGRATORS, CountedScore, Score, append_dims, check_integrator, check_steps, get_schedule,
                          integrate)
from .levels import NoiseLevels


#: Warm-started schedulers denoise the batch in this many groups of similar sigma (measured on the exact mixture,
#: levels 0.2-5, 4 steps: sliced W1 0.48 -> 0.14 for DPM-Solver++ 2M, 0.32 -> 0.09 for Euler; same NFE per sample).
SCHEDULER_GROUPS = 4


def _check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


class DLGSampler:
    """Denoising Langevin Gibbs on persistent chains ``(x, sigma)`` in the product space of data and noise level.

    Per output batch (one sample per chain):

    1. **Warm-up** (once per chain, :meth:`warm_up`): integrate from pure noise at ``sigma_max`` with
       ``warmup_integrator``, perturb by ``warmup_noise``, classify, then burn in with Gibbs sweeps.
    2. **Gibbs steps** (``gibbs_steps``): x | sigma by one Langevin step ``x + (eta/2) s + sqrt(eta) z``
       (``eta = step_size``); sigma | x from the noise posterior (argmax, or a draw with ``sigma_mode="sample"``).
    3. **Selection**: per chain, the state of this batch with the smallest sigma.
    4. **Denoising**: integrate the reverse S/ODE from each chain's own selected sigma down to ``tweedie_sigma``
       in ``denoise_steps`` steps (``integrator``: a name of ``INTEGRATORS`` or a diffusers scheduler instance,
       which denoises all the way to 0 itself).
    5. **Tweedie**: ``D(x, tweedie_sigma) = x + tweedie_sigma^2 s``.

    NFE per sample = ``gibbs_steps`` + denoising NFE + 1; the warm-up is a one-time cost, reported apart.

    Args:
        score: VE score ``score(x [B, *shape], sigma [B]) -> [B, *shape]`` (an adapter or any callable).
        noise_posterior: ``x [B, *shape] -> logits [B, L]`` over ``levels`` (e.g. a ``NoiseClassifier``).
        levels: the noise grid the posterior is defined on.
        shape: sample shape, e.g. ``(1, 8, 8)``.
        num_chains: persistent chains (= samples per batch).
        integrator, denoise_steps, integrator_kwargs: the denoising integrator, its steps and knobs. A diffusers
            scheduler is warm-started in ``SCHEDULER_GROUPS`` groups of similar selected sigma (``groups`` in
            ``integrator_kwargs`` overrides), so chains are not all re-noised up to the batch's largest sigma.
        gibbs_steps: Gibbs sweeps per batch (paper: 10).
        step_size: Langevin step ``eta`` (paper, CIFAR-10 in [0, 1]: 0.8); it sets the chains' working noise level.
        sigma_mode: ``"argmax"`` (paper) or ``"sample"``.
        tweedie_sigma: level of the final Tweedie step (default: the grid's ``sigma_min``, the paper's 0.01).
        warmup_integrator, warmup_steps: warm-up sampler from ``sigma_max`` (paper: Karras Alg. 2, 20 steps).
        warmup_noise: std of the perturbation after the warm-up integration (paper: 0.5).
        warmup_sweeps: ``(k1, k2)`` burn-in sweeps: ``k1`` at ``warmup_step_size`` then ``k2`` at ``step_size``.
        warmup_step_size: step size of the first burn-in sweeps (paper: 0.5; default: ``step_size``).
        seed: seed of the sampler's own generator (used when ``sample`` gets none; saved in ``state_dict``).
        device, dtype: where and in which precision the chains live.
        progress: show a tqdm bar while sampling.
    """

    def __init__(self, score: Score, noise_posterior: NoisePosterior, levels: NoiseLevels, *, shape: tuple[int, ...],
                 num_chains: int = 128, integrator="karras_heun", denoise_steps: int = 4, gibbs_steps: int = 10,
                 step_size: float = 0.8, sigma_mode: str = "argmax", tweedie_sigma: float | None = None,
                 integrator_kwargs: dict[str, Any] | None = None, warmup_integrator: str = "karras_stochastic",
                 warmup_steps: int = 20, warmup_noise: float = 0.5, warmup_sweeps: tuple[int, int] = (10, 10),
                 warmup_step_size: float | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, progress: bool = False):
        if not callable(score):
            raise TypeError(f"score must be callable as score(x, sigma), got {type(score).__name__}.")
        if not callable(noise_posterior):
            raise TypeError(f"noise_posterior must be callable as posterior(x) -> logits, got {type(noise_posterior).__name__}.")
        if not isinstance(levels, NoiseLevels):
            raise TypeError(f"levels must be a NoiseLevels, got {type(levels).__name__}.")
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError("shape must be a non-empty tuple of positive ints, the shape of one sample (e.g. (1, 8, 8)).")
        check_integrator(integrator)
        check_integrator(warmup_integrator)
        if sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode must be one of {SIGMA_MODES}, got {sigma_mode!r}.")
        self._check_model_match(score, noise_posterior, levels, shape)
        self.score, self.noise_posterior, self.levels, self.shape = score, noise_posterior, levels, shape
        self.num_chains = check_steps(num_chains, "num_chains")
        self.integrator, self.integrator_kwargs = integrator, dict(integrator_kwargs or {})
        self.denoise_steps = check_steps(denoise_steps, "denoise_steps")
        self.gibbs_steps = check_steps(gibbs_steps, "gibbs_steps")
        self.step_size = _check_positive_float(step_size, "step_size")
        self.sigma_mode = sigma_mode
        self.tweedie_sigma = _check_positive_float(levels.sigma_min if tweedie_sigma is None else tweedie_sigma,
                                                   "tweedie_sigma")
        self.warmup_integrator, self.warmup_steps = warmup_integrator, check_steps(warmup_steps, "warmup_steps")
        self.warmup_noise = float(warmup_noise)
        if len(warmup_sweeps) != 2 or any(k < 0 for k in warmup_sweeps):
            raise ValueError(f"warmup_sweeps must be two non-negative counts (k1, k2), got {warmup_sweeps!r}.")
        self.warmup_sweeps = tuple(int(k) for k in warmup_sweeps)
        self.warmup_step_size = _check_positive_float(step_size if warmup_step_size is None else warmup_step_size,
                                                      "warmup_step_size")
        self.device, self.dtype, self.progress = torch.device(device or "cpu"), dtype, progress
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed) if seed is not None else self.generator.seed()
        self.x: torch.Tensor | None = None  # [C, *shape], the chains' data states
        self.sigma_idx: torch.Tensor | None = None  # [C], the chains' noise levels as grid indices
        self._buffer = torch.empty(0, *shape, dtype=dtype, device=self.device)  # samples made but not yet returned
        self._counts = {"samples": 0, "batches": 0, "gibbs": 0, "denoise": 0, "tweedie": 0, "warmup": 0,
                        "reinitialised": 0}
        self._selected_hist = torch.zeros(len(levels), dtype=torch.long)

    @staticmethod
    def _check_model_match(score, noise_posterior, levels: NoiseLevels, shape: tuple[int, ...]) -> None:
        """Refuse a classifier made for another grid or sample shape, or a grid outside the model's range."""
        if hasattr(score, "sigma_min") and hasattr(score, "sigma_max"):
            levels.check_covers(float(score.sigma_min), float(score.sigma_max))
        post_levels = getattr(noise_posterior, "levels", None)
        if isinstance(post_levels, NoiseLevels) and post_levels != levels:
            raise ValueError(f"the noise posterior was trained on {post_levels!r} but the sampler got {levels!r}: "
                             "pass levels=classifier.levels.")
        for owner, name in ((noise_posterior, "noise classifier"), (score, "score model")):
            expected = getattr(owner, "sample_shape", None) or (getattr(owner, "shape", None) if owner is score else None)
            if expected is not None and tuple(expected) != shape:
                raise ValueError(f"the {name} is for samples of shape {tuple(expected)} but shape={shape} was given: "
                                 f"pass shape={tuple(expected)} or a {name} made for {shape}.")

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def warm_up(self, generator: torch.Generator | None = None, chains: torch.Tensor | None = None,
                x_init: torch.Tensor | None = None) -> None:
        """Step 1, once per chain: bring chains ``chains`` (indices, default all) near the data manifold.

        Integrates from pure noise at ``sigma_max`` (or starts from ``x_init [C, *shape]``, e.g. data),
        perturbs, classifies, and burns in with Gibbs sweeps.
        """
        g = generator or self.generator
        idx = torch.arange(self.num_chains, device=self.device) if chains is None else chains
        m = len(idx)
        score = CountedScore(self.score)
        if x_init is not None:
            if tuple(x_init.shape) != (m, *self.shape):
                raise ValueError(f"x_init must have shape {(m, *self.shape)} (one state per chain), got {tuple(x_init.shape)}.")
            if not torch.isfinite(x_init).all():
                raise ValueError("x_init contains NaN or Inf: pass finite initial states.")
            x = x_init.to(self.device, self.dtype)
        else:
            # Integrate from pure noise at sigma_max with a cheap sampler.
            sigma_max = torch.full((m,), self.levels.sigma_max, device=self.device, dtype=self.dtype)
            x = self.levels.sigma_max * torch.randn(m, *self.shape, generator=g, device=self.device, dtype=self.dtype)
            x, _ = integrate(self.warmup_integrator, score, x, sigma_max, self.warmup_steps, generator=g,
                             sigma_end=self.tweedie_sigma)
        # Perturb and classify.
        x = x + self.warmup_noise * torch.randn(x.shape, generator=g, device=self.device, dtype=self.dtype)
        s = sample_sigma_index(self.noise_posterior, x, self.levels, self.sigma_mode, g)
        # Burn in: Gibbs sweeps, first at warmup_step_size, then at step_size.
        for k, eta in zip(self.warmup_sweeps, (self.warmup_step_size, self.step_size)):
            for _ in range(k):
                x = langevin_step(score, x, self.levels.sigma(s).to(self.dtype), eta, g)
                s = sample_sigma_index(self.noise_posterior, x, self.levels, self.sigma_mode, g)
        if self.x is None:
            self.x = torch.zeros(self.num_chains, *self.shape, device=self.device, dtype=self.dtype)
            self.sigma_idx = torch.zeros(self.num_chains, dtype=torch.long, device=self.device)
        self.x[idx], self.sigma_idx[idx] = x, s
        self._counts["warmup"] += score.nfe * m

    @torch.no_grad()
    def step(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One DLG batch (steps 2-5): returns ``[k, *shape]`` samples, one per chain that stayed finite (k <= C)."""
        g = generator or self.generator
        x, sigma = self.gibbs_and_select(g)
        return self.denoise(x, sigma, g)

    @torch.no_grad()
    def gibbs_and_select(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-3 of one batch: ``(x [k, *shape], sigma [k])``, each finite chain's selected (min-sigma) state."""
        g = generator or self.generator
        if self.x is None:
            self.warm_up(g)
        levels, x, s = self.levels, self.x, self.sigma_idx
        lost = torch.zeros(self.num_chains, dtype=torch.bool, device=self.device)
        best_x, best_s = x, torch.full_like(s, len(levels))
        for _ in range(self.gibbs_steps):
            # Gibbs step: x | sigma (Langevin), then sigma | x (noise posterior).
            x = langevin_step(self.score, x, levels.sigma(s).to(self.dtype), self.step_size, g)
            lost |= diverged(x, levels)
            x = torch.where(append_dims(lost, x.ndim), torch.zeros_like(x), x)  # re-initialised below
            s = sample_sigma_index(self.noise_posterior, x, levels, self.sigma_mode, g)
            # Selection: per chain, keep the state with the smallest sigma.
            better = s < best_s
            best_x = torch.where(append_dims(better, x.ndim), x, best_x)
            best_s = torch.where(better, s, best_s)
        self.x, self.sigma_idx = x, s  # the chains persist from their last state
        keep = ~lost
        self._counts["gibbs"] += self.gibbs_steps * self.num_chains
        self._counts["batches"] += 1
        self._selected_hist += torch.bincount(best_s[keep].cpu(), minlength=len(levels))
        selected = best_x[keep], levels.sigma(best_s[keep]).to(self.dtype)
        if lost.any():  # diverged chains restart from the warm-up path and are never emitted
            self._counts["reinitialised"] += int(lost.sum())
            self.warm_up(g, chains=lost.nonzero().squeeze(1))
        return selected

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None, *,
                tweedie: bool = True) -> torch.Tensor:
        """Steps 4-5: ``x [k, *shape]`` at its own levels ``sigma [k]`` -> clean samples ``[k, *shape]``.

        With ``tweedie=False`` (core integrators only) the samples are returned at ``tweedie_sigma``, before the
        Tweedie step, for a caller that makes that last model call itself (``DLGScheduler``).
        """
        if len(x) == 0:
            return x
        score = CountedScore(self.score)
        if isinstance(self.integrator, str):
            # Denoising: integrate from each chain's own sigma down to the Tweedie level.
            sigmas = get_schedule(self.integrator, self.denoise_steps, sigma, self.tweedie_sigma, append_zero=False)
            x, _ = INTEGRATORS[self.integrator](score, x, sigmas, generator=generator, **self.integrator_kwargs)
            denoise_nfe = score.nfe
            if tweedie:  # Tweedie step: D(x, sigma_end) = x + sigma_end^2 s(x, sigma_end).
                x = score.denoise(x, sigmas[-1])
                self._counts["tweedie"] += len(x)
        elif not tweedie:
            raise ValueError("tweedie=False needs a core integrator: a diffusers scheduler denoises to 0 itself.")
        else:  # a diffusers scheduler denoises to 0 by itself
            kwargs = {"groups": min(SCHEDULER_GROUPS, len(x)), **self.integrator_kwargs}
            x, denoise_nfe = integrate(self.integrator, score, x, sigma, self.denoise_steps, generator=generator,
                                       **kwargs)
        self._counts["denoise"] += denoise_nfe * len(x)
        self._counts["samples"] += len(x)
        return x

    def record_tweedie(self, k: int) -> None:
        """Count ``k`` Tweedie steps made by a caller after ``denoise(..., tweedie=False)``."""
        self._counts["tweedie"] += k

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exactly ``n`` samples ``[n, *shape]`` from as many batches as needed (leftovers are kept for the next call)."""
        n = check_steps(n, "n")
        out, have = [self._buffer], len(self._buffer)
        with tqdm(total=n, initial=min(have, n), disable=not self.progress, desc="DLG", unit="sample") as bar:
            while have < n:
                batch = self.step(generator)
                out.append(batch)
                have += len(batch)
                bar.update(min(len(batch), n - bar.n))
        samples = torch.cat(out)
        self._buffer = samples[n:]
        return samples[:n]

    # ------------------------------------------------------------------ bookkeeping
    @property
    def stats(self) -> dict[str, Any]:
        """NFE per emitted sample split into gibbs / denoise / tweedie, one-time warm-up NFE per chain, diagnostics."""
        c, n = self._counts, max(self._counts["samples"], 1)
        hist = self._selected_hist
        total = int(hist.sum())
        mean_sigma = float((hist.double() * self.levels.sigmas.double()).sum() / total) if total else float("nan")
        per_sample = {k: c[k] / n for k in ("gibbs", "denoise", "tweedie")}
        return {
            "nfe_per_sample": {**per_sample, "total": sum(per_sample.values())},
            "warmup_nfe_per_chain": c["warmup"] / self.num_chains,
            "samples": c["samples"], "batches": c["batches"], "reinitialised": c["reinitialised"],
            "selected_sigma_mean": mean_sigma, "selected_sigma_hist": hist.clone(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: chains, unreturned samples, counters, own generator state."""
        return {
            "x": None if self.x is None else self.x.clone(), "sigma_idx": None if self.sigma_idx is None else self.sigma_idx.clone(),
            "buffer": self._buffer.clone(), "counts": dict(self._counts), "selected_hist": self._selected_hist.clone(),
            "generator": self.generator.get_state(), "shape": self.shape, "num_chains": self.num_chains,
            "levels": self.levels.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a sampler built with the same shape, chains and grid."""
        for key, mine in (("shape", self.shape), ("num_chains", self.num_chains), ("levels", self.levels.config)):
            if (tuple(state[key]) if key == "shape" else state[key]) != mine:
                raise ValueError(f"cannot load a DLGSampler state with {key}={state[key]!r} into a sampler with {key}={mine!r}.")
        to = dict(device=self.device)
        self.x = None if state["x"] is None else state["x"].to(**to, dtype=self.dtype)
        self.sigma_idx = None if state["sigma_idx"] is None else state["sigma_idx"].to(**to)
        self._buffer = state["buffer"].to(**to, dtype=self.dtype)
        self._counts = dict(state["counts"])
        self._selected_hist = state["selected_hist"].clone()
        self.generator.set_state(state["generator"])
