"""Run reports: ``report.json`` and a self-contained ``report.html`` (inline SVG plots, no script).

An ingest report sits beside its run manifest (``<out>/runs/<run_id>/report.*``); a rebuild report
under the index root (``<index>/reports/<started>-<version>/report.*``), holding the rebuild's
plan, its ingest run's report and the new version's index figures; an index report (the demo's,
``index build --report``) under ``<index>/reports/<version>/report.*`` (never inside the version
folder, whose files are exactly those its manifest lists). Reports hold counts, scores, timings,
file sizes and short error reasons; never embeddings, pixels or source bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from html import escape

import numpy as np
import pyarrow.parquet as pq

from pipelines.core import storage

from . import svg

HIST_BINS = 20  # at most; the bins are nice steps (0.05, 0.1, 0.2, ...) so their labels read cleanly
TOP_REASONS = 10
STATUSES = ("ok", "no_face", "error")


# ---------------------------------------------------------------- ingest runs


def run_report(run: str, analyzed: int | None = None) -> dict:
    """What one committed run did, from its manifest and shards."""
    manifest = json.loads(storage.read_text(storage.join(run, "_manifest.json")))
    faces = [s for s in manifest.get("shards", []) if s["table"] == "faces"]
    images = [s for s in manifest.get("shards", []) if s["table"] == "images"]
    counts = manifest.get("counts", {})
    return {
        "kind": "ingest",
        "run_id": manifest["run_id"],
        "uri": run,
        "engine": manifest.get("engine"),
        "model_id": manifest.get("model_id"),
        "created_at": manifest.get("created_at"),
        "finished_at": manifest.get("finished_at"),
        "counts": {k: counts.get(k, 0) for k in ("images", "ok", "no_face", "error", "faces")},
        "per_dataset": counts.get("per_dataset", {}),
        "analyzed": analyzed,
        "faces_from_runs": manifest.get("faces_from_runs"),
        "error_reasons": error_reasons(run, images),
        "det_score_histogram": det_score_histogram(run, faces),
        "throughput": throughput(run, images, manifest.get("created_at")),
    }


def read_columns(run: str, rel: str, columns: list[str]):
    fs, path = storage.url_to_fs(storage.join(run, rel))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def error_reasons(run: str, images: list[dict]) -> list[dict]:
    """The most common (stage, reason) of failed images: short texts, never pixels."""
    reasons: Counter = Counter()
    for shard in images:
        table = read_columns(run, shard["file"], ["status", "error_stage", "error"])
        for row in table.to_pylist():
            if row["status"] == "error":
                reasons[(row["error_stage"], row["error"])] += 1
    return [{"stage": s, "reason": r, "images": n} for (s, r), n in reasons.most_common(TOP_REASONS)]


def det_score_histogram(run: str, faces: list[dict]) -> dict:
    scores = [read_columns(run, s["file"], ["det_score"]).column(0).to_numpy() for s in faces]
    values = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    if not len(values):
        return {"edges": [], "counts": []}
    edges = bin_edges(float(values.min()), float(values.max()))
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=np.asarray(edges))
    return {"edges": edges, "counts": [int(c) for c in counts]}


def bin_edges(lo: float, hi: float, most: int = HIST_BINS) -> list[float]:
    """Edges at multiples of a nice step (1, 2 or 5 x 10^k) covering ``[lo, hi]`` in at most
    ``most`` bins (one bin when every value is the same)."""
    step = svg.nice_step(hi - lo, most) if hi > lo else svg.nice_step(abs(lo) or 1.0, 10)
    while True:
        first = math.floor(lo / step + 1e-9)
        last = max(math.ceil(hi / step - 1e-9), first + 1)
        if last - first <= most:
            return [round(i * step, 10) for i in range(first, last + 1)]
        step = svg.nice_step(step * (most + 1), most)  # the range straddles a boundary: the next step


def throughput(run: str, images: list[dict], started: str | None) -> list[dict]:
    """Cumulative images committed against seconds since the run started, from each shard's commit time."""
    points = []
    for shard in images:
        fs, path = storage.url_to_fs(storage.join(run, shard["file"]))
        when = commit_time(fs.info(path))
        if when is not None:
            points.append((when, int(shard["rows"])))
    if not points:
        return []
    points.sort()
    start = _epoch(started) if started else points[0][0]
    total, out = 0, []
    for when, rows in points:
        total += rows
        out.append({"seconds": round(max(when - start, 0.0), 2), "images": total})
    return out


