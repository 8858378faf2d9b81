"""Node configuration (XEP-0060 16.4 pubsub#node_config) and the publish-options preconditions of 7.1.5.

One `NodeConfig` type serves the configure form, the default form, auto-creation and the precondition
check, so what a client can set, what it can ask for in publish-options and what it reads back are the
same fields with the same value rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from xml.etree.ElementTree import Element

from server.forms import Field, build_form

NODE_CONFIG = "http://jabber.org/protocol/pubsub#node_config"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
ACCESS_MODELS = ("open", "presence", "roster", "whitelist")
PUBLISH_MODELS = ("publishers", "subscribers", "open")
SEND_LAST = ("never", "on_sub", "on_sub_and_presence")
NOTIFICATION_TYPES = ("headline", "normal")
MAX = "max"
TRUE, FALSE = frozenset({"1", "true"}), frozenset({"0", "false"})


class ConfigError(ValueError):
    """A field a client submitted is unknown or has a value the service does not accept."""


@dataclass(frozen=True)
class NodeConfig:
    """A leaf node's options; `max_items` None means 'max', the service's own limit."""

    title: str = ""
    type: str = ""
    access_model: str = "open"
    publish_model: str = "publishers"
    max_items: int | None = 1
    persist_items: bool = True
    deliver_notifications: bool = True
    deliver_payloads: bool = True
    notify_retract: bool = True
    notify_delete: bool = True
    notify_config: bool = False
    send_last_published_item: str = "on_sub_and_presence"
    roster_groups_allowed: tuple[str, ...] = ()
    notification_type: str = "headline"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "roster_groups_allowed": list(self.roster_groups_allowed)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeConfig:
        """Stored configuration; keys a later version dropped are ignored, new ones take their default."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "roster_groups_allowed" in values:
            values["roster_groups_allowed"] = tuple(values["roster_groups_allowed"])
        return cls(**values)

    def limit(self, service_max: int) -> int | None:
        """How many items the node keeps: none when not persistent, at most `service_max` for 'max'."""
        if not self.persist_items:
            return 0
        return service_max if self.max_items is None else self.max_items

    def apply(self, values: dict[str, list[str]], access_models: tuple[str, ...], service_max: int) -> NodeConfig:
        """This configuration with the submitted `values` (FORM_TYPE excluded) applied; ConfigError if invalid."""
        changes: dict[str, Any] = {}
        for var, given in values.items():
            name = var.removeprefix("pubsub#")
            if var == name or name not in _PARSERS:
                raise ConfigError(f"unsupported option {var}")
            try:
                changes[name] = _PARSERS[name](given, access_models, service_max)
            except (ValueError, IndexError):
                raise ConfigError(f"invalid value for {var}") from None
        return replace(self, **changes)

    def form(self, access_models: tuple[str, ...], type: str = "form") -> Element:
        """The configuration as a pubsub#node_config data form."""
        def flag(value: bool) -> tuple[str, ...]:
            return ("1" if value else "0",)

        return build_form(type, [
            Field("pubsub#title", "text-single", "A friendly name for the node", (self.title,)),
            Field("pubsub#type", "text-single", "The type of payload data", (self.type,)),
            Field("pubsub#access_model", "list-single", "Who may subscribe and retrieve items",
                  (self.access_model,), options=access_models),
            Field("pubsub#publish_model", "list-single", "Who may publish", (self.publish_model,),
                  options=PUBLISH_MODELS),
            Field("pubsub#max_items", "text-single", "Maximum number of items to keep",
                  (MAX if self.max_items is None else str(self.max_items),)),
            Field("pubsub#persist_items", "boolean", "Persist items", flag(self.persist_items)),
            Field("pubsub#deliver_notifications", "boolean", "Deliver event notifications",
                  flag(self.deliver_notifications)),
            Field("pubsub#deliver_payloads", "boolean", "Deliver payloads with notifications",
                  flag(self.deliver_payloads)),
            Field("pubsub#notify_retract", "boolean", "Notify subscribers when items are removed",
                  flag(self.notify_retract)),
            Field("pubsub#notify_delete", "boolean", "Notify subscribers when the node is deleted",
                  flag(self.notify_delete)),
            Field("pubsub#notify_config", "boolean", "Notify subscribers when the configuration changes",
                  flag(self.notify_config)),
            Field("pubsub#send_last_published_item", "list-single", "When to send the last published item",
                  (self.send_last_published_item,), options=SEND_LAST),
            Field("pubsub#roster_groups_allowed", "list-multi", "Roster groups allowed to subscribe",
                  self.roster_groups_allowed),
            Field("pubsub#notification_type", "list-single", "Message type of notifications",
                  (self.notification_type,), options=NOTIFICATION_TYPES),
        ], form_type=NODE_CONFIG)

    def satisfies(self, values: dict[str, list[str]], access_models: tuple[str, ...], service_max: int) -> bool:
        """XEP-0060 7.1.5: whether every publish option names this node's current value."""
        try:
            return self.apply(values, access_models, service_max) == self
        except ConfigError:
            return False


def _one(given: list[str]) -> str:
    if len(given) != 1:
        raise ValueError("one value expected")
    return given[0].strip()


def _choice(choices: tuple[str, ...]) -> Any:
    def parse(given: list[str], access_models: tuple[str, ...], service_max: int) -> str:
        value = _one(given)
        if value not in choices:
            raise ValueError(value)
        return value
    return parse


def _text(given: list[str], access_models: tuple[str, ...], service_max: int) -> str:
    return given[0] if given else ""


def _bool(given: list[str], access_models: tuple[str, ...], service_max: int) -> bool:
    value = _one(given).lower()
    if value not in TRUE | FALSE:
        raise ValueError(value)
    return value in TRUE


def _access(given: list[str], access_models: tuple[str, ...], service_max: int) -> str:
    return _choice(access_models)(given, access_models, service_max)


def _max_items(given: list[str], access_models: tuple[str, ...], service_max: int) -> int | None:
    value = _one(given)
    if value == MAX:
        return None
    number = int(value)
    if not 1 <= number <= service_max:
        raise ValueError(value)
    return number


def _groups(given: list[str], access_models: tuple[str, ...], service_max: int) -> tuple[str, ...]:
    return tuple(sorted(set(given)))


_PARSERS = {
    "title": _text,
    "type": _text,
    "access_model": _access,
    "publish_model": _choice(PUBLISH_MODELS),
    "max_items": _max_items,
    "persist_items": _bool,
    "deliver_notifications": _bool,
    "deliver_payloads": _bool,
    "notify_retract": _bool,
    "notify_delete": _bool,
    "notify_config": _bool,
    "send_last_published_item": _choice(SEND_LAST),
    "roster_groups_allowed": _groups,
    "notification_type": _choice(NOTIFICATION_TYPES),
}
