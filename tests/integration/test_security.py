"""Security through the real server: tokens, roles per endpoint family, the host rule, body limits.

Three servers start at once, as users start them (``monailabel start_server ...``), each on a copy
of the app and of the sample data:

- ``auth``: authentication on, on 127.0.0.1, against a local realm that serves the public key of an
  RSA key made here; small body limits (``--conf max_upload_mb 1 --conf max_model_mb 2``);
- ``refused``: 0.0.0.0 with auth off and nothing else changed: must refuse to start, before any
  background job (MONAI Label's scoring) runs, and never listen;
- ``insecure``: 0.0.0.0 with auth off and ``--conf insecure true``: starts and warns. It is the only
  server not on 127.0.0.1 (the override exists for that case), up for this module only.

Background scoring is off for ``auth`` and ``insecure`` (``MONAI_LABEL_AUTO_UPDATE_SCORING``), so
that they only do what the tests ask.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from contourcl.testing import sandbox, start_monailabel, stop_process, wait_until_serving

pytestmark = pytest.mark.timeout(400)

ADMIN, REVIEWER, ANNOTATOR, USER = "monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"
CASE = "synthetic_hn_000"  # labeled in sample-data
VIEWER = "http://viewer.example"  # the browser origin the auth server grants (--conf cors_origins)
STARTUP_S = 240  # generous: the three servers start together on a 2-core machine


def _rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _spki_b64(key) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def realm():
    """A Keycloak-like realm endpoint on 127.0.0.1: ``GET /realms/monailabel`` -> its public key."""
    key = _rsa_key()
    body = json.dumps({"realm": "monailabel", "public_key": _spki_b64(key)}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path.rstrip("/") == "/realms/monailabel"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if ok else b"{}")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"uri": f"http://127.0.0.1:{httpd.server_address[1]}/realms/monailabel", "key": key}
    finally:
        httpd.shutdown()
        httpd.server_close()


def _start(root: Path, name: str, host: str, conf: dict, env: dict, scoring: bool = False) -> dict:
    """``monailabel start_server`` on copies of the app and the sample data, logging to a file."""
    base = root / name
    app, studies = sandbox(base)
    tmp = base / "tmp"
    tmp.mkdir()
    full_env = {"MONAI_LABEL_AUTH_ENABLE": None, "MONAI_LABEL_AUTH_REALM_URI": None, "TMPDIR": str(tmp), **env}
    if not scoring:
        full_env["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"
    log_path = base / "server.log"
    # a session of its own: stopping it stops the training and scoring processes it starts too
    proc, url = start_monailabel(app, studies, {"models": "all", **conf}, log_path, host=host, cwd=base, env=full_env, new_session=True)
    return {"proc": proc, "log_path": log_path, "url": url, "port": int(url.rsplit(":", 1)[1]),
            "studies": studies, "app": app, "tmp": tmp, "started": time.time()}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, realm):
    root = tmp_path_factory.mktemp("security")
    auth_env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm["uri"]}
    started = {}
    try:
        started["auth"] = _start(root, "auth", "127.0.0.1", {"max_upload_mb": 1, "max_model_mb": 2, "cors_origins": VIEWER}, auth_env)
        started["refused"] = _start(root, "refused", "0.0.0.0", {}, {}, scoring=True)  # as a user starts it
        started["insecure"] = _start(root, "insecure", "0.0.0.0", {"insecure": "true"}, {})
        deadline = time.time() + STARTUP_S
        wait_until_serving(started["auth"]["proc"], started["auth"]["url"], started["auth"]["log_path"], deadline - time.time(), path="/favicon.ico")
        wait_until_serving(started["insecure"]["proc"], started["insecure"]["url"], started["insecure"]["log_path"], deadline - time.time(), path="/favicon.ico")
        yield started
    finally:
        for server in started.values():
            stop_process(server["proc"], timeout=20)


# -- tokens -----------------------------------------------------------------------------------------
def _claims(realm, roles, **changes) -> dict:
    now = int(time.time())
    claims = {"iss": realm["uri"], "azp": "monailabel-app", "aud": "account", "typ": "Bearer", "sub": "u-1",
              "iat": now, "exp": now + 600, "preferred_username": "dr.who", "email": "who@clinic.example",
              "realm_access": {"roles": list(roles)}}
    claims.update(changes)
    return claims


def _token(realm, roles, key=None, **changes) -> str:
    return jwt.encode(_claims(realm, roles, **changes), key or realm["key"], algorithm="RS256")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(realm, roles) -> str:
    """The algorithm-confusion token: HS256 with the realm's public key (PEM) as the secret."""
    pem = realm["key"].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(_claims(realm, roles)).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def _unsigned(realm, roles) -> str:
    head = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64url(json.dumps(_claims(realm, roles)).encode())}."


