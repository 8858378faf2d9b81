"""`parley check`: what `prosodyctl check` looks at before going live, each problem named with its fix.

The configuration (every key and module option, as `parley check-config`), each host's certificate (chain,
names of the host and of its services, expiry, key), DNS (the SRV records clients and servers look up, and
addresses), and whether the listeners' ports can be bound. A problem makes `parley check` fail; a warning
(a certificate that expires soon, a missing SRV record where the default port works) does not.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.exception
import dns.resolver
import idna
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from server.config import Config, HostConfig, ListenerConfig
from server.control import server_running

# Modules that serve a subdomain of their host, its prefix unless their 'domain' option names another.
SERVICE_PREFIXES = {"muc": "conference", "pubsub": "pubsub", "upload": "upload"}
EXPIRY_WARNING = timedelta(days=14)
DEFAULT_PORTS = {"_xmpp-client": 5222, "_xmpps-client": 5223, "_xmpp-server": 5269}
DNS_LIFETIME = 5.0
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


@dataclass
class Report:
    """What one part of the check found: problems fail the check, warnings do not."""

    title: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append(f"{what}\n      fix: {fix}")

    def warning(self, what: str, fix: str) -> None:
        self.warnings.append(f"{what}\n      fix: {fix}")

    def lines(self) -> Iterator[str]:
        verdict = "OK" if not self.problems else f"{len(self.problems)} problem(s)"
        yield f"{self.title}: {verdict}"
        yield from (f"  note: {note}" for note in self.notes)
        yield from (f"  warning: {warning}" for warning in self.warnings)
        yield from (f"  PROBLEM: {problem}" for problem in self.problems)


def services(host: HostConfig, config: Config) -> list[str]:
    """The subdomains the host's modules serve (conference., pubsub., upload.), and components under it."""
    found = [str(host.options.get(f"{module}.domain") or f"{prefix}.{host.name}")
             for module, prefix in SERVICE_PREFIXES.items() if module in host.modules]
    found += [domain for domain in config.components if domain.endswith(f".{host.name}")]
    return list(dict.fromkeys(found))


# --- certificates -----------------------------------------------------------------------------------------

def _ascii(name: str) -> str:
    return name if name.isascii() else idna.encode(name).decode("ascii")


