"""DLG on a score_sde checkpoint (``checkpoint_*.pth`` with ``model``, ``ema``, ``step``; EMA weights preferred).

    python examples/score_sde_checkpoint.py --checkpoint checkpoint_26.pth --net my_models:build_ncsnpp \
        --sde vp --shape 3 32 32 --classifier cifar10-classifier --n 64

score_sde's network code is not a dependency: ``--net module:function`` builds the untrained network the
checkpoint's weights load into. The checkpoint is read with ``torch.load(weights_only=True)``; one that needs
pickle code execution is refused.
"""

import argparse

from dlg_sampler import DLGSampler
from dlg_sampler.models import load_classifier, load_model

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--net", required=True, help="module:function building the network")
parser.add_argument("--sde", default="vp", choices=["vp", "subvp", "ve"])
parser.add_argument("--shape", type=int, nargs="+", required=True)
parser.add_argument("--classifier", required=True)
parser.add_argument("--n", type=int, default=64)
parser.add_argument("--nfe", type=int, default=10, help="model evaluations per sample, everything counted")
parser.add_argument("--out", default="score_sde_samples.pt")
args = parser.parse_args()

model = load_model(args.checkpoint, score_sde_net=args.net, sde=args.sde, shape=tuple(args.shape))
classifier = load_classifier(args.classifier)
sampler = DLGSampler.for_budget(model.score, classifier, shape=model.shape, nfe=args.nfe, n=args.n, seed=0)
x = sampler.sample(args.n)
print(f"{len(x)} samples {list(x.shape[1:])}, NFE per sample {sampler.stats['nfe_per_sample']:.2f} in total")

import torch  # noqa: E402

torch.save(x, args.out)
