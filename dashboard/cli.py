"""`tuneforge dashboard [--db URL] [--port N]`: browse the tuning database in a Streamlit app.

Starts ``streamlit run`` on dashboard/app.py in a child process (the database URL travels in
``$TUNEFORGE_DB``), prints the address to open and the database in use, and runs until Ctrl-C (SIGINT) or SIGTERM.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tuneforge.errors import InputError

APP = Path(__file__).with_name("app.py")
DEFAULT_PORT = 8501
PORT_TRIES = 50


def register(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="browse the tuning results in a web dashboard (Streamlit)",
                              description=__doc__)
    p.add_argument("--db", metavar="URL", help="database URL or SQLite file path (default: $TUNEFORGE_DB or "
                                               "~/.local/share/tuneforge/tuneforge.db)")
    p.add_argument("--port", type=int, help=f"port to serve on (default: {DEFAULT_PORT}, or the next free one)")
    p.add_argument("--host", default="localhost",
                   help="address to listen on (default: localhost; 0.0.0.0 to serve the whole network)")
    p.set_defaults(func=cmd_dashboard)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(host: str, wanted: int | None) -> int:
    """``wanted`` if it is free (else a one-line error); without one, the first free port from 8501."""
    if wanted is not None:
        if not 1 <= wanted <= 65535:
            raise InputError(f"--port must be between 1 and 65535, got {wanted}")
        if not port_free(host, wanted):
            raise InputError(f"port {wanted} on {host} is in use; pick another with --port")
        return wanted
    for port in range(DEFAULT_PORT, DEFAULT_PORT + PORT_TRIES):
        if port_free(host, port):
            return port
    raise InputError(f"no free port in {DEFAULT_PORT}-{DEFAULT_PORT + PORT_TRIES - 1} on {host}; use --port")


def streamlit_command(port: int, host: str) -> list[str]:
    # headless: no browser opened from here, and no first-run e-mail prompt waiting on stdin
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
            "--server.port", str(port), "--server.address", host, "--browser.gatherUsageStats", "false"]


def cmd_dashboard(args) -> int:
    from tuneforge.dashboard.data import database_url, open_store
    from tuneforge.db.store import display_url
    from tuneforge.errors import DatabaseError

    url = database_url(args.db)
    port = choose_port(args.host, args.port)
    print(f"database: {display_url(url)}")
    try:
        store = open_store(url)
    except DatabaseError as e:
        print(f"warning: {e} (the dashboard will say so)")
    else:
        if store is None:
            print("no tuning results there yet: the dashboard shows how to fill it")
        else:
            store.close()
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(f"dashboard: http://{shown}:{port}  (Ctrl-C to stop)", flush=True)
    env = dict(os.environ, TUNEFORGE_DB=url)
    child = subprocess.Popen(streamlit_command(port, args.host), env=env)
    return serve_until_stopped(child)


def serve_until_stopped(child: subprocess.Popen) -> int:
    """Wait for the server; SIGINT or SIGTERM to this process stops it (SIGTERM: streamlit shuts down
    cleanly; a second signal kills it) and exits 128 + the signal. The handlers are installed here
    because a process started in the background of a non-interactive shell inherits SIGINT ignored,
    and Python then raises no KeyboardInterrupt at all."""
    stopped: list[int] = []

    def stop(signum, _frame):
        if stopped:
            child.kill()
        else:
            child.terminate()
        stopped.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    code = child.wait()
    return 128 + stopped[0] if stopped else code
