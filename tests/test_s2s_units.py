"""Federation pieces without a network: the [s2s] configuration, certificate names, policy, resolver."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from s2s import dialback
from s2s.certs import ID_ON_DNSSRV, ID_ON_XMPPADDR, acceptable, names_domain
from s2s.limits import FederationLimits
from s2s.policy import SELF_SIGNED, UNCHECKED, VERIFY, Policy
from s2s.resolver import Target, resolve
from server.config import ConfigError, DomainLimits, StaticRoute, parse_config


def s2s_config(**s2s: Any) -> Any:
    return parse_config({"s2s": s2s}).s2s


def test_defaults_require_encryption_and_valid_certificates() -> None:
    config = s2s_config()
    assert config.require_encryption and config.require_valid_certificates
    assert config.ca_bundle is None and config.static == {} and config.allow == config.deny == []


def test_s2s_keys_are_validated_and_domains_prepared(tmp_path: Path) -> None:
    config = parse_config({"s2s": {
        "ca_bundle": "ca.pem", "accept_self_signed": ["Peer.Example"], "deny": ["bad.example"],
        "static": {"Peer.Example": {"address": "127.0.0.2"}, "d.example": {"address": "::1", "port": 5270,
                                                                           "tls": "direct"}},
    }}, source=tmp_path / "parley.toml").s2s
    assert config.ca_bundle == tmp_path / "ca.pem"
    assert config.accept_self_signed == ["peer.example"] and config.deny == ["bad.example"]
    assert config.static == {"peer.example": StaticRoute("127.0.0.2", 5269, "starttls"),
                             "d.example": StaticRoute("::1", 5270, "direct")}


@pytest.mark.parametrize(("s2s", "key"), [
    ({"require_encryption": "yes"}, "s2s.require_encryption"),
    ({"allow": ["not a domain!"]}, "s2s.allow[0]"),
    ({"static": {"x.example": {"address": "127.0.0.2", "port": 0}}}, 's2s.static."x.example".port'),
    ({"static": {"x.example": {"address": "127.0.0.2", "tls": "none"}}}, 's2s.static."x.example".tls'),
    ({"static": {"x.example": {"port": 5269}}}, 's2s.static."x.example".address'),
    ({"idle_timeout": 0}, "s2s.idle_timeout"),
    ({"ack_timeout": -1}, "s2s.ack_timeout"),
    ({"ca_bundle": ""}, "s2s.ca_bundle"),
    ({"rate": 0}, "s2s.rate"),
    ({"max_incoming_per_ip": 0}, "s2s.max_incoming_per_ip"),
    ({"domains": {"x.example": {"max_queue": -1}}}, 's2s.domains."x.example".max_queue'),
    ({"domains": {"x.example": {"rte": 5}}}, 's2s.domains."x.example".rte'),
    ({"domains": {"not a domain!": {}}}, 's2s.domains."not a domain!"'),
    ({"colour": "blue"}, "s2s.colour"),
])
def test_bad_s2s_values_name_the_key(s2s: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"s2s": s2s})
    assert info.value.key == key


def test_policy_lists_cover_subdomains() -> None:
    policy = Policy(s2s_config(deny=["bad.example"], accept_self_signed=["lab.example"]))
    assert policy.allowed("good.example") and not policy.allowed("conference.bad.example")
    assert not policy.allowed("bad.example") and policy.allowed("notbad.example")
    assert policy.certificate_mode("muc.lab.example") == SELF_SIGNED
    assert policy.certificate_mode("other.example") == VERIFY
    assert Policy(s2s_config(allow=["only.example"])).allowed("x.only.example")
    assert not Policy(s2s_config(allow=["only.example"])).allowed("other.example")
    assert Policy(s2s_config(require_valid_certificates=False)).certificate_mode("x.example") == UNCHECKED


def test_domain_limits_fall_back_on_the_parent_domain_then_on_the_s2s_table() -> None:
    limits = FederationLimits(s2s_config(rate=1000, max_queue=50, domains={
        "Chatty.Example": {"rate": 10}, "muc.chatty.example": {"burst": 7}}))
    assert limits.of("other.example") == DomainLimits(rate=1000, burst=1048576, max_queue=50)
    assert limits.of("chatty.example") == DomainLimits(rate=10, burst=1048576, max_queue=50)
    assert limits.of("x.chatty.example") == limits.of("chatty.example")
    assert limits.of("muc.chatty.example") == DomainLimits(rate=1000, burst=7, max_queue=50)
    assert limits.of("notchatty.example").rate == 1000


def test_a_domain_has_one_budget_while_its_connections_hold_it() -> None:
    limits = FederationLimits(s2s_config(stanza_rate=5, domains={"peer.example": {"stanza_burst": 2}}))
    budget = limits.budget("peer.example")
    assert limits.budget("peer.example") is budget and limits.budget("other.example") is not budget
    assert budget.stanzas.rate == 5 and budget.stanzas.burst == 2
    del budget
    assert "peer.example" not in limits._budgets


def test_incoming_connections_are_capped_in_total_and_per_address() -> None:
    limits = FederationLimits(s2s_config(max_incoming=3, max_incoming_per_ip=2))
    assert limits.admit("192.0.2.1", 0, 10) is None and limits.admit("192.0.2.1", 1, 10) is None
    assert limits.admit("192.0.2.1", 2, 10) == "policy-violation"
    assert limits.admit("192.0.2.2", 3, 10) == "resource-constraint"
    assert limits.admit("192.0.2.2", 0, 0) == "resource-constraint"  # the server's descriptors run out
    limits.per_ip.release("192.0.2.1")
    assert limits.admit("192.0.2.1", 2, 10) is None


def _der(tag: int, text: str) -> bytes:
    body = text.encode()
    return bytes([tag, len(body)]) + body


def certificate(names: list[x509.GeneralName] | None, cn: str = "ignored.example", days: int = 30) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=days)))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_rfc6125_names() -> None:
    der = certificate([x509.DNSName("example.org"), x509.DNSName("*.example.org")])
    assert names_domain(der, "example.org") and names_domain(der, "conference.example.org")
    assert not names_domain(der, "a.b.example.org") and not names_domain(der, "example.com")
    xmpp = certificate([x509.OtherName(ID_ON_XMPPADDR, _der(0x0C, "chat.example"))])
    assert names_domain(xmpp, "chat.example") and not names_domain(xmpp, "other.example")
    srv = certificate([x509.OtherName(ID_ON_DNSSRV, _der(0x16, "_xmpp-server.srv.example"))])
    assert names_domain(srv, "srv.example")
    # The common name counts only when the certificate has no subjectAltName identifiers at all.
    assert names_domain(certificate(None, cn="old.example"), "old.example")
    assert not names_domain(certificate([x509.DNSName("new.example")], cn="old.example"), "old.example")
    assert names_domain(certificate([x509.DNSName("xn--bcher-kva.example")]), "bücher.example")


def test_acceptable_by_mode() -> None:
    good = certificate([x509.DNSName("peer.example")])
    expired = certificate([x509.DNSName("peer.example")], days=-1)
    assert acceptable(good, "peer.example", SELF_SIGNED) and acceptable(good, "peer.example", VERIFY)
    assert not acceptable(expired, "peer.example", SELF_SIGNED)
    assert not acceptable(good, "other.example", SELF_SIGNED) and not acceptable(None, "peer.example", VERIFY)
    assert acceptable(None, "peer.example", UNCHECKED)


def test_dialback_keys_and_elements() -> None:
    key = dialback.make_key(b"secret", "receiving.example", "originating.example", "id1")
    assert dialback.key_valid(b"secret", "receiving.example", "originating.example", "id1", f"\n {key} \n")
    assert not dialback.key_valid(b"secret", "receiving.example", "originating.example", "id2", key)
    assert not dialback.key_valid(b"other", "receiving.example", "originating.example", "id1", key)
    assert dialback.element("result", "a.example", "b.example", type="valid") == \
        '<db:result from="a.example" to="b.example" type="valid"/>'
    assert dialback.element("verify", "a", "b", id="x&y", error="item-not-found") == (
        '<db:verify from="a" to="b" id="x&amp;y" type="error"><error type="cancel">'
        '<item-not-found xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/></error></db:verify>')


async def test_static_map_comes_first() -> None:
    static = {"peer.example": StaticRoute("127.0.0.9", 5299, "direct")}
    assert await resolve("peer.example", static) == [Target("127.0.0.9", 5299, True)]


async def test_without_srv_records_the_domain_itself_on_5269() -> None:
    # .invalid never resolves (RFC 6761), whether or not a DNS server answers here.
    assert await resolve("nowhere.invalid", {}) == [Target("nowhere.invalid", 5269, False)]


async def test_srv_records_merge_direct_tls_and_starttls_by_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from s2s import resolver

    def srv(priority: int, port: int, target: str) -> SimpleNamespace:
        return SimpleNamespace(priority=priority, weight=0, port=port, target=target)

    records = {
        "_xmpps-server._tcp.example.net.": [srv(5, 5223, "tls.example.net.")],
        "_xmpp-server._tcp.example.net.": [srv(10, 5269, "b.example.net."), srv(1, 5269, "a.example.net.")],
    }

    async def fake_srv(name: str) -> Any:
        return records.get(name)

    monkeypatch.setattr(resolver, "_srv", fake_srv)
    assert await resolve("example.net", {}) == [
        Target("a.example.net", 5269, False), Target("tls.example.net", 5223, True),
        Target("b.example.net", 5269, False)]
    records["_xmpp-server._tcp.example.net."] = []  # "." target: the service is declared absent
    del records["_xmpps-server._tcp.example.net."]
    assert await resolve("example.net", {}) == []
