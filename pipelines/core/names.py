"""Names that become paths: run ids, version names, export names, data set names, CURRENT.

The design contract (DESIGN.md, "Names that become paths"): such a name matches
``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` with no ``..``. Anything else is refused with a one-line
error before any file is touched. The same check applies where a name enters (a flag, a config)
and where it is read back (a manifest, ``CURRENT``), so a resealed manifest or a hand-edited
CURRENT cannot steer a path either.
"""

from __future__ import annotations

import re

from .errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BadName(ConfigError):
    """A name that would leave its folder, or hold characters no path of ours needs."""


def check_name(value: object, kind: str = "name") -> str:
    """``value`` itself when it is a safe path component; else BadName naming ``kind``.

    The value is shown with ``repr`` and cut to 80 characters, so a hostile name can neither
    break the message's line nor flood it."""
    if isinstance(value, str) and NAME.fullmatch(value) and ".." not in value:
        return value
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise BadName(
        f"{kind} {shown} is not allowed: use 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter "
        "or digit, without '..'"
    )


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.fullmatch(value) is not None and ".." not in value
