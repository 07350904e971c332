"""Calibrate a model's match threshold on the verification pairs of the test photos.

    .venv/bin/python bench/calibrate.py [--run RUN_FOLDER] [--pairs master.csv]

The photos and pairs are those of tests/data/faces, or of the folder in $FACEAUDIT_FACES. Without
--run it first ingests the photos with the default dlib settings. It prints the accuracy-maximising
cosine-similarity threshold (the middle of the best interval) and, at the threshold the code ships
with, the accuracy, false-match rate (FMR) and false-non-match rate (FNMR).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import photos  # noqa: E402  (bench/photos.py, beside this script)

from pipelines.core.config import DatasetSpec, JobConfig  # noqa: E402
from pipelines.core.models.dlib_backend import DLIB_MATCH_THRESHOLD  # noqa: E402
from tests.helpers import largest_face_embeddings  # noqa: E402

PAIRS = ("master.csv", "face-recognition-pivot.csv")  # in the photo folder


def load_pairs(path: Path) -> list[tuple[str, str, bool]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (Path(r["file_x"]).name, Path(r["file_y"]).name, (r.get("Decision") or r.get("decision")) == "Yes")
        for r in rows
    ]


def rates(sims: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float, float]:
    match = sims >= threshold
    accuracy = float(np.mean(match == same))
    fmr = float(np.mean(match[~same])) if (~same).any() else 0.0
    fnmr = float(np.mean(~match[same])) if same.any() else 0.0
    return accuracy, fmr, fnmr


def best_threshold(sims: np.ndarray, same: np.ndarray) -> tuple[float, float, float, float]:
    """(middle, low, high, accuracy) of the run of thresholds that maximises accuracy."""
    cuts = np.unique(sims)
    candidates = np.concatenate([[cuts[0] - 1e-6], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6]])
    accuracy = np.array([rates(sims, same, t)[0] for t in candidates])
    best = np.flatnonzero(accuracy == accuracy.max())
    low, high = float(candidates[best[0]]), float(candidates[best[-1]])
    return (low + high) / 2, low, high, float(accuracy.max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", help="an ingest run folder over the test photos")
    parser.add_argument("--pairs", nargs="*", help=f"pair files (default: {', '.join(PAIRS)} of the photos)")
    args = parser.parse_args()
    if args.pairs is None:
        args.pairs = [str(photos.faces_dir() / name) for name in PAIRS]
    missing = [name for name in args.pairs if not Path(name).is_file()]
    if missing:
        print(f"pair file(s) missing: {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    run = args.run or _ingest()
    emb = largest_face_embeddings(run)
    every: list[tuple[str, str, bool]] = []
    for pairs_file in [*args.pairs, "all"]:
        pairs = list(every) if pairs_file == "all" else load_pairs(Path(pairs_file))
        every.extend(pairs if pairs_file != "all" else [])
        pairs = [p for p in pairs if p[0] in emb and p[1] in emb]
        sims = np.array([float(emb[x] @ emb[y]) for x, y, _ in pairs])
        same = np.array([s for _, _, s in pairs])
        threshold, _, _, accuracy = best_threshold(sims, same)
        print(f"{Path(pairs_file).name}: {len(pairs)} pairs ({same.sum()} same, {(~same).sum()} different)")
        print(f"  accuracy-maximising threshold {threshold:.4f} -> accuracy {accuracy:.4f}")
        print(
            f"  lowest same-person {sims[same].min():.4f}, highest different-person {sims[~same].max():.4f}"
        )
        acc, fmr, fnmr = rates(sims, same, DLIB_MATCH_THRESHOLD)
        print(
            f"  shipped threshold {DLIB_MATCH_THRESHOLD}: accuracy {acc:.4f}, FMR {fmr:.4f}, FNMR {fnmr:.4f}"
        )


def _ingest() -> str:
    from pipelines.engines.local_engine import run_job

    out = tempfile.mkdtemp(prefix="faceaudit-calibrate-")
    source = str(photos.faces_dir())
    job = JobConfig(datasets=[DatasetSpec(name="deepface", source=source)], out=out, progress=False)
    return run_job(job).uri


if __name__ == "__main__":
    main()
