"""DLG inside a diffusers pipeline's own ``__call__``: swap the scheduler, keep the pipeline.

    python examples/drop_in_scheduler.py --batch-size 16 --steps 10

Works for DDPMPipeline, DDIMPipeline and ScoreSdeVePipeline; conditional / latent pipelines use
``DLGPipeline.from_pipe`` (see examples/text_to_image.py). ``num_inference_steps`` is the budget of model calls per
sample (the pipeline's first call, denoising, the Tweedie call); the chains' one-time warm-up comes on top and is
counted in ``.stats``.
"""

import argparse

from diffusers import DDPMPipeline

from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.digits import CLASSIFIER_DIR, PIPELINE_DIR
from dlg_sampler.images import image_grid
from dlg_sampler.pipelines import DLGScheduler

parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
parser.add_argument("--steps", type=int, default=10, help="num_inference_steps: model calls per sample")
parser.add_argument("--out", default="drop_in.png", help="image grid of the last call")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(PIPELINE_DIR)
pipe.scheduler = DLGScheduler.from_pipe(pipe, classifier=str(CLASSIFIER_DIR))
for call in range(2):  # the chains persist across calls: the warm-up is paid once
    images = pipe(batch_size=args.batch_size, num_inference_steps=args.steps).images
    st = pipe.scheduler.stats  # every model call so far, the warm-up and the pipeline's first calls included
    print(f"call {call}: {len(images)} images, NFE per sample {st['nfe_per_sample']:.2f} in total",
          {k: round(v, 2) for k, v in st["nfe_split"].items()})
image_grid(images).save(args.out)
# The saved folder holds the classifier too (dlg_scheduler/classifier, referenced relative to the folder), so it can
# be moved or pushed as it is. Reload: DLGScheduler.from_pretrained("dlg_scheduler").bind(pipe.unet); another
# classifier: DLGScheduler.from_pipe(pipe, classifier=...).
pipe.scheduler.save_pretrained("dlg_scheduler")
print("wrote", args.out, "and dlg_scheduler/")
