"""Module options: each module declares the options it reads, as ejabberd's mod_options/mod_opt_type do.

A declaration names the option, its type, its default, its bounds or choices and what it does in one line.
The configuration is checked against the declarations when it is loaded, so that `parley check-config` finds a
wrong type, a value out of bounds or a misspelt name before the server starts, and a module reads typed values
only. The example configuration's [module_options.*] tables are printed from the same declarations.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.jid import JID, JIDError


class Domain(str):
    """The type of an option that names a domain (a service's address): a string that is a valid domain."""


# What each type accepts, as said in an error.
_EXPECTED: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
                              Domain: "a domain name", tuple: "a list of non-empty strings", list: "a list of tables"}


@dataclass(frozen=True)
class Option:
    """One option of a module: ``NAME = value`` in its ``[module_options.MODULE]`` table.

    `type` is bool, int, float (an integer is taken too), str, Domain, tuple (a list of strings, read as a
    tuple) or list (a list of tables such as `[{ type = "stun", port = 3478 }]`, read as a tuple of dicts).
    A `default` of None means the module works the value out itself (e.g. 'conference.<host>'), as
    `doc` then says. `minimum` and `maximum` bound numbers (inclusive); `choices` lists the strings allowed.

    The keys of a list's tables are declared as Options themselves, in `fields`: each key is checked as an
    option is, a key left out takes its field's default, and a `required` field must be there. So a module
    reads every key of every table, typed, and an operator's typo in one is an error like any other.
    """

    name: str
    type: type
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    fields: tuple[Option, ...] = ()
    required: bool = False

    def __post_init__(self) -> None:
        if self.type not in _EXPECTED:
            raise TypeError(f"option {self.name}: unsupported type {self.type!r}")
        if (self.type is list) != bool(self.fields):
            raise TypeError(f"option {self.name}: a list of tables, and only that, declares its fields")
        if self.default is not None:
            typed = self.check(self.default)
            if self.type is list:  # the module reads the default's tables complete, as it reads configured ones
                object.__setattr__(self, "default", typed)

    def check(self, value: Any) -> Any:
        """The value as the module reads it; ValueError says what is expected instead."""
        if self.type is list:
            return self._tables(value)
        typed = _typed(self.type, value)
        if typed is None or (self.choices and typed not in self.choices) or \
                (self.minimum is not None and typed < self.minimum) or \
                (self.maximum is not None and typed > self.maximum):
            raise ValueError(f"must be {self.expected()} (got {value!r})")
        return typed

    def _tables(self, value: Any) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(item, Mapping) for item in value):
            raise ValueError(f"must be {self.expected()} (got {value!r})")
        return tuple(self._table(number, item) for number, item in enumerate(value, 1))

    def _table(self, number: int, item: Mapping[str, Any]) -> dict[str, Any]:
        """One table of a list, every field present: its keys checked as options, the missing ones defaulted."""
        table: dict[str, Any] = {}
        for key, value in item.items():
            try:
                table[key] = check_option(self.fields, key, value, kind="key")
            except ValueError as error:
                raise ValueError(f"table {number}, {key}: {error}") from None
        for field in self.fields:
            if field.name not in table:
                if field.required:
                    raise ValueError(f"table {number}: {field.name} is required")
                table[field.name] = field.default
        return table

    def expected(self) -> str:
        if self.choices:
            return f"one of {', '.join(map(repr, self.choices))}"
        low, high = self.minimum, self.maximum
        kind = _EXPECTED[self.type]
        if low is not None and high is not None:
            return f"{kind} from {low:g} to {high:g}"
        if low is not None:
            return f"{kind} of at least {low:g}"
        return f"{kind} of at most {high:g}" if high is not None else kind


def _typed(kind: type, value: Any) -> Any:
    """`value` converted to `kind`, or None when it is not one."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        return float(value) if isinstance(value, int | float) else None
    if kind is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(item, str) and item for item in value)
        return tuple(value) if ok else None
    if not isinstance(value, str) or not value:
        return None
    if kind is Domain:
        try:
            JID.make(None, value)
        except JIDError:
            return None
    return value


def check_option(declared: Sequence[Option], name: str, value: Any, kind: str = "option") -> Any:
    """The value of option `name` as its module reads it; ValueError says why it is refused (an unknown name
    is refused with the closest declared one, to catch typos). `kind` names what is declared in the error:
    an option of a module, or a key of a list option's tables."""
    for option in declared:
        if option.name == name:
            return option.check(value)
    names = [option.name for option in declared]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else \
        f"valid: {', '.join(names)}" if names else "the module has no options"
    raise ValueError(f"unknown {kind} {name!r} ({hint})")


def example_section(declared: Mapping[str, Iterable[Option]]) -> str:
    """The [module_options.*] tables of the example configuration: every option of every module (by module
    name) with its default and documentation. Options without a default are shown as comments."""
    lines = ["# Options of individual modules, for every host: [module_options.MODULE] tables of option = value.",
             '# A host can override them in its own [hosts."NAME".module_options.MODULE] table.',
             "# This section is printed by `parley module-options`, from the options the modules declare."]
    for module, options in sorted(declared.items()):
        options = list(options)
        if not options:
            continue
        lines.append(f"[module_options.{module}]")
        for option in options:
            if option.type is list:
                lines += _list_example(option)
            elif option.default is None:
                lines.append(f"# {option.name}: {_doc(option)}")
            else:
                lines.append(f"{f'{option.name} = {_toml(option.default)}':<25} # {_doc(option)}")
    return "\n".join(lines) + "\n"


def _doc(option: Option) -> str:
    return option.doc + (f" ({', '.join(option.choices)})" if option.choices else "")


def _list_example(option: Option) -> list[str]:
    """A list of tables: its documentation and each key's above it, then the default one table a line, showing
    the keys whose value is not their field's default."""
    lines = [f"# {option.name}: {option.doc}; each table has the keys"]
    for field in option.fields:
        default = "required" if field.required else "optional" if field.default is None else \
            f"default {_toml(field.default)}"
        lines.append(f"#   {field.name}: {_doc(field)}; {default}")
    if option.default is None:
        return lines
    lines.append(f"{option.name} = [")
    for table in option.default:
        shown = [f"{field.name} = {_toml(table[field.name])}" for field in option.fields
                 if table[field.name] is not None and table[field.name] != field.default]
        lines.append(f"  {{ {', '.join(shown)} }},")
    lines.append("]")
    return lines


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(map(json.dumps, value)) + "]"
    return json.dumps(value) if isinstance(value, str) else str(value)
