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

from diffusers import StableDiffusionPipeline

from dlg_sampler.images import image_grid
from dlg_sampler.pipelines import DLGPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="diffusers folder or Hub id")
parser.add_argument("--classifier", required=True, help="latent NoiseClassifier folder or Hub id")
parser.add_argument("--prompt", default="a photo of a cat")
parser.add_argument("--guidance-scale", type=float, default=7.5)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--n", type=int, default=2)
parser.add_argument("--chains", type=int, default=8)
parser.add_argument("--out", default="text_to_image.png")
args = parser.parse_args()

pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
dlg = DLGPipeline.from_pipe(pipe, classifier=args.classifier, num_chains=args.chains)
images = dlg(args.prompt, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
             num_images_per_prompt=args.n).images
image_grid(images).save(args.out)
print(f"wrote {args.out}; NFE per image {dlg.stats['nfe_per_sample']:.2f} in total (guided evaluations, the chains' "
      "warm-up included)")
