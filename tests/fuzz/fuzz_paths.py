"""An atheris target for the name check and the URI-list resolver: run by tests/fuzz/test_paths_fuzz.py.

    python tests/fuzz/fuzz_paths.py [libFuzzer flags]

Properties, for any text: ``check_name`` accepts only a single path component that stays in its
folder, and refuses everything else with BadName; an entry of a URI list that ``roots.allowed``
accepts (other than http) resolves to a path under the list's folder or an allowed root. Any
other exception, or a broken property, is a crash with the input saved.
"""

from __future__ import annotations

import os
import posixpath
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["pipelines"]):
    from pipelines.core import roots
    from pipelines.core.names import BadName, check_name

BASE = "/data/set"
REMOTE_BASE = "gs://bucket/set"
ALLOWED = "/mirror/photos"


def check_one_name(text: str) -> None:
    try:
        name = check_name(text, "fuzzed name")
    except BadName:
        return
    joined = os.path.normpath(os.path.join(BASE, name))
    if name != text or os.path.dirname(joined) != BASE or "/" in name or name in (".", ".."):
        raise AssertionError(f"check_name accepted {text!r}, which leaves its folder")


def check_one_entry(entry: str, base: str) -> None:
    resolved = roots.resolve_entry(entry, base)
    if not roots.allowed(resolved, (base, ALLOWED)) or roots.is_http(resolved):
        return
    folded = roots.normalize(resolved)
    inside = [r for r in (base, ALLOWED) if folded == r or folded.startswith(r + "/")]
    if (
        not inside
        or "/../" in folded + "/"
        or (folded.startswith("/") and folded != posixpath.normpath(folded))
    ):
        raise AssertionError(f"entry {entry!r} resolved to {folded!r}, outside {base} and {ALLOWED}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(200)
    check_one_name(text)
    if "\x00" not in text:
        check_one_entry(text, BASE)
        check_one_entry(text, REMOTE_BASE)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
