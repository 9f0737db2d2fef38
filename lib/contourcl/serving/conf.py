"""Reading a ``--conf`` value of the server: a bad one stops the start with an error naming the key."""

from __future__ import annotations

from contourcl.errors import ConfigError


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


def conf_positive(conf: dict, key: str, default: float, unit: str) -> float:
    """``--conf key X``: a number of ``unit`` (``"seconds"``, ``"megabytes"``) above 0 (``default``
    when not given); otherwise :class:`~contourcl.errors.ConfigError` (a ``ValueError``) naming
    the key, the value and the unit."""
    value = conf.get(key, default)
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"--conf {key} {value!r}: give a number of {unit} (default {default:g})") from None
    if not number > 0:  # also NaN
        raise ConfigError(f"--conf {key} {value!r}: must be more than 0 {unit}")
    return number