def _call(url, method, path, token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, url + path, headers=headers, timeout=60, **kw)


# -- the endpoint families: (method, path, request kwargs, role needed, answers with the role) ------
FAMILIES = [
    ("GET", "/info/", {}, ANNOTATOR, {200}),
    ("POST", "/activelearning/random", {}, ANNOTATOR, {200}),
    ("POST", f"/infer/liver?image={CASE}", {}, ANNOTATOR, {404}),
    ("PUT", "/datastore/label", {}, ANNOTATOR, {422}),
    ("PUT", "/datastore/image", {}, ANNOTATOR, {422}),
    ("PUT", "/datastore/", {}, ANNOTATOR, {422}),
    ("GET", "/datastore/", {}, ANNOTATOR, {200}),
    ("GET", f"/datastore/image?image={CASE}", {}, ANNOTATOR, {200}),
    ("GET", f"/datastore/image/info?image={CASE}", {}, ANNOTATOR, {200}),
    ("GET", f"/datastore/label?label={CASE}&tag=final", {}, ANNOTATOR, {200}),
    ("GET", "/train/", {}, REVIEWER, {200, 404}),  # 404: no training run yet
    ("POST", "/train/liver", {}, REVIEWER, {404}),
    ("DELETE", "/train/", {}, REVIEWER, {200, 404}),
    ("GET", "/model/info/oar", {}, REVIEWER, {200}),
    ("GET", "/model/liver", {}, REVIEWER, {404}),
    ("GET", "/datastore/dataset?limit_cases=1", {}, REVIEWER, {200}),
    ("GET", "/scoring/", {}, REVIEWER, {200, 404}),  # 404: no scoring run yet
    ("GET", "/logs/?lines=5", {}, REVIEWER, {200}),
    ("PUT", "/model/oar", {}, ADMIN, {422}),
    ("DELETE", "/model/liver", {}, ADMIN, {404}),
    ("DELETE", "/datastore/label?id=no_such_case&tag=final", {}, ADMIN, None),
    ("PUT", f"/datastore/label/info?label={CASE}&tag=final", {}, ADMIN, None),
    ("GET", "/ohif/", {}, USER, {200}),  # the viewer's files: any signed-in user
    ("GET", "/ohif/app-config.js", {}, USER, {200}),
    # the DICOMweb proxy: checked for refusals only (a call that passes would proxy the studies
    # folder, which is no DICOMweb server; tests/unit/test_security_roles.py checks that it passes)
    ("GET", "/proxy/dicom/qido/studies", {}, USER, "skip"),
    ("GET", "/proxy/dicom/wado/studies/1.2.3/series/4.5/metadata", {}, USER, "skip"),
    ("POST", "/proxy/dicom/stow/studies", {}, ANNOTATOR, "skip"),  # a write into the PACS
]
BELOW = {USER: [], ANNOTATOR: [USER], REVIEWER: [USER, ANNOTATOR], ADMIN: [USER, ANNOTATOR, REVIEWER]}
#: routes MONAI Label mounts that this server does not serve: 404 to everyone, token or not
NOT_SERVED = [("PUT", "/session/"), ("GET", "/session/no-such-session"), ("POST", "/reload"), ("POST", "/infer/wsi/oar"),
              ("POST", "/infer/wsi_v2/oar"), ("GET", "/batch/infer"), ("POST", "/batch/infer/oar"), ("GET", "/no/such/path")]


