"""The server's command table: modules add their commands when a host loads them and take them away at unload."""

from __future__ import annotations

from typing import Any

import pytest

from server.commands import Command, CommandError, CommandTable, Context
from tests.conftest import Harness


async def nothing(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {}


def test_a_command_stays_while_one_holder_keeps_it() -> None:
    table, command = CommandTable(), Command("x", "X", nothing)
    remove_first, remove_second = table.add(command), table.add(command)  # two hosts load the same module
    remove_first()
    assert table.get("x") is command
    remove_second()
    assert table.get("x") is None and list(table) == []
    with pytest.raises(CommandError, match="the command x is not available"):
        table["x"]


def test_two_declarations_of_one_name_are_refused() -> None:
    table = CommandTable()
    table.add(Command("x", "X", nothing))
    with pytest.raises(ValueError, match="declared twice"):
        table.add(Command("x", "Another X", nothing))


async def test_module_commands_come_and_go_with_the_modules(server: Harness) -> None:
    commands = server.server.commands
    # The core's, the root's (ejabberd's names) and the loaded modules' (roster, vCard, rooms, announce).
    assert {"add-user", "register", "get-user-roster", "vcard-get-field", "muc-rooms", "set-motd"} <= \
        {c.name for c in commands}
    await server.server.stop()
    names = {c.name for c in commands}
    assert "add-user" in names and "register" in names
    assert not names & {"get-user-roster", "vcard-get-field", "muc-rooms", "set-motd"}
