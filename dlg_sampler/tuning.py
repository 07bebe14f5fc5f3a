"""Settings from a budget: ``DLGSampler.for_budget`` configures the sampler for a model it has never seen.

A user has a score, a noise classifier, a sample shape, a budget of model evaluations per sample (everything
counted: warm-up and this pilot included) and the number of samples wanted. The settings follow from them:

- **denoising steps**: the most that fit the budget with the warm-up of the fewest chains (``n / 250``, the paper's
  chain length) and the smallest pilot (8 chains) amortised over ``n``: steps are what quality is bought with;
- **pilot**: up to ``PILOT_SHARE`` of the run (at most ``MAX_PILOT_CHAINS``) from what those steps leave;
- **chains**: ``n / outputs_per_chain`` (the paper's protocol: few chains, many outputs each), or fewer where the
  budget left after the steps and the pilot cannot warm that many up. At small ``n`` that protocol makes many
  rounds of tiny model calls one after the other (n = 256: 20 calls of 13 samples per denoising step), and each
  call pays a fixed overhead (``FULL_BATCH``); so there, **full batches come first**: the chains
  are raised until each output round holds about ``FULL_BATCH`` samples (at least ``MIN_OUTPUTS_PER_CHAIN``
  outputs per chain; n = 256: 86 chains, 3 rounds), their warm-up shortened to the most steps (at least
  ``MIN_WARMUP_STEPS``) that fit. That may cost one of the protocol's denoising steps, never more, and is not
  made where fewer than ``FULL_BATCH_MIN_STEPS`` would remain: a step weighs more there;
- **restart level** ``S``: the rule of thumb (:func:`dlg_sampler.restart.restart_rule`: ``RESTART_SCALE`` times the
  data scale the run's warm-up measures, growing with the denoising steps beyond ``RULE_STEPS`` to twice that, or
  more where the chains' spread sits in few directions), checked by the pilot,
  run on the first warmed-up chains of the run itself, without data. Each level of a small ladder (in units of the
  data scale) makes one restart move with the chosen denoiser; the lag-1 autocorrelation between a chain's state and
  its output says how much consecutive outputs would share. Those noisy estimates are pooled through the curve an
  exact restart move follows on Gaussian data, ``r(S) = s / sqrt(s^2 + S^2)`` (it fits the digits model within 5%
  from S = 3 to 40); where that curve says the rule of thumb leaves consecutive outputs more correlated than
  ``target_lag1``, ``S`` is raised to where it reaches the target. The pilot then checks the level (its
  autocorrelation and divergences) and how far the denoiser lands from one with twice its steps (``agreement``),
  and reports its cost. (Aiming at the target itself, the lowest level that mixes, was tried: it picks lower levels
  than the rule of thumb, which scored worse on digits and no better on the mixtures; docs/design.md.)

Where the warmed-up chains' spread sits in few directions (:func:`dlg_sampler.restart.spread_in_few_directions`) and
no denoiser is given, UniPC's solves walk levels uniform in log-SNR (decided after the pilot's warm-up; said in
``sampler.tuning["settings"]``).

With ``denoise_schedule="fitted"`` the denoising levels are fitted once after the pilot, at the level it chose, on
the first chains (:meth:`DLGSampler.fit_denoise_schedule`; with ``restart_sigma`` given, at the first output); the
fit's cost is in the budget's arithmetic.

The pilot's moves and the fit are counted as ``pilot`` (the warm-up it starts from is the run's own, counted as
``warmup``).
Where even the smallest pilot is more than ``PILOT_SHARE`` of the run it is skipped and ``S`` is the rule of thumb
(:func:`dlg_sampler.restart.restart_rule`; said in ``sampler.tuning``).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch

from .diagnostics import OutputCorrelation
from .gibbs import diverged
from .integrators import (FINAL_STEP, FIT_SAMPLES, FITTED, LOGSNR, candidate_grid, check_steps, count_nfe,
                          fit_evaluations, steps_for_nfe, teacher_trajectory)
from .levels import NoiseLevels
from .restart import RULE, TARGET_LAG1, _data_scale, spread_in_few_directions

if TYPE_CHECKING:  # the sampler calls this module; the class is passed in
    from .sampler import DLGSampler

#: The pilot's share of the run's whole budget (``n * nfe`` model evaluations) at most.
PILOT_SHARE = 0.05
#: Fewer pilot chains than this cannot estimate an autocorrelation: the pilot is skipped.
MIN_PILOT_CHAINS = 8
#: Most pilot chains used (more add cost, not information).
MAX_PILOT_CHAINS = 128
#: Pilot restart levels, in units of the measured data scale: low enough that the autocorrelation they measure
#: (0.3-0.8 on the digits model) is large against its estimation noise.
RESTART_LADDER = (1.0, 2.0, 4.0, 8.0)
#: Default outputs per chain (the mixing issue's protocol asks >= 20; the paper takes 250).
OUTPUTS_PER_CHAIN = 20
#: Most denoising steps per output a budget buys: diffusion models are trained on grids of about 1000 levels (DDPM's
#: 1000 timesteps, score_sde's N = 1000), and finer solver grids than the model's own buy nothing. A larger budget is
#: refused with the most that this allows, and it bounds the budget's arithmetic.
MAX_DENOISE_STEPS = 1000
#: Most outputs per chain: where the budget is tight, chains are traded for denoising steps down to ``n / 250``
#: (the paper's CIFAR-10 chains; consecutive restart outputs are as good as those of fresh chains, docs/mixing.md).
MAX_OUTPUTS_PER_CHAIN = 250
#: Samples per model call that the chains' output rounds should hold at least, where ``n`` allows: a call of the
#: digits model pays a fixed overhead worth about 10 samples on one CPU thread and 25 on two (far more on a GPU), so
#: from about 100 samples the overhead is at most a fifth of the call. Below ``FULL_BATCH * outputs_per_chain`` samples the paper's protocol makes smaller
#: calls, and the restart chains are raised (``n / FULL_BATCH`` rounds instead of ``outputs_per_chain``).
FULL_BATCH = 100
#: Fewest outputs per chain when chains are raised to fill the model's calls (n <= 2 x ``FULL_BATCH``: n / 2 chains).
MIN_OUTPUTS_PER_CHAIN = 2
#: Shortest warm-up (UniPC steps from sigma_max) of chains raised to fill the model's calls: the first restart move
#: forgets most of it, but the restart level is set from the data scale it measures, which 4 steps measure within
#: about 10% of 10 steps on the digits model and 3 steps 2.6 times too large (their outputs keep visible noise).
MIN_WARMUP_STEPS = 4
#: Full batches may cost one denoising step, not below this many: on the digits model at n = 256 (6 seeds), 5 steps
#: with full batches scored FD 16.9 against 19.6 for the protocol's 6, but 3 steps 33 against 21 for its 4.
FULL_BATCH_MIN_STEPS = 5


#: The denoisers ``for_budget`` chooses between where none is given, at the same evaluations per output, the last
#: step to 0 with the solver's own data prediction: UniPC on its ramp with the first step from the chains' Gaussian
#: (``k + 1`` steps for ``k`` evaluations), and iPNDM on levels fitted to the run's chains (``k`` steps). Measured
#: (docs/mixing.md): the second wins at 6 NFE on the mixtures and breaks on some seeds of the digits model, where the
#: first wins; the pilot tells them apart on the model itself (:func:`choose_denoiser`). The Gaussian's first step
#: does not serve iPNDM, whose multistep history carries it through the solve (16-d mixture at 6 NFE, 5 seeds:
#: sliced W2 0.109 -> 0.119 with one more step, worse on every seed).
DENOISERS = ({"integrator": "unipc", "final_step": "solver", "gaussian_first_step": True},
             {"integrator": "ipndm", "final_step": "solver", "denoise_schedule": FITTED, "gaussian_first_step": False})
#: The settings that name a denoiser: given any of them, ``for_budget`` takes it as given.
DENOISER_KEYS = ("integrator", "final_step", "denoise_schedule", "integrator_kwargs", "gaussian_first_step")
#: The largest budget at which the unchecked UniPC takes its first step from the chains' Gaussian: at 10-12 NFE it
#: scored better than the model's first step on every mixture on 4-5 of 5 seeds; at 15-40 the same or worse
#: (separated at 15: sliced W2 0.161 against 0.159, worse on every seed; wide at 20: better on 1 of 5), where the
#: Gaussian's error at S outweighs a step.
GAUSSIAN_MAX_NFE = 12
#: The largest budget at which the pilot chooses between ``DENOISERS``: where denoising error dominates. Above it
#: both land within about 1% of the data scale of the teacher, the check prefers iPNDM on fitted levels, and UniPC
#: scores better (``for_budget`` rows, 5 seeds, sliced W2 with that check at every budget against UniPC unchecked:
#: separated mixture 0.194 / 0.184 against 0.166 / 0.159 at 12 / 15 NFE, 16-d mixture 0.063 against 0.058 at 10),
#: so above it the fitted levels are not offered.
CHOICE_MAX_NFE = 8
#: Above ``CHOICE_MAX_NFE`` the check chooses between UniPC (as ``DENOISERS[0]``, its first step from the chains'
#: Gaussian up to ``GAUSSIAN_MAX_NFE``) and iPNDM on its own ramp, its first step from the chains' Gaussian
#: (docs/mixing.md, *The denoiser chosen above 8 NFE*: on the mixtures at 10-20 NFE iPNDM's MMD to the mixture is
#: a half to a third of UniPC's on every seed, and the check chooses it; on digits and on the separated mixture at
#: 10 NFE it chooses UniPC, the better there).
RAMP_DENOISERS = (DENOISERS[0], {"integrator": "ipndm", "final_step": "solver", "gaussian_first_step": True})
#: Where the check's ramps end, in multiples of the run's ``tweedie_sigma`` (the grid's lowest level unless given):
#: the solver's last step to 0 leaves from the level above it, and a ramp that ends at the lowest level spends its
#: last steps where the data is already resolved. Each ramp candidate is offered at each end (fitted levels at the
#: run's own: they are fitted to it). Measured (docs/mixing.md, *Where the ramp ends*): at 8 NFE the MMD of
#: ``for_budget``'s samples to the mixture falls 3.50 -> 0.91 (16-d) and 2.09 -> 0.57 (wide) with the end at 3x, and
#: rises 1.10 -> 5.91 on the separated mixture, whose modes are tightest; the check tells them apart on every seed.
RAMP_ENDS = (1.0, 3.0)
#: Held-out chains on which the pilot compares the denoisers with a teacher, and the teacher's grid of levels.
CHECK_CHAINS, CHECK_GRID = 8, 32
#: Seed offset of the check's lift (its own stream: the run's random draws stay as they are).
CHECK_SEED_OFFSET = 7919


def denoisers(nfe: float, ramp_ends: tuple[float, ...] = RAMP_ENDS) -> tuple[dict[str, Any], ...]:
    """The denoisers the pilot's check chooses between at a budget of ``nfe`` evaluations per sample:
    ``DENOISERS`` up to ``CHOICE_MAX_NFE``, ``RAMP_DENOISERS`` above (UniPC's Gaussian first step up to
    ``GAUSSIAN_MAX_NFE``); each one on a ramp at each of ``ramp_ends`` (``"ramp_end"``: a multiple of the run's
    ``tweedie_sigma``, absent for 1), fitted levels at the run's own."""
    if nfe <= CHOICE_MAX_NFE:
        base = DENOISERS
    else:
        unipc, ipndm = RAMP_DENOISERS
        base = {**unipc, "gaussian_first_step": nfe <= GAUSSIAN_MAX_NFE}, ipndm
    return tuple(c if end == 1 else {**c, "ramp_end": end} for c in base
                 for end in (ramp_ends if c.get("denoise_schedule") != FITTED else (1.0,)))


