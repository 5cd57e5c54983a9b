"""The dashboard in a real browser: `tuneforge dashboard` serves the app over a tuned database,
headless Chromium renders two pages, and each must show its heading and no error.

Streamlit renders on the client over a websocket, so Chromium is driven through the DevTools
protocol (``--remote-debugging-pipe``, standard library only) and the screenshot is taken once the
page's text shows the heading and has stopped changing; ``--virtual-time-budget`` alone fires
before the websocket's messages arrive. Screenshots go to artifacts/ at the repository root.
Skipped without Chromium, unless $CI is set (then it fails).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_dashboard import recorded_in
from tuneforge.db.store import Store

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
WINDOW = (1400, 1000)
PAGES = [("Overview", "Overview"), ("Strategy map", "Chosen strategy")]   # (page, text it must show)
# the text of every part of a metric card that does not fit and is clipped (ellipsis or hidden overflow)
CUT_TEXT = """[...document.querySelectorAll('[data-testid="stMetric"] *')].filter(e => {
  const s = getComputedStyle(e);
  return e.scrollWidth > e.clientWidth + 1 && (s.textOverflow === 'ellipsis' || s.overflowX === 'hidden'
                                                || s.overflowX === 'clip');
}).map(e => e.innerText)"""

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI: the dashboard browser test needs chromium on PATH")
    pytest.skip("chromium is not installed", allow_module_level=True)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands, fd 4: replies)."""

    def __init__(self, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._reply_r, reply_w = os.pipe()

        def wire():   # in the child: the pipe ends on the fds Chromium expects (via fds >= 10,
            # so that neither end is overwritten on the way, and dup2 leaves them open across exec)
            high_r, high_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(reply_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(reply_w)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WINDOW[0], height=WINDOW[1],
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, timeout: float = 30.0, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium did not answer {method} in {timeout}s")
            chunk = os.read(self._reply_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()}) during {method}")
            self._buf += chunk

    def evaluate(self, expression: str):
        reply = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return reply["result"].get("value")

    def render(self, url: str, expect: str, timeout: float = 90.0) -> str:
        """Load ``url`` and wait until its text shows ``expect``, the app is not running and the
        text and the number of drawn charts have been the same for a second; returns the text."""
        self.call("Page.navigate", session=True, url=url)
        probe = ("[document.body ? document.body.innerText : '', "
                 "!!document.querySelector('[data-testid=\"stStatusWidget\"]'), "
                 "document.querySelectorAll('canvas, svg.marks').length]")
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            text, running, drawn = self.evaluate(probe)
            state = (text, running, drawn)
            if state != last:
                last, since = state, time.monotonic()
            elif expect in text and not running and time.monotonic() - since > 1.0:
                return text
            time.sleep(0.25)
        shown = last[0][:2000] if last else ""
        raise AssertionError(f"{url} did not settle showing {expect!r} in {timeout}s; it shows:\n{shown}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._reply_r)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(url: str, log: Path):
    """`tuneforge dashboard --db URL --port ...` running until the block ends; yields its base URL."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "dashboard", "--db", url,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)     # the CLI and its streamlit child
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def dashboard(tuned_db, tmp_path_factory):
    """`tuneforge dashboard` over the tuned database; yields (base URL, the CLI's output so far)."""
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    with serving(tuned_db.url, log) as base:
        yield base, log.read_text()


def test_cli_prints_url_and_database(dashboard, tuned_db):
    base, output = dashboard
    assert f"database: {tuned_db.url}" in output
    assert f"dashboard: {base}" in output


def test_pages_render_without_errors(dashboard, tmp_path):
    base, _ = dashboard
    ARTIFACTS.mkdir(exist_ok=True)
    browser = Chromium(tmp_path / "profile")
    try:
        for page, expect in PAGES:
            url = f"{base}/?page={urllib.parse.quote(page)}"
            text = browser.render(url, expect)
            shot = ARTIFACTS / f"dashboard-{re.sub(r'[^a-z]+', '-', page.lower())}.png"
            browser.screenshot(shot)
            html = browser.evaluate("document.documentElement.outerHTML")
            assert "Traceback" not in text and "Error" not in text, f"{page} shows an error:\n{text[:3000]}"
            assert 'data-testid="stException"' not in html and "stAlertContentError" not in html
            assert shot.stat().st_size > 20_000, f"{shot} looks blank"
            assert browser.evaluate(CUT_TEXT) == [], f"{page}: metric cards cut short"
            # the page's own figures say how they were obtained
            assert "predicted by the cost model for H800 x8" in text
    finally:
        browser.close()


def test_metric_cards_show_their_titles_whole_with_four_devices(tuned_db, tmp_path):
    """Four devices side by side on the Overview: no card's title, value or delta is cut short."""
    with sqlite3.connect(tuned_db.path) as src, sqlite3.connect(tmp_path / "four.db") as dst:
        src.backup(dst)
    url = f"sqlite:///{tmp_path / 'four.db'}"
    with Store(url, create=False) as store:    # the H800 x8 winners again as B200, H100 and H200 x8
        for gpu in ("B200", "H100", "H200"):
            env = dataclasses.replace(tuned_db.h800, gpu_name=gpu)
            for w in store.winners(fingerprint=tuned_db.h800.fingerprint):
                store.record_winner(recorded_in(w, env))
    browser = Chromium(tmp_path / "profile")
    try:
        with serving(url, tmp_path / "dashboard.log") as base:
            text = browser.render(f"{base}/?page=Overview", "Overview")
            assert browser.evaluate("document.querySelectorAll('[data-testid=\"stMetric\"]').length") >= 4
            assert browser.evaluate(CUT_TEXT) == []
            for gpu in ("B200", "H100", "H200", "H800"):
                assert f"TP 8 · {gpu} x8 (predicted)" in text
    finally:
        browser.close()
