"""What a sampler runs on and how its samples are scored: exact Gaussian mixtures and the shipped preset models
(digits, photo-digits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..gibbs import NoisePosterior
from ..integrators import Score
from ..levels import NoiseLevels
from ..metrics import CharacteristicMMD, KernelDistance, SlicedWasserstein, frechet_distance
from ..mixture import GaussianMixture
from .common import class_proportions
from .reference import SECOND_SAMPLER, SECOND_STEPS, ensure_reference
from .registry import WORKLOADS, DigitsSpec, MixtureSpec

#: Seed of the exact samples every mixture run is scored against (the floor rows draw with the run seed).
EVAL_SEED = 12345
#: Random projections of the sliced Wasserstein distance (fixed directions for every run).
SW_PROJECTIONS = 256
#: Random frequencies of the MMD to the exact mixture (fixed for every run: they define its kernel).
MMD_FREQUENCIES = 1024
#: DDPM config (linear betas) the diffusers schedulers run with on the mixtures; sigma range [0.01, 157].
MIXTURE_SCHEDULER_CONFIG = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                            "num_train_timesteps": 1000, "clip_sample": False}


@dataclass
class Workload:
    """A score, its noise posterior and an evaluation.

    ``evaluate(x)`` takes post-processed samples ``[N, *shape]`` and returns metrics (lower is better);
    ``metrics`` lists the ones reported, headline first; ``exact`` draws true samples (the floor row) where known.
    """

    name: str
    score: Score
    posterior: NoisePosterior
    levels: NoiseLevels
    shape: tuple[int, ...]
    scheduler_config: dict[str, Any]
    n: int
    evaluate: Callable[[torch.Tensor], dict[str, float]]
    metrics: tuple[str, ...]
    postprocess: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    exact: Callable[[int, torch.Generator], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- mixtures
def mixture_metrics(mixture: GaussianMixture, x: torch.Tensor, reference: SlicedWasserstein,
                    mmd: CharacteristicMMD) -> dict[str, float]:
    """Quality of ``x [N, D]`` against a known mixture; every sample is assigned to its most responsible mode.

    ``mode_tv``: total variation between assigned and true mode weights; ``mean_err``: distance of each mode's
    sample mean from its true mean in units of the mode's std; ``cov_err``: Frobenius error of each mode's sample
    covariance relative to the true ``s_k^2 I``; both averaged over modes with the true weights (modes with fewer
    than 2 samples are left out: they show in ``mode_tv``); ``sw``: sliced W2 against the exact samples behind
    ``reference``; ``mmd``: the squared MMD to the mixture itself (unbiased, no reference sample: ``mmd``, a
    :class:`CharacteristicMMD`), with its standard error ``mmd_se``.
    """
    xf = x.flatten(1).double()
    labels = mixture.responsibilities(xf).argmax(-1)
    counts = torch.bincount(labels, minlength=len(mixture.weights)).double()
    mean_err = cov_err = weight = 0.0
    for k in range(len(mixture.weights)):
        xk = xf[labels == k]
        if len(xk) < 2:
            continue
        s2, w = float(mixture.stds[k]) ** 2, float(mixture.weights[k])
        mean_err += w * float((xk.mean(0) - mixture.means[k]).norm()) / s2**0.5
        cov = torch.cov(xk.T) - s2 * torch.eye(xf.shape[1], dtype=xf.dtype)
        cov_err += w * float(cov.norm()) / (s2 * xf.shape[1] ** 0.5)
        weight += w
    weight = max(weight, 1e-12)
    mmd2, se = mmd(xf)
    return {"sw": reference(xf), "mmd": mmd2, "mmd_se": se,
            "mode_tv": float(0.5 * (counts / len(xf) - mixture.weights).abs().sum()),
            "mean_err": mean_err / weight, "cov_err": cov_err / weight}


def train_mixture_classifier(mixture: GaussianMixture, levels: NoiseLevels, quick: bool) -> tuple[Any, dict]:
    """A noise classifier trained on the mixture's samples (seeded): the classifier and its held-out CE beside the
    exact posterior's."""
    from ..classifier import NoiseClassifier, evaluate_noise_classifier, train_noise_classifier

    clf = NoiseClassifier(levels.sigma_min, levels.sigma_max, len(levels), sample_shape=[mixture.dim], arch="mlp",
                          hidden=256, mlp_layers=3)
    train = mixture.sample(50000, generator=torch.Generator().manual_seed(1))
    held_out = mixture.sample(4000, generator=torch.Generator().manual_seed(2))
    result = train_noise_classifier(clf, train, steps=800 if quick else 3000, batch_size=512, lr=2e-3, seed=0,
                                    eval_data=held_out, progress=False)
    exact = evaluate_noise_classifier(mixture.noise_posterior(levels), held_out, levels, 4096,
                                      torch.Generator().manual_seed(1))
    return clf, {"trained classifier, held-out cross-entropy (nats)": result["eval_ce"],
                 "exact posterior, same cross-entropy": exact["ce"]}


