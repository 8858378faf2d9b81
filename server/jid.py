"""XMPP addresses (RFC 7622): parsing, preparation and comparison.

JIDs are parsed on every stanza, so parsing is memoised and a JID keeps its canonical string.
Two JIDs are equal exactly when their prepared parts are equal.
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from typing import Any

import idna
import precis_i18n

_USERNAME = precis_i18n.get_profile("UsernameCaseMapped")
_OPAQUE = precis_i18n.get_profile("OpaqueString")

# RFC 7622 3.3.1: characters the localpart forbids on top of the PRECIS profile.
_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
# Dots that IDNA treats as label separators (RFC 3490 3.1).
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_MAX_PART = 1023
_CACHE_SIZE = 65536


class JIDError(ValueError):
    """A string is not a valid JID, or a part fails preparation."""


def _check_length(part: str, what: str) -> None:
    size = len(part.encode("utf-8"))
    if size == 0:
        raise JIDError(f"empty {what}")
    if size > _MAX_PART:
        raise JIDError(f"{what} longer than {_MAX_PART} bytes")


def prepare_local(local: str) -> str:
    """Enforce UsernameCaseMapped plus the RFC 7622 extra forbidden characters."""
    if not local:
        raise JIDError("empty localpart")
    try:
        prepared = _USERNAME.enforce(local)
    except UnicodeError as exc:
        raise JIDError(f"invalid localpart: {_reason(exc)}") from None
    bad = _LOCAL_FORBIDDEN.intersection(prepared)
    if bad:
        raise JIDError(f"localpart contains forbidden character {min(bad)!r}")
    _check_length(prepared, "localpart")
    return prepared


def prepare_resource(resource: str) -> str:
    """Enforce OpaqueString: resources keep their case but must be valid Unicode text."""
    if not resource:
        raise JIDError("empty resourcepart")
    try:
        prepared = _OPAQUE.enforce(resource)
    except UnicodeError as exc:
        raise JIDError(f"invalid resourcepart: {_reason(exc)}") from None
    _check_length(prepared, "resourcepart")
    return prepared


def prepare_domain(domain: str) -> str:
    """Map a domainpart to the canonical U-label form so that equal domains compare equal."""
    domain = domain.translate(_DOTS)
    if domain.endswith("."):
        domain = domain[:-1]
    _check_length(domain, "domainpart")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise JIDError("unterminated IPv6 literal in domainpart")
        try:
            ipaddress.IPv6Address(domain[1:-1])
        except ValueError:
            raise JIDError("invalid IPv6 literal in domainpart") from None
        return domain
    try:
        ipaddress.IPv4Address(domain)
    except ValueError:
        pass
    else:
        return domain
    domain = unicodedata.normalize("NFC", _map_width(domain).lower())
    labels = [_prepare_label(label) for label in domain.split(".")]
    prepared = ".".join(labels)
    _check_length(prepared, "domainpart")
    return prepared


def _prepare_label(label: str) -> str:
    if not label:
        raise JIDError("empty label in domainpart")
    if label.isascii():
        if not _LDH.issuperset(label):
            bad = min(set(label) - _LDH)
            raise JIDError(f"domainpart contains invalid character {bad!r}")
        if label[0] == "-" or label[-1] == "-":
            raise JIDError("domain label starts or ends with a hyphen")
        if len(label) > 63:
            raise JIDError("domain label longer than 63 octets")
        if not label.startswith("xn--"):
            return label
    try:
        ulabel = idna.ulabel(label)
        if label.isascii():
            # An A-label's U-label is mapped as a typed one is, so that both forms prepare alike and what
            # this returns prepares to itself.
            mapped = unicodedata.normalize("NFC", _map_width(ulabel).lower())
            if mapped != ulabel:
                ulabel = idna.ulabel(mapped)
        alabel = idna.alabel(ulabel)
    except (idna.IDNAError, UnicodeError) as exc:
        raise JIDError(f"invalid internationalised domain label: {exc}") from None
    if len(alabel) > 63:
        raise JIDError("domain label longer than 63 octets")
    return ulabel


def _map_width(text: str) -> str:
    """RFC 7622 3.2.2: fullwidth and halfwidth characters map to their decompositions."""
    if text.isascii():
        return text
    return "".join(
        unicodedata.normalize("NFKC", ch) if unicodedata.decomposition(ch).startswith(("<wide>", "<narrow>"))
        else ch
        for ch in text
    )


def _reason(exc: UnicodeError) -> str:
    return getattr(exc, "reason", None) or str(exc)


class JID:
    """An immutable, prepared XMPP address; build one with JID.parse or JID.make."""

    __slots__ = ("local", "domain", "resource", "_str")  # noqa: RUF023 - reads in address order

    local: str | None
    domain: str
    resource: str | None
    _str: str

    def __init__(self, *_: Any, **__: Any) -> None:
        raise TypeError("use JID.parse() or JID.make()")

    @staticmethod
    def parse(text: str) -> JID:
        """Parse and prepare a JID string (RFC 7622 3.1); repeated strings are a cache hit."""
        return _parse(text)

    @staticmethod
    def make(local: str | None, domain: str, resource: str | None = None) -> JID:
        """Prepare each part; None means the part is absent, while '' is an error."""
        return _make(local, domain, resource)

    @property
    def bare(self) -> JID:
        if self.resource is None:
            return self
        return _build_cached(self.local, self.domain, None)

    @property
    def is_bare(self) -> bool:
        return self.resource is None

    @property
    def is_host(self) -> bool:
        return self.local is None and self.resource is None

    def with_resource(self, resource: str | None) -> JID:
        """This JID with another resourcepart (None gives the bare JID)."""
        if resource is None:
            return self.bare
        return _build_cached(self.local, self.domain, prepare_resource(resource))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("JID is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("JID is immutable")

    def __reduce__(self) -> tuple[Any, tuple[str | None, str, str | None]]:
        # The default slot-restoring pickle path would go through __setattr__.
        return _build, (self.local, self.domain, self.resource)

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return f"JID({self._str!r})"

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, JID):
            return NotImplemented
        # The canonical string is injective over prepared (local, domain, resource): no part may hold
        # the separator that precedes it, so comparing it compares the parts.
        return self._str == other._str

    def __hash__(self) -> int:
        return hash(self._str)


def _build(local: str | None, domain: str, resource: str | None) -> JID:
    """Assemble a JID from parts that are already prepared."""
    jid = object.__new__(JID)
    text = domain if local is None else f"{local}@{domain}"
    if resource is not None:
        text = f"{text}/{resource}"
    object.__setattr__(jid, "local", local)
    object.__setattr__(jid, "domain", domain)
    object.__setattr__(jid, "resource", resource)
    object.__setattr__(jid, "_str", text)
    return jid


# For parts that are already prepared (bare, with_resource): hot paths get the same object back.
_build_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_build)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _make(local: str | None, domain: str, resource: str | None) -> JID:
    return _build(
        None if local is None else prepare_local(local),
        prepare_domain(domain),
        None if resource is None else prepare_resource(resource),
    )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse(text: str) -> JID:
    rest, slash, resource = text.partition("/")
    local, at, domain = rest.partition("@")
    if not at:
        local, domain = "", rest
    if not domain:
        raise JIDError("empty domainpart")
    if at and not local:
        raise JIDError("empty localpart")
    if slash and not resource:
        raise JIDError("empty resourcepart")
    return _make(local if at else None, domain, resource if slash else None)
