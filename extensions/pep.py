"""XEP-0163 Personal Eventing Protocol: every account's bare JID is a pubsub service owned by the account.

The protocol is the shared XEP-0060 core (`server.pubsub`); this module adds PEP's policy: only the owner
creates and publishes (nodes are auto-created on first publish, presence access by default), the access
models presence and roster read the owner's roster, and notifications go, besides explicit subscribers,
to every available resource that advertises '<node>+notify' in its entity capabilities (XEP-0115) and
may access the node: the owner's own resources and contacts whose presence reached the owner.

To know who those are, the module watches available presence arriving at the owner (contacts) and
sent by the owner (its resources), resolves the caps hash with a disco#info query when it is unknown,
verifies it (XEP-0115 5.4) and caches it, in memory and in the host's key-value store. A resource that
becomes available or starts advertising '+notify' gets the node's last item (XEP-0163 4.3.4).

In a cluster, the presence that tells the service who is there is seen on the member where it was routed:
the contact's (or the owner's resource's). So each member knows the interested resources of its own users,
and a notification published on one member goes to the others (frame kind "pep/HOST"), each of which sends
it to the interested resources it knows of (the node's subscribers have had theirs from the publisher's).
Modules that mirror PEP data in older protocols hook 'pep/published' (owner, node, item, payload) and
'pep/retracted' (owner, node, item ids), fired after a client's publication or retraction, and act on a
user's behalf with `service.publish_item` and `service.retract_items`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from typing import cast
from xml.etree.ElementTree import Element, SubElement

from extensions.caps import HASHES, info_hash
from extensions.roster import Roster
from server import ns
from server.jid import JID
from server.module import Module
from server.pubsub import OWNER_QUERY, PUBSUB, PUBSUB_QUERY, NodeConfig, PubSubService
from server.sessions import Session
from server.stanza import Stanza, element, parse_stored
from server.storage import RosterItem, StoredItem
from server.stream.errors import StanzaError
from server.stream.writer import serialize

CAPS = ns.qname(ns.CAPS, "c")
INFO = ns.qname(ns.DISCO_INFO, "query")
NOTIFY = "+notify"
CAPS_STORE = "caps"  # host-level key-value store: '<hash> <ver>' -> verified features
QUERY_TIMEOUT = 30.0
PEP_FEATURES = ("auto-subscribe", "filtered-notifications", "presence-notifications")


class PepService(PubSubService):
    access_models = ("open", "presence", "roster", "whitelist")

    def __init__(self, module: Pep) -> None:
        super().__init__(module.server)
        self.module = module

    def default_config(self) -> NodeConfig:
        return NodeConfig(access_model="presence")

    def features(self) -> list[str]:
        return [*super().features(), *(f"{PUBSUB}#{f}" for f in PEP_FEATURES)]

    async def may_create(self, service: JID, requester: JID) -> bool:
        return requester.bare == service

    async def stored_owner(self, service: JID, requester: JID) -> str | None:
        return None  # the account owns all its nodes

    async def affiliation(self, service: JID, node: str, requester: JID) -> str:
        if requester.bare == service:
            return "owner"
        return await super().affiliation(service, node, requester)

    async def roster_item(self, service: JID, requester: JID) -> RosterItem | None:
        return await self.module.roster.item(service, requester.bare)

    async def published(self, service: JID, node: str, item: StoredItem, payload: Element | None) -> None:
        """Tell modules that convert between PEP and older protocols (vCard avatars, bookmarks)."""
        await self.module.host.hooks.fire("pep/published", service, node, item, payload)

    async def retracted(self, service: JID, node: str, ids: list[str]) -> None:
        await self.module.host.hooks.fire("pep/retracted", service, node, ids)

    async def interested(self, service: JID, node: str) -> Iterable[JID]:
        wanted = node + NOTIFY
        return [jid for jid, features in self.module.seen.get(service, {}).items() if wanted in features]

    async def notify(self, service: JID, node: str, config: NodeConfig, event: Element) -> None:
        """Here, then on every other member of a cluster, for the interested resources each one knows."""
        await super().notify(service, node, config, event)
        cluster = self.server.cluster
        if cluster is None or not config.deliver_notifications:
            return
        subscribers = [jid for _, jid, _, state in await self.store.subscriptions(*self.key(service), node)
                       if state == "subscribed"]
        payload = json.dumps({"service": str(service), "node": node, "config": config.to_json(),
                              "event": serialize(event), "notified": subscribers})
        for member in cluster.members():
            if member != cluster.member:
                cluster.send(member, self.module.frame_kind, payload)

    async def notify_here(self, payload: str) -> None:
        """Another member's notification, to the interested resources this member knows of."""
        data = json.loads(payload)
        service, node = JID.parse(data["service"]), data["node"]
        config = NodeConfig.from_json(data["config"])
        notified = set(data["notified"])
        recipients = [jid for jid in await self.interested(service, node)
                      if str(jid) not in notified and await self.may_access(service, node, config, jid)]
        if recipients:
            await self.send_event(service, config, recipients, parse_stored(data["event"]))


