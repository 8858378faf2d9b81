"""SCRAM and PLAIN: RFC test vectors, round trips and failure modes."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from server.sasl import (
    HASHES,
    SaslFailure,
    ScramClient,
    ScramCredentials,
    ScramServer,
    derive_credentials,
    parse_plain,
    verify_password,
)

SECRET = b"per-process-secret"
CB = {"tls-exporter": b"\x01" * 32, "tls-server-end-point": b"\x02" * 32}
ITERATIONS = 64  # keep the tests fast; vectors use the RFC's own counts


def creds_for(password: str, hash_name: str) -> ScramCredentials:
    return derive_credentials(password, hash_name, iterations=ITERATIONS)


def test_rfc5802_sha1_vector() -> None:
    creds = derive_credentials("pencil", "SHA-1", base64.b64decode("QSXCR+Q6sek8bf92"), 4096)
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET, server_nonce="3rfcNHYJY1ZVvWVs7j")
    assert server.start(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL") == "user"
    assert server.username == "user"
    assert server.authzid is None
    assert server.challenge(creds) == (
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
    )
    final = b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    assert server.finish(final) == b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def test_rfc5802_sha1_vector_client() -> None:
    client = ScramClient("SCRAM-SHA-1", "user", "pencil", client_nonce="fyko+d2lbbFgONRv9qkxdawL")
    assert client.first() == b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    final = client.final(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
    assert final == b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    client.verify(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")


def test_rfc7677_sha256_vector() -> None:
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    creds = derive_credentials("pencil", "SHA-256", salt, 4096)
    server = ScramServer("SCRAM-SHA-256", {}, False, SECRET, server_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    assert server.start(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO") == "user"
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    assert server.challenge(creds) == f"r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()
    final = f"c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".encode()
    assert server.finish(final) == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def exchange(client: ScramClient, server: ScramServer, creds: ScramCredentials | None) -> None:
    server.start(client.first())
    final = client.final(server.challenge(creds))
    client.verify(server.finish(final))


@pytest.mark.parametrize("hash_name", HASHES)
def test_round_trip_without_binding(hash_name: str) -> None:
    creds = creds_for("s3cret pass", hash_name)
    for plus_advertised in (False, True):
        server = ScramServer(f"SCRAM-{hash_name}", CB, plus_advertised, SECRET)
        client = ScramClient(f"SCRAM-{hash_name}", "alice", "s3cret pass")
        exchange(client, server, creds)
        assert server.cb_type is None


@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize("cb_type", sorted(CB))
def test_round_trip_plus(hash_name: str, cb_type: str) -> None:
    creds = creds_for("s3cret pass", hash_name)
    server = ScramServer(f"SCRAM-{hash_name}-PLUS", CB, True, SECRET)
    client = ScramClient(f"SCRAM-{hash_name}-PLUS", "alice", "s3cret pass", cb_type, CB[cb_type], True)
    exchange(client, server, creds)
    assert server.cb_type == cb_type


@pytest.mark.parametrize("hash_name", HASHES)
def test_y_flag_without_plus_advertised_succeeds(hash_name: str) -> None:
    server = ScramServer(f"SCRAM-{hash_name}", {}, False, SECRET)
    client = ScramClient(f"SCRAM-{hash_name}", "alice", "pw", cb_type="tls-exporter")
    assert client.first().startswith(b"y,,")
    exchange(client, server, creds_for("pw", hash_name))


def test_authzid_and_escaped_username() -> None:
    server = ScramServer("SCRAM-SHA-256", {}, False, SECRET)
    client = ScramClient("SCRAM-SHA-256", "a,b=c", "pw", authzid="admin=x,y@host")
    assert b"n=a=2Cb=3Dc" in client.first()
    assert server.start(client.first()) == "a,b=c"
    assert server.authzid == "admin=x,y@host"
    client.verify(server.finish(client.final(server.challenge(creds_for("pw", "SHA-256")))))


@pytest.mark.parametrize("hash_name", HASHES)
def test_wrong_password_fails(hash_name: str) -> None:
    server = ScramServer(f"SCRAM-{hash_name}", {}, False, SECRET)
    client = ScramClient(f"SCRAM-{hash_name}", "alice", "wrong")
    server.start(client.first())
    final = client.final(server.challenge(creds_for("right", hash_name)))
    with pytest.raises(SaslFailure) as info:
        server.finish(final)
    assert info.value.condition == "not-authorized"


def test_client_rejects_forged_server_signature() -> None:
    server = ScramServer("SCRAM-SHA-256", {}, False, SECRET)
    client = ScramClient("SCRAM-SHA-256", "alice", "pw")
    server.start(client.first())
    client.final(server.challenge(creds_for("pw", "SHA-256")))
    with pytest.raises(SaslFailure):
        client.verify(b"v=" + base64.b64encode(b"\x00" * 32))


def test_unknown_user_fails_only_at_finish() -> None:
    def first_message(user: str) -> bytes:
        server = ScramServer("SCRAM-SHA-256", {}, False, SECRET, server_nonce="fixed")
        server.start(f"n,,n={user},r=abc".encode())
        return server.challenge(None)

    # The fake salt is stable per user and looks like a real one.
    assert first_message("ghost") == first_message("ghost")
    assert first_message("ghost") != first_message("other")
    assert first_message("ghost") == first_message("Ghost")  # as for a case-folded real account
    salt = first_message("ghost").split(b",")[1][2:]
    assert len(base64.b64decode(salt)) == 16
    assert first_message("ghost").endswith(b",i=4096")

    server = ScramServer("SCRAM-SHA-256", {}, False, SECRET)
    client = ScramClient("SCRAM-SHA-256", "ghost", "pw")
    server.start(client.first())
    final = client.final(server.challenge(None))
    with pytest.raises(SaslFailure) as info:
        server.finish(final)
    assert info.value.condition == "not-authorized"


def test_fake_salt_depends_on_secret() -> None:
    salts = []
    for secret in (b"one", b"two"):
        server = ScramServer("SCRAM-SHA-1", {}, False, secret)
        server.start(b"n,,n=ghost,r=abc")
        salts.append(server.challenge(None).split(b",")[1])
    assert salts[0] != salts[1]


def test_downgrade_detected() -> None:
    server = ScramServer("SCRAM-SHA-256", CB, True, SECRET)
    client = ScramClient("SCRAM-SHA-256", "alice", "pw", cb_type="tls-exporter")
    with pytest.raises(SaslFailure) as info:
        server.start(client.first())
    assert info.value.condition == "not-authorized"


@pytest.mark.parametrize("hash_name", HASHES)
def test_channel_binding_mismatch_fails(hash_name: str) -> None:
    server = ScramServer(f"SCRAM-{hash_name}-PLUS", CB, True, SECRET)
    client = ScramClient(f"SCRAM-{hash_name}-PLUS", "alice", "pw", "tls-exporter", b"\x09" * 32, True)
    server.start(client.first())
    final = client.final(server.challenge(creds_for("pw", hash_name)))
    with pytest.raises(SaslFailure) as info:
        server.finish(final)
    assert info.value.condition == "not-authorized"


def test_gs2_header_tampering_fails() -> None:
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    client = ScramClient("SCRAM-SHA-1", "alice", "pw", cb_type="tls-exporter")  # sends 'y'
    server.start(client.first())
    final = client.final(server.challenge(creds_for("pw", "SHA-1")))
    forged = final.replace(b"c=" + base64.b64encode(b"y,,"), b"c=" + base64.b64encode(b"n,,"))
    with pytest.raises(SaslFailure) as info:
        server.finish(forged)
    assert info.value.condition == "not-authorized"


def test_nonce_mismatch_fails() -> None:
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    client = ScramClient("SCRAM-SHA-1", "alice", "pw")
    server.start(client.first())
    final = client.final(server.challenge(creds_for("pw", "SHA-1")))
    parts = final.split(b",")
    parts[1] += b"x"
    with pytest.raises(SaslFailure) as info:
        server.finish(b",".join(parts))
    assert info.value.condition == "not-authorized"


@pytest.mark.parametrize(
    ("mechanism", "bindings", "message"),
    [
        ("SCRAM-SHA-1", CB, b"p=tls-exporter,,n=u,r=abc"),  # p= with a non-PLUS mechanism
        ("SCRAM-SHA-1-PLUS", CB, b"n,,n=u,r=abc"),  # PLUS mechanism without binding
        ("SCRAM-SHA-1-PLUS", CB, b"y,,n=u,r=abc"),
        ("SCRAM-SHA-1-PLUS", CB, b"p=tls-unique,,n=u,r=abc"),  # not available here
        ("SCRAM-SHA-1-PLUS", {}, b"p=tls-exporter,,n=u,r=abc"),  # no TLS at all
        ("SCRAM-SHA-1-PLUS", CB, b"p=tls_exporter,,n=u,r=abc"),  # invalid cb-name
        ("SCRAM-SHA-1", {}, b"x,,n=u,r=abc"),
        ("SCRAM-SHA-1", {}, b"n,,n=u"),
        ("SCRAM-SHA-1", {}, b"n,,n=,r=abc"),
        ("SCRAM-SHA-1", {}, b"n,,n=a=2Xb,r=abc"),  # bad escape
        ("SCRAM-SHA-1", {}, b"n,,n=a=2cb,r=abc"),  # escapes are upper case
        ("SCRAM-SHA-1", {}, b"n,,n=a=,r=abc"),
        ("SCRAM-SHA-1", {}, b"n,,m=ext,n=u,r=abc"),  # mandatory extension
        ("SCRAM-SHA-1", {}, b"n,,n=u,r=abc,m=ext"),
        ("SCRAM-SHA-1", {}, b"n,,n=u,r=a\x7fc"),  # nonce not printable
        ("SCRAM-SHA-1", {}, b"n,,n=u,r="),
        ("SCRAM-SHA-1", {}, b"n,,n=u,r=abc,ext"),
        ("SCRAM-SHA-1", {}, b"n,,r=abc,n=u"),
        ("SCRAM-SHA-1", {}, b"n,b=x,n=u,r=abc"),  # authzid must be a=
        ("SCRAM-SHA-1", {}, b"n,a=,n=u,r=abc"),
        ("SCRAM-SHA-1", {}, b"n,,n=\xff,r=abc"),  # not UTF-8
        ("SCRAM-SHA-1", {}, b""),
    ],
)
def test_malformed_client_first(mechanism: str, bindings: dict[str, bytes], message: bytes) -> None:
    server = ScramServer(mechanism, bindings, True, SECRET)
    with pytest.raises(SaslFailure) as info:
        server.start(message)
    assert info.value.condition == "malformed-request"
    with pytest.raises(SaslFailure):  # the exchange is dead afterwards
        server.challenge(None)


def test_unknown_extension_after_nonce_is_ignored() -> None:
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    assert server.start(b"n,,n=u,r=abc,x=whatever") == "u"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.replace(b"c=", b"x=", 1),
        lambda f: f.replace(b",r=", b",n=", 1),
        lambda f: f[: f.rindex(b",p=")],  # no proof
        lambda f: f[: f.rindex(b",p=")] + b",p=!!!",  # bad base64
        lambda f: f[: f.rindex(b",p=")] + b",p=" + base64.b64encode(b"short"),
        lambda f: f.replace(b",p=", b",m=1,p="),
        lambda f: f + b"\xff",
        lambda f: b"c=biws",
    ],
)
def test_malformed_client_final(mutate: Callable[[bytes], bytes]) -> None:
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    client = ScramClient("SCRAM-SHA-1", "alice", "pw")
    server.start(client.first())
    final = client.final(server.challenge(creds_for("pw", "SHA-1")))
    with pytest.raises(SaslFailure) as info:
        server.finish(mutate(final))
    assert info.value.condition == "malformed-request"


def test_steps_out_of_order() -> None:
    creds = creds_for("pw", "SHA-1")
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    with pytest.raises(SaslFailure) as info:
        server.challenge(creds)
    assert info.value.condition == "malformed-request"

    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    with pytest.raises(SaslFailure):
        server.finish(b"c=biws,r=abc,p=AAAA")
    with pytest.raises(SaslFailure):
        _ = server.username

    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    server.start(b"n,,n=u,r=abc")
    with pytest.raises(SaslFailure):
        server.start(b"n,,n=u,r=abc")

    client = ScramClient("SCRAM-SHA-1", "u", "pw")
    server = ScramServer("SCRAM-SHA-1", {}, False, SECRET)
    server.start(client.first())
    server.finish(client.final(server.challenge(creds)))
    with pytest.raises(SaslFailure):
        server.finish(b"c=biws")


def test_unknown_mechanism() -> None:
    with pytest.raises(SaslFailure) as info:
        ScramServer("SCRAM-MD5", {}, False, SECRET)
    assert info.value.condition == "invalid-mechanism"


def test_credentials_hold_no_password() -> None:
    creds = derive_credentials("pencil", "SHA-256")
    assert len(creds.salt) == 16
    assert creds.iterations == 4096
    assert len(creds.stored_key) == len(creds.server_key) == 32
    assert b"pencil" not in repr(creds).encode()
    assert derive_credentials("pencil", "SHA-256").salt != creds.salt


def test_derive_rejects_bad_input() -> None:
    for password in ("", "a\x00b", "bell\x07"):
        with pytest.raises(ValueError):
            derive_credentials(password, "SHA-1")
    with pytest.raises(ValueError):
        derive_credentials("pw", "MD5")
    with pytest.raises(ValueError):
        derive_credentials("pw", "SHA-1", iterations=0)


def test_password_is_precis_prepared() -> None:
    # OpaqueString maps non-ASCII spaces to U+0020 and applies NFC.
    creds = derive_credentials("p\u00a0w\u0065\u0301", "SHA-1", iterations=ITERATIONS)
    assert verify_password(creds, "p w\u00e9")


@pytest.mark.parametrize("hash_name", HASHES)
def test_verify_password(hash_name: str) -> None:
    creds = creds_for("correct horse", hash_name)
    assert verify_password(creds, "correct horse")
    assert not verify_password(creds, "correct horse ")
    assert not verify_password(creds, "")


def test_sasl_failure_attributes() -> None:
    failure = SaslFailure("aborted")
    assert (failure.condition, failure.text) == ("aborted", None)
    failure = SaslFailure("not-authorized", "bad")
    assert (failure.condition, failure.text) == ("not-authorized", "bad")


def test_parse_plain() -> None:
    assert parse_plain(b"\x00alice\x00secret") == (None, "alice", "secret")
    assert parse_plain(b"admin@host\x00alice\x00s\xc3\xa9cret") == ("admin@host", "alice", "s\u00e9cret")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"alice\x00secret",
        b"\x00\x00secret",
        b"\x00alice\x00",
        b"a\x00b\x00c\x00d",
        b"\x00al\xffice\x00pw",
    ],
)
def test_parse_plain_malformed(data: bytes) -> None:
    with pytest.raises(SaslFailure) as info:
        parse_plain(data)
    assert info.value.condition == "malformed-request"
