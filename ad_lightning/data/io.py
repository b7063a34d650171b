"""Decode image and mask files into the arrays the pipeline uses, naming the file on failure.

High-bit images (16-bit PNG/TIFF, 32-bit integer or float TIFF) are scaled by one fixed range
for the whole dataset: the type's own (65535 for 16 bits) or `data.bit_depth`. Industrial
cameras carry absolute intensity in those bits; stretching each image to its own min/max would
make a dark defect and a bright normal part look alike.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: grayscale (or 16-bit / float grayscale, or palette), RGB, RGBA / CMYK: what read_image converts
IMAGE_BANDS = (1, 3, 4)
#: single-band modes wider than 8 bits, and the bit depth each holds when data.bit_depth is null
HIGH_BIT_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 16, "F": None}


#: the EXIF tag of how a viewer rotates or mirrors the stored pixels
EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """An image or mask could not be decoded; the message names the file."""


@dataclass(frozen=True)
class ImageInfo:
    """What an image file is before conversion: compared across a dataset to find odd ones."""

    width: int
    height: int
    mode: str  # PIL mode as stored (L, RGB, CMYK, I;16, ...)
    bits: int  # bits per sample as stored
    #: the EXIF orientation tag (1 = as stored); pixels are read as stored, never rotated
    orientation: int = 1

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, 1 when there is none or the EXIF block cannot be parsed (a
    broken EXIF block does not make pixels that decode unreadable)."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):
        return 1


def stored_bits(img: Image.Image) -> int:
    """Bits per sample of the file, from its header (PNG's 16-bit RGB decodes to 8-bit RGB)."""
    if img.mode == "1":
        return 1
    if img.mode in ("I", "F"):
        return 32
    if img.mode.startswith("I;16"):
        return 16
    rawmodes = []
    for tile in img.tile:  # PNG's args are the raw mode; libtiff's a tuple that starts with it
        args = getattr(tile, "args", None)
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str):
            rawmodes.append(raw)
    return 16 if any(";16" in r for r in rawmodes) else 8


#: what opening an image can raise beside OSError (Pillow's size guard is not an OSError)
OPEN_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)


def _open_error(path: Path, err: Exception) -> ImageReadError:
    if isinstance(err, Image.DecompressionBombError):
        why = (
            "it has more pixels than Pillow opens by default (PIL.Image.MAX_IMAGE_PIXELS); "
            "tile or downscale it first"
        )
    elif isinstance(err, UnidentifiedImageError):
        why = "it is not an image format PIL can read (wrong extension, or not an image)"
    elif isinstance(err, (SyntaxError, OSError)) and not isinstance(err, FileNotFoundError):
        why = "the file is corrupt, truncated or cannot be opened"
    else:
        why = "the file cannot be opened"
    return ImageReadError(
        f"cannot read image {path}: {err} ({why}); replace it or remove it from the dataset folder."
    )


def check_regular_file(path: Path) -> None:
    """A broken symlink, a symlink loop or a special file (FIFO: open would block) is named."""
    if not path.is_file():
        raise ImageReadError(
            f"cannot read image {path}: not a regular file (a broken symlink, a symlink loop or a "
            "special file); replace it or remove it from the dataset folder."
        )
    if path.stat().st_size == 0:
        raise ImageReadError(
            f"cannot read image {path}: the file is empty (0 bytes; an interrupted copy?); "
            "replace it or remove it from the dataset folder."
        )


def high_bit_to_uint8(img: Image.Image, path: Path, bit_depth: int | None) -> Image.Image:
    """A 16/32-bit or float single-band image -> 8-bit, scaled by the fixed range
    2**bit_depth - 1 (the same for every image); a pixel outside that range is an error."""
    bits = bit_depth or HIGH_BIT_MODES[img.mode]
    arr = np.asarray(img, dtype=np.float64)
    top = 1.0 if bits is None else float(2**bits - 1)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > top:
        where = f"data.bit_depth={bit_depth}" if bit_depth else f"mode {img.mode}'s default"
        raise ImageReadError(
            f"image {path} (mode {img.mode}) has pixel values {lo:g}..{hi:g} outside the fixed "
            f"range 0..{top:g} of {where}; set data.bit_depth to the camera's bit depth (e.g. 12 "
            "for 0..4095) so every image is scaled alike."
        )
    return Image.fromarray(np.round(arr * (255.0 / top)).astype(np.uint8), "L")


