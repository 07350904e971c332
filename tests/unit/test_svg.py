"""The chart helpers of the reports (pipelines/rebuild/svg.py, report.py's rendering): pure.

Count axes tick at integers, histogram bins have distinct labels that show their range, every
axis of every chart in a report names its unit, and no table shows an unknown value as "None".
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipelines.rebuild import report, svg

NS = "{http://www.w3.org/2000/svg}"
NICE = {1, 2, 5}


def is_nice(step: float) -> bool:
    """1, 2 or 5 times a power of ten."""
    exponent = math.floor(math.log10(step) + 1e-9)
    return round(step / 10.0**exponent, 9) in NICE


def texts(chart: str, cls: str) -> list[str]:
    root = ET.fromstring(chart)
    return [t.text or "" for t in root.iter(f"{NS}text") if t.get("class") == cls]


# ---------------------------------------------------------------- integer ticks for counts

# the largest count on an axis -> its ticks (hand-written: steps of 1, 2, 5, 10, ... at most 5)
COUNT_TICKS = {
    0: [0, 1],
    1: [0, 1],
    2: [0, 1, 2],
    3: [0, 1, 2, 3],
    4: [0, 1, 2, 3, 4],  # a 4-image run: was 0, 1.1, 2.2, 3.3, 4.4
    5: [0, 1, 2, 3, 4, 5],
    6: [0, 2, 4, 6],
    7: [0, 2, 4, 6, 8],
    8: [0, 2, 4, 6, 8],
    9: [0, 2, 4, 6, 8, 10],
    10: [0, 2, 4, 6, 8, 10],
    11: [0, 5, 10, 15],
    17: [0, 5, 10, 15, 20],
    25: [0, 5, 10, 15, 20, 25],
    26: [0, 10, 20, 30],
    64: [0, 20, 40, 60, 80],
    100: [0, 20, 40, 60, 80, 100],
    101: [0, 50, 100, 150],
    340: [0, 100, 200, 300, 400],
    1000: [0, 200, 400, 600, 800, 1000],
    12345: [0, 5000, 10000, 15000],
}


@pytest.mark.parametrize("top,expected", sorted(COUNT_TICKS.items()))
def test_count_ticks_table(top, expected):
    assert svg.ticks(top, integer=True) == expected


@pytest.mark.parametrize("top", [*range(0, 1001), 4999, 5000, 5001, 99_999, 100_000, 999_999, 1_234_567])
def test_count_ticks_are_whole_nice_and_cover(top):
    values = svg.ticks(top, integer=True)
    step = values[1] - values[0]
    assert all(float(v).is_integer() for v in values), values  # never a fractional tick
    assert values[0] == 0 and values[-1] >= top and values[-2] < max(top, 1), values  # covers, no spare step
    assert all(b - a == step for a, b in zip(values, values[1:], strict=False)), values
    assert step >= 1 and is_nice(step) and 1 <= len(values) - 1 <= svg.MAX_TICKS, values
    labels = svg.tick_labels(values)
    assert len(set(labels)) == len(labels), labels
    assert all(re.fullmatch(r"\d+|\d+k|\d+(\.\d+)?M", label) for label in labels), labels


def test_large_counts_read_short():
    assert svg.tick_labels(svg.ticks(12345, integer=True)) == ["0", "5k", "10k", "15k"]
    assert svg.tick_labels(svg.ticks(1_234_567, integer=True)) == ["0", "0.5M", "1M", "1.5M"]
    assert svg.tick_labels(svg.ticks(9_999, integer=True)) == ["0", "2k", "4k", "6k", "8k", "10k"]
    assert svg.tick_labels(svg.ticks(8_000, integer=True)) == ["0", "2000", "4000", "6000", "8000"]


@pytest.mark.parametrize(
    "top,expected",
    [
        (1.0, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]),  # a recall axis
        (0.37, ["0.0", "0.1", "0.2", "0.3", "0.4"]),
        (8.9, ["0", "2", "4", "6", "8", "10"]),  # KB on disk
        (0.012, ["0.000", "0.005", "0.010", "0.015"]),
    ],
)
def test_fractional_ticks_share_their_decimals(top, expected):
    assert svg.tick_labels(svg.ticks(top)) == expected


def test_a_four_image_chart_ticks_at_whole_images():
    """The issue's example: a 4-image ingest's bars ticked at 1.1, 2.2, 3.3, 4.4."""
    chart = svg.grouped_bars("x", ["a"], {"images": [4], "faces": [3]}, "images or faces", "data set")
    assert texts(chart, "tick")[:5] == ["0", "1", "2", "3", "4"]
    throughput = svg.lines("t", {"images": [(0, 0), (1.5, 4)]}, "seconds", "images", integer_y=True)
    assert texts(throughput, "tick")[:5] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------- histogram bins


def test_bin_labels_show_each_range():
    assert svg.bin_labels([0.4, 0.45, 0.5]) == ["0.40\u20130.45", "0.45\u20130.50"]
    assert svg.bin_labels([0, 1, 2, 3]) == ["0\u20131", "1\u20132", "2\u20133"]
    assert svg.bin_labels([-0.0, 0.5]) == ["0.0\u20130.5"]  # no "-0.0"


@pytest.mark.parametrize("seed", range(40))
def test_bin_labels_are_distinct_for_numpy_bins(seed):
    """numpy's own edges (arbitrary decimals), which gave two neighbouring bins "2.3" and two "2.6"."""
    rng = np.random.default_rng(seed)
    values = rng.normal(rng.uniform(-1, 3), rng.uniform(0.001, 2), size=50)
    _, edges = np.histogram(values, bins=20)
    labels = svg.bin_labels([round(float(e), 4) for e in edges])
    assert len(set(labels)) == len(labels) == 20, labels
    for label in labels:
        lo, hi = label.split("\u2013")
        assert lo != hi and float(lo) < float(hi), label