def test_public_endpoints_need_no_token(servers):
    url = servers["auth"]["url"]
    for path in ("/", "/docs", "/openapi.json", "/favicon.ico", "/static/favicon.ico"):
        assert _call(url, "GET", path).status_code == 200, path
    assert _call(url, "GET", "/auth/").json()["enabled"] is True
    # a browser's CORS preflight from the granted origin is answered without a token (the gateway
    # sits inside CORS); any other origin gets no grant
    for origin, granted in ((VIEWER, True), ("http://evil.example", False)):
        r = requests.options(f"{url}/info/", headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                                      "Access-Control-Request-Headers": "authorization"}, timeout=30)
        assert (r.status_code == 200 and r.headers.get("access-control-allow-origin") == origin) is granted, (origin, r.status_code)


def test_routes_not_served_answer_404_to_everyone(servers, realm):
    url = servers["auth"]["url"]
    admin = _token(realm, [ADMIN])
    for method, path in NOT_SERVED:
        for token in (None, admin):
            r = _call(url, method, path, token)
            assert r.status_code == 404, (method, path, bool(token), r.status_code, r.text)


def test_every_family_refuses_without_a_token(servers):
    url = servers["auth"]["url"]
    for method, path, kw, role, _ in FAMILIES:
        r = _call(url, method, path, **kw)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers.get("www-authenticate") == "Bearer" and role in r.json()["detail"]
    # refusals carry CORS headers, so that a browser client can read them
    r = requests.get(f"{url}/info/", headers={"Origin": VIEWER}, timeout=30)
    assert r.status_code == 401 and r.headers.get("access-control-allow-origin")


def test_bad_tokens_are_refused(servers, realm):
    url = servers["auth"]["url"]
    now = int(time.time())
    bad = {
        "another key": _token(realm, [ADMIN], key=_rsa_key()),
        "expired": _token(realm, [ADMIN], exp=now - 3600, iat=now - 7200),
        "no exp": jwt.encode({k: v for k, v in _claims(realm, [ADMIN]).items() if k != "exp"}, realm["key"], algorithm="RS256"),
        "wrong issuer": _token(realm, [ADMIN], iss="http://127.0.0.1:1/realms/other"),
        "another client": _token(realm, [ADMIN], azp="other-app", aud="account"),
        "HS256 with the public key": _hs256_with_public_key(realm, [ADMIN]),
        "alg none": _unsigned(realm, [ADMIN]),
        "refresh token": _token(realm, [ADMIN], typ="Refresh"),
        "garbage": "not.a.token",
    }
    for name, token in bad.items():
        for method, path in (("GET", "/info/"), ("POST", "/train/liver"), ("DELETE", "/model/liver")):
            r = _call(url, method, path, token)
            assert r.status_code == 401, (name, method, path, r.status_code, r.text)
    # MONAI Label's own check (its RBAC dependencies and /auth/token/valid) refuses them too
    assert _call(url, "GET", "/auth/token/valid", bad["wrong issuer"]).status_code == 401


def test_roles_per_endpoint_family(servers, realm):
    url = servers["auth"]["url"]
    tokens = {role: _token(realm, [role]) for role in (USER, ANNOTATOR, REVIEWER, ADMIN)}
    for method, path, kw, role, expected in FAMILIES:
        for weaker in BELOW[role]:
            r = _call(url, method, path, tokens[weaker], **kw)
            assert r.status_code == 403, (method, path, weaker, r.status_code, r.text)
            assert role in r.json()["detail"], r.text
        if expected == "skip":
            continue
        for holder in [r for r in (USER, ANNOTATOR, REVIEWER, ADMIN) if r not in BELOW[role]]:  # the role and those above
            r = _call(url, method, path, tokens[holder], **kw)
            assert r.status_code not in (401, 403), (method, path, holder, r.status_code, r.text)
            assert expected is None or r.status_code in expected, (method, path, holder, r.status_code, r.text)


def test_monai_label_checks_the_same_tokens(servers, realm):
    url = servers["auth"]["url"]
    # /auth/token/valid goes through MONAI Label's own get_current_user -> the fixed from_token
    r = _call(url, "GET", "/auth/token/valid", _token(realm, [ANNOTATOR]))
    assert r.status_code == 200, r.text
    assert r.json()["username"] == "dr.who" and ANNOTATOR in r.json()["roles"] and USER in r.json()["roles"]
    # a token whose aud names the client (and azp does not) is accepted as well
    r = _call(url, "GET", "/info/", _token(realm, [ANNOTATOR], azp="other-app", aud=["account", "monailabel-app"]))
    assert r.status_code == 200, r.text
    info = r.json()["security"]
    assert info["auth"] is True and info["host"] == "127.0.0.1" and info["warning"] is None
    assert info["max_upload_mb"] == 1 and info["max_model_mb"] == 2


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and p.name != "datastore_v2.json" and ".contourcl" not in p.parts}


