"""Question-answer data for the InternVL backend: three ways in, one sample type out.

1. A folder (or file) in the simple format: `qa.jsonl` lines `{"image": ..., "question": ..., "answer": ...}`
   or `qa.csv` with the columns `image,question,answer`; image paths are relative to the file.
2. InternVL's own fine-tuning format: JSONL lines `{"image": ..., "conversations": [{"from": "human",
   "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}` (multi-turn, several images or none),
   read directly or through its meta JSON `{"name": {"root": ..., "annotation": ..., "repeat_time": 1}}`.
3. Rows passed in code (the app's table): `(image, question, answer)` tuples or dicts.

All three give `QASample`s; the same data in any format gives equal samples. An image that precedes
the first question (`<image>\\n` at its start, or the simple formats) is stored without a marker;
an `<image>` marker anywhere else is kept in the text and becomes the image's position in the prompt.
Every error names the file, the line and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import shutil
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipelines.runner.data import DataError, ImageLimits
from pipelines.runner.data import check_image as check_image_file

log = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"  # InternVL's placeholder in its fine-tuning format
SIMPLE_FILES = ("qa.jsonl", "qa.csv")
SIMPLE_COLUMNS = ("image", "question", "answer")
IMAGE_LIMITS = ImageLimits(min_count=0, max_count=100_000, min_side=8)  # InternVL resizes every tile to 448
RESERVED_TOKENS = ("<IMG_CONTEXT>", "<img>", "</img>")  # InternVL's image tokens (tokenizer_config.json)
MAX_REPEATED = 100_000  # most samples a meta file's repeat_time may make
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class QASample:
    """One conversation: images (absolute paths, in prompt order) and (question, answer) turns."""

    images: tuple[str, ...] = ()
    turns: tuple[tuple[str, str], ...] = ()  # ((question, answer), ...); `<image>` marks where an image goes
    system: str | None = None  # an optional system prompt

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[-1][1]


@dataclass
class DataReport:
    """What was read: the samples and a short account for the log and the app."""

    samples: list[QASample] = field(default_factory=list)
    source: str = ""
    text_only: int = 0  # samples without an image
    multi_turn: int = 0

    def summary(self) -> str:
        return (f"{len(self.samples)} samples from {self.source} ({self.text_only} text-only, "
                f"{self.multi_turn} multi-turn)")


# ---------------------------------------------------------------- validation helpers


def check_image(path: Path, where: str) -> str:
    """`path` as an absolute string if it exists and decodes as a JPEG, PNG or WebP; DataError otherwise."""
    if not path.is_file():
        raise DataError(f"{where}: image {str(path)!r} not found; fix the path (relative to the data file) "
                        "or remove the line")
    try:
        check_image_file(path, IMAGE_LIMITS)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    return str(path.resolve())


def _text(value: Any, what: str, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)  # a numeric answer ("42" written without quotes) is text too
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: the {what} must be text; got {type(value).__name__} {str(value)[:60]!r}")
    if not value or not value.strip():
        raise DataError(f"{where}: empty {what}; every {what} needs text (fill it in or remove the line)")
    check_no_image_tokens(value, what, where)
    return value.strip()


def check_no_image_tokens(text: str, what: str, where: str) -> None:
    """Refuse InternVL's own image tokens in text: the model reserves them for image pixels."""
    for token in RESERVED_TOKENS:
        if token in text:
            raise DataError(f"{where}: the {what} contains {token}, which the model reserves for the pixels of an "
                            f"image; remove it (to place an image in the text, write {IMAGE_MARKER})")


def _canonical_turns(turns: list[tuple[str, str]], n_images: int, where: str) -> tuple[tuple[str, str], ...]:
    """Drop a leading `<image>` marker per image from the first question when it is the only place they sit."""
    markers = sum(q.count(IMAGE_MARKER) + a.count(IMAGE_MARKER) for q, a in turns)
    if markers and markers != n_images:
        raise DataError(f"{where}: {markers} {IMAGE_MARKER} markers but {n_images} images; "
                        "use one marker per image")
    first = turns[0][0]
    leading = re.match(rf"^(?:{re.escape(IMAGE_MARKER)}\s*)+", first)
    if markers and leading and leading.group(0).count(IMAGE_MARKER) == markers:
        stripped = first[leading.end():].strip()
        if not stripped:
            raise DataError(f"{where}: the first question holds only {IMAGE_MARKER}; add the question text")
        turns = [(stripped, turns[0][1])] + turns[1:]
    return tuple(turns)


