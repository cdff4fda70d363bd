"""The Data step's validation uploads: data kept for the validation loss only, besides the held-out count.

An image model takes other photos of the subject (its backend's "Validation photos" folder, `--validation-images`);
a question model takes a file of questions and answers (.jsonl or .csv, `--validation-data`) with the images it
names, dropped together (images the file names may also be among the training uploads). The files are checked as
the training uploads are (`handlers.add_images`: type, size, count) when they are dropped, said in the words of the
control, and staged for the run (copied into its folder by the backend) when it is made. Which kind of upload a model
takes is read from its backend's settings fields, never from its family.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.runner.data import DataError
from pipelines.runner.registry import backend_class

from . import form, handlers

PHOTOS, QUESTIONS = "validation_images", "validation_data"  # the backends' settings fields (and the page's ids)
TABLES = (".jsonl", ".csv")
FOLDER = "validation"  # beside the staged training data: the validation upload before the backend copies it


@dataclass
class ValidationUpload:
    """A validation drop read and checked: the good images, the questions (question models) and what is wrong."""

    images: list[dict] = field(default_factory=list)  # {"path", "name"}, as the training uploads
    table: str = ""  # the questions' file
    rows: list[list[str]] = field(default_factory=list)  # [image name, question, answer]
    problems: list[str] = field(default_factory=list)
    checked: str = ""  # add_images' words about the images


def label(name: str) -> str:
    """The control's name as the page shows it: 'Validation photos (step 2)'."""
    return f"{form.any_backend_field(name).label} ({form.where(name)})"


def field_of(backend: str) -> str:
    """The validation upload the backend takes (PHOTOS or QUESTIONS), "" for none."""
    names = {f.name for f in dataclasses.fields(backend_class(backend).settings_class)} if backend else set()
    return next((n for n in (PHOTOS, QUESTIONS) if n in names), "")


def read(name: str, files: Any, training: list[dict] | None = None) -> ValidationUpload:
    """Check a validation drop for the field `name` (PHOTOS or QUESTIONS) as the training uploads are checked;
    `training` (the training uploads) may hold images the questions name."""
    given = list({Path(p).name: p for p in form.file_paths(files)}.values())  # a file dropped again replaces its first drop
    upload = ValidationUpload()
    if name == QUESTIONS:
        tables = [p for p in given if Path(p).suffix.lower() in TABLES]
        given = [p for p in given if p not in tables]
        if len(tables) != 1:
            upload.problems.append(f"drop one .jsonl or .csv file of questions and answers (columns image, question, "
                                   f"answer) with the images it names; got {len(tables) or 'no'} such files"
                                   + (f" ({', '.join(Path(t).name for t in tables)})" if tables else ""))
        else:
            upload.table = tables[0]
            try:
                upload.rows = [row for row in handlers.read_qa_table_file(upload.table) if any(row)]
            except (DataError, ValueError, OSError) as err:
                upload.problems.append(str(err).replace(str(Path(upload.table).parent) + "/", ""))
    upload.images, upload.checked = handlers.add_images([], given, "images" if name == PHOTOS else "qa")
    upload.problems += [line[2:] for line in upload.checked.splitlines() if line.startswith("- ")]
    if name == PHOTOS and not upload.images:
        upload.problems.append("no photo in it; drop other photos of your subject (JPEG, PNG or WebP), or clear it")
    known = {item["name"] for item in [*(training or []), *upload.images]}
    missing = sorted({row[0] for row in upload.rows if row[0] and row[0] not in known})
    if missing:
        upload.problems.append(f"{Path(upload.table).name} names images that are neither dropped with it nor among "
                               f"your uploaded images: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                               "drop them together with the file")
    return upload


def words(name: str, upload: ValidationUpload) -> str:
    """What the Data step says about a validation drop."""
    if name == PHOTOS:
        said = f"{label(name)}: {len(upload.images)} photo{'s' if len(upload.images) != 1 else ''} kept for validation"
    else:
        said = (f"{label(name)}: {len(upload.rows)} question{'s' if len(upload.rows) != 1 else ''} kept for "
                f"validation, {len(upload.images)} image{'s' if len(upload.images) != 1 else ''} with them")
    if upload.problems:
        return said + "; not used:\n" + "\n".join(f"- {p}" for p in upload.problems)
    return said + ". The validation loss is measured on them beside the training loss."


def stage(backend: str, values: dict, training: list[dict], staging: Path) -> dict[str, str]:
    """The backend's validation setting from the page's `values` (by field name), the dropped files staged in
    `staging`/validation (the backend copies them into the run): {} when nothing was dropped; DataError naming the
    control when a file is bad."""
    name = field_of(backend)
    files = values.get(name) if name else None
    if not name or not form.file_paths(files):
        return {}
    upload = read(name, files, training)
    if upload.problems:
        raise DataError(f"{label(name)}: {upload.problems[0]}")
    folder = Path(staging) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if name == PHOTOS:
        for item in upload.images:
            shutil.copyfile(item["path"], folder / item["name"])
        return {name: str(folder)}
    by_name = {item["name"]: item for item in [*(training or []), *upload.images]}  # the dropped ones win
    if not upload.rows:
        raise DataError(f"{label(name)}: {Path(upload.table).name} holds no questions")
    try:
        staged = handlers.stage_qa_data(list(by_name.values()), upload.rows, folder)
    except DataError as err:
        raise DataError(f"{label(name)}: {err}") from None
    return {name: staged["data"]}

