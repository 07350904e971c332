"""Planning and reading of folder, tar/WebDataset and URI-list sources (no network)."""

from __future__ import annotations

import io
import math
import os
import tarfile
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.config import DatasetSpec, HttpConfig
from pipelines.core.errors import ConfigError, FatalError
from pipelines.core.records import WorkUnit
from pipelines.core.roots import OUTSIDE
from pipelines.core.sources import plan_units, read_unit

HTTP = HttpConfig()


def image_bytes(fmt: str = "JPEG", colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format=fmt)
    return buf.getvalue()


JPEG = image_bytes("JPEG")
PNG = image_bytes("PNG")


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_tar(path, members: dict[str, bytes], mode: str = "w"):
    """A tar at ``path``, or written into ``path`` when it is a file object."""
    if isinstance(path, io.BytesIO):
        opened = tarfile.open(fileobj=path, mode=mode)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        opened = tarfile.open(path, mode)
    with opened as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path if isinstance(path, io.BytesIO) else str(path)


def plan(source, unit_size: int = 100, name: str = "ds") -> list[WorkUnit]:
    return plan_units(DatasetSpec(name=name, source=str(source)), unit_size)


def read_all(units: list[WorkUnit], http: HttpConfig = HTTP) -> list:
    return [raw for unit in units for raw in read_unit(unit, http)]


# ---------------------------------------------------------------- folders


def test_folder_is_walked_recursively_in_relative_path_order(tmp_path):
    root = tmp_path / "photos"
    write(root / "b.jpg", JPEG)
    write(root / "a" / "c.png", PNG)
    write(root / "a" / "z.JPG", JPEG)
    write(root / "noext", JPEG)  # an image by its magic bytes
    write(root / "fake.jpg", b"this is text, not a jpeg")  # named image: kept, decoder rejects it
    for junk in ("README", "notes.txt", "labels.csv", "meta.json"):
        write(root / junk, b"not an image at all")
    write(root / ".hidden.jpg", JPEG)
    write(root / ".git" / "x.jpg", JPEG)
    write(root / "a" / ".part-0.parquet.tmp-123", JPEG)

    units = plan(root)

    expected = [str(root / p) for p in ("a/c.png", "a/z.JPG", "b.jpg", "fake.jpg", "noext")]
    assert [(u.kind, u.index, u.source) for u in units] == [("folder", 0, str(root))]
    assert list(units[0].items) == expected
    raws = read_all(units)
    assert [r.source_uri for r in raws] == expected
    assert all(r.error is None and r.dataset == "ds" for r in raws)
    assert raws[0].data == PNG and raws[2].data == JPEG
    assert raws[3].data == b"this is text, not a jpeg"


def test_folder_plan_is_deterministic_and_chunked(tmp_path):
    for i in range(23):
        write(tmp_path / f"d{i % 3}" / f"img{i:02d}.jpg", JPEG)
    first, second = plan(tmp_path, 5), plan(tmp_path, 5)
    assert first == second
    assert [u.key for u in first] == [f"ds-{i:06d}" for i in range(5)]
    assert [len(u.items) for u in first] == [5, 5, 5, 5, 3]
    flat = [item for u in first for item in u.items]
    assert flat == sorted(flat) and len(set(flat)) == 23


def test_relative_local_source_becomes_absolute(tmp_path, monkeypatch):
    write(tmp_path / "imgs" / "a.jpg", JPEG)
    monkeypatch.chdir(tmp_path)
    (unit,) = plan("imgs/")
    assert unit.source == str(tmp_path / "imgs")
    assert unit.items == (str(tmp_path / "imgs" / "a.jpg"),)


def test_folder_with_glob_characters_in_its_name(tmp_path):
    write(tmp_path / "shots [2019]" / "a.jpg", JPEG)
    (unit,) = plan(tmp_path / "shots [2019]")
    assert unit.kind == "folder" and len(unit.items) == 1


def test_empty_folder_has_no_units(tmp_path):
    assert plan(tmp_path) == []


