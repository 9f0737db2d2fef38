"""Files replaced whole: a reader sees the old content or the new one, never half of either."""

from __future__ import annotations

import os
import time
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The temporary name carries the process id and a nanosecond clock, so two writers (processes
    or threads) never share one; the folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
