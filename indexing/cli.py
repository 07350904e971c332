"""``faceaudit index build|info`` and ``faceaudit search`` (registered by pipelines/cli.py)."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipelines.core import storage
from pipelines.core.errors import ConfigError, FaceauditError

from . import bundle
from .build import BuildOptions, build_index
from .params import FLAT_MAX
from .search import Hit, Index, open_index

index_app = typer.Typer(help="Build and inspect index bundles of face embeddings.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


# unknown options (Beam pipeline options) land in the positional run list, which splits them off
@index_app.command("build", context_settings={"ignore_unknown_options": True})
def build(
    runs: Annotated[list[str], typer.Option("--runs", help="<out> roots or run folders; more may follow")],
    out_uri: Annotated[str, typer.Option("--out", help="index root (local folder or gs://...)")],
    more_runs: Annotated[list[str] | None, typer.Argument(help="further run URIs (--runs A B C)")] = None,
    max_bytes_per_vector: Annotated[
        int,
        typer.Option(help="RAM budget per vector, codes plus 8-byte id; 0: no budget (exact or IVF-Flat)"),
    ] = 0,
    opq: Annotated[bool, typer.Option(help="rotate with OPQ before PQ (slower build)")] = False,
    rerank: Annotated[
        bool, typer.Option(help="exact re-ranking of PQ candidates from a float16 store on disk")
    ] = True,
    rerank_factor: Annotated[
        int, typer.Option(help="candidates re-ranked per wanted hit (the first depth tried)")
    ] = 10,
    max_rerank_factor: Annotated[
        int, typer.Option(help="re-rank depth doubles up to this while recall@10 misses the target")
    ] = 80,
    on_disk: Annotated[bool, typer.Option(help="inverted lists in memory-mapped .ivfdata files")] = False,
    target_recall: Annotated[float, typer.Option(help="recall@10 that the tuned nprobe must reach")] = 0.95,
    vectors_per_shard: Annotated[int, typer.Option(help="vectors per FAISS shard")] = 1_000_000,
    recall_queries: Annotated[int, typer.Option(help="held-out queries for the recall measurement")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the training and query samples")] = 1234,
    gpu: Annotated[
        bool | None,
        typer.Option("--gpu/--no-gpu", help="train and add on a GPU; default: when faiss sees one"),
    ] = None,
    flat_max: Annotated[int, typer.Option(help="exact search up to this many vectors")] = FLAT_MAX,
    nlist: Annotated[int | None, typer.Option(help="inverted lists (default: about 4*sqrt(n))")] = None,
    engine: Annotated[str, typer.Option(help="where the per-shard adds run: local | ray | beam")] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: the cluster to join (default: RAY_ADDRESS, else a local Ray)"),
    ] = None,
) -> None:
    """Turn committed runs into a new index version and point INDEX/CURRENT at it.

    With --engine beam, arguments that start with -- after the runs are Beam pipeline options,
    e.g. --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp."""
    extra = [*runs, *(more_runs or [])]
    run_uris = [a for a in extra if not a.startswith("--")]
    beam_args = [a for a in extra if a.startswith("--")]
    opts = BuildOptions(
        max_bytes_per_vector or None,
        opq,
        rerank,
        rerank_factor,
        on_disk,
        target_recall,
        vectors_per_shard,
        recall_queries,
        seed,
        gpu,
        flat_max,
        nlist,
        max_rerank_factor=max_rerank_factor,
    )
    try:
        runner = shard_runner(engine, ray_address, beam_args)
        result = build_index(run_uris, out_uri, opts, runner)
    except FaceauditError as exc:
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


def shard_runner(engine: str, ray_address: str | None, beam_args: list[str]):
    """The engine that runs the per-shard adds (None: here); engine modules load only when chosen."""
    if beam_args and engine != "beam":
        raise ConfigError(f"unknown arguments {beam_args} (pipeline options are for --engine beam)")
    if engine == "ray":
        from .build_ray import make_runner

        return make_runner(ray_address)
    if engine == "beam":
        from .build_beam import make_runner as make_beam_runner

        return make_beam_runner(beam_args)
    if engine != "local":
        raise ConfigError(f"--engine {engine}: expected local, ray or beam")
    return None


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
) -> None:
    """Find every face of each photo in the index, with the same model the index was built from."""
    try:
        idx = open_index(index)
        report = search_photos(idx, photos, k, threshold, nprobe)
    except FaceauditError as exc:
        fail(exc)
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)


def search_photos(
    idx: Index, photos: list[str] | list[Path], k: int, threshold: float | None, nprobe: int | None
) -> dict:
    """Per photo, per face found in it: the indexed faces at or above the threshold."""
    from pipelines.core.config import DecodeConfig, ModelConfig
    from pipelines.core.models import load_model
    from pipelines.core.stages import analyze_bytes

    from .errors import QueryError

    model = load_model(ModelConfig.model_validate(idx.manifest["model"]))
    if model.model_id != idx.model_id:
        raise QueryError(f"the index's model config loads {model.model_id!r}, not {idx.model_id!r}")
    cut = idx.match_threshold if threshold is None else threshold
    results = []
    for photo in photos:
        result = analyze_bytes(storage.read_bytes(str(photo)), model, DecodeConfig.model_validate({}))
        faces = []
        for i, face in enumerate(result.faces):
            hits = [h for h in idx.search(face.embedding, k, nprobe, model.model_id)[0] if h.score >= cut]
            faces.append(
                {
                    "face_index": i,
                    "bbox": [float(v) for v in face.bbox],
                    "det_score": float(face.det_score),
                    **summary(hits),
                    "more_may_exist": len(hits) == k,
                    "matches": [hit_dict(h) for h in hits],
                }
            )
        results.append({"photo": str(photo), "status": result.status, "error": result.error, "faces": faces})
    return {
        "index": idx.manifest["version"],
        "model_id": idx.model_id,
        "threshold": cut,
        "k": k,
        "photos": results,
    }


def summary(hits: list[Hit]) -> dict:
    images = {h.image_sha256 for h in hits}
    datasets = sorted({o.dataset for h in hits for o in h.occurrences})
    return {"images": len(images), "datasets": datasets}


def hit_dict(h: Hit) -> dict:
    return {
        "face_id": h.face_id,
        "score": round(h.score, 6),
        "image_sha256": h.image_sha256,
        "face_index": h.face_index,
        "bbox": list(h.bbox),
        "det_score": h.det_score,
        "occurrences": [{"dataset": o.dataset, "source_uri": o.source_uri} for o in h.occurrences],
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
            table = Table("score", "data set", "box", "det score")
            table.add_column("source", overflow="fold")  # the full URI, folded: people need all of it
            for m in face["matches"]:
                for o in m["occurrences"]:
                    table.add_row(
                        f"{m['score']:.3f}",
                        o["dataset"],
                        ", ".join(f"{v:.0f}" for v in m["bbox"]),
                        f"{m['det_score']:.2f}",
                        o["source_uri"],
                    )
            if face["matches"]:
                out.print(table)
