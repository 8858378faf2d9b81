"""Services: entities the server hosts at domains of their own (conference.<host>, pubsub.<host>).

A service is addressed as a host is: the router hands it every stanza to its domain or to an address under
it (a room, an occupant), and it answers iq gets and sets through handlers registered by (type, target,
payload) and the router's iq dispatch, as a host's modules do. It describes itself with disco identities
and features. What it sends goes through the router like any entity's stanza, so that the recipients'
hosts apply their inbound policy (blocking), and their sessions client state indication, stream
management and the cluster; one stanza for many recipients goes as a `Prepared` one to `Router.fan_out`.

In a cluster, a service whose entities keep state in memory (rooms) names the entity a stanza is for
(`owner_key`); the stanza is served on the member that owns that entity, which loads it when it takes it
over (`take`) and forgets it when it loses it (`lost`); see server/ownership.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.jid import JID
from server.module import IqHandler, IqHandlers
from server.ownership import Lease, placement_of
from server.router import payload_of, target_of
from server.stanza import KINDS, Stanza
from server.storage.engine import storage_condition
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.module import Identity
    from server.server import Server

log = logging.getLogger("parley.service")

INFO = ns.qname(ns.DISCO_INFO, "query")
ITEMS = ns.qname(ns.DISCO_ITEMS, "query")
# Where a service's iqs go: its domain ("host"), an entity of it such as a room ("bare"), or a resource
# of one, such as an occupant ("full").
TARGETS = ("host", "bare", "full")


def info_query(identities: Iterable[Identity], features: Iterable[str], node: str | None = None) -> Element:
    """A disco#info answer: the identities and features, sorted and without duplicates."""
    query = Element(INFO, {"node": node} if node else {})
    for identity in sorted(set(identities), key=lambda i: (i.category, i.type, i.name or "")):
        attrs = {"category": identity.category, "type": identity.type}
        if identity.name:
            attrs["name"] = identity.name
        SubElement(query, ns.qname(ns.DISCO_INFO, "identity"), attrs)
    for var in sorted(set(features)):
        SubElement(query, ns.qname(ns.DISCO_INFO, "feature"), {"var": var})
    return query


class Prepared:
    """A stanza serialized once, to be addressed to many (`Router.fan_out`): each recipient costs a string
    join instead of serializing; `el` is kept without 'to'.

    The 'to' attribute goes right after the element's name: `head` ends with its opening quote and `tail`
    starts with its closing one. (A placeholder character inside the text would not do: the writer replaces
    every character XML forbids, and any other could occur in the stanza itself.)
    """

    __slots__ = ("el", "head", "tail")

    def __init__(self, el: Element) -> None:
        el.attrib.pop("to", None)
        xml = serialize(el)
        name_end = next(i for i, c in enumerate(xml) if c in " />" and i > 0)
        self.head, self.tail = xml[:name_end] + ' to="', '"' + xml[name_end:]
        self.el = el

    def stanza(self) -> Stanza:
        """The stanza as the recipients' inbound policy sees it: its kind and sender, no 'to'."""
        return Stanza(self.el, KINDS[self.el.tag], JID.parse(self.el.get("from") or ""), None)

    def addressed(self, jid: JID) -> Element:
        """A copy of the element addressed to `jid`, for a recipient that is routed to one by one."""
        copy = Element(self.el.tag, self.el.attrib)
        copy.extend(self.el)
        copy.set("to", str(jid))
        return copy


class Service:
    """An addressable service. Subclasses serve what is not an iq with a registered handler in `stanza`,
    and may word their errors in `refuse` and extend the disco answers."""

    # In a cluster: seconds after which an owned entity nobody used is given up, None to keep it until the
    # service itself releases it (a room, when it empties).
    idle_release: float | None = None

    def __init__(self, server: Server, domain: str, identity: Identity, features: Iterable[str] = ()) -> None:
        self.server = server
        self.domain = domain
        self.jid = JID.make(None, domain)
        self.identities = [identity]
        self.features = [ns.DISCO_INFO, ns.DISCO_ITEMS, *features]
        self.iq_handlers = IqHandlers(TARGETS)
        self.iq("get", INFO, self.disco_info)
        self.iq("get", ITEMS, self.disco_items)
        self.placement = placement_of(server)  # None in a single process
        if self.placement is not None:
            self.placement.add(self)

    def owner_key(self, st: Stanza) -> str | None:
        """In a cluster, the entity under the service that `st` is for, served by its owner only; None
        (the default) for a stanza any member may serve."""
        return None

    async def take(self, lease: Lease) -> bool:
        """This member has just become the owner of the entity `lease.key`: load it. False when there is
        nothing to serve (no such entity)."""
        return True

    def lost(self, key: str) -> None:
        """This member no longer owns the entity `key`: it must stop serving it."""

    async def act(self, key: str, action: str, argument: str) -> None:
        """An operation on an entity, run by its owner (`Placement.act`: commands such as a room's destruction)."""
        raise NotImplementedError(action)

    async def stop(self) -> None:
        """In a cluster: give up the entities this member owns, when the module stops."""
        if self.placement is not None:
            await self.placement.remove(self)

    def iq(self, type: str, payload: str, handler: IqHandler, target: str = "host") -> None:
        """Serve iqs of `type` ('get' or 'set') to `target` (see TARGETS) whose child has tag `payload`."""
        self.iq_handlers.add(type, target, payload, handler)

    async def receive(self, st: Stanza) -> None:
        """Every stanza to the domain or an address under it (what the router calls): an iq get or set goes
        to its registered handler, anything else to `stanza`; a StanzaError raised on the way is the answer.
        In a cluster, a stanza for an entity owned elsewhere goes to its owner instead."""
        if self.placement is not None and not await self.placement.admit(self, st):
            return
        try:
            if st.kind == "iq" and st.type in ("get", "set"):
                handler = self.iq_handlers.get((st.type, target_of(st.to), payload_of(st)))
                if handler is not None:
                    await self.server.router.answer_iq(st, handler, self.refuse)
                    return
            await self.stanza(st)
        except StanzaError as exc:
            await self.refuse(st, exc)
        except Exception as exc:
            # As for a client's stanza (c2s): a storage failure (a full disk) is resource-constraint.
            log.exception("%s: error handling %r", self.domain, st)
            await self.refuse(st, StanzaError(storage_condition(exc) or "internal-server-error"))

    async def stanza(self, st: Stanza) -> None:
        """What no iq handler serves: an iq request or a message is refused, anything else ignored."""
        if st.kind == "message" or (st.kind == "iq" and st.type in ("get", "set")):
            raise StanzaError("service-unavailable")

    async def refuse(self, st: Stanza, error: StanzaError) -> None:
        """Answer `st` with `error` (errors are never answered)."""
        await self.server.router.bounce(st, error)

    async def disco_info(self, st: Stanza) -> Element:
        """XEP-0030 of the service's domain; a subclass that has nodes answers them first."""
        if st.el[0].get("node"):
            raise StanzaError("item-not-found", "no such node")
        return info_query(self.identities, self.features)

    async def disco_items(self, st: Stanza) -> Element:
        if st.el[0].get("node"):
            raise StanzaError("item-not-found", "no such node")
        return Element(ITEMS)
