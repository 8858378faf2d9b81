"""Channel-binding data for SCRAM -PLUS mechanisms.

``tls-server-end-point`` (RFC 5929 §4.1) only needs the server certificate.
``tls-exporter`` (RFC 9266) needs TLS keying-material export, which Python's
``ssl`` module does not expose; it is reached through ctypes in the libssl
that ``_ssl`` already loaded, after checking at import that the CPython
object layout matches what we read. Anything unexpected makes it return None.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import ssl
from typing import Any

__all__ = ["EXPORTER_AVAILABLE", "tls_exporter", "tls_server_end_point", "warn_if_exporter_unavailable"]

log = logging.getLogger("parley.tls")

_EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
_EXPORTER_LENGTH = 32

# RFC 5929 §4.1: the hash of the certificate's signature algorithm, MD5 and SHA-1 upgraded to SHA-256. The
# signature algorithms of the certificates servers use, by OID; a certificate signed otherwise (RSASSA-PSS,
# whose hash is in its parameters, SHA-3...) is read by `cryptography`, imported then only.
_SIGNATURE_HASHES = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption, upgraded
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption, upgraded
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1, upgraded
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
}
# Signatures without a separate hash function, for which the binding is undefined.
_NO_HASH = {"1.3.101.112", "1.3.101.113"}  # Ed25519, Ed448
_UPGRADED_HASHES = {"md5", "sha1"}


@functools.lru_cache(maxsize=16)
def tls_server_end_point(cert_der: bytes) -> bytes:
    """Hash the server certificate with its signature hash (RFC 5929 §4.1).

    Raises ValueError when the binding is undefined for this certificate
    (e.g. Ed25519/Ed448 signatures, which use no separate hash function),
    so the caller knows not to offer tls-server-end-point. Kept per certificate: every TLS
    stream asks, and the server has a handful of certificates.
    """
    oid = _signature_algorithm(cert_der)
    if oid in _NO_HASH:
        raise ValueError("tls-server-end-point is undefined for signatures without a hash")
    name = _SIGNATURE_HASHES.get(oid)
    return hashlib.new(name, cert_der).digest() if name else _end_point_by_cryptography(cert_der)


def _end_point_by_cryptography(cert_der: bytes) -> bytes:
    """The binding of a certificate signed with an algorithm not in _SIGNATURE_HASHES, read and hashed by
    `cryptography` (some 10 MiB of resident memory, which a server whose certificates are all RSA or ECDSA
    does without)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"unsupported certificate signature algorithm: {exc}") from exc
    if algorithm is None:
        raise ValueError("tls-server-end-point is undefined for signatures without a hash")
    if algorithm.name.lower() in _UPGRADED_HASHES:
        return hashlib.sha256(cert_der).digest()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


def _signature_algorithm(cert_der: bytes) -> str:
    """The dotted OID of a DER certificate's signatureAlgorithm (RFC 5280 §4.1.1.2): the second element of
    the outer SEQUENCE, after tbsCertificate. Raises ValueError when the DER is not so shaped."""
    body, _ = _der(cert_der, 0, 0x30)
    tbs_end = _der(cert_der, body, 0x30)[1]
    algorithm, _ = _der(cert_der, tbs_end, 0x30)
    start, end = _der(cert_der, algorithm, 0x06)
    return _dotted(cert_der[start:end])


def _der(data: bytes, at: int, tag: int) -> tuple[int, int]:
    """Where the content of the DER element at `at`, which must have `tag`, starts and ends."""
    if at + 2 > len(data) or data[at] != tag:
        raise ValueError("not a DER certificate")
    length, at = data[at + 1], at + 2
    if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
        size = length & 0x7F
        if not 0 < size <= 4 or at + size > len(data):
            raise ValueError("not a DER certificate")
        length, at = int.from_bytes(data[at:at + size], "big"), at + size
    if at + length > len(data):
        raise ValueError("not a DER certificate")
    return at, at + length


def _dotted(oid: bytes) -> str:
    """An OBJECT IDENTIFIER's content octets as dotted text (X.690 §8.19)."""
    arcs, value = [], 0
    for byte in oid:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise ValueError("not a DER certificate")
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


