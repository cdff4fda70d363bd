"""The page's words for messages written for the command line.

The run machine and the backends check settings where the bad value is first seen, and their messages name
the CLI's flags ("set --trigger to the word you use"). The page has no flags: `in_app_words` rewrites each
flag into the control that sets the same thing on the page, and Python's spelling of values (None, inf) into
words, where the app shows a message. Library failures that have a plain cause (a model that is not
downloaded) are said as that cause (`failure_words`).
"""

from __future__ import annotations

import re

# CLI flag -> (the control on the page that sets the same value; where it is). The settings' labels come from their
# fields (app/form.py), as the controls are built; these are the data and names that are not settings fields.
CONTROLS = {
    "--model": ("Model", "step 1"),
    "--images": ("your photos", "step 2"),
    "--data": ("the questions and answers", "step 2"),
    "--out": ("Run name", "step 4"),
    "--preview-question": ("New question", "step 5"),
    "--question": ("New question", "step 5"),
    "--preview-image": ("Image for the question", "step 5"),
    "--image": ("Image for the question", "step 5"),
    "--preview-prompt": ("New prompt", "step 5"),
    "--preview-seed": ("Seeds", "step 5"),
}


def _field_controls() -> dict[str, tuple[str, str]]:
    """Each shown setting's flag -> (its label, its step), from the same fields the controls are built from."""
    from . import form

    found = {}
    for name in form.WHERE:
        try:
            view = form.run_field(name)
        except KeyError:
            try:
                view = form.any_backend_field(name)
            except KeyError:
                continue
        found[view.flag] = (view.label, form.where(name))
    found.update({"--prompt": ("Prompt", "step 2"), "--trigger": ("Trigger word", "step 2")})
    return found


CONTROLS.update(_field_controls())
# Flags the page does not offer: said as a setting without a control to point at.
NO_CONTROL = ("a setting the app leaves at its default", "")

_FLAG = r"--[a-z][a-z0-9-]*"
# "pass --trigger WORD", "set --trigger to", "use --rank 4 or less": the verb and the flag's argument go too
_VERB_FLAG = re.compile(rf"\b(pass|set|give|use|raise|lower) ({_FLAG})(?: ([A-Z]{{2,}}\b|\d[\w.]*))?")


def _label(flag: str, inside: bool = False) -> str:
    """'Trigger word (step 2)', or 'Trigger word, step 2' inside parentheses."""
    label, where = CONTROLS.get(flag, NO_CONTROL)
    if not where:
        return label
    return f"{label}, {where}" if inside else f"{label} ({where})"


def in_app_words(message: str) -> str:
    """`message` with CLI flags replaced by the page's controls and Python values by words."""
    text = str(message)

    def verb(match: re.Match) -> str:
        action, flag, value = match.group(1), match.group(2), match.group(3)
        if value and value[0].isdigit():  # "use --rank 4 or less" -> "set LoRA rank (step 3) to 4 or less"
            return f"set {_label(flag)} to {value}"
        return f"{ {'pass': 'fill in', 'give': 'fill in', 'use': 'set'}.get(action, action)} {_label(flag)}"

    text = _VERB_FLAG.sub(verb, text)
    text = re.sub(rf"\(({_FLAG})\)", lambda m: f"({_label(m.group(1), inside=True)})", text)
    text = re.sub(_FLAG, lambda m: _label(m.group(0)), text)
    text = re.sub(r"\bgot None\b", "the box is empty", text)
    text = re.sub(r"\bgot (nan|inf)\b", "got a value that is not a number", text)
    return text


# (pattern in a library's message, what it means for the user)
KNOWN_FAILURES = (
    (re.compile(r"local_files_only|offline mode|HF_HUB_OFFLINE|LocalEntryNotFound", re.I),
     "the model's files are not downloaded and this machine is offline; download the model on a connected "
     "machine (huggingface-cli download MODEL), or choose the demo model or a local folder in step 1"),
    (re.compile(r"gated repo|GatedRepoError|401 Client Error|403 Client Error", re.I),
     "the model is gated: accept its licence on huggingface.co, then log in here with `huggingface-cli login`"),
    (re.compile(r"out of memory|CUDA out of memory|DefaultCPUAllocator: can't allocate", re.I),
     "the machine ran out of memory; lower the Compression ratio (step 3) or the Image size, then resume"),
)


def failure_words(error: str, model: str = "") -> str:
    """A job's failure in words: a known cause said plainly (the library's own message kept after it)."""
    error = str(error or "")
    for pattern, meaning in KNOWN_FAILURES:
        if pattern.search(error):
            detail = error.split(". ")[0][:160]
            return f"{meaning.replace('MODEL', model or 'the model')} (the library said: {detail})"
    return in_app_words(error)
