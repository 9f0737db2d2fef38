"""Authentication, roles and request limits of the server.

:func:`install` (called once in the server process, from ``ContourApp.on_init_complete``):

* refuses to serve a non-loopback host with authentication off, unless ``--conf insecure true``;
* replaces MONAI Label's token check (``monailabel.endpoints.user.auth.from_token``, which
  cannot verify any token with PyJWT 2) with :func:`verify_token`;
* adds the gateway, an ASGI middleware that every HTTP request passes through, whatever route
  answers it (routes added later included): it checks the caller's role against
  :data:`ROUTE_ROLES` when ``MONAI_LABEL_AUTH_ENABLE`` is true, and the size of the request body
  (``--conf max_upload_mb``, ``--conf max_model_mb``) always.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import ipaddress
import logging
import re
import sys
import time
from typing import Any

import anyio
import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Security
from monailabel.config import settings
from monailabel.endpoints.user import auth as ml_auth
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from contourcl.serving import browsers
from contourcl.serving.conf import conf_positive

logger = logging.getLogger(__name__)

ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
REVIEWER = settings.MONAI_LABEL_AUTH_ROLE_REVIEWER
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
USER = settings.MONAI_LABEL_AUTH_ROLE_USER
PUBLIC = None  # no token needed
NOT_SERVED = "not served"  # a route this server does not answer (404 for everyone)

# Every route this server answers, and who may call it; first match wins. A row is (methods, path,
# role): methods "*" is any method, and HEAD counts as GET; a path that ends in "/*" matches that
# path and everything below it, any other path matches exactly. NOT_SERVED rows name what MONAI
# Label mounts and ContourCL does not serve; they, and anything that matches no row, answer 404
# (contourcl.serving.routes also takes them off the router). The same table is the allowlist with
# authentication off: a web page in the clinician's browser cannot reach a route that is not here.
ROUTE_ROLES: tuple[tuple[str, str, str | None], ...] = (
    # not served: they bypass the datastore's path rule (wsi), unpack archives and run code
    # (session, reload), or fail on a CPU (batch infer)
    ("*", "/infer/wsi/*", NOT_SERVED),
    ("*", "/infer/wsi_v2/*", NOT_SERVED),
    ("*", "/batch/*", NOT_SERVED),
    ("*", "/session/*", NOT_SERVED),
    ("*", "/reload", NOT_SERVED),
    ("GET", "/", PUBLIC),  # the API docs page
    ("GET", "/docs", PUBLIC),
    ("GET", "/openapi.json", PUBLIC),
    ("GET", "/favicon.ico", PUBLIC),
    ("GET", "/static/*", PUBLIC),
    ("GET POST", "/auth/*", PUBLIC),  # MONAI Label's login endpoints (mounted only with auth on)
    ("GET", "/ohif/*", USER),  # the OHIF viewer's own files (its data come through the routes below)
    # the DICOMweb proxy to the PACS that --studies names (OHIF's data source): reading (QIDO-RS,
    # WADO-RS) is viewing; a POST is a write into the PACS (STOW-RS: OHIF's "Export DICOM SEG"),
    # which --conf dicomweb_import_seg may import as a final label, so it asks what submitting a label asks
    ("GET", "/proxy/*", USER),
    ("POST", "/proxy/*", ANNOTATOR),
    # annotators: see the app, get the next sample, auto-contour, submit labels and images
    ("GET", "/info/*", ANNOTATOR),
    ("POST", "/activelearning/*", ANNOTATOR),
    ("POST", "/infer/*", ANNOTATOR),
    ("PUT", "/datastore/label", ANNOTATOR),
    ("PUT", "/datastore/image", ANNOTATOR),
    ("PUT", "/datastore/", ANNOTATOR),  # the same upload, where MONAILabelClient.upload_image sends it
    ("GET", "/datastore/", ANNOTATOR),  # the list of images and labels
    ("GET", "/datastore/image", ANNOTATOR),
    ("GET", "/datastore/image/info", ANNOTATOR),
    ("GET", "/datastore/label", ANNOTATOR),
    ("GET", "/datastore/label/info", ANNOTATOR),
    # reviewers: train, download models and the whole dataset, scoring, logs
    ("GET POST DELETE", "/train/*", REVIEWER),
    ("GET", "/model/*", REVIEWER),
    ("GET", "/datastore/dataset", REVIEWER),
    ("GET POST DELETE", "/scoring/*", REVIEWER),
    ("GET", "/logs/*", REVIEWER),
    # admins: replace or delete models, change image and label info, delete from the datastore
    ("PUT DELETE", "/model/*", ADMIN),
    ("PUT", "/datastore/image/info", ADMIN),
    ("PUT", "/datastore/label/info", ADMIN),
    ("PUT", "/datastore/updatelabelinfo", ADMIN),
    ("DELETE", "/datastore/*", ADMIN),
)

# a role includes the roles below it
ROLE_RANK = {USER: 0, ANNOTATOR: 1, REVIEWER: 2, ADMIN: 3}

DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_MAX_MODEL_MB = 200
MB = 1024 * 1024
LEEWAY_S = 30  # clock skew tolerated on exp/nbf/iat
KEY_TTL_S = 300  # the realm's public key is fetched again after this (key rotation)
LOOPBACK_NAMES = ("localhost",)

# the user the gateway verified for the request being handled (read by the patched RBAC/from_token)
_VERIFIED: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar("contourcl_verified", default=None)


class InsecureServerError(RuntimeError):
    """The server would serve a non-loopback address without authentication."""


class RealmUnavailable(jwt.InvalidTokenError):
    """The realm's public key cannot be fetched or read."""


