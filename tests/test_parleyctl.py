"""parleyctl against a running server: ejabberdctl's commands, arguments, output and exit codes.

Most tests call the CLI's main() in a thread (it blocks on the control socket while the server runs in this
event loop); the first ones run the installed console script in a subprocess, as an admin would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import stat
import sys
from pathlib import Path

import pytest
from slixmpp.exceptions import PresenceError

from ejabberd_compat import ctl
from ejabberd_compat.commands import parse_stanza
from parley import COMMANDS, build_server
from server.commands import CommandError
from server.control import SOCKET_NAME, render
from server.jid import JID
from tests.conftest import Harness
from tests.test_basic_modules import wait_for

PARLEYCTL = str(Path(sys.executable).with_name("parleyctl"))

DECLARED = {c.name: c for c in COMMANDS}  # those not of host modules


def config_file(server: Harness) -> Path:
    """What an admin passes to both `parley serve` and parleyctl: here only the data folder matters."""
    path = server.data_dir / "parley.toml"
    path.write_text(f'data_dir = "{server.data_dir}"\n')
    return path


async def console(config: Path, *args: str) -> tuple[int, str, str]:
    """The installed `parleyctl` script in a subprocess."""
    proc = await asyncio.create_subprocess_exec(PARLEYCTL, "--config", str(config), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ctl.main(argv)
    return code, out.getvalue(), err.getvalue()


async def run(server: Harness, *args: str) -> tuple[int, str, str]:
    """parleyctl's main() with these arguments: (exit code, stdout, stderr)."""
    return await asyncio.to_thread(_main, ["--config", str(config_file(server)), *args])


async def ok(server: Harness, *args: str) -> list[str]:
    code, out, err = await run(server, *args)
    assert code == 0, (args, out, err)
    return out.splitlines()


async def test_console_script_registers_a_user_who_then_logs_in(server: Harness) -> None:
    code, out, _ = await console(config_file(server), "register", "alice", "localhost", "s3cret")
    assert (code, out) == (0, "User alice@localhost successfully registered\n")
    code, out, _ = await console(config_file(server), "--node", "ejabberd@localhost", "--no-timeout",
                                 "registered_users", "localhost")  # an ejabberdctl script's options
    assert (code, out.split()) == (0, ["alice"])
    assert (await console(config_file(server), "check_account", "alice", "localhost"))[0] == 0
    assert (await console(config_file(server), "check_account", "bob", "localhost"))[0] == 1
    await server.client("alice@localhost", "s3cret")
    sock = server.data_dir / SOCKET_NAME
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


async def test_not_running_exits_3(tmp_path: Path) -> None:
    (tmp_path / "parley.toml").write_text(f'data_dir = "{tmp_path}"\n')
    code, _, err = await console(tmp_path / "parley.toml", "status")
    assert code == 3 and "Parley is not running" in err


async def test_socket_goes_with_the_server(server: Harness) -> None:
    sock = server.data_dir / SOCKET_NAME
    assert sock.exists()
    await server.server.stop()
    assert not sock.exists()
    assert (await run(server, "status"))[0] == 3
    server.server = build_server(server.server.config)  # started again on the same data folder
    await server.server.start()
    assert (await ok(server, "status"))[0].startswith("The node parley@")


async def test_bad_arguments_are_refused_and_change_nothing(server: Harness) -> None:
    code, _, err = await run(server, "register", "alice", "localhost")
    assert code == 1 and "requires 1 more argument" in err and "password::binary" in err
    code, _, err = await run(server, "register", "al ice@", "localhost", "pw")
    assert code == 1 and err.startswith("Error: invalid username")
    code, _, err = await run(server, "register", "alice", "nowhere.test", "pw")
    assert code == 1 and "Unknown virtual host" in err
    code, _, err = await run(server, "register", "alice", "localhost", "")
    assert code == 1 and "Password is required" in err
    code, _, err = await run(server, "frobnicate")
    assert code == 1 and "unknown command 'frobnicate'" in err
    assert await ok(server, "registered_users", "localhost") == []
    await ok(server, "register", "alice", "localhost", "pw")
    code, _, err = await run(server, "register", "alice", "localhost", "other")
    assert code == 1 and "already registered" in err
    assert (await run(server, "check_password", "alice", "localhost", "pw"))[0] == 0


