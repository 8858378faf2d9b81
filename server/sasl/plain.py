"""SASL PLAIN message parsing (RFC 4616)."""

from __future__ import annotations

from . import SaslFailure

__all__ = ["parse_plain"]


def parse_plain(data: bytes) -> tuple[str | None, str, str]:
    """Split a PLAIN message into (authzid or None, authcid, password)."""
    parts = data.split(b"\x00")
    if len(parts) != 3:
        raise SaslFailure("malformed-request", "PLAIN needs exactly two NUL separators")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SaslFailure("malformed-request", "PLAIN message is not valid UTF-8") from None
    if not authcid or not password:
        raise SaslFailure("malformed-request", "empty authcid or password")
    return authzid or None, authcid, password