# -- the policy ---------------------------------------------------------------------------------
def required_role(method: str, path: str) -> str | None:
    """The role :data:`ROUTE_ROLES` asks of ``method path`` (``None``: public; :data:`NOT_SERVED`:
    this server does not answer it, whoever asks)."""
    method = "GET" if method.upper() == "HEAD" else method.upper()
    for methods, pattern, role in ROUTE_ROLES:
        if methods != "*" and method not in methods.split():
            continue
        if pattern.endswith("/*"):
            base = pattern[:-2]
            if path == base or path.startswith(base + "/"):
                return role
        elif path == pattern:
            return role
    return NOT_SERVED


def has_role(roles, role: str | None) -> bool:
    """Whether ``roles`` include ``role`` or a role above it."""
    if role is None:
        return True
    needed = ROLE_RANK.get(role)
    if needed is None:
        return role in roles
    return any(ROLE_RANK.get(r, -1) >= needed for r in roles)


def _mb_text(mb: float) -> str:
    return f"{mb:g}"


def limits(conf: dict) -> dict:
    """The request body limits in MB (1 MB = 1,048,576 bytes): ``max_upload_mb`` for every request
    but ``PUT /model/...``, which ``max_model_mb`` limits."""
    return {"max_upload_mb": conf_positive(conf, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB, "megabytes"),
            "max_model_mb": conf_positive(conf, "max_model_mb", DEFAULT_MAX_MODEL_MB, "megabytes")}


def _server_args(argv: list[str] | None = None):
    """The options of ``monailabel start_server`` as it parsed them from ``argv`` (``sys.argv``)."""
    argv = list(sys.argv if argv is None else argv)
    if "start_server" not in argv:
        return None
    from monailabel.main import Main

    main = object.__new__(Main)  # Main.__init__ only sets up logging
    main.actions = {"start_server"}
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return main.args_parser().parse_known_args(argv[argv.index("start_server"):])[0]
    except SystemExit:
        return None


def serving_host(argv: list[str] | None = None) -> str | None:
    """The host that ``monailabel start_server`` (or the ``uvicorn`` command) was told to serve,
    read from the command line as they read it; ``None`` if it cannot be told."""
    argv = list(sys.argv if argv is None else argv)
    if "start_server" in argv:
        args = _server_args(argv)
        return args.host if args is not None else None
    if argv and argv[0].endswith("uvicorn"):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--host", default="127.0.0.1")
        return parser.parse_known_args(argv[1:])[0].host
    return None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _insecure(conf: dict) -> bool:
    return str(conf.get("insecure", "false")).strip().lower() == "true"