def mixture_workload(name: str, spec: MixtureSpec, n: int, quick: bool = False) -> Workload:
    """An exact mixture: exact score, exact (or trained) noise posterior, scored against exact samples."""
    mixture = GaussianMixture.random(spec.modes, spec.dim, spec.spread, spec.std, seed=spec.seed)
    levels = NoiseLevels(spec.sigma_min, spec.sigma_max, 1000)
    reference = SlicedWasserstein(mixture.sample(n, generator=torch.Generator().manual_seed(EVAL_SEED)),
                                  SW_PROJECTIONS, torch.Generator().manual_seed(0))
    # The Gaussian kernel at the modes' typical within-mode distance (std x sqrt(D)): it sees their shapes, and modes
    # apart by many stds are told apart.
    mmd = CharacteristicMMD.gaussian(mixture.characteristic_function, spec.dim, spec.std * spec.dim**0.5,
                                     MMD_FREQUENCIES, torch.Generator().manual_seed(0))
    posterior: NoisePosterior = mixture.noise_posterior(levels)
    info: dict[str, Any] = {"mixture": f"{spec.modes} modes in {spec.dim}-d, means ~ N(0, {spec.spread}^2 I), "
                                       f"std {spec.std}, weights 1..{spec.modes}; levels {levels!r}"}
    if spec.trained:
        posterior, trained = train_mixture_classifier(mixture, levels, quick)
        info.update(trained)
    return Workload(name, mixture.score, posterior, levels, (spec.dim,), MIXTURE_SCHEDULER_CONFIG, n,
                    lambda x: mixture_metrics(mixture, x, reference, mmd),
                    ("sw", "mmd", "mode_tv", "mean_err", "cov_err"),
                    exact=lambda m, g: mixture.sample(m, generator=g), info=info)


# ----------------------------------------------------------------------------- digits presets
def digits_workload(n: int, reference: torch.Tensor, reference_info: dict[str, Any], preset: str = "digits",
                    name: str | None = None, second: tuple[torch.Tensor, dict[str, Any]] | None = None) -> Workload:
    """A shipped preset's model and noise classifier (default the digits'), as workload ``name`` (default the
    preset's). Samples ``[N, *shape]`` are clamped to ``[-1, 1]`` (as the reference is) and scored in the preset
    evaluator's feature space: ``fd_ref`` against the model reference, ``fd_ref2`` against the ``second`` reference
    (``(samples, sidecar)`` of another solver family) where given, ``fd_real`` against the held-out split,
    ``kid_ref``: the kernel distance (KID, unbiased) to the model reference, with its standard error ``kid_ref_se``;
    ``class_tv``: total variation of the predicted-class proportions to the reference's."""
    from ..models import load_classifier, load_model
    from ..presets import PRESETS, pipeline_path

    model = load_model(str(pipeline_path(preset)))
    clf = load_classifier(PRESETS[preset].classifier_dir)
    evaluator = PRESETS[preset].evaluator()
    postprocess = lambda x: x.clamp(-1, 1)  # noqa: E731
    ref = postprocess(reference)
    ref_feats, classes = evaluator.features(ref), evaluator.net.head.out_features
    ref_props = class_proportions(evaluator.predict(ref), classes)
    kid = KernelDistance(ref_feats)
    second_feats = None if second is None else evaluator.features(postprocess(second[0]))

    def evaluate(x: torch.Tensor) -> dict[str, float]:
        feats = evaluator.features(x)
        props = class_proportions(evaluator.predict(x), classes)
        kid_ref, kid_se = kid(feats)
        second_fd = {} if second_feats is None else {"fd_ref2": frechet_distance(feats, second_feats)}
        return {"fd_ref": frechet_distance(feats, ref_feats), **second_fd, "kid_ref": kid_ref, "kid_ref_se": kid_se,
                "fd_real": frechet_distance(feats, evaluator.real_features("test")),
                "class_tv": float(0.5 * (props - ref_props).abs().sum())}

    info = {"reference": reference_info, "FD held-out vs training digits": evaluator.real_fd_floor(),
            "FD model reference vs held-out digits": frechet_distance(ref_feats, evaluator.real_features("test"))}
    metrics = ("fd_ref", "kid_ref", "fd_real", "class_tv")
    if second is not None:
        info["second reference"] = second[1]
        info["FD second reference vs model reference"] = frechet_distance(second_feats, ref_feats)
        metrics = ("fd_ref", "fd_ref2") + metrics[1:]
    return Workload(name or preset, model.score, clf, clf.levels, model.shape, dict(model.pipeline.scheduler.config), n,
                    evaluate, metrics, postprocess=postprocess, info=info)


def build_workload(name: str, n: int | None, quick: bool, reference_dir: Path | None = None,
                   reference_n: int | None = None, reference_seed: int = 0) -> Workload:
    """Workload ``name`` of ``WORKLOADS`` with ``n`` samples per run (default: the registry's); a preset workload
    makes its model reference of ``reference_n`` samples (default: the registry's) first if it is missing
    (announcing the cost)."""
    spec = WORKLOADS[name]
    if isinstance(spec, DigitsSpec):
        samples, info = ensure_reference(reference_n or spec.reference_n, reference_seed, reference_dir, spec.preset)
        second = None if quick or not spec.second_reference_n else ensure_reference(
            spec.second_reference_n, reference_seed, reference_dir, spec.preset, SECOND_SAMPLER, SECOND_STEPS)
        return digits_workload(n or spec.n, samples, info, spec.preset, name, second)
    return mixture_workload(name, spec, n or spec.n, quick)
