"""The XEP-0060 protocol over the pubsub store, shared by PEP (every account) and pubsub.<host>.

`PubSubService` answers the pubsub and pubsub#owner iqs and sends the event notifications; what differs
between services is policy, which subclasses give: who may create nodes, who is an owner, the default
configuration, which access models exist (presence and roster need the owner's roster) and who else
hears about a node besides its subscribers (PEP: contacts advertising '+notify', XEP-0163).
Every operation takes the service's address, so one object serves all the accounts of a host.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.forms import find_form, form_type_of, read_form
from server.jid import JID, JIDError
from server.pubsub.config import NODE_CONFIG, PUBLISH_OPTIONS, ConfigError, NodeConfig
from server.stanza import Stanza, add_delay, element, parse_stored
from server.storage import RosterItem, StoredItem
from server.stream.errors import StanzaError
from server.stream.writer import serialize

if TYPE_CHECKING:
    from server.server import Server

PUBSUB = "http://jabber.org/protocol/pubsub"
OWNER = f"{PUBSUB}#owner"
EVENT = f"{PUBSUB}#event"
ERRORS = f"{PUBSUB}#errors"
PUBSUB_QUERY = ns.qname(PUBSUB, "pubsub")
OWNER_QUERY = ns.qname(OWNER, "pubsub")
AFFILIATIONS = ("owner", "publisher", "publish-only", "member", "none", "outcast")
# What a service built on this class implements, as XEP-0060 10 names the features (access models apart).
FEATURES = (
    "auto-create", "config-node", "config-node-max", "create-and-configure", "create-nodes", "delete-items",
    "delete-nodes", "item-ids", "last-published", "manage-subscriptions", "member-affiliation", "modify-affiliations",
    "multi-items", "outcast-affiliation", "persistent-items", "publish", "publish-options",
    "publisher-affiliation", "purge-nodes", "retract-items", "retrieve-affiliations", "retrieve-default",
    "retrieve-items", "retrieve-subscriptions", "subscribe",
)


def pubsub_error(condition: str, pubsub_condition: str | None = None, text: str | None = None,
                 feature: str | None = None) -> StanzaError:
    """A stanza error with XEP-0060's application-specific condition, e.g. precondition-not-met."""
    extra = None
    if pubsub_condition is not None:
        extra = Element(ns.qname(ERRORS, pubsub_condition), {"feature": feature} if feature else {})
    return StanzaError(condition, text, extra=extra)


def unsupported(feature: str) -> StanzaError:
    return pubsub_error("feature-not-implemented", "unsupported", f"{feature} is not supported", feature)


def is_true(value: str | None) -> bool:
    return value in ("1", "true")


