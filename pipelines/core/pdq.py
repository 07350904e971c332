"""PDQ, Meta's perceptual photo hash, of decoded pixels: 256 bits that survive re-encoding and
resizing, and a quality figure (0-100) that says whether the hash can be trusted.

Written with numpy from the published algorithm (ThreatExchange's "PDQ hashing" paper): luminance,
a two-pass tent ("Jarosz") filter whose window is about 1/128 of each side, 64 x 64 samples, the
16 x 16 lowest non-constant DCT coefficients, each bit set where its coefficient is above their
median. The PyPI bindings (``pdqhash``, and ``perception``, which wraps it) ship as a source
distribution only: they need a C++ compiler in every image that installs faceaudit. This module
gave the same hashes and qualities as ``pdqhash`` 0.2.8 on all 64 test photos (bench/pdq.py
measures it when ``pdqhash`` is installed; floating-point order could move a bit elsewhere, far
inside the 31-bit match threshold), and its bytes read as the reference's hex string
(``bytes.hex()``), so hashes can be compared with other PDQ tools.

Below ``MIN_QUALITY`` (PDQ's own convention) an image is too flat for its hash to mean much: a
plain sky and a plain wall hash alike.
"""

from __future__ import annotations

import functools

import numpy as np

BITS = 256
BYTES = BITS // 8
MATCH_DISTANCE = 31  # PDQ's recommended threshold: at most 31 of 256 bits apart is the same photo
MIN_QUALITY = 50  # PDQ's convention: below this the hash is unreliable
QUERY_CROPS = (0.05, 0.1, 0.15)  # shares of the area ``hash_crops`` cuts from a query photo
_SAMPLES = 64
_BLOCK_ROWS = 512
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix() -> np.ndarray:
    """16 x 64 DCT-II rows 1..16: coefficient 0 (the mean) carries no pattern and is skipped."""
    i = np.arange(1, 17, dtype=np.float64)[:, None]
    j = np.arange(_SAMPLES, dtype=np.float64)[None, :]
    return (np.sqrt(2.0 / _SAMPLES) * np.cos(np.pi / 2 / _SAMPLES * i * (2 * j + 1))).astype(np.float32)


_DCT = _dct_matrix()


def window(size: int) -> int:
    """The tent filter's box width along a side of ``size`` pixels (about size / 128, at least 1)."""
    return max(1, (size + 2 * _SAMPLES - 1) // (2 * _SAMPLES))


def sampling_operator(size: int) -> np.ndarray:
    """The 64 x ``size`` matrix that takes a side of ``size`` values through the two box passes
    (each a moving mean over ``window(size)`` values, reaching ``width // 2`` ahead of the sample
    and shrunk, not padded, at both ends) and keeps the 64 samples PDQ reads. Filtering only what
    the samples need costs 64 multiply-adds per pixel instead of four passes over the image."""
    width, ahead = window(size), window(size) // 2
    positions = np.arange(size)
    hi = np.minimum(positions + ahead, size - 1) + 1  # output i averages inputs lo[i] .. hi[i] - 1
    lo = np.maximum(positions + ahead - width + 1, 0)
    picks = ((np.arange(_SAMPLES) + 0.5) * size / _SAMPLES).astype(int)
    # the second pass at each sample: a mean of first-pass outputs
    inside = (positions >= lo[picks, None]) & (positions < hi[picks, None])
    weights = inside / (hi[picks] - lo[picks])[:, None]
    # each first-pass output i spreads its weight evenly over inputs lo[i] .. hi[i] - 1; lo and hi
    # never decrease, so the outputs covering input x are those with lo <= x minus those with hi <= x
    summed = np.concatenate([np.zeros((_SAMPLES, 1)), np.cumsum(weights / (hi - lo), axis=1)], axis=1)
    covering = np.searchsorted(lo, positions, side="right")
    passed = np.searchsorted(hi, positions, side="right")
    return (summed[:, covering] - summed[:, passed]).astype(np.float32)


def hash_pixels(pixels: np.ndarray) -> tuple[bytes, int]:
    """(32-byte PDQ hash, quality 0-100) of uint8 RGB pixels shaped (height, width, 3)."""
    if pixels.ndim != 3 or pixels.shape[2] < 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"PDQ needs RGB pixels, not an array of shape {pixels.shape}")
    rows, cols = pixels.shape[:2]
    down, across = sparse_operator(rows), sparse_operator(cols)
    partial = np.zeros((rows, _SAMPLES), dtype=np.float32)
    for top in range(0, rows, _BLOCK_ROWS):  # in blocks: a big image never gets a float copy whole
        block = pixels[top : top + _BLOCK_ROWS]
        # uint8 x float32 scalar gives float32: the same products and sums as luminance tables,
        # bit for bit, in numpy's element-wise loops (about 3x faster than three table look-ups)
        luma = block[:, :, 0] * _LUMA[0] + block[:, :, 1] * _LUMA[1] + block[:, :, 2] * _LUMA[2]
        partial[top : top + _BLOCK_ROWS] = across.apply(luma, axis=1)
    samples = down.apply(partial, axis=0)
    coefficients = product(product(_DCT, samples), _DCT.T)
    return pack_bits(coefficients > np.median(coefficients)), quality(samples)


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A small matrix product without BLAS: OpenBLAS allocates its buffers on first use and dies
    (it does not raise) in a decode worker held to ingest's memory limit."""
    return (a[:, :, None] * b[None, :, :]).sum(axis=1, dtype=np.float32)


