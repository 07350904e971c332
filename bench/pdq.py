"""PDQ's cost beside decoding, and the copies grouping's speed, measured in one command.

    .venv/bin/python bench/pdq.py                  # the test photos (or $FACEAUDIT_FACES)
    .venv/bin/python bench/pdq.py --hashes 200000  # a larger grouping run

Prints, per photo on average: the decode time (``decode_image``, the ingest's), PDQ's time
(``pdq.hash_pixels`` on the decoded pixels) and their ratio; the query crops' time (``hash_crops``,
paid by ``lookup --photo`` only); then the grouping of N hashes (near-duplicate clusters among
random ones) with the build's FAISS flat scan and with a multi-hash index, on the same hashes,
with their ratio, and whether both found the same groups. Where the ``pdqhash``
package is importable (it builds from source; faceaudit does not depend on it) it also prints the
largest bit difference between the two implementations on every photo. Then what PDQ survives:
the bits between each photo and its resized, recompressed, mirrored and cropped copies.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.photos import best_of, faces_dir  # noqa: E402
from indexing import copies  # noqa: E402
from pipelines.core import pdq  # noqa: E402
from pipelines.core.decode import decode_image  # noqa: E402

MAX_PIXELS = 50_000_000


def photo_costs(folder: Path, repeats: int) -> None:
    photos = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
    decoded = [decode_image(data, MAX_PIXELS).pixels for data in photos]
    decode_s = best_of(repeats, lambda: [decode_image(d, MAX_PIXELS) for d in photos]) / len(photos)
    hash_s = best_of(repeats, lambda: [pdq.hash_pixels(p) for p in decoded]) / len(photos)
    crops_s = best_of(1, lambda: [pdq.hash_crops(p) for p in decoded]) / len(photos)
    sizes = np.array([p.shape[0] * p.shape[1] for p in decoded])
    print(f"photos: {len(photos)} from {folder}, median {np.median(sizes) / 1e6:.2f} Mpixel")
    print(f"decode_image per photo: {decode_s * 1e3:.2f} ms")
    print(f"pdq.hash_pixels per photo: {hash_s * 1e3:.2f} ms  ({hash_s / decode_s:.2f} x decode)")
    print(f"pdq.hash_crops per query photo (lookup --photo only): {crops_s * 1e3:.1f} ms")
    try:
        import pdqhash
    except ImportError:
        print("pdqhash not installed: agreement with it not measured")
        return
    worst = max(
        int((np.unpackbits(np.frombuffer(pdq.hash_pixels(p)[0], np.uint8)) != pdqhash.compute(p)[0]).sum())
        for p in decoded
    )
    quality = max(abs(pdq.hash_pixels(p)[1] - int(pdqhash.compute(p)[1])) for p in decoded)
    print(f"against pdqhash: at most {worst} of 256 bits and {quality} quality points apart")


def crop(pixels: np.ndarray, share: float, fy: float, fx: float) -> np.ndarray:
    """``share`` of the area cut off, the kept part placed at (fy, fx) (0.5, 0.5: the centre)."""
    height, width = pixels.shape[:2]
    keep = np.sqrt(1 - share)
    rows, cols = round(height * keep), round(width * keep)
    top, left = round((height - rows) * fy), round((width - cols) * fx)
    return pixels[top : top + rows, left : left + cols]


def jpeg(pixels: np.ndarray, quality: int, scale: float = 1.0) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(pixels)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return decode_image(buffer.getvalue(), MAX_PIXELS).pixels


def robustness(folder: Path) -> None:
    """Bits between each photo's hash and its edited copy's: min / median / max over the photos,
    and how many stay within the 31-bit threshold. The crops' second figure is with the query
    crops ``lookup --photo`` tries."""
    edits = {
        "half size, JPEG 85": lambda p: jpeg(p, 85, 0.5),
        "JPEG quality 50": lambda p: jpeg(p, 50),
        "mirrored": lambda p: np.ascontiguousarray(p[:, ::-1]),
        "5% of the area cropped, centred": lambda p: jpeg(crop(p, 0.05, 0.5, 0.5), 85),
        "5% of the area cropped, off centre": lambda p: jpeg(crop(p, 0.05, 0.75, 0.25), 85),
        "15% of the area cropped, off centre": lambda p: jpeg(crop(p, 0.15, 0.75, 0.25), 85),
    }
    decoded = [decode_image(p.read_bytes(), MAX_PIXELS).pixels for p in sorted(folder.glob("*.jpg"))]
    hashes = [pdq.hash_pixels(p)[0] for p in decoded]
    tried = [[h, *(c for c, _ in pdq.hash_crops(p))] for h, p in zip(hashes, decoded, strict=True)]
    for name, edit in edits.items():
        copies_ = [pdq.hash_pixels(edit(p))[0] for p in decoded]
        plain = np.array([pdq.hamming(h, c) for h, c in zip(hashes, copies_, strict=True)])
        line = f"{name}: {summary(plain)}"
        if "crop" in name:
            best = np.array(
                [min(pdq.hamming(t, c) for t in ts) for ts, c in zip(tried, copies_, strict=True)]
            )
            line += f"; with lookup's query crops {summary(best)}"
        print(line)
    apart = [pdq.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    print(f"different photos: {min(apart)} bits apart at the least ({len(apart)} pairs)")


def summary(bits: np.ndarray) -> str:
    within = int((bits <= pdq.MATCH_DISTANCE).sum())
    return f"{bits.min()}/{int(np.median(bits))}/{bits.max()} bits, {within} of {len(bits)} within 31"


def groups_with(codes: np.ndarray, flat: bool) -> np.ndarray:
    """``copies.group_ids`` with the build's flat scan, or with a multi-hash index (16 tables on
    16-bit slices, one bit flipped: exact for 31 bits), the alternative it was measured against."""
    import faiss

    index = copies.binary_index()
    if not flat:
        index = faiss.IndexBinaryMultiHash(pdq.BITS, 16, 16)
        index.nflip = 1
    return copies.group_ids(codes, np.ones(len(codes), bool), index)


def grouping(n: int) -> None:
    """``n`` hashes: a tenth of them near-copies (up to 31 bits) of others, the rest random."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, pdq.BYTES), dtype=np.uint8)
    for i in range(n // 10):
        bits = np.unpackbits(codes[i + n // 2])
        bits[rng.permutation(pdq.BITS)[: rng.integers(0, pdq.MATCH_DISTANCE + 1)]] ^= 1
        codes[i] = np.packbits(bits)
    found = {}
    seconds = {}
    for flat in (True, False):
        start = time.perf_counter()
        found[flat] = groups_with(codes, flat)
        seconds[flat] = time.perf_counter() - start
    print(
        f"grouping {n} hashes: flat scan {seconds[True]:.2f} s, multi-hash {seconds[False]:.2f} s "
        f"(the scan takes {seconds[True] / seconds[False]:.2f} x the multi-hash's time), "
        f"same groups: {np.array_equal(found[True], found[False])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", help="folder of .jpg photos (default: the test photos)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hashes", type=int, default=50_000, help="hashes in the grouping run")
    args = parser.parse_args(argv)
    photo_costs(faces_dir(args.faces), args.repeats)
    robustness(faces_dir(args.faces))
    grouping(args.hashes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
