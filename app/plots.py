"""Charts of the app: the memory plan and the progress bar drawn as SVG (no plotting library needed), and the
frame of the loss chart (training loss, and validation loss where data is held out).

Only layout lives here: the numbers come from pipelines.planning (see handlers.memory_rows) and the run's loss log.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


from .jobs import read_loss_log

FITS, OVER, NO_BUDGET = "#2e9d5b", "#d64545", "#5b7fd6"
HALO = "paint-order:stroke;stroke:var(--body-background-fill,#fff);stroke-width:4px"  # text over the budget line


@dataclass
class Bar:
    """One bar of the memory chart."""

    group: str  # e.g. "EMLoC (ratio 0.45)"
    label: str  # e.g. "training"
    gib: float
    note: str = ""  # e.g. "streamed"


def memory_chart(bars: list[Bar], budget_gib: float | None, title: str) -> str:
    """Horizontal bars per phase and method with the budget as a dashed line; green fits, red does not."""
    if not bars:
        return "<p>No plan yet: choose a model in step 1.</p>"
    width, left, right, row, top = 820, 200, 170, 26, 34
    groups: list[str] = []
    for bar in bars:
        if bar.group not in groups:
            groups.append(bar.group)
    height = top + row * len(bars) + 22 * len(groups) + 30
    scale_max = max([b.gib for b in bars] + ([budget_gib] if budget_gib else [])) * 1.08 or 1.0
    span = width - left - right

    def x(value: float) -> float:
        return left + span * value / scale_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'role="img" aria-label="{html.escape(title)}" style="max-width:{width}px;font-family:sans-serif">',
             f'<text x="0" y="18" font-size="15" font-weight="bold" fill="currentColor">{html.escape(title)}</text>']
    rows_height = row * len(bars) + 22 * len(groups)
    if budget_gib:  # drawn first, so that the numbers stay readable on top of it
        bx = x(budget_gib)
        parts.append(f'<line x1="{bx:.1f}" y1="{top}" x2="{bx:.1f}" y2="{top + rows_height + 4}" stroke="#222" '
                     'stroke-width="2" stroke-dasharray="6,4"/>')
        parts.append(f'<text x="{bx:.1f}" y="{top + rows_height + 20}" font-size="12" text-anchor="middle" '
                     f'fill="currentColor">budget {budget_gib:g} GiB</text>')
    y = top
    for group in groups:
        parts.append(f'<text x="0" y="{y + 14}" font-size="13" font-weight="bold" fill="currentColor">'
                     f'{html.escape(group)}</text>')
        y += 22
        for bar in (b for b in bars if b.group == group):
            colour = NO_BUDGET if budget_gib is None else (FITS if bar.gib <= budget_gib else OVER)
            parts.append(f'<text x="14" y="{y + 15}" font-size="12" fill="currentColor">{html.escape(bar.label)}</text>')
            parts.append(f'<rect x="{left}" y="{y + 3}" width="{max(x(bar.gib) - left, 1):.1f}" height="{row - 8}" '
                         f'rx="3" fill="{colour}"><title>{html.escape(bar.label)}: {bar.gib:.2f} GiB</title></rect>')
            note = f" ({bar.note})" if bar.note else ""
            parts.append(f'<text x="{x(bar.gib) + 5:.1f}" y="{y + 15}" font-size="12" fill="currentColor" '
                         f'style="{HALO}">{gib_text(bar.gib)} GiB{html.escape(note)}</text>')
            y += row
    parts.append("</svg>")
    return "".join(parts)


def gib_text(value: float) -> str:
    """3 significant digits: 0.52, 1.02, 23.6, 148."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def progress_bar(fraction: float, text: str) -> str:
    """A labelled progress bar (HTML <progress>, readable by screen readers)."""
    fraction = min(max(fraction, 0.0), 1.0)
    return (f'<div class="emloc-progress"><progress value="{fraction:.3f}" max="1" aria-label="{html.escape(text)}" '
            f'style="width:100%;height:18px"></progress><div style="font-size:13px">{html.escape(text)}</div></div>')


TRAINING, VALIDATION = "training", "validation (held out)"  # the loss chart's two series, as its legend says


def read_validation(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, validation loss) of each sample round of a run: the loss log's {"step", "validation_loss"} lines
    (pipelines/runner/stages.py _validate); [] when nothing is held out or there is no run."""
    return read_loss_log(run_dir, "validation_loss") if run_dir else []


def loss_frame(losses: list, validation: list = ()) -> pd.DataFrame:
    """(step, loss) pairs of training and of validation as one typed frame for the line chart (a "series" column
    colours them): numbers, so the chart draws numeric axes even before the first step."""
    rows = [(s, v, TRAINING) for s, v in losses or []] + [(s, v, VALIDATION) for s, v in validation or []]
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="object")})
