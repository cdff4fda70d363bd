"""`python launch.py [app]`: start EMLoC Studio in the browser.

    python launch.py                      # http://127.0.0.1:7860, opens the default browser
    python launch.py app --port 7861 --no-browser
    python launch.py app --host 0.0.0.0 --share    # reachable from other machines / a public gradio.live link
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_PORT = 7860


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.py app", description="EMLoC Studio: the point-and-click app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also make a temporary public link (gradio share)")
    parser.add_argument("--no-browser", action="store_true", help="do not open the default browser")
    parser.add_argument("--runs", default="runs", help="folder that holds the runs (default: runs)")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser.parse_args(argv)


def create_app(runs_dir: str | Path = "runs", demo_models: dict | None = None):
    """(gradio Blocks, Studio) for `runs_dir`; tests use this to start the app on any port."""
    from .studio import Studio
    from .ui import build

    studio = Studio(runs_dir, demo_models)
    return build(studio), studio


def launch(page, host: str, port: int, share: bool = False, browser: bool = False, block: bool = True,
           runs_dir: str | Path | None = None):
    """Serve `page`; with block=False return at once (the server runs in its own thread).

    `runs_dir`: the runs folder, whose previews and zips the page shows (gradio serves only allowed paths).
    """
    from .ui import CSS, THEME

    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, share=share, inbrowser=browser, prevent_thread_lock=not block,
                       quiet=True, show_error=False, css=CSS, theme=THEME, footer_links=[],
                       allowed_paths=[str(runs_dir)] if runs_dir else None)


def main(argv: list[str] | None = None) -> int:
    """Start the app; returns the exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: nothing leaves the machine
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for library in ("diffusers", "transformers"):
        try:
            __import__(f"{library}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()
        except ImportError:
            pass
    page, studio = create_app(args.runs)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"EMLoC Studio: {url}  (runs in {studio.runs_dir}; Ctrl-C to stop)", flush=True)
    try:
        launch(page, args.host, args.port, share=args.share, browser=not args.no_browser, block=True,
               runs_dir=studio.runs_dir)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err}); pass another --port", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
