"""``faceaudit index build|info`` and ``faceaudit search``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from indexing import bundle, signing
from indexing.build import build_index
from indexing.copies import Copies
from indexing.options import BuildOptions, default, describe
from indexing.photos import FaceMatches, PhotoSearch, search_photos
from indexing.runners import shard_runner
from indexing.search import Hit, Index, open_index
from pipelines.core import storage
from pipelines.core.errors import FaceauditError

from .common import err, fail, out

SIGNING_KEY_HELP = (
    "sign the manifest with this Ed25519 private key (PEM; faceaudit keygen writes one); "
    f"default: ${signing.ENV_SIGNING_KEY}"
)
PUBLIC_KEY_HELP = (
    "refuse a bundle not signed by this Ed25519 public key (PEM); "
    f"default: ${signing.ENV_PUBLIC_KEY}, else signatures are not checked"
)

index_app = typer.Typer(help="Build and inspect index bundles of face embeddings.", no_args_is_help=True)


# unknown options (Beam pipeline options) land in the positional run list, which splits them off
@index_app.command("build", context_settings={"ignore_unknown_options": True})
def build(
    runs: Annotated[list[str], typer.Option("--runs", help="<out> roots or run folders; more may follow")],
    out_uri: Annotated[str, typer.Option("--out", help="index root (local folder or gs://...)")],
    more_runs: Annotated[list[str] | None, typer.Argument(help="further run URIs (--runs A B C)")] = None,
    max_bytes_per_vector: Annotated[
        int, typer.Option(help=describe("max_bytes_per_vector").replace("None:", "0:"))
    ] = 0,
    opq: Annotated[bool, typer.Option(help=describe("opq"))] = default("opq"),
    rerank: Annotated[bool, typer.Option(help=describe("rerank"))] = default("rerank"),
    rerank_factor: Annotated[int, typer.Option(help=describe("rerank_factor"))] = default("rerank_factor"),
    max_rerank_factor: Annotated[int, typer.Option(help=describe("max_rerank_factor"))] = default(
        "max_rerank_factor"
    ),
    on_disk: Annotated[bool, typer.Option(help=describe("on_disk"))] = default("on_disk"),
    target_recall: Annotated[float, typer.Option(help=describe("target_recall"))] = default("target_recall"),
    vectors_per_shard: Annotated[int, typer.Option(help=describe("vectors_per_shard"))] = default(
        "vectors_per_shard"
    ),
    recall_queries: Annotated[int, typer.Option(help=describe("recall_queries"))] = default("recall_queries"),
    seed: Annotated[int, typer.Option(help=describe("seed"))] = default("seed"),
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help=describe("use_gpu"))] = None,
    flat_max: Annotated[int, typer.Option(help=describe("flat_max"))] = default("flat_max"),
    nlist: Annotated[int | None, typer.Option(help=describe("nlist"))] = None,
    engine: Annotated[str, typer.Option(help="where the per-shard adds run: local | ray | beam")] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: the cluster to join (default: RAY_ADDRESS, else a local Ray)"),
    ] = None,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help=SIGNING_KEY_HELP)] = None,
    report: Annotated[
        bool,
        typer.Option(
            "--report/--no-report",
            help="write report.json and report.html (recall against nprobe, size on disk) under "
            "INDEX/reports/<version>/",
        ),
    ] = True,
) -> None:
    """Turn committed runs into a new index version and point INDEX/CURRENT at it.

    With --engine beam, arguments that start with -- after the runs are Beam pipeline options,
    e.g. --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp."""
    extra = [*runs, *(more_runs or [])]
    run_uris = [a for a in extra if not a.startswith("--")]
    beam_args = [a for a in extra if a.startswith("--")]
    try:
        opts = BuildOptions(
            max_bytes_per_vector=max_bytes_per_vector or None,
            opq=opq,
            rerank=rerank,
            rerank_factor=rerank_factor,
            on_disk=on_disk,
            target_recall=target_recall,
            vectors_per_shard=vectors_per_shard,
            recall_queries=recall_queries,
            seed=seed,
            use_gpu=gpu,
            flat_max=flat_max,
            nlist=nlist,
            max_rerank_factor=max_rerank_factor,
        )
        key = signing.signing_key(signing_key)  # a bad key file fails before any work
        runner = shard_runner(engine, ray_address, beam_args)
        with signing.signing_with(key):
            result = build_index(run_uris, out_uri, opts, runner)
    except (FaceauditError, ValueError) as exc:  # ValueError: pydantic's check of an option
        fail(exc)
    m = result.manifest
    out.print(
        f"built {result.folder} in {result.seconds:.1f} s: {m['counts']['faces']} faces, "
        f"{m['factory']}, nprobe {m['nprobe']}, recall@10 {m['recall']['at_10']:.3f}"
    )
    if m["recall"]["at_10"] < m["recall"]["target"]:
        # every nprobe was tried: the codes are too coarse for this collection at this budget
        err.print(
            f"[yellow]warning:[/yellow] recall@10 {m['recall']['at_10']:.3f} is below the target "
            f"{m['recall']['target']}; raise --max-bytes-per-vector or --max-rerank-factor"
        )
    if report:
        from pipelines.rebuild.report import write_index_report

        out.print(f"report: {write_index_report(out_uri, m)[1]}", soft_wrap=True)


@index_app.command("info")
def info(
    index: Annotated[str, typer.Argument(help="index root (uses CURRENT) or a version folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """Show an index version: model, counts per data set, recall and size on disk."""
    try:
        folder, _ = bundle.resolve(index)
        m = bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))
    except FaceauditError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(m, indent=2))
        return
    for line in info_lines(m):
        out.print(line)
    table = Table("data set", "version", "images", "faces")
    for d in m["datasets"]:
        table.add_row(d["name"], d["version"], str(d["images"]), str(d["faces"]))
    out.print(table)


def info_lines(m: dict) -> list[str]:
    files = list(bundle.bundle_files(m))
    size = sum(f["bytes"] for f in files)
    ram = sum(s["index"]["bytes"] + s.get("ids", {}).get("bytes", 0) for s in m["shards"])
    rec = m["recall"]
    return [
        f"version      {m['version']}  (created {m['created_at']}, format {m['format']})",
        f"model        {m['model_id']}  dim {m['dim']}, {m['metric']}, "
        f"match threshold {m['match_threshold']}",
        f"index        {m['factory']}  nprobe {m['nprobe']}, rerank x{m['rerank_factor']}, "
        f"on-disk lists {m['on_disk']}, built on {'GPU' if m.get('built_on_gpu') else 'CPU'}",
        f"faces        {m['counts']['faces']} ({m['counts']['duplicates']} duplicates dropped) "
        f"in {len(m['shards'])} shard(s) from {len(m['runs'])} run(s)",
        f"recall       @1 {rec['at_1']:.4f}  @10 {rec['at_10']:.4f} (target {rec['target']}, "
        f"{rec['queries']} held-out queries)",
        f"size on disk {size / 1e6:.1f} MB in {len(files) + 1} files; "
        f"FAISS shards (held in RAM unless on-disk) {ram / 1e6:.1f} MB",
    ]


def search(
    photos: Annotated[list[str], typer.Argument(help="photos to look for (local paths or URIs)")],
    index: Annotated[str, typer.Option("--index", help="index root (uses CURRENT) or a version folder")],
    k: Annotated[int, typer.Option("-k", "--k", help="nearest faces looked at per face in a photo")] = 10,
    threshold: Annotated[
        float | None,
        typer.Option(help="cosine similarity for a match (default: the model's calibrated threshold)"),
    ] = None,
    nprobe: Annotated[int | None, typer.Option(help="inverted lists probed (default: the tuned one)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
    public_key: Annotated[str | None, typer.Option("--public-key", help=PUBLIC_KEY_HELP)] = None,
) -> None:
    """Find every face of each photo in the index, with the same model the index was built from."""
    try:
        idx = open_index(index, public_key=public_key)
        report = search_report(idx, photos, k, threshold, nprobe)
    except FaceauditError as exc:
        fail(exc)
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)


def search_report(
    idx: Index, photos: list[str] | list[Path], k: int, threshold: float | None, nprobe: int | None
) -> dict:
    """What ``faceaudit search --json`` prints: per photo, per face, the matching indexed faces."""
    copies = Copies.open(idx.folder, idx.manifest, idx.erased)  # None: a bundle built before copies
    return report_dict(search_photos(idx, photos, k, threshold, nprobe), copies)


def report_dict(found: PhotoSearch, copies: Copies | None = None) -> dict:
    return {
        "index": found.version,
        "model_id": found.model_id,
        "threshold": found.threshold,
        "k": found.k,
        "photos": [
            {
                "photo": p.photo,
                "status": p.status,
                "error": p.error,
                "faces": [face_dict(f, copies) for f in p.faces],
            }
            for p in found.photos
        ],
    }


def face_dict(face: FaceMatches, copies: Copies | None = None) -> dict:
    return {
        "face_index": face.face_index,
        "bbox": face.bbox,
        "det_score": face.det_score,
        "images": face.images,
        "datasets": face.datasets,
        "more_may_exist": face.more_may_exist,
        "matches": [hit_dict(h, copies) for h in face.matches],
    }


def hit_dict(h: Hit, copies: Copies | None = None) -> dict:
    counts = copies.copy_counts(h.image_sha256) if copies is not None else None
    return {
        "face_id": h.face_id,
        "score": round(h.score, 6),
        "image_sha256": h.image_sha256,
        "face_index": h.face_index,
        "bbox": list(h.bbox),
        "det_score": h.det_score,
        "occurrences": [{"dataset": o.dataset, "source_uri": o.source_uri} for o in h.occurrences],
        # the photo's occurrences, its re-encoded copies' included, per data set (null: not known)
        "copies": {"occurrences": sum(counts.values()), "datasets": counts} if counts is not None else None,
    }


def print_report(report: dict) -> None:
    for photo in report["photos"]:
        if not photo["faces"]:
            why = f"{photo['status']}: {photo['error']}" if photo["error"] else photo["status"]
            out.print(f"{photo['photo']}: no face found ({why})")
            continue
        for face in photo["faces"]:
            box = ", ".join(f"{v:.0f}" for v in face["bbox"])
            more = f" (all top {report['k']} match; raise -k to see more)" if face["more_may_exist"] else ""
            line = (
                f"{photo['photo']} face {face['face_index']} at ({box}): this face appears in "
                f"{face['images']} image(s) of {len(face['datasets'])} data set(s){more}"
            )
            out.print(line, soft_wrap=True)
            table = Table("score", "data set", "box", "det score", "copies of the photo")
            table.add_column("source", overflow="fold")  # the full URI, folded: people need all of it
            for m in face["matches"]:
                for o in m["occurrences"]:
                    table.add_row(
                        f"{m['score']:.3f}",
                        o["dataset"],
                        ", ".join(f"{v:.0f}" for v in m["bbox"]),
                        f"{m['det_score']:.2f}",
                        copies_text(m["copies"]),
                        o["source_uri"],
                    )
            if face["matches"]:
                out.print(table)


def copies_text(copies: dict | None) -> str:
    """'3: a (2), b (1)': the photo's occurrences, re-encoded copies included, per data set."""
    if copies is None:
        return "?"
    return f"{copies['occurrences']}: " + ", ".join(f"{n} ({c})" for n, c in copies["datasets"].items())


def keygen(
    out_dir: Annotated[str, typer.Option("--out", help="folder for the key pair (created if missing)")],
) -> None:
    """Write a new Ed25519 key pair for signing index bundles: the private key (mode 0600) for
    --signing-key or FACEAUDIT_SIGNING_KEY, the public key for --public-key or FACEAUDIT_PUBLIC_KEY."""
    try:
        private, public = signing.keygen(out_dir)
        key_id = signing.key_id(signing.load_public_key(public))
    except FaceauditError as exc:
        fail(exc)
    out.print(f"private key {private} (keep it secret; mode 0600)\npublic key  {public} (key {key_id})")
