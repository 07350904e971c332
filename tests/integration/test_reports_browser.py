"""The reports as a person sees them: an ingest report and an index report, made by a tiny real
ingest and index build through the command line, rendered by a real headless Chromium (Debian's
``/usr/bin/chromium``, driven by Playwright).

Each page is screenshotted (under ``$FACEAUDIT_ARTIFACTS``, default the test's temporary folder)
and measured: every chart must draw data (bars, lines or dots, not just axes), every label must lie
inside its chart's box, level labels must not overlap, the page must log nothing and fetch nothing
(it is self-contained). Skipped, saying why, only when Chromium or Playwright is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.rebuild.report import render_html
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, NEEDS_BROWSER, write_small_copies

VIEWPORT = {"width": 1200, "height": 900}
SERIES_COLORS = ("#3b6ea5", "#e07b39")  # the first two series colours (pipelines/rebuild/svg.py)

pytestmark = NEEDS_BROWSER

# Per chart (<svg>): its title, how many data marks it draws (a rect that is not a legend swatch,
# circle, polyline or path, with a non-empty box), the labels that leave the chart's box, and the
# pairs of level labels (no rotation) whose boxes overlap.
INSPECT = """
() => Array.from(document.querySelectorAll('svg')).map((svg, i) => {
  const box = svg.getBoundingClientRect();
  const title = (svg.querySelector('title') || {}).textContent || `chart ${i}`;
  const marks = Array.from(svg.querySelectorAll('rect:not(.legend), circle, polyline, path'))
    .filter(e => {
      const b = e.getBBox();
      return e.tagName === 'polyline' ? (b.width > 0 || b.height > 0) : (b.width > 0 && b.height > 0);
    }).length;
  const texts = Array.from(svg.querySelectorAll('text')).filter(t => t.textContent.trim());
  const outside = texts.filter(t => {
    const r = t.getBoundingClientRect();
    return r.left < box.left - 0.5 || r.right > box.right + 0.5
        || r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5;
  }).map(t => t.textContent);
  const level = texts.filter(t => !t.hasAttribute('transform'))
    .map(t => [t.textContent, t.getBoundingClientRect()]);
  const overlaps = [];
  for (let a = 0; a < level.length; a++) for (let b = a + 1; b < level.length; b++) {
    const [ta, ra] = level[a], [tb, rb] = level[b];
    if (ra.left < rb.right - 1 && rb.left < ra.right - 1 && ra.top < rb.bottom - 1 && rb.top < ra.bottom - 1)
      overlaps.push(`${ta} / ${tb}`);
  }
  const labels = Array.from(svg.querySelectorAll('text.x-label, text.y-label')).map(t => t.textContent);
  return {title, marks, outside, overlaps, labels};
})
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("FACEAUDIT_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def reports(tmp_path_factory, faces_dir) -> dict[str, Path]:
    """A tiny real ingest through ``faceaudit ingest`` (two data sets of three 240 px copies of the
    shared photos, plus a truncated file: an error row) and ``faceaudit index build --report`` of
    it, as an inverted file (4 lists) so that nprobe is tuned; their report.html files."""
    root = tmp_path_factory.mktemp("reports")
    photos = sorted(faces_dir.glob("img*.jpg"))[:6]
    for name, chosen in (("alpha", photos[:3]), ("beta", photos[3:])):
        (root / name).mkdir()
        write_small_copies(chosen, root / name, 240)
    first = sorted((root / "alpha").iterdir())[0]
    (root / "alpha" / "broken.jpg").write_bytes(first.read_bytes()[:600])
    cli = CliRunner()
    ingest = cli.invoke(
        app,
        [
            "ingest",
            *("--dataset", f"alpha={root / 'alpha'}", "--dataset", f"beta={root / 'beta'}"),
            *("--out", str(root / "out"), "--workers", "1", "--images-per-shard", "3", "--no-progress"),
        ],
    )
    assert ingest.exit_code == 0, ingest.output
    (run,) = (root / "out" / "runs").iterdir()
    build = cli.invoke(
        app,
        [
            "index",
            "build",
            "--runs",
            str(run),
            "--out",
            str(root / "index"),
            "--flat-max",
            "0",
            "--nlist",
            "4",
        ]
        + ["--report"],
    )
    assert build.exit_code == 0, build.output
    (index_report,) = (root / "index" / "reports").glob("*/report.html")
    assert f"report: {index_report}" in " ".join(build.output.split())
    return {"ingest": run / "report.html", "index": index_report}


def render(browser, html: Path, shot: Path) -> list[dict]:
    """Open ``html``, screenshot the whole page to ``shot``; each chart's measurements (INSPECT).
    Fails on any console message, page error or request other than the page itself."""
    page = browser.new_page(viewport=VIEWPORT)
    logged, requests = [], []
    page.on("console", lambda m: logged.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: logged.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(html.as_uri())
        page.screenshot(path=str(shot), full_page=True)
        charts = page.evaluate(INSPECT)
    finally:
        page.close()
    assert shot.exists() and not logged, logged
    assert requests == [html.as_uri()], requests  # self-contained: nothing else is fetched
    return charts


def problems(charts: list[dict]) -> list[str]:
    out = []
    for chart in charts:
        if not chart["marks"]:
            out.append(f"{chart['title']}: no data marks (only axes)")
        out += [f"{chart['title']}: label outside the chart: {t!r}" for t in chart["outside"]]
        out += [f"{chart['title']}: labels overlap: {p}" for p in chart["overlaps"]]
        if len([label for label in chart["labels"] if label.strip()]) < 2:
            out.append(f"{chart['title']}: an axis has no label (unit): {chart['labels']}")
    return out


def colored_pixels(shot: Path, color: str) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).sum(axis=1) < 30).sum())


