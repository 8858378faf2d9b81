"""Channel-binding data: tls-server-end-point and tls-exporter against pyOpenSSL."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from server.sasl import EXPORTER_AVAILABLE, tls_exporter, tls_server_end_point

LABEL = b"EXPORTER-Channel-Binding"


def self_signed(
    key: CertificateIssuerPrivateKeyTypes, algorithm: hashes.HashAlgorithm | None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "parley.test")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_end_point_sha256(ec_key: ec.EllipticCurvePrivateKey) -> None:
    der = self_signed(ec_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_end_point_sha384(ec_key: ec.EllipticCurvePrivateKey) -> None:
    der = self_signed(ec_key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


@pytest.mark.parametrize("weak_oid", [b"\x05", b"\x04"])
def test_end_point_md5_and_sha1_upgraded_to_sha256(weak_oid: bytes) -> None:
    # cryptography no longer signs with SHA-1/MD5, so relabel a sha256WithRSAEncryption
    # certificate as sha1WithRSAEncryption (1.2.840.113549.1.1.5) or md5WithRSAEncryption
    # (...1.1.4): the OIDs have the same length and the signature is never verified here.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = self_signed(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    sha256_rsa = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0b"
    assert der.count(sha256_rsa) == 2
    relabelled = der.replace(sha256_rsa, sha256_rsa[:-1] + weak_oid)
    cert = x509.load_der_x509_certificate(relabelled)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name in ("sha1", "md5")
    assert tls_server_end_point(relabelled) == hashlib.sha256(relabelled).digest()


def test_end_point_undefined_for_ed25519() -> None:
    cert = self_signed(ed25519.Ed25519PrivateKey.generate(), None)
    with pytest.raises(ValueError):
        tls_server_end_point(cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("algorithm", [hashes.SHA224(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512()],
                         ids=lambda a: a.name)
@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_end_point_hash_read_from_the_der_agrees_with_cryptography(
    kind: str, algorithm: hashes.HashAlgorithm, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The signature algorithm is read from the certificate's DER without `cryptography`: the same hash."""
    cert = self_signed(rsa_key if kind == "rsa" else ec_key, algorithm)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert cert.signature_hash_algorithm is not None
    assert tls_server_end_point(der) == hashlib.new(cert.signature_hash_algorithm.name, der).digest()


def test_end_point_of_an_rsa_pss_certificate_takes_the_hash_from_its_parameters(rsa_key: rsa.RSAPrivateKey) -> None:
    """RSASSA-PSS names its hash in the algorithm's parameters: left to `cryptography`, which reads them."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "parley.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(rsa_key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(rsa_key, hashes.SHA384(),
                  rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.DIGEST_LENGTH)))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x04\x02ab", b"\x30\x03\x30\x01\x00"])
def test_end_point_of_something_that_is_no_certificate_is_an_error(der: bytes) -> None:
    with pytest.raises(ValueError):
        tls_server_end_point(der)


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    cert = self_signed(ec_key, hashes.SHA256())
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory


def stdlib_server(directory: Path, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


def pyopenssl_client(version: int = SSL.TLS1_3_VERSION) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    return context


def memory_handshake(
    server: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, client: SSL.Connection
) -> None:
    """Drive both sides of an in-memory handshake to completion."""
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except SSL.WantReadError:
                pass
        with contextlib.suppress(SSL.WantReadError):
            incoming.write(client.bio_read(65536))
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        data = outgoing.read()
        if data:
            client.bio_write(data)
        if client_done and server_done:
            return
    raise AssertionError("handshake did not complete")


def test_exporter_is_available_here() -> None:
    assert EXPORTER_AVAILABLE


def test_exporter_matches_pyopenssl_over_memory_bio(server_context: Path) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = stdlib_server(server_context).wrap_bio(incoming, outgoing, server_side=True)
    client = SSL.Connection(pyopenssl_client(), None)
    client.set_connect_state()
    assert tls_exporter(server) is None  # no handshake yet
    memory_handshake(server, incoming, outgoing, client)
    assert server.version() == "TLSv1.3"
    expected = client.export_keying_material(LABEL, 32, b"")
    assert tls_exporter(server) == expected
    assert len(expected) == 32
    assert client.export_keying_material(b"other label", 32, b"") != expected


def test_exporter_matches_pyopenssl_over_socketpair(server_context: Path) -> None:
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with stdlib_server(server_context).wrap_socket(server_sock, server_side=True) as tls:
                result["exporter"] = tls_exporter(tls)
                result["version"] = tls.version()
                tls.recv(1)  # hold the connection until the client has exported
        except Exception as exc:  # reported to the main thread below
            result["error"] = exc
        finally:
            server_sock.close()  # a failed server must not leave the client blocked

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = SSL.Connection(pyopenssl_client(), client_sock)
        client.set_connect_state()
        client.do_handshake()
        expected = client.export_keying_material(LABEL, 32, b"")
        client.sendall(b"x")
    finally:
        thread.join(10)
        client_sock.close()
    assert "error" not in result, result.get("error")
    assert result["version"] == "TLSv1.3"
    assert result["exporter"] == expected


def test_stdlib_client_and_server_agree(server_context: Path) -> None:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client = client_context.wrap_bio(c_in, c_out)
    server = stdlib_server(server_context).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client.version() == server.version() == "TLSv1.3"
    assert tls_exporter(client) == tls_exporter(server) is not None


def test_exporter_refuses_tls12(server_context: Path) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = stdlib_server(server_context, ssl.TLSVersion.TLSv1_2).wrap_bio(
        incoming, outgoing, server_side=True
    )
    client = SSL.Connection(pyopenssl_client(SSL.TLS1_2_VERSION), None)
    client.set_connect_state()
    memory_handshake(server, incoming, outgoing, client)
    assert server.version() == "TLSv1.2"
    assert tls_exporter(server) is None


def test_exporter_returns_none_for_other_objects() -> None:
    assert tls_exporter(object()) is None
    assert tls_exporter(None) is None
    sock = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(
        socket.socket(), do_handshake_on_connect=False, server_hostname="parley.test"
    )
    sock.close()
    assert tls_exporter(sock) is None
