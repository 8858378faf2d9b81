"""Options set in the configuration file reach the modules of a running server."""

from __future__ import annotations

import pytest

from tests.conftest import Harness


async def os_in_version_reply(server: Harness) -> str:
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=("xep_0092",))
    result = await alice.plugin["xep_0092"].get_version("localhost")
    return result["software_version"]["os"]


async def test_os_is_hidden_by_default(server: Harness) -> None:
    assert await os_in_version_reply(server) == ""


@pytest.mark.parley_config(module_options={"version": {"show_os": True}})
async def test_option_from_config_reaches_the_module(server: Harness) -> None:
    assert await os_in_version_reply(server) != ""