def test_ingest_report_renders(browser, reports, artifacts):
    shot = artifacts / "ingest-report.png"
    charts = render(browser, reports["ingest"], shot)
    assert [c["title"] for c in charts] == [
        "Images, faces and errors per data set",
        "Detection scores of the faces",
        "Throughput: images committed over time",
    ]
    assert not problems(charts), problems(charts)
    for color in SERIES_COLORS:  # bars of images and of faces are drawn
        assert colored_pixels(shot, color) > 500, color
    html = reports["ingest"].read_text()
    assert ">None<" not in html and "\u2013" in html  # no unknown rows; bins labelled by range


def test_index_report_renders(browser, reports, artifacts):
    shot = artifacts / "index-report.png"
    charts = render(browser, reports["index"], shot)
    assert [c["title"] for c in charts] == [
        "Recall against nprobe (held-out faces)",
        "Size on disk by kind of file",
    ]
    assert not problems(charts), problems(charts)
    for color in SERIES_COLORS:  # recall@10 and recall@1 curves
        assert colored_pixels(shot, color) > 300, color
    manifest = json.loads(reports["index"].with_name("report.json").read_text())["index"]
    assert f"chosen nprobe {manifest['nprobe']}" in reports["index"].read_text()


def test_rebuild_report_renders(browser, reports, artifacts):
    """A rebuild report (the plan, its ingest run and the new version on one page; moved here from
    test_rebuild.py), made from the two reports above: five charts, the series colours drawn."""
    ingest = json.loads(reports["ingest"].with_name("report.json").read_text())
    index = json.loads(reports["index"].with_name("report.json").read_text())["index"]
    body = {
        "kind": "rebuild",
        "status": "published",
        "version": index["version"],
        "base_version": None,
        "delta": {"reasons": {"alpha": "new data set", "beta": "new data set"}},
        "decoded_and_embedded": ingest["analyzed"],
        "ingest": ingest,
        "index": index,
    }
    html = artifacts / "rebuild-report.html"
    html.write_text(render_html(body))
    shot = artifacts / "rebuild-report.png"
    charts = render(browser, html, shot)
    assert len(charts) == 5 and not problems(charts), problems(charts)
    for color in SERIES_COLORS:  # bars and lines are drawn
        assert colored_pixels(shot, color) > 500, color


def test_the_checks_catch_an_empty_chart_and_a_label_outside(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<!doctype html><html><body><svg width="200" height="100" viewBox="0 0 200 100">'
        "<title>bad</title>"
        '<line x1="10" x2="190" y1="90" y2="90" stroke="#888"/>'
        '<rect class="legend" x="5" y="5" width="10" height="10"/>'
        '<text class="x-label" x="150" y="98">a label far too long for this box</text>'
        '<text class="y-label" x="10" y="50">count</text>'
        '<text x="12" y="50">count</text>'
        "</svg></body></html>"
    )
    found = problems(render(browser, page, tmp_path / "bad.png"))
    assert found == [
        "bad: no data marks (only axes)",
        "bad: label outside the chart: 'a label far too long for this box'",
        "bad: labels overlap: count / count",
    ]