async def test_help_lists_commands_and_their_arguments(server: Harness) -> None:
    overview = "\n".join(await ok(server, "help"))
    for name in ("register", "get_roster", "set_room_affiliation", "reload_config"):
        assert f"  {name} " in overview
    assert "add-user" not in overview  # ad-hoc commands stay in XMPP clients
    details = "\n".join(await ok(server, "help", "add_rosteritem"))
    order = [line.split("::")[0].split()[-1] for line in details.splitlines() if "::binary" in line]
    assert order == ["localuser", "localhost", "user", "host", "nick", "group", "subs"]


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_passwords_ban_and_unregister(server: Harness) -> None:
    await server.add_user("alice", "old")
    assert await ok(server, "change_password", "alice", "localhost", "new") == []
    assert (await run(server, "check_password", "alice", "localhost", "old"))[0] == 1
    assert (await run(server, "check_password", "alice", "localhost", "new"))[0] == 0
    code, _, err = await run(server, "change_password", "nobody", "localhost", "x")
    assert code == 1 and "does not exist" in err
    client = await server.client("alice@localhost", "new")
    gone = asyncio.Event()
    client.add_event_handler("disconnected", lambda _: gone.set())
    await ok(server, "ban_account", "alice", "localhost", "spam")
    await asyncio.wait_for(gone.wait(), 5)
    with pytest.raises(AssertionError, match="login failed"):
        await server.client("alice@localhost", "new")
    assert (await run(server, "check_password", "alice", "localhost", "new"))[0] == 1
    assert await ok(server, "unregister", "alice", "localhost") == []
    assert (await run(server, "check_account", "alice", "localhost"))[0] == 1


async def test_sessions_messages_and_kick(server: Harness) -> None:
    await server.add_user("alice")
    client = await server.client("alice@localhost", resource="phone")
    inbox = server.inbox(client)
    assert await ok(server, "connected_users") == ["alice@localhost/phone"]
    assert await ok(server, "connected_users_number") == ["1"]
    assert await ok(server, "stats", "onlineusers") == ["1"]
    assert await ok(server, "stats", "registeredusers") == ["1"]
    available = asyncio.Event()
    client.add_event_handler("presence_available", lambda p: p["from"] == client.boundjid and available.set())
    client.send_presence()
    await asyncio.wait_for(available.wait(), 5)  # the server has it: a message to the bare JID comes here
    await ok(server, "send_message", "headline", "localhost", "alice@localhost", "News", "hello there")
    message = await asyncio.wait_for(inbox.get(), 5)
    assert (message["body"], message["subject"], str(message["from"])) == ("hello there", "News", "localhost")
    code, _, err = await run(server, "send_stanza", "localhost", "alice@localhost", "<message><body>x</body")
    assert code == 1 and "invalid XML" in err
    code, _, err = await run(server, "send_message", "chat", "someone@example.org", "alice@localhost", "", "x")
    assert code == 1 and "not an address of a host you administer" in err
    await ok(server, "send_stanza", "localhost", "alice@localhost", "<message type='chat'><body>raw</body></message>")
    message = await asyncio.wait_for(inbox.get(), 5)
    assert message["body"] == "raw"  # the bad ones above sent nothing
    gone = asyncio.Event()
    client.add_event_handler("disconnected", lambda _: gone.set())
    await ok(server, "kick_session", "alice", "localhost", "phone", "maintenance")
    await asyncio.wait_for(gone.wait(), 5)

    async def nobody_connected() -> bool:  # the server ends the session after the client saw the stream end
        return await ok(server, "connected_users_number") == ["0"]

    await wait_for(nobody_connected)


async def test_roster_items(server: Harness) -> None:
    await server.add_user("alice")
    client = await server.client("alice@localhost")
    await client.get_roster()
    pushed = asyncio.Event()
    client.add_event_handler("roster_update", lambda _: pushed.set())
    await ok(server, "add_rosteritem", "alice", "localhost", "bob", "example.test", "Bobby", "Friends;Work", "both")
    await asyncio.wait_for(pushed.wait(), 5)
    assert client.client_roster["bob@example.test"]["subscription"] == "both"
    assert await ok(server, "get_roster", "alice", "localhost") == [
        "bob@example.test\tBobby\tboth\tnone\tFriends", "bob@example.test\tBobby\tboth\tnone\tWork"]
    code, _, err = await run(server, "add_rosteritem", "alice", "localhost", "carol", "localhost", "", "", "maybe")
    assert code == 1 and "subscription must be one of" in err
    await ok(server, "delete_rosteritem", "alice", "localhost", "bob", "example.test")
    assert await ok(server, "get_roster", "alice", "localhost") == []
    pushed.clear()
    client.send_presence(pto="carol@localhost", ptype="subscribe")
    await asyncio.wait_for(pushed.wait(), 5)
    assert await ok(server, "get_roster", "alice", "localhost") == ["carol@localhost\t\tnone\tout\t"]


