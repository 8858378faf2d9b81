import copy
import pickle

import pytest

from server.jid import JID, JIDError


def test_case_folding_of_local_and_domain_only():
    jid = JID.parse("Juliet@Example.COM/Balcony")
    assert str(jid) == "juliet@example.com/Balcony"
    assert (jid.local, jid.domain, jid.resource) == ("juliet", "example.com", "Balcony")


def test_parse_is_cached_and_equal_forms_compare_equal():
    assert JID.parse("a@b/c") is JID.parse("a@b/c")
    assert JID.parse("A@B/c") == JID.make("a", "b", "c")
    assert hash(JID.parse("A@B/c")) == hash(JID.make("a", "b", "c"))
    assert JID.parse("a@b/c") != JID.parse("a@b/C")
    assert JID.parse("a@b") != "a@b"


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def test_fullwidth_characters_are_mapped():
    assert str(JID.parse(f"{fullwidth('JULIET')}@{fullwidth('example')}.com")) == "juliet@example.com"


def test_unicode_localpart_is_case_mapped():
    assert JID.parse("ΣΑΜ@example.com").local == "σαμ"


@pytest.mark.parametrize("text", [
    'ju"liet@example.com', "ju&liet@example.com", "ju'liet@example.com", "ju:liet@example.com",
    "ju<liet@example.com", "ju>liet@example.com", "ju liet@example.com", "a@b@example.com",
    "a@exa mple.com", "a@example_x.com", "a@-example.com", "a@example.com\x00",
])
def test_forbidden_characters(text):
    with pytest.raises(JIDError):
        JID.parse(text)


def test_make_rejects_slash_and_at_in_localpart():
    with pytest.raises(JIDError, match="forbidden"):
        JID.make("a/b", "example.com")
    with pytest.raises(JIDError, match="forbidden"):
        JID.make("a@b", "example.com")


@pytest.mark.parametrize("text", [
    "", "@example.com", "a@", "example.com/", "a@example.com/", "/r", "a@.", "a@x..y",
])
def test_empty_parts(text):
    with pytest.raises(JIDError, match="empty"):
        JID.parse(text)


def test_make_rejects_empty_strings():
    with pytest.raises(JIDError):
        JID.make("", "example.com")
    with pytest.raises(JIDError):
        JID.make(None, "example.com", "")


def test_too_long_parts():
    assert JID.parse("a" * 1023 + "@example.com").local == "a" * 1023
    with pytest.raises(JIDError, match="longer than 1023"):
        JID.parse("a" * 1024 + "@example.com")
    with pytest.raises(JIDError, match="longer than 1023"):
        JID.parse("example.com/" + "é" * 512)  # 1024 bytes of UTF-8
    with pytest.raises(JIDError, match="63"):
        JID.parse("a" * 64 + ".example.com")
    assert JID.parse("a" * 63 + ".example.com")


def test_idna_a_labels_become_u_labels():
    jid = JID.parse("user@xn--bcher-kva.example")
    assert jid.domain == "bücher.example"
    assert jid == JID.parse("user@BÜCHER.example")
    assert JID.parse("XN--BCHER-KVA.example").domain == "bücher.example"
    with pytest.raises(JIDError):
        JID.parse("user@xn--zz-.example")


def test_ideographic_full_stop_separates_labels():
    assert JID.parse("例え。テスト").domain == "例え.テスト"


def test_ip_literals():
    assert JID.parse("user@192.0.2.1/r").domain == "192.0.2.1"
    assert JID.parse("user@[2001:db8::1]/r").domain == "[2001:db8::1]"
    with pytest.raises(JIDError):
        JID.parse("user@[2001:db8::zz]")
    with pytest.raises(JIDError):
        JID.parse("user@[2001:db8::1")


def test_trailing_dot_is_stripped():
    assert JID.parse("user@example.com./r") == JID.parse("user@example.com/r")
    assert JID.parse("192.0.2.1.").domain == "192.0.2.1"


def test_resource_may_contain_at_and_slash():
    jid = JID.parse("juliet@example.com/foo@bar/baz")
    assert (jid.local, jid.domain, jid.resource) == ("juliet", "example.com", "foo@bar/baz")
    jid = JID.parse("example.com/a@b")
    assert (jid.local, jid.domain, jid.resource) == (None, "example.com", "a@b")


def test_resource_keeps_case_but_rejects_controls():
    assert JID.parse(f"a@b/{fullwidth('X')} y").resource == f"{fullwidth('X')} y"
    with pytest.raises(JIDError, match="resourcepart"):
        JID.parse("a@b/x\x07")


def test_bare_host_and_with_resource():
    full = JID.parse("a@example.com/r")
    bare = full.bare
    assert str(bare) == "a@example.com" and bare.is_bare and not full.is_bare
    assert bare.bare is bare
    assert not bare.is_host
    assert JID.parse("example.com").is_host
    assert not JID.parse("example.com/r").is_host
    assert full.with_resource("Other") == JID.parse("a@example.com/Other")
    assert full.with_resource(None) == bare
    with pytest.raises(JIDError):
        full.with_resource("")


def test_immutable_and_picklable():
    jid = JID.parse("a@example.com/r")
    with pytest.raises(AttributeError):
        jid.local = "b"
    with pytest.raises(TypeError):
        JID("a@example.com")
    assert pickle.loads(pickle.dumps(jid)) == jid
    assert copy.deepcopy(jid) == jid
    assert repr(jid) == "JID('a@example.com/r')"
    assert {jid: 1}[JID.make("A", "EXAMPLE.com", "r")] == 1
