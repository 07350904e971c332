"""The failure budget: past max_error_fraction (once min_images have finished) the job stops.

Expected outcomes are worked out by hand (the arithmetic is in each case's comment), or are
properties that hold whatever the arithmetic: they never repeat ``Tally``'s own formula.
"""

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


def _stops(tally: Tally, fraction: float, min_images: int) -> bool:
    try:
        tally.check_budget(fraction, min_images)
    except FatalError:
        return True
    return False


# (ok, bad, max_error_fraction, min_images, stops)
CASES = [
    # below the minimum nothing stops, whatever the fraction
    (5, 4, 0.25, 10, False),  # 9 images < 10 (4/9 = 0.44 would be over)
    (0, 9, 0.25, 10, False),  # 9 images < 10, every one failed
    # exactly at the minimum the budget applies
    (8, 2, 0.25, 10, False),  # 10 images: 0.25 x 10 = 2.5; 2 <= 2.5
    (7, 3, 0.25, 10, True),  # 10 images: 3 > 2.5
    (0, 10, 0.25, 10, True),  # 10 images: 10 > 2.5
    (10, 0, 0.25, 10, False),  # no error
    # "more than" the fraction: equal is not over
    (9, 3, 0.25, 10, False),  # 12 images: 0.25 x 12 = 3; 3 is not more than 3
    (8, 3, 0.25, 10, True),  # 11 images: 0.25 x 11 = 2.75; 3 > 2.75
    (30, 10, 0.25, 10, False),  # 40 images: 0.25 x 40 = 10; 10 is not more than 10
    (29, 10, 0.25, 10, True),  # 39 images: 0.25 x 39 = 9.75; 10 > 9.75
    # the fraction is of the images finished, not of the minimum
    (90, 20, 0.25, 10, False),  # 110 images: 27.5 allowed; 20 <= 27.5 (20 > 0.25 x 10 = 2.5 though)
    # the defaults: 0.5 once 200 have finished
    (100, 99, 0.5, 200, False),  # 199 images < 200
    (100, 100, 0.5, 200, False),  # 200 images: 0.5 x 200 = 100; 100 is not more than 100
    (99, 101, 0.5, 200, True),  # 200 images: 101 > 100
    # fraction 0: any error at all, once the minimum is met
    (100, 1, 0.0, 1, True),  # 101 images: 1 > 0
    (5, 0, 0.0, 1, False),  # 0 is not more than 0
]


@pytest.mark.parametrize(("ok", "bad", "fraction", "min_images", "stops"), CASES)
def test_the_budget_applies_past_the_fraction_and_the_minimum(ok, bad, fraction, min_images, stops):
    tally = _tally(ok, {"not an allowed image format": bad})
    if stops:
        with pytest.raises(FatalError, match=rf"^{bad} of {ok + bad} images failed, more than"):
            tally.check_budget(fraction, min_images)
    else:
        tally.check_budget(fraction, min_images)


def test_more_errors_never_lift_a_stop_and_more_good_images_never_cause_one():
    """Monotonic in each count: a spent budget stays spent with one more error, and a run within
    its budget (past the minimum) stays within it with one more good image."""
    fraction, min_images = 0.3, 7
    seen = set()
    for ok in range(15):
        for bad in range(15):
            stops = _stops(_tally(ok, {"x": bad}), fraction, min_images)
            seen.add(stops)
            if stops:
                assert _stops(_tally(ok, {"x": bad + 1}), fraction, min_images), (ok, bad)
            elif ok + bad >= min_images:
                assert not _stops(_tally(ok + 1, {"x": bad}), fraction, min_images), (ok, bad)
            if ok + bad < min_images:
                assert not stops, (ok, bad)  # below the minimum nothing stops
    assert seen == {True, False}  # the grid crosses the boundary


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


def test_at_the_end_every_image_failing_stops_however_few():
    with pytest.raises(FatalError, match="^every one of 3 images failed"):
        _tally(0, {"empty file": 3}).check_end(0.5, 200)  # 3 < 200, but all 3 failed
    _tally(1, {"empty file": 3}).check_end(0.5, 200)  # 4 < 200 and one is ok: goes on
    Tally().check_end(0.5, 200)  # nothing at all: not a failure


def test_while_running_every_image_failing_stops_at_200_even_with_the_budget_off():
    """check(), as engines call it while a run goes on: with max_error_fraction 1 only the
    systemic rule is left, and it waits for 200 images."""
    _tally(0, {"empty file": 199}).check(1.0, 1)  # 199 < 200
    with pytest.raises(FatalError, match="^every one of 200 images failed"):
        _tally(0, {"empty file": 200}).check(1.0, 1)
    _tally(1, {"empty file": 300}).check(1.0, 1)  # one image was ok: not systemic