def _names(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for: its subjectAltName, else its common name."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def covers(names: list[str], domain: str) -> bool:
    """RFC 6125: an exact name, or a wildcard standing for the left-most label only."""
    domain = _ascii(domain).lower()
    for name in (n.lower() for n in names):
        if name == domain or (name.startswith("*.") and domain.partition(".")[2] == name[2:]):
            return True
    return False


def trusted_roots(config: Config) -> list[x509.Certificate]:
    """The certificates a chain must end in: the [s2s] ca_bundle, else the system's."""
    bundle = config.s2s.ca_bundle or next((Path(p) for p in (ssl.get_default_verify_paths().cafile,
                                                              *SYSTEM_CA_FILES) if p and Path(p).is_file()), None)
    if bundle is None:
        return []
    with warnings.catch_warnings():  # system bundles hold old roots cryptography frowns upon
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(Path(bundle).read_bytes())


def _chain_problem(chain: list[x509.Certificate], roots: list[x509.Certificate], path: Path) -> tuple[str, str] | None:
    """Why the chain does not lead to a trusted root, with the fix; None when it does."""
    trusted = {root.fingerprint(hashes.SHA256()) for root in roots}
    by_subject = {c.subject: c for c in [*roots, *chain[1:]]}
    cert = chain[0]
    for _ in range(len(chain) + 8):
        if cert.fingerprint(hashes.SHA256()) in trusted:
            return None
        if cert.issuer == cert.subject:
            return ("self-signed (or signed by a CA nobody trusts): clients ask their users to accept it and "
                    "servers that check certificates refuse federation",
                    "get one from a certificate authority, e.g. `certbot certonly -d HOST -d conference.HOST ...` "
                    "(Let's Encrypt), and name its fullchain.pem and privkey.pem as certificate and key")
        issuer = by_subject.get(cert.issuer)
        if issuer is None:
            return (f"the issuer {cert.issuer.rfc4514_string()} is neither in {path} nor trusted",
                    f"append the intermediate certificates to {path}, after the server's (certbot's fullchain.pem)")
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            return (f"{cert.subject.rfc4514_string()} is not signed by {issuer.subject.rfc4514_string()}",
                    f"put the certificate chain of this certificate in {path}, in order")
        cert = issuer
    return "the chain does not end", f"check the order of the certificates in {path}"


def check_certificates(config: Config, now: datetime | None = None) -> Report:
    report = Report("Certificates")
    now = now or datetime.now(UTC)
    roots = trusted_roots(config)
    for name, hc in config.hosts.items():
        if not hc.certificate.exists() and not hc.key.exists():
            report.notes.append(f"{name}: no certificate yet; `parley serve` generates a self-signed one in "
                                f"{hc.certificate.parent} (get one from a certificate authority before going live)")
            continue
        try:
            chain = x509.load_pem_x509_certificates(hc.certificate.read_bytes())
        except (OSError, ValueError) as exc:
            report.problem(f"{name}: cannot read the certificate {hc.certificate}: {exc}",
                           "name a PEM certificate file (certificate = ...) the server's user can read")
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(hc.certificate, hc.key)
        except (ssl.SSLError, OSError) as exc:
            report.problem(f"{name}: the key {hc.key} does not go with {hc.certificate}: {exc}",
                           "name the private key of this certificate (key = ...)")
        leaf = chain[0]
        if leaf.not_valid_after_utc < now:
            report.problem(f"{name}: the certificate {hc.certificate} expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
                           "renew it (`certbot renew`), then `systemctl reload parley` or `parleyctl reload_config`")
        elif leaf.not_valid_after_utc < now + EXPIRY_WARNING:
            report.warning(f"{name}: the certificate {hc.certificate} expires on {leaf.not_valid_after_utc:%Y-%m-%d}",
                           "renew it soon, then reload the server (SIGHUP)")
        if leaf.not_valid_before_utc > now:
            report.problem(f"{name}: the certificate is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}",
                           "check this machine's clock, or wait")
        names = _names(leaf)
        missing = [domain for domain in [name, *services(hc, config)] if not covers(names, domain)]
        if missing:
            report.problem(f"{name}: the certificate {hc.certificate} is for {', '.join(names) or 'no name'}, not for "
                           f"{', '.join(missing)}", f"get one that names {', '.join(missing)} too (or *.{name})")
        chain_problem = _chain_problem(chain, roots, hc.certificate)
        if chain_problem is not None:
            report.problem(f"{name}: {chain_problem[0]}", chain_problem[1].replace("HOST", name))
    return report


# --- DNS --------------------------------------------------------------------------------------------------

def make_resolver(nameserver: str | None) -> dns.resolver.Resolver:
    """The system's resolver, or one that asks `nameserver` (ADDRESS or ADDRESS:PORT, [IPv6]:PORT)."""
    if nameserver is None:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    address, port = nameserver, 53
    if nameserver.startswith("["):
        address, _, rest = nameserver[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif nameserver.count(":") == 1:
        address, given = nameserver.split(":")
        port = int(given)
    resolver.nameservers, resolver.port = [address], port
    return resolver


def _public(name: str) -> bool:
    """Whether DNS can know the host: not localhost, not an address literal."""
    try:
        ipaddress.ip_address(name.strip("[]"))
        return False
    except ValueError:
        return name != "localhost" and not name.endswith(".localhost")


def _lookup(resolver: dns.resolver.Resolver, name: str, kind: str) -> list[str] | None:
    """The records (as text) of `name`; None when there are none."""
    try:
        answer = resolver.resolve(_ascii(name), kind, lifetime=DNS_LIFETIME, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        return None
    return [record.to_text() for record in answer]


def _addresses(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    return [*(_lookup(resolver, name, "A") or []), *(_lookup(resolver, name, "AAAA") or [])]


def _ports(config: Config, kind: str, tls: str | None) -> list[int]:
    return [lc.port for lc in config.listeners if lc.type == kind and (tls is None or lc.tls == tls)]


def check_dns(config: Config, resolver: dns.resolver.Resolver) -> Report:
    report = Report("DNS")
    wanted = [("_xmpp-client", _ports(config, "c2s", "starttls")), ("_xmpps-client", _ports(config, "c2s", "direct")),
              ("_xmpp-server", _ports(config, "s2s", None))]
    for host, hc in config.hosts.items():
        if not _public(host):
            report.notes.append(f"{host}: not a name DNS knows; not checked")
            continue
        try:
            for domain in [host, *services(hc, config)]:
                _check_domain(report, resolver, domain, wanted if domain == host else wanted[2:])
        except dns.exception.DNSException as exc:
            report.problem(f"{host}: DNS lookups fail: {exc}", "check this machine's resolver (or --nameserver)")
    return report


def _check_domain(report: Report, resolver: dns.resolver.Resolver, domain: str,
                  wanted: list[tuple[str, list[int]]]) -> None:
    """A domain's SRV records for the services Parley listens for, and where they point."""
    addresses = _addresses(resolver, domain)
    found_srv = False
    for service, ports in wanted:
        if not ports:
            continue
        name = f"{service}._tcp.{domain}"
        records = _lookup(resolver, name, "SRV")
        if records is None:
            record = f"{name}. 3600 IN SRV 0 5 {ports[0]} {domain}."
            if ports[0] == DEFAULT_PORTS[service] and addresses:
                report.warning(f"no SRV record {name}: found through {domain}'s address on the default port",
                               f"add `{record}` to the zone")
            else:
                report.problem(f"no SRV record {name}: nobody finds Parley's port {ports[0]}",
                               f"add `{record}` to the zone")
            continue
        found_srv = True
        for record in records:
            _, _, port, target = record.split()
            if target == ".":
                report.problem(f"{name} says there is no such service", f"replace it by `{name}. 3600 IN SRV 0 5 "
                                                                        f"{ports[0]} {domain}.`")
                continue
            if int(port) not in ports:
                report.problem(f"{name} points to port {port}, Parley listens on {', '.join(map(str, ports))}",
                               f"change the record's port to {ports[0]}, or the listener's port")
            if not _addresses(resolver, target.rstrip(".")):
                report.problem(f"{name} points to {target}, which has no A or AAAA record",
                               f"add `{target} 3600 IN A <this server's address>` (and AAAA for IPv6)")
    if not addresses and not found_srv:
        report.problem(f"{domain} has no A or AAAA record and no SRV record: it cannot be reached",
                       f"add `{domain}. 3600 IN A <this server's address>` (and AAAA), or SRV records")


# --- ports ------------------------------------------------------------------------------------------------

def check_ports(config: Config) -> Report:
    report = Report("Ports")
    if server_running(config):
        report.notes.append("the server is running (its control socket answers): its listeners hold the ports")
        return report
    for index, listener in enumerate(config.listeners):
        problem = bind_problem(listener)
        if problem is not None:
            report.problem(f"listeners[{index}] ({listener.type}) {listener.address}:{listener.port}: {problem[0]}",
                           problem[1])
    return report


def bind_problem(listener: ListenerConfig) -> tuple[str, str] | None:
    """Why the listener's address and port cannot be bound now, and the fix; None when they can."""
    try:
        infos = socket.getaddrinfo(listener.address, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the address does not resolve: {exc.strerror}", "name an address of this machine"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                probe.bind(address)
                probe.listen()
            except OSError as exc:
                return _bind_error(exc, listener.port)
    return None


def _bind_error(exc: OSError, port: int) -> tuple[str, str]:
    if exc.errno == errno.EADDRINUSE:
        return ("in use by another program", f"stop it (`ss -ltnp 'sport = :{port}'` names it) or change the "
                                              f"listener's port")
    if exc.errno == errno.EACCES:
        return ("ports below 1024 need a privilege", "give the server CAP_NET_BIND_SERVICE (the systemd unit's "
                                                     "AmbientCapabilities) or use a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this machine's", "name an address of this machine, or 0.0.0.0 / ::"
    return str(exc.strerror or exc), "check the listener's address and port"


def check(config: Config, resolver: dns.resolver.Resolver | None) -> list[Report]:
    """Every check after the configuration (which loaded): resolver None leaves DNS out."""
    reports = [check_certificates(config)]
    if resolver is not None:
        reports.append(check_dns(config, resolver))
    reports.append(check_ports(config))
    return reports
