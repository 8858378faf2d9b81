"""Publish-subscribe (XEP-0060) shared by PEP on accounts and the pubsub.<host> service."""

from server.pubsub.config import NodeConfig
from server.pubsub.service import EVENT, OWNER, OWNER_QUERY, PUBSUB, PUBSUB_QUERY, PubSubService, pubsub_error

__all__ = ["EVENT", "OWNER", "OWNER_QUERY", "PUBSUB", "PUBSUB_QUERY", "NodeConfig", "PubSubService", "pubsub_error"]
