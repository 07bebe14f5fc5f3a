"""Sample the shipped digits model with DLG through the library API, and compare with vanilla DPM-Solver++ 2M at the
same total cost.

    python examples/sample_digits.py --n 500 --nfe 10 --out digits_dlg.png

``DLGSampler.for_budget`` picks the chains (n / 20; more below n = 2000, to fill the model's calls), the denoising
steps and the restart level for a budget of
``--nfe`` model evaluations per sample, everything counted (warm-up and pilot included).
"""

import argparse

import torch
from diffusers import DDPMPipeline

from dlg_sampler import DLGSampler, NoiseClassifier, integrate
from dlg_sampler.adapters import from_pipeline
from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.digits import CLASSIFIER_DIR, PIPELINE_DIR, DigitsEvaluator
from dlg_sampler.images import image_grid

#: The core integrator DLG is compared with: DPM-Solver++ 2M.
VANILLA = "dpmpp_2m"

parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
parser.add_argument("--n", type=int, default=500, help="samples to draw (and to score)")
parser.add_argument("--nfe", type=int, default=10, help="model evaluations per sample, everything counted")
parser.add_argument("--out", default="digits_dlg.png", help="image grid of the DLG samples")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)           # a plain diffusers pipeline folder
score = from_pipeline(pipe)                                # VP UNet (eps-prediction) -> VE score
classifier = NoiseClassifier.from_pretrained(CLASSIFIER_DIR)
sampler = DLGSampler.for_budget(score, classifier, shape=(1, 8, 8), nfe=args.nfe, n=args.n, seed=0)
x = sampler.sample(args.n).clamp(-1, 1)                    # [n, 1, 8, 8], clamped like the vanilla samples below
st = sampler.stats
evaluator = DigitsEvaluator()
print(f"DLG {st['kernel']} kernel, S {st['restart_sigma']:.3g}, {st['chains']} chains: NFE per sample "
      f"{st['nfe_per_sample']:.2f} in total", {k: round(v, 2) for k, v in st["nfe_split"].items()},
      f"lag-1 {st['lag1_autocorr']:.2f}",
      {k: round(v, 3) for k, v in evaluator.evaluate(x).items() if k in ("fd", "coverage", "entropy")})

steps = int(st["nfe_per_sample"])                          # the most steps that fit DLG's whole cost
x_vanilla, nfe = integrate(VANILLA, score, score.sigma_max * torch.randn(args.n, 1, 8, 8), score.sigma_max, steps)
print(f"vanilla {VANILLA} (DPM-Solver++ 2M), {nfe} NFE",
      {k: round(v, 3) for k, v in evaluator.evaluate(x_vanilla.clamp(-1, 1)).items()
       if k in ("fd", "coverage", "entropy")})

image_grid(x).save(args.out)                              # square-ish, padded, tiles upscaled to 64 px
print("wrote", args.out)
