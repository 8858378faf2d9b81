"""XEP-0202 Entity Time of the server, and the XEP-0082 timestamp format other modules share."""

from __future__ import annotations

from datetime import UTC, datetime
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.module import Module
from server.stanza import Stanza, xmpp_datetime

TIME = ns.qname(ns.TIME, "time")


def tzo(when: datetime) -> str:
    """The offset of an aware datetime from UTC as XEP-0082 writes it: '+02:00', '-05:30'."""
    minutes = int(when.utcoffset().total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


class Time(Module):
    name = "time"

    def setup(self) -> None:
        self.add_feature(ns.TIME)
        self.iq("get", TIME, self.entity_time)

    async def entity_time(self, stanza: Stanza) -> Element:
        now = datetime.now(UTC)
        answer = Element(TIME)
        SubElement(answer, ns.qname(ns.TIME, "tzo")).text = tzo(now.astimezone())
        SubElement(answer, ns.qname(ns.TIME, "utc")).text = xmpp_datetime(now)
        return answer
