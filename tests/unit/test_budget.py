"""The failure budget: past max_error_fraction (once min_images have finished) the job stops."""

from __future__ import annotations

import pytest

from pipelines.core.errors import FatalError
from pipelines.core.records import ImageResult
from pipelines.core.run import Tally


def _tally(ok: int, errors: dict[str, int]) -> Tally:
    tally = Tally()
    for _ in range(ok):
        tally.add(ImageResult("a" * 64, "ok"))
    for reason, n in errors.items():
        for _ in range(n):
            tally.add(ImageResult(None, "error", "decode", reason))
    return tally


@pytest.mark.parametrize("ok", range(0, 12))
@pytest.mark.parametrize("bad", range(0, 12))
def test_the_budget_applies_past_the_fraction_and_the_minimum(ok, bad):
    tally = _tally(ok, {"not an allowed image format": bad})
    over = ok + bad >= 10 and bad > 0.25 * (ok + bad)
    if over:
        with pytest.raises(FatalError, match=f"{bad} of {ok + bad} images failed"):
            tally.check_budget(0.25, 10)
    else:
        tally.check_budget(0.25, 10)


def test_the_message_names_the_most_common_reasons():
    tally = _tally(1, {"truncated JPEG": 5, "decoder crashed (signal 11)": 2, "empty file": 1, "other": 1})
    with pytest.raises(FatalError) as raised:
        tally.check_budget(0.5, 1)
    message = str(raised.value)
    assert "9 of 10 images failed" in message and "no manifest" in message
    assert "decode: truncated JPEG (x5)" in message and "decode: decoder crashed (signal 11) (x2)" in message
    assert "other" not in message  # the top three only


def test_a_fraction_of_one_never_stops_a_job():
    _tally(0, {"empty file": 500}).check_budget(1.0, 1)
