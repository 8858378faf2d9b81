"""XEP-0045 Multi-User Chat: the module 'muc' is the Muc class of service.py; each part of a room's
protocol has its own file (presence, messages, owner, disco...) around the state kept in room.py."""

from extensions.muc.service import Muc

__all__ = ["Muc"]
