"""Index build and search: sharded FAISS bundles from ingest runs.

Other components need only ``open_index(uri).search(vectors, k)``; ``build_index`` turns
committed runs into a new bundle version and moves ``CURRENT`` to it.
"""

import os

# faiss's OpenMP threads spin while waiting by default; on a small or shared machine they then fight
# OpenBLAS's threads for the cores (measured: PQ training 5x slower on 2 cores). It only takes
# effect if faiss was not imported before this package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .build import BuildOptions, BuildResult, build_index
from .errors import IntegrityError, QueryError
from .search import Hit, Index, Occurrence, open_index

__all__ = [
    "BuildOptions",
    "BuildResult",
    "Hit",
    "Index",
    "IntegrityError",
    "Occurrence",
    "QueryError",
    "build_index",
    "open_index",
]