@pytest.mark.timeout(20)
def test_symlinks_are_followed_inside_the_folder_only_and_never_loop(tmp_path):
    outside = write(tmp_path / "outside" / "real.jpg", JPEG)
    root = tmp_path / "root"
    write(root / "a.jpg", PNG)
    write(root / "sub" / "real.jpg", JPEG)
    os.symlink(outside, root / "out.jpg")  # a file symlink out of the folder: refused, not read
    os.symlink(root / "sub" / "real.jpg", root / "link.jpg")  # a file symlink inside: followed
    os.symlink(root, root / "up")  # a folder loop: not descended into
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself
    os.symlink(root / "nowhere.png", root / "gone.png")  # a dangling link
    os.symlink("self", root / "self")  # an unnamed link to itself: not an image

    (unit,) = plan(root)

    names = [os.path.basename(i) for i in unit.items]
    assert names == ["a.jpg", "gone.png", "link.jpg", "loop.jpg", "out.jpg", "real.jpg"]
    raws = {os.path.basename(r.source_uri): r for r in read_unit(unit, HTTP)}
    assert raws["link.jpg"].data == JPEG
    assert raws["out.jpg"].data is None and raws["out.jpg"].error == OUTSIDE
    assert raws["gone.png"].error == "file not found" and raws["gone.png"].data is None
    assert raws["loop.jpg"].error and raws["loop.jpg"].data is None


def test_a_file_gone_after_planning_is_an_error_row(tmp_path):
    write(tmp_path / "a.jpg", JPEG)
    gone = write(tmp_path / "b.jpg", JPEG)
    (unit,) = plan(tmp_path)
    os.remove(gone)
    raws = list(read_unit(unit, HTTP))
    assert [(r.data is not None, r.error) for r in raws] == [(True, None), (False, "file not found")]


def test_folder_file_over_max_bytes_is_an_error_row(tmp_path):
    write(tmp_path / "a.jpg", JPEG)
    (raw,) = read_all(plan(tmp_path), HttpConfig(max_bytes=10))
    assert raw.data is None and "max_bytes" in raw.error