def make_sample(images: Sequence[str | Path], turns: Sequence[tuple[Any, Any]], base: Path | None,
                where: str, system: str | None = None) -> QASample:
    """Validate one conversation and build its QASample (image paths resolved against `base`)."""
    if not turns:
        raise DataError(f"{where}: no question/answer turn; add at least one")
    checked = [(_text(q, "question", where), _text(a, "answer", where)) for q, a in turns]
    paths = []
    for image in images:
        path = Path(image) if base is None or Path(image).is_absolute() else base / image
        paths.append(check_image(path, where))
    return QASample(tuple(paths), _canonical_turns(checked, len(paths), where), system)


def _report(samples: list[QASample], source: str) -> DataReport:
    if not samples:
        raise DataError(f"{source}: no samples found; add at least one question with its answer")
    return DataReport(samples, source, sum(not s.images for s in samples), sum(len(s.turns) > 1 for s in samples))


# ---------------------------------------------------------------- readers


def _read_text(path: Path) -> str:
    """A data file's text (UTF-8, with or without the BOM that spreadsheet programs write), or DataError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path.name}: not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); "
                        "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet program)") from None


def _jsonl_records(path: Path) -> Iterable[tuple[int, dict]]:
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path.name} line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path.name} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _image_list(value: Any, where: str) -> list[str]:
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise DataError(f"{where}: 'image' must be a path or a list of paths; got {value!r}")


def _conversation_sample(record: dict, base: Path, where: str) -> QASample:
    """One line of InternVL's format: alternating human/gpt turns, an optional leading system turn."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    system, turns, pending = None, [], None
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise DataError(f"{where}: turn {index + 1} needs 'from' (human, gpt or system) and 'value'")
        role, value = ROLES[turn["from"]], turn.get("value")
        if role == "system" and index == 0:
            system = _text(value, "system prompt", where)
        elif role == "user" and pending is None:
            pending = value
        elif role == "assistant" and pending is not None:
            turns.append((pending, value))
            pending = None
        else:
            raise DataError(f"{where}: turn {index + 1} ({turn['from']}) is out of order; "
                            "turns must alternate human, gpt, human, gpt ...")
    if pending is not None:
        raise DataError(f"{where}: the last human turn has no gpt answer; add one or remove it")
    return make_sample(_image_list(record.get("image"), where), turns, base, where, system)


def read_internvl_jsonl(path: str | Path, root: str | Path | None = None) -> DataReport:
    """Read an InternVL fine-tuning JSONL; images are relative to `root` (default: the file's folder)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    samples = [_conversation_sample(record, base, f"{path.name} line {number}")
               for number, record in _jsonl_records(path)]
    return _report(samples, str(path))


def read_internvl_meta(path: str | Path) -> DataReport:
    """Read InternVL's meta JSON: every dataset's `annotation` JSONL with images under its `root`.

    `repeat_time` is honoured as InternVL does: below 1 keeps that fraction, above 1 repeats samples.
    """
    path = Path(path)
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path.name}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{path.name}: expected {{'name': {{'root': ..., 'annotation': ...}}, ...}}")
    samples: list[QASample] = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise DataError(f"{path.name}: dataset {name!r} needs an 'annotation' (a JSONL path)")
        annotation = path.parent / entry["annotation"]
        if not annotation.is_file():
            raise DataError(f"{path.name}: dataset {name!r}: annotation file {str(annotation)!r} not found")
        root = path.parent / entry["root"] if entry.get("root") else annotation.parent  # relative to the meta file
        part = read_internvl_jsonl(annotation, root).samples
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not 0 < repeat < math.inf:
            raise DataError(f"{path.name}: dataset {name!r}: repeat_time must be a number above 0 (below 1 keeps "
                            f"that fraction of the samples, above 1 repeats them); got {repeat!r}")
        count = max(1, round(len(part) * repeat))
        if len(samples) + count > MAX_REPEATED:
            raise DataError(f"{path.name}: dataset {name!r}: repeat_time {repeat} makes {count} samples; "
                            f"use at most {MAX_REPEATED} samples in all (lower repeat_time)")
        samples.extend(part[i % len(part)] for i in range(count))
    return _report(samples, str(path))


def _simple_sample(row: Mapping[str, Any], base: Path | None, where: str) -> QASample:
    return make_sample(_image_list(row.get("image"), where), [(row.get("question"), row.get("answer"))], base, where)


def read_qa_jsonl(path: str | Path) -> DataReport:
    """Read `qa.jsonl` (simple format); a line with 'conversations' switches to InternVL's format."""
    path = Path(path)
    samples = []
    for number, record in _jsonl_records(path):
        where = f"{path.name} line {number}"
        if "conversations" in record:
            samples.append(_conversation_sample(record, path.parent, where))
            continue
        missing = [c for c in ("question", "answer") if c not in record]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}; each line needs "
                            "'image', 'question' and 'answer' (or InternVL's 'conversations')")
        samples.append(_simple_sample(record, path.parent, where))
    return _report(samples, str(path))


