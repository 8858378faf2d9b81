"""Conversions between a user's profile formats: vcard-temp (XEP-0054), vCard4 (RFC 6351 in XML, XEP-0292)
and User Avatar (XEP-0084).

Clients of either generation read and write the same profile; these pure functions translate the fields
both formats have (name, nickname, birthday, e-mail, phone, URL, note, organisation, title, role, JID) and
carry the avatar between the vCard PHOTO and the avatar data and metadata nodes. Fields one format lacks
are kept as they were in the other, so a round trip through an older client loses nothing it did not show.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from xml.etree.ElementTree import Element, SubElement

from server import ns

VCARD4 = "urn:ietf:params:xml:ns:vcard-4.0"
AVATAR_DATA = "urn:xmpp:avatar:data"
AVATAR_METADATA = "urn:xmpp:avatar:metadata"


def _t(tag: str) -> str:
    return ns.qname(ns.VCARD, tag)


def _v4(tag: str) -> str:
    return ns.qname(VCARD4, tag)


# vcard-temp element -> (vCard4 property, value element); all single-text fields.
_SIMPLE = {
    "FN": ("fn", "text"),
    "NICKNAME": ("nickname", "text"),
    "BDAY": ("bday", "date"),
    "URL": ("url", "uri"),
    "NOTE": ("note", "text"),
    "TITLE": ("title", "text"),
    "ROLE": ("role", "text"),
}
_NAME_PARTS = (("FAMILY", "surname"), ("GIVEN", "given"), ("MIDDLE", "additional"), ("PREFIX", "prefix"),
               ("SUFFIX", "suffix"))
_TEMP_MAPPED = {*_SIMPLE, "N", "ORG", "EMAIL", "TEL", "JABBERID"}
_V4_MAPPED = {*(v for v, _ in _SIMPLE.values()), "n", "org", "email", "tel", "impp"}


@dataclass(frozen=True)
class Avatar:
    """An image with the id XEP-0084 gives it: the hex SHA-1 of its bytes."""

    type: str
    data: bytes

    @property
    def id(self) -> str:
        return hashlib.sha1(self.data).hexdigest()


def _text(el: Element | None, path: str) -> str | None:
    found = el.findtext(path) if el is not None else None
    return found.strip() if found and found.strip() else None


def temp_to_vcard4(temp: Element, current: Element | None = None) -> Element:
    """The vCard4 of a vcard-temp, keeping the properties of `current` that vcard-temp cannot express."""
    out = Element(_v4("vcard"))
    for tag, (prop, kind) in _SIMPLE.items():
        value = _text(temp, _t(tag))
        if value:
            SubElement(SubElement(out, _v4(prop)), _v4(kind)).text = value
    name = temp.find(_t("N"))
    if name is not None and any(_text(name, _t(part)) for part, _ in _NAME_PARTS):
        n = SubElement(out, _v4("n"))
        for part, prop in _NAME_PARTS:
            SubElement(n, _v4(prop)).text = _text(name, _t(part)) or ""
    org = _text(temp, f"{_t('ORG')}/{_t('ORGNAME')}")
    if org:
        SubElement(SubElement(out, _v4("org")), _v4("text")).text = org
    for email in temp.iterfind(_t("EMAIL")):
        address = _text(email, _t("USERID"))
        if address:
            SubElement(SubElement(out, _v4("email")), _v4("text")).text = address
    for tel in temp.iterfind(_t("TEL")):
        number = _text(tel, _t("NUMBER"))
        if number:
            SubElement(SubElement(out, _v4("tel")), _v4("uri")).text = f"tel:{number}"
    jid = _text(temp, _t("JABBERID"))
    if jid:
        SubElement(SubElement(out, _v4("impp")), _v4("uri")).text = f"xmpp:{jid}"
    if current is not None:
        out.extend(child for child in current if child.tag.split("}")[-1] not in _V4_MAPPED)
    return out


def vcard4_to_temp(vcard: Element, current: Element | None = None) -> Element:
    """The vcard-temp of a vCard4, keeping the elements of `current` (PHOTO, ADR...) vCard4 did not map."""
    out = Element(_t("vCard"))
    for tag, (prop, kind) in _SIMPLE.items():
        value = _text(vcard, f"{_v4(prop)}/{_v4(kind)}")
        if value:
            SubElement(out, _t(tag)).text = value
    n = vcard.find(_v4("n"))
    if n is not None:
        name = SubElement(out, _t("N"))
        for part, prop in _NAME_PARTS:
            SubElement(name, _t(part)).text = _text(n, _v4(prop)) or ""
    org = _text(vcard, f"{_v4('org')}/{_v4('text')}")
    if org:
        SubElement(SubElement(out, _t("ORG")), _t("ORGNAME")).text = org
    for email in vcard.iterfind(_v4("email")):
        address = _text(email, _v4("text"))
        if address:
            SubElement(SubElement(out, _t("EMAIL")), _t("USERID")).text = address
    for tel in vcard.iterfind(_v4("tel")):
        uri = _text(tel, _v4("uri")) or _text(tel, _v4("text"))
        if uri:
            SubElement(SubElement(out, _t("TEL")), _t("NUMBER")).text = uri.removeprefix("tel:")
    for impp in vcard.iterfind(_v4("impp")):
        uri = _text(impp, _v4("uri"))
        if uri and uri.startswith("xmpp:"):
            SubElement(out, _t("JABBERID")).text = uri.removeprefix("xmpp:")
            break
    if current is not None:
        out.extend(child for child in current if child.tag.split("}")[-1] not in _TEMP_MAPPED)
    return out


def photo_of(temp: Element) -> Avatar | None:
    """The vCard's embedded PHOTO; None when it has none (or only an external URI) or it is not base64."""
    photo = temp.find(_t("PHOTO"))
    binval = _text(photo, _t("BINVAL"))
    if binval is None:
        return None
    try:
        data = base64.b64decode("".join(binval.split()), validate=True)
    except binascii.Error:
        return None
    return Avatar(_text(photo, _t("TYPE")) or "image/png", data) if data else None