class Pep(Module):
    name = "pep"
    depends = ("roster", "disco")

    def setup(self) -> None:
        self.service = PepService(self)
        # owner -> available full JIDs whose presence the owner's service saw -> their caps features
        self.seen: dict[JID, dict[JID, frozenset[str]]] = {}
        self.caps: dict[tuple[str, str], frozenset[str]] = {}
        self._lookups: dict[tuple[str, str], asyncio.Future[frozenset[str] | None]] = {}
        self._queries: dict[str, asyncio.Future[Element]] = {}
        self.add_identity("pubsub", "pep", target="account")
        for feature in self.service.features():
            self.add_feature(feature, target="account")
        for type_ in ("get", "set"):
            self.iq(type_, PUBSUB_QUERY, self.handle, target="account")
            self.iq(type_, OWNER_QUERY, self.handle, target="account")
        self.hook("presence/inbound", self.contact_presence)
        self.hook("presence/self", self.own_presence, priority=150)
        self.hook("session/closed", self.session_closed)
        self.hook("iq-result/host", self.answer)
        self.hook("iq-error/host", self.answer)
        self.hook("disco/account-items", self.list_nodes)
        self.frame_kind = f"pep/{self.host.name}"
        if self.server.cluster is not None:
            self.server.cluster.on(self.frame_kind, self.from_member)

    async def from_member(self, sender: str, payload: str) -> None:
        await self.service.notify_here(payload)

    @property
    def roster(self) -> Roster:
        return cast(Roster, self.host.modules["roster"])

    async def handle(self, stanza: Stanza) -> Element | None:
        service = stanza.to.bare
        if stanza.from_.bare != service and \
                not await self.server.storage.accounts.exists(service.domain, service.local or ""):
            raise StanzaError("service-unavailable")
        return await self.service.handle(stanza, service)

    async def list_nodes(self, stanza: Stanza, query: Element) -> None:
        """XEP-0060 5.2 on the account: the nodes the requester may access."""
        owner = stanza.to.bare
        for node, stored in sorted((await self.server.storage.pubsub.nodes(*self.service.key(owner))).items()):
            if await self.service.may_access(owner, node, NodeConfig.from_json(stored), stanza.from_):
                SubElement(query, ns.qname(ns.DISCO_ITEMS, "item"), {"jid": str(owner), "node": node})

    # --- who is online, with which caps -----------------------------------------------------------

    async def contact_presence(self, stanza: Stanza) -> None:
        """Available presence reaching an account tells its service that a contact's resource is there."""
        if stanza.from_.resource is None:
            return
        if stanza.type is None:
            self._arrived(stanza.to.bare, stanza.from_, stanza.el)
        elif stanza.type == "unavailable":
            self._forget(stanza.to.bare, stanza.from_)

    async def own_presence(self, stanza: Stanza) -> None:
        session = stanza.origin
        if session is None:
            return
        if stanza.type is None:
            self._arrived(session.bare, session.jid, stanza.el)
        elif stanza.type == "unavailable":
            self._forget(session.bare, session.jid)

    def session_closed(self, session: Session) -> None:
        self._forget(session.bare, session.jid)

    def _forget(self, owner: JID, full: JID) -> None:
        known = self.seen.get(owner)
        if known is not None:
            known.pop(full, None)
            if not known:
                del self.seen[owner]

    def _arrived(self, owner: JID, full: JID, presence: Element) -> None:
        """Note the resource now, resolve its caps in the background (a disco#info round trip at worst)."""
        if presence.find(CAPS) is None:
            # No caps, no features (what _learn would find): no task for each presence of a plain client.
            self.seen.setdefault(owner, {})[full] = frozenset()
            return
        self.seen.setdefault(owner, {}).setdefault(full, frozenset())
        self.spawn(self._learn(owner, full, presence))

    async def _learn(self, owner: JID, full: JID, presence: Element) -> None:
        """Record the resource's features; send the last items of nodes it newly wants."""
        features = await self.features_of(full, presence.find(CAPS))
        known = self.seen.get(owner)
        if known is None or full not in known:
            return  # gone meanwhile
        before = known[full]
        known[full] = features
        wanted = {f.removesuffix(NOTIFY) for f in features - before if f.endswith(NOTIFY)}
        if not wanted:
            return
        service = self.service
        for node, stored in (await self.server.storage.pubsub.nodes(*service.key(owner))).items():
            config = NodeConfig.from_json(stored)
            if node in wanted and config.send_last_published_item == "on_sub_and_presence" \
                    and config.deliver_notifications and await service.may_access(owner, node, config, full):
                await service.send_last(owner, node, config, full)

    # --- XEP-0115 caps cache ------------------------------------------------------------------------

    async def features_of(self, full: JID, caps: Element | None) -> frozenset[str]:
        """The features of a resource advertising `caps`, from the cache or by asking it."""
        if caps is None or caps.get("hash") not in HASHES or not caps.get("ver") or not caps.get("node"):
            return frozenset()  # no caps, or legacy caps without a verifiable hash
        key = (caps.get("hash", ""), caps.get("ver", ""))
        if key in self.caps:
            return self.caps[key]
        pending = self._lookups.get(key)
        if pending is not None:  # someone is asking already: one query per hash
            return await asyncio.shield(pending) or frozenset()
        pending = self._lookups[key] = asyncio.get_running_loop().create_future()
        found = None
        try:
            found = await self._resolve(full, caps.get("node", ""), *key)
        except Exception:
            self.log.debug("caps of %s could not be resolved", full, exc_info=True)
        finally:
            del self._lookups[key]
            pending.set_result(found)
        return found or frozenset()

    async def _resolve(self, full: JID, node: str, hash_: str, ver: str) -> frozenset[str]:
        """Stored verified features, else the resource's disco#info, cached only if its hash matches 'ver'.

        XEP-0115 5.4 forbids caching a result that fails verification, not using it for the resource that
        gave it: some clients (slixmpp while plugins load) answer with more features than they hashed.
        """
        kv = self.server.storage.kv
        stored = await kv.get(self.host.name, "", CAPS_STORE, f"{hash_} {ver}")
        if stored is None:
            query = await self._disco(full, f"{node}#{ver}")
            features = frozenset(f.get("var", "") for f in query.iterfind(ns.qname(ns.DISCO_INFO, "feature")))
            if info_hash(query, hash_) != ver:
                self.log.info("disco#info of %s does not match its caps hash %s; not cached", full, ver)
                return features
            stored = sorted(features)
            await kv.set(self.host.name, "", CAPS_STORE, f"{hash_} {ver}", stored)
        features = self.caps[(hash_, ver)] = frozenset(stored)
        return features

    async def _disco(self, to: JID, node: str) -> Element:
        iq_id = f"pep-{uuid.uuid4().hex}"
        iq = element("iq", type="get", id=iq_id, from_=self.host.name, to=str(to))
        iq.append(Element(INFO, {"node": node}))
        answer = self._queries[iq_id] = asyncio.get_running_loop().create_future()
        try:
            await self.server.router.send(iq)
            result = await asyncio.wait_for(answer, QUERY_TIMEOUT)
        finally:
            self._queries.pop(iq_id, None)
        query = result.find(INFO)
        if result.get("type") != "result" or query is None:
            raise LookupError(f"disco#info of {to} failed")
        return query

    def answer(self, stanza: Stanza) -> bool | None:
        """The answer to one of our disco#info queries."""
        pending = self._queries.get(stanza.id or "")
        if pending is None:
            return None
        if not pending.done():
            pending.set_result(stanza.el)
        return True
