"""Render the README's "Which data sets" table from the catalogue YAMLs.

    .venv/bin/python bench/catalog_table.py            # print the table
    .venv/bin/python bench/catalog_table.py --write    # replace it in README.md, between its markers

tests/unit/test_catalog_files.py checks that README.md holds exactly what this renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.core import catalog  # noqa: E402
from pipelines.core.config import load_registry  # noqa: E402


def render(folder: Path = REPO / catalog.CATALOG) -> str:
    return catalog.markdown_table(list(load_registry(folder).values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=REPO / catalog.CATALOG, help="catalogue folder")
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    table = render(args.catalog)
    if not args.write:
        sys.stdout.write(table)
        return 0
    text = args.readme.read_text()
    args.readme.write_text(catalog.replace_table(text, table))
    print(f"wrote the table of {table.count(chr(10)) - 2} data sets into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
