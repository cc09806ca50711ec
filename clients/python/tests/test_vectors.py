"""Every case of tests/fixtures/signing.json."""

import base64
import hashlib
import json
from pathlib import Path

import pytest

from keygate_client import Credentials, body_signature, sign_headers, string_to_sign, v1_signature

from conftest import VECTORS

CASES = json.loads(Path(VECTORS).read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["note"] for c in CASES])
def test_vector(case):
    body = base64.b64decode(case.get("body_base64") or "")
    scheme = case["scheme"]
    if scheme == "hmac-v1":
        sts = string_to_sign(case["timestamp"], case["nonce"], case["method"], case["target"], body)
        assert sts == case["string_to_sign"]
        sig = v1_signature(case["secret"], case["timestamp"], case["nonce"], case["method"],
                           case["target"], body)
        assert sig == case["signature"]
        headers = sign_headers(Credentials("pk_test_x", case["secret"]), case["method"],
                               case["target"], body, now=lambda: int(case["timestamp"]),
                               nonce=case["nonce"])
        assert headers["x-api-signature"] == case["signature"]
        assert headers["x-api-timestamp"] == case["timestamp"]
    elif scheme == "hmac-body":
        assert body_signature(case["secret"], body) == case["signature"]
        headers = sign_headers(Credentials("pk_test_x", case["secret"], "hmac-body"), "POST",
                               "/ignored", body)
        assert headers["x-api-signature"] == case["signature"]
    elif scheme == "bearer":
        assert hashlib.sha256(case["secret"].encode()).hexdigest() == case["sha256"]
        headers = sign_headers(Credentials("", case["secret"], "bearer"), "GET", "/", b"")
        assert headers == {"Authorization": f"Bearer {case['secret']}"}
    else:
        pytest.fail(f"unknown scheme {scheme}")


def test_every_scheme_has_a_case():
    assert {c["scheme"] for c in CASES} == {"hmac-v1", "hmac-body", "bearer"}
