"""Send one signed request to keygate and print the status code on the last line.

    KEYGATE_URL=http://127.0.0.1:8080 KEYGATE_PUBLIC_KEY=pk_test_… KEYGATE_SECRET=sk_test_… \
        python examples/send.py

Optional: KEYGATE_METHOD (POST), KEYGATE_TARGET (/v1/payments), KEYGATE_BODY
({"amount":"1.00"}; empty for none), KEYGATE_SCHEME (hmac-v1, hmac-body or bearer).
Exits 0 on a 2xx answer, 1 otherwise. Needs only the standard library and keygate-client.
"""

import os
import sys
import urllib.error
import urllib.request

from keygate_client import Credentials, KeygateError, sign_headers


def main() -> int:
    env = os.environ
    creds = Credentials(env["KEYGATE_PUBLIC_KEY"], env["KEYGATE_SECRET"],
                        env.get("KEYGATE_SCHEME", "hmac-v1"))
    method = env.get("KEYGATE_METHOD", "POST").upper()
    target = env.get("KEYGATE_TARGET", "/v1/payments")
    body = env.get("KEYGATE_BODY", '{"amount":"1.00"}').encode()
    headers = sign_headers(creds, method, target, body)
    if body:
        headers["content-type"] = "application/json"
    req = urllib.request.Request(env["KEYGATE_URL"].rstrip("/") + target, data=body or None,
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, answer = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read()
        err = KeygateError.from_parts(e.code, dict(e.headers), answer)
        if err is not None:
            print(f"keygate refused it: {err.code} ({err.detail}), request id {err.request_id}")
    print(answer.decode("utf-8", "replace"))
    print(status)
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
