"""Everything the benchmark varies, as data: workloads, vanilla samplers, budgets, DLG configs and levers.

Adding a workload, a DLG config or a lever is one line here. A DLG config is a plain dict of ``DLGSampler``
keyword arguments (``integrator`` may name a core integrator or a label of ``SCHEDULERS``), laid over the
workload's ``DEFAULT_DLG`` entry; one bench-level key is read and removed before the sampler is built:
``outputs_per_chain`` (consecutive outputs per chain; ``chains = n // outputs_per_chain``). Without
``denoise_steps`` the config is fitted to each budget (:func:`dlg_sampler.bench.runs.fit_denoise_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..integrators import INTEGRATORS


@dataclass(frozen=True)
class MixtureSpec:
    """An exact isotropic Gaussian mixture workload (``GaussianMixture.random`` with weights 1..K).

    ``trained``: the noise posterior is a classifier trained in the run instead of the exact one.
    """

    modes: int
    dim: int
    spread: float
    std: float
    sigma_min: float = 0.01
    sigma_max: float = 80.0
    seed: int = 0
    trained: bool = False
    n: int = 20000
    quick_n: int = 2000


@dataclass(frozen=True)
class DigitsSpec:
    """A shipped preset's model (:data:`dlg_sampler.presets.PRESETS`, default ``digits``) with its noise classifier,
    scored by its evaluator against its own model reference of ``reference_n`` samples (``dlg-bench reference``)
    and, where ``second_reference_n``, against a second one from another solver family (``dlg-bench reference
    --reference-sampler DPM++2M``): a verdict stands where both agree."""

    n: int = 5000
    quick_n: int = 500
    preset: str = "digits"
    reference_n: int = 30000
    second_reference_n: int = 0


#: Workloads by name. Mixture scores are cheap: 20k samples put the floor row well below the differences.
WORKLOADS: dict[str, MixtureSpec | DigitsSpec] = {
    "mixture": MixtureSpec(modes=8, dim=16, spread=2.0, std=0.5),
    "mixture-trained": MixtureSpec(modes=8, dim=16, spread=2.0, std=0.5, trained=True),
    "separated": MixtureSpec(modes=5, dim=12, spread=3.0, std=0.3, seed=1),  # modes ~50 std apart
    "wide": MixtureSpec(modes=6, dim=32, spread=8.0, std=2.0, sigma_min=0.04, sigma_max=150.0, seed=2),
    # 30k reference samples resolve FD differences of 0.1-0.3 (at 10k its own finite sample moved them by that much).
    "digits": DigitsSpec(second_reference_n=10000),
    # 3x16x16 colour digits: each evaluation costs ~2 ms of one CPU thread (4x digits), so fewer samples and runs.
    "photo-digits": DigitsSpec(preset="photo-digits", n=2000, quick_n=300, reference_n=5000),
}
#: Workloads of a plain ``dlg-bench`` run and of ``--quick``: all but photo-digits, whose runs (and quick reference
#: alone, ~15 min) cost too much for them; run it by name (``--workloads photo-digits``).
DEFAULT_WORKLOADS = tuple(name for name in WORKLOADS if name != "photo-digits")

#: diffusers schedulers: label -> (class name, config overrides); run with trailing spacing from sigma_max. The
#: stronger peers take the schedule their authors use at few steps, fixed (never picked by the bench's metric):
#: DPM-Solver++ uniform in log-SNR (Lu et al.'s choice for few steps), DEIS a Karras rho=7 ramp (as in the DEIS
#: paper's EDM runs), UniPC order 3 trailing spacing (diffusers' few-step setting; its exponential sigmas start the
#: solve below sigma_max).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "DPM++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "DPM++3M-logSNR": ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_lu_lambdas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "UniPC-3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "DEIS-3": ("DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}
#: Core-integrator peers: label -> (core integrator, :func:`~dlg_sampler.integrators.integrate` keywords). iPNDM and
#: DEIS tAB on a Karras rho=7 ramp (the EDM schedule of their few-step evaluations); Restart sampling (Xu et al. 2023)
#: with its paper's interval [0.06, 0.30] and one restart of two Heun steps. Each ends with the solver's own step to 0
#: (``final_step="solver"``: the Tweedie evaluation at sigma_min is spent on one more solver level, docs/mixing.md).
#: UniPC-GITS: the core UniPC on levels fitted to the model for its steps on 8 of its samples
#: (:func:`~dlg_sampler.integrators.fit_schedule`), the fit's model evaluations paid from its budget (amortised over n).
CORE_PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "iPNDM": ("ipndm", {"schedule": "karras", "final_step": "solver"}),
    "DEIS-tAB3": ("deis", {"order": 3, "schedule": "karras", "final_step": "solver"}),
    "Restart": ("restart", {"final_step": "solver"}),
    "UniPC-GITS": ("unipc", {"schedule": "fitted", "final_step": "solver"}),
}
#: The few-step peers DLG must beat at equal total NFE: a verdict's "best peer" is the best of those that ran, per
#: budget and workload.
PEERS = ("DPM++2M", "DPM++3M", "UniPC", "UniPC-3", "DPM++3M-logSNR", "DEIS-3") + tuple(CORE_PEERS)
#: Vanilla samplers of a full run: every budgetable core integrator (adaptive RK45 has no budget), scheduler and
#: core peer.
VANILLA = tuple(name for name in INTEGRATORS if name != "ode_rk45") + tuple(SCHEDULERS) + tuple(CORE_PEERS)
#: Per-workload vanilla samplers where not all: the trained-classifier mixture has the exact one's vanilla rows;
#: digits runs the peers and DLG's own denoiser (each digits evaluation costs ~0.5 ms of one CPU thread); photo-digits
#: (~2 ms) the peers strongest on digits.
VANILLA_BY_WORKLOAD = {"mixture-trained": ("karras_heun",) + PEERS,
                       "digits": ("unipc",) + PEERS,
                       "photo-digits": ("UniPC", "UniPC-3", "DPM++2M", "DPM++3M-logSNR", "DEIS-3", "UniPC-GITS")}
#: ``--quick`` vanilla samplers.
QUICK_VANILLA = ("karras_heun", "DPM++2M", "UniPC", "UniPC-3", "iPNDM", "Restart")

#: Total-NFE budgets per sample: vanilla samplers, the chosen DLG point and the tuned sampler run at each.
BUDGETS = (5, 6, 8, 10, 12, 15, 20, 40)
#: Per-workload budgets where not ``BUDGETS`` (digits: the peers' few-step range; 40 NFE costs an hour there).
BUDGETS_BY_WORKLOAD = {"digits": (6, 8, 10, 12, 15, 20), "photo-digits": (6, 8, 10, 12, 15, 20)}
#: Budgets at which lever points and named configs run (each costs seeds x values x budgets runs).
LEVER_BUDGETS = (10, 12, 15)
#: ``--quick`` budgets and seeds.
QUICK_BUDGETS, QUICK_LEVER_BUDGETS, QUICK_SEEDS = (8, 12, 20), (12,), (0, 1)
#: Seeds of a full run (every sampler runs each: results are paired by seed).
SEEDS = (0, 1, 2)

#: The chosen DLG point per workload (what a user gets): ``DLGSampler``'s defaults, the restart kernel with the
#: lift level it derives from the warm-up; levers and configs are laid over it. The tuned sampler
#: (``DLGSampler.for_budget``) runs beside it at every budget.
DEFAULT_DLG: dict[str, dict[str, Any]] = {name: {"kernel": "restart", "integrator": "unipc"} for name in WORKLOADS}


@dataclass(frozen=True)
class Lever:
    """A family of DLG configs: the workload's default (with ``base`` over it) and ``param`` set to each of ``values``.

    ``workloads``: where it applies (``None``: everywhere; the registry's levers all name theirs).
    """

    param: str
    values: tuple
    workloads: tuple[str, ...] | None = None
    base: dict[str, Any] | None = None  # settings laid over the default before ``param`` (e.g. another kernel)


#: Where the workload-wide levers and diagnostics run: not on photo-digits (each costs seeds x values x budgets runs at
#: ~2 ms per evaluation there; it runs its restart lever and paper-sweeps only).
EVERY_LEVER = tuple(name for name in WORKLOADS if name != "photo-digits")

#: The paper's Langevin-Gibbs kernel as a lever family (its step size sets the working level).
GIBBS = {"kernel": "gibbs", "integrator": "karras_heun", "gibbs_steps": 2}

#: Levers: one quality-vs-total-NFE frontier each. One line per lever. Restart levels are absolute: each workload's
#: values bracket what the default derives (12 x the data scale: digits ~7, photo-digits ~23-26, mixture ~24, separated
#: ~36, wide ~100).
LEVERS: dict[str, Lever] = {
    "restart_sigma-digits": Lever("restart_sigma", (3.0, 5.0, 10.0, 20.0), ("digits",)),
    "restart_sigma-photo-digits": Lever("restart_sigma", (6.0, 12.0, 48.0), ("photo-digits",)),
    "restart_sigma-mixture": Lever("restart_sigma", (6.0, 12.0, 48.0), ("mixture", "mixture-trained")),
    "restart_sigma-separated": Lever("restart_sigma", (9.0, 18.0, 72.0), ("separated",)),
    "restart_sigma-wide": Lever("restart_sigma", (25.0, 50.0, 149.0), ("wide",)),
    "integrator": Lever("integrator", ("dpmpp_2m", "karras_heun", "UniPC"), EVERY_LEVER),
    "outputs_per_chain": Lever("outputs_per_chain", (100,), EVERY_LEVER),
    "gibbs_step_size": Lever("step_size", (0.05, 0.3, 1.0), ("mixture", "mixture-trained", "separated"), GIBBS),
    "gibbs_step_size-wide": Lever("step_size", (0.3, 1.0, 3.0), ("wide",), GIBBS),
    "gibbs_step_size-digits": Lever("step_size", (0.3, 0.8), ("digits",), {**GIBBS, "gibbs_steps": 4}),
    "gibbs_sigma_mode": Lever("sigma_mode", ("sample",), ("mixture", "separated"), {**GIBBS, "step_size": 0.3}),
}
#: ``--quick`` levers.
QUICK_LEVERS = ("restart_sigma-digits", "restart_sigma-mixture")


@dataclass(frozen=True)
class DLGConfig:
    """A named DLG config laid over the workload default; ``diagnostic`` rows are shown apart, never as DLG's
    result (e.g. one chain per sample, whose warm-up dominates its cost)."""

    overrides: dict[str, Any]
    workloads: tuple[str, ...] | None = None
    diagnostic: bool = False


#: Where the few-step denoiser configs run: the mixtures with an exact posterior and digits.
FEW_STEP = ("mixture", "separated", "wide", "digits")
#: Named DLG configs, run at ``LEVER_BUDGETS`` (or once, placed at their measured NFE, with ``denoise_steps``).
DLG_CONFIGS: dict[str, DLGConfig] = {
    "one-chain-per-sample": DLGConfig({"outputs_per_chain": 1, "denoise_steps": 9}, EVERY_LEVER, diagnostic=True),
    # The restart solve on levels fitted to the model once per run (GITS-style, counted as pilot; UniPC-GITS is the
    # vanilla peer with the same fit).
    "fitted-schedule": DLGConfig({"denoise_schedule": "fitted"}, FEW_STEP + ("photo-digits",)),
    # Denoisers measured against the default (docs/mixing.md, "Other denoisers at 5-12 NFE"): each solve ending with
    # the solver's own step to 0 instead of the Tweedie evaluation (same NFE), with UniPC on its ramp or on fitted
    # levels, and iPNDM on its Karras ramp or on fitted levels.
    "solver-end": DLGConfig({"final_step": "solver"}, FEW_STEP),
    "fitted-solver-end": DLGConfig({"denoise_schedule": "fitted", "final_step": "solver"}, FEW_STEP),
    "ipndm": DLGConfig({"integrator": "ipndm", "final_step": "solver"}, FEW_STEP),
    "ipndm-fitted": DLGConfig({"integrator": "ipndm", "denoise_schedule": "fitted", "final_step": "solver"}, FEW_STEP),
    # The paper's protocol at its whole cost: 10 Langevin-Gibbs sweeps per output, then 2 Karras Heun steps from the
    # selected level and the Tweedie step (about 15 NFE with the warm-up); fitted to 10-15 NFE it would not fit.
    "paper-sweeps": DLGConfig({**GIBBS, "step_size": 0.8, "gibbs_steps": 10, "denoise_steps": 2},
                              ("digits", "photo-digits")),
}