def commit_time(info: dict) -> float | None:
    """Seconds since the epoch at which a file was written: local mtime, GCS ``updated``."""
    for key in ("mtime", "updated", "LastModified", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return _epoch(value)
        if isinstance(value, dt.datetime):
            return value.timestamp()
    return None


def _epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------- index versions


def index_figures(manifest: dict) -> dict:
    """Recall against nprobe and size on disk by kind of file, from a version's manifest."""
    sizes: Counter = Counter()
    for shard in manifest.get("shards", []):
        for kind in ("index", "ivfdata", "metadata", "ids", "vectors"):
            if shard.get(kind):
                sizes[kind] += int(shard[kind]["bytes"])
    recall = manifest.get("recall", {})
    tried = recall.get("tried") or [
        {"nprobe": 1, "recall_at_1": recall.get("at_1"), "recall_at_10": recall.get("at_10")}
    ]  # exact search: one point
    keys = ("nprobe", "rerank_factor", "recall_at_1", "recall_at_10")
    return {
        "version": manifest.get("version"),
        "model_id": manifest.get("model_id"),
        "factory": manifest.get("factory"),
        "nprobe": manifest.get("nprobe"),
        "rerank_factor": manifest.get("rerank_factor"),
        "faces": manifest.get("counts", {}).get("faces"),
        "recall_target": recall.get("target"),
        "recall_at_1": recall.get("at_1"),
        "recall_at_10": recall.get("at_10"),
        "recall_queries": recall.get("queries"),
        "recall_by_nprobe": [{k: t[k] for k in keys if t.get(k) is not None} for t in tried],
        "size_on_disk": dict(sizes),
        "build_seconds": manifest.get("build_seconds"),
        "rebuild": {k: v for k, v in (manifest.get("rebuild") or {}).items() if k != "sources"},
        "datasets": manifest.get("datasets", []),
    }


def index_report(index_root: str, manifest: dict) -> dict:
    """What ``index build`` made: the new version's figures."""
    return {
        "kind": "index",
        "index_root": index_root,
        "version": manifest.get("version"),
        "created_at": manifest.get("created_at"),
        "index": index_figures(manifest),
    }


def write_index_report(index_root: str, manifest: dict) -> tuple[str, str]:
    """``<index>/reports/<version>/report.json`` and ``report.html``; returns their URIs."""
    folder = storage.join(index_root, "reports", manifest["version"])
    return write_report(folder, index_report(index_root, manifest))


# ---------------------------------------------------------------- writing


def write_report(folder: str, report: dict) -> tuple[str, str]:
    """``report.json`` and ``report.html`` in ``folder``; returns their URIs."""
    json_uri, html_uri = storage.join(folder, "report.json"), storage.join(folder, "report.html")
    storage.write_atomic(
        json_uri, (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode()
    )
    storage.write_atomic(html_uri, render_html(report).encode())
    return json_uri, html_uri


def render_html(report: dict) -> str:
    title = f"faceaudit {report['kind']} report"
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>",
    ]
    parts += _summary_table(report)
    ingest = report if report["kind"] == "ingest" else report.get("ingest")
    if ingest:
        parts += _ingest_section(ingest)
    if report.get("index"):
        parts += _index_section(report["index"])
    parts.append("</body></html>\n")
    return "".join(parts)


CSS = (
    "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
    "td.n{text-align:right}.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee}"
)
UNKNOWN = "\u2014"  # a table cell whose value is not known


def _text(value: object) -> str | None:
    """A value as table text; None when it is unknown (the row is left out)."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# What a key of a report is called in its tables (others: the key with spaces for underscores).
LABELS = {
    "run_id": "run",
    "uri": "run folder",
    "model_id": "model",
    "created_at": "created",
    "finished_at": "finished",
    "started_at": "started",
    "analyzed": "images decoded and embedded",
    "decoded_and_embedded": "images decoded and embedded",
    "faces_from_runs": "faces reused from runs",
    "base_version": "previous version",
    "factory": "FAISS index",
    "nprobe": "nprobe (tuned)",
    "rerank_factor": "re-rank factor",
    "faces": "faces indexed",
    "recall_at_1": "recall@1",
    "recall_at_10": "recall@10",
    "recall_target": "target recall@10",
    "recall_queries": "held-out queries",
    "build_seconds": "build time (s)",
    "steps_seconds": "seconds per step",
}


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def _rows(pairs: list[tuple[str, object]]) -> str:
    """Key/value rows; a row whose value is unknown (None) is left out."""
    return "".join(
        f"<tr><th>{escape(_label(k))}</th><td>{escape(t)}</td></tr>"
        for k, v in pairs
        if (t := _text(v)) is not None
    )


def _cell(value: object, numeric: bool = False) -> str:
    text = _text(value)
    return f"<td{' class=n' if numeric else ''}>{escape(text if text is not None else UNKNOWN)}</td>"


SUMMARY_SKIP = {
    "ingest",
    "index",
    "per_dataset",
    "det_score_histogram",
    "throughput",
    "error_reasons",
    "delta",
}


SUMMARY_ORDER = (
    "kind",
    "status",
    "run_id",
    "version",
    "base_version",
    "uri",
    "index_root",
    "registry",
    "engine",
    "model_id",
    "created_at",
    "started_at",
    "finished_at",
)


def _summary_table(report: dict) -> list[str]:
    keys = sorted(report, key=lambda k: SUMMARY_ORDER.index(k) if k in SUMMARY_ORDER else len(SUMMARY_ORDER))
    pairs = [
        (k, report[k])
        for k in keys
        if k not in SUMMARY_SKIP
        and not isinstance(report[k], dict)
        and not (isinstance(report[k], list) and any(isinstance(x, dict | list) for x in report[k]))
    ]
    out = [f"<table>{_rows(pairs)}</table>"]
    delta = report.get("delta")
    if delta:
        out.append("<h2>Plan</h2><table><tr><th>data set</th><th>decision</th></tr>")
        out += [f"<tr><td>{escape(n)}</td><td>{escape(r)}</td></tr>" for n, r in delta["reasons"].items()]
        out.append("</table>")
    return out


def _ingest_section(ingest: dict) -> list[str]:
    per = ingest.get("per_dataset", {})
    names = sorted(per)
    columns = ("images", *STATUSES, "faces")
    out = [
        f"<h2>Ingest run {escape(str(ingest.get('run_id')))}</h2>",
        "<table><tr><th>data set</th>" + "".join(f"<th>{k}</th>" for k in columns) + "</tr>",
    ]
    for name in names:
        out.append(
            f"<tr><td>{escape(name)}</td>"
            + "".join(_cell(per[name].get(k, 0), True) for k in columns)
            + "</tr>"
        )
    out.append("</table>")
    charts = [
        svg.grouped_bars(
            "Images, faces and errors per data set",
            names,
            {
                "images": [per[n].get("images", 0) for n in names],
                "faces": [per[n].get("faces", 0) for n in names],
                "errors (images)": [per[n].get("error", 0) for n in names],
            },
            y_label="images or faces",
            x_label="data set",
        )
    ]
    hist = ingest.get("det_score_histogram") or {}
    if hist.get("counts"):
        charts.append(
            svg.histogram(
                "Detection scores of the faces", hist["edges"], hist["counts"], "detection score", "faces"
            )
        )
    points = ingest.get("throughput") or []
    if points:
        series = [(0.0, 0), *((p["seconds"], p["images"]) for p in points)]  # from the run's start
        charts.append(
            svg.lines(
                "Throughput: images committed over time",
                {"images": series},
                "seconds since the run started",
                "images committed",
                integer_y=True,
            )
        )
    out.append(f'<div class="charts">{"".join(charts)}</div>')
    if ingest.get("error_reasons"):
        out.append("<h3>Most common errors</h3><table><tr><th>stage</th><th>reason</th><th>images</th></tr>")
        out += [
            f"<tr>{_cell(e['stage'])}{_cell(e['reason'])}{_cell(e['images'], True)}</tr>"
            for e in ingest["error_reasons"]
        ]
        out.append("</table>")
    return out


INDEX_FIELDS = (
    "model_id",
    "factory",
    "nprobe",
    "rerank_factor",
    "faces",
    "recall_at_1",
    "recall_at_10",
    "recall_target",
    "recall_queries",
    "build_seconds",
)


def _index_section(index: dict) -> list[str]:
    rebuild = [(k, v) for k, v in index.get("rebuild", {}).items() if not isinstance(v, dict | list)]
    out = [
        f"<h2>Index version {escape(str(index.get('version')))}</h2>",
        f"<table>{_rows([(k, index.get(k)) for k in INDEX_FIELDS])}{_rows(rebuild)}</table>",
    ]
    out.append(
        f'<div class="charts">{recall_chart(index)}{size_chart(index.get("size_on_disk") or {})}</div>'
    )
    datasets = index.get("datasets") or []
    # a column no data set has a value for (a plain ingest has no registry version) is left out
    columns = [
        c
        for c in ("name", "version", "images", "faces", "fingerprint")
        if any(_text(d.get(c)) for d in datasets)
    ]
    if datasets:
        heads = {"name": "data set", "images": "images", "faces": "faces indexed"}
        out.append("<table><tr>" + "".join(f"<th>{heads.get(c, c)}</th>" for c in columns) + "</tr>")
        out += [
            "<tr>" + "".join(_cell(d.get(c), c in ("images", "faces")) for c in columns) + "</tr>"
            for d in datasets
        ]
        out.append("</table>")
    return out


def recall_chart(index: dict) -> str:
    """recall@10 (and @1) against nprobe, from the build's tuning (the manifest's ``recall.tried``),
    the chosen nprobe and the target marked; one curve per re-rank depth when several were tried.
    Exact search has no nprobe: its two recalls as bars."""
    tried = index.get("recall_by_nprobe") or []
    chosen = index.get("nprobe")
    if chosen is None:
        at = {
            key: next((t.get(key) for t in tried if t.get(key) is not None), None)
            for key in ("recall_at_1", "recall_at_10")
        }
        return svg.grouped_bars(
            "Recall of exact search (no nprobe: every face is compared)",
            ["recall@1", "recall@10"],
            {"recall": [at["recall_at_1"] or 0.0, at["recall_at_10"] or 0.0]},
            y_label="recall",
            x_label="held-out faces found among the true nearest",
            integer=False,
            y_max=1.0,
        )
    factors = sorted({t.get("rerank_factor") for t in tried if t.get("rerank_factor") is not None})
    final = index.get("rerank_factor")
    series: dict[str, list[tuple[float, float]]] = {}
    for factor in factors or [None]:
        rows = [t for t in tried if t.get("rerank_factor") == factor and t.get("recall_at_10") is not None]
        name = "recall@10" + (f", re-rank x{factor}" if len(factors) > 1 else "")
        series[name] = sorted({t["nprobe"]: t["recall_at_10"] for t in rows}.items())  # by nprobe, once each
    ones = [t for t in tried if t.get("rerank_factor") == (final if factors else None)]
    ones = [t for t in ones if t.get("recall_at_1") is not None]
    if ones:
        series["recall@1" + (f", re-rank x{final}" if len(factors) > 1 else "")] = sorted(
            {t["nprobe"]: t["recall_at_1"] for t in ones}.items()
        )
    target = index.get("recall_target")
    return svg.lines(
        "Recall against nprobe (held-out faces)",
        {name: points for name, points in series.items() if points},
        "nprobe (inverted lists probed, log scale)",
        "recall",
        y_max=1.0,
        log_x=True,
        x_marks=[(chosen, f"chosen nprobe {chosen}")],
        y_marks=[(target, f"target recall@10 {target}")] if target is not None else None,
    )


def size_chart(sizes: dict[str, int]) -> str:
    """Bytes on disk by kind of file, in the unit that suits the largest."""
    top = max(sizes.values(), default=0)
    unit, scale = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if top >= f), ("bytes", 1))
    return svg.grouped_bars(
        "Size on disk by kind of file",
        list(sizes),
        {unit: [b / scale for b in sizes.values()]},
        y_label=f"size ({unit})",
        x_label="kind of file",
        integer=unit == "bytes",
    )
