"""The server's log filter: control characters a client sends cannot forge a log line.

Through the real server: ``tests/integration/test_hostile.py``.
"""

from __future__ import annotations

import io
import logging

from contourcl.serving.security import EscapeControlCharacters


def test_the_log_filter_escapes_control_characters():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeControlCharacters())
    log = logging.getLogger("contourcl.test.escape")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("image %s refused", "x\r\n[INFO] admin logged in\x1b[2J")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "image x\\r\\n[INFO] admin logged in\\x1b[2J refused\n"
