"""Sign requests for a keygate gateway, read its errors, and verify its assertion upstream.

    from keygate_client import Credentials
    from keygate_client.requests_auth import KeygateAuth      # pip install keygate-client[requests]
    requests.post(url, json={...}, auth=KeygateAuth(Credentials("pk_…", "sk_…")))
"""

from .errors import KeygateError, raise_for_keygate
from .signing import (
    Credentials,
    body_signature,
    sign_headers,
    string_to_sign,
    v1_signature,
)

__version__ = "0.1.0"

__all__ = [
    "Credentials",
    "KeygateError",
    "body_signature",
    "raise_for_keygate",
    "sign_headers",
    "string_to_sign",
    "v1_signature",
]
