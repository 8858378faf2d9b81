"""TLS for listeners: self-signed certificates for first start, and per-host server contexts.

A server carries several virtual hosts, each with its own certificate. STARTTLS knows the host from the
stream header; Direct TLS (XEP-0368) only learns it from SNI, so its context switches per server name.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import idna

from server.jid import JID, JIDError
from server.sasl.channel_binding import warn_if_exporter_unavailable

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

# The first certificate of a PEM file (a chain file's is the server's own), as cryptography's
# load_pem_x509_certificate reads it; `cryptography` itself (10 MiB of resident memory) is imported only to
# generate a certificate.
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")

CERT_VALIDITY = datetime.timedelta(days=3650)


class TlsError(Exception):
    """A certificate or key cannot be created or loaded; the message names the file."""


def ensure_certificate(host: str, cert_path: Path, key_path: Path) -> bool:
    """Create a self-signed certificate when neither file exists, so a fresh install can offer TLS.

    Returns True when it generated the pair. One file without the other is an error rather than something
    to overwrite: it is probably a misconfiguration, and replacing it would lose the admin's file.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise TlsError(f"TLS files for {host}: {present} exists but {missing} does not; "
                       "provide both or remove it to generate a self-signed pair")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(host, key)
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise TlsError(f"cannot write TLS files for {host} ({exc.filename}): {exc.strerror}") from None
    return True


def _self_signed(host: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew on peers
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_alt_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def _alt_names(host: str) -> list[x509.GeneralName]:
    from cryptography import x509

    try:
        return [x509.IPAddress(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    # dNSName is ASCII only: an internationalised host goes in as its A-label form.
    ascii_host = host if host.isascii() else idna.encode(host).decode("ascii")
    return [x509.DNSName(ascii_host), x509.DNSName(f"*.{ascii_host}")]


def handshake_failure(exc: BaseException | None) -> str:
    """Why a TLS handshake failed, in words an operator can act on: asyncio's own are often empty."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError) \
            or exc is None:
        return "client closed during handshake"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.library}: {exc.reason}" if exc.library else exc.reason
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no handshake within the time limit"
    return str(exc) or type(exc).__name__


class TlsContexts:
    """Server-side SSL contexts for every host, built once and reused for every connection."""

    def __init__(self, certs: dict[str, tuple[Path, Path]]) -> None:
        self._direct: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._load(certs)
        warn_if_exporter_unavailable()

    def _load(self, certs: dict[str, tuple[Path, Path]]) -> None:
        if not certs:
            raise TlsError("no TLS certificates configured")
        self._files = {host: (Path(cert), Path(key)) for host, (cert, key) in certs.items()}
        self._default = next(iter(self._files))
        self._der: dict[str, bytes] = {}
        self._contexts: dict[tuple[str, tuple[str, ...]], ssl.SSLContext] = {}
        for host in self._files:  # fail at start-up, not on the first connection
            self.context(host)

    def reload(self, certs: dict[str, tuple[Path, Path]]) -> None:
        """Read the certificates again (renewed, or other files): connections from now on get them, open ones
        keep theirs. When one fails to load, the error names it and every host keeps its current one."""
        current = self._files, self._default, self._der, self._contexts
        try:
            self._load(certs)
        except TlsError:
            self._files, self._default, self._der, self._contexts = current
            raise
        for ctx in self._direct.values():  # bound to their listeners: their certificate is replaced in place
            ctx.load_cert_chain(*self._files[self._default])

    def add(self, host: str, cert: Path, key: Path) -> None:
        """Serve `host` with this pair from now on (a tenant created at run time): Direct TLS picks it by SNI,
        STARTTLS by the stream's 'to'. A pair that does not load changes nothing."""
        before = self._files.get(host)
        self._forget(host)
        self._files[host] = (Path(cert), Path(key))
        try:
            self.context(host)
        except TlsError:
            self._forget(host)
            if before is not None:
                self._files[host] = before
            raise

    def remove(self, host: str) -> None:
        """Forget `host`'s certificate (a tenant disabled or removed); the first host's stays the default."""
        if host != self._default:
            self._forget(host)

    def _forget(self, host: str) -> None:
        self._files.pop(host, None)
        self._der.pop(host, None)
        for key in [key for key in self._contexts if key[0] == host]:
            del self._contexts[key]

    def context(self, host: str | None, alpn: list[str] | None = None) -> ssl.SSLContext:
        """The context holding `host`'s certificate, or the first host's when `host` has none."""
        name = self._pick(host)
        key = (name, tuple(alpn or ()))
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = self._build(name, alpn)
        return ctx

    def direct_tls_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A context for Direct TLS that picks the host's certificate from the client's SNI."""
        key = tuple(alpn)
        ctx = self._direct.get(key)
        if ctx is None:
            ctx = self._direct[key] = self._build(self._default, alpn)

            def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
                if server_name:
                    sslobj.context = self.context(server_name, list(key))

            ctx.sni_callback = pick
        return ctx

    def cert_der(self, host: str) -> bytes:
        """DER of the certificate `context(host)` presents: input for tls-server-end-point binding."""
        name = self._pick(host)
        der = self._der.get(name)
        if der is None:
            cert_path = self._files[name][0]
            try:
                found = _PEM_CERTIFICATE.search(cert_path.read_bytes())
                if found is None:
                    raise ValueError("no BEGIN CERTIFICATE block")
                der = base64.b64decode(b"".join(found[1].split()), validate=True)
            except OSError as exc:
                raise TlsError(f"cannot read certificate {cert_path}: {exc.strerror}") from None
            except ValueError as exc:  # binascii.Error included
                raise TlsError(f"certificate {cert_path} is not a valid PEM certificate: {exc}") from None
            self._der[name] = der
        return der

    def _pick(self, host: str | None) -> str:
        """Exact host, else its normalised form, else the parent domain (for subdomain services)."""
        if host is None:
            return self._default
        if host in self._files:
            return host
        try:
            name = JID.make(None, host).domain
        except JIDError:
            return self._default
        if name in self._files:
            return name
        parent = name.partition(".")[2]
        return parent if parent in self._files else self._default

    def _build(self, host: str, alpn: list[str] | None) -> ssl.SSLContext:
        cert_path, key_path = self._files[host]
        self.cert_der(host)  # names the certificate file when it is the broken one
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:  # before OSError, of which it is a subclass
            raise TlsError(f"cannot load TLS key {key_path} with certificate {cert_path} for {host}: "
                           f"{exc.reason or exc}") from None
        except OSError as exc:
            raise TlsError(f"cannot read TLS key {key_path} for {host}: {exc.strerror or exc}") from None
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx
