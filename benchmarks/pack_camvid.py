"""Pack CamVid for the GPU machine: the images re-encoded as JPEG, the label PNGs as they are,
and the committed CamVid split lists rewritten to the packed names, in one folder small
enough to travel with the working tree (the device tool carries at most 64 MiB).

    python benchmarks/pack_camvid.py --root ../shared/data/camvid --out camvid_pack

The 468 source PNGs are 119 MiB; as JPEG at quality 92 they are about 30 MiB. The labels
stay lossless; the images lose a little (the GPU grid's table says so). The pack keeps the
CamVid layout (train/, trainannot/, val/, valannot/) and adds splits/<name>/*.txt for every
split of splits/camvid, so `data.root=camvid_pack data.labeled=camvid_pack/splits/1_16/
labeled.txt ...` reads it with the `camvid` format. Never commit the pack (it is ignored).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

LIMIT_MIB = 60


def packed_name(image: str) -> str:
    """The packed image's relative path for a source image's (train/a.png -> train/a.jpg)."""
    return str(Path(image).with_suffix(".jpg"))


def pack(root: Path, out: Path, splits: Path, quality: int) -> int:
    """Write the pack; return its size in bytes."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for images, labels in (("train", "trainannot"), ("val", "valannot")):
        (tmp / images).mkdir(parents=True)
        (tmp / labels).mkdir(parents=True)
        sources = sorted((root / images).glob("*.png"))
        if not sources:
            raise SystemExit(f"{root / images}: no PNG images (is --root a CamVid folder?)")
        for source in sources:
            with Image.open(source) as img:
                img.convert("RGB").save(
                    tmp / packed_name(f"{images}/{source.name}"), quality=quality
                )
            label = root / labels / source.name
            if not label.is_file():
                raise SystemExit(f"{label}: label image missing for {source}")
            shutil.copyfile(label, tmp / labels / source.name)
    for split in sorted(p for p in splits.iterdir() if p.is_dir()):
        (tmp / "splits" / split.name).mkdir(parents=True)
        for listing in sorted(split.glob("*.txt")):
            lines = []
            for line in listing.read_text().splitlines():
                parts = line.split()
                if parts:
                    lines.append(" ".join([packed_name(parts[0]), *parts[1:]]))
            (tmp / "splits" / split.name / listing.name).write_text("\n".join(lines) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/camvid"))
    parser.add_argument("--out", type=Path, default=Path("camvid_pack"))
    parser.add_argument("--splits", type=Path, default=Path("splits/camvid"))
    parser.add_argument("--quality", type=int, default=92)
    args = parser.parse_args()
    size = pack(args.root, args.out, args.splits, args.quality)
    print(f"{args.out}: {size / 2**20:.1f} MiB (JPEG quality {args.quality})")
    if size > LIMIT_MIB * 2**20:
        print(f"larger than {LIMIT_MIB} MiB: lower --quality", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
