"""Federation policy: which domains we talk to, and how much we demand of their certificates.

Besides the configured lists, admins add domains at runtime (XEP-0133) and modules load deny-lists from
files or URLs (LOADED). A domain listed in `allow`, `deny` or `accept_self_signed` covers its subdomains
too, so that a rule for a server also applies to its services (conference.example.org goes with example.org).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from server.commands import Arg, CommandError, Context, Declarations
from server.jid import JID

if TYPE_CHECKING:
    from s2s.manager import S2SManager
    from server.config import S2SConfig
    from server.storage import KeyValueStore

# How a remote domain's certificate is checked.
VERIFY = "verify"  # a chain to a trusted CA, naming the domain (RFC 6125)
SELF_SIGNED = "self-signed"  # any chain, but it must name the domain (configured per domain)
UNCHECKED = "unchecked"  # not checked at all: dialback alone vouches for the domain
# Where the domains admins add at runtime (XEP-0133 edit-blacklist, edit-whitelist) are kept, so that they
# outlive a restart: documents 'deny' and 'allow' of the whole server (host and user '').
ADDED = "s2s-lists"
# Deny-lists that modules load from elsewhere (files, URLs: abuse_limits) are documents of the same store
# named LOADED + the source's name, which they replace on every load and announce with the server-wide
# event POLICY_CHANGED: the store is the interface, so federation never reaches into a module.
LOADED = "loaded:"
POLICY_CHANGED = "federation/policy-changed"


def covers(rules: list[str], domain: str) -> bool:
    """Whether `domain` is one of `rules` or a subdomain of one."""
    return any(domain == rule or domain.endswith("." + rule) for rule in rules)


class Policy:
    def __init__(self, config: S2SConfig) -> None:
        self.config = config
        self.require_encryption = config.require_encryption
        self.added: dict[str, list[str]] = {"deny": [], "allow": []}  # besides the configured lists
        self.loaded: list[str] = []  # denied by the loaded lists of every source

    async def load(self, kv: KeyValueStore) -> None:
        for name in self.added:
            self.added[name] = await kv.get("", "", ADDED, name) or []
        loaded: set[str] = set()
        for key in await kv.keys("", "", ADDED):
            if key.startswith(LOADED):
                loaded.update(await kv.get("", "", ADDED, key) or [])
        self.loaded = sorted(loaded)

    def allowed(self, domain: str) -> bool:
        if covers(self.config.deny, domain) or covers(self.added["deny"], domain) or covers(self.loaded, domain):
            return False
        allow = self.config.allow + self.added["allow"]
        return not allow or covers(allow, domain)

    def certificate_mode(self, domain: str) -> str:
        if covers(self.config.accept_self_signed, domain):
            return SELF_SIGNED
        return VERIFY if self.config.require_valid_certificates else UNCHECKED


# --- XEP-0133's federation lists: what admins add to the configured ones --------------------------------

COMMANDS = Declarations()


def _domains(jids: list[JID]) -> list[str]:
    """Federation lists name domains (a domain covers its subdomains); a JID with a user or resource is refused."""
    wrong = [str(jid) for jid in jids if jid.local is not None or jid.resource is not None]
    if wrong:
        raise CommandError(f"only domains can be listed, not {', '.join(wrong)}")
    return sorted({jid.domain for jid in jids})


async def _federation_list(ctx: Context, name: str) -> list[str]:
    """The [s2s] table's list `name` ('deny' or 'allow'), then the domains admins added to it."""
    server = ctx.host.server
    return [*getattr(server.config.s2s, name), *(await server.storage.kv.get("", "", ADDED, name) or [])]


async def _set_federation_list(ctx: Context, name: str, jids: list[JID]) -> None:
    """Store what is not configured already; federation applies it to the next stanza and stream."""
    server = ctx.host.server
    configured = getattr(server.config.s2s, name)
    domains = _domains(jids)
    kept = [d for d in configured if d not in domains]
    if kept:
        raise CommandError(f"{', '.join(kept)}: in the [s2s] {name} list of the configuration file, "
                           "which must change instead")
    await server.storage.kv.set("", "", ADDED, name, [d for d in domains if d not in configured] or None)
    if server.s2s is not None:
        await cast("S2SManager", server.s2s).policy_changed()


BLACKLIST = Arg("blacklistjids", "jids", "The blacklist: domains refused for federation", required=False)
WHITELIST = Arg("whitelistjids", "jids", "The whitelist: when not empty, the only domains for federation",
                required=False)


async def _current_blacklist(ctx: Context) -> dict[str, Any]:
    return {"blacklistjids": await _federation_list(ctx, "deny")}


async def _current_whitelist(ctx: Context) -> dict[str, Any]:
    return {"whitelistjids": await _federation_list(ctx, "allow")}


@COMMANDS.command("edit-blacklist", "Edit Blacklist", (BLACKLIST,), access="server", defaults=_current_blacklist)
async def edit_blacklist(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _set_federation_list(ctx, "deny", args["blacklistjids"])
    return {}


@COMMANDS.command("edit-whitelist", "Edit Whitelist", (WHITELIST,), access="server", defaults=_current_whitelist)
async def edit_whitelist(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    await _set_federation_list(ctx, "allow", args["whitelistjids"])
    return {}
