"""Per-step cost of a method relative to its baseline scheme, measured in one run.

Whole training steps (forward, backward, SGD step, teacher/EMA update) of the CamVid CPU
model (DeepLabV3+ EfficientNet-Lite0, 11 classes) on random inputs, built exactly as the
trainer builds them (config -> scheme, policy, projection heads). The configurations of one
comparison are interleaved round by round so drift of this noisy machine hits them alike;
the table gives the median step time and its ratio to the comparison's first row.

    python benchmarks/scheme_step_cost.py rankweight --rounds 8   # issue 6: vs UniMatch
    python benchmarks/scheme_step_cost.py stpg --rounds 8         # issue 7: vs mean teacher
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from synthetic_batches import make_batches

from semiseg.config import config_from_dict
from semiseg.engine import build_scheme
from semiseg.models import build_model
from semiseg.schemes import SCHEMES

NUM_CLASSES = 11
THINGS = [2, 6, 8, 9, 10]
"""CamVid's thing classes in the repository's class order (pole, sign, car, pedestrian,
bicyclist): the detector classes of the rank-weighting presets."""

COMPARISONS: dict[str, dict[str, dict]] = {
    "rankweight": {
        "unimatch (threshold 0.95)": {
            "scheme": {"name": "unimatch"},
            "policy": {"name": "threshold"},
        },
        "unimatch + PPW": {
            "scheme": {"name": "unimatch"},
            "policy": {"name": "rankweight", "rppi": False},
        },
        "unimatch + RPPI + PPW": {
            "scheme": {"name": "unimatch"},
            "policy": {"name": "rankweight", "rppi": True, "detector": {"classes": THINGS}},
        },
    },
    "stpg": {
        "mean teacher": {"scheme": {"name": "mean_teacher"}, "policy": {"name": "pseudo_label"}},
        "dual mean teacher (DM)": {
            "scheme": {"name": "stpg", "selection": "all", "lambda_ctr": 0.0},
            "policy": {"name": "pseudo_label"},
        },
        "DM + PS + DCL (STPG)": {
            "scheme": {"name": "stpg", "selection": "cons+hmis", "lambda_ctr": 0.1},
            "policy": {"name": "pseudo_label"},
        },
    },
}


class Runner:
    """One configuration's scheme and optimiser, stepping on fixed batches."""

    def __init__(self, sections: dict, weights: dict):
        cfg = config_from_dict({"data": {"root": "-", "labeled": "-"}, **sections})
        scheme_cls = SCHEMES.get(cfg.scheme.name)
        models = {}
        for name in scheme_cls.model_names:
            model = build_model(
                "deeplabv3plus",
                "efficientnet_lite0",
                NUM_CLASSES,
                pretrained=None,
                projection_dim=scheme_cls.projection_dim(cfg.scheme),
            )
            model.load_state_dict(weights, strict=False)
            models[name] = model
        self.scheme = build_scheme(cfg, models, NUM_CLASSES)
        self.optimizer = torch.optim.SGD(
            self.scheme.parameter_groups(1e-4, 10.0), lr=1e-4, momentum=0.9
        )
        self.scheme.train()
        self.iteration = 0

    def step(self, labeled: dict, unlabeled: dict, mix: dict) -> float:
        start = time.perf_counter()
        out = self.scheme.training_step(labeled, unlabeled, mix, self.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.scheme.after_optimizer_step(self.iteration)
        self.iteration += 1
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per configuration first"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    labeled, unlabeled, mix = make_batches(
        args.batch, args.crop, NUM_CLASSES, generator, len(THINGS)
    )
    # ImageNet weights so predictions, confidences and thus the policies' selections are
    # those of a real network rather than of a random one.
    weights = build_model(
        "deeplabv3plus", "efficientnet_lite0", NUM_CLASSES, pretrained="imagenet"
    ).state_dict()
    runners = {
        label: Runner(sections, weights) for label, sections in COMPARISONS[args.comparison].items()
    }
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(labeled, unlabeled, mix)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(args.rounds):
        for label, runner in runners.items():
            times[label].append(runner.step(labeled, unlabeled, mix))

    base_label = next(iter(runners))
    base = statistics.median(times[base_label])
    print(
        f"{args.comparison}: training step, batch {args.batch} labeled + {args.batch} unlabeled + "
        f"{args.batch} CutMix source, crop {args.crop}, {args.threads} threads, {args.rounds} rounds"
    )
    print(f"| configuration | step median (s) | min (s) | ratio to {base_label} |")
    print("|---|---:|---:|---:|")
    for label, runs in times.items():
        median = statistics.median(runs)
        print(f"| {label} | {median:.3f} | {min(runs):.3f} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
