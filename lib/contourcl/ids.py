"""Image ids and label tags that are safe to turn into file names.

The datastore joins ids and tags to folder paths; an id like ``../../etc/passwd`` must never
get there (MONAI Label does not check). Allowed: letters, digits, ``.``, ``_``, ``-``,
starting with a letter or digit, no ``..``, at most 128 characters.
"""

from __future__ import annotations

import re

from contourcl.errors import UnsafeIdError

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(value: object, what: str = "image id") -> str:
    """``value`` if it is a safe id, else :class:`UnsafeIdError` naming it."""
    text = str(value) if value is not None else ""
    if not _SAFE.fullmatch(text) or ".." in text:
        raise UnsafeIdError(
            f"{what} {text!r} is not allowed: use letters, digits, '.', '_' and '-' only "
            "(no path separators, no '..'), starting with a letter or digit"
        )
    return text