def test_oversized_bodies_get_413_and_nothing_is_stored(servers, realm):
    server = servers["auth"]
    url, studies, tmp = server["url"], server["studies"], server["tmp"]
    annotator, admin = _token(realm, [ANNOTATOR]), _token(realm, [ADMIN])
    big = os.urandom(int(1.5 * 1024 * 1024))
    before_studies, before_tmp = _snapshot(studies), sorted(os.listdir(tmp))

    # Content-Length says too much: refused before the body is read
    r = _call(url, "PUT", "/datastore/image?image=big_case", annotator, files={"file": ("big_case.nii.gz", big)})
    assert r.status_code == 413 and "1 MB" in r.json()["detail"] and "max_upload_mb" in r.json()["detail"], r.text
    r = _call(url, "PUT", f"/datastore/label?image={CASE}&tag=final", annotator, files={"label": ("l.nii.gz", big)})
    assert r.status_code == 413, r.text
    # no Content-Length (chunked): refused once the bytes read pass the limit
    boundary = "contourclboundary"

    def chunked():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big_case.nii.gz"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = requests.put(f"{url}/datastore/image?image=big_case", data=chunked(), timeout=60,
                     headers={"Authorization": f"Bearer {annotator}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.request.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.request.headers
    assert r.status_code == 413 and "1 MB" in r.json()["detail"], r.text
    # PUT /model has its own limit (2 MB here)
    r = _call(url, "PUT", "/model/oar", admin, files={"file": ("oar.pt", big + big)})
    assert r.status_code == 413 and "2 MB" in r.json()["detail"] and "max_model_mb" in r.json()["detail"], r.text
    # the role check comes first: no token, no size answer
    assert _call(url, "PUT", "/datastore/image?image=big_case", files={"file": ("big_case.nii.gz", big)}).status_code == 401

    assert _snapshot(studies) == before_studies, "nothing written to the datastore"
    assert sorted(os.listdir(tmp)) == before_tmp, "nothing left in the server's temp folder"
    assert not list(studies.rglob("big_case*"))
    assert _call(url, "GET", "/info/", annotator).ok, "the server keeps serving"


def test_public_host_without_auth_refuses_to_start(servers):
    server = servers["refused"]
    deadline = server["started"] + STARTUP_S
    while "refusing to serve" not in server["log_path"].read_text() and server["proc"].poll() is None:
        assert time.time() < deadline, f"no refusal after {STARTUP_S} s:\n{server['log_path'].read_text()[-3000:]}"
        time.sleep(0.5)
    log = server["log_path"].read_text()
    assert "refusing to serve 0.0.0.0 with authentication off" in log, log[-3000:]
    for hint in ("MONAI_LABEL_AUTH_ENABLE=true", "MONAI_LABEL_AUTH_REALM_URI=", "--host 127.0.0.1", "--conf insecure true"):
        assert hint in log, hint
    # refused before anything else ran: no background job (scoring, training) was started
    assert "COMMAND::" not in log, "a background job started before the host check (on_init_complete must call install_security first)"
    try:
        rc = server["proc"].wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 30 s after refusing:\n{server['log_path'].read_text()[-3000:]}")
    assert rc != 0
    assert "Application startup failed" in server["log_path"].read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server["port"])) != 0, "nothing listens on its port"


def test_insecure_override_starts_and_warns(servers):
    server = servers["insecure"]
    r = requests.get(f"{server['url']}/info/", timeout=60)
    assert r.status_code == 200, r.text
    sec = r.json()["security"]
    assert sec["auth"] is False and sec["host"] == "0.0.0.0" and sec["insecure"] is True
    assert "INSECURE" in sec["warning"] and sec["max_upload_mb"] == 512 and sec["max_model_mb"] == 200
    assert "[WARNING]" in server["log_path"].read_text() and "INSECURE: authentication is off" in server["log_path"].read_text()
