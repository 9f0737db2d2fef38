"""Every route the server mounts, and only the ones ContourCL serves.

MONAI Label 0.8.5 mounts routes ContourCL does not serve: ``/session`` (unpacks any archive a
client sends, members with absolute paths, ``../`` or links included), ``/reload`` (re-imports the
app), ``/infer/wsi`` and ``/infer/wsi_v2`` (contour any path on the server) and ``/batch/infer``
(fails on a CPU). :func:`prune` takes every route whose (method, path) the role table
:data:`contourcl.serving.security.ROUTE_ROLES` marks as not served off the FastAPI router; the
gateway answers 404 to anything that matches no served row as well, so a route some later
release adds is not served until the table names it. :func:`listing` lists every route still
mounted (hidden ones included) with its role and owner: ``GET /info/routes``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from contourcl.serving.security import NOT_SERVED, PUBLIC, ROLE_RANK, required_role

logger = logging.getLogger(__name__)

#: the methods a route that names none (a mount of static files) answers
MOUNT_METHODS = ("GET",)


def _walk(routes, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(full path, route)`` of every leaf route, through FastAPI's included routers."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI's lazily included router: its routes under its prefix
            context = getattr(route, "include_context", None)
            yield from _walk(included.routes, prefix + (getattr(context, "prefix", "") or ""))
            continue
        path = getattr(route, "path", None)
        if path is not None:
            yield prefix + path, route


def _methods(route) -> list[str]:
    methods = getattr(route, "methods", None)
    return sorted({"GET" if m == "HEAD" else m for m in methods}) if methods else list(MOUNT_METHODS)


def _pattern(path: str) -> str:
    """A route's path as the role table reads it: ``{param}`` and mounts stand for any name."""
    return path.replace("{", "").replace("}", "").replace(":path", "")


def _owner(route) -> str:
    endpoint = getattr(route, "endpoint", None) or getattr(route, "app", None)
    module = getattr(endpoint, "__module__", "") or type(endpoint).__module__
    return "contourcl" if module.startswith("contourcl") else "monailabel"


def _role(methods: list[str], path: str) -> str | None:
    """The role the table asks for the route (the strictest over its methods)."""
    roles = {required_role(m, _pattern(path)) for m in methods}
    if NOT_SERVED in roles:
        return NOT_SERVED
    return max(roles, key=lambda r: -1 if r is PUBLIC else ROLE_RANK.get(r, len(ROLE_RANK))) if roles else NOT_SERVED


def listing(server) -> list[dict]:
    """``{"methods", "path", "role", "owner"}`` of every route mounted on ``server`` (a FastAPI app)."""
    out = []
    for path, route in _walk(server.router.routes):
        methods = _methods(route)
        out.append({"methods": methods, "path": path, "role": _role(methods, path), "owner": _owner(route)})
    return out


def _served(route, prefix: str) -> bool:
    path = prefix + getattr(route, "path", "")
    return any(required_role(m, _pattern(path)) != NOT_SERVED for m in _methods(route))


def _prune_list(routes: list, prefix: str = "") -> list[str]:
    removed = []
    for route in list(routes):
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            removed += _prune_list(included.routes, prefix + (getattr(context, "prefix", "") or ""))
            if hasattr(included, "_routes_version"):
                included._routes_version += 1  # FastAPI caches an included router's effective routes
            if not included.routes:
                routes.remove(route)
            continue
        if getattr(route, "path", None) is not None and not _served(route, prefix):
            routes.remove(route)
            removed.append(f"{'/'.join(_methods(route))} {prefix}{route.path}")
    return removed


def prune(server) -> list[str]:
    """Take the routes the role table does not serve off ``server``; returns what was removed."""
    removed = _prune_list(server.router.routes)
    if hasattr(server.router, "_routes_version"):
        server.router._routes_version += 1
    if removed:
        logger.info("routes not served (removed): %s", ", ".join(removed))
    return removed
