"""Version names sort by creation, which CURRENT's compare-and-swap relies on."""

import time

import pytest

from indexing import bundle
from pipelines.core.errors import FatalError


def test_a_fresh_version_sorts_after_one_made_in_the_same_second(tmp_path):
    # The digest suffix would order these two the wrong way if they shared a second.
    first = bundle.new_version("f" * 64)
    (tmp_path / first).mkdir()
    second = bundle.fresh_version(str(tmp_path), "0" * 64)
    assert second > first
    assert bundle.VERSION_NAME.fullmatch(second)


def test_other_names_under_the_index_are_ignored(tmp_path):
    for name in ("CURRENT", "reports", "99999999T999999Z-notahash"):
        (tmp_path / name).mkdir()
    version = bundle.fresh_version(str(tmp_path), "a" * 64)
    assert version.startswith(time.strftime("%Y%m%d", time.gmtime()))


def test_a_version_far_in_the_future_is_a_clock_error(tmp_path):
    (tmp_path / "29991231T235959Z-00000000").mkdir()
    with pytest.raises(FatalError, match="clock"):
        bundle.fresh_version(str(tmp_path), "a" * 64)