def status(app) -> dict:
    """What ``/info/`` shows under ``"security"``: auth on/off, the host, the insecure override and
    its warning, the upload limits."""
    conf = getattr(app, "conf", None) or {}
    host = serving_host()
    auth = bool(settings.MONAI_LABEL_AUTH_ENABLE)
    insecure = _insecure(conf)
    warning = None
    if not auth and not is_loopback(host):
        warning = (
            f"INSECURE: authentication is off and the server listens on {host or 'an unknown host'}; "
            "anyone who can reach it can read and change patient data and models (--conf insecure true)"
        )
    out = {"auth": auth, "host": host, "loopback": is_loopback(host), "insecure": insecure, "warning": warning}
    if auth:
        out["realm"] = settings.MONAI_LABEL_AUTH_REALM_URI
        out["client_id"] = settings.MONAI_LABEL_AUTH_CLIENT_ID
    out.update(limits(conf))
    out.update(browsers.status(conf, is_loopback(host)))
    return out


def check_host(app) -> dict:
    """Raise :class:`InsecureServerError` for a non-loopback host with auth off (unless
    ``--conf insecure true``); returns :func:`status`."""
    state = status(app)
    if state["warning"] is None:
        return state
    if not state["insecure"]:
        host = state["host"] or "an address that could not be read from the command line"
        message = (
            f"refusing to serve {host} with authentication off: anyone on the network could read and change "
            "patient data and models. Either turn authentication on (environment "
            "MONAI_LABEL_AUTH_ENABLE=true and MONAI_LABEL_AUTH_REALM_URI=https://<keycloak>/realms/<realm>), "
            "or serve this machine only (--host 127.0.0.1), or accept the risk with --conf insecure true"
        )
        logger.error(message)  # one plain line before uvicorn's traceback of the failed startup
        raise InsecureServerError(message)
    logger.warning(state["warning"])
    return state


# -- tokens ---------------------------------------------------------------------------------------
_KEYS: dict[str, tuple[float, Any]] = {}


