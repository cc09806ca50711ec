"""Signing through requests and httpx (sync and async), typed errors, the stale-timestamp
retry. The network is replaced by a transport that checks each request the way keygate
does; tests/clients.rs runs the library against the real gateway."""

import asyncio
import hashlib
import hmac
import json
from email.utils import formatdate

import httpx
import pytest
import requests

from keygate_client import Credentials, KeygateError, raise_for_keygate
from keygate_client.httpx_auth import KeygateHttpxAuth
from keygate_client.requests_auth import KeygateAuth
from keygate_client.signing import string_to_sign

CREDS = Credentials("pk_test_client", "sk_test_secret_text")
SERVER_TIME = 1_800_000_000


def verify(method, target, headers, body):
    """keygate's check of an hmac-v1 request, for the fake server."""
    sts = string_to_sign(headers["x-api-timestamp"], headers["x-api-nonce"], method, target, body)
    want = hmac.new(CREDS.secret.encode(), sts.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, headers["x-api-signature"])


def problem(code, status=401, **extra):
    doc = {"type": f"urn:keygate:error:{code}", "status": status, "code": code,
           "title": code, "detail": f"detail of {code}", "request_id": "req-1"}
    return json.dumps(doc).encode(), {"content-type": "application/problem+json",
                                      "date": formatdate(SERVER_TIME, usegmt=True), **extra}


class Keygate:
    """Answers like keygate: 401 stale_timestamp outside 300 s of SERVER_TIME, 401
    bad_signature for a wrong signature, else 200 with what it saw."""

    def __init__(self):
        self.seen = []

    def answer(self, method, target, headers, body):
        self.seen.append((method, target, dict(headers), body))
        if abs(int(headers["x-api-timestamp"]) - SERVER_TIME) > 300:
            return 401, *problem("stale_timestamp")
        if not verify(method, target, headers, body):
            return 401, *problem("bad_signature")
        return 200, json.dumps({"ok": True}).encode(), {"content-type": "application/json"}


def httpx_transport(kg):
    def handler(request: httpx.Request):
        status, body, headers = kg.answer(request.method, request.url.raw_path.decode(),
                                          request.headers, request.content)
        return httpx.Response(status, content=body, headers=headers)
    return httpx.MockTransport(handler)


class RequestsAdapter(requests.adapters.BaseAdapter):
    def __init__(self, kg):
        super().__init__()
        self.kg = kg

    def send(self, request, **kwargs):
        body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, content, resp_headers = self.kg.answer(request.method, request.path_url, headers,
                                                       body)
        resp = requests.Response()
        resp.status_code = status
        resp._content = content
        resp.headers = requests.structures.CaseInsensitiveDict(resp_headers)
        resp.request = request
        resp.connection = self
        resp.url = request.url
        return resp

    def close(self):
        pass


def session(kg, auth):
    s = requests.Session()
    s.mount("https://", RequestsAdapter(kg))
    s.auth = auth
    return s


def test_requests_signs_the_bytes_it_sends_json_form_and_query():
    kg = Keygate()
    s = session(kg, KeygateAuth(CREDS, now=lambda: SERVER_TIME))
    r = s.post("https://gw/v1/payments", json={"amount": "1.00", "note": "café"})
    assert r.status_code == 200
    r = s.post("https://gw/v1/forms", data={"a": "1 2", "b": "ü"})
    assert r.status_code == 200
    r = s.get("https://gw/v1/payments/pay_1?expand=customer&limit=10")
    assert r.status_code == 200
    assert kg.seen[2][1] == "/v1/payments/pay_1?expand=customer&limit=10"
    assert kg.seen[0][3] == json.dumps({"amount": "1.00", "note": "café"}).encode()


def test_requests_refuses_a_stream():
    s = session(Keygate(), KeygateAuth(CREDS, now=lambda: SERVER_TIME))
    with pytest.raises(TypeError):
        s.post("https://gw/v1/upload", data=iter([b"a", b"b"]))


def test_requests_retries_a_stale_timestamp_once_with_keygates_clock():
    kg = Keygate()
    s = session(kg, KeygateAuth(CREDS, now=lambda: SERVER_TIME - 3600))
    r = s.post("https://gw/v1/payments", json={"amount": "1.00"})
    assert r.status_code == 200, r.content
    assert len(r.history) == 1 and r.history[0].status_code == 401
    first, second = kg.seen
    assert first[2]["x-api-nonce"] != second[2]["x-api-nonce"]
    assert abs(int(second[2]["x-api-timestamp"]) - SERVER_TIME) <= 1


def test_requests_gives_up_after_one_retry_and_raises_a_typed_error():
    kg = Keygate()
    bad = Credentials(CREDS.public_key, "sk_test_wrong")
    r = session(kg, KeygateAuth(bad, now=lambda: SERVER_TIME)).get("https://gw/v1/x")
    with pytest.raises(KeygateError) as e:
        raise_for_keygate(r)
    assert (e.value.status, e.value.code, e.value.request_id) == (401, "bad_signature", "req-1")
    assert len(kg.seen) == 1


def test_httpx_sync_and_async_sign_and_retry_stale():
    kg = Keygate()
    auth = KeygateHttpxAuth(CREDS, now=lambda: SERVER_TIME - 3600)
    with httpx.Client(transport=httpx_transport(kg), auth=auth) as c:
        r = c.post("https://gw/v1/payments?idempotency=7", json={"amount": "1.00"})
        assert r.status_code == 200
        assert len(kg.seen) == 2  # stale, then corrected
        assert kg.seen[1][1] == "/v1/payments?idempotency=7"

    async def go():
        kg2 = Keygate()
        async with httpx.AsyncClient(transport=httpx_transport(kg2),
                                     auth=KeygateHttpxAuth(CREDS, now=lambda: SERVER_TIME)) as c:
            r = await c.put("https://gw/v1/merchants/m%C3%BCller", content=b"\x00\x01binary")
            assert r.status_code == 200
            assert kg2.seen[0][1] == "/v1/merchants/m%C3%BCller"
            assert kg2.seen[0][3] == b"\x00\x01binary"
    asyncio.run(go())


def test_problem_parsing():
    body, headers = problem("rate_limited", status=429, **{"retry-after": "7"})
    err = KeygateError.from_parts(429, headers, body)
    assert (err.code, err.status, err.retry_after, err.request_id) == ("rate_limited", 429, 7,
                                                                       "req-1")
    assert KeygateError.from_parts(502, {"content-type": "text/html"}, b"<html>") is None
    assert KeygateError.from_parts(200, headers, body) is None
    assert not err.retryable_with_fresh_signature


def test_credentials_never_show_the_secret():
    assert "sk_test_secret_text" not in repr(CREDS)
    with pytest.raises(ValueError):
        Credentials("pk", "sk", "hmac-v2")
