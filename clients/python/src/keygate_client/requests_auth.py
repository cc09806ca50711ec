"""``requests`` integration: ``requests.post(url, json=…, auth=KeygateAuth(creds))``."""

from typing import Callable, Optional

import requests

from .errors import KeygateError
from .signing import Clock, Credentials, sign_headers

_CREDENTIAL_HEADERS = ("x-api-public-key", "x-api-timestamp", "x-api-nonce",
                       "x-api-signature", "authorization")


def _body_bytes(r: requests.PreparedRequest) -> bytes:
    body = r.body
    if body is None:
        return b""
    if isinstance(body, str):
        # Form data arrives as text: send exactly the bytes that are signed.
        r.body = body.encode("utf-8")
        return r.body
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    raise TypeError("keygate signs the whole body: pass bytes, str, json= or data=, "
                    "not a stream or generator")


class KeygateAuth(requests.auth.AuthBase):
    """Signs each request (fresh nonce and timestamp) with a keygate key. A request refused
    with ``stale_timestamp`` is signed again once, with the clock corrected by keygate's
    ``Date`` header, and resent."""

    def __init__(self, creds: Credentials, *, retry_stale: bool = True,
                 now: Optional[Callable[[], float]] = None):
        self.creds = creds
        self.clock = Clock(now)
        self.retry_stale = retry_stale

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        self._sign(r)
        if self.retry_stale and self.creds.scheme == "hmac-v1":
            r.register_hook("response", self._on_response)
        return r

    def _sign(self, r: requests.PreparedRequest) -> None:
        body = _body_bytes(r)
        for name in list(r.headers):
            if name.lower() in _CREDENTIAL_HEADERS:
                del r.headers[name]
        # path_url is the target exactly as requests writes it on the request line.
        r.headers.update(sign_headers(self.creds, r.method or "GET", r.path_url, body,
                                      now=self.clock))

    def _on_response(self, resp: requests.Response, **kwargs) -> requests.Response:
        if resp.status_code != 401 or getattr(resp.request, "_keygate_retried", False):
            return resp
        err = KeygateError.from_parts(resp.status_code, resp.headers, resp.content)
        if err is None or not err.retryable_with_fresh_signature:
            return resp
        self.clock.correct_from(resp.headers.get("date"))
        resp.close()
        retry = resp.request.copy()
        retry._keygate_retried = True  # type: ignore[attr-defined]
        self._sign(retry)
        again = resp.connection.send(retry, **kwargs)
        again.history.append(resp)
        again.request = retry
        return again
