"""optuna-dashboard on a real study storage, checked in headless Chromium (Debian's `chromium`)."""

import html
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("tiny-study"),  # one pytest worker runs the session's tiny study for these
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium: `make browser` installs Debian's package as root"
    ),
]
# Without the networking flags, Chromium tries to reach Google's hosts and this offline machine refuses.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_text(page: str) -> str:
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


@pytest.fixture(scope="session")  # pytest-xdist interleaves the group's modules; one server per worker
def dashboard(tiny_study, tmp_path_factory):
    """`fmsearch report` then `fmsearch dashboard` on a copy of the tiny study's storage.

    Yields (url, storage, folder).
    """
    folder = tmp_path_factory.mktemp("dashboard")
    shutil.copy(tiny_study.storage.removeprefix("sqlite:///"), folder / "studies.db")
    storage = f"sqlite:///{folder}/studies.db"
    cli = [sys.executable, "-m", "fmsearch.cli"]
    subprocess.run(
        [*cli, "report", "tiny", "--storage", storage], cwd=folder, check=True, capture_output=True
    )
    port = free_port()
    server = subprocess.Popen(
        [*cli, "dashboard", "--storage", storage, "--port", str(port)],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/studies", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the dashboard did not start: {server.stdout.read()[-2000:]}")
            time.sleep(0.3)
    yield url, storage, folder
    server.terminate()
    server.wait(timeout=10)


def render(url: str, profile: Path, *extra: str, until: str = "", tries: int = 4) -> str:
    """The page's DOM after Chromium ran its scripts; retried with more time until `until` shows."""
    page = ""
    for attempt in range(tries):
        budget = 10_000 * (attempt + 1)
        result = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget}", *extra, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        page = result.stdout
        if until in visible_text(page):
            break
    return page


def test_dashboard_lists_the_studies_and_shows_a_study_with_its_trials(dashboard, tmp_path):
    url, storage, _ = dashboard
    listing = visible_text(render(f"{url}/dashboard", tmp_path / "p1", "--dump-dom", until="tiny/labels=50%"))
    assert "tiny/labels=100%" in listing and "tiny/labels=50%" in listing

    study = optuna.load_study(study_name="tiny/labels=50%", storage=storage)
    page = f"{url}/dashboard/studies/{study._study_id}"
    text = visible_text(render(page, tmp_path / "p2", "--dump-dom", until="Intermediate values"))
    assert f"tiny/labels=50% (id={study._study_id})" in text
    assert f"Best Trial (number={study.best_trial.number})" in text
    assert "Intermediate values" in text and "trial #0" in text  # the learning curves, drawn by the dashboard
    assert "val_accuracy" in text  # the objective is named, not "Objective 0"
    for figure in ("curves.png", "search.png", "confusion.png"):
        assert figure in text  # the report's PNGs, uploaded as study artifacts

    trials = visible_text(render(f"{page}/trials", tmp_path / "p3", "--dump-dom", until="Trial 2"))
    for trial in study.trials:
        assert f"Trial {trial.number}" in trials

    screenshot = tmp_path / "study.png"
    render(page, tmp_path / "p4", "--window-size=1400,1000", f"--screenshot={screenshot}", tries=1)
    assert screenshot.stat().st_size > 20_000


def test_dashboard_keeps_serving_while_a_study_writes(dashboard):
    url, storage, _ = dashboard
    study = optuna.load_study(study_name="tiny/labels=100%", storage=storage)
    detail = f"{url}/api/studies/{study._study_id}"

    def served_trials() -> int:
        return len(json.loads(urllib.request.urlopen(detail, timeout=10).read())["trials"])

    before = served_trials()
    # Trials written as a running study writes them, with the dashboard reading between writes.
    for step in range(20):
        trial = study.ask()
        trial.report(0.5, step)
        study.tell(trial, 0.5)
        served_trials()
    deadline = time.monotonic() + 30  # the dashboard caches trial lists for a few seconds
    while served_trials() < before + 20 and time.monotonic() < deadline:
        time.sleep(1)
    assert served_trials() == before + 20
