"""A room's configuration and the muc#roomconfig form (XEP-0045 10.2) that owners edit it with.

The form is described once, in OPTIONS, and both the form sent to owners and the parsing of what they
submit come from that table, so a field cannot be offered without being understood or the reverse.
A submitted value of the wrong type makes the whole form not-acceptable (XEP-0045 10.2) and nothing
changes. The password is one field of the configuration; 'passwordprotectedroom' is derived from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from xml.etree.ElementTree import Element

from extensions.muc.protocol import ROOMCONFIG
from server.forms import Field, build_form, form_type_of, read_form
from server.stream.errors import StanzaError

PASSWORD_PROTECTED = "muc#roomconfig_passwordprotectedroom"


@dataclass(frozen=True)
class RoomConfig:
    name: str = ""
    description: str = ""
    language: str = ""
    persistent: bool = False
    public: bool = True
    members_only: bool = False
    moderated: bool = False
    password: str = ""
    whois: str = "moderators"  # who sees occupants' real JIDs: 'moderators' (semi-anonymous) or 'anyone'
    max_users: int = 0  # 0: no limit
    change_subject: bool = False  # participants may change the subject, not only moderators
    allow_invites: bool = False  # occupants may invite to a members-only room, not only admins
    allow_pm: str = "anyone"  # who may send private messages: anyone, participants, moderators, none
    max_history: int = 20  # messages of discussion history kept and sent on join
    # The room's messages are archived and can be queried (XEP-0313). Temporary rooms too, as in Prosody and
    # ejabberd, for clients that catch up from the archive (Gajim); their archive goes with them.
    archive: bool = True

    @property
    def non_anonymous(self) -> bool:
        return self.whois == "anyone"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoomConfig:
        """Stored configuration; keys this version does not know (or no longer knows) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Option:
    attr: str  # the RoomConfig attribute
    var: str
    label: str
    kind: str  # 'boolean', 'text-single', 'text-private', 'list-single' (one of choices) or 'count' (integer >= 0)
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other names accepted for the field in a submitted form


OPTIONS = (
    Option("name", "muc#roomconfig_roomname", "Name", "text-single"),
    Option("description", "muc#roomconfig_roomdesc", "Description", "text-single"),
    Option("language", "muc#roomconfig_lang", "Language of discussion", "text-single"),
    Option("persistent", "muc#roomconfig_persistentroom", "Persistent (kept when the last occupant leaves)",
           "boolean"),
    Option("public", "muc#roomconfig_publicroom", "Listed in the public directory", "boolean"),
    Option("members_only", "muc#roomconfig_membersonly", "Members only", "boolean"),
    Option("moderated", "muc#roomconfig_moderatedroom", "Moderated (only participants with voice speak)",
           "boolean"),
    Option("password", "muc#roomconfig_roomsecret", "Password", "text-private"),
    Option("whois", "muc#roomconfig_whois", "Who may see real JIDs", "list-single", ("moderators", "anyone")),
    Option("max_users", "muc#roomconfig_maxusers", "Maximum occupants (0: no limit)", "count"),
    Option("change_subject", "muc#roomconfig_changesubject", "Participants may change the subject", "boolean"),
    Option("allow_invites", "muc#roomconfig_allowinvites", "Occupants may invite others", "boolean"),
    Option("allow_pm", "muc#roomconfig_allowpm", "Who may send private messages", "list-single",
           ("anyone", "participants", "moderators", "none")),
    Option("max_history", "muc#maxhistoryfetch", "Messages of history sent on join", "count"),
    Option("archive", "muc#roomconfig_enablearchiving", "Archive messages (message archive, XEP-0313)", "boolean",
           aliases=("mam",)),
)


def _encode(option: Option, value: Any) -> str:
    if option.kind == "boolean":
        return "1" if value else "0"
    return str(value)


def config_form(config: RoomConfig, title: str) -> Element:
    """The form an owner fills in, with the current values."""
    form_fields = [Field(PASSWORD_PROTECTED, "boolean", "Password protected", ("1" if config.password else "0",))]
    for option in OPTIONS:
        kind = "text-single" if option.kind == "count" else option.kind
        form_fields.append(Field(option.var, kind, option.label, (_encode(option, getattr(config, option.attr)),),
                                 options=option.choices))
    return build_form("form", form_fields, form_type=ROOMCONFIG, title=title)


def _decode(option: Option, values: list[str]) -> Any:
    value = values[0].strip() if values else ""
    if option.kind == "boolean":
        if value not in ("0", "1", "false", "true"):
            raise ValueError(f"{option.var} must be a boolean")
        return value in ("1", "true")
    if option.kind == "count":
        if not value.isdigit():
            raise ValueError(f"{option.var} must be a whole number")
        return int(value)
    if option.choices and value not in option.choices:
        raise ValueError(f"{option.var} must be one of {', '.join(option.choices)}")
    return values[0] if values else ""


def apply_form(config: RoomConfig, x: Element) -> RoomConfig:
    """The configuration after an owner's submitted form; fields left out keep their value."""
    if form_type_of(x) not in (None, ROOMCONFIG):
        raise StanzaError("not-acceptable", "not a muc#roomconfig form")
    values = read_form(x)
    changes: dict[str, Any] = {}
    try:
        for option in OPTIONS:
            var = next((v for v in (option.var, *option.aliases) if v in values), None)
            if var is not None:
                changes[option.attr] = _decode(option, values[var])
        protected = _decode(Option("", PASSWORD_PROTECTED, "", "boolean"), values[PASSWORD_PROTECTED]) \
            if PASSWORD_PROTECTED in values else None
    except ValueError as exc:
        raise StanzaError("not-acceptable", str(exc)) from None
    new = replace(config, **changes)
    if protected is False:
        new = replace(new, password="")
    elif protected and not new.password:
        raise StanzaError("not-acceptable", "a password-protected room needs a password")
    return new
