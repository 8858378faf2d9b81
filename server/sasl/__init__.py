"""SASL for client authentication (RFC 6120 §6): SCRAM, PLAIN, channel binding."""

from __future__ import annotations


class SaslFailure(Exception):
    """Ends a SASL exchange; `condition` is the RFC 6120 §6.5 element to send."""

    def __init__(self, condition: str, text: str | None = None) -> None:
        super().__init__(condition if text is None else f"{condition}: {text}")
        self.condition = condition
        self.text = text


# Submodules import SaslFailure from here, so they come after its definition.
from .channel_binding import (  # noqa: E402
    EXPORTER_AVAILABLE,
    tls_exporter,
    tls_server_end_point,
    warn_if_exporter_unavailable,
)
from .plain import parse_plain  # noqa: E402
from .scram import (  # noqa: E402
    DEFAULT_ITERATIONS,
    HASHES,
    MECHANISMS,
    ScramClient,
    ScramCredentials,
    ScramServer,
    derive_credentials,
    downgrade_hash,
    verify_password,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "EXPORTER_AVAILABLE",
    "HASHES",
    "MECHANISMS",
    "SaslFailure",
    "ScramClient",
    "ScramCredentials",
    "ScramServer",
    "derive_credentials",
    "downgrade_hash",
    "parse_plain",
    "tls_exporter",
    "tls_server_end_point",
    "verify_password",
    "warn_if_exporter_unavailable",
]