async def test_vcard_fields(server: Harness) -> None:
    await server.add_user("alice")
    code, _, err = await run(server, "get_vcard", "alice", "localhost", "FN")
    assert code == 1 and "has no vCard" in err
    await ok(server, "set_vcard", "alice", "localhost", "FN", "Alice Liddell")
    await ok(server, "set_vcard", "alice", "localhost", "NICKNAME", "ali")
    assert await ok(server, "get_vcard", "alice", "localhost", "FN") == ["Alice Liddell"]
    code, _, err = await run(server, "set_vcard", "alice", "localhost", "<FN>", "x")
    assert code == 1 and "invalid vCard field" in err
    client = await server.client("alice@localhost", plugins=("xep_0054",))
    vcard = await client.plugin["xep_0054"].get_vcard("alice@localhost", local=False, cached=False)
    assert (vcard["vcard_temp"]["FN"], vcard["vcard_temp"]["NICKNAME"]) == ("Alice Liddell", ["ali"])


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_rooms(server: Harness) -> None:
    service = "conference.localhost"
    await server.add_user("alice")
    await ok(server, "create_room", "lobby", service, "localhost")
    code, _, err = await run(server, "create_room", "lobby", service, "localhost")
    assert code == 1 and "already exists" in err
    code, _, err = await run(server, "create_room", "x", "conference.example.test", "localhost")
    assert code == 1 and "MUC service of localhost is conference.localhost" in err
    assert await ok(server, "muc_online_rooms", "global") == [f"lobby@{service}"]
    client = await server.client("alice@localhost", resource="pc", plugins=("xep_0045",))
    await client.plugin["xep_0045"].join_muc_wait(f"lobby@{service}", "Alice", maxchars=0)
    assert await ok(server, "get_room_occupants", "lobby", service) == ["alice@localhost/pc\tAlice\tparticipant"]
    code, _, err = await run(server, "set_room_affiliation", "lobby", service, "alice@localhost", "king")
    assert code == 1 and "affiliation must be one of" in err
    left = asyncio.Event()
    client.add_event_handler(f"muc::lobby@{service}::got_offline", lambda _: left.set())
    await ok(server, "set_room_affiliation", "lobby", service, "alice@localhost", "outcast")
    await asyncio.wait_for(left.wait(), 5)
    assert await ok(server, "get_room_occupants", "lobby", service) == []
    await server.restart()  # created persistent: it stays, with its ban
    assert await ok(server, "muc_online_rooms", service) == [f"lobby@{service}"]
    client = await server.client("alice@localhost", resource="pc", plugins=("xep_0045",))
    with pytest.raises(PresenceError, match="banned"):
        await client.plugin["xep_0045"].join_muc_wait(f"lobby@{service}", "Alice", maxchars=0, timeout=5)
    await ok(server, "destroy_room", "lobby", service)
    assert await ok(server, "muc_online_rooms", "global") == []
    code, _, err = await run(server, "get_room_occupants", "lobby", service)
    assert code == 1 and "not found" in err


async def test_stats_status_and_reload_config(server: Harness) -> None:
    assert int((await ok(server, "stats", "uptimeseconds"))[0]) >= 0
    code, _, err = await run(server, "stats", "processes")
    assert code == 1 and "unknown statistic" in err
    assert (await ok(server, "status"))[1].startswith("Parley ")
    code, _, err = await run(server, "reload_config")
    assert code == 1 and "built-in configuration" in err
    source = server.data_dir / "server.toml"
    source.write_text('[hosts."localhost"]\nadmins = ["alice@localhost"]\nregistration = false\n'
                      '[hosts."example.test"]\n')
    server.server.config.source = source  # as if started with --config server.toml
    localhost = server.server.hosts["localhost"]
    alice, admin, carol = (JID.make(user, "localhost") for user in ("alice", "admin", "carol"))
    await localhost.set_admins({carol})  # added at runtime (XEP-0133 edit-admin), not in the file
    assert localhost.config.registration and not localhost.is_admin(alice) and localhost.is_admin(admin)
    assert await ok(server, "reload_config") == []
    assert not localhost.config.registration and localhost.is_admin(alice) and localhost.is_admin(carol)
    assert not localhost.is_admin(admin)  # taken out of the file
    source.write_text('[hosts."localhost"]\nadmins = "alice"\n')
    code, _, err = await run(server, "reload_config")
    assert code == 1 and "hosts.localhost.admins" in err
    assert localhost.is_admin(alice)  # a bad file changes nothing


