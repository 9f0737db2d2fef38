"""The security gateway in-process: a realm that cannot be reached is a refusal, not a pass.

The rest of the security layer is checked through the real server
(``tests/integration/test_security.py``).
"""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from contourcl.testing import free_port

ADMIN = "monailabel-admin"


def _token(realm_uri: str, roles) -> str:
    """A Keycloak-like access token of ``realm_uri``, signed by a key made here (the realm is never reached)."""
    now = int(time.time())
    claims = {"iss": realm_uri, "azp": "monailabel-app", "aud": "account", "typ": "Bearer", "sub": "u-1",
              "iat": now, "exp": now + 600, "preferred_username": "dr.who", "email": "who@clinic.example",
              "realm_access": {"roles": list(roles)}}
    return jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256")


def test_unreachable_realm_answers_503_not_a_pass(monkeypatch):
    """In-process: a realm that cannot be reached refuses every token (503 from the gateway)."""
    import asyncio

    from monailabel.config import settings

    from contourcl.serving import security

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", f"http://127.0.0.1:{free_port()}/realms/monailabel")
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_TIMEOUT", 2)
    monkeypatch.setattr(security, "_KEYS", {})
    token = _token(settings.MONAI_LABEL_AUTH_REALM_URI, [ADMIN])
    with pytest.raises(security.RealmUnavailable):
        security.verify_token(token)

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/info/", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {token}".encode())]}
    asyncio.run(security.Gateway(app)(scope, receive, send))
    assert sent[0]["status"] == 503 and not reached
