"""Reading a ``--conf`` value of the server: a bad one stops the start with an error naming the key."""

from __future__ import annotations


def conf_int(conf: dict, key: str, default: int, minimum: int, what: str = "a whole number") -> int:
    """``--conf key N``: a whole number of at least ``minimum`` (``default`` when not given);
    otherwise ``ValueError`` naming the key, the value and ``what`` it should be."""
    value = conf.get(key, default)
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"--conf {key} {value!r}: give {what} (default {default})") from None
    if number < minimum:
        raise ValueError(f"--conf {key} {value!r}: at least {minimum}")
    return number
