"""FAISS index files: read memory-mapped, write in RAM or with on-disk inverted lists, and load
writable for an erasure (faiss ``contrib/ondisk.py`` is the model for the on-disk lists)."""

from __future__ import annotations

import os

import faiss

from . import bundle


def read_faiss(path: str, on_disk: bool) -> faiss.Index:
    """Memory-map where faiss can; on-disk inverted lists are found beside the index file."""
    if on_disk:
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    try:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # index types without zero-copy support are read into RAM
        return faiss.read_index(path)


def write_faiss(staging: str, k: int, index: faiss.Index, on_disk: bool) -> dict:
    name = f"shard-{k}.faissindex"
    path = os.path.join(staging, name)
    out: dict = {}
    if on_disk:
        ivfdata = f"shard-{k}.ivfdata"
        move_to_ondisk(index, os.path.join(staging, ivfdata))
        faiss.write_index(index, path)
        out["ivfdata"] = bundle.file_entry(staging, ivfdata)
    else:
        faiss.write_index(index, path)
    out["index"] = bundle.file_entry(staging, name)
    return out


def move_to_ondisk(index: faiss.Index, ivfdata_path: str) -> None:
    """Replace the in-RAM inverted lists by OnDiskInvertedLists in ``ivfdata_path`` (as merge_ondisk)."""
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata_path)
    sources = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]
    sources.push_back(ivf.invlists)
    ondisk.merge_from_multiple(sources.data(), sources.size(), False)
    # the index file records this name; readers open it beside the index (IO_FLAG_ONDISK_SAME_DIR),
    # so keep only the base name: the file's bytes then do not depend on where it was built
    ondisk.filename = os.path.basename(ivfdata_path)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now


def load_writable(path: str, on_disk: bool) -> faiss.Index:
    """The whole index in RAM (on-disk lists copied in), so that remove_ids never edits a live file."""
    if not on_disk:
        return faiss.read_index(path)
    index = read_faiss(path, on_disk=True)
    ivf = faiss.extract_index_ivf(index)
    source = ivf.invlists
    assert source is not None
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for lid in range(ivf.nlist):
        size = source.list_size(lid)
        if size:
            lists.add_entries(lid, size, source.get_ids(lid), source.get_codes(lid))
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # type: ignore[attr-defined]  # the index owns them now
    return index