class PubSubService:
    """XEP-0060 for one kind of service; subclasses override the policy methods below."""

    access_models: tuple[str, ...] = ("open", "whitelist")
    max_items = 256  # what 'max' means, and the most a node can keep

    def __init__(self, server: Server) -> None:
        self.server = server
        self.store = server.storage.pubsub

    # --- policy ---------------------------------------------------------------------------------------

    def default_config(self) -> NodeConfig:
        return NodeConfig()

    async def may_create(self, service: JID, requester: JID) -> bool:
        raise NotImplementedError

    async def stored_owner(self, service: JID, requester: JID) -> str | None:
        """Who is recorded as a new node's owner (None: ownership is implicit, as for PEP)."""
        return str(requester.bare)

    async def affiliation(self, service: JID, node: str, requester: JID) -> str:
        found = await self.store.affiliations(*self.key(service), node, str(requester.bare))
        return found[0][2] if found else "none"

    async def roster_item(self, service: JID, requester: JID) -> RosterItem | None:
        """The requester in the roster that presence and roster access models consult."""
        return None

    async def interested(self, service: JID, node: str) -> Iterable[JID]:
        """Who gets notifications besides the node's subscribers."""
        return ()

    # --- helpers --------------------------------------------------------------------------------------

    def features(self) -> list[str]:
        """The disco#info features of the service, exactly what this class implements."""
        return [PUBSUB, *(f"{PUBSUB}#{f}" for f in FEATURES),
                *(f"{PUBSUB}#access-{model}" for model in self.access_models)]

    @staticmethod
    def key(service: JID) -> tuple[str, str]:
        """The storage address of a service: (host, username) of a PEP account, (domain, '') otherwise."""
        return service.domain, service.local or ""

    async def config(self, service: JID, node: str) -> NodeConfig:
        stored = await self.store.node(*self.key(service), node)
        if stored is None:
            raise StanzaError("item-not-found", f"no node {node!r}")
        return NodeConfig.from_json(stored)

    async def may_access(self, service: JID, node: str, config: NodeConfig, requester: JID,
                         affiliation: str | None = None) -> bool:
        """XEP-0060 4.5: whether the access model lets `requester` subscribe and retrieve items."""
        if affiliation is None:
            affiliation = await self.affiliation(service, node, requester)
        if affiliation in ("owner", "publisher", "publish-only"):
            return True
        if affiliation == "outcast":
            return False
        model = config.access_model
        if model == "open":
            return True
        if model == "whitelist":
            return affiliation == "member"
        item = await self.roster_item(service, requester)
        if item is None:
            return False
        if model == "presence":
            return item.subscription in ("from", "both")
        return bool(set(item.groups) & set(config.roster_groups_allowed))

    async def check_access(self, service: JID, node: str, config: NodeConfig, requester: JID) -> str:
        """The requester's affiliation, or the error XEP-0060 6.5.9 gives when the access model refuses."""
        affiliation = await self.affiliation(service, node, requester)
        if await self.may_access(service, node, config, requester, affiliation):
            return affiliation
        if affiliation == "outcast":
            raise pubsub_error("forbidden")
        model = config.access_model
        if model == "presence":
            raise pubsub_error("not-authorized", "presence-subscription-required")
        if model == "roster":
            raise pubsub_error("not-authorized", "not-in-roster-group")
        raise pubsub_error("not-allowed", "closed-node")

    async def owner_only(self, service: JID, node: str, requester: JID) -> NodeConfig:
        config = await self.config(service, node)
        if await self.affiliation(service, node, requester) != "owner":
            raise pubsub_error("forbidden", text="only an owner of the node may do this")
        return config

    # --- dispatch -------------------------------------------------------------------------------------

    async def handle(self, stanza: Stanza, service: JID) -> Element | None:
        """Answer a pubsub or pubsub#owner iq to `service`; the result payload, or None for an empty result."""
        query = stanza.el[0]
        if not len(query):
            raise StanzaError("bad-request", "no pubsub verb")
        verb = query[0]
        name = verb.tag.split("}", 1)[1]
        requester = stanza.from_
        node = verb.get("node")
        owner_ns = query.tag == OWNER_QUERY
        handler = (self._OWNER if owner_ns else self._USER).get((stanza.type, name))
        if handler is None:
            raise unsupported(name)
        nodeless = ("default",) if owner_ns else ("create", "subscriptions", "affiliations")
        if not node and name not in nodeless:
            raise pubsub_error("bad-request", "nodeid-required")
        return await handler(self, service, requester, node, query)

    # --- subscriber use cases (XEP-0060 6) ------------------------------------------------------------

    async def _items(self, service: JID, requester: JID, node: str, query: Element) -> Element:
        config = await self.config(service, node)
        await self.check_access(service, node, config, requester)
        verb = query[0]
        ids = [i.get("id", "") for i in verb.iterfind(ns.qname(PUBSUB, "item"))] or None
        max_items = verb.get("max_items")
        try:
            last = int(max_items) if max_items is not None and ids is None else None
        except ValueError:
            raise StanzaError("bad-request", "max_items must be a number") from None
        items = await self.store.items(*self.key(service), node, ids, last)
        out = Element(PUBSUB_QUERY)
        container = SubElement(out, ns.qname(PUBSUB, "items"), {"node": node})
        for item in items:
            container.append(self.item_element(PUBSUB, item))
        return out

    async def _subscribe(self, service: JID, requester: JID, node: str, query: Element) -> Element:
        jid = self._jid_attr(query[0])
        if jid.bare != requester.bare:
            raise pubsub_error("bad-request", "invalid-jid")
        config = await self.config(service, node)
        await self.check_access(service, node, config, requester)
        subid = uuid.uuid4().hex
        await self.store.subscribe(*self.key(service), node, str(jid), subid, "subscribed")
        out = Element(PUBSUB_QUERY)
        SubElement(out, ns.qname(PUBSUB, "subscription"),
                   {"node": node, "jid": str(jid), "subid": subid, "subscription": "subscribed"})
        if config.send_last_published_item != "never":
            await self.send_last(service, node, config, jid)
        return out

    async def _unsubscribe(self, service: JID, requester: JID, node: str, query: Element) -> None:
        jid = self._jid_attr(query[0])
        await self.config(service, node)
        if jid.bare != requester.bare and await self.affiliation(service, node, requester) != "owner":
            raise pubsub_error("forbidden")
        if not await self.store.unsubscribe(*self.key(service), node, str(jid)):
            raise pubsub_error("unexpected-request", "not-subscribed")

    async def _subscriptions(self, service: JID, requester: JID, node: str | None, query: Element) -> Element:
        found = await self.store.subscriptions(*self.key(service), node or None)
        out = Element(PUBSUB_QUERY)
        container = SubElement(out, ns.qname(PUBSUB, "subscriptions"), {"node": node} if node else {})
        for name, jid, subid, state in found:
            if JID.parse(jid).bare == requester.bare:
                SubElement(container, ns.qname(PUBSUB, "subscription"),
                           {"node": name, "jid": jid, "subid": subid, "subscription": state})
        return out

    async def _affiliations(self, service: JID, requester: JID, node: str | None, query: Element) -> Element:
        out = Element(PUBSUB_QUERY)
        container = SubElement(out, ns.qname(PUBSUB, "affiliations"), {"node": node} if node else {})
        for name in [node] if node else sorted(await self.store.nodes(*self.key(service))):
            affiliation = await self.affiliation(service, name, requester)
            if affiliation != "none":
                SubElement(container, ns.qname(PUBSUB, "affiliation"), {"node": name, "affiliation": affiliation})
        return out

    # --- publisher use cases (XEP-0060 7) -------------------------------------------------------------

    async def _publish(self, service: JID, requester: JID, node: str, query: Element) -> Element:
        verb = query[0]
        items = verb.findall(ns.qname(PUBSUB, "item"))
        if len(items) > 1:
            raise pubsub_error("bad-request", "invalid-payload", "publish one item at a time")
        item = items[0] if items else Element(ns.qname(PUBSUB, "item"))
        if len(item) > 1:
            raise pubsub_error("bad-request", "invalid-payload", "an item has at most one payload")
        options = self._options(query, "publish-options", PUBLISH_OPTIONS)
        payload = item[0] if len(item) else None
        stored = await self.publish_item(service, requester, node, item.get("id"), payload, options,
                                         has_item=bool(items))
        await self.published(service, node, stored, payload)
        out = Element(PUBSUB_QUERY)
        SubElement(SubElement(out, ns.qname(PUBSUB, "publish"), {"node": node}), ns.qname(PUBSUB, "item"),
                   {"id": stored.id})
        return out

    async def publish_item(self, service: JID, requester: JID, node: str, item_id: str | None,
                           payload: Element | None, options: dict[str, list[str]] | None = None,
                           has_item: bool = True) -> StoredItem:
        """Publish as `requester` (a client, or a module on a user's behalf): check, store, notify."""
        config = await self._node_for_publish(service, requester, node, options)
        if not await self._may_publish(service, node, config, requester):
            raise pubsub_error("forbidden", text="not a publisher of this node")
        if config.deliver_payloads and payload is None and config.persist_items:
            raise pubsub_error("bad-request", "payload-required" if has_item else "item-required")
        stored = StoredItem(item_id or uuid.uuid4().hex, str(requester.bare), datetime.now(UTC),
                            serialize(payload) if payload is not None else "")
        limit = config.limit(self.max_items)
        if limit:
            await self.store.publish(*self.key(service), node, stored, limit)
        await self.notify(service, node, config, self._items_event(node, [self.item_element(EVENT, stored, config)]))
        return stored

    async def published(self, service: JID, node: str, item: StoredItem, payload: Element | None) -> None:
        """Called after a client's publication (not a module's), for services that react to some nodes."""

    async def _node_for_publish(self, service: JID, requester: JID, node: str,
                                options: dict[str, list[str]] | None) -> NodeConfig:
        """XEP-0060 7.1.5: the node's configuration if the options match it, auto-creating a missing node."""
        stored = await self.store.node(*self.key(service), node)
        if stored is None:
            if not await self.may_create(service, requester):
                raise StanzaError("item-not-found", f"no node {node!r}")
            config = self._configured(self.default_config(), options)
            owner = await self.stored_owner(service, requester)
            if await self.store.create(*self.key(service), node, config.to_json(), owner, datetime.now(UTC)):
                return config
            stored = await self.store.node(*self.key(service), node) or {}  # created meanwhile
        config = NodeConfig.from_json(stored)
        if options and not config.satisfies(options, self.access_models, self.max_items):
            raise pubsub_error("conflict", "precondition-not-met",
                               "the node's configuration does not match the publish options")
        return config

    async def _may_publish(self, service: JID, node: str, config: NodeConfig, requester: JID) -> bool:
        affiliation = await self.affiliation(service, node, requester)
        if affiliation in ("owner", "publisher", "publish-only"):
            return True
        if affiliation == "outcast":
            return False
        if config.publish_model == "open":
            return True
        if config.publish_model == "subscribers":
            return any(JID.parse(jid).bare == requester.bare
                       for _, jid, _, state in await self.store.subscriptions(*self.key(service), node)
                       if state == "subscribed")
        return False

    async def _retract(self, service: JID, requester: JID, node: str, query: Element) -> None:
        verb = query[0]
        ids = [i.get("id") or "" for i in verb.iterfind(ns.qname(PUBSUB, "item"))]
        if not ids or not all(ids):
            raise pubsub_error("bad-request", "item-required")
        gone = await self.retract_items(service, requester, node, ids, is_true(verb.get("notify")))
        if not gone:
            raise StanzaError("item-not-found", "no such item")
        await self.retracted(service, node, gone)

    async def retract_items(self, service: JID, requester: JID, node: str, ids: list[str],
                            notify: bool = False) -> list[str]:
        """Delete items as `requester` and tell subscribers if asked or configured; the ids that existed."""
        config = await self.config(service, node)
        if await self.affiliation(service, node, requester) not in ("owner", "publisher", "publish-only"):
            raise pubsub_error("forbidden")
        gone = await self.store.retract(*self.key(service), node, ids)
        if gone and (notify or config.notify_retract):
            retracts = [Element(ns.qname(EVENT, "retract"), {"id": id_}) for id_ in gone]
            await self.notify(service, node, config, self._items_event(node, retracts))
        return gone

    async def retracted(self, service: JID, node: str, ids: list[str]) -> None:
        """Called after a client's retraction, like `published`."""

    # --- owner use cases (XEP-0060 8) -----------------------------------------------------------------

    async def _create(self, service: JID, requester: JID, node: str | None, query: Element) -> Element | None:
        if not await self.may_create(service, requester):
            raise pubsub_error("forbidden", text="you may not create nodes here")
        if not node:  # instant nodes are not supported
            raise pubsub_error("not-acceptable", "nodeid-required")
        config = self._configured(self.default_config(), self._options(query, "configure", NODE_CONFIG))
        owner = await self.stored_owner(service, requester)
        if not await self.store.create(*self.key(service), node, config.to_json(), owner, datetime.now(UTC)):
            raise StanzaError("conflict", f"node {node!r} exists")
        return None

    async def _configure_get(self, service: JID, requester: JID, node: str, query: Element) -> Element:
        config = await self.owner_only(service, node, requester)
        out = Element(OWNER_QUERY)
        SubElement(out, ns.qname(OWNER, "configure"), {"node": node}).append(config.form(self.access_models))
        return out

    async def _configure_set(self, service: JID, requester: JID, node: str, query: Element) -> None:
        config = await self.owner_only(service, node, requester)
        form = find_form(query[0])
        if form is None:
            raise StanzaError("bad-request", "a configuration form is required")
        if form.get("type") == "cancel":
            return
        new = self._configured(config, self._form_values(form, NODE_CONFIG))
        await self.store.configure(*self.key(service), node, new.to_json(), new.limit(self.max_items))
        if new.notify_config:
            await self.notify(service, node, new, Element(ns.qname(EVENT, "configuration"), {"node": node}))

    async def _default(self, service: JID, requester: JID, node: str | None, query: Element) -> Element:
        out = Element(OWNER_QUERY)
        SubElement(out, ns.qname(OWNER, "default")).append(self.default_config().form(self.access_models))
        return out

    async def _delete(self, service: JID, requester: JID, node: str, query: Element) -> None:
        config = await self.owner_only(service, node, requester)
        recipients = await self.recipients(service, node, config) if config.notify_delete else []
        await self.store.delete_node(*self.key(service), node)
        await self.send_event(service, config, recipients, Element(ns.qname(EVENT, "delete"), {"node": node}))

    async def _purge(self, service: JID, requester: JID, node: str, query: Element) -> None:
        config = await self.owner_only(service, node, requester)
        await self.store.purge(*self.key(service), node)
        if config.notify_retract:
            await self.notify(service, node, config, Element(ns.qname(EVENT, "purge"), {"node": node}))

    async def _owner_subscriptions_get(self, service: JID, requester: JID, node: str, query: Element) -> Element:
        await self.owner_only(service, node, requester)
        out = Element(OWNER_QUERY)
        container = SubElement(out, ns.qname(OWNER, "subscriptions"), {"node": node})
        for _, jid, subid, state in await self.store.subscriptions(*self.key(service), node):
            SubElement(container, ns.qname(OWNER, "subscription"), {"jid": jid, "subid": subid, "subscription": state})
        return out

    async def _owner_subscriptions_set(self, service: JID, requester: JID, node: str, query: Element) -> None:
        await self.owner_only(service, node, requester)
        for sub in query[0].iterfind(ns.qname(OWNER, "subscription")):
            jid, state = self._jid_attr(sub), sub.get("subscription")
            if state == "none":
                await self.store.unsubscribe(*self.key(service), node, str(jid))
            elif state == "subscribed":
                await self.store.subscribe(*self.key(service), node, str(jid), uuid.uuid4().hex, state)
            else:
                raise StanzaError("bad-request", f"unsupported subscription state {state!r}")

    async def _owner_affiliations_get(self, service: JID, requester: JID, node: str, query: Element) -> Element:
        await self.owner_only(service, node, requester)
        out = Element(OWNER_QUERY)
        container = SubElement(out, ns.qname(OWNER, "affiliations"), {"node": node})
        for _, jid, aff in await self.store.affiliations(*self.key(service), node):
            SubElement(container, ns.qname(OWNER, "affiliation"), {"jid": jid, "affiliation": aff})
        return out

    async def _owner_affiliations_set(self, service: JID, requester: JID, node: str, query: Element) -> None:
        await self.owner_only(service, node, requester)
        changes = [(self._jid_attr(a).bare, a.get("affiliation") or "")
                   for a in query[0].iterfind(ns.qname(OWNER, "affiliation"))]
        if any(aff not in AFFILIATIONS for _, aff in changes):
            raise StanzaError("bad-request", "unknown affiliation")
        if any(jid == requester.bare and aff != "owner" for jid, aff in changes):
            raise StanzaError("not-acceptable", "an owner cannot change its own affiliation")
        for jid, aff in changes:
            await self.store.set_affiliation(*self.key(service), node, str(jid), aff)

    _USER = {
        ("get", "items"): _items,
        ("get", "subscriptions"): _subscriptions,
        ("get", "affiliations"): _affiliations,
        ("set", "publish"): _publish,
        ("set", "retract"): _retract,
        ("set", "subscribe"): _subscribe,
        ("set", "unsubscribe"): _unsubscribe,
        ("set", "create"): _create,
    }
    _OWNER = {
        ("get", "configure"): _configure_get,
        ("set", "configure"): _configure_set,
        ("get", "default"): _default,
        ("set", "delete"): _delete,
        ("set", "purge"): _purge,
        ("get", "subscriptions"): _owner_subscriptions_get,
        ("set", "subscriptions"): _owner_subscriptions_set,
        ("get", "affiliations"): _owner_affiliations_get,
        ("set", "affiliations"): _owner_affiliations_set,
    }

    # --- forms ----------------------------------------------------------------------------------------

    def _options(self, query: Element, tag: str, form_type: str) -> dict[str, list[str]] | None:
        """The submitted form in the `tag` sibling of the verb (publish-options, configure), if any."""
        holder = query.find(ns.qname(PUBSUB, tag))
        form = find_form(holder) if holder is not None else None
        return self._form_values(form, form_type) if form is not None else None

    @staticmethod
    def _form_values(form: Element, form_type: str) -> dict[str, list[str]]:
        if form_type_of(form) not in (None, form_type):
            raise StanzaError("bad-request", f"expected a {form_type} form")
        values = read_form(form)
        values.pop("FORM_TYPE", None)
        return values

    def _configured(self, base: NodeConfig, values: dict[str, list[str]] | None) -> NodeConfig:
        if not values:
            return base
        try:
            return base.apply(values, self.access_models, self.max_items)
        except ConfigError as exc:
            raise StanzaError("not-acceptable", str(exc)) from None

    @staticmethod
    def _jid_attr(el: Element) -> JID:
        try:
            return JID.parse(el.get("jid") or "")
        except JIDError:
            raise pubsub_error("bad-request", "invalid-jid") from None

    # --- notifications --------------------------------------------------------------------------------

    @staticmethod
    def item_element(namespace: str, item: StoredItem, config: NodeConfig | None = None) -> Element:
        """An <item/> in the pubsub or event namespace, with its payload unless the node withholds it."""
        el = Element(ns.qname(namespace, "item"), {"id": item.id})
        if item.payload and (config is None or config.deliver_payloads):
            el.append(parse_stored(item.payload))
        return el

    @staticmethod
    def _items_event(node: str, children: list[Element]) -> Element:
        items = Element(ns.qname(EVENT, "items"), {"node": node})
        items.extend(children)
        return items

    async def recipients(self, service: JID, node: str, config: NodeConfig) -> list[JID]:
        """Subscribers and interested entities the access model still admits, each once."""
        found: dict[JID, None] = {}
        for _, jid, _, state in await self.store.subscriptions(*self.key(service), node):
            if state == "subscribed":
                found[JID.parse(jid)] = None
        for jid in await self.interested(service, node):
            found[jid] = None
        return [jid for jid in found if await self.may_access(service, node, config, jid)]

    async def notify(self, service: JID, node: str, config: NodeConfig, event: Element) -> None:
        if config.deliver_notifications:
            await self.send_event(service, config, await self.recipients(service, node, config), event)

    async def send_event(self, service: JID, config: NodeConfig, recipients: Iterable[JID], event: Element,
                         delay: datetime | None = None) -> None:
        """A notification message with `event` inside <event/> to each recipient."""
        for jid in recipients:
            message = element("message", from_=str(service), to=str(jid), type=config.notification_type,
                              id=uuid.uuid4().hex)
            SubElement(message, ns.qname(EVENT, "event")).append(event)
            if delay is not None:
                add_delay(message, str(service), delay)
            await self.server.router.send(message)

    async def send_last(self, service: JID, node: str, config: NodeConfig, to: JID) -> None:
        """XEP-0060 6.1.7: the newest item, stamped with when it was published."""
        last = await self.store.items(*self.key(service), node, last=1)
        if last:
            event = self._items_event(node, [self.item_element(EVENT, last[0], config)])
            await self.send_event(service, config, [to], event, last[0].stamp)
