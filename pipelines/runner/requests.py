"""What a person types to ask for samples and previews: seeds ("0, 1, 1000-1015"), LoRA strengths ("0, 0.5, 1,
1.25") and prompts (one per line), parsed once for the CLI and the app.

Errors say what was typed and what is expected in words; `what` names the box or the flag the text came from, so
the message reads right on the page ("Seeds") and in a terminal ("--seed").
"""

from __future__ import annotations

import math
import re

MAX_SEEDS = 16  # each seed makes one row of pictures per prompt
MAX_SCALES = 8  # each strength makes one column of the grid
MAX_SCALE = 4.0  # beyond this a LoRA only saturates; a typo (10 for 1.0) is refused rather than rendered


def _parts(text: str) -> list[str]:
    return [p for p in re.split(r"[,;\s]+", str(text or "").strip()) if p]


def parse_seeds(text: str, what: str = "seeds") -> list[int]:
    """'0, 1 2' -> [0, 1, 2]; '1000-1003' -> [1000, ..., 1003]; a ValueError in words for anything else, or for
    more than MAX_SEEDS seeds."""
    parts = _parts(text)
    if not parts:
        raise ValueError(f"{what}: give at least one seed, e.g. 0 or 0, 1, 2 or a range 1000-1015")
    seeds: list[int] = []
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"{what} must be whole numbers or ranges separated by commas, e.g. 0, 1, 1000-1015; "
                             f"{part!r} in {text!r} is neither")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise ValueError(f"{what}: the range {part} runs backwards; write it as {high}-{low}")
        seeds += range(low, min(high, low + MAX_SEEDS) + 1)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{what}: use 1 to {MAX_SEEDS} seeds (each makes one row of pictures); got "
                         f"{len(seeds) if len(seeds) <= MAX_SEEDS + 1 else 'more than ' + str(MAX_SEEDS)} in {text!r}")
    if len(set(seeds)) != len(seeds):
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        raise ValueError(f"{what}: seed {twice[0]} is given twice in {text!r}; give each seed once")
    return seeds


def parse_scales(text: str, what: str = "LoRA strengths") -> list[float]:
    """'0, 0.5, 1, 1.25' -> [0.0, 0.5, 1.0, 1.25]: how strongly the corrected LoRA is applied in a strength grid
    (0: the base model, 1: as trained); a ValueError in words otherwise."""
    parts = _parts(text)
    if not parts:
        raise ValueError(f"{what}: give at least one strength, e.g. 0, 0.5, 1, 1.25 (0 is the base model, 1 the "
                         "LoRA as trained)")
    scales = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{what} must be numbers separated by commas, e.g. 0, 0.5, 1, 1.25; {part!r} in "
                             f"{text!r} is not a number") from None
        if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
            raise ValueError(f"{what}: {part} is outside 0 to {MAX_SCALE:g} (0 is the base model, 1 the LoRA as "
                             "trained)")
        scales.append(value)
    if len(scales) > MAX_SCALES:
        raise ValueError(f"{what}: use 1 to {MAX_SCALES} strengths (each makes one column); got {len(scales)}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"{what}: {text!r} gives a strength twice; give each once")
    return scales


def parse_prompts(text: str, what: str = "prompts") -> list[str]:
    """One prompt (or question) per line, empty lines left out; duplicates are refused."""
    prompts = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    seen = set()
    for prompt in prompts:
        if prompt in seen:
            raise ValueError(f"{what}: {prompt!r} is given twice; give each once")
        seen.add(prompt)
    return prompts


def strength_label(scale: float) -> str:
    """The column of a strength grid: 'LoRA strength 0.5'; strength 0 is the base model and says so."""
    return "LoRA strength 0 (base model)" if scale == 0 else f"LoRA strength {scale:g}"