class _Exporter:
    """Calls SSL_export_keying_material on the SSL* behind a stdlib SSL object.

    CPython 3.8-3.13 lay out ``_ssl._SSLSocket`` as PyObject_HEAD, then
    ``PyObject *Socket``, ``SSL *ssl``, ``PySSLContext *ctx``. The layout is
    cross-checked against three independent facts before any use.
    """

    def __init__(self) -> None:
        import _ssl  # the module whose libssl we must use

        self._ptr = ctypes.sizeof(ctypes.c_void_p)
        self._head = object.__basicsize__
        self._ssl_offset = self._head + self._ptr
        self._ctx_offset = self._head + 2 * self._ptr
        self._socket_type = _ssl._SSLSocket
        if _ssl._SSLSocket.__basicsize__ < self._ctx_offset + self._ptr:
            raise RuntimeError("unexpected _SSLSocket size")
        if _ssl._SSLContext.__basicsize__ < self._head + self._ptr:
            raise RuntimeError("unexpected _SSLContext size")
        # dlsym on the _ssl handle also searches its dependencies (libssl).
        lib = ctypes.CDLL(_ssl.__file__)
        self._export = lib.SSL_export_keying_material
        self._export.restype = ctypes.c_int
        self._export.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_int,
        ]
        self._get_ex_data = lib.SSL_get_ex_data
        self._get_ex_data.restype = ctypes.c_void_p
        self._get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._get_ssl_ctx = lib.SSL_get_SSL_CTX
        self._get_ssl_ctx.restype = ctypes.c_void_p
        self._get_ssl_ctx.argtypes = [ctypes.c_void_p]
        self._self_test()

    def _read(self, address: int) -> int | None:
        return ctypes.c_void_p.from_address(address).value

    def _ssl_pointer(self, inner: Any) -> int | None:
        """The SSL* of an ``_ssl._SSLSocket``, or None if the layout disagrees."""
        if type(inner) is not self._socket_type:
            return None
        # A pure memory read inside the object: ctx must be the context object.
        if self._read(id(inner) + self._ctx_offset) != id(inner.context):
            return None
        pointer = self._read(id(inner) + self._ssl_offset)
        if not pointer:
            return None
        # CPython stores the _SSLSocket as the SSL's app data (ex_data index 0).
        if self._get_ex_data(pointer, 0) != id(inner):
            return None
        return pointer

    def _self_test(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="selftest.invalid")
        pointer = self._ssl_pointer(probe._sslobj)
        if pointer is None:
            raise RuntimeError("_SSLSocket layout mismatch")
        if self._get_ssl_ctx(pointer) != self._read(id(context) + self._head):
            raise RuntimeError("_SSLContext layout mismatch")

    def export(self, ssl_object: Any) -> bytes | None:
        inner = ssl_object if type(ssl_object) is self._socket_type else getattr(ssl_object, "_sslobj", None)
        if inner is None:
            return None
        try:
            # RFC 9266 §3: TLS 1.2 would need extended master secret; only 1.3 is safe.
            if inner.version() != "TLSv1.3":
                return None
            pointer = self._ssl_pointer(inner)
        except (ValueError, OSError):
            return None
        if pointer is None:
            return None
        out = ctypes.create_string_buffer(_EXPORTER_LENGTH)
        ok = self._export(pointer, out, _EXPORTER_LENGTH, _EXPORTER_LABEL, len(_EXPORTER_LABEL), b"", 0, 1)
        if ok != 1:
            return None
        return out.raw


def _load_exporter() -> tuple[_Exporter | None, str | None]:
    """The exporter, or None and the reason it cannot work here."""
    import platform

    if platform.python_implementation() != "CPython":
        return None, f"{platform.python_implementation()} is not CPython"
    try:
        return _Exporter(), None
    except (ImportError, AttributeError, OSError, RuntimeError, ssl.SSLError) as exc:
        return None, f"self-check failed: {exc}"


_EXPORTER, _EXPORTER_PROBLEM = _load_exporter()

#: Whether tls_exporter() can return data on this interpreter at all.
EXPORTER_AVAILABLE = _EXPORTER is not None


def warn_if_exporter_unavailable() -> None:
    """Say at start-up, once logging is set up, what clients lose when the exporter is off."""
    if _EXPORTER_PROBLEM is not None:
        log.warning("tls-exporter channel binding is off (%s): no SCRAM-*-PLUS with tls-exporter; "
                    "SCRAM-*-PLUS is still offered with tls-server-end-point", _EXPORTER_PROBLEM)


def tls_exporter(ssl_object: Any) -> bytes | None:
    """RFC 9266 tls-exporter data for a finished TLS 1.3 handshake.

    Accepts an ``ssl.SSLObject`` or ``ssl.SSLSocket`` (server or client side).
    Returns None when unsupported here, before the handshake, or on TLS < 1.3,
    so the caller simply does not offer the tls-exporter binding.
    """
    if _EXPORTER is None:
        return None
    return _EXPORTER.export(ssl_object)
