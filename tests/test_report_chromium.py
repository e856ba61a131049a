"""The HTML report in a real browser: headless Chromium loads the page offline; every figure decodes, the tables exist.

The page's inline script records, on load, how many ``<img>`` elements are complete with a natural width
(``data-images-loaded`` / ``data-images-total``) and how many tables exist (``data-tables``) on ``<body>``;
``--dump-dom`` gives back the DOM after the script ran. A screenshot must not be blank.

Skipped when no Chromium is installed, unless ``MERGELAB_REQUIRE_CHROMIUM=1`` (CI sets it after installing
the Debian package ``chromium``), then a missing browser is a failure. ``MERGELAB_CHROMIUM`` names the
binary explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mergelab.report.html import write_html
from test_report_html import full_document, small_document

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def _chromium() -> str:
    explicit = os.environ.get("MERGELAB_CHROMIUM")
    found = explicit if explicit and Path(explicit).is_file() else next(
        (p for p in map(shutil.which, CANDIDATES) if p), None)
    if found is None:
        message = f"no headless Chromium found ({', '.join(CANDIDATES)}; or set MERGELAB_CHROMIUM)"
        if os.environ.get("MERGELAB_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + " but MERGELAB_REQUIRE_CHROMIUM=1")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


def _run(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mergelab-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "HOME": profile})


def _body(binary: str, page: Path) -> dict[str, str]:
    proc = _run(binary, "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri())
    m = re.search(r"<body([^>]*)>", proc.stdout)
    assert m, f"chromium printed no DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1)))


def test_figures_and_tables_render_in_chromium(chromium, tmp_path):
    doc = full_document()
    page = write_html(doc, tmp_path / "report.html")
    body = _body(chromium, page)
    n_tables = sum(len(s.tables) + bool(s.verdicts) for s in doc.sections)
    assert body.get("ready") == "1", body
    assert int(body["images-total"]) == len(doc.figures()) == int(body["figures"])
    assert int(body["images-loaded"]) == len(doc.figures()), body  # every embedded PNG decoded
    assert int(body["tables"]) == n_tables == int(body["tables-expected"])


def test_combined_page_renders_and_screenshot_is_not_blank(chromium, tmp_path):
    docs = [small_document("A"), small_document("B")]
    page = write_html(docs, tmp_path / "both.html")
    body = _body(chromium, page)
    assert body.get("ready") == "1" and int(body["images-loaded"]) == int(body["images-total"]) == 2
    assert int(body["tables"]) == 4
    shot = tmp_path / "shot.png"
    proc = _run(chromium, "--window-size=1000,1400", f"--screenshot={shot}", page.resolve().as_uri())
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    import matplotlib.image as mpimg
    import numpy as np

    pixels = np.asarray(mpimg.imread(shot))[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 900
    assert float(pixels.std()) > 0.05  # text, tables and plots, not a blank page
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.001 < dark < 0.5
