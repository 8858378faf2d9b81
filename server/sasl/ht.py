"""The HT-* SASL mechanisms (draft-schmaus-kitten-sasl-ht) that FAST tokens use (XEP-0484), sans-IO.

The client proves it holds a token without sending it: its initial response is its authcid, a NUL, and
HMAC(token, "Initiator" || channel-binding data); the server answers with HMAC(token, "Responder" || the
same data) as additional data, which proves the server knew the token too. The suffix names the binding:
-NONE none, -ENDP tls-server-end-point, -EXPR tls-exporter; a token proved over another binding fails.
"""

from __future__ import annotations

import hashlib
import hmac

from . import SaslFailure

__all__ = ["HT_BINDINGS", "HT_MECHANISMS", "ht_binding", "initiator_proof", "parse_ht", "responder_proof"]

HT_BINDINGS = {"NONE": None, "ENDP": "tls-server-end-point", "EXPR": "tls-exporter"}
HT_MECHANISMS = tuple(f"HT-SHA-256-{suffix}" for suffix in HT_BINDINGS)


def ht_binding(mechanism: str) -> str | None:
    """The channel-binding type an HT mechanism proves the token over (None for -NONE)."""
    if mechanism not in HT_MECHANISMS:
        raise SaslFailure("invalid-mechanism", f"unsupported mechanism {mechanism!r}")
    return HT_BINDINGS[mechanism.rsplit("-", 1)[1]]


def parse_ht(initial: bytes) -> tuple[str, bytes]:
    """(authcid, initiator proof) of an HT initial response."""
    name, sep, proof = initial.partition(b"\0")
    if not sep or not name or len(proof) != hashlib.sha256().digest_size:
        raise SaslFailure("malformed-request", "HT needs an authcid, a NUL and a SHA-256 HMAC")
    try:
        return name.decode("utf-8"), proof
    except UnicodeDecodeError:
        raise SaslFailure("malformed-request", "the authcid is not valid UTF-8") from None


def initiator_proof(token: str, cb_data: bytes) -> bytes:
    return hmac.new(token.encode(), b"Initiator" + cb_data, "sha256").digest()


def responder_proof(token: str, cb_data: bytes) -> bytes:
    return hmac.new(token.encode(), b"Responder" + cb_data, "sha256").digest()
