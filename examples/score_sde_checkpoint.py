"""DLG on a score_sde checkpoint (``checkpoint_*.pth`` with ``model``, ``ema``, ``step``; EMA weights preferred).

    python examples/score_sde_checkpoint.py --checkpoint checkpoint_26.pth --net my_models:build_ncsnpp \
        --sde vp --shape 3 32 32 --classifier cifar10-classifier --n 64

score_sde's network code is not a dependency: ``--net module:function`` builds the untrained network the
checkpoint's weights load into. The checkpoint is read with ``torch.load(weights_only=True)``; one that needs
pickle code execution is refused.
"""

import argparse
import sys

import torch

from dlg_sampler import DLGSampler
from dlg_sampler.cli.common import HelpFormatter
from dlg_sampler.models import load_classifier, load_model

parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
parser.add_argument("--checkpoint", required=True, help="score_sde checkpoint file (checkpoint_*.pth)")
parser.add_argument("--net", required=True, help="module:function building the network")
parser.add_argument("--sde", default="vp", choices=["vp", "subvp", "ve"],
                    help="the checkpoint's SDE (score_sde's training.sde)")
parser.add_argument("--shape", type=int, nargs="+", required=True, help="sample shape, e.g. 3 32 32")
parser.add_argument("--classifier", required=True, help="NoiseClassifier folder or Hub id for this model")
parser.add_argument("--n", type=int, default=64, help="samples to draw")
parser.add_argument("--nfe", type=int, default=10, help="model evaluations per sample, everything counted")
parser.add_argument("--out", default="score_sde_samples.pt", help="the samples, saved with torch.save")
args = parser.parse_args()

try:
    model = load_model(args.checkpoint, score_sde_net=args.net, sde=args.sde, shape=tuple(args.shape))
    classifier = load_classifier(args.classifier)
except ValueError as err:  # a missing or unreadable file, a --net that does not build the network: one line
    sys.exit(f"error: {err}")
sampler = DLGSampler.for_budget(model.score, classifier, shape=model.shape, nfe=args.nfe, n=args.n, seed=0)
x = sampler.sample(args.n)
print(f"{len(x)} samples {list(x.shape[1:])}, NFE per sample {sampler.stats['nfe_per_sample']:.2f} in total")

torch.save(x, args.out)
