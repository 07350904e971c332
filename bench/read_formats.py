"""Reading benchmark: a 100k-row MS-Celeb-1M-layout TSV (base64 face crops made from the test
photos), read the way ingest reads it against two baselines, each in its own child process so
that its peak memory (ru_maxrss) is its own.

* ``faceaudit``: ``plan_units`` (the byte-offset index, streamed) then ``read_unit`` over every
  unit: each row's crop decoded from base64, its provenance kept, its MID dropped;
* ``csv``: Python's ``csv.reader`` over the same file, streaming, each row's crop decoded from
  base64 (the plain way to read it by hand);
* ``arrow``: ``pyarrow.csv.read_csv`` of the whole file at once (the way a data frame loads it).

    .venv/bin/python bench/read_formats.py               # 100k rows of 112 px crops
    .venv/bin/python bench/read_formats.py --rows 20000  # quicker

Prints rows/s, peak RSS and how much of it the reading added (every child first imports the
same modules), and faceaudit's ratios to the ``csv`` baseline.
"""

from __future__ import annotations

import argparse
import base64
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
READERS = ("faceaudit", "csv", "arrow")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--side", type=int, default=112, help="crop size in px (MS-Celeb crops are small)")
    p.add_argument("--work", default=str(REPO / ".bench" / "read_formats"))
    p.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    path = Path(args.work) / f"msceleb-{args.rows}-{args.side}.tsv"
    if args.child:
        print(json.dumps(measure(args.child, path)))
        return
    if not path.exists():
        write(path, args.rows, args.side)
    print(f"{path.name}: {args.rows} rows, {path.stat().st_size / 2**20:.0f} MiB")
    results = {}
    for reader in READERS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rows",
                str(args.rows),
                "--side",
                str(args.side),
                "--work",
                args.work,
                "--child",
                reader,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[reader] = json.loads(out.strip().splitlines()[-1])
        r = results[reader]
        print(
            f"{reader:10s} {r['rows'] / r['seconds']:>10,.0f} rows/s   peak RSS {r['peak_mib']:>7.0f} MiB"
            f"   of which reading {r['growth_mib']:>7.0f} MiB"
        )
    ours, base = results["faceaudit"], results["csv"]
    print(
        f"faceaudit / csv: {(ours['rows'] / ours['seconds']) / (base['rows'] / base['seconds']):.2f}x "
        "rows/s, "
        f"{ours['peak_mib'] / base['peak_mib']:.2f}x peak RSS"
    )


def write(path: Path, rows: int, side: int) -> None:
    from tests.format_fixtures import small_photos, write_msceleb_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    photos = small_photos(sorted((REPO / "tests" / "data" / "faces").glob("img*.jpg"))[:16], side=side)
    tmp = path.with_suffix(".partial")
    write_msceleb_rows(tmp, rows, photos)
    tmp.rename(path)


def measure(reader: str, path: Path) -> dict:
    _imports()  # the same modules loaded in every child: growth is the reading's own
    before = _rss_mib()
    started = time.perf_counter()
    rows = {"faceaudit": _faceaudit, "csv": _csv, "arrow": _arrow}[reader](path)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rows": rows, "seconds": seconds, "peak_mib": peak, "growth_mib": peak - before}


def _imports() -> None:
    import pyarrow.csv  # noqa: F401

    import pipelines.core.sources  # noqa: F401


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _faceaudit(path: Path) -> int:
    from pipelines.core.config import DatasetSpec, HttpConfig
    from pipelines.core.sources import plan_units, read_unit

    spec, http = DatasetSpec(name="msceleb", source=str(path)), HttpConfig()
    units = plan_units(spec, 1000)
    return sum(1 for unit in units for raw in read_unit(unit, http) if raw.data)


def _csv(path: Path) -> int:
    import csv

    csv.field_size_limit(1 << 30)
    n = 0
    with open(path, newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            n += bool(base64.b64decode(row[6]))
    return n


def _arrow(path: Path) -> int:
    import pyarrow.csv as pa_csv

    table = pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(autogenerate_column_names=True, block_size=64 << 20),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pa_csv.ConvertOptions(column_types={f"f{i}": "string" for i in range(7)}),
    )
    return sum(1 for value in table.column(6).to_pylist() if base64.b64decode(value))


if __name__ == "__main__":
    main()
