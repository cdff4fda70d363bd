"""Aspect-ratio buckets of a diffusion run: each photo keeps its shape, resized to the bucket of nearest aspect ratio.

At a resolution `R` the buckets are the sizes `(w, h)` with both sides multiples of 16 (the VAE's 8 x the
transformer's 2x2 patch) and area `w·h ≈ R²`: for every width `w = 16k` between `R/√MAX_ASPECT` and `R·√MAX_ASPECT`,
`h` is `R²/w` rounded to a multiple of 16 (kohya's and OneTrainer's buckets are made the same way). A photo of
aspect `a = width / height` goes to the bucket whose `log(w/h)` is nearest `log(a)`, is resized to cover it and
centre-cropped to it (at most one 16-pixel strip is lost). A run may train at several resolutions; then every photo
has one bucket per resolution. Batches take their rows from one bucket (one shape per forward), and the planner
plans the bucket with the most latent tokens, `(w/16)(h/16)`.
"""

from __future__ import annotations

import math

MULTIPLE = 16  # pixels per latent token side: VAE downsampling 8 x patch 2
MAX_ASPECT = 2.0  # the widest bucket is 2:1, the tallest 1:2 (a wider photo is cropped to 2:1)


def check_resolution(value: int, what: str = "Image size") -> None:
    """Raise a ValueError in the words of the screen for a resolution that is not a positive multiple of 16."""
    if not isinstance(value, int) or value < MULTIPLE or value % MULTIPLE:
        raise ValueError(f"{what} {value!r} is not a multiple of 16 pixels (the VAE halves the image three times and "
                         f"the transformer reads 2x2 patches); use e.g. {max(MULTIPLE, round(value / 16) * 16) if isinstance(value, (int, float)) else 512}")


def buckets(resolution: int) -> list[tuple[int, int]]:
    """The (width, height) buckets of `resolution`, widest first: area ≈ resolution², sides multiples of 16, aspect
    at most MAX_ASPECT either way; the square (resolution, resolution) is always one of them."""
    check_resolution(resolution)
    area = resolution * resolution
    found = {(resolution, resolution)}
    low = math.ceil(resolution / math.sqrt(MAX_ASPECT) / MULTIPLE)
    high = math.floor(resolution * math.sqrt(MAX_ASPECT) / MULTIPLE)
    for k in range(max(1, low), high + 1):
        width = k * MULTIPLE
        height = max(MULTIPLE, round(area / width / MULTIPLE) * MULTIPLE)
        if 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            found |= {(width, height), (height, width)}  # a tall bucket for every wide one, whatever the rounding
    return sorted(found, key=lambda size: -size[0] / size[1])


def nearest_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket of `resolution` whose aspect ratio is nearest that of a `width` x `height` photo (in log ratio,
    so 2:1 and 1:2 are equally far from square); ties go to the larger area."""
    aspect = math.log(width / height)
    return min(buckets(resolution), key=lambda size: (abs(math.log(size[0] / size[1]) - aspect), -size[0] * size[1]))


def latent_tokens(size: tuple[int, int]) -> int:
    """Tokens of one image of `size` (width, height) in the transformer: (w/16)(h/16)."""
    return (size[0] // MULTIPLE) * (size[1] // MULTIPLE)


def largest_bucket(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size with the most latent tokens (what the planner plans)."""
    return max(sizes, key=lambda size: (latent_tokens(size), size[0]))


def planned_side(sizes: list[tuple[int, int]]) -> int:
    """The side of the square the planner plans for `sizes`: the smallest multiple of 16 whose square holds at least
    the largest bucket's tokens (and pixels), so a non-square bucket is never planned short."""
    tokens = latent_tokens(largest_bucket(sizes))
    return math.ceil(math.sqrt(tokens)) * MULTIPLE
