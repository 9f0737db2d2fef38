"""ContourCL's input errors, and a disk that cannot take a write, as HTTP errors (the server
answers them and keeps serving)."""

from __future__ import annotations

import contextlib
import errno
import logging

from fastapi import HTTPException

from contourcl.errors import ContourCLError, UnknownModelError, UnsafeIdError
from contourcl.serving.lifecycle import TrainerBusyError

logger = logging.getLogger(__name__)

#: a write the disk cannot take: 507 Insufficient Storage (full) or 503 (read-only, not permitted)
DISK_ERRORS = {errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EROFS: 503, errno.EACCES: 503, errno.EPERM: 503, errno.EIO: 503}


def status_of(err: ContourCLError) -> int:
    if isinstance(err, TrainerBusyError):  # a retrain of that model runs, or another change holds it
        return 409
    if isinstance(err, UnknownModelError):
        return 404
    if isinstance(err, UnsafeIdError):
        return 400
    return 422


def disk_error(err: OSError, what: str = "the write") -> HTTPException | None:
    """The HTTP answer to an ``OSError`` from a full or read-only disk (``None`` for others)."""
    code = DISK_ERRORS.get(err.errno)
    if code is None:
        return None
    where = f" ({err.filename})" if err.filename else ""
    reason = "the disk is full" if code == 507 else "the disk refuses writes"
    detail = f"{what} failed: {reason}: {err.strerror or err}{where}; nothing was changed. Tell the administrator of this server."
    logger.error(detail)
    return HTTPException(status_code=code, detail=detail)


@contextlib.contextmanager
def http_errors(what: str = "the write"):
    """Re-raise :class:`ContourCLError` as ``HTTPException`` with the error's message, and an
    ``OSError`` of a full or read-only disk as 507 or 503 (see :func:`disk_error`)."""
    try:
        yield
    except ContourCLError as err:
        raise HTTPException(status_code=status_of(err), detail=str(err)) from err
    except OSError as err:
        answer = disk_error(err, what)
        if answer is None:
            raise
        raise answer from err
