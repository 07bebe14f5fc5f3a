"""DLG warm-starts any diffusers scheduler: the chains' low-noise states are finished by DPM-Solver++ (or any
scheduler of ``dlg_sampler.schedulers.supported_schedulers()``) configured from the pipeline's own scheduler.

    python examples/warm_start_scheduler.py --scheduler DPMSolverMultistepScheduler --n 500
"""

import argparse

import diffusers
import torch
from diffusers import DDPMPipeline

from dlg_sampler import DLGSampler, NoiseClassifier, integrate
from dlg_sampler.adapters import from_pipeline
from dlg_sampler.digits import CLASSIFIER_DIR, PIPELINE_DIR, DigitsEvaluator

parser = argparse.ArgumentParser()
parser.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
parser.add_argument("--steps", type=int, default=5, help="scheduler steps after the Gibbs steps")
parser.add_argument("--n", type=int, default=500)
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)
score = from_pipeline(pipe)
scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
classifier = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
sampler = DLGSampler(score, classifier, classifier.levels, shape=(1, 8, 8), num_chains=args.n,
                     integrator=scheduler, denoise_steps=args.steps, gibbs_steps=2, step_size=0.1, seed=0)
x = sampler.sample(args.n)
evaluator = DigitsEvaluator()
nfe = sampler.stats["nfe_per_sample"]
print(f"DLG + {args.scheduler}: NFE {nfe['total']:.1f}, FD {evaluator.evaluate(x)['fd']:.3f}")

# The same scheduler alone from pure noise, at the same NFE, through the same one-signature call ("trailing"
# spacing: its own schedule must start at the top level, where pure noise lives).
alone = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
x0, used = integrate(alone, score, score.sigma_max * torch.randn(args.n, 1, 8, 8), score.sigma_max,
                     round(nfe["total"]))
print(f"{args.scheduler} alone: NFE {used}, FD {evaluator.evaluate(x0)['fd']:.3f}")
