"""`python launch.py [app]`: start EMLoC Studio in the browser.

    python launch.py                      # http://127.0.0.1:7860, opens the default browser
    python launch.py app --port 7861 --no-browser
    python launch.py app --host 0.0.0.0 --auth me:secret   # reachable from other machines, behind a login
    python launch.py app --share                   # a public gradio.live link (a login is required, as above)
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

DEFAULT_PORT = 7860
AUTH_ENV = "EMLOC_AUTH"  # USER:PASSWORD, read when --auth is not given
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.py app", description="EMLoC Studio: the point-and-click app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also make a temporary public link (gradio share)")
    parser.add_argument("--no-browser", action="store_true", help="do not open the default browser")
    parser.add_argument("--runs", default="runs", help="folder that holds the runs (default: runs)")
    parser.add_argument("--auth", default=None, help=f"USER:PASSWORD that the page asks for (default: ${AUTH_ENV}); "
                        "when the app listens beyond this machine or is shared and none is given, a password is made "
                        "up and printed")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser.parse_args(argv)


def exposed(host: str, share: bool) -> bool:
    """True when others than this machine's own user can reach the app."""
    return share or host not in LOOPBACK


def login(host: str, share: bool, auth: str | None) -> tuple[tuple[str, str] | None, str]:
    """(the (user, password) gradio asks for, or None; the banner's lines about it).

    The app has no accounts of its own and serves every file under the runs folder (photos, data, adapters) to
    the page, so whenever it is reachable from elsewhere a login is required."""
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth (or ${AUTH_ENV}) must look like USER:PASSWORD; got {auth!r}")
        pair, said = (user, password), f"log in as {user!r} with the password you set"
    elif exposed(host, share):
        pair = ("emloc", secrets.token_urlsafe(12))
        said = f"log in as 'emloc' with the password {pair[1]} (choose your own with --auth USER:PASSWORD or ${AUTH_ENV})"
    else:
        return None, ""
    if not exposed(host, share):
        return pair, f"login required: {said}"
    reach = "a public gradio.live link (anyone with the link)" if share else \
        f"{host} (other machines on the network{' and beyond' if host in ('0.0.0.0', '::') else ''})"
    return pair, (f"WARNING: the app is reachable through {reach}. Whoever logs in can see every file under the runs "
                  f"folder (your photos, data and adapters) and start jobs. Login required: {said}.")


def banner(host: str, port: int, runs_dir: Path, note: str) -> str:
    """What the terminal shows when the app starts: where to open it, and who else can."""
    if host in ("0.0.0.0", "::"):
        where = (f"listening on every network interface, port {port}: http://127.0.0.1:{port} on this machine, "
                 f"http://{socket.gethostname()}:{port} from others")
    else:
        where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return f"EMLoC Studio: {where}  (runs in {runs_dir}; Ctrl-C to stop)" + (f"\n{note}" if note else "")


def create_app(runs_dir: str | Path = "runs", demo_models: dict | None = None):
    """(gradio Blocks, Studio) for `runs_dir`; tests use this to start the app on any port."""
    from .studio import Studio
    from .ui import build

    studio = Studio(runs_dir, demo_models)
    return build(studio), studio


def launch(page, host: str, port: int, share: bool = False, browser: bool = False, block: bool = True,
           runs_dir: str | Path | None = None, auth: tuple[str, str] | None = None):
    """Serve `page`; with block=False return at once (the server runs in its own thread).

    `runs_dir`: the runs folder, whose previews and zips the page shows (gradio serves only allowed paths).
    `auth`: (user, password) that every page, file and API call needs (gradio's login).
    """
    from .ui import CSS, THEME

    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, share=share, inbrowser=browser, prevent_thread_lock=not block,
                       quiet=True, show_error=False, css=CSS, theme=THEME, footer_links=[],
                       allowed_paths=[str(runs_dir)] if runs_dir else None, auth=auth)


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
    try:
        auth, note = login(args.host, args.share, args.auth or os.environ.get(AUTH_ENV) or None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    page, studio = create_app(args.runs)
    print(banner(args.host, args.port, studio.runs_dir, note), flush=True)
    try:
        launch(page, args.host, args.port, share=args.share, browser=not args.no_browser, block=True,
               runs_dir=studio.runs_dir, auth=auth)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err}); pass another --port", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