def high_bit_colour_to_uint8(path: Path, bit_depth: int | None) -> Image.Image:
    """A 16-bit RGB(A) file -> 8-bit RGB by the same fixed range as grayscale. Pillow decodes
    it to 8-bit RGB by keeping each sample's high byte, which reads a 12-bit camera's
    0..4095 as 0..15: OpenCV reads the 16 bits themselves."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        raise ImageReadError(
            f"cannot read image {path} as 16-bit colour (OpenCV read "
            f"{None if arr is None else (arr.dtype, arr.shape)}); save it as 8-bit RGB or "
            "16-bit grayscale."
        )
    rgb = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2RGB)
    planes = [np.ascontiguousarray(rgb[..., c]) for c in range(3)]
    channels = [high_bit_to_uint8(Image.fromarray(p), path, bit_depth) for p in planes]
    return Image.merge("RGB", channels)


def decode(
    img: Image.Image, path: Path, channels: int, bit_depth: int | None, bits: int
) -> np.ndarray:
    """An opened image whose header holds `bits` per sample -> HxWxC uint8; grayscale is
    expanded to 3 channels for ImageNet backbones."""
    bands = len(img.getbands())
    if bands not in IMAGE_BANDS:
        raise ImageReadError(
            f"image {path} has {bands} channels (mode {img.mode}); only 1 (grayscale), 3 (RGB) or 4 (RGBA) can be read as {channels}-channel input: save it as grayscale or RGB."
        )
    img.load()
    if bands > 1 and bits == 16:
        img = high_bit_colour_to_uint8(path, bit_depth)
    elif img.mode in HIGH_BIT_MODES:
        img = high_bit_to_uint8(img, path, bit_depth)
    arr = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    return arr[..., None] if arr.ndim == 2 else arr


def inspect_image(
    path: Path, channels: int, bit_depth: int | None = None
) -> tuple[np.ndarray, ImageInfo]:
    """Decode as read_image does and return the header facts the odd-image check compares."""
    check_regular_file(path)
    try:
        with Image.open(path) as img:
            info = ImageInfo(img.width, img.height, img.mode, stored_bits(img), orientation(img))
            return decode(img, path, channels, bit_depth, info.bits), info
    except OPEN_ERRORS as err:
        raise _open_error(path, err) from err


def read_image(path: Path, channels: int, bit_depth: int | None = None) -> np.ndarray:
    """Decode to HxWxC uint8 (see decode); errors name the file."""
    return inspect_image(path, channels, bit_depth)[0]


#: formats whose compression always blurs a mask's edges (ringing) and speckles its background
#: (WebP may be lossless, with label values that a cut at half the largest would drop)
LOSSY_MASK_FORMATS = frozenset({"JPEG", "MPO"})


def read_mask(path: Path, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Decode a mask to HxW {0, 1} float32; it must have its image's size.

    Any non-zero value is defect, except in a lossily compressed mask (a `.jpg` beside `.jpg`
    images): there the compression's faint ringing around every edge and its specks would
    count too (larger regions, and specks that AUPRO scores as regions of their own), so
    defect is above half the mask's largest value."""
    try:
        with Image.open(path) as img:
            lossy = img.format in LOSSY_MASK_FORMATS
            mask = np.asarray(img.convert("L"))
    except OPEN_ERRORS as err:
        raise ImageReadError(
            f"cannot read mask {path}: {err}. Replace the file or remove the ground_truth folder to skip pixel metrics."
        ) from err
    if mask.shape != image_hw:
        raise ImageReadError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is {image_hw[1]}x{image_hw[0]}; masks must match their image's size."
        )
    level = mask.max() / 2 if lossy else 0
    return (mask > level).astype(np.float32)