@functools.lru_cache(maxsize=64)  # a data set's images often share a few sizes
def sparse_operator(size: int) -> Sparse:
    return Sparse(sampling_operator(size))


class Sparse:
    """A sampling operator by its non-zero weights: each sample reads about 2 x size / 128 values,
    so applying it costs one multiply-add per value, in numpy's element-wise loops rather than a
    BLAS product (whose threads stall when an ingest's workers keep every core busy, and which
    cannot allocate its buffers in a memory-limited decode worker: see ``product``)."""

    def __init__(self, dense: np.ndarray):
        picked = [np.flatnonzero(row) for row in dense]
        self.index = np.concatenate(picked)
        self.weights = np.concatenate([row[p] for row, p in zip(dense, picked, strict=True)])
        self.starts = np.cumsum([0] + [len(p) for p in picked[:-1]])

    def apply(self, values: np.ndarray, axis: int) -> np.ndarray:
        """The 64 samples along ``axis`` of a 2-D array."""
        if axis == 1:
            return np.add.reduceat(values[:, self.index] * self.weights, self.starts, axis=1)
        return np.add.reduceat(values[self.index] * self.weights[:, None], self.starts, axis=0)


def hash_crops(pixels: np.ndarray, shares: tuple[float, ...] = QUERY_CROPS) -> list[tuple[bytes, int]]:
    """(hash, quality) of crops of the pixels that drop each share of their area, placed at the
    centre, the corners and the middle of each side. PDQ alone misses a copy cropped by more than
    about 3% of its area; a query photo tried this way also finds a data set's copy that lost up
    to about 15% (its own crop lies within a few per cent of one of these)."""
    height, width = pixels.shape[:2]
    out = []
    for share in shares:
        keep = np.sqrt(1.0 - share)
        rows, cols = max(1, round(height * keep)), max(1, round(width * keep))
        for fy in (0.0, 0.5, 1.0):
            for fx in (0.0, 0.5, 1.0):
                top, left = round((height - rows) * fy), round((width - cols) * fx)
                out.append(hash_pixels(pixels[top : top + rows, left : left + cols]))
    return out


def quality(samples: np.ndarray) -> int:
    """The reference's gradient measure of the 64 x 64 samples: flat images score low."""
    down = np.trunc((samples[:-1, :] - samples[1:, :]) * 100 / 255)
    across = np.trunc((samples[:, :-1] - samples[:, 1:]) * 100 / 255)
    return int(min(100, int(np.abs(down).sum() + np.abs(across).sum()) // 90))


def pack_bits(bits: np.ndarray) -> bytes:
    """Bit k = row * 16 + column, stored as the reference prints it: 16-bit words, the last first."""
    words = np.packbits(bits.reshape(16, 16)[:, ::-1], axis=1)  # each row one big-endian word, bit 0 last
    return words[::-1].tobytes()


def hamming(a: bytes, b: bytes) -> int:
    """Bits that differ between two hashes."""
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
