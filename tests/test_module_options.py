"""Module options: declared by the modules that read them, checked when the configuration loads, and set in the
configuration file they reach the modules of a running server typed."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ejabberd_compat.config import MODULE_OPTIONS, translate
from parley import main
from server.config import ConfigError, parse_config
from server.module import Module
from server.options import Option
from server.registry import available, load
from tests.conftest import Harness, free_port
from tests.test_cli import parley, write_config


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


@pytest.mark.parley_config(module_options={"stream_management": {"resume_timeout": 2, "max_queue": 7}})
async def test_options_reach_the_module_with_their_declared_types(server: Harness) -> None:
    module = server.server.hosts["localhost"].modules["stream_management"]
    assert (module.resume_timeout, module.max_queue) == (2.0, 7)
    assert isinstance(module.resume_timeout, float) and isinstance(module.max_queue, int)
    blocking = server.server.hosts["localhost"].modules["blocking"]
    assert blocking.option("bounce") is False  # the declared default


# --- checking the configuration -----------------------------------------------------------------------------

BAD_OPTIONS = """
[module_options.stream_management]
resume_timeout = "five minutes"
[hosts."example.test".module_options.mam]
retention_days = "thirty"
retention_dayz = 30
"""
# Each bad option, by the full key it is reported under, with the reason.
BAD_OPTION_ERRORS = [
    "'module_options.stream_management.resume_timeout': must be a number of at least 0 (got 'five minutes')",
    "'hosts.\"example.test\".module_options.mam.retention_days': must be a number of at least 0 (got 'thirty')",
    "'hosts.\"example.test\".module_options.mam.retention_dayz': unknown option 'retention_dayz' "
    "(did you mean 'retention_days'?)",
]


def bad_options_file(tmp_path: Path) -> Path:
    path = write_config(tmp_path, free_port(), free_port())
    path.write_text(path.read_text() + BAD_OPTIONS)
    return path


def test_check_config_reports_every_bad_module_option_at_once(tmp_path: Path) -> None:
    result = parley("check-config", str(bad_options_file(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"parley: config key {error}" for error in BAD_OPTION_ERRORS]


def test_serve_refuses_bad_module_options_before_it_starts(tmp_path: Path) -> None:
    result = parley("serve", "--config", str(bad_options_file(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"parley: config key {error}" for error in BAD_OPTION_ERRORS]
    assert not (tmp_path / "data").exists()  # refused before the data folder, the accounts and the listeners


def errors_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, known_modules=available())
    return [(error.key, error.reason) for error in info.value.errors]


def test_options_of_a_module_not_loaded_where_they_apply_are_errors() -> None:
    assert errors_of({
        "modules": ["roster", "presence", "mam"],
        "module_options": {"muc": {"create": "anyone"}, "mam": {"max_page": 50}},
        "hosts": {"a.example": {"modules_disabled": ["mam"], "module_options": {"mam": {"max_page": 10}}},
                  "b.example": {}},
    }) == [
        ('hosts."a.example".module_options.mam',
         "module 'mam' is not loaded on this host: load it or remove its options"),
        ("module_options.muc", "module 'muc' is not loaded on any host: load it or remove its options"),
    ]


def test_types_bounds_and_choices_are_checked() -> None:
    assert errors_of({"module_options": {
        "version": {"show_os": "yes"},
        "push": {"max_registrations": 0, "include_body": 1},
        "muc": {"create": "everyone", "domain": "not a domain!", "max_page": 2.5},
        "register": {"per_ip_window": True},
        "nosuch": {"x": 1},
        "blocking": {"x": 1},
    }}) == [
        ("module_options.version.show_os", "must be true or false (got 'yes')"),
        ("module_options.push.max_registrations", "must be an integer of at least 1 (got 0)"),
        ("module_options.push.include_body", "must be true or false (got 1)"),
        ("module_options.muc.create", "must be one of 'local', 'admins', 'anyone' (got 'everyone')"),
        ("module_options.muc.domain", "must be a domain name (got 'not a domain!')"),
        ("module_options.muc.max_page", "must be an integer of at least 1 (got 2.5)"),
        ("module_options.register.per_ip_window", "must be a number of at least 0 (got True)"),
        ("module_options.nosuch", "unknown module 'nosuch' (valid: " + ", ".join(sorted(available())) + ")"),
        ("module_options.blocking.x", "unknown option 'x' (valid: bounce)"),
    ]


def test_valid_values_are_typed_and_hosts_override() -> None:
    config = parse_config({"module_options": {"stream_management": {"resume_timeout": 60}, "muc": {"name": "Rooms"}},
                           "hosts": {"a.example": {"module_options": {"stream_management": {"resume_timeout": 1.5}}},
                                     "b.example": {}}}, known_modules=available())
    a, b = config.hosts["a.example"].options, config.hosts["b.example"].options
    assert a == {"stream_management.resume_timeout": 1.5, "muc.name": "Rooms"}
    assert b == {"stream_management.resume_timeout": 60.0, "muc.name": "Rooms"}
    assert isinstance(b["stream_management.resume_timeout"], float)


def test_option_declarations() -> None:
    lists = Option("peers", tuple, (), "a list")
    assert lists.check(["a", "b"]) == ("a", "b")
    with pytest.raises(ValueError, match="must be a list of non-empty strings"):
        lists.check(["a", 1])
    assert Option("ratio", float, 0.5, "a ratio", minimum=0, maximum=1).expected() == "a number from 0 to 1"
    with pytest.raises(ValueError, match="must be a number from 0 to 1"):
        Option("ratio", float, 2, "a default out of bounds", minimum=0, maximum=1)
    with pytest.raises(TypeError):
        Option("when", dict, None, "an unsupported type")
    with pytest.raises(TypeError, match="declares an option twice"):
        type("Twice", (Module,), {"name": "twice", "options": (Option("a", int, 1, "a"), Option("a", int, 2, "a"))})


async def test_reading_an_undeclared_option_is_a_programming_error(server: Harness) -> None:
    module = server.server.hosts["localhost"].modules["version"]
    with pytest.raises(KeyError, match="without declaring it"):
        module.option("show_hostname")


# --- the declarations agree with the code, the example and the ejabberd translation ----------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "parley.example.toml"


def test_example_configuration_shows_exactly_the_declared_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["module-options"]) == 0
    printed = capsys.readouterr().out
    example = EXAMPLE.read_text()
    assert printed in example, "regenerate the example's module section with `parley module-options`"
    assert tomllib.loads(example)["module_options"] == tomllib.loads(printed)["module_options"]
    declared = {(name, option.name) for name in available() for option in load(name).options}
    shown = {(name, option) for name, options in tomllib.loads(printed)["module_options"].items() for option in options}
    assert shown == {(name, option) for name, option in declared if load(name)._declared[option].default is not None}


def _option_reads(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "option"]


def test_every_option_a_module_reads_is_declared() -> None:
    """Each `.option(...)` call in extensions/ and s2s/ names, as its only argument, an option that the module of
    its file (extensions/NAME.py or extensions/NAME/...) declares; a call with a default is the old API."""
    root = Path(__file__).resolve().parent.parent
    reads = 0
    for path in [*(root / "extensions").rglob("*.py"), *(root / "s2s").rglob("*.py")]:
        owner = path.relative_to(root / "extensions").parts[0].removesuffix(".py") \
            if path.is_relative_to(root / "extensions") else None
        for call in _option_reads(path):
            where = f"{path.relative_to(root)}:{call.lineno}"
            assert owner in available(), f"{where}: only extension modules have options"
            assert len(call.args) == 1 and not call.keywords and isinstance(call.args[0], ast.Constant), \
                f"{where}: read an option as self.option(\"name\"), with its default in the module's `options`"
            assert call.args[0].value in load(owner)._declared, f"{where}: {owner} does not declare it"
            reads += 1
    assert reads >= 20


def test_ejabberd_module_options_map_onto_declared_options() -> None:
    for target, _ in MODULE_OPTIONS.values():
        section, _, rest = target.removeprefix("hosts.*.").partition(".")
        if section == "module_options":
            module, _, name = rest.partition(".")
            assert name in load(module)._declared, target


def test_ejabberd_values_a_module_refuses_are_reported_not_applied(tmp_path: Path) -> None:
    yml = yaml.safe_load("hosts: [a.test, b.test]\nmodules:\n  mod_muc: {name: '', access_create: all}\n"
                         "  mod_stream_mgmt: {resume_timeout: 90}\n"
                         "host_config:\n  b.test:\n    modules: {mod_muc: {host: 'rooms@@HOST@'}}\n")
    data, warnings = translate(yml, tmp_path, available())
    assert "modules.mod_muc.name: must be a non-empty string (got '')" in warnings
    assert "host_config.b.test.modules.mod_muc.host: must be a domain name (got 'rooms@b.test')" in warnings
    assert data["module_options"] == {"muc": {"create": "anyone"}, "stream_management": {"resume_timeout": 90}}
    assert "module_options" not in data["hosts"]["b.test"]
