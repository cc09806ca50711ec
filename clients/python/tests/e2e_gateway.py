"""keygate-client against the real keygate binary (run by keygate's tests/clients.rs, which
starts the gateway with this script's Flask app as its upstream and mints the keys).

The upstream, a Flask app, verifies every request's x-keygate-assertion with
KeygateAssertionMiddleware;
the cases sign through requests and httpx (sync and async) and check what the upstream saw.
Prints one line per case and "python: N cases passed"; exits 1 at the first failure.
"""

import asyncio
import hashlib
import json
import os
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import flask
import httpx
import requests

from keygate_client import Credentials, KeygateError, raise_for_keygate, sign_headers
from keygate_client.httpx_auth import KeygateHttpxAuth
from keygate_client.requests_auth import KeygateAuth
from keygate_client.verify import AssertionVerifier, KeygateAssertionMiddleware

E = os.environ
URL = E["KEYGATE_URL"]
V1 = Credentials(E["KEYGATE_V1_PUBLIC_KEY"], E["KEYGATE_V1_SECRET"])
BODY = Credentials(E["KEYGATE_BODY_PUBLIC_KEY"], E["KEYGATE_BODY_SECRET"], "hmac-body")
BEARER = Credentials("", E["KEYGATE_BEARER_SECRET"], "bearer")
LIMITED = Credentials(E["KEYGATE_LIMITED_PUBLIC_KEY"], E["KEYGATE_LIMITED_SECRET"])
passed = []


def case(name):
    def wrap(f):
        try:
            f()
        except Exception as e:  # noqa: BLE001 - the report is the point
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            sys.exit(1)
        print(f"ok {name}")
        passed.append(name)
    return wrap


app = flask.Flask("upstream")


@app.route("/<path:anything>", methods=["GET", "POST"])
def upstream(anything):
    claims = flask.request.environ["keygate.claims"]
    body = flask.request.get_data()
    return flask.jsonify(sub=claims["sub"], owner=claims["owner"], target=claims["target"],
                         assertion=flask.request.headers["x-keygate-assertion"],
                         body_sha256=hashlib.sha256(body).hexdigest())


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


verifier = AssertionVerifier(jwks_url=E["KEYGATE_JWKS_URL"], audience=E["KEYGATE_UPSTREAM_NAME"])
app.wsgi_app = KeygateAssertionMiddleware(app.wsgi_app, verifier)
server = make_server("127.0.0.1", int(E["KEYGATE_UPSTREAM_PORT"]), app, handler_class=Quiet)
threading.Thread(target=server.serve_forever, daemon=True).start()


def seen(r, body: bytes, target: str):
    raise_for_keygate(r)
    assert r.status_code == 200, (r.status_code, r.text)
    got = r.json()
    assert got["sub"].startswith("key_"), got
    assert got["target"] == target, got
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest(), got
    return got


@case("requests: signed POST with a JSON body, verified upstream")
def _():
    payload = {"amount": "1.00", "currency": "EUR", "note": "café"}
    r = requests.post(URL + "/v1/payments", json=payload, auth=KeygateAuth(V1))
    got = seen(r, r.request.body, "/v1/payments")
    assert got["sub"] == E["KEYGATE_V1_ID"]


@case("requests: GET with a query, exact target upstream")
def _():
    r = requests.get(URL + "/v1/payments/pay_123?expand=customer&limit=10", auth=KeygateAuth(V1))
    seen(r, b"", "/v1/payments/pay_123?expand=customer&limit=10")


@case("requests: a replayed request is refused with replayed_nonce")
def _():
    body = b'{"amount":"2.00"}'
    headers = sign_headers(V1, "POST", "/v1/payments", body)
    headers["content-type"] = "application/json"
    first = requests.post(URL + "/v1/payments", data=body, headers=headers)
    assert first.status_code == 200, first.text
    again = requests.post(URL + "/v1/payments", data=body, headers=headers)
    try:
        raise_for_keygate(again)
    except KeygateError as e:
        assert (e.status, e.code) == (401, "replayed_nonce"), e
        assert e.request_id == again.headers["x-request-id"]
    else:
        raise AssertionError("a replay went through")


