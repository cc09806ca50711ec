"""keygate's problem+json answers as a typed error (docs/errors.md)."""

from typing import Any, Mapping, Optional

PROBLEM = "application/problem+json"


class KeygateError(Exception):
    """An error answer of keygate: ``code`` is stable and meant for programs."""

    def __init__(self, status: int, code: str, title: str = "", detail: str = "",
                 request_id: Optional[str] = None, retry_after: Optional[int] = None,
                 errors: Optional[Mapping[str, str]] = None):
        super().__init__(f"{status} {code}: {detail or title}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.request_id = request_id
        self.retry_after = retry_after
        self.errors = dict(errors or {})

    @property
    def retryable_with_fresh_signature(self) -> bool:
        return self.code == "stale_timestamp"

    @classmethod
    def from_parts(cls, status: int, headers: Mapping[str, str], body: bytes
                   ) -> Optional["KeygateError"]:
        """The error in an answer, or None when it is not one of keygate's."""
        if status < 400:
            return None
        ctype = _header(headers, "content-type") or ""
        if not ctype.startswith(PROBLEM):
            return None
        import json

        try:
            doc: Any = json.loads(body)
        except ValueError:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("code"), str):
            return None
        retry_after = _header(headers, "retry-after")
        return cls(
            status=int(doc.get("status", status)),
            code=doc["code"],
            title=str(doc.get("title", "")),
            detail=str(doc.get("detail", "")),
            request_id=doc.get("request_id") or _header(headers, "x-request-id"),
            retry_after=int(retry_after) if retry_after and retry_after.isdigit() else None,
            errors=doc.get("errors") if isinstance(doc.get("errors"), dict) else None,
        )


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    value = headers.get(name)
    if value is None:
        # Plain dicts are case-sensitive; requests' and httpx's headers are not.
        for k, v in headers.items():
            if k.lower() == name:
                return v
    return value


def raise_for_keygate(response) -> None:
    """Raises :class:`KeygateError` for a keygate error answer of a ``requests`` or ``httpx``
    response (its body must have been read)."""
    err = KeygateError.from_parts(response.status_code, response.headers, response.content)
    if err is not None:
        raise err