def with_photo(temp: Element, avatar: Avatar | None) -> Element:
    """A copy of the vCard whose PHOTO is `avatar` (none at all for None)."""
    out = Element(temp.tag, dict(temp.attrib))
    out.extend(child for child in temp if child.tag != _t("PHOTO"))
    if avatar is not None:
        photo = SubElement(out, _t("PHOTO"))
        SubElement(photo, _t("TYPE")).text = avatar.type
        SubElement(photo, _t("BINVAL")).text = base64.b64encode(avatar.data).decode()
    return out


def avatar_data(avatar: Avatar) -> Element:
    data = Element(ns.qname(AVATAR_DATA, "data"))
    data.text = base64.b64encode(avatar.data).decode()
    return data


def avatar_metadata(avatar: Avatar | None) -> Element:
    """XEP-0084 metadata with one info for `avatar`; empty metadata says the avatar is disabled."""
    metadata = Element(ns.qname(AVATAR_METADATA, "metadata"))
    if avatar is not None:
        SubElement(metadata, ns.qname(AVATAR_METADATA, "info"),
                   {"bytes": str(len(avatar.data)), "id": avatar.id, "type": avatar.type})
    return metadata


def embedded_info(metadata: Element) -> tuple[str, str] | None:
    """(id, type) of the metadata's image stored in the data node, not one at an external URL."""
    for info in metadata.iterfind(ns.qname(AVATAR_METADATA, "info")):
        if not info.get("url") and info.get("id"):
            return info.get("id", ""), info.get("type") or "image/png"
    return None


def decode_data(data: Element | None) -> bytes | None:
    if data is None or not data.text:
        return None
    try:
        return base64.b64decode("".join(data.text.split()), validate=True)
    except binascii.Error:
        return None