def test_the_issues_scores_now_have_distinct_labels():
    edges = [round(2.25 + 0.02 * i, 4) for i in range(21)]  # old "%.2g": 2.3, 2.3, ..., 2.6, 2.6
    labels = svg.bin_labels(edges)
    assert len(set(labels)) == 20 and labels[0] == "2.25\u20132.27"


@pytest.mark.parametrize(
    "lo,hi",
    [(0.0, 1.0), (0.31, 3.07), (2.27, 2.68), (1.5, 1.5), (-0.2, 0.9), (0.0, 0.0), (0.8, 0.80001), (10, 2000)],
)
def test_report_bins_are_nice_and_cover(lo, hi):
    edges = report.bin_edges(lo, hi)
    steps = {round(b - a, 9) for a, b in zip(edges, edges[1:], strict=False)}
    assert len(steps) == 1 and is_nice(steps.pop()), edges
    assert edges[0] <= lo and edges[-1] >= hi and 1 <= len(edges) - 1 <= report.HIST_BINS, edges
    labels = svg.bin_labels(edges)
    assert len(set(labels)) == len(labels), labels


# ---------------------------------------------------------------- whole reports: units, marks, no None


def ingest_report() -> dict:
    return {
        "kind": "ingest",
        "run_id": "r1",
        "uri": "out/runs/r1",
        "engine": "local",
        "model_id": "dlib-hog+dlib-resnet-v1",
        "created_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:00:09+00:00",
        "counts": {"images": 4, "ok": 3, "no_face": 0, "error": 1, "faces": 3},
        "per_dataset": {"a": {"images": 4, "ok": 3, "no_face": 0, "error": 1, "faces": 3}},
        "analyzed": 4,
        "faces_from_runs": None,
        "error_reasons": [{"stage": "decode", "reason": "truncated JPEG", "images": 1}],
        "det_score_histogram": {"edges": [0.4, 0.45, 0.5], "counts": [1, 2]},
        "throughput": [{"seconds": 3.2, "images": 3}, {"seconds": 4.1, "images": 4}],
    }


def index_manifest(exact: bool = False, factors: tuple[int, ...] = (1,)) -> dict:
    tried = []
    for factor in factors:
        for nprobe in (1, 2, 4, 8):
            tried.append(
                {
                    "nprobe": nprobe,
                    "rerank_factor": factor,
                    "recall_at_1": 0.5 + nprobe / 20,
                    "recall_at_10": 0.4 + nprobe / 16 + factor / 100,
                }
            )
    return {
        "version": "20260101T000000Z-00000000",
        "model_id": "dlib-hog+dlib-resnet-v1",
        "factory": "IDMap,Flat" if exact else "IVF8,PQ16x4fs",
        "nprobe": None if exact else 4,
        "rerank_factor": factors[-1],
        "counts": {"faces": 66},
        "recall": {
            "target": 0.95,
            "at_1": 1.0 if exact else 0.7,
            "at_10": 1.0 if exact else 0.9,
            "queries": 60,
            "tried": [] if exact else tried,
        },
        "shards": [{"index": {"bytes": 15000}, "metadata": {"bytes": 7000}, "ids": {"bytes": 600}}],
        "build_seconds": 0.2,
        "datasets": [{"name": "a", "images": 4, "faces": 3}],
    }


def charts(html: str) -> list[str]:
    return re.findall(r"<svg .*?</svg>", html)


UNITS = {
    "Images, faces and errors per data set": ("data set", "images or faces"),
    "Detection scores of the faces": ("detection score", "faces"),
    "Throughput: images committed over time": ("seconds since the run started", "images committed"),
    "Recall against nprobe (held-out faces)": ("nprobe (inverted lists probed, log scale)", "recall"),
    "Recall of exact search (no nprobe: every face is compared)": (
        "held-out faces found among the true nearest",
        "recall",
    ),
    "Size on disk by kind of file": ("kind of file", "size (KB)"),
}


