"""Find images that differ from the rest of their dataset in size, channels or bit depth.

Every image is resized, expanded to the configured channels and scaled to 8 bits, so an odd one
never fails; it is silently upscaled (a 10x10 thumbnail among 256 px images), colour-converted
(a CMYK JPEG) or re-scaled (a 16-bit image among 8-bit ones) and then scored as an anomaly or
trained on as a normal. This check names each one (a warning, or an error with data.strict).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from ad_lightning.data.folder import BadFile, DataLayoutError
from ad_lightning.data.io import ImageInfo

#: a size held by at least this share of the images is "the" size; every other size is odd
DOMINANT_SHARE = 0.5
#: when sizes vary (no dominant size), a side this many times off the median side is odd
SIZE_FACTOR = 2.0


@dataclass(frozen=True)
class OddImage:
    path: Path
    why: str  # what differs, and from what

    def record(self) -> dict[str, str]:
        """The entry of results.json's data.odd_images."""
        return {"path": str(self.path), "why": self.why}


def majority(values: list[str]) -> tuple[str, int]:
    """The most common value and how many hold it."""
    return Counter(values).most_common(1)[0]


def far_off(side: float, mid: float) -> bool:
    """A side more than SIZE_FACTOR off the median side (the rule when sizes vary)."""
    return side * SIZE_FACTOR < mid or side > mid * SIZE_FACTOR


def _size_problems(infos: dict[Path, ImageInfo]) -> tuple[dict[Path, str], str]:
    """Sizes off the dominant size, or (when sizes vary, as in the magnetic tile set, where
    nothing dominates) sides more than SIZE_FACTOR off the median; and a note on the variety."""
    sizes = [i.size for i in infos.values()]
    size, count = majority(sizes)
    n = len(sizes)
    if count >= DOMINANT_SHARE * n:
        return {
            p: f"{i.size} px, majority {size} ({count} of {n} images)"
            for p, i in infos.items()
            if i.size != size
        }, ""
    mw = median(i.width for i in infos.values())
    mh = median(i.height for i in infos.values())
    odd = {
        p: f"{i.size} px, far from the median {mw:g}x{mh:g} (sizes vary in this dataset)"
        for p, i in infos.items()
        if far_off(i.width, mw) or far_off(i.height, mh)
    }
    note = f"image sizes vary: {len(set(sizes))} sizes among {n} images (median {mw:g}x{mh:g})"
    return odd, note


def find_odd_images(infos: dict[Path, ImageInfo]) -> tuple[list[OddImage], str]:
    """Images whose size, mode (channels) or bit depth is not the dataset's majority, or that
    a viewer shows rotated or mirrored (EXIF orientation); and a note when sizes vary with no
    majority (then only far-off sizes are listed)."""
    if not infos:
        return [], ""
    problems: dict[Path, list[str]] = {p: [] for p in infos}
    sizes, note = _size_problems(infos)
    for path, why in sizes.items():
        problems[path].append(why)
    n = len(infos)
    mode, n_mode = majority([i.mode for i in infos.values()])
    bits, n_bits = majority([str(i.bits) for i in infos.values()])
    for path, info in infos.items():
        if info.mode != mode:
            problems[path].append(f"mode {info.mode}, majority {mode} ({n_mode} of {n} images)")
        if str(info.bits) != bits:
            problems[path].append(f"{info.bits}-bit, majority {bits}-bit ({n_bits} of {n} images)")
        if info.orientation != 1:  # whatever the majority: a viewer shows it otherwise
            problems[path].append(
                f"EXIF orientation {info.orientation}: read as stored, not rotated or mirrored "
                "as a viewer shows it (a mask drawn on the viewer's picture would not match)"
            )
    odd = [OddImage(p, "; ".join(w)) for p, w in sorted(problems.items()) if w]
    return odd, note


def odd_images_note(odd: list[OddImage], where: Path) -> str:
    """One human line for results.json's warnings."""
    if not odd:
        return ""
    first = f"{odd[0].path.name}: {odd[0].why}"
    return (
        f"{len(odd)} images of {where} differ from the majority in size, mode or bit depth, "
        "carry an EXIF orientation, or have a mask that marks no or every pixel "
        f"(first: {first}); see data.odd_images, or set data.strict=true to stop on them"
    )


def strict_error(bad: list[BadFile], odd: list[OddImage], where: Path) -> DataLayoutError:
    """data.strict=true: one error naming every unreadable and every odd file, before training."""
    lines = [f"  - {b.problem}" for b in bad] + [f"  - {o.path}: {o.why}" for o in odd]
    return DataLayoutError(
        f"data.strict=true: {len(bad)} bad and {len(odd)} odd files in {where} (every image is "
        "checked before training):\n" + "\n".join(lines) + "\nReplace or delete them (odd "
        "images: convert them to the majority's size, mode and bit depth), or set "
        "data.strict=false to train with odd images (listed in results.json under "
        "data.odd_images) and data.skip_bad=true to leave bad files out."
    )
