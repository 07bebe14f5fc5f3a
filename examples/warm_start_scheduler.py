"""DLG warm-starts any diffusers scheduler: each restart move's lifted state is denoised by DPM-Solver++ (or any
scheduler of ``dlg_sampler.schedulers.supported_schedulers()``) configured from the pipeline's own scheduler.

    python examples/warm_start_scheduler.py --scheduler DPMSolverMultistepScheduler --nfe 10 --n 500
"""

import argparse

import diffusers
import torch
from diffusers import DDPMPipeline

from dlg_sampler import DLGSampler, NoiseClassifier, integrate
from dlg_sampler.adapters import from_pipeline
from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.digits import CLASSIFIER_DIR, PIPELINE_DIR, DigitsEvaluator

parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
parser.add_argument("--scheduler", default="DPMSolverMultistepScheduler",
                    help="diffusers scheduler class that denoises each restart")
parser.add_argument("--nfe", type=int, default=10, help="model evaluations per sample, everything counted")
parser.add_argument("--n", type=int, default=500, help="samples to draw (and to score)")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)
score = from_pipeline(pipe)
scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
classifier = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
sampler = DLGSampler.for_budget(score, classifier, shape=(1, 8, 8), nfe=args.nfe, n=args.n, integrator=scheduler,
                                seed=0)
x = sampler.sample(args.n).clamp(-1, 1)
evaluator = DigitsEvaluator()
nfe = sampler.stats["nfe_per_sample"]  # every evaluation, the warm-up included, over the samples
print(f"DLG + {args.scheduler} ({sampler.denoise_steps} steps per output): NFE {nfe:.2f} in total, "
      f"FD {evaluator.evaluate(x)['fd']:.3f}")

# The same scheduler alone from pure noise, at the most steps that fit DLG's total, through the same one-signature
# call ("trailing" spacing: its own schedule must start at the top level, where pure noise lives).
alone = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
x0, used = integrate(alone, score, score.sigma_max * torch.randn(args.n, 1, 8, 8), score.sigma_max, int(nfe))
print(f"{args.scheduler} alone: NFE {used}, FD {evaluator.evaluate(x0.clamp(-1, 1))['fd']:.3f}")
