"""Train a noise classifier for your own diffusers model on a folder of its training images (library API).

    python examples/train_classifier_for_your_model.py --model path/or/hub-id --data images/ --out my-classifier

The grid spans the model's trained sigma range; the sample shape is the model's. The command-line equivalent is
``dlg-train-classifier --model MODEL --data FOLDER --out FOLDER`` (resumable, accelerate-ready).
"""

import argparse

from dlg_sampler import NoiseClassifier
from dlg_sampler.classifier import train_noise_classifier
from dlg_sampler.models import load_images, load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--steps", type=int, default=3000)
parser.add_argument("--out", required=True)
args = parser.parse_args()

model = load_model(args.model)
channels, height, width = model.shape
images = load_images(args.data, size=height, channels=channels)          # [N, C, H, W] in [-1, 1]
classifier = NoiseClassifier(model.sigma_min, model.sigma_max, 1000, sample_shape=model.shape)
metrics = train_noise_classifier(classifier, images, steps=args.steps, checkpoint_dir=f"{args.out}/checkpoints")
classifier.save_pretrained(args.out)                                     # or classifier.push_to_hub("you/name")
print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, "->", args.out)
