"""`tunelab board [RUNS_DIR]`: the web app over a directory of runs (docs/board.md).

A thin shell over :func:`tunelab.board.app.create_app`, served by uvicorn.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

HELP = """A web app over a directory of runs: watch runs live, launch recipes from a form, compare runs, browse
sweeps and the method catalogue.

\b
  tunelab board                      # runs/ on http://127.0.0.1:8765
  tunelab board runs --port 9000
  tunelab board runs --host 0.0.0.0 --token auto   # reachable from elsewhere: a token is required

Runs launched from the board run as their own processes, one at a time by default (--max-parallel), and keep
running when the browser or the board closes. Needs the `board` extra: pip install 'tunelab\\[board]'.
"""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command(help=HELP)
    def board(
        runs_dir: Path = typer.Argument(Path("runs"), help="The directory of runs (created if missing)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs "
                                                             "--token."),
        port: int = typer.Option(8765, "--port", help="Port to listen on."),
        token: Optional[str] = typer.Option(None, "--token", envvar="TUNELAB_BOARD_TOKEN",
                                            help="Require this token on every request (`auto`: generate one and "
                                                 "print the URL to open). Env: TUNELAB_BOARD_TOKEN."),
        max_parallel: int = typer.Option(1, "--max-parallel", min=1, help="Launched runs that may run at once."),
    ):
        from tunelab.commands._common import fail

        if not is_loopback(host) and not token:
            fail(f"--host {host} makes the board reachable from other machines: give --token (or --token auto)")
        if token == "auto":
            import secrets

            token = secrets.token_urlsafe(24)
        if token is not None and len(token) < 16:
            fail("--token: use at least 16 characters (or --token auto)")
        try:
            import uvicorn

            from tunelab.board.app import create_app
        except ImportError as e:
            fail(f"the board needs FastAPI and uvicorn ({e}): pip install 'tunelab[board]'")
        application = create_app(runs_dir, token=token, max_parallel=max_parallel)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
        typer.echo(f"tunelab board on {runs_dir.resolve()}: open {url}")
        uvicorn.run(application, host=host, port=port, log_level="warning")
