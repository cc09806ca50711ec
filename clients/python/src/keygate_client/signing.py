"""The signing schemes of keygate (docs/signing.md): hmac-v1, hmac-body and bearer."""

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

SCHEME = "KG1-HMAC-SHA256"
SCHEMES = ("hmac-v1", "hmac-body", "bearer")


def string_to_sign(timestamp: str, nonce: str, method: str, target: str, body: bytes) -> str:
    """The six lines an hmac-v1 signature covers, joined by LF, no trailing LF."""
    return "\n".join(
        [SCHEME, timestamp, nonce, method.upper(), target, hashlib.sha256(body).hexdigest()]
    )


def _hmac_hex(secret: str, message: bytes) -> str:
    # The secret is used as text, whatever it looks like (base64 included).
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def v1_signature(secret: str, timestamp: str, nonce: str, method: str, target: str,
                 body: bytes) -> str:
    return _hmac_hex(secret, string_to_sign(timestamp, nonce, method, target, body).encode())


def body_signature(secret: str, body: bytes) -> str:
    """hmac-body: the HMAC of the raw body bytes (which must hold a JSON ``nonce``)."""
    return _hmac_hex(secret, body)


@dataclass(frozen=True)
class Credentials:
    """A keygate key: its public key, its secret (never shown by ``repr``) and its scheme."""

    public_key: str
    secret: str = field(repr=False)
    scheme: str = "hmac-v1"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, not {self.scheme!r}")


def sign_headers(creds: Credentials, method: str, target: str, body: bytes = b"", *,
                 now: Optional[Callable[[], float]] = None,
                 nonce: Optional[str] = None) -> Dict[str, str]:
    """The headers that authenticate one request: ``target`` is the path and query exactly as
    sent on the request line, ``body`` the exact bytes sent. Each call makes a fresh nonce and
    timestamp (hmac-v1): sign every attempt anew."""
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError("sign the exact body bytes that are sent, not a " + type(body).__name__)
    body = bytes(body)
    if creds.scheme == "bearer":
        return {"Authorization": f"Bearer {creds.secret}"}
    if creds.scheme == "hmac-body":
        return {
            "x-api-public-key": creds.public_key,
            "x-api-signature": body_signature(creds.secret, body),
        }
    timestamp = str(int((now or time.time)()))
    nonce = nonce or str(uuid.uuid4())
    return {
        "x-api-public-key": creds.public_key,
        "x-api-timestamp": timestamp,
        "x-api-nonce": nonce,
        "x-api-signature": v1_signature(creds.secret, timestamp, nonce, method, target, body),
    }


class Clock:
    """Unix time corrected by what keygate's ``Date`` header said when it refused a stale
    timestamp (a client whose clock is off signs with keygate's time on the retry)."""

    def __init__(self, now: Optional[Callable[[], float]] = None):
        self._now = now or time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._now() + self.offset

    def correct_from(self, date_header: Optional[str]) -> None:
        from email.utils import parsedate_to_datetime

        if not date_header:
            return
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            return
        self.offset = server - self._now()