def realm_public_key(realm_uri: str):
    """The RSA public key of a Keycloak-style realm (``GET realm_uri`` -> ``{"public_key": <base64
    SubjectPublicKeyInfo>}``), cached for :data:`KEY_TTL_S` seconds."""
    hit = _KEYS.get(realm_uri)
    if hit and time.monotonic() - hit[0] < KEY_TTL_S:
        return hit[1]
    try:
        r = requests.get(realm_uri, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
        r.raise_for_status()
        pem = f"-----BEGIN PUBLIC KEY-----\n{r.json()['public_key']}\n-----END PUBLIC KEY-----"
        key = serialization.load_pem_public_key(pem.encode())
    except Exception as err:
        raise RealmUnavailable(f"cannot read the public key of the auth realm {realm_uri}: {err}") from err
    if not isinstance(key, rsa.RSAPublicKey):
        raise RealmUnavailable(f"the auth realm {realm_uri} serves a {type(key).__name__}, not an RSA key")
    _KEYS[realm_uri] = (time.monotonic(), key)
    return key


def _key_cached(realm_uri: str) -> bool:
    hit = _KEYS.get(realm_uri)
    return bool(hit) and time.monotonic() - hit[0] < KEY_TTL_S


def _claim(payload: dict, path: str):
    value: Any = payload
    for part in path.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def verify_token(token: str) -> ml_auth.User:
    """The user of a realm's access token, or ``jwt.InvalidTokenError``.

    Checked: an RS256 signature by the realm's key (no other algorithm), ``exp`` (required),
    ``nbf``/``iat`` if present, ``iss`` equal to ``MONAI_LABEL_AUTH_REALM_URI``, and the client:
    ``aud`` (a string or a list) contains ``MONAI_LABEL_AUTH_CLIENT_ID`` or ``azp`` equals it
    (Keycloak access tokens carry the client in ``azp`` and often ``aud`` = "account"); a ``typ``
    claim, if present, must be ``Bearer`` (not an ID or refresh token). The roles are those at
    ``MONAI_LABEL_AUTH_TOKEN_ROLES`` plus the roles below them (admin > reviewer > annotator > user).
    """
    realm = settings.MONAI_LABEL_AUTH_REALM_URI
    client = settings.MONAI_LABEL_AUTH_CLIENT_ID
    payload = jwt.decode(
        token,
        realm_public_key(realm),
        algorithms=["RS256"],
        leeway=LEEWAY_S,
        options={"require": ["exp", "iss"], "verify_aud": False},
    )
    if str(payload["iss"]).rstrip("/") != realm.rstrip("/"):
        raise jwt.InvalidIssuerError(f"token issued by {payload['iss']!r}, not by {realm!r}")
    aud = payload.get("aud")
    audiences = [aud] if isinstance(aud, str) else list(aud or [])
    if client not in audiences and payload.get("azp") != client:
        raise jwt.InvalidAudienceError(f"token is not for the client {client!r} (aud={aud!r}, azp={payload.get('azp')!r})")
    typ = payload.get("typ")
    if typ is not None and str(typ).lower() != "bearer":
        raise jwt.InvalidTokenError(f"a {typ!r} token is not an access token")

    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []
    rank = max((ROLE_RANK.get(r, -1) for r in roles), default=-1)
    roles += [r for r, n in ROLE_RANK.items() if n <= rank and r not in roles]

    def text(key):
        value = payload.get(key)
        return value if isinstance(value, str) else None

    username = text(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or text("sub") or "unknown"
    return ml_auth.User(username=username, email=text(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL), name=text(settings.MONAI_LABEL_AUTH_TOKEN_NAME), roles=roles)


def from_token(token: str):
    """Replacement for ``monailabel.endpoints.user.auth.from_token`` (same contract)."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return ml_auth.DEFAULT_USER
    verified = _VERIFIED.get()
    if verified is not None and verified[0] == token:
        return verified[1]
    return verify_token(token)


_ML_RBAC_CALL = ml_auth.RBAC.__call__


async def _rbac_call(self, user: ml_auth.User = Security(ml_auth.get_current_user)):  # noqa: B008 (FastAPI's idiom)
    """MONAI Label's per-route role check, deferring to :data:`ROUTE_ROLES` for the requests the
    gateway has let through (MONAI Label asks for admin to train, this table for reviewer)."""
    if settings.MONAI_LABEL_AUTH_ENABLE and _VERIFIED.get() is not None:
        return user
    return await _ML_RBAC_CALL(self, user)


# -- the gateway ----------------------------------------------------------------------------------
class _TooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a body passes its limit (FastAPI re-raises Starlette HTTP
    exceptions met while reading a body; the gateway answers 413 whatever becomes of it)."""

    def __init__(self, detail: str):
        super().__init__(status_code=413, detail=detail)


def _route_path(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    prefix = settings.MONAI_LABEL_API_STR
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return path or "/"


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Gateway:
    """ASGI middleware: roles (when auth is on) and request body limits for every HTTP request."""

    def __init__(self, app, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_model_mb: float = DEFAULT_MAX_MODEL_MB):
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_model_mb = max_model_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and settings.MONAI_LABEL_AUTH_ENABLE:
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        method, path = scope["method"], _route_path(scope)
        role = required_role(method, path)
        if role == NOT_SERVED:
            await _answer(scope, receive, send, 404, f"this server does not serve {method} {path} (see GET /info/routes)")
            return
        verified_token = None
        if settings.MONAI_LABEL_AUTH_ENABLE and role is not PUBLIC:
            token = _bearer(scope)
            if token is None:
                await _answer(scope, receive, send, 401, f"authentication required: send 'Authorization: Bearer <token>' of a user with the role {role!r}")
                return
            try:
                if _key_cached(settings.MONAI_LABEL_AUTH_REALM_URI):
                    user = verify_token(token)
                else:  # the first fetch of the realm's key is a blocking HTTP call
                    user = await anyio.to_thread.run_sync(verify_token, token)
            except RealmUnavailable as err:
                logger.error(str(err))
                await _answer(scope, receive, send, 503, "the authentication realm cannot be reached; try again later")
                return
            except jwt.InvalidTokenError as err:
                logger.info(f"{method} {path}: token refused: {err}")
                await _answer(scope, receive, send, 401, f"invalid token: {err}")
                return
            if not has_role(user.roles, role):
                await _answer(scope, receive, send, 403, f"role {role!r} is required for {method} {path}; user {user.username!r} has {sorted(user.roles)}")
                return
            verified_token = _VERIFIED.set((token, user))

        try:
            await self._limited(scope, receive, send, method, path)
        finally:
            if verified_token is not None:
                _VERIFIED.reset(verified_token)

    async def _limited(self, scope, receive, send, method, path):
        model = method == "PUT" and (path == "/model" or path.startswith("/model/"))
        mb, conf_key = (self.max_model_mb, "max_model_mb") if model else (self.max_upload_mb, "max_upload_mb")
        limit = int(mb * MB)
        detail = f"request body too large: the limit is {_mb_text(mb)} MB for this request (--conf {conf_key}); nothing was stored"
        length = _content_length(scope)
        if length is not None and length > limit:
            logger.warning(f"{method} {path}: refused a body of {length} bytes (Content-Length), over {_mb_text(mb)} MB (--conf {conf_key})")
            await _answer(scope, receive, send, 413, detail)
            return

        received = 0
        over = started = replaced = False

        async def limited_receive():
            nonlocal received, over
            if over:
                raise _TooLarge(detail)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    logger.warning(f"{method} {path}: refused a body past {_mb_text(mb)} MB while reading it (--conf {conf_key})")
                    raise _TooLarge(detail)
            return message

        async def guarded_send(message):
            nonlocal started, replaced
            if over and not started:  # whatever the app answers to the overflow, the caller gets the 413
                started = replaced = True
                await _answer(scope, receive, send, 413, detail)
            if replaced:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await _answer(scope, receive, send, 413, detail)


async def _answer(scope, receive, send, status_code: int, detail: str):
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    await JSONResponse({"detail": detail}, status_code=status_code, headers=headers)(scope, receive, send)


# -- logs -------------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class EscapeControlCharacters(logging.Filter):
    """A log handler's filter: control characters in a message (a request path or id with
    ``%0D%0A``) are written escaped (``\\r\\n``), so a client cannot forge a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a bad format string: the handler reports it)
            return True
        clean = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def escape_logs() -> None:
    """Put :class:`EscapeControlCharacters` on every log handler there is now."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for handler in {h for lg in loggers for h in getattr(lg, "handlers", [])}:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())


# -- install ------------------------------------------------------------------------------------
def install(server, app) -> None:
    """Check the host, fix token verification, and put the gateway around every route of the
    running FastAPI ``server`` (inside CORS, so error answers carry CORS headers and preflights
    are answered)."""
    state = check_host(app)
    escape_logs()
    ml_auth.from_token = from_token
    ml_auth.RBAC.__call__ = _rbac_call
    if any(m.cls is Gateway for m in server.user_middleware):
        return
    # MONAI Label's CORS grant (any origin, with credentials) is replaced by the browser rules of
    # contourcl.serving.browsers; the gateway sits inside them, so preflights never reach it
    server.user_middleware[:] = [m for m in server.user_middleware if m.cls is not CORSMiddleware]
    server.user_middleware += [*browsers.middleware(app.conf or {}, state["loopback"]),
                               Middleware(Gateway, max_upload_mb=state["max_upload_mb"], max_model_mb=state["max_model_mb"])]
    from contourcl.serving import routes  # it reads this module's table

    routes.prune(server)
    # Starlette built the stack on the lifespan call; it is rebuilt from the same router, so
    # routes added to server.router later are served through the gateway too
    server.middleware_stack = server.build_middleware_stack()
    if state["auth"]:
        logger.info(f"authentication on: tokens of realm {state['realm']} for client {state['client_id']}; roles per endpoint: contourcl.serving.security.ROUTE_ROLES")
        if not getattr(_server_args(), "ssl_certfile", None) and not state["loopback"]:
            logger.warning("authentication is on without --ssl_certfile: serve behind an HTTPS proxy, or tokens travel in clear text")
    logger.info(f"request body limits: {_mb_text(state['max_upload_mb'])} MB (uploads), {_mb_text(state['max_model_mb'])} MB (PUT /model)")
