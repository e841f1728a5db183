"""Per-step cost of each pseudo-label policy relative to FixMatch's fixed threshold.

One FixMatch training step (forward, backward, SGD step) of the CamVid CPU preset's model
(DeepLabV3+ EfficientNet-Lite0 with the preset's decoder, memory layout and precision, batch
8 + 8 unlabeled + 8 CutMix source, crop 192) is timed with each policy. Policies are interleaved round by round so drift of this noisy
machine hits them all alike; the table gives the median step time and its ratio to the
threshold policy, and the policy's own time (update + labelling) measured alone, which
is the overhead free of step-to-step noise.

    python benchmarks/policy_overhead.py --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from synthetic_batches import make_batches

from semiseg.config import config_from_dict, load_config
from semiseg.engine import optimizer_step
from semiseg.models import build_model
from semiseg.precision import autocast_dtype, describe
from semiseg.pseudo import CrossEntropyLoss, build_policy
from semiseg.schemes import FixMatchScheme, Teaching

PRESET = (
    Path(__file__).resolve().parents[1]
    / "configs"
    / "fixmatch_deeplabv3plus-effl0_camvid-1_8_cpu.yaml"
)

POLICIES = {
    "threshold (FixMatch)": ("threshold", {"threshold": 0.95}),
    "pseudo_label": ("pseudo_label", {}),
    "ael": ("ael", {}),
    "daw (DAWF)": ("daw", {"align": False}),
    "daw (DAWF + DA)": ("daw", {"align": True}),
    "daw official": ("daw", {"variant": "official"}),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--preset",
        default=str(PRESET),
        help="config whose model, train.channels_last and train.amp are timed",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_classes = 11
    generator = torch.Generator().manual_seed(0)
    labeled, unlabeled, mix = make_batches(args.batch, args.crop, num_classes, generator)
    preset = load_config(args.preset)
    cfg = config_from_dict({"data": {"root": "-", "labeled": "-"}, "scheme": {"name": "fixmatch"}})
    model = build_model(
        "deeplabv3plus",
        "efficientnet_lite0",
        num_classes,
        pretrained="imagenet",
        decoder=preset.model.decoder,
        decoder_channels=preset.model.decoder_channels,
    )
    if preset.train.channels_last:
        model.to_channels_last()
    dtype = autocast_dtype(preset.train.amp, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    schemes = {
        label: FixMatchScheme(
            cfg,
            {"student": model},
            num_classes,
            Teaching(build_policy(name, num_classes, **options), CrossEntropyLoss()),
        )
        for label, (name, options) in POLICIES.items()
    }

    def step(scheme: FixMatchScheme) -> float:
        start = time.perf_counter()
        optimizer_step(
            scheme, optimizer, scaler, (labeled, unlabeled, mix), 0, torch.device("cpu"), dtype
        )
        return time.perf_counter() - start

    for scheme in schemes.values():
        step(scheme)  # warm-up: allocator, one-off initialisation
    times: dict[str, list[float]] = {label: [] for label in schemes}
    for _ in range(args.rounds):
        for label, scheme in schemes.items():
            times[label].append(step(scheme))

    probs = torch.randn(
        2 * args.batch, num_classes, args.crop, args.crop, generator=generator
    ).softmax(1)
    valid = torch.ones(2 * args.batch, args.crop, args.crop, dtype=torch.bool)
    labeled_probs = probs[: args.batch]
    policy_ms = {}
    for label, (name, options) in POLICIES.items():
        policy = build_policy(name, num_classes, **options)
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            policy.update(labeled_probs, labeled["mask"])
            policy(probs, valid)
            runs.append(time.perf_counter() - start)
        policy_ms[label] = 1000 * statistics.median(runs)

    base = statistics.median(times["threshold (FixMatch)"])
    print(
        f"FixMatch step, batch {args.batch}+{args.batch}+{args.batch}, crop {args.crop}, {args.threads} threads, "
        f"{args.rounds} rounds; model of {Path(args.preset).name}: decoder {preset.model.decoder} "
        f"{preset.model.decoder_channels}, {describe(dtype)}{', channels-last' if preset.train.channels_last else ''}"
    )
    print(
        "| policy | step median (s) | ratio to threshold | policy alone (ms) | policy alone / threshold step |"
    )
    print("|---|---:|---:|---:|---:|")
    for label in schemes:
        median = statistics.median(times[label])
        print(
            f"| {label} | {median:.3f} | {median / base:.3f} | {policy_ms[label]:.1f} "
            f"| {100 * policy_ms[label] / 1000 / base:.2f} % |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
