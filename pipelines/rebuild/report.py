"""Run reports: ``report.json`` and a self-contained ``report.html`` (inline SVG plots, no script).

An ingest report sits beside its run manifest (``<out>/runs/<run_id>/report.*``); a rebuild report
under the index root (``<index>/reports/<started>-<version>/report.*``), holding the rebuild's
plan, its ingest run's report and the new version's index figures. Reports hold counts, scores,
timings, file sizes and short error reasons; never embeddings, pixels or source bytes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from html import escape

import numpy as np
import pyarrow.parquet as pq

from pipelines.core import storage

from . import svg

HIST_BINS = 20
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
    counts, edges = np.histogram(values, bins=HIST_BINS)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


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
    return {
        "version": manifest.get("version"),
        "factory": manifest.get("factory"),
        "nprobe": manifest.get("nprobe"),
        "faces": manifest.get("counts", {}).get("faces"),
        "recall_target": recall.get("target"),
        "recall_at_10": recall.get("at_10"),
        "recall_by_nprobe": [{k: t.get(k) for k in ("nprobe", "recall_at_1", "recall_at_10")} for t in tried],
        "size_on_disk": dict(sizes),
        "build_seconds": manifest.get("build_seconds"),
        "rebuild": {k: v for k, v in (manifest.get("rebuild") or {}).items() if k != "sources"},
        "datasets": manifest.get("datasets", []),
    }


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
    ".charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee}"
)


def _rows(pairs: list[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in pairs)


def _summary_table(report: dict) -> list[str]:
    skip = {"ingest", "index", "per_dataset", "det_score_histogram", "throughput", "error_reasons", "delta"}
    pairs = [(k, v) for k, v in report.items() if k not in skip and not isinstance(v, dict | list)]
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
    out = [
        f"<h2>Ingest run {escape(str(ingest.get('run_id')))}</h2>",
        "<table><tr><th>data set</th>"
        + "".join(f"<th>{k}</th>" for k in ("images", *STATUSES, "faces"))
        + "</tr>",
    ]
    for name in names:
        out.append(
            f"<tr><td>{escape(name)}</td>"
            + "".join(f"<td>{per[name].get(k, 0)}</td>" for k in ("images", *STATUSES, "faces"))
            + "</tr>"
        )
    out.append("</table>")
    if ingest.get("analyzed") is not None:
        out.append(f"<p>Images decoded and embedded: {ingest['analyzed']}</p>")
    charts = [
        svg.grouped_bars(
            "Images, faces and errors per data set",
            names,
            {
                "images": [per[n].get("images", 0) for n in names],
                "faces": [per[n].get("faces", 0) for n in names],
                "errors": [per[n].get("error", 0) for n in names],
            },
        )
    ]
    hist = ingest.get("det_score_histogram") or {}
    if hist.get("counts"):
        charts.append(svg.histogram("Detection scores", hist["edges"], hist["counts"], "faces"))
    points = ingest.get("throughput") or []
    if points:
        series = [(0.0, 0), *((p["seconds"], p["images"]) for p in points)]  # from the run's start
        charts.append(
            svg.lines(
                "Throughput: images committed over time",
                {"images": series},
                "seconds since the run started",
                "images",
            )
        )
    out.append(f'<div class="charts">{"".join(charts)}</div>')
    if ingest.get("error_reasons"):
        out.append("<h3>Most common errors</h3><table><tr><th>stage</th><th>reason</th><th>images</th></tr>")
        out += [
            f"<tr><td>{escape(str(e['stage']))}</td><td>{escape(str(e['reason']))}</td><td>{e['images']}</td></tr>"
            for e in ingest["error_reasons"]
        ]
        out.append("</table>")
    return out


INDEX_FIELDS = ("factory", "nprobe", "faces", "recall_at_10", "recall_target", "build_seconds")


def _index_section(index: dict) -> list[str]:
    out = [
        f"<h2>Index version {escape(str(index.get('version')))}</h2>",
        f"<table>{_rows([(k, index.get(k)) for k in INDEX_FIELDS])}"
        f"{_rows([(k, v) for k, v in index.get('rebuild', {}).items() if not isinstance(v, dict | list)])}"
        "</table>",
    ]
    tried = index.get("recall_by_nprobe") or []
    sizes = index.get("size_on_disk") or {}
    exact = len(tried) == 1 and index.get("nprobe") is None
    charts = [
        svg.lines(
            "Recall against nprobe" + (" (exact search: one point)" if exact else ""),
            {
                "recall@10": [(t["nprobe"], t["recall_at_10"] or 0) for t in tried],
                "recall@1": [(t["nprobe"], t["recall_at_1"] or 0) for t in tried],
            },
            "nprobe",
            "recall",
            y_max=1.0,
            log_x=True,
        ),
        size_chart(sizes),
    ]
    out.append(f'<div class="charts">{"".join(charts)}</div>')
    datasets = index.get("datasets") or []
    if datasets:
        out.append(
            "<table><tr><th>data set</th><th>version</th><th>images</th><th>faces</th>"
            "<th>fingerprint</th></tr>"
        )
        out += [
            f"<tr><td>{escape(d['name'])}</td><td>{escape(str(d.get('version')))}</td><td>{d.get('images')}</td>"
            f"<td>{d.get('faces')}</td><td>{escape(str(d.get('fingerprint', '')))}</td></tr>"
            for d in datasets
        ]
        out.append("</table>")
    return out


def size_chart(sizes: dict[str, int]) -> str:
    """Bytes on disk by kind of file, in the unit that suits the largest."""
    top = max(sizes.values(), default=0)
    unit, scale = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if top >= f), ("bytes", 1))
    return svg.grouped_bars(
        f"Size on disk ({unit})", list(sizes), {unit: [b / scale for b in sizes.values()]}, unit
    )
