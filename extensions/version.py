"""XEP-0092 Software Version of the server.

The operating system is left out unless the operator opts in (option 'show_os'), because it helps
attackers more than it helps users.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.module import Module
from server.options import Option
from server.stanza import Stanza

QUERY = ns.qname(ns.VERSION, "query")
SOFTWARE = "Parley"


def parley_version() -> str:
    """The installed package's version; a source checkout that was never installed has none."""
    try:
        return version("parley")
    except PackageNotFoundError:
        return "unknown"


class Version(Module):
    name = "version"
    options = (Option("show_os", bool, False, "tell who asks the server's operating system and its version"),)

    def setup(self) -> None:
        self.add_feature(ns.VERSION)
        self.iq("get", QUERY, self.software_version)

    async def software_version(self, stanza: Stanza) -> Element:
        query = Element(QUERY)
        SubElement(query, ns.qname(ns.VERSION, "name")).text = SOFTWARE
        SubElement(query, ns.qname(ns.VERSION, "version")).text = parley_version()
        if self.option("show_os"):
            SubElement(query, ns.qname(ns.VERSION, "os")).text = f"{platform.system()} {platform.release()}"
        return query
