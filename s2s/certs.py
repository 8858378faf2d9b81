"""Certificates on server-to-server links: TLS contexts for both directions and the RFC 6125 name check.

Python's ssl module cannot accept an untrusted client certificate and judge it afterwards: a server
context that asks for one fails the handshake when it does not verify. So an incoming stream asks for a
client certificate only from domains whose certificates must chain to a trusted CA (policy VERIFY);
everyone else authenticates with dialback, which checks their certificate on our own connection back.
Outgoing connections verify the chain in the handshake (VERIFY) or not at all (SELF_SIGNED, UNCHECKED),
and the domain name is checked here in every mode but UNCHECKED, since XMPP certificates may name the
domain in ways ssl's hostname check does not know (XmppAddr and SRV-ID, RFC 6120 13.7.1.2).
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import idna
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from s2s.policy import UNCHECKED, VERIFY

if TYPE_CHECKING:
    from server.config import Config

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
ID_ON_DNSSRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")
ALPN = ["xmpp-server"]  # XEP-0368


def _der_string(value: bytes) -> str | None:
    """The text of a DER UTF8String or IA5String (the otherName values we look at), else None."""
    if len(value) < 2 or value[0] not in (0x0C, 0x16):
        return None
    length, start = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(value[2:2 + count], "big"), 2 + count
    body = value[start:start + length]
    if len(body) != length:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def a_label(domain: str) -> str:
    """The ASCII form of a domain, as certificates and DNS carry it."""
    return domain if domain.isascii() else idna.encode(domain).decode("ascii")


def _dns_matches(pattern: str, name: str) -> bool:
    """RFC 6125 6.4.3: a wildcard is allowed only as the whole left-most label."""
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def names_domain(der: bytes, domain: str) -> bool:
    """Whether a certificate names `domain`: DNS-ID, SRV-ID or XmppAddr; CN-ID only without any of those."""
    try:
        cert = x509.load_der_x509_certificate(der)
        ascii_name = a_label(domain).lower()
    except (ValueError, idna.IDNAError):
        return False
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    if sans is not None:
        presented = False
        for dns in sans.get_values_for_type(x509.DNSName):
            presented = True
            if _dns_matches(dns, ascii_name):
                return True
        for other in sans.get_values_for_type(x509.OtherName):
            text = _der_string(other.value)
            if other.type_id == ID_ON_XMPPADDR:
                presented = True
                if text is not None and text.lower() == domain:
                    return True
            elif other.type_id == ID_ON_DNSSRV:
                presented = True
                if text is not None and text.lower() == f"_xmpp-server.{ascii_name}":
                    return True
        if presented:
            return False
    return any(str(attr.value).lower() == ascii_name
               for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


def currently_valid(der: bytes) -> bool:
    """The validity period, for certificates whose chain nobody checked (SELF_SIGNED)."""
    cert = x509.load_der_x509_certificate(der)
    now = datetime.datetime.now(datetime.UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def acceptable(der: bytes | None, domain: str, mode: str) -> bool:
    """The certificate check for `mode`, once the handshake (which checked the chain for VERIFY) is done."""
    if mode == UNCHECKED:
        return True
    if der is None or not names_domain(der, domain):
        return False
    return mode == VERIFY or currently_valid(der)


class S2STls:
    """SSL contexts for s2s, one per local host and role, built on first use and reused."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._contexts: dict[tuple[str, str, bool], ssl.SSLContext] = {}

    def forget(self) -> None:
        """Build the contexts again on next use: the configuration's certificates or CA bundle changed. A Direct
        TLS listener's context, bound to it, takes its host's certificate again in place."""
        bound = {key: ctx for key, ctx in self._contexts.items() if key[1] == "server-direct"}
        for (host, _, _), ctx in bound.items():
            self._identity(ctx, host)
        self._contexts = bound

    def _trust(self, ctx: ssl.SSLContext) -> None:
        bundle = self.config.s2s.ca_bundle
        if bundle is not None:
            ctx.load_verify_locations(cafile=str(bundle))
        else:
            ctx.load_default_certs()

    def _identity(self, ctx: ssl.SSLContext, host: str) -> None:
        hc = self.config.hosts[host]
        ctx.load_cert_chain(hc.certificate, hc.key)  # checked at start-up by the c2s TlsContexts

    def server(self, host: str, request_certificate: bool, direct: bool = False) -> ssl.SSLContext:
        """For incoming streams: our host's certificate, and the peer's if its policy is VERIFY."""
        key = (host, "server-direct" if direct else "server", request_certificate)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._identity(ctx, host)
            if request_certificate:
                ctx.verify_mode = ssl.CERT_OPTIONAL
                self._trust(ctx)
            if direct:
                ctx.set_alpn_protocols(ALPN)
            self._contexts[key] = ctx
        return ctx

    def server_direct(self, default_host: str, host_of: Callable[[str], str]) -> ssl.SSLContext:
        """For a Direct TLS listener (XEP-0368): the certificate follows SNI. No client certificate is
        requested, since the peer's domain is unknown before the handshake: such peers use dialback."""
        ctx = self.server(default_host, False, direct=True)

        def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            if server_name:
                sslobj.context = self.server(host_of(server_name.lower()), False, direct=True)

        ctx.sni_callback = pick
        return ctx

    def client(self, host: str, mode: str, direct: bool = False) -> ssl.SSLContext:
        """For outgoing streams: our host's certificate as client certificate (for SASL EXTERNAL)."""
        key = (host, "client-direct" if direct else "client", mode == VERIFY)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False  # names_domain() knows XMPP's identifiers; ssl does not
            if mode == VERIFY:
                self._trust(ctx)
            else:
                ctx.verify_mode = ssl.CERT_NONE
            self._identity(ctx, host)
            if direct:
                ctx.set_alpn_protocols(ALPN)
            self._contexts[key] = ctx
        return ctx
