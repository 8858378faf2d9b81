"""Server Dialback (XEP-0220): keys, and the <db:result/> and <db:verify/> elements.

Dialback elements are written by hand with the conventional `db:` prefix (declared in our stream headers)
because some servers, ejabberd among them, recognise them only by that prefix.
"""

from __future__ import annotations

import hashlib
import hmac
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.stream.writer import escape_attr, escape_text

NS = "jabber:server:dialback"
FEATURE_NS = "urn:xmpp:features:dialback"
RESULT = ns.qname(NS, "result")
VERIFY = ns.qname(NS, "verify")
DECLARATION = f'xmlns:db="{NS}"'  # for stream headers: announces dialback (XEP-0220 2.4.1)


def make_key(secret: bytes, receiving: str, originating: str, stream_id: str) -> str:
    """XEP-0220 2.3: only the originating domain's server, which knows `secret`, can produce it."""
    message = f"{receiving} {originating} {stream_id}".encode()
    return hmac.new(hashlib.sha256(secret).digest(), message, hashlib.sha256).hexdigest()


def key_valid(secret: bytes, receiving: str, originating: str, stream_id: str, key: str) -> bool:
    return hmac.compare_digest(make_key(secret, receiving, originating, stream_id), key.strip())


def element(name: str, from_: str, to: str, *, type: str | None = None, id: str | None = None,
            key: str | None = None, error: str | None = None) -> str:
    """A `db:result` or `db:verify` element; `error` is a stanza error condition for type 'error'."""
    attrs = f'from="{escape_attr(from_)}" to="{escape_attr(to)}"'
    if id is not None:
        attrs += f' id="{escape_attr(id)}"'
    if error is not None:
        type = "error"
    if type is not None:
        attrs += f' type="{type}"'
    if error is not None:
        body = f'<error type="cancel"><{error} xmlns="{ns.STANZAS_ERR}"/></error>'
    elif key is not None:
        body = escape_text(key)
    else:
        return f"<db:{name} {attrs}/>"
    return f"<db:{name} {attrs}>{body}</db:{name}>"


def error_condition(el: Element) -> str:
    """The stanza error condition inside a dialback element of type 'error'."""
    error = el.find(ns.qname(ns.CLIENT, "error"))
    if error is not None:
        for child in error:
            if child.tag.startswith("{" + ns.STANZAS_ERR + "}") and not child.tag.endswith("}text"):
                return child.tag.partition("}")[2]
    return "undefined-condition"


def feature() -> Element:
    """The stream feature for dialback with error handling (XEP-0220 2.4.2)."""
    el = Element(ns.qname(FEATURE_NS, "dialback"))
    SubElement(el, ns.qname(FEATURE_NS, "errors"))
    return el
