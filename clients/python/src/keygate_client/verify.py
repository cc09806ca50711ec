"""Upstream side: check that a request came through keygate, unchanged, by verifying its
``x-keygate-assertion`` (docs/assertion.md). ``pip install keygate-client[verify]``.

    verifier = AssertionVerifier(jwks_url="http://keygate-admin:9901/.well-known/jwks.json",
                                 audience="payments")          # the upstream's name in keygate
    app.wsgi_app = KeygateAssertionMiddleware(app.wsgi_app, verifier)   # Flask, or any WSGI app
"""

import hashlib
import io
import json
from typing import Any, Callable, Dict, Iterable, Optional

import jwt

ASSERTION_HEADER = "x-keygate-assertion"


class AssertionInvalid(Exception):
    """The request carries no assertion, or one that is not keygate's for exactly it."""


class AssertionVerifier:
    """Verifies assertions signed with the fleet's Ed25519 key (``jwks_url``, cached and
    refetched for an unknown ``kid``) or with an HS256 secret shared with this upstream."""

    def __init__(self, *, audience: str, jwks_url: Optional[str] = None,
                 hs256_secret: Optional[bytes] = None, issuer: str = "keygate",
                 leeway: float = 5.0):
        if (jwks_url is None) == (hs256_secret is None):
            raise ValueError("give exactly one of jwks_url and hs256_secret")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True) if jwks_url else None
        self._secret = hs256_secret

    def verify(self, token: str, method: str, target: str, body: bytes) -> Dict[str, Any]:
        """The claims, when ``token`` is keygate's assertion for this method, target and body."""
        try:
            if self._jwks is not None:
                key, alg = self._jwks.get_signing_key_from_jwt(token).key, "EdDSA"
            else:
                key, alg = self._secret, "HS256"
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iat", "jti", "sub"]})
        except jwt.PyJWTError as e:
            raise AssertionInvalid(f"{type(e).__name__}: {e}") from e
        wanted = (method.upper(), target, hashlib.sha256(body).hexdigest())
        got = (claims.get("method"), claims.get("target"), claims.get("body_sha256"))
        if got != wanted:
            raise AssertionInvalid("the assertion is for another request")
        return claims


def _target(environ: Dict[str, Any]) -> str:
    # The request target as received: PEP 3333 gives the path decoded as latin-1; RAW_URI or
    # REQUEST_URI (gunicorn, uWSGI) keep it exactly when the server provides it.
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    from urllib.parse import quote

    # PEP 3333 strings are bytes decoded as latin-1: encode back to the bytes, then quote.
    raw_path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1")
    path = quote(raw_path, safe="/:@!$&'()*+,;=-._~")
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


class KeygateAssertionMiddleware:
    """WSGI middleware (Flask: ``app.wsgi_app = KeygateAssertionMiddleware(app.wsgi_app, v)``):
    refuses a request without a valid assertion with 401 problem+json; otherwise passes it on
    with the verified claims in ``environ["keygate.claims"]`` and the body intact."""

    def __init__(self, app: Callable, verifier: AssertionVerifier):
        self.app = app
        self.verifier = verifier

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        token = environ.get("HTTP_" + ASSERTION_HEADER.upper().replace("-", "_"), "")
        try:
            if not token:
                raise AssertionInvalid("no x-keygate-assertion: the request did not come "
                                       "through keygate")
            claims = self.verifier.verify(token, environ["REQUEST_METHOD"], _target(environ),
                                          body)
        except AssertionInvalid as e:
            doc = json.dumps({"type": "urn:keygate:error:assertion_invalid", "status": 401,
                              "code": "assertion_invalid", "title": "Assertion invalid",
                              "detail": str(e)}).encode()
            start_response("401 Unauthorized", [("content-type", "application/problem+json"),
                                                ("content-length", str(len(doc)))])
            return [doc]
        environ["keygate.claims"] = claims
        return self.app(environ, start_response)
