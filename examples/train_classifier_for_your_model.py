"""Train a noise classifier for your own diffusers model on a folder of its training images (library API).

    python examples/train_classifier_for_your_model.py --model path/or/hub-id --data images/ --out my-classifier

The grid spans the model's trained sigma range; the sample shape is the model's. ``--model digits --data digits``
(the defaults) train one for the shipped digits model on its training split. The command-line equivalent is
``dlg-train-classifier --model MODEL --data FOLDER --out FOLDER`` (resumable, accelerate-ready).
"""

import argparse
import sys

from dlg_sampler import NoiseClassifier
from dlg_sampler.classifier import train_noise_classifier
from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.digits import PIPELINE_DIR, load_digits_data
from dlg_sampler.models import load_images, load_model

parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
parser.add_argument("--model", default="digits", help="diffusers folder or Hub id ('digits': the shipped model)")
parser.add_argument("--data", default="digits",
                    help="folder of the model's training images ('digits': the shipped model's training split)")
parser.add_argument("--steps", type=int, default=3000, help="training steps")
parser.add_argument("--out", required=True, help="folder the classifier is saved to (checkpoints in OUT/checkpoints)")
args = parser.parse_args()

try:  # no such model or folder, offline, unreadable images: one line naming the fix, not a traceback
    model = load_model(str(PIPELINE_DIR) if args.model == "digits" else args.model)
    channels, height, width = model.shape
    images = load_digits_data("train") if args.data == "digits" else \
        load_images(args.data, size=height, channels=channels)                 # [N, C, H, W] in [-1, 1]
except ValueError as err:
    sys.exit(f"error: {err}")
if tuple(images.shape[1:]) != model.shape:
    sys.exit(f"error: --data {args.data} holds images of shape {list(images.shape[1:])}, the model samples "
             f"{list(model.shape)}: pass the model's own training images.")
classifier = NoiseClassifier(model.sigma_min, model.sigma_max, 1000, sample_shape=model.shape)
metrics = train_noise_classifier(classifier, images, steps=args.steps, checkpoint_dir=f"{args.out}/checkpoints")
classifier.save_pretrained(args.out)                                     # or classifier.push_to_hub("you/name")
print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, "->", args.out)
