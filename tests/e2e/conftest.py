"""Fixtures for the browser tests: a real JupyterLab on 127.0.0.1 and Debian's headless Chromium.

Chromium is never downloaded (that fails offline): Playwright drives ``/usr/bin/chromium``. Without it the
tests are skipped with the command that installs it, except under ``CI=true`` where a missing browser
fails the run (CI must not pass by skipping its browser tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = "apt-get install -y chromium"


def chromium_path() -> str | None:
    """Debian's Chromium binary, if installed."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _missing(what: str) -> None:
    message = f"browser tests need {what}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        _missing(f"Chromium; install it with `{INSTALL_HINT}` (Debian/Ubuntu), then re-run")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright Python package; `pip install playwright` (no browser download needed)")
    assert path is not None
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class JupyterServer:
    url: str
    token: str
    root: Path
    log: Path

    def lab_url(self, notebook: str) -> str:
        """The notebook opened in JupyterLab."""
        return f"{self.url}/lab/tree/{notebook}?token={self.token}"

    def notebook7_url(self, notebook: str) -> str:
        """The notebook in Notebook 7's one-document interface, or in the classic Notebook 6 (the same path)."""
        return f"{self.url}/notebooks/{notebook}?token={self.token}"

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@contextlib.contextmanager
def serve_jupyter(app: str, root: Path) -> Iterator[JupyterServer]:
    """``jupyter <app>`` on 127.0.0.1, a random free port and a random token, serving root.

    ``app`` is ``lab``, ``notebook`` (Notebook 7, a jupyter_server app) or ``notebook6``: the classic
    Notebook 6 (``jupyter notebook`` where ``notebook<7`` is installed), whose options are ``NotebookApp``'s.
    """
    settings = root / ".settings"
    # no "fetch news?" toast over the page
    notify = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notify.parent.mkdir(parents=True)
    notify.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
        # `jupyter X` runs the first `jupyter-X` on PATH: this interpreter's, not another environment's
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    log = root / "jupyter.log"
    server_app, root_dir = (
        ("NotebookApp", "notebook_dir") if app == "notebook6" else ("ServerApp", "root_dir")
    )
    cmd = [
        sys.executable, "-m", "jupyter", app.removesuffix("6"), f"--{server_app}.ip=127.0.0.1",
        f"--{server_app}.port={port}", f"--{server_app}.token={token}", "--allow-root", "--no-browser",
        f"--{server_app}.{root_dir}={root}", f"--{server_app}.port_retries=0",
        *(["--LabApp.news_url="] if app == "lab" else []),
    ]  # fmt: skip
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    server = JupyterServer(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter {app} exited with {proc.returncode}:\n{server.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter {app} did not answer within 60 s:\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[JupyterServer]:
    """``jupyter lab``, as most users start it."""
    with serve_jupyter("lab", tmp_path_factory.mktemp("lab")) as server:
        yield server


@pytest.fixture(scope="module")
def notebook7_server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[JupyterServer]:
    """``jupyter notebook`` (Notebook 7), its own server and settings so nothing carries over from the lab."""
    with serve_jupyter("notebook", tmp_path_factory.mktemp("notebook7")) as server:
        yield server


@pytest.fixture
def browser_page(chromium: str) -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page and the list its console errors are collected into."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        try:
            yield page, errors
        finally:
            browser.close()


def write_notebook(path: Path, cells: list[str]) -> None:
    """A minimal nbformat-4 notebook with the python3 kernel (so no 'Select Kernel' dialog is needed)."""
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"c{i}",
                "metadata": {},
                "outputs": [],
                "source": src,
            }
            for i, src in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """End a server the tests started: terminate, wait up to 15 s, then kill."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
