"""Peak memory and time of `semiseg pseudo-label` over a whole set, against what holding
every probability map in memory would take.

Each generator runs in a fresh process (so its peak resident memory is its own) on every
image of the chosen split list, with a trained checkpoint as the teacher:

    python benchmarks/pseudo_label_memory.py CHECKPOINT \
        --lists splits/camvid/1_8/labeled.txt splits/camvid/1_8/unlabeled.txt   # all 367 train images

prints a table: method, images, pixels, seconds, peak RSS (MiB), and the size of the
probability maps (C x pixels x float32) a non-streaming generator would hold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
from semiseg.offline.label_set import GeneratorSpec, pseudo_label_checkpoint
ckpt, out, method, unlabeled, root = sys.argv[1:6]
spec = GeneratorSpec(method=method, alpha=0.2)
stats, names = pseudo_label_checkpoint(ckpt, out, spec, unlabeled=unlabeled, data_root=root or None,
                                       device="cpu", progress=False)
stats["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
stats["num_classes"] = len(names)
print(json.dumps(stats))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument(
        "--lists",
        nargs="+",
        required=True,
        help="split lists of the images to label (concatenated)",
    )
    parser.add_argument(
        "--data-root", default="", help="dataset folder (default: the checkpoint's)"
    )
    parser.add_argument("--methods", nargs="+", default=["dars", "da", "cbst", "st"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.txt"
        images.write_text("".join(Path(p).read_text() for p in args.lists))
        for method in args.methods:
            out = Path(tmp) / method
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                args.checkpoint,
                str(out),
                method,
                str(images),
                args.data_root,
            ]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True)
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            in_memory = stats["pixels"] * stats["num_classes"] * 4 / 2**20
            rows.append(
                (
                    method,
                    stats["images"],
                    stats["pixels"],
                    stats["seconds"],
                    stats["peak_rss_mib"],
                    in_memory,
                )
            )
    print(
        "| method | images | pixels | seconds | peak RSS (MiB) | all probability maps, float32 (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for method, images, pixels, seconds, peak, in_memory in rows:
        print(f"| {method} | {images} | {pixels} | {seconds:.1f} | {peak:.0f} | {in_memory:.0f} |")


if __name__ == "__main__":
    main()