async def test_export_and_import_piefxis(server: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await ok(server, "register", "alice", "localhost", "s3cret")
    await ok(server, "add_rosteritem", "alice", "localhost", "bob", "example.test", "Bob", "", "both")
    monkeypatch.chdir(tmp_path)  # a relative directory is the admin's, not the server's
    assert await ok(server, "export_piefxis", "export") == []
    [main] = [p for p in (tmp_path / "export").glob("*.xml") if "localhost" not in p.name and "example" not in p.name]
    await ok(server, "unregister", "alice", "localhost")
    code, _, err = await run(server, "import_piefxis", str(tmp_path / "missing.xml"))
    assert code == 1 and "cannot import" in err
    assert await ok(server, "import_piefxis", str(main.relative_to(tmp_path))) == []
    assert (await run(server, "check_password", "alice", "localhost", "s3cret"))[0] == 0
    assert await ok(server, "get_roster", "alice", "localhost") == ["bob@example.test\tBob\tboth\tnone\t"]


def test_arguments_by_name_are_all_required_and_known() -> None:
    register = DECLARED["register"]
    assert register.parse({"user": " alice ", "host": "localhost", "password": " pw "}) == {
        "user": "alice", "host": "localhost", "password": " pw "}  # passwords are taken as typed
    with pytest.raises(CommandError, match="missing argument: password"):
        register.parse({"user": "alice", "host": "localhost"})
    with pytest.raises(CommandError, match="unknown arguments: extra"):
        register.parse({"user": "alice", "host": "localhost", "password": "pw", "extra": "1"})
    assert not register.adhoc and DECLARED["add-user"].adhoc


def test_output_of_each_result_kind() -> None:
    commands = DECLARED
    assert render(commands["registered_users"], {"users": ["alice", "bob"]}) == ["alice", "bob"]
    assert render(commands["get_room_occupants"], {"occupants": [{"jid": "a@h/r", "nick": "A", "role": "none"}]}) \
        == ["a@h/r\tA\tnone"]
    assert render(commands["connected_users_number"], {"num_sessions": 0}) == ["0"]
    assert render(commands["unregister"], {"res": ""}) == []
    assert render(commands["check_account"], {}) == []


@pytest.mark.parametrize(("xml", "reason"), [
    ("<message", "invalid XML"), ("<message/><message/>", "exactly one"), ("<query xmlns='x'/>", "message, presence"),
    ("<message><!-- hidden --></message>", "restricted-xml"), ("<message>&amp;&foo;</message>", "invalid XML"),
])
def test_send_stanza_takes_one_restricted_stanza(xml: str, reason: str) -> None:
    with pytest.raises(CommandError, match=reason):
        parse_stanza(xml)


async def test_config_after_the_command_or_from_the_environment(server: Harness,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    await server.add_user("alice")
    config = str(config_file(server))
    for argv in (["registered_users", "localhost", "--config", config], ["registered_users", f"--config={config}",
                                                                          "localhost"]):
        code, out, err = await asyncio.to_thread(_main, argv)
        assert (code, out.split()) == (0, ["alice"]), err
    monkeypatch.setenv("PARLEY_CONFIG", config)
    code, out, err = await asyncio.to_thread(_main, ["registered_users", "localhost"])
    assert (code, out.split()) == (0, ["alice"]), err


async def test_reload_config_of_a_server_started_from_an_ejabberd_yml(server: Harness) -> None:
    source = server.data_dir / "ejabberd.yml"
    source.write_text("hosts: [localhost, example.test]\nacl: {admin: {user: [carol@localhost]}}\n"
                      "access_rules: {configure: {allow: admin}}\nmodules: {mod_register: {access: none}}\n")
    server.server.config.source = source  # as if started with --config ejabberd.yml
    localhost = server.server.hosts["localhost"]
    assert localhost.config.registration
    assert await ok(server, "reload_config") == []
    assert not localhost.config.registration and localhost.is_admin(JID.make("carol", "localhost"))


async def test_text_xml_cannot_carry_is_refused(server: Harness) -> None:
    """parleyctl exits 1 with the reason, and nothing reaches the recipient, who stays connected."""
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    inbox = server.inbox(bob)
    available = asyncio.Event()
    bob.add_event_handler("presence_available", lambda p: p["from"] == bob.boundjid and available.set())
    bob.send_presence()
    await asyncio.wait_for(available.wait(), 5)  # online: a message to the bare JID comes here
    code, _, err = await run(server, "send_message", "chat", "localhost", "bob@localhost", "", "a\x01b")
    assert (code, err) == (1, "Error: Body: contains U+0001, a character XML does not allow\n")
    code, _, err = await console(config_file(server), "set_vcard", "bob", "localhost", "FN", "B\x0bob")
    assert (code, err) == (1, "Error: Content: contains U+000B, a character XML does not allow\n")
    await ok(server, "send_message", "chat", "localhost", "bob@localhost", "", "valid")
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "valid"
    assert bob.is_connected()