def test_folder_with_images_and_tars_gives_folder_then_tar_units(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.jpg", JPEG)
    make_tar(tmp_path / "more.tar", {"x.jpg": JPEG})
    units = plan(tmp_path, 2)
    assert [(u.kind, u.index, len(u.items)) for u in units] == [
        ("folder", 0, 2),
        ("folder", 1, 1),
        ("tar", 2, 1),
    ]


# ---------------------------------------------------------------- chunking


def test_chunking_covers_each_item_once_in_order(tmp_path):
    listing = tmp_path / "list.txt"
    for n in range(300):
        entries = [f"/data/img{i:04d}.jpg" for i in range(n)]
        listing.write_text("".join(f"{e}\n" for e in entries))
        for size in range(1, 18):
            units = plan(listing, size)
            assert len(units) == math.ceil(n / size)
            assert [u.index for u in units] == list(range(len(units)))
            assert all(len(u.items) == size for u in units[:-1])
            assert all(0 < len(u.items) <= size for u in units)
            assert [item for u in units for item in u.items] == entries


def test_unit_size_must_be_positive(tmp_path):
    with pytest.raises(ConfigError):
        plan(tmp_path, 0)


# ---------------------------------------------------------------- tars and WebDataset shards


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_single_tar_is_one_unit_of_its_images(tmp_path, suffix, mode):
    tar = make_tar(
        tmp_path / f"set{suffix}",
        {"a.jpg": JPEG, "sub/b.png": PNG, "sub/b.json": b"{}", "._a.jpg": b"AppleDouble", "raw": JPEG},
        mode,
    )
    units = plan(tar)
    assert units == [WorkUnit("ds", tar, "tar", 0, (tar,))]
    raws = read_all(units)
    assert [(r.source_uri, r.data) for r in raws] == [
        (f"{tar}#a.jpg", JPEG),
        (f"{tar}#sub/b.png", PNG),
        (f"{tar}#raw", JPEG),
    ]


def test_webdataset_folder_and_glob_give_one_unit_per_shard(tmp_path):
    shards = tmp_path / "shards"
    for s in range(3):
        members = {}
        for k in range(4):  # more members than unit_size: a shard is still one unit
            key = f"{s:02d}{k:04d}"
            members.update({f"{key}.jpg": JPEG, f"{key}.json": b'{"id": 1}', f"{key}.txt": b"caption"})
        make_tar(shards / f"{s:06d}.tar", members)
    write(shards / "README.md", b"shards")

    by_folder = plan(shards, 2)
    by_glob = plan(f"{shards}/*.tar", 2)

    tars = [str(shards / f"{s:06d}.tar") for s in range(3)]
    assert [(u.kind, u.index, u.items) for u in by_folder] == [("tar", s, (t,)) for s, t in enumerate(tars)]
    assert [u.items for u in by_glob] == [u.items for u in by_folder]
    raws = list(read_unit(by_glob[1], HTTP))
    assert [r.source_uri for r in raws] == [f"{tars[1]}#01{k:04d}.jpg" for k in range(4)]
    assert all(r.data == JPEG for r in raws)


def test_glob_of_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        plan(f"{tmp_path}/*.tar")


@pytest.mark.parametrize(
    "name, data",
    [
        ("empty.tar", b""),
        ("text.tar", b"hello, not a tar " * 40),
        ("bad.tgz", b"\x1f\x8b\x08\x00" + b"x" * 200),
    ],
)
def test_unreadable_tar_is_one_error_row(tmp_path, name, data):
    tar = write(tmp_path / name, data)
    (raw,) = read_all(plan(tar))
    assert raw.source_uri == tar and raw.data is None
    assert raw.error.startswith("cannot open archive")


def test_truncated_tar_keeps_good_members_then_records_the_break(tmp_path):
    big = image_bytes("PNG") + os.urandom(5000)  # a PNG header, then enough bytes to cut into
    tar = make_tar(tmp_path / "t.tar", {"a.jpg": JPEG, "b.png": big, "c.jpg": JPEG})
    data = open(tar, "rb").read()
    cut = data.index(big[:64]) + 1000
    write(tar, data[:cut])

    raws = read_all(plan(tar))

    assert raws[0].source_uri == f"{tar}#a.jpg" and raws[0].data == JPEG
    assert raws[1].source_uri == f"{tar}#b.png" and raws[1].data is None and raws[1].error
    assert len(raws) == 2


def test_missing_tar_after_planning_is_one_error_row(tmp_path):
    tar = make_tar(tmp_path / "t.tar", {"a.jpg": JPEG})
    units = plan(tar)
    os.remove(tar)
    (raw,) = read_all(units)
    assert raw.source_uri == tar and "file not found" in raw.error


def test_tar_member_over_max_bytes_is_an_error_row_and_reading_goes_on(tmp_path):
    tar = make_tar(
        tmp_path / "t.tar", {"small.jpg": b"\xff\xd8\xff" + b"0" * 10, "big.jpg": JPEG, "c.png": PNG}
    )
    raws = read_all(plan(tar), HttpConfig(max_bytes=len(PNG)))
    assert [(r.source_uri.split("#")[1], r.error is None) for r in raws] == [
        ("small.jpg", True),
        ("big.jpg", len(JPEG) <= len(PNG)),
        ("c.png", True),
    ]


# ---------------------------------------------------------------- URI lists


def test_txt_list_skips_blanks_and_comments_and_resolves_relative_paths(tmp_path):
    a = write(tmp_path / "imgs" / "a.jpg", JPEG)
    b = write(tmp_path / "other" / "b.png", PNG)
    listing = tmp_path / "set.txt"  # entries may be relative to its folder, or absolute inside it
    write(
        listing,
        f"# my data set\n\nimgs/a.jpg\n  {b}  \nimgs/missing.jpg\nhttp://x.invalid/c.jpg\n".encode(),
    )

    units = plan(listing, 2)

    assert [(u.kind, u.source) for u in units] == [("urilist", str(listing))] * 2
    assert [i for u in units for i in u.items] == [
        a,
        b,
        str(tmp_path / "imgs" / "missing.jpg"),
        "http://x.invalid/c.jpg",
    ]
    raws = list(read_unit(units[0], HTTP))
    assert [(r.source_uri, r.data) for r in raws] == [(a, JPEG), (b, PNG)]


def test_every_list_entry_yields_exactly_one_row(tmp_path):
    write(tmp_path / "a.jpg", JPEG)
    write(tmp_path / "notes.txt", b"not an image, but listed")
    listing = write(tmp_path / "l.txt", b"a.jpg\nnotes.txt\nnope.jpg\na.jpg\n")
    raws = read_all(plan(listing, 3))
    assert [os.path.basename(r.source_uri) for r in raws] == ["a.jpg", "notes.txt", "nope.jpg", "a.jpg"]
    assert [r.error for r in raws] == [None, None, "file not found", None]


def test_csv_list_uses_the_url_column_else_the_first(tmp_path):
    a = write(tmp_path / "a.jpg", JPEG)
    named = write(tmp_path / "named.csv", b"id,label,URL\n1,x,a.jpg\n2,y,sub/b.jpg\n3,z,\n")
    plain = write(tmp_path / "plain.csv", b"file,label\na.jpg,x\n")
    (unit,) = plan(named)
    assert unit.items == (a, str(tmp_path / "sub" / "b.jpg"))
    (unit,) = plan(plain)
    assert unit.items == (a,)
    assert read_all([unit])[0].data == JPEG


def test_csv_without_header(tmp_path):
    listing = write(tmp_path / "h.csv", b"a.jpg,cat\nhttp://x.invalid/b.jpg,dog\n")
    (unit,) = plan(listing)
    assert unit.items == (str(tmp_path / "a.jpg"), "http://x.invalid/b.jpg")


def test_csv_numeric_first_column_is_read_as_text(tmp_path):
    listing = write(tmp_path / "n.csv", b"name\n123\n456\n")
    (unit,) = plan(listing)
    assert unit.items == (str(tmp_path / "123"), str(tmp_path / "456"))


def test_parquet_list_uses_the_path_column(tmp_path):
    a = write(tmp_path / "imgs" / "a.jpg", JPEG)
    table = pa.table({"id": [1, 2, 3], "path": ["imgs/a.jpg", None, "gs://bucket/x.jpg"]})
    pq.write_table(table, tmp_path / "list.parquet")
    (unit,) = plan(tmp_path / "list.parquet")
    assert unit.items == (a, "gs://bucket/x.jpg")
    assert read_all([plan(tmp_path / "list.parquet", 1)[0]])[0].data == JPEG


def test_empty_lists_have_no_units(tmp_path):
    assert plan(write(tmp_path / "e.txt", b"# nothing\n\n")) == []
    assert plan(write(tmp_path / "e.csv", b"url\n")) == []


# ---------------------------------------------------------------- bad sources


def test_bad_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        plan(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a folder"):
        plan(write(tmp_path / "one.jpg", JPEG))
    with pytest.raises(ConfigError, match="no file system"):
        plan("nosuchscheme://bucket/list.txt")
    with pytest.raises(ConfigError, match="cannot read URI list"):
        plan(write(tmp_path / "bad.parquet", b"not parquet"))


def test_unknown_unit_kind_is_fatal():
    with pytest.raises(FatalError):
        list(read_unit(WorkUnit("ds", "x", "zip", 0, ("x",)), HTTP))


# ---------------------------------------------------------------- remote file systems


@pytest.fixture
def memfs():
    """fsspec's in-memory file system stands in for gs:// (same code path: not a local one)."""
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex}"
    yield fs, f"memory://{root}"
    fs.rm(root, recursive=True)


def test_remote_folder_glob_tar_and_list(memfs):
    fs, root = memfs
    fs.pipe(
        {
            f"{root}/imgs/b.jpg": JPEG,
            f"{root}/imgs/a/c.png": PNG,
            f"{root}/imgs/noext": JPEG,
            f"{root}/imgs/README": b"text",
            f"{root}/imgs/.cache/x.jpg": JPEG,
            f"{root}/lists/l.txt": b"../imgs/b.jpg\nhttp://example.invalid/x.jpg\n",
        }
    )
    buf = io.BytesIO()
    make_tar(buf, {"k.jpg": JPEG, "k.json": b"{}"})
    fs.pipe(f"{root}/shards/000.tar", buf.getvalue())

    (unit,) = plan(f"{root}/imgs/")
    assert unit.source == f"{root}/imgs"
    assert unit.items == tuple(f"{root}/imgs/{p}" for p in ("a/c.png", "b.jpg", "noext"))
    assert [r.data for r in read_unit(unit, HTTP)] == [PNG, JPEG, JPEG]

    (shard,) = plan(f"{root}/shards/*.tar")
    (raw,) = read_unit(shard, HTTP)
    assert raw.source_uri == f"{root}/shards/000.tar#k.jpg" and raw.data == JPEG

    (listed,) = plan(f"{root}/lists/l.txt")
    assert listed.items == (f"{root}/imgs/b.jpg", "http://example.invalid/x.jpg")
