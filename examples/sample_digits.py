"""Sample the shipped digits model with DLG through the library API, and compare with vanilla Karras Heun.

    python examples/sample_digits.py --n 500 --out digits_dlg.png
"""

import argparse

import torch
from diffusers import DDPMPipeline

from dlg_sampler import DLGSampler, NoiseClassifier, integrate
from dlg_sampler.adapters import from_pipeline
from dlg_sampler.digits import CLASSIFIER_DIR, PIPELINE_DIR, DigitsEvaluator
from dlg_sampler.images import image_grid

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=500)
parser.add_argument("--out", default="digits_dlg.png")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)           # a plain diffusers pipeline folder
score = from_pipeline(pipe)                                # VP UNet (eps-prediction) -> VE score
classifier = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
sampler = DLGSampler(score, classifier, classifier.levels, shape=(1, 8, 8), num_chains=args.n,
                     integrator="karras_heun", denoise_steps=3, gibbs_steps=2, step_size=0.1, seed=0)
x = sampler.sample(args.n)                                 # [n, 1, 8, 8] in [-1, 1]
evaluator = DigitsEvaluator()
print("DLG", sampler.stats["nfe_per_sample"], {k: round(v, 3) for k, v in evaluator.evaluate(x).items()
                                               if k in ("fd", "coverage", "entropy")})

x_vanilla, nfe = integrate("karras_heun", score, score.sigma_max * torch.randn(args.n, 1, 8, 8), score.sigma_max, 5)
print(f"vanilla Karras Heun, {nfe} NFE", {k: round(v, 3) for k, v in evaluator.evaluate(x_vanilla).items()
                                          if k in ("fd", "coverage", "entropy")})

image_grid(x).save(args.out)                              # square-ish, padded, tiles upscaled to 64 px
print("wrote", args.out)
