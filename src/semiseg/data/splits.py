"""UniMatch-style split lists: which samples are labeled, which unlabeled, which validate.

A list holds one sample a line, "IMAGE_PATH MASK_PATH" relative to the data root and
separated by one space (unlabeled lines may give only the image path). Blank lines and
lines starting with '#' are ignored. This is the format of the split files published
with UniMatch and the papers built on it (`splits/pascal/1_16/labeled.txt`, ...).
"""

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

from semiseg.data.formats import DataError, Sample
from semiseg.files import atomic_write_text


def resolve_list(path: str | Path, root: Path) -> Path:
    """Where a split list named in a config is: as given (absolute, or relative to the working
    directory) if it exists there, else under the data root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    under_root = root / candidate
    return under_root if under_root.exists() else candidate


def _resolve(root: Path, relative: str) -> Path:
    path = root / relative
    # DeepLab-style lists write '/JPEGImages/x.jpg', meaning relative to the root.
    if relative.startswith("/") and not path.exists() and (root / relative.lstrip("/")).exists():
        path = root / relative.lstrip("/")
    return path


def read_split(path: Path, root: Path, require_mask: bool) -> list[Sample]:
    """Samples listed in `path`, with paths resolved against `root`; every file must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list does not exist")
    root = Path(root).resolve()
    samples, problems = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_parse_line(line, f"{path}:{lineno}", root, require_mask))
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError(problem_report(f"{path}", problems, len(samples) + len(problems), "lines"))
    if not samples:
        raise DataError(f"{path}: split list has no samples")
    return samples


MAX_REPORTED_PROBLEMS = 10


def problem_report(where: str, problems: list[str], total: int, what: str = "samples") -> str:
    """One error message for many problems: the first ten, then how many more."""
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_REPORTED_PROBLEMS])
    rest = (
        f"\n  ... and {len(problems) - MAX_REPORTED_PROBLEMS} more"
        if len(problems) > MAX_REPORTED_PROBLEMS
        else ""
    )
    return f"{where}: {len(problems)} problem(s) in {total} {what}:\n{shown}{rest}"


def _parse_line(line: str, where: str, root: Path, require_mask: bool) -> Sample:
    fields = line.split()
    if len(fields) > 2:
        raise DataError(
            f"{where}: expected 'IMAGE_PATH [MASK_PATH]' but found {len(fields)} fields "
            "(paths containing spaces are not supported)"
        )
    if require_mask and len(fields) < 2:
        raise DataError(f"{where}: no mask path, but this list must be labeled")
    image = _resolve(root, fields[0])
    if not image.is_file():
        raise DataError(f"{where}: image {image} does not exist")
    mask = _resolve(root, fields[1]) if len(fields) == 2 else None
    if mask is not None and not mask.is_file():
        raise DataError(f"{where}: mask {mask} does not exist")
    return Sample(image, mask)


def _relative(path: Path, root: Path) -> str:
    text = Path(os.path.relpath(path, root)).as_posix()
    if any(ch.isspace() for ch in text):
        raise DataError(f"{path}: paths containing spaces cannot be written to a split list")
    return text


def write_split(path: Path, samples: Iterable[Sample], root: Path) -> None:
    """Write samples as a split list with paths relative to `root` (forward slashes)."""
    root = Path(root).resolve()
    lines = []
    for sample in samples:
        fields = [_relative(sample.image, root)]
        if sample.mask is not None:
            fields.append(_relative(sample.mask, root))
        lines.append(" ".join(fields) + "\n")
    atomic_write_text(path, "".join(lines))


def make_split(
    samples: list[Sample],
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (labeled, unlabeled) by a seeded shuffle of those with a mask.

    Give exactly one of `fraction` (0 < f <= 1; labeled = max(1, round(f * N))) or `count`
    (1..N), N the number of samples with a mask; samples without one (images a dataset
    has no mask for) are always unlabeled. Both parts keep the original order so the
    written lists stay readable.
    """
    if not samples:
        raise DataError("cannot split an empty sample list")
    masked = [i for i, s in enumerate(samples) if s.mask is not None]
    total = len(masked)
    if total == 0:
        raise DataError(f"none of the {len(samples)} samples has a mask: there is nothing to label")
    if (fraction is None) == (count is None):
        raise DataError("give exactly one of fraction or count")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * total))
    if isinstance(count, bool) or not isinstance(count, int | np.integer):
        raise DataError(f"count must be an integer, got {count!r}")
    if not 1 <= count <= total:
        raise DataError(f"count must be in 1..{total} (the samples with a mask), got {count}")
    chosen = np.random.default_rng(seed).permutation(total)[:count]
    is_labeled = np.zeros(len(samples), dtype=bool)
    is_labeled[np.array(masked)[chosen]] = True
    labeled = [s for s, flag in zip(samples, is_labeled, strict=True) if flag]
    unlabeled = [s for s, flag in zip(samples, is_labeled, strict=True) if not flag]
    return labeled, unlabeled


def parse_fraction(text: str) -> float:
    """'1/8', '1_8' (UniMatch folder names) or '0.125' -> 0.125; must lie in (0, 1]."""
    cleaned = text.strip().replace("_", "/")
    try:
        value = float(Fraction(cleaned))
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"cannot read {text!r} as a fraction (try '1/8', '1_8' or '0.125')"
        ) from None
    if not 0 < value <= 1:
        hint = (
            " (a whole number looks like a labeled count, e.g. UniMatch's '732')"
            if value > 1
            else ""
        )
        raise DataError(f"fraction {text!r} is not in (0, 1]{hint}")
    return value