def longer_batches(share: float, batches: int, first: int = 0) -> int:
    """How many of output batches ``first .. first + batches - 1`` take one more denoising step with
    ``extra_step_share = share``: batch ``b`` does where ``floor((b + 1) * share)`` steps up, so any ``batches``
    consecutive ones hold ``share * batches`` of them, rounded (``1e-9``: a share ``L / B`` gives exactly ``L`` in
    ``B``)."""
    return math.floor((first + batches) * share + 1e-9) - math.floor(first * share + 1e-9)


def check_evaluations(steps_cost: int, candidates: int) -> int:
    """Model evaluations of :func:`choose_denoiser`: the teacher's solve of ``CHECK_CHAINS`` chains and each
    candidate's (``steps_cost`` evaluations per chain)."""
    return fit_evaluations(CHECK_CHAINS, grid=CHECK_GRID) + CHECK_CHAINS * steps_cost * candidates


def plan_budget(nfe: float, n: int, *, num_chains: int | None = None, outputs_per_chain: int | None = None,
                choose_denoiser: bool | None = None, **overrides: Any) -> dict[str, Any]:
    """The budget's arithmetic, which needs no model: what :func:`for_budget` will choose before its pilot.

    Returns ``settings`` (``num_chains``, ``kernel``, ``integrator``, ``denoise_steps``, the warm-up, and
    ``gibbs_steps`` for the Gibbs kernel; ``overrides`` included as given), ``pilot_chains`` (0: no pilot),
    ``predicted_nfe_per_sample`` (pilot and warm-up amortised over ``n``) and ``full_batches``: ``None``, or where
    the chains were raised to fill the model's calls, the protocol's chains, output rounds, warm-up and denoising
    steps (``protocol_chains``, ``protocol_rounds``, ``protocol_warmup_steps``, ``protocol_denoise_steps``) and the
    ``rounds`` run instead (:func:`full_batches_note` says it in words). Raises a
    ``ValueError`` naming the smallest budget that fits when one output does not. ``outputs_per_chain`` given: exactly
    ``n / outputs_per_chain`` chains (or fewer where the budget is tight), never raised. ``choose_denoiser`` (default:
    for the restart kernel where no setting of ``DENOISER_KEYS`` is given and the check (and the fit, where a
    candidate walks fitted levels) cost at most ``PILOT_SHARE`` of the run; otherwise there UniPC, the first of
    ``DENOISERS``): the plan prices the budget's :func:`denoisers` (they cost the same per output; the fit and
    :func:`choose_denoiser`'s check included) and ``denoisers`` lists them.
    """
    n = check_steps(n, "n")
    if isinstance(nfe, bool) or not isinstance(nfe, (int, float)) or not math.isfinite(nfe) or nfe <= 0:
        raise ValueError(f"nfe must be a positive number of model evaluations per sample, got {nfe!r}.")
    most = check_steps(num_chains or min(n, math.ceil(n / (outputs_per_chain or OUTPUTS_PER_CHAIN))), "num_chains")
    kernel = overrides.get("kernel", "restart")
    # A given tweedie_sigma is where the ramps end: the check offers no other end.
    candidates = denoisers(nfe, (1.0,) if "tweedie_sigma" in overrides else RAMP_ENDS)
    if choose_denoiser is None:  # chosen where the fit and the check fit the pilot's share, else the first
        auto = kernel == "restart" and not any(k in overrides for k in DENOISER_KEYS)
        fits = any(c.get("denoise_schedule") == FITTED for c in candidates)  # a fit is paid whichever wins
        # One step given leaves nothing to choose (each candidate's is the model's first step).
        choose_denoiser = auto and overrides.get("denoise_steps", 2) >= 2 and (
            fits * fit_evaluations(FIT_SAMPLES) + check_evaluations(math.floor(nfe), len(candidates))
            <= PILOT_SHARE * n * nfe)
        unchecked = {**DENOISERS[0], "gaussian_first_step": nfe <= GAUSSIAN_MAX_NFE and overrides.get(
            "denoise_steps", 2) >= 2}
        if choose_denoiser and nfe > CHOICE_MAX_NFE:  # above, only where the check costs the run no chains
            sizes = dict(n=n, num_chains=num_chains, outputs_per_chain=outputs_per_chain)
            choose_denoiser = (plan_budget(nfe, **sizes, choose_denoiser=True, **overrides)["settings"]["num_chains"]
                               >= plan_budget(nfe, **sizes, choose_denoiser=False, **unchecked, **overrides)[
                                   "settings"]["num_chains"])
        overrides = {**unchecked, **overrides} if auto and not choose_denoiser else overrides
    if kernel == "restart" and "warmup_outputs" not in overrides:
        return _returned_where_it_pays(nfe, n, num_chains=num_chains, outputs_per_chain=outputs_per_chain,
                                       choose_denoiser=choose_denoiser, **overrides)
    if choose_denoiser:
        # Priced as the last plain candidate (fitted levels: the fit is paid); they cost the same per output.
        overrides = {**next(c for c in reversed(candidates) if "ramp_end" not in c), **overrides}
    # Only restart chains are traded for steps: a Gibbs chain's consecutive outputs are near-copies (mixing.md).
    fewest = min(most, math.ceil(n / MAX_OUTPUTS_PER_CHAIN)) if kernel == "restart" and not num_chains else most
    # Full batches at small n: restart chains raised so that each output round holds about FULL_BATCH samples.
    full = math.ceil(n / max(MIN_OUTPUTS_PER_CHAIN, math.ceil(n / FULL_BATCH)))
    if kernel != "restart" or num_chains or outputs_per_chain:
        full = most
    integrator = overrides.get("integrator", "unipc")
    gibbs_steps = overrides.get("gibbs_steps", 2) if kernel == "gibbs" else 0
    warmup_integrator = overrides.get("warmup_integrator") or ("karras_stochastic" if kernel == "gibbs" else "unipc")
    warmup_steps = overrides.get("warmup_steps") or (20 if kernel == "gibbs" else 10)
    search = kernel == "restart" and overrides.get("restart_sigma") is None
    dlg = isinstance(integrator, str)
    final_step = overrides.get("final_step", FINAL_STEP)
    # The first evaluation of each solve from S from the chains' Gaussian (restart kernel, core integrators).
    gaussian = kernel == "restart" and dlg and overrides.get("gaussian_first_step", False)
    knobs = dict(overrides.get("integrator_kwargs") or {}) if dlg else {}  # e.g. restarts: they change the count
    fits_levels = kernel == "restart" and overrides.get("denoise_schedule") == FITTED
    # Each chain's warm-up is its first output (restart kernel), and the budget left below the next whole step buys
    # one more step in a share of the output batches (on fitted levels, fitted for both step counts at once).
    emit = kernel == "restart" and overrides.get("warmup_outputs", True)
    dither = kernel == "restart" and "extra_step_share" not in overrides

    def check_cost(steps: int) -> int:
        """Model evaluations of the pilot's choice between its denoisers (none where it is not made)."""
        return check_evaluations(per_output(steps), len(candidates)) if choose_denoiser else 0

    def fit_cost(chains: int) -> int:
        """Model evaluations of the denoising schedule's fit on the first chains (``denoise_schedule="fitted"``)."""
        return fit_evaluations(min(overrides.get("fit_samples", FIT_SAMPLES), chains)) if fits_levels else 0

    @functools.cache
    def warm(steps: int) -> int:
        """Model evaluations of one chain's warm-up of ``steps`` solver steps (and the Gibbs kernel's sweeps)."""
        return count_nfe(warmup_integrator, steps, dlg=False) + (
            sum(overrides.get("warmup_sweeps", (10, 10))) if kernel == "gibbs" else 0)

    @functools.cache
    def per_output(steps: int) -> int:
        """Model evaluations of one output with ``steps`` denoising steps."""
        return count_nfe(integrator, steps, dlg=dlg, final_step=final_step, **knobs) + gibbs_steps - gaussian

    def returned_warmup(warmup: int, steps: int) -> int:
        """A returned warm-up (not given) takes at least the evaluations of an output, so at large budgets its
        output is no worse than the others (10-step warm-ups among 18-38-step outputs raised the mixtures' sliced W2
        at 20-40 NFE on 3-4 of 5 seeds) and costs the same."""
        if not emit or overrides.get("warmup_steps"):
            return warmup
        return max(warmup, steps_for_nfe(warmup_integrator, per_output(steps), dlg=False) or warmup)

    def fit(steps: int, chain_counts: list[int], warmups: list[int], strict: bool = True
            ) -> tuple[float, int, int, int] | None:
        """(predicted NFE per sample, chains, pilot chains, warm-up steps) with ``steps`` denoising steps: the first
        of ``chain_counts`` (most first), each with the first of ``warmups`` (longest first), that fits; ``None``:
        over budget. A pilot runs where its smallest size fits its share of the run; ``strict=False`` (steps
        given): the first chains and warm-up and a pilot of its share, whatever they cost."""
        per_pilot_chain = ((len(RESTART_LADDER) + 2) * (per_output(steps) + gaussian)  # the pilot's own solves
                           + count_nfe(integrator, 2 * steps, dlg=dlg, final_step=final_step, **knobs))

        def cost(chains: int, pilot: int, warmup: int) -> float:
            """NFE per sample: every batch of outputs (the last one whole; the warm-up's outputs first, where they
            are returned), the warm-up, the pilot and the schedule's fit, over ``n``."""
            batches = math.ceil(n / chains) - emit
            longer = longer_batches(overrides.get("extra_step_share", 0), batches)
            per_chain = warm(warmup) + (overrides.get("burn_in", 0) * per_output(steps) if kernel == "restart" else 0)
            return (batches * chains * per_output(steps) + longer * chains * (per_output(steps + 1) - per_output(steps))
                    + chains * per_chain + pilot * per_pilot_chain + fit_cost(chains) + check_cost(steps)) / n

        top = chain_counts[0]
        warmups = [returned_warmup(w, steps) for w in warmups]
        pilot = min(MAX_PILOT_CHAINS, top, int(PILOT_SHARE * n * nfe // per_pilot_chain)) if search else 0
        pilot = pilot if pilot >= MIN_PILOT_CHAINS else 0  # too small a run to amortise a pilot: skipped
        if not strict:
            return cost(top, pilot, warmups[0]), top, pilot, warmups[0]
        # The most chains beside which a pilot of at least MIN_PILOT_CHAINS fits; it runs on the first of them.
        for chains in chain_counts:
            for warmup in warmups:
                left = nfe * n - cost(chains, 0, warmup) * n
                fits = min(pilot, chains, int(left // per_pilot_chain))
                if (fits >= MIN_PILOT_CHAINS) if pilot else left >= 0:
                    return cost(chains, fits if pilot else 0, warmup), chains, fits if pilot else 0, warmup
        return None

    # The protocol: n / outputs_per_chain chains, down to the fewest, each count giving whole batches.
    protocol = (sorted({math.ceil(n / b) for b in range(math.ceil(n / most), math.ceil(n / fewest) + 1)},
                       reverse=True), [warmup_steps])
    # Full batches first where n is small: their warm-up the longest that fits beside the steps.
    raised = ([full], [warmup_steps] if overrides.get("warmup_steps") or emit else  # a returned warm-up stays whole
              list(range(warmup_steps, MIN_WARMUP_STEPS - 1, -1)))
    steps = protocol_steps = overrides.get("denoise_steps")
    if steps is not None:  # steps given: the protocol's chains and warm-up, whatever they cost
        fitted = fit(steps, [most], [warmup_steps], strict=False)
    else:  # the most denoising steps that fit the protocol, from the most one output alone can take
        # An output alone fits the budget; where the warm-up's outputs come first (at least one of every
        # MIN_OUTPUTS_PER_CHAIN), the others may take up to twice it.
        top = min(MAX_DENOISE_STEPS, steps_for_nfe(integrator, math.floor(nfe * (2 if emit else 1)) - gibbs_steps
                                                   + gaussian, dlg=dlg, final_step=final_step, **knobs) or 0)
        if top == MAX_DENOISE_STEPS:
            burn_in = overrides.get("burn_in", 0) * per_output(top) if kernel == "restart" else 0
            most_nfe = most_useful_nfe(per_output(top), warm(warmup_steps) + burn_in, n, most)
            if nfe > most_nfe:
                raise ValueError(f"a budget of {nfe:.10g} model evaluations per sample is more than denoising can use: "
                                 f"at most {MAX_DENOISE_STEPS} {_name(integrator)} steps per output make sense (finer "
                                 f"than the ~1000-level grid diffusion models are trained on buys nothing), "
                                 f"{most_nfe} model evaluations per sample with the warm-up and pilot; pass nfe "
                                 f"{most_nfe} or less.")
        steps = protocol_steps = next((k for k in range(top, gaussian, -1) if fit(k, *protocol)), None)
        fitted = fit(steps, *protocol) if steps else None
        # Full batches where n is small: the longest warm-up, then the most steps that fit beside it (returned
        # warm-ups can make room), at worst one fewer than the protocol's and at least FULL_BATCH_MIN_STEPS.
        traded = [k for k in range(top, steps - 2, -1) if k >= max(FULL_BATCH_MIN_STEPS, 1 + gaussian)] \
            if steps and full > most else []
        steps, fitted = next(((k, f) for w in raised[1] for k in traded if (f := fit(k, raised[0], [w]))),
                             (steps, fitted))
    if fitted is None:
        least = per_output(1 + gaussian)  # one step, two where the first is the Gaussian's
        minimum = ((math.ceil(n / fewest) - emit) * fewest * least + warm(warmup_steps) * fewest) / n
        raise ValueError(f"a budget of {nfe:g} model evaluations per sample is too small: one {kernel} output "
                         f"costs at least {minimum:.2f} ({'Gibbs steps, ' if kernel == 'gibbs' else ''}one "
                         f"denoising step{', the Tweedie step' if final_step == 'tweedie' else ''} and the warm-up "
                         f"of {fewest} chains amortised over "
                         f"n={n}); raise nfe to at least {math.ceil(minimum)}, or draw more samples per chain.")
    predicted, chains, pilot_chains, warmup = fitted
    share = {}
    if dither and protocol_steps is not None and overrides.get("denoise_steps") is None:
        # The budget left buys one more step in `longer` of the output batches (not all: steps + 1 did not fit).
        batches = math.ceil(n / chains) - emit
        extra = (per_output(steps + 1) - per_output(steps)) * chains
        longer = min(batches - 1, math.floor((nfe - predicted) * n / extra)) if extra > 0 and batches > 1 else 0
        if longer > 0:
            share = {"extra_step_share": longer / batches}
            predicted += longer * extra / n
    settings = {"num_chains": chains, "kernel": kernel, "integrator": integrator, "denoise_steps": steps,
                **({"gibbs_steps": gibbs_steps} if kernel == "gibbs" else {}),
                **({"warmup_outputs": emit, "gaussian_first_step": gaussian} if kernel == "restart" else {}),
                **share, **overrides,
                "warmup_integrator": warmup_integrator, "warmup_steps": warmup}
    full_batches = None if chains <= most else {
        "protocol_chains": most, "protocol_rounds": math.ceil(n / most), "protocol_warmup_steps": warmup_steps,
        "protocol_denoise_steps": protocol_steps, "rounds": math.ceil(n / chains)}
    return {"settings": settings, "pilot_chains": pilot_chains, "predicted_nfe_per_sample": predicted,
            "full_batches": full_batches,
            "denoisers": [dict(d) for d in candidates] if choose_denoiser else None}


def _returned_where_it_pays(nfe: float, n: int, **arguments: Any) -> dict[str, Any]:
    """The plan with each chain's warm-up returned as its first output where that buys the other outputs denoising
    (more steps, or a larger share of batches with one more) and the warm-ups are at most one sample in
    ``OUTPUTS_PER_CHAIN``, else the plan with the warm-up paid and not returned: a returned warm-up is a vanilla
    sample, and where the budget already holds the same steps beside a paid warm-up (n = 5000 from 20 NFE) it would
    only take the place of a restart output."""
    plans, errors = {}, []
    for returned in (True, False):
        try:
            plans[returned] = plan_budget(nfe, n, warmup_outputs=returned, **arguments)
        except ValueError as err:
            errors.append(err)
    if not plans:
        raise errors[0]

    def denoising(plan: dict[str, Any]) -> float:
        return plan["settings"]["denoise_steps"] + plan["settings"].get("extra_step_share", 0)

    # Returned only where each chain gives at least OUTPUTS_PER_CHAIN outputs: a warm-up is a vanilla solve from
    # sigma_max, and as a third of the samples (n = 256, 3 outputs per chain) it cost the digits model FD 11.5 -> 16.0
    # (seed 0; 19.9 -> 28.4, 10.7 -> 14.5 on seeds 1, 2).
    returned = plans.get(True)
    if returned is not None and n / returned["settings"]["num_chains"] >= OUTPUTS_PER_CHAIN and (
            False not in plans or denoising(returned) > denoising(plans[False])):
        return returned
    if False not in plans:
        raise errors[-1]
    return plans[False]


def most_useful_nfe(per_output: int, warm: int, n: int, chains: int) -> int:
    """The largest budget per sample :func:`plan_budget` accepts: ``MAX_DENOISE_STEPS`` steps per output
    (``per_output`` evaluations; the last batch whole) and the warm-up (``warm`` per chain) of ``chains`` chains over
    ``n`` samples, with the pilot's share on top."""
    outputs = math.ceil(n / chains) * chains
    return math.ceil((outputs * per_output + chains * warm) / n / (1 - PILOT_SHARE))


def _name(integrator) -> str:
    return integrator if isinstance(integrator, str) else type(integrator).__name__


def for_budget(cls: type[DLGSampler], score, noise_posterior, *, shape: tuple[int, ...], nfe: float, n: int,
               num_chains: int | None = None, seed: int | None = None, levels: NoiseLevels | None = None,
               outputs_per_chain: int | None = None, target_lag1: float = TARGET_LAG1,
               device: torch.device | str | None = None, progress_bar=None, **overrides: Any) -> DLGSampler:
    """A :class:`DLGSampler` whose whole cost per sample (pilot and warm-up amortised over ``n``) fits ``nfe``.

    Args:
        cls: the sampler class (:meth:`DLGSampler.for_budget` passes its own, so subclasses build themselves).
        score, noise_posterior, shape: as for :class:`DLGSampler` (the grid is ``levels``, else
            ``noise_posterior.levels``, else the score's trained range; the restart kernel needs no posterior).
        nfe: budget of model evaluations per sample, everything counted.
        n: samples the run will draw (the warm-up and the pilot are amortised over them).
        num_chains: chains (default ``ceil(n / outputs_per_chain)``; at small ``n`` more, to fill the model's
            calls: :func:`plan_budget`).
        outputs_per_chain: outputs per chain (default ``OUTPUTS_PER_CHAIN``, with full batches first at small
            ``n``; given: exactly ``n / outputs_per_chain`` chains).
        seed: seeds the pilot and the sampler: the choice is deterministic under it.
        target_lag1: the largest acceptable lag-1 autocorrelation of consecutive outputs.
        progress_bar: a caller's tqdm bar, advanced by every model evaluation of the warm-up and the pilot (the
            run's bar from its first evaluation); where its total is unset, it is set to their planned cost.
        overrides: any :class:`DLGSampler` setting, taken as given (``restart_sigma=`` skips the pilot's search;
            ``kernel="gibbs"`` builds the paper's kernel with the budget's denoising steps and no pilot).

    Returns:
        the sampler, with ``.tuning`` holding the choice, the pilot's measurements and the predicted cost; the
        pilot's model evaluations are already counted in its ``.stats``. The arithmetic alone, without a model:
        :func:`plan_budget`.
    """
    plan = plan_budget(nfe, n, num_chains=num_chains, outputs_per_chain=outputs_per_chain, **overrides)
    levels = levels or getattr(noise_posterior, "levels", None)
    if levels is None and hasattr(score, "sigma_min") and hasattr(score, "sigma_max"):  # the model's trained range
        levels = NoiseLevels(float(score.sigma_min), float(score.sigma_max))
    if not isinstance(levels, NoiseLevels):
        raise ValueError("the noise grid is unknown: pass levels=NoiseLevels(...), a noise posterior with .levels "
                         "(a NoiseClassifier) or a score with .sigma_min / .sigma_max (an adapter).")
    settings = plan["settings"]
    sampler = cls(score, noise_posterior, levels, shape=shape, seed=seed, device=device,
                  **{k: v for k, v in settings.items() if k != "shape"})
    search = settings["kernel"] == "restart" and settings.get("restart_sigma") is None
    auto = settings["kernel"] == "restart" and not any(k in overrides for k in DENOISER_KEYS)
    few_directions = False
    pilot = None
    if search:
        if progress_bar is not None and progress_bar.total is None:
            progress_bar.total = ((sampler.planned_nfe(0) if plan["pilot_chains"] else 0)
                                  + plan["pilot_chains"] * _pilot_cost(sampler)
                                  + (fit_evaluations(min(sampler.fit_samples, sampler.num_chains))
                                     if sampler.denoise_schedule == FITTED else 0)
                                  + (check_evaluations(_evaluations_per_output(sampler), len(plan["denoisers"]))
                                     if plan["denoisers"] else 0))
        sampler.score.bar = progress_bar
        try:
            if plan["pilot_chains"]:
                sampler.warm_up()  # the run's own warm-up: the pilot starts from its first chains
                # Chains whose spread sits in few directions: UniPC's solves walk levels uniform in log-SNR.
                few_directions = auto and spread_in_few_directions(sampler.x)
                if few_directions and not plan["denoisers"]:
                    sampler.denoise_schedule = LOGSNR
            pilot = _pilot(sampler, plan["pilot_chains"], target_lag1, seed)
        finally:
            sampler.score.bar = None
        if pilot["restart_sigma"] is not None:
            sampler.restart_sigma = pilot["restart_sigma"]
    schedule_fit = None
    # Fitted once at the level the pilot chose, on its first chains. Where S is given (a resumed run among them) the
    # sampler fits at its first output instead, so a state loaded before then brings its fit and none is redone.
    denoiser = None
    sampler.score.bar = progress_bar
    try:
        if sampler.denoise_schedule == FITTED and (search or plan["denoisers"]):
            sampler.fit_denoise_schedule()
        if plan["denoisers"]:
            if sampler.x is None:  # no pilot ran: the run's own warm-up, whose last chains the check lifts
                sampler.warm_up()
            candidates = [{**c, "denoise_schedule": LOGSNR} if few_directions and c.get("denoise_schedule") is None
                          else c for c in plan["denoisers"]]
            # Each ramp's end as a level: its multiple of the run's tweedie_sigma.
            candidates = [{**{k: v for k, v in c.items() if k != "ramp_end"},
                           "tweedie_sigma": c.get("ramp_end", 1.0) * sampler.tweedie_sigma} for c in candidates]
            denoiser = choose_denoiser(sampler, candidates, seed)
    finally:
        sampler.score.bar = None
    if sampler.schedule_fit is not None:
        fit = sampler.schedule_fit
        schedule_fit = {**fit, "levels": fit["levels"].tolist(),
                        "longer": None if fit["longer"] is None else fit["longer"].tolist()}
    integrator = sampler.integrator
    sampler.tuning = {
        "budget": {"nfe": nfe, "n": n},
        "settings": {**{k: v for k, v in settings.items() if k in (
                         "num_chains", "kernel", "gibbs_steps", "step_size", "warmup_steps", "warmup_outputs",
                         "extra_step_share")},
                     "denoise_steps": sampler.denoise_steps, "gaussian_first_step": sampler.gaussian_first_step,
                     "integrator": integrator if isinstance(integrator, str) else type(integrator).__name__,
                     "final_step": sampler.final_step, "denoise_schedule": sampler.denoise_schedule,
                     "tweedie_sigma": sampler.tweedie_sigma, "restart_sigma": sampler.restart_sigma},
        "denoiser": denoiser,
        "predicted_nfe_per_sample": plan["predicted_nfe_per_sample"], "pilot": pilot,
        "schedule_fit": schedule_fit, "full_batches": plan["full_batches"],
    }
    return sampler


def full_batches_note(tuning: dict[str, Any]) -> str | None:
    """Why the chains of ``sampler.tuning`` (or of a :func:`plan_budget` plan) are not ``n / outputs_per_chain``,
    and what that cost, in a sentence; ``None`` where they are."""
    fb, settings = tuning.get("full_batches"), tuning["settings"]
    if fb is None:
        return None
    paid = [f"a {settings['warmup_steps']}-step warm-up instead of {fb['protocol_warmup_steps']}"] \
        if settings["warmup_steps"] < fb["protocol_warmup_steps"] else []
    if settings["denoise_steps"] < fb["protocol_denoise_steps"]:
        share = settings.get("extra_step_share") or 0
        longer = f" ({settings['denoise_steps'] + 1} in {share:.0%} of the batches)" if share else ""
        paid.append(f"{settings['denoise_steps']} denoising steps{longer} instead of {fb['protocol_denoise_steps']}")
    return (f"chains raised from n / {OUTPUTS_PER_CHAIN} = {fb['protocol_chains']} to fill the model's calls "
            f"({fb['rounds']} rounds of calls instead of {fb['protocol_rounds']}), "
            + (f"paid for with {' and '.join(paid)}" if paid else "their warm-up paid from the budget's slack"))


@torch.no_grad()
def _pilot(sampler: DLGSampler, chains: int, target_lag1: float, seed: int | None) -> dict[str, Any]:
    """Measure, on ``chains`` warmed-up pilot chains, the lag-1 autocorrelation of one restart move per candidate
    level and the denoiser's agreement with twice its steps at the chosen level; count it all as ``pilot``."""
    if chains == 0:
        return {"chains": 0, "evaluations": 0, "restart_sigma": None,
                "skipped": f"n too small to amortise a pilot within {PILOT_SHARE:.0%} of the budget: restart_sigma = "
                           f"the rule of thumb, {RULE}"}
    levels, device = sampler.levels, sampler.device
    base = 0 if seed is None else seed + 1
    sampler.score.phase = "pilot"
    x = sampler.x[:chains].clone()  # warmed-up chains of the run; the pilot's moves leave them as they are
    scale, rule = _data_scale(sampler.x), sampler.restart_sigma  # the warm-up set the rule of thumb
    ladder = _ladder(scale, levels.sigma_max)
    # One restart move at the top of the ladder first: the ladder then starts from outputs of the kernel (what a
    # running chain holds), not of the warm-up solver, whose outputs are measurably more correlated with the next.
    x = _restart(sampler, x, ladder[-1], sampler.denoise_steps, base)
    idx = torch.arange(chains, device=device)
    candidates = []
    for k, level in enumerate(ladder):
        out = _restart(sampler, x, level, sampler.denoise_steps, base + 1 + k)
        lost = diverged(out, levels)
        corr = OutputCorrelation(chains, x[0].numel(), device)
        corr.update(idx, x)
        corr.update(idx[~lost], out[~lost])
        candidates.append({"restart_sigma": level, "lag1": corr.lag1, "diverged": int(lost.sum())})
    s_eff, mixing, chosen = choose_level(candidates, rule, levels.sigma_max, target_lag1)
    k = len(candidates)
    out = _restart(sampler, x, chosen, sampler.denoise_steps, base + 1 + k)
    lost = diverged(out, levels)
    check = OutputCorrelation(chains, x[0].numel(), device)
    check.update(idx, x)
    check.update(idx[~lost], out[~lost])
    # Agreement: the chosen denoiser against twice its steps, from the same lifted states (relative to the scale).
    fine = _restart(sampler, x, chosen, 2 * sampler.denoise_steps, base + 1 + k)
    agreement = float((out - fine).flatten(1).pow(2).mean().sqrt()) / scale
    return {"chains": chains, "evaluations": sampler._counts["pilot"], "data_scale": scale,
            "effective_scale": s_eff, "target_lag1": target_lag1, "candidates": candidates,
            "rule_of_thumb": rule, "mixing_level": mixing, "restart_sigma": chosen,
            "lag1": check.lag1, "agreement": agreement, "diverged": int(lost.sum())}


@torch.no_grad()
def choose_denoiser(sampler: DLGSampler, candidates: list[dict[str, Any]], seed: int | None) -> dict[str, Any]:
    """Set the sampler's denoiser to the candidate (settings of ``DENOISER_KEYS``, and ``tweedie_sigma``: where its
    ramp ends, ``RAMP_ENDS``) whose outputs land closest to a teacher's: ``CHECK_CHAINS`` warmed-up chains not used
    by the fit (the last ones) are lifted to ``restart_sigma``, solved by the fit's teacher on ``CHECK_GRID`` levels
    down to the run's ``tweedie_sigma`` and by each candidate at the sampler's evaluations per output (its ``steps``:
    one more where its first step is the chains' Gaussian); the median over chains of the RMS distance (relative to
    the data scale) decides, robust to the odd chain that changes mode. Counted as ``pilot``; returns each
    candidate's distance and steps, and the choice."""
    chains = torch.arange(max(0, sampler.num_chains - CHECK_CHAINS), sampler.num_chains, device=sampler.device)
    g = torch.Generator(sampler.device).manual_seed(CHECK_SEED_OFFSET + (0 if seed is None else seed))
    lifted, level = sampler._lift(chains, g)
    phase, sampler.score.phase = sampler.score.phase, "pilot"
    before = sampler._counts["pilot"]
    try:
        states, _ = teacher_trajectory(sampler.score, lifted, candidate_grid(sampler.restart_sigma,
                                                                              sampler.tweedie_sigma, CHECK_GRID))
    finally:
        sampler.score.phase = phase
    scale = _data_scale(sampler.x)
    # Each candidate at the sampler's evaluations per output: one step more where its first is the Gaussian's.
    cost = _evaluations_per_output(sampler)
    steps = [steps_for_nfe(c["integrator"], cost + bool(c.get("gaussian_first_step")), dlg=True,
                           final_step=c.get("final_step", FINAL_STEP)) for c in candidates]
    keys = sorted({k for c in candidates for k in c})  # a key a candidate leaves out is unset for it (a ramp)

    def use(candidate: dict[str, Any], k: int) -> None:
        for key in keys:
            setattr(sampler, key, candidate.get(key, False if key == "gaussian_first_step" else None))
        sampler.denoise_steps = k

    distances = []
    for candidate, k in zip(candidates, steps):
        use(candidate, k)
        out = sampler._denoise(lifted, level, g, phases=("pilot", "pilot"), first_step=True)
        distances.append(float((out - states[-1]).flatten(1).pow(2).mean(1).sqrt().median()) / scale)
    best = min(range(len(candidates)), key=distances.__getitem__)
    use(candidates[best], steps[best])
    return {"candidates": candidates, "distances": distances, "chosen": candidates[best], "steps": steps,
            "chains": len(chains), "evaluations": sampler._counts["pilot"] - before}


def _evaluations_per_output(sampler: DLGSampler) -> int:
    """Model evaluations of one output of the sampler's denoiser (a core integrator's; none for a first step from the
    chains' Gaussian): what each of :func:`choose_denoiser`'s candidates is given."""
    return count_nfe(sampler.integrator, sampler.denoise_steps, dlg=True,
                     final_step=sampler.final_step) - sampler._gaussian_first()


def _pilot_cost(sampler: DLGSampler) -> int:
    """Model evaluations of one pilot chain (:func:`_pilot`: one move at the top of the ladder, one per level, the
    check at the chosen level and the agreement's twice-as-fine denoising)."""
    dlg = isinstance(sampler.integrator, str)
    per_output = count_nfe(sampler.integrator, sampler.denoise_steps, dlg=dlg)
    ladder = _ladder(1.0, float("inf"))
    return (len(ladder) + 2) * per_output + count_nfe(sampler.integrator, 2 * sampler.denoise_steps, dlg=dlg)


def choose_level(candidates: list[dict[str, Any]], rule: float, sigma_max: float, target_lag1: float = TARGET_LAG1
                 ) -> tuple[float | None, float | None, float]:
    """The restart level from the pilot's ladder: ``(s_eff, mixing level, chosen level)``.

    ``candidates``: ``{"restart_sigma": S, "lag1": r, "diverged": k}`` per ladder level. The noisy single-move
    estimates are pooled through ``r(S) = s_eff / sqrt(s_eff^2 + S^2)``, the lag-1 autocorrelation of an exact
    restart move on Gaussian data of scale ``s_eff`` (measured to fit the digits model within 5% for S from 3 to
    40): each gives ``s_eff = S r / sqrt(1 - r^2)``, weighted by its precision ``(r (1 - r^2))^2``. The mixing level
    is where the fitted curve reaches ``target_lag1``; the chosen level is ``rule`` (the rule of thumb the warm-up
    sets, ``RESTART_SCALE`` x the data scale) or, where the model's chains would not mix at it, the mixing level
    (at most ``sigma_max``).
    Aiming at the mixing level itself picks lower levels that score worse on digits (FD 1.06 / 0.89 against 1.02 /
    0.86 at 10 / 12 NFE, 7 seeds; docs/design.md).
    """
    fits = [(math.log(c["restart_sigma"] * c["lag1"] / math.sqrt(1 - c["lag1"] ** 2)),
             (c["lag1"] * (1 - c["lag1"] ** 2)) ** 2)
            for c in candidates if c["lag1"] is not None and 0.02 < c["lag1"] < 0.98 and not c["diverged"]]
    if not fits:  # no usable estimate: the rule of thumb
        return None, None, rule
    s_eff = math.exp(sum(v * w for v, w in fits) / sum(w for _, w in fits))
    mixing = min(s_eff * math.sqrt(1 / target_lag1**2 - 1), sigma_max)
    return s_eff, mixing, max(rule, mixing)


def _ladder(scale: float, sigma_max: float) -> list[float]:
    """Candidate restart levels: ``RESTART_LADDER`` times ``scale``, inside the model's range."""
    ladder = [c * scale for c in RESTART_LADDER if c * scale < sigma_max]
    return ladder or [sigma_max]


def _restart(sampler: DLGSampler, x: torch.Tensor, level: float, steps: int, seed: int) -> torch.Tensor:
    """One restart move of clean states ``x [P, *shape]``: lift to ``level`` exactly (noise seeded by ``seed``),
    then the sampler's own denoising in ``steps`` steps, counted as ``pilot``."""
    g = torch.Generator(x.device).manual_seed(seed)
    lifted = x + level * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    S = torch.full((len(x),), level, device=x.device, dtype=x.dtype)
    return sampler._denoise(lifted, S, g, phases=("pilot", "pilot"), steps=steps)
