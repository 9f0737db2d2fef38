"""The role table in-process, for the OHIF viewer and the DICOMweb proxy (issue 33, item 3).

The gateway and the browser rules are put around a small Starlette app with the same routes as
MONAI Label's ``/ohif/{path}`` and ``/proxy/dicom/...`` (the real server's families are checked in
``tests/integration/test_security.py``). Tokens are signed by a key made here; the realm's key is
put in the gateway's cache, so no realm is reached.
"""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from contourcl.serving import browsers, security

USER, ANNOTATOR, REVIEWER, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-reviewer", "monailabel-admin"
REALM = "http://127.0.0.1:9/realms/monailabel"  # never reached: its key is in the cache

#: (method, path, the least role that passes)
VIEWER_ROUTES = [
    ("GET", "/ohif/", USER),
    ("GET", "/ohif/app-config.js", USER),
    ("HEAD", "/ohif/index.html", USER),
    ("GET", "/ohif", USER),
    ("GET", "/proxy/dicom/qido/studies", USER),
    ("GET", "/proxy/dicom/qido/studies/1.2.3/series", USER),
    ("GET", "/proxy/dicom/wado/studies/1.2.3/series/4.5/metadata", USER),
    ("GET", "/proxy/dicom/wado/studies/1.2.3/series/4.5/instances/6.7/frames/1", USER),
    ("GET", "/proxy/dicom/studies", USER),
    # a POST through the proxy writes into the PACS (STOW-RS): what submitting a label asks
    ("POST", "/proxy/dicom/stow/studies", ANNOTATOR),
    ("POST", "/proxy/dicom/studies", ANNOTATOR),
    ("POST", "/proxy/dicom/qido/studies", ANNOTATOR),
]
RANKS = [USER, ANNOTATOR, REVIEWER, ADMIN]


@pytest.fixture
def gateway(monkeypatch):
    from monailabel.config import settings

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", REALM)
    monkeypatch.setattr(security, "_KEYS", {REALM: (time.monotonic(), key.public_key())})
    reached = []

    async def answer(request):
        reached.append((request.method, request.url.path))
        return PlainTextResponse("ok")

    routes = [Route("/ohif", answer, methods=["GET"]), Route("/ohif/{path:path}", answer, methods=["GET"]),
              Route("/proxy/dicom/{path:path}", answer, methods=["GET", "POST"])]
    middleware = [*browsers.middleware({}, True), Middleware(security.Gateway)]
    app = Starlette(routes=routes, middleware=middleware)

    def token(roles):
        now = int(time.time())
        claims = {"iss": REALM, "azp": "monailabel-app", "aud": "account", "typ": "Bearer", "sub": "u-1", "iat": now,
                  "exp": now + 600, "preferred_username": "dr.who", "realm_access": {"roles": list(roles)}}
        return jwt.encode(claims, key, algorithm="RS256")

    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client, token, reached


def test_the_table_names_the_viewer_and_the_proxy():
    for method, path, role in VIEWER_ROUTES:
        assert security.required_role(method, path) == role, (method, path)
    assert security.required_role("DELETE", "/proxy/dicom/studies/1.2.3") == security.NOT_SERVED
    assert security.required_role("PUT", "/ohif/index.html") == security.NOT_SERVED


def test_each_role_reaches_the_viewer_and_the_proxy_as_the_table_says(gateway):
    client, token, reached = gateway
    for method, path, least in VIEWER_ROUTES:
        r = client.request(method, path)
        assert r.status_code == 401 and (method == "HEAD" or least in r.json()["detail"]), (method, path, r.status_code, r.text)
        for role in RANKS:
            reached.clear()
            r = client.request(method, path, headers={"Authorization": f"Bearer {token([role])}"})
            if RANKS.index(role) >= RANKS.index(least):
                assert r.status_code == 200 and reached == [(method, path)], (method, path, role, r.status_code, r.text)
            else:
                assert r.status_code == 403 and not reached, (method, path, role, r.status_code)
                assert method == "HEAD" or least in r.json()["detail"], r.text
    # a token with no role of this server opens nothing
    r = client.get("/ohif/", headers={"Authorization": f"Bearer {token(['offline_access'])}"})
    assert r.status_code == 403


def test_the_proxy_has_the_same_browser_checks_as_every_route(gateway):
    client, token, reached = gateway
    admin = {"Authorization": f"Bearer {token([ADMIN])}"}
    reached.clear()
    # a cross-site page cannot write into the PACS through the proxy, whatever the token
    r = client.post("/proxy/dicom/stow/studies", headers={**admin, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and not reached, r.text
    # nor read it under a foreign Host name (DNS rebinding)
    r = client.get("/proxy/dicom/qido/studies", headers={**admin, "Host": "evil.example"})
    assert r.status_code == 400 and not reached, r.text
