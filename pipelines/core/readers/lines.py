"""Line-record files (MS-Celeb TSV, JSONL, CSV) split into units of ``every`` rows by byte offsets,
found by streaming the file once in 1 MiB chunks (never a whole line, let alone the file, in
memory), and read back from those offsets one bounded line at a time.

Row numbers count the file's lines from 0 (after a CSV's header line); a blank line keeps its
number and is skipped when read.
"""

from __future__ import annotations

from collections.abc import Iterator

from .. import storage

CHUNK = 1 << 20


def unit_spans(uri: str, every: int, skip_lines: int = 0) -> list[tuple[int, int, int]]:
    """(first_row, start_byte, end_byte) of each run of ``every`` rows after the first
    ``skip_lines`` lines; the last ends at the file's size. An unterminated last line is a row."""
    starts: list[tuple[int, int]] = [(0, 0)] if skip_lines == 0 else []
    wanted = skip_lines if skip_lines else every  # the next line number that starts a unit
    line, offset = 0, 0  # newlines seen, bytes seen
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            count = chunk.count(b"\n")
            pos = -1
            # line n starts after the n-th newline; look for positions only where a start falls
            while wanted <= line + count:
                for _ in range(wanted - line):
                    pos = chunk.find(b"\n", pos + 1)
                count -= wanted - line
                line = wanted
                starts.append((line - skip_lines, offset + pos + 1))
                wanted += every
            line += count
            offset += len(chunk)
    starts = [(row, start) for row, start in starts if start < offset]  # no row begins at the end
    bounds = [start for _, start in starts[1:]] + [offset] if starts else []
    return [(row, start, stop) for (row, start), stop in zip(starts, bounds, strict=True)]


def read_lines(
    uri: str, start: int, stop: int, first_row: int, limit: int
) -> Iterator[tuple[int, bytes | None]]:
    """(row, line without its end) for each line that starts in [start, stop); a line longer than
    ``limit`` bytes comes as (row, None) and is skipped without being held in memory."""
    fs, path = storage.url_to_fs(uri)
    row = first_row
    with fs.open(path, "rb") as f:
        f.seek(start)
        position = start
        while position < stop:
            line = f.readline(limit + 1)
            if not line:
                return
            position += len(line)
            if len(line) > limit and not line.endswith(b"\n"):
                position += _skip_line(f)
                yield row, None
            else:
                yield row, line.rstrip(b"\r\n")
            row += 1


def _skip_line(f) -> int:
    skipped = 0
    while chunk := f.readline(CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def first_line(uri: str, limit: int) -> bytes:
    """The file's first line (at most ``limit`` bytes of it), without its end."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return f.readline(limit).rstrip(b"\r\n")
