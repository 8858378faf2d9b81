"""XEP-0115 Entity Capabilities of the server itself, announced in stream features.

A client that knows the verification string can skip a disco#info round trip to the server. The
string is computed from the very disco#info answer the disco module gives, so both always agree;
`verification_string` and `info_hash` work on any disco#info result, so they can check clients' caps too.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

from server import ns
from server.forms import FORM_TYPE, form_type_of, read_form
from server.module import Module
from server.stanza import Stanza

if TYPE_CHECKING:
    from extensions.disco import Disco
    from server.c2s import C2SConnection

NODE = "https://parley.example/caps"
HASH = "sha-1"
# XEP-0115 5.1 names hash functions as in the IANA registry (RFC 3279).
HASHES = {"sha-1": "sha1", "sha-224": "sha224", "sha-256": "sha256", "sha-384": "sha384", "sha-512": "sha512",
          "md5": "md5"}

# (category, type, xml:lang, name), as they enter the verification string.
CapsIdentity = tuple[str, str, str, str]


def verification_string(identities: Iterable[CapsIdentity], features: Iterable[str],
                        forms: Iterable[Element] = ()) -> str:
    """XEP-0115 5.1: the string S that is hashed into 'ver'.

    Extended forms (XEP-0128) without a hidden FORM_TYPE are ignored, as 5.4 asks of a recipient.
    """
    parts = [f"{c}/{t}/{lang}/{name}<" for c, t, lang, name in sorted(identities)]
    parts += [f"{var}<" for var in sorted(features)]
    typed = [(form_type, form) for form in forms if (form_type := form_type_of(form)) is not None]
    for form_type, form in sorted(typed, key=lambda pair: pair[0]):
        parts.append(f"{form_type}<")
        for var, values in sorted(read_form(form).items()):
            if var != FORM_TYPE:
                parts.append(f"{var}<")
                parts += [f"{value}<" for value in sorted(values)]
    return "".join(parts)


def info_hash(query: Element, algorithm: str = HASH) -> str:
    """The 'ver' of a disco#info result element, with `algorithm` named as in the 'hash' attribute."""
    identities = [
        (i.get("category", ""), i.get("type", ""), i.get(ns.LANG, ""), i.get("name", ""))
        for i in query.iterfind(ns.qname(ns.DISCO_INFO, "identity"))
    ]
    features = [f.get("var", "") for f in query.iterfind(ns.qname(ns.DISCO_INFO, "feature"))]
    forms = query.findall(ns.qname(ns.DATA_FORMS, "x"))
    digest = hashlib.new(HASHES[algorithm], verification_string(identities, features, forms).encode())
    return base64.b64encode(digest.digest()).decode()


class Caps(Module):
    name = "caps"
    depends = ("disco",)

    def setup(self) -> None:
        self._cached: tuple[tuple[object, ...], str] | None = None
        self.hook("c2s/features", self.features)
        self.hook("disco/info-node", self.node_info)

    @property
    def disco(self) -> Disco:
        return self.host.modules["disco"]  # type: ignore[return-value]

    def ver(self) -> str:
        """The hash of the host's disco#info; recomputed only when modules changed what it lists."""
        key = (*self.host.identities["host"], None, *self.host.features["host"])
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, info_hash(self.disco.info_query("host")))
        return self._cached[1]

    def features(self, conn: C2SConnection, features: Element, stage: str) -> None:
        features.append(Element(ns.qname(ns.CAPS, "c"), {"hash": HASH, "node": NODE, "ver": self.ver()}))

    async def node_info(self, stanza: Stanza, node: str) -> Element | None:
        if stanza.to.local is None and node == f"{NODE}#{self.ver()}":
            return self.disco.info_query("host", node)
        return None