@pytest.mark.parametrize(
    "body",
    [
        ingest_report(),
        report.index_report("index", index_manifest()),
        report.index_report("index", index_manifest(exact=True)),
        report.index_report("index", index_manifest(factors=(10, 20, 40))),
        {
            "kind": "rebuild",
            "status": "published",
            "ingest": ingest_report(),
            "index": report.index_figures(index_manifest()),
        },
    ],
    ids=["ingest", "index", "exact-index", "index-three-depths", "rebuild"],
)
def test_every_axis_names_its_unit_and_every_chart_draws_data(body):
    html = report.render_html(body)
    found = charts(html)
    assert found
    for chart in found:
        root = ET.fromstring(chart)
        title = root.find(f"{NS}title").text
        assert (texts(chart, "x-label"), texts(chart, "y-label")) == tuple([u] for u in UNITS[title]), title
        marks = [e for e in root.iter() if e.tag in (f"{NS}circle", f"{NS}polyline")]
        marks += [
            e for e in root.iter(f"{NS}rect") if e.get("class") != "legend" and float(e.get("height")) > 0
        ]
        assert marks, title
    assert "None" not in re.sub(r"<svg .*?</svg>", "", html)  # no unknown value printed


def test_unknown_values_are_left_out_of_tables():
    html = report.render_html(ingest_report())
    assert "faces reused from runs" not in html and "faces_from_runs" not in html
    assert "<th>images decoded and embedded</th><td>4</td>" in html
    body = ingest_report() | {"faces_from_runs": ["rebuild-1", "rebuild-2"]}
    assert "<th>faces reused from runs</th><td>rebuild-1, rebuild-2</td>" in report.render_html(body)
    index = report.render_html(report.index_report("index", index_manifest()))
    assert (
        "fingerprint" not in index and "<th>version</th>" not in index.split("Index version")[1]
    )  # no values


def test_the_recall_chart_marks_the_chosen_nprobe_and_the_target():
    chart = report.recall_chart(report.index_figures(index_manifest()))
    assert texts(chart, "mark") == ["chosen nprobe 4", "target recall@10 0.95"]
    root = ET.fromstring(chart)
    (recall10, recall1) = [e.get("points").split() for e in root.iter(f"{NS}polyline")]
    assert len(recall10) == len(recall1) == 4  # nprobe 1, 2, 4, 8 from recall.tried
    marker = next(e for e in root.iter(f"{NS}line") if e.get("class") == "mark")
    x4 = float(recall10[2].split(",")[0])
    assert float(marker.get("x1")) == pytest.approx(x4, abs=0.1)  # at nprobe 4
    assert [t for t in texts(chart, "tick") if "." not in t] == ["1", "2", "4", "8"]


def test_the_recall_chart_draws_one_curve_per_rerank_depth_sorted_by_nprobe():
    manifest = index_manifest(factors=(10, 40))
    manifest["recall"]["tried"].insert(
        0, {"nprobe": 8, "rerank_factor": 40, "recall_at_1": 1, "recall_at_10": 1}
    )
    chart = report.recall_chart(report.index_figures(manifest))
    assert texts(chart, "legend") == [
        "recall@10, re-rank x10",
        "recall@10, re-rank x40",
        "recall@1, re-rank x40",
    ]
    for line in ET.fromstring(chart).iter(f"{NS}polyline"):
        xs = [float(p.split(",")[0]) for p in line.get("points").split()]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_labels_are_laid_out_inside_the_chart():
    """Estimated widths (the browser test measures real ones): slanted labels when bins are many,
    cut long names, a title that fits."""
    many = svg.histogram(
        "scores", [round(0.05 * i, 2) for i in range(21)], [1] * 20, "detection score", "faces"
    )
    assert all(
        t.get("transform", "").startswith("rotate(-45")
        for t in ET.fromstring(many).iter(f"{NS}text")
        if t.get("class") == "tick" and "\u2013" in (t.text or "")
    )
    names = [f"a-very-long-data-set-name-{i}" for i in range(30)]
    chart = svg.grouped_bars("t", names, {"images": list(range(30))}, "images", "data set")
    for t in ET.fromstring(chart).iter(f"{NS}text"):
        if t.get("class") == "tick" and t.get("transform"):
            x = float(t.get("x"))
            assert x - svg.text_width(t.text) * svg.SIN >= 0, t.text
    title = "x" * 200
    shown = texts(svg.grouped_bars(title, ["a"], {"n": [1]}, "n", "a"), "title")[0]
    assert len(shown) * svg.TITLE_CHAR_W <= svg.WIDTH and shown.endswith("\u2026")
