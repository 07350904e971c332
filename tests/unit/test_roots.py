"""Which URIs a data set may read (pipelines/core/roots.py) and which names may become paths
(pipelines/core/names.py): pure helpers, checked over tables of cases."""

from __future__ import annotations

import pytest

from pipelines.core import roots
from pipelines.core.names import BadName, check_name

BASE = "/data/set"
REMOTE = "gs://bucket/set"


@pytest.mark.parametrize(
    "entry, base, allowed",
    [
        ("a.jpg", BASE, True),
        ("imgs/a.jpg", BASE, True),
        ("imgs/../a.jpg", BASE, True),
        ("../a.jpg", BASE, False),
        ("imgs/../../a.jpg", BASE, False),
        ("/data/set/a.jpg", BASE, True),
        ("/data/setX/a.jpg", BASE, False),  # a sibling whose name starts alike
        ("/etc/passwd", BASE, False),
        ("file:///etc/hostname", BASE, False),
        ("file:///data/set/a.jpg", BASE, True),
        ("http://example.org/a.jpg", BASE, True),
        ("HTTPS://example.org/a.jpg", BASE, True),
        ("webhdfs://127.0.0.1:9870/a.jpg", BASE, False),
        ("ftp://example.org/a.jpg", BASE, False),
        ("a.jpg", REMOTE, True),
        ("../a.jpg", REMOTE, False),
        ("gs://bucket/set/a.jpg", REMOTE, True),
        ("gs://bucket/set/../other/a.jpg", REMOTE, False),
        ("gs://bucket/setX/a.jpg", REMOTE, False),
        ("gs://other-bucket/set/a.jpg", REMOTE, False),
        ("s3://bucket/set/a.jpg", REMOTE, False),
        ("/data/set/\x13gs://bucket/set", BASE, False),  # '://' that is no scheme (found by fuzzing)
    ],
)
def test_list_entries_stay_inside_their_data_set(entry, base, allowed):
    assert roots.allowed(roots.resolve_entry(entry, base), (base,)) is allowed


def test_an_allowed_root_opens_one_more_folder():
    assert roots.allowed("/mirror/x.jpg", (BASE, "/mirror"))
    assert not roots.allowed("/mirror2/x.jpg", (BASE, "/mirror"))


def test_a_symlink_is_judged_by_its_real_path(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "secret").write_bytes(b"x")
    (tmp_path / "set" / "inside").write_bytes(b"x")
    (tmp_path / "set" / "out").symlink_to(tmp_path / "secret")
    (tmp_path / "set" / "in").symlink_to(tmp_path / "set" / "inside")
    assert roots.check_real_path(str(tmp_path / "set" / "in"), (str(tmp_path / "set"),))
    with pytest.raises(roots.RecordError, match="outside the data set"):
        roots.check_real_path(str(tmp_path / "set" / "out"), (str(tmp_path / "set"),))


@pytest.mark.parametrize("name", ["run-1", "20261201T000000Z-abcdef01", "a", "A.b_c-9", "x" * 128])
def test_good_names_pass(name):
    assert check_name(name, "run id") == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../victim",
        "../../victim",
        "a/b",
        "/abs",
        "a..b",
        ".hidden",
        "-x",
        "_x",
        "x" * 129,
        "a b",
        "a\nb",
        "a\x00b",
        "é",
        None,
        42,
    ],
)
def test_bad_names_are_refused_in_one_line(name):
    with pytest.raises(BadName) as caught:
        check_name(name, "run id")
    message = str(caught.value)
    assert message.startswith("run id ") and "\n" not in message and len(message) < 300
