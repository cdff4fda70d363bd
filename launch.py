"""EMLoC Studio: `python launch.py` opens the app; subcommands run the same work headless.

    python launch.py [app] [--host 127.0.0.1] [--port 7860] [--no-browser] [--share]
    python launch.py plan --model ID_OR_PATH --budget-gb 24 ...   # will it fit? (no download)
    python launch.py train --backend flux|vlm ...                 # a whole run from the terminal
    python launch.py preview --run runs/NAME ...                  # previews of a finished run
    python launch.py export --run runs/NAME [--step N]            # a zip of its adapters (a checkpoint's: corrected)
    python launch.py caption --images DIR [--model ID] [--trigger sks] # a .txt caption beside each photo

Each subcommand parses its own flags (`python launch.py plan --help`).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

ALLOCATOR = "expandable_segments:True"


def default_allocator(environ: dict = os.environ) -> None:
    """PyTorch's CUDA allocator grows segments instead of caching fixed ones (less memory reserved but unused next to
    a tight plan), unless the user configured the allocator. Read when torch first allocates: set before import."""
    if not environ.get("PYTORCH_CUDA_ALLOC_CONF") and not environ.get("PYTORCH_ALLOC_CONF"):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR


default_allocator()  # at process start, before any subcommand imports torch

# subcommand -> "module:function(argv) -> exit code"
COMMANDS = {
    "app": "app.main:main",
    "plan": "pipelines.planner.cli:main",
    "train": "pipelines.runner.cli:main",
    "preview": "pipelines.runner.cli:preview",
    "export": "pipelines.runner.cli:export",
    "caption": "pipelines.internvl.caption:main",
}


def main(argv: list[str]) -> int:
    command = argv[0] if argv and not argv[0].startswith("-") else "app"
    rest = argv[1:] if argv and argv[0] == command else argv
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if command not in COMMANDS:
        print(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function = COMMANDS[command].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith(module_name.split(".")[0]):
            print(f"`{command}` is not built yet in this version of EMLoC Studio ({module_name} is missing)",
                  file=sys.stderr)
            return 2
        raise
    freeze_imported_objects()
    return int(getattr(module, function)(rest) or 0)


def freeze_imported_objects() -> None:
    """Leave what the imports made (torch, diffusers, transformers: ~0.5 million objects that live as long as the
    process) out of garbage collection. A run collects garbage after each stage, sample round and preview variant,
    to free one model before the next is built; each full collection walked all of them (~0.7 s on two CPU cores).
    Collected first, so nothing unreachable is kept."""
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
