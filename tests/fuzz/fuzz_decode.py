"""An atheris (libFuzzer) target for ``decode_image``: run by tests/fuzz/test_decode_fuzz.py.

    python tests/fuzz/fuzz_decode.py [libFuzzer flags] CORPUS_DIR

Any exception other than ``RecordError`` escapes the target and libFuzzer reports it as a crash
(with the input that caused it under -artifact_prefix); a native crash, an input running past
-timeout or memory past -rss_limit_mb are reported the same way. Pillow's and our Python code is
instrumented for coverage; the C decoders under it are not (they come prebuilt in Pillow's wheel),
so the fuzzer steers by the Python paths and mutates what reaches the C code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["PIL", "pipelines"]):
    from pipelines.core.decode import decode_image
    from pipelines.core.errors import RecordError

# Small enough that no input costs more than a few hundred ms of decoding at full size.
MAX_PIXELS = 4_000_000


def test_one_input(data: bytes) -> None:
    try:
        image = decode_image(data, MAX_PIXELS)
    except RecordError:
        return
    pixels = image.pixels
    if pixels.dtype.name != "uint8" or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise AssertionError(f"decode_image returned {pixels.dtype} {pixels.shape}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
