"""Training-step speed of every scheme under each precision / memory layout / decoder setting.

Whole steps (forward, backward, SGD, teacher and EMA updates) of DeepLabV3+ on the
ImageNet-pretrained EfficientNet-Lite0 (CamVid's 11 classes) on fixed random batches, through
the engine's own step (`semiseg.engine.optimizer_step`) and schemes built as the trainer
builds them. Every (setting, scheme) pair steps once per round, round after round, so drift of
a noisy machine hits them alike; the table gives each median step time and its ratio to the
same scheme under the first setting (fp32, contiguous, standard decoder: semiseg's default
before mixed precision). Also the model's FLOPs per image and, with `--camvid`, `semiseg
train`'s real iteration rate on CamVid (data loading included) and the share of a step spent
waiting for data, per scheme and number of loader workers.

    python benchmarks/step_speed.py                       # CPU, every scheme and setting
    python benchmarks/step_speed.py --camvid ../shared/data/camvid
    python benchmarks/step_speed.py --device cuda --batch 8 --crop 321   # a GPU, unchanged
    python benchmarks/step_speed.py --compile --schemes supervised unimatch --settings fp32 default
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from synthetic_batches import make_batches
from torch.utils.flop_counter import FlopCounterMode

from semiseg.config import config_from_dict, load_config
from semiseg.engine import build_scheme, optimizer_step
from semiseg.metrics_log import read_metrics
from semiseg.models import build_model
from semiseg.precision import autocast_dtype, describe
from semiseg.run_folder import RunFolder
from semiseg.schemes import SCHEMES, Scheme

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 11

SCHEMES_TIMED = {
    "supervised": {"scheme": {"name": "supervised"}},
    "fixmatch": {"scheme": {"name": "fixmatch"}, "policy": {"name": "threshold"}},
    "unimatch": {"scheme": {"name": "unimatch"}, "policy": {"name": "threshold"}},
    "unimatch+daw": {"scheme": {"name": "unimatch"}, "policy": {"name": "daw"}},
    "cps": {"scheme": {"name": "cps"}, "policy": {"name": "pseudo_label"}},
    "stpg": {"scheme": {"name": "stpg", "match_after": 0}, "policy": {"name": "pseudo_label"}},
}

# train.amp, train.channels_last, model.decoder, model.decoder_channels
SETTINGS = {
    "fp32": ("off", False, "standard", 256),
    "channels_last": ("off", True, "standard", 256),
    "bf16": ("bf16", False, "standard", 256),
    "bf16+channels_last": ("bf16", True, "standard", 256),
    "default": ("auto", True, "standard", 256),
    "light-256": ("auto", True, "light", 256),
    "light-128": ("auto", True, "light", 128),
    "standard-128": ("auto", True, "standard", 128),
}


def method_config(scheme: str, setting: str) -> dict:
    amp, channels_last, decoder, channels = SETTINGS[setting]
    return {
        "data": {"root": "-", "labeled": "-"},
        "model": {"decoder": decoder, "decoder_channels": channels},
        "train": {"amp": amp, "channels_last": channels_last},
        **SCHEMES_TIMED[scheme],
    }


class Runner:
    """One (setting, scheme): its networks, scheme and optimiser, stepping on fixed batches."""

    def __init__(self, scheme: str, setting: str, device: torch.device, compiled: bool):
        cfg = config_from_dict(method_config(scheme, setting))
        scheme_cls = SCHEMES.get(cfg.scheme.name)
        self.dtype = autocast_dtype(cfg.train.amp, device)
        self.device = device
        models = {}
        for k, name in enumerate(scheme_cls.model_names):
            torch.manual_seed(1000 * k)
            model = build_model(
                "deeplabv3plus",
                "efficientnet_lite0",
                NUM_CLASSES,
                pretrained="imagenet",
                projection_dim=scheme_cls.projection_dim(cfg.scheme),
                decoder=cfg.model.decoder,
                decoder_channels=cfg.model.decoder_channels,
            ).to(device)
            if cfg.train.channels_last:
                model.to_channels_last()
            models[name] = torch.compile(model) if compiled else model
        self.scheme: Scheme = build_scheme(cfg, models, NUM_CLASSES)
        self.optimizer = torch.optim.SGD(
            self.scheme.parameter_groups(1e-4, 10.0), lr=1e-4, momentum=0.9
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.scheme.train()
        self.iteration = 0

    def step(self, batches: tuple[dict, dict, dict]) -> float:
        sync(self.device)
        start = time.perf_counter()
        optimizer_step(
            self.scheme,
            self.optimizer,
            self.scaler,
            batches,
            self.iteration,
            self.device,
            self.dtype,
        )
        sync(self.device)
        self.iteration += 1
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gflops(setting: str, crop: int) -> float:
    """Forward GFLOPs of one image (a multiply-add is two FLOPs)."""
    _, _, decoder, channels = SETTINGS[setting]
    model = build_model(
        "deeplabv3plus",
        "efficientnet_lite0",
        NUM_CLASSES,
        decoder=decoder,
        decoder_channels=channels,
    ).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, crop, crop))
    return counter.get_total_flops() / 1e9


def time_steps(args: argparse.Namespace, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = tuple(
        {k: v.to(device) for k, v in b.items()}
        for b in make_batches(args.batch, args.crop, NUM_CLASSES, generator)
    )
    pairs = [(setting, scheme) for setting in args.settings for scheme in args.schemes]
    runners, compile_seconds = {}, {}
    for pair in pairs:
        runners[pair] = Runner(pair[1], pair[0], device, args.compile)
        start = time.perf_counter()
        runners[pair].step(batches)  # allocator, one-off initialisation, compilation
        compile_seconds[pair] = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            runners[pair].step(batches)
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(args.rounds):
        for pair in pairs:
            times[pair].append(runners[pair].step(batches))

    base = args.settings[0]
    print(
        f"Step time on {device}, batch {args.batch} labeled + {args.batch} unlabeled + {args.batch} CutMix source, "
        f"crop {args.crop}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up steps{', torch.compile' if args.compile else ''}; "
        f"autocast dtype of 'auto' here: {describe(autocast_dtype('auto', device))}"
    )
    print("\n| setting | GFLOPs / image | " + " | ".join(args.schemes) + " |")
    print("|---|---:|" + "---:|" * len(args.schemes))
    for setting in args.settings:
        cells = []
        for scheme in args.schemes:
            median = statistics.median(times[setting, scheme])
            ratio = statistics.median(times[base, scheme]) / median
            cells.append(f"{median:.3f} s ({ratio:.2f}x)")
        print(f"| {setting} | {gflops(setting, args.crop):.2f} | " + " | ".join(cells) + " |")
    print(
        f"\n(x: speed-up over `{base}`, the median step time of the same scheme divided by this one's.)"
    )
    if args.compile:
        print("\n| setting | " + " | ".join(f"{s} first step (s)" for s in args.schemes) + " |")
        print("|---|" + "---:|" * len(args.schemes))
        for setting in args.settings:
            print(
                f"| {setting} | "
                + " | ".join(f"{compile_seconds[setting, s]:.1f}" for s in args.schemes)
                + " |"
            )


CAMVID_PRESETS = {
    "supervised": "supervised_deeplabv3plus-effl0_camvid-1_8_cpu.yaml",
    "fixmatch": "fixmatch_deeplabv3plus-effl0_camvid-1_8_cpu.yaml",
    "unimatch": "unimatch_deeplabv3plus-effl0_camvid-1_8_cpu.yaml",
    "unimatch+daw": "unimatch-daw-da_deeplabv3plus-effl0_camvid-1_8_cpu.yaml",
    "cps": "cps_deeplabv3plus-effl0_camvid-1_8_cpu.yaml",
    "stpg": "stpg_deeplabv3plus-effl0_camvid-1_8_cpu.yaml",
}


def train_rates(args: argparse.Namespace) -> None:
    """`semiseg train` on CamVid: real seconds per iteration and the data-wait share."""
    val = Path(tempfile.mkdtemp()) / "val2.txt"
    val.write_text(
        "\n".join((REPO / "splits/camvid/1_8/val.txt").read_text().splitlines()[:2]) + "\n"
    )
    print(
        f"\n`semiseg train` on CamVid (the presets, {args.train_iterations} iterations, the median of the "
        "logged windows after the first): seconds per iteration and the share of it spent waiting for data"
    )
    print("\n| scheme | setting | " + " | ".join(f"workers {w}" for w in args.workers) + " |")
    print("|---|---|" + "---:|" * len(args.workers))
    for scheme in args.schemes:
        for setting in args.train_settings:
            amp, channels_last, decoder, channels = SETTINGS[setting]
            cells = []
            for workers in args.workers:
                cells.append(
                    train_rate(
                        args,
                        scheme,
                        workers,
                        val,
                        [
                            f"train.amp={amp}",
                            f"train.channels_last={str(channels_last).lower()}",
                            f"model.decoder={decoder}",
                            f"model.decoder_channels={channels}",
                        ],
                    )
                )
            print(f"| {scheme} | {setting} | " + " | ".join(cells) + " |")


def train_rate(
    args: argparse.Namespace, scheme: str, workers: int, val: Path, setting: list[str]
) -> str:
    from semiseg.training import train

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            *setting,
            f"data.root={args.camvid}",
            f"data.workers={workers}",
            f"data.val={val}",
            f"train.iterations={args.train_iterations}",
            f"train.eval_every={args.train_iterations}",
            "train.log_every=2",
            f"train.device={args.device}",
            f"output_dir={out}",
        ]
        train(load_config(REPO / "configs" / CAMVID_PRESETS[scheme], overrides), progress=False)
        logged = [r for r in read_metrics(RunFolder(out).metrics) if r["split"] == "train"][1:]
    sec = statistics.median(r["sec_per_iter"] for r in logged)
    share = statistics.median(r["data_wait_share"] for r in logged)
    return f"{sec:.2f} s/it, data {100 * share:.0f} %"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--schemes", nargs="+", default=list(SCHEMES_TIMED), choices=list(SCHEMES_TIMED)
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per configuration first (at least 1)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every network (reports the first step)",
    )
    parser.add_argument(
        "--camvid", help="also time `semiseg train` on this CamVid folder, data included"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-iterations", type=int, default=12)
    parser.add_argument(
        "--train-settings",
        nargs="+",
        default=["fp32", "default"],
        choices=list(SETTINGS),
        help="settings of the CamVid training rates (the presets' own decoder where the setting keeps it)",
    )
    parser.add_argument("--no-steps", action="store_true", help="only the CamVid training rates")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.no_steps:
        time_steps(args, device)
    if args.camvid:
        train_rates(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
