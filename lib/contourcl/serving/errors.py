"""ContourCL's input errors as HTTP errors (the server answers them and keeps serving)."""

from __future__ import annotations

import contextlib

from fastapi import HTTPException

from contourcl.errors import ContourCLError, UnknownModelError, UnsafeIdError


def status_of(err: ContourCLError) -> int:
    if isinstance(err, UnknownModelError):
        return 404
    if isinstance(err, UnsafeIdError):
        return 400
    return 422


@contextlib.contextmanager
def http_errors():
    """Re-raise :class:`ContourCLError` as ``HTTPException`` with the error's message."""
    try:
        yield
    except ContourCLError as err:
        raise HTTPException(status_code=status_of(err), detail=str(err)) from err
