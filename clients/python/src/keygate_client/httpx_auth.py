"""``httpx`` integration, sync and async: ``httpx.Client(auth=KeygateHttpxAuth(creds))``."""

from typing import Callable, Optional

import httpx

from .errors import KeygateError
from .signing import Clock, Credentials, sign_headers


class KeygateHttpxAuth(httpx.Auth):
    """Signs each request with a keygate key (the body is read first, so the bytes signed are
    the bytes sent). A request refused with ``stale_timestamp`` is signed again once, with the
    clock corrected by keygate's ``Date`` header, and resent."""

    requires_request_body = True

    def __init__(self, creds: Credentials, *, retry_stale: bool = True,
                 now: Optional[Callable[[], float]] = None):
        self.creds = creds
        self.clock = Clock(now)
        self.retry_stale = retry_stale

    def _sign(self, request: httpx.Request) -> None:
        target = request.url.raw_path.decode("ascii")
        request.headers.update(
            sign_headers(self.creds, request.method, target, request.content, now=self.clock)
        )

    def _may_retry(self, response: httpx.Response) -> bool:
        return (self.retry_stale and self.creds.scheme == "hmac-v1"
                and response.status_code == 401)

    def _stale(self, response: httpx.Response) -> bool:
        err = KeygateError.from_parts(response.status_code, response.headers, response.content)
        if err is None or not err.retryable_with_fresh_signature:
            return False
        self.clock.correct_from(response.headers.get("date"))
        return True

    def sync_auth_flow(self, request):
        self._sign(request)
        response = yield request
        if self._may_retry(response):
            response.read()
            if self._stale(response):
                self._sign(request)
                yield request

    async def async_auth_flow(self, request):
        self._sign(request)
        response = yield request
        if self._may_retry(response):
            await response.aread()
            if self._stale(response):
                self._sign(request)
                yield request
