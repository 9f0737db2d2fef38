"""What a web page in the clinician's browser may do with the server: only what it is granted.

The server runs on the clinician's own machine, often with authentication off on 127.0.0.1. Every
web page that browser opens can send requests to ``http://127.0.0.1:8000``; MONAI Label 0.8.5
answers any ``Origin`` with ``access-control-allow-origin: <that origin>`` and credentials, and any
``Host`` header (DNS rebinding: a page on ``attacker.example`` whose name then resolves to
127.0.0.1 talks to the server as its own origin). :func:`install` replaces that with:

- **CORS** only for the origins ``--conf cors_origins`` names (comma-separated, e.g.
  ``https://ohif.hospital.example``); none by default. The OHIF viewer the server itself serves
  (``/ohif/``) is the same origin and needs no grant.
- **Host**: a server bound to a loopback address answers only ``Host: 127.0.0.1``, ``localhost``
  or ``[::1]`` (any port) and the names ``--conf allowed_hosts`` adds; a server bound to another
  address answers the names ``--conf allowed_hosts`` gives, or any name when it gives none (that
  server runs with authentication on, see :mod:`contourcl.serving.security`). Others: 400.
- **Cross-site requests**: a request that can change something (any method but GET, HEAD and
  OPTIONS) whose ``Origin`` is neither the server's own nor a granted one, or that a browser marks
  ``Sec-Fetch-Site: cross-site`` or ``same-site`` without a granted origin, is refused (403): a
  form on another page cannot post to it. So is a cross-site GET that is not a navigation (an image
  or script tag pointing at the server). Clients that are not browsers (Slicer, ``curl``,
  ``MONAILabelClient``) send neither header and are not affected.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _list(conf: dict, key: str) -> list[str]:
    value = str(conf.get(key, "") or "")
    return [item.strip() for item in value.split(",") if item.strip()]


def cors_origins(conf: dict) -> list[str]:
    """The origins ``--conf cors_origins`` grants, each ``scheme://host[:port]`` (checked)."""
    origins = _list(conf, "cors_origins")
    for origin in origins:
        parts = urlsplit(origin)
        if origin == "*" or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"--conf cors_origins {origin!r}: give origins as scheme://host[:port], comma-separated "
                             "(e.g. https://ohif.hospital.example); '*' is not allowed")
    return [o.rstrip("/").lower() for o in origins]


def allowed_hosts(conf: dict, loopback: bool) -> list[str] | None:
    """The ``Host`` names the server answers (``None``: any), see the module docstring."""
    configured = [h.lower().strip("[]") for h in _list(conf, "allowed_hosts")]
    if loopback:
        return [*LOOPBACK_HOSTS, *configured]
    return [*LOOPBACK_HOSTS, *configured] if configured else None


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _hostname(host: str) -> str:
    """``host`` of a ``Host`` header without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuard:
    """ASGI middleware: the ``Host`` rule and the cross-site rule of the module docstring."""

    def __init__(self, app, hosts: list[str] | None, origins: list[str]):
        self.app = app
        self.hosts = hosts
        self.origins = set(origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            status, detail = refusal
            logger.warning("refused %s %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path", ""), detail)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str] | None:
        """``(status, detail)`` if the request is refused, else ``None``."""
        host = _header(scope, b"host")
        if self.hosts is not None and (host is None or _hostname(host) not in self.hosts):
            return 400, (f"Host {host!r} is not a name of this server (it answers {sorted(set(self.hosts))}); "
                         "add a name with --conf allowed_hosts")
        origin = _header(scope, b"origin")
        site = (_header(scope, b"sec-fetch-site") or "").lower()
        if origin is not None:
            granted = origin.rstrip("/").lower() in self.origins
            same = host is not None and urlsplit(origin).netloc.lower() == host.strip().lower()
            if granted or same:
                return None
        elif site not in ("cross-site", "same-site"):
            return None  # not a browser, or a browser on this server's own pages
        method = scope.get("method", "GET")
        if method in SAFE_METHODS:
            if (_header(scope, b"sec-fetch-mode") or "").lower() == "navigate":
                return None  # a link to the viewer followed from another page
            if not site:
                return None  # a read by an older browser: without a CORS grant the page gets nothing
        return 403, (f"cross-site request from {origin or 'another site'} refused: this server takes requests from its own "
                     "pages and from the origins --conf cors_origins names")


def middleware(conf: dict, loopback: bool) -> list[Middleware]:
    """CORS (only for granted origins) around the :class:`BrowserGuard`, outermost first."""
    origins = cors_origins(conf)
    stack = []
    if origins:
        stack.append(Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=True,
                                allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["*"]))
    stack.append(Middleware(BrowserGuard, hosts=allowed_hosts(conf, loopback), origins=origins))
    return stack


def status(conf: dict, loopback: bool) -> dict:
    """What ``/info/`` shows: the granted origins and the ``Host`` names answered."""
    return {"cors_origins": cors_origins(conf), "allowed_hosts": allowed_hosts(conf, loopback)}
