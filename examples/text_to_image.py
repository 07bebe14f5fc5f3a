"""DLG for a Stable-Diffusion-style pipeline (text encoder, classifier-free guidance, VAE): ``DLGPipeline``.

    dlg-train-classifier --from-model runwayml/stable-diffusion-v1-5 --prompts prompts.txt --guidance-scale 7.5 \
        --out sd15-classifier
    python examples/text_to_image.py --model runwayml/stable-diffusion-v1-5 --classifier sd15-classifier \
        --prompt "a photo of a cat" --guidance-scale 7.5 --steps 12

The classifier works on the model's latents (``[4, 64, 64]`` for SD 1.5 at 512 px). No such classifier is
published: the first command trains one from the model alone, sampling it with your prompts (one per line) and
guidance scale, as you will sample it. Chains persist per prompt; the images are saved as one grid.
"""

import argparse
import sys

from diffusers import StableDiffusionPipeline

from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.hub import pipeline_access, pipeline_error
from dlg_sampler.images import image_grid
from dlg_sampler.models import load_classifier
from dlg_sampler.pipelines import DLGPipeline

parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
parser.add_argument("--model", required=True, help="diffusers folder or Hub id")
parser.add_argument("--classifier", required=True, help="latent NoiseClassifier folder or Hub id")
parser.add_argument("--prompt", default="a photo of a cat", help="the text prompt")
parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
parser.add_argument("--steps", type=int, default=12, help="num_inference_steps: guided model calls per image")
parser.add_argument("--n", type=int, default=2, help="images for the prompt")
parser.add_argument("--chains", type=int, default=8, help="DLG chains (per prompt)")
parser.add_argument("--out", default="text_to_image.png", help="image grid")
args = parser.parse_args()

try:  # offline, not cached, no such folder, a damaged classifier: one line naming the fix, not a traceback
    classifier = load_classifier(args.classifier)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, **pipeline_access(args.model))
except ValueError as err:
    sys.exit(f"error: {err}")
except OSError as err:
    sys.exit(f"error: {pipeline_error(args.model, err)}")
dlg = DLGPipeline.from_pipe(pipe, classifier=classifier, num_chains=args.chains)
images = dlg(args.prompt, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
             num_images_per_prompt=args.n).images
image_grid(images).save(args.out)
print(f"wrote {args.out}; NFE per image {dlg.stats['nfe_per_sample']:.2f} in total (guided evaluations, the chains' "
      "warm-up included)")