def read_qa_csv(path: str | Path) -> DataReport:
    """Read `qa.csv` with a header row holding the columns image, question, answer."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in SIMPLE_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path.name} has the columns {columns or '(none)'}; it needs a header row with "
                        f"{', '.join(SIMPLE_COLUMNS)} (missing: {', '.join(missing)})")
    samples = []
    for number, row in enumerate(reader, start=2):  # line 1 is the header
        row = {(k or "").strip().lower(): v for k, v in row.items()}
        samples.append(_simple_sample(row, path.parent, f"{path.name} line {number}"))
    return _report(samples, str(path))


def pairs_to_samples(rows: Iterable[Any], base: str | Path | None = None) -> DataReport:
    """Samples from rows passed in code: `(image, question, answer)` tuples or dicts with those keys."""
    samples = []
    for number, row in enumerate(rows, start=1):
        where = f"row {number}"
        if isinstance(row, Mapping):
            record = row
        elif isinstance(row, (tuple, list)) and len(row) == 3:
            record = dict(zip(SIMPLE_COLUMNS, row))
        else:
            raise DataError(f"{where}: expected (image, question, answer); got {row!r}")
        samples.append(_simple_sample(record, Path(base) if base is not None else None, where))
    return _report(samples, "the table")


def read_qa_data(source: str | Path) -> DataReport:
    """Read any supported source: a folder holding qa.jsonl/qa.csv, a .jsonl, a .csv or a meta .json."""
    path = Path(source)
    if path.is_dir():
        for name in SIMPLE_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DataError(f"{path}: no {' or '.join(SIMPLE_FILES)} in this folder; add one "
                            "(columns image, question, answer) or pass InternVL's JSONL or meta JSON")
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_qa_jsonl(path)
    if suffix == ".csv":
        return read_qa_csv(path)
    if suffix == ".json":
        return read_internvl_meta(path)
    raise DataError(f"{path.name}: unsupported data file; use a .jsonl, a .csv or InternVL's meta .json")


def write_qa_jsonl(samples: Sequence[QASample], folder: str | Path) -> dict:
    """Copy every sample's images into `folder/images/` and write `folder/qa.jsonl` in InternVL's format.

    read_qa_data(folder / "qa.jsonl") gives back equal samples (image paths now inside `folder`).
    Returns a JSON-able summary for run.json.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    copied: dict[str, str] = {}
    lines = []
    for sample in samples:
        for image in sample.images:
            if image not in copied:
                copied[image] = f"images/{len(copied):05d}-{Path(image).name}"
                shutil.copyfile(image, folder / copied[image])
        conversations = [{"from": "system", "value": sample.system}] if sample.system else []
        has_markers = any(IMAGE_MARKER in q for q, _ in sample.turns)
        for index, (question, answer) in enumerate(sample.turns):
            if index == 0 and not has_markers:
                question = f"{IMAGE_MARKER}\n" * len(sample.images) + question
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record: dict[str, Any] = {"conversations": conversations}
        if sample.images:
            paths = [copied[i] for i in sample.images]
            record["image"] = paths[0] if len(paths) == 1 else paths
        lines.append(json.dumps(record, ensure_ascii=False))
    (folder / "qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"samples": len(samples), "images": len(copied), "text_only": sum(not s.images for s in samples),
            "multi_turn": sum(len(s.turns) > 1 for s in samples)}


# ---------------------------------------------------------------- answer metrics (SQuAD-style)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall between the normalised answers."""
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