@case("requests: a wrong secret is a typed bad_signature")
def _():
    wrong = Credentials(V1.public_key, V1.secret[:-1] + ("A" if V1.secret[-1] != "A" else "B"))
    r = requests.post(URL + "/v1/payments", json={"amount": "3.00"}, auth=KeygateAuth(wrong))
    try:
        raise_for_keygate(r)
    except KeygateError as e:
        assert (e.status, e.code) == (401, "bad_signature"), e
        assert e.request_id
    else:
        raise AssertionError("a wrong secret went through")


@case("requests: a client clock an hour slow is corrected once from keygate's Date")
def _():
    import time
    auth = KeygateAuth(V1, now=lambda: time.time() - 3600)
    r = requests.post(URL + "/v1/payments", json={"amount": "4.00"}, auth=auth)
    seen(r, r.request.body, "/v1/payments")
    assert [h.status_code for h in r.history] == [401], r.history
    assert abs(auth.clock.offset - 3600) < 5, auth.clock.offset


@case("requests: rate_limited exposes Retry-After")
def _():
    auth = KeygateAuth(LIMITED)
    ok = requests.post(URL + "/v1/payments", json={"n": 1}, auth=auth)
    assert ok.status_code == 200, ok.text
    r = requests.post(URL + "/v1/payments", json={"n": 2}, auth=auth)
    try:
        raise_for_keygate(r)
    except KeygateError as e:
        assert (e.status, e.code) == (429, "rate_limited"), e
        assert e.retry_after and e.retry_after > 0, e.retry_after
    else:
        raise AssertionError("the limit let a second request through")


@case("httpx sync: signed POST and GET with a query")
def _():
    with httpx.Client(auth=KeygateHttpxAuth(V1)) as c:
        r = c.post(URL + "/v1/payments", json={"amount": "5.00"})
        seen(r, r.request.content, "/v1/payments")
        r = c.get(URL + "/v1/payments/pay_9?limit=1")
        seen(r, b"", "/v1/payments/pay_9?limit=1")


@case("httpx async: signed POST")
def _():
    async def go():
        async with httpx.AsyncClient(auth=KeygateHttpxAuth(V1)) as c:
            r = await c.post(URL + "/v1/payments", content=b'{"amount":"6.00"}',
                             headers={"content-type": "application/json"})
            seen(r, b'{"amount":"6.00"}', "/v1/payments")
    asyncio.run(go())


@case("hmac-body and bearer keys")
def _():
    body = json.dumps({"amount": "7.00", "nonce": 1}).encode()
    r = requests.post(URL + "/v1/payments", data=body, auth=KeygateAuth(BODY),
                      headers={"content-type": "application/json"})
    seen(r, body, "/v1/payments")
    r = requests.post(URL + "/v1/payments", json={"amount": "8.00"}, auth=KeygateAuth(BEARER))
    seen(r, r.request.body, "/v1/payments")


@case("upstream: a request that bypasses keygate is refused by the middleware")
def _():
    direct = f"http://127.0.0.1:{E['KEYGATE_UPSTREAM_PORT']}/v1/payments"
    forged = {"x-keygate-key-id": E["KEYGATE_V1_ID"], "x-keygate-owner": "acme"}
    r = requests.post(direct, json={"amount": "9.00"}, headers=forged)
    assert r.status_code == 401 and r.json()["code"] == "assertion_invalid", r.text
    # A real assertion, taken from a request that passed, does not carry another body.
    ok = requests.post(URL + "/v1/payments", json={"amount": "1"}, auth=KeygateAuth(V1))
    token = seen(ok, ok.request.body, "/v1/payments")["assertion"]
    r = requests.post(direct, json={"amount": "1000000"}, headers={"x-keygate-assertion": token})
    assert r.status_code == 401 and "another request" in r.json()["detail"], r.text


print(f"python: {len(passed)} cases passed")
server.shutdown()
