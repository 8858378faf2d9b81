import asyncio
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from server.tls import TlsContexts, TlsError, ensure_certificate
from tests.conftest import Harness

STREAMS = "http://etherx.jabber.org/streams"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"


def make_pair(tmp_path, host):
    cert, key = tmp_path / "certs" / f"{host}.crt", tmp_path / "certs" / f"{host}.key"
    assert ensure_certificate(host, cert, key)
    return cert, key


def test_generates_self_signed_certificate(tmp_path):
    cert_path, key_path = make_pair(tmp_path, "example.org")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "example.org"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.org", "*.example.org"]
    assert cert.signature_hash_algorithm.name == "sha256"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650
    # Existing files are left alone.
    assert not ensure_certificate("example.org", cert_path, key_path)


def test_internationalised_host_uses_a_label(tmp_path):
    cert_path, _ = make_pair(tmp_path, "bücher.example")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName)[0] == "xn--bcher-kva.example"


def test_one_file_missing_is_an_error(tmp_path):
    cert_path, key_path = make_pair(tmp_path, "example.org")
    key_path.unlink()
    with pytest.raises(TlsError, match=str(key_path)):
        ensure_certificate("example.org", cert_path, key_path)


def test_context_loads_generated_certificate(tmp_path):
    cert_path, key_path = make_pair(tmp_path, "example.org")
    contexts = TlsContexts({"example.org": (cert_path, key_path)})
    ctx = contexts.context("example.org")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert contexts.context("example.org") is ctx
    assert contexts.context(None) is ctx and contexts.context("other.example") is ctx
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert contexts.cert_der("example.org") == der


def test_loading_errors_name_the_file(tmp_path):
    cert_path, key_path = make_pair(tmp_path, "example.org")
    cert_path.write_text("garbage")
    with pytest.raises(TlsError, match=str(cert_path)):
        TlsContexts({"example.org": (cert_path, key_path)})
    other_cert, _ = make_pair(tmp_path, "other.org")
    with pytest.raises(TlsError, match=str(key_path)):
        TlsContexts({"example.org": (other_cert, key_path)})
    with pytest.raises(TlsError, match=str(tmp_path / "nope.key")):
        TlsContexts({"example.org": (other_cert, tmp_path / "nope.key")})


async def handshake(ctx: ssl.SSLContext, server_name: str) -> tuple[bytes, str | None]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(["xmpp-client"])
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_name)
        sslobj = writer.get_extra_info("ssl_object")
        result = sslobj.getpeercert(binary_form=True), sslobj.selected_alpn_protocol()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return result


async def test_direct_tls_picks_certificate_by_sni(tmp_path):
    contexts = TlsContexts({"a.example": make_pair(tmp_path, "a.example"),
                            "b.example": make_pair(tmp_path, "b.example")})
    ctx = contexts.direct_tls_context(["xmpp-client"])
    assert contexts.direct_tls_context(["xmpp-client"]) is ctx
    assert contexts.cert_der("a.example") != contexts.cert_der("b.example")
    for name, host in [("b.example", "b.example"), ("a.example", "a.example"), ("B.EXAMPLE", "b.example"),
                       ("muc.b.example", "b.example"), ("unknown.test", "a.example")]:
        der, alpn = await handshake(ctx, name)
        assert der == contexts.cert_der(host), name
        assert alpn == "xmpp-client"


@pytest.mark.parley_config(limits={"unauthenticated_timeout": 1.0, "max_connections_per_ip": 1})
@pytest.mark.parametrize("client_then", ["stalls", "sends garbage", "hangs up"])
async def test_a_failed_starttls_handshake_frees_the_clients_connection_slot(server: Harness, client_then: str):
    """One connection per address here: a handshake that failed must not hold the address's only slot."""
    raw = await server.raw()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send(f"<starttls xmlns='{TLS}'/>")
    await raw.expect(f"{{{TLS}}}proceed")
    if client_then == "sends garbage":
        await raw.send(b"GET / HTTP/1.1\r\n\r\n")
    elif client_then == "hangs up":
        raw.writer.close()
    deadline = asyncio.get_running_loop().time() + 5
    while server.server.connections:
        assert asyncio.get_running_loop().time() < deadline, "the failed connection is still counted"
        await asyncio.sleep(0.05)
    again = await server.raw()
    await again.open()
    await again.expect(f"{{{STREAMS}}}features")
