"""A FAISS index file walked as faiss's reader would walk it, without faiss: every vector length,
list size and offset must fit in the bytes that are there (``bundle.check_declared`` runs it
before faiss parses a file that came from a bucket)."""

from __future__ import annotations

import os
import struct

import numpy as np

from .errors import IntegrityError


def _increasing_below(values: np.ndarray, bound: int) -> bool:
    return bool(np.all(values < bound) and np.all(np.diff(values.astype(object)) > 0))


class FaissCheck:
    """Walk a FAISS index file as faiss's reader would, without faiss: every vector length, list
    size and offset must fit in the bytes left in the file (or in the .ivfdata file), and the
    structure must be one a faceaudit build writes (IDMap,Flat; IVF Flat, PQ and fast-scan PQ,
    optionally behind OPQ; inner product; lists in the file or on disk), its dim and ntotal those
    of the manifest. Format: faiss/impl/index_read.cpp (v1.15)."""

    MAX_DIM = 1 << 20
    TOP = ("IxMp", "IwFl", "IwPf", "IwPQ", "IxPT")
    IVF = ("IwFl", "IwPf", "IwPQ")

    def __init__(self, path: str, name: str, dim: int | None, ntotal: int | None, ivfdata: str | None):
        self.path, self.name, self.dim, self.ntotal, self.ivfdata = path, name, dim, ntotal, ivfdata
        self.size = os.path.getsize(path)
        self.ivfdata_used = False

    def run(self) -> None:
        with open(self.path, "rb") as self.f:
            d, ntotal = self.index(self.TOP)
            if self.left:
                self.fail(f"{self.left} bytes follow the index")
        if self.dim is not None and d != self.dim:
            self.fail(f"dim {d}, the manifest says {self.dim}")
        if self.ntotal is not None and ntotal != self.ntotal:
            self.fail(f"holds {ntotal} vectors, the manifest says {self.ntotal}")
        if self.ivfdata and not self.ivfdata_used:
            self.fail("the manifest lists an .ivfdata file that the index does not use")

    def fail(self, why: str) -> None:
        raise IntegrityError(self.name, f"{why} (at byte {self.f.tell()})")

    # ---- primitives, each bounded by the bytes left
    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            self.fail(f"{what} declares {n} bytes, {self.left} are left")
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            self.fail(f"{what} declares {n} bytes, {self.left} are left")
        self.f.seek(n, os.SEEK_CUR)

    def read(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def one(self, fmt: str, what: str) -> int:
        return self.read(fmt, what)[0]

    def tag(self, what: str) -> str:
        return self.take(4, what).decode("latin-1")

    def vector(self, item: int, what: str) -> int:
        """A faiss vector: a uint64 count, then count items; skipped. Returns the count."""
        n = self.one("Q", what)
        self.skip(n * item, what)
        return n

    def array(self, dtype: str, what: str) -> np.ndarray:
        """A faiss vector read into memory (bounded by the file, like everything here)."""
        n = self.one("Q", what)
        return np.frombuffer(self.take(n * np.dtype(dtype).itemsize, what), dtype=dtype)

    # ---- structure
    def header(self) -> tuple[int, int]:
        d, ntotal, _, _, trained, metric = self.read("iqqqBi", "index header")
        if not 0 < d <= self.MAX_DIM or ntotal < 0 or trained > 1:
            self.fail(f"header declares dim {d}, ntotal {ntotal}")
        if metric != 0:  # METRIC_INNER_PRODUCT; faceaudit writes nothing else
            self.fail(f"metric {metric}, not inner product")
        return d, ntotal

    def index(self, allowed: tuple[str, ...]) -> tuple[int, int]:
        kind = self.tag("index type")
        if kind not in allowed:
            self.fail(f"index type {kind!r} is not one faceaudit writes here")
        d, ntotal = self.header()
        if kind == "IxFI":
            if self.one("Q", "flat codes") != ntotal * d:  # counted in 4-byte floats
                self.fail(f"flat codes do not hold {ntotal} vectors of dim {d}")
            self.skip(ntotal * d * 4, "flat codes")
        elif kind == "IxMp":
            sub_d, sub_n = self.index(("IxFI",))
            if (sub_d, sub_n) != (d, ntotal) or self.vector(8, "id map") != ntotal:
                self.fail("the id map does not match its index")
        elif kind == "IxPT":
            if self.one("i", "transform count") != 1:
                self.fail("not one OPQ rotation")
            self.linear_transform(d)
            sub_d, sub_n = self.index(self.IVF)
            if sub_n != ntotal or sub_d != self.d_out:
                self.fail("the transformed index does not match its transform")
        else:
            self.ivf(kind, d, ntotal)
        return d, ntotal

    def linear_transform(self, d: int) -> None:
        if self.tag("transform type") != "LTra" or self.one("B", "bias flag") > 1:
            self.fail("transform is not an OPQ rotation")
        a = self.vector(4, "rotation")
        b = self.vector(4, "bias")
        d_in, d_out, trained = self.read("iiB", "transform dims")
        if d_in != d or not 0 < d_out <= self.MAX_DIM or a != d_in * d_out or b > d_out or trained > 1:
            self.fail(f"rotation of {a} floats for {d_in} -> {d_out}")
        self.d_out = d_out

    def ivf(self, kind: str, d: int, ntotal: int) -> None:
        nlist, _nprobe = self.read("QQ", "nlist")
        q_d, q_n = self.index(("IxFI",))
        if q_d != d or q_n != nlist or nlist < 1:
            self.fail(f"the coarse quantizer holds {q_n} centroids of dim {q_d} for {nlist} lists")
        map_type = self.one("B", "direct map")
        if map_type > 2:
            self.fail(f"direct map type {map_type}")
        self.vector(8, "direct map")
        if map_type == 2:
            self.vector(16, "direct map table")
        if kind == "IwFl":
            self.lists(nlist, d * 4, ntotal)
            return
        by_residual, code_size = self.read("BQ", "PQ flags")
        if by_residual > 1:
            self.fail("bad by_residual flag")
        if kind == "IwPf":
            bbs, m2, _implem, _qbs2 = self.read("iQiQ", "fast-scan fields")
            m = self.pq(d, (4,))
            if bbs <= 0 or bbs % 32 or m2 not in (m, m + 1) or m2 % 2:
                self.fail(f"fast-scan block {bbs}, M2 {m2} for M {m}")
            self.block_lists(nlist, bbs, bbs * m2 // 2, ntotal)
        else:
            m = self.pq(d, (8,))
            if code_size != m:
                self.fail(f"code size {code_size} for {m} 8-bit sub-quantizers")
            self.lists(nlist, code_size, ntotal)

    def pq(self, d: int, bits: tuple[int, ...]) -> int:
        pq_d, m, nbits = self.read("QQQ", "product quantizer")
        if pq_d != d or m < 1 or d % m or nbits not in bits:
            self.fail(f"product quantizer of dim {pq_d}, M {m}, {nbits} bits for dim {d}")
        if self.vector(4, "PQ centroids") != d << nbits:
            self.fail("PQ centroids do not match its dims")
        return m

    def lists(self, nlist: int, code_size: int, ntotal: int) -> None:
        kind = self.tag("inverted lists")
        got_nlist, got_code = self.read("QQ", "inverted lists header")
        if (got_nlist, got_code) != (nlist, code_size):
            self.fail(f"inverted lists of {got_nlist} lists of {got_code}-byte codes")
        if kind == "ilar":
            layout = self.tag("list layout")
            sizes = self.array("<u8", "list sizes")
            if layout == "full" and len(sizes) == nlist:
                counts = sizes
            elif layout == "sprs" and len(sizes) % 2 == 0 and _increasing_below(sizes[0::2], nlist):
                counts = sizes[1::2]
            else:
                self.fail(f"list sizes of layout {layout!r}")
            total = int(counts.sum(dtype=object)) if len(counts) else 0
            if total != ntotal:
                self.fail(f"lists hold {total} vectors, the index says {ntotal}")
            self.skip(total * (code_size + 8), "inverted lists")
        elif kind == "ilod":
            self.ondisk_lists(nlist, code_size, ntotal)
        else:
            self.fail(f"inverted lists of type {kind!r}")

    def block_lists(self, nlist: int, per_block: int, block_size: int, ntotal: int) -> None:
        if self.tag("inverted lists") != "ilbl":
            self.fail("fast-scan lists are not block lists")
        got_nlist, _code, got_per_block, got_block = self.read("QQQQ", "block lists header")
        if (got_nlist, got_per_block, got_block) != (nlist, per_block, block_size):
            self.fail(f"block lists of {got_nlist} lists, {got_per_block} per {got_block}-byte block")
        total = 0
        for _ in range(nlist):
            n = self.vector(8, "list ids")
            if self.vector(1, "list codes") != -(-n // per_block) * block_size:
                self.fail("a list's codes do not match its ids")
            total += n
        if total != ntotal:
            self.fail(f"lists hold {total} vectors, the index says {ntotal}")

    def ondisk_lists(self, nlist: int, code_size: int, ntotal: int) -> None:
        count = self.one("Q", "on-disk lists")
        if count != nlist:
            self.fail(f"{count} on-disk lists for {nlist}")
        lists = np.frombuffer(self.take(count * 24, "on-disk lists"), dtype="<u8").reshape(-1, 3)
        self.vector(16, "on-disk slots")
        length = self.one("Q", "ivfdata name")
        if length > 4096:
            self.fail(f"an ivfdata name of {length} bytes")
        name = self.take(length, "ivfdata name").decode("latin-1")
        totsize = self.one("Q", "ivfdata size")
        if not self.ivfdata:
            self.fail("it reads on-disk lists, but the manifest lists no .ivfdata file")
        expected = os.path.basename(self.ivfdata)
        if name.rsplit("/", 1)[-1] != expected:
            self.fail(f"it names lists file {name[:80]!r}, not {expected!r}")
        if totsize != os.path.getsize(self.ivfdata):
            self.fail(f"it maps {totsize} bytes of {expected}, which has {os.path.getsize(self.ivfdata)}")
        size, capacity, offset = (lists[:, i].astype(object) for i in range(3))
        ends = offset + capacity * (code_size + 8)
        if np.any(size > capacity) or (len(ends) and max(ends) > totsize):
            self.fail("an on-disk list lies beyond its lists file")
        if int(size.sum()) != ntotal:
            self.fail(f"lists hold {int(size.sum())} vectors, the index says {ntotal}")
        self.ivfdata_used = True
