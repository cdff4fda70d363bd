"""Reading and checking the user's data before a run starts; shared by every backend.

Images are checked by really decoding them with PIL (a file named .png that holds text, or a
truncated JPEG, is refused here, not at step 300), by their actual format (JPEG, PNG or WebP), by
size, and by count. Every problem raises a `DataError` (a ValueError) that names the file and says
what to do. Validated files are copied into the run folder, so the run never depends on the
originals.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class DataError(ValueError):
    """The user's data cannot be used; the message says which file and what to fix."""


@dataclass
class ImageLimits:
    """What an image file and a set of images must satisfy."""

    min_count: int = 1  # fewest images a run accepts
    max_count: int = 1000  # most images a run accepts
    min_side: int = 64  # shortest side in pixels
    max_side: int = 8192  # longest side in pixels
    max_bytes: int = 50 * 2**20  # largest file size


@dataclass
class ImageInfo:
    """One checked image."""

    path: Path
    format: str  # "jpg", "png" or "webp": the decoded format, not the file name's
    width: int
    height: int


def check_image(path: str | Path, limits: ImageLimits = ImageLimits()) -> ImageInfo:
    """Decode `path` fully and check its format and size; raise DataError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty; remove it or replace it with the real image")
    if size > limits.max_bytes:
        raise DataError(f"{path}: {size / 2**20:.1f} MB is over the {limits.max_bytes / 2**20:.0f} MB limit; "
                        "save it smaller (e.g. as JPEG)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                kind = image.format
                image.load()  # decode every pixel: truncated and corrupt files fail here
                width, height = ImageOps.exif_transpose(image).size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: not a readable JPEG, PNG or WebP image ({err}); convert it or remove it") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: the image is damaged and cannot be decoded ({err}); re-export it or remove it") from None
    if kind not in IMAGE_FORMATS:
        raise DataError(f"{path}: a {kind} image; only JPEG, PNG and WebP are accepted — convert it or remove it")
    if min(width, height) < limits.min_side:
        raise DataError(f"{path}: {width}x{height} pixels is too small; use images at least "
                        f"{limits.min_side} pixels on the shortest side")
    if max(width, height) > limits.max_side:
        raise DataError(f"{path}: {width}x{height} pixels is too large; resize it to at most "
                        f"{limits.max_side} pixels on the longest side")
    return ImageInfo(path, IMAGE_FORMATS[kind], width, height)


def find_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix, case-insensitive) directly inside `folder`, sorted by name; hidden files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass the folder that holds your images")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def check_images(paths: list[Path], limits: ImageLimits, where: str = "") -> list[ImageInfo]:
    """Check a set of images: their count, each one, and that no two share a name."""
    where = f" in {where}" if where else ""
    if len(paths) < limits.min_count:
        found = "no images" if not paths else f"only {len(paths)} image{'s' if len(paths) > 1 else ''}"
        raise DataError(f"found {found}{where}; add at least {limits.min_count} JPEG, PNG or WebP images")
    if len(paths) > limits.max_count:
        raise DataError(f"found {len(paths)} images{where}; use at most {limits.max_count} (remove some)")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem.lower() in stems:
            raise DataError(f"{path} and {stems[path.stem.lower()]} share the name {path.stem!r}; rename one of them")
        stems[path.stem.lower()] = path
    return [check_image(path, limits) for path in paths]


def copy_into(paths: list[Path], folder: Path) -> list[Path]:
    """Copy files into `folder` (created) under their own names; returns the copies."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        target = folder / path.name
        shutil.copyfile(path, target)
        copies.append(target)
    return copies


def load_rgb(path: Path) -> Image.Image:
    """An image as RGB, rotated as its EXIF orientation says (see `to_rgb` for the colour conversion)."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled to 8 bits (PIL's own conversion clips it to almost white) and a
    transparent background composited on white (PIL's own conversion makes it black)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 255.0 if image.mode == "I" and values.max(initial=0.0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then cut the centre `size x size` square."""
    return resize_and_crop_to(image, size, size)


def resize_and_crop_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic) so the image covers `width` x `height`, then cut that size from its centre: the shape is
    kept up to the sliver the target's aspect ratio differs by (an aspect-ratio bucket's)."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
