"""Finds extension modules by name: module 'foo' is the Module subclass in `extensions/foo.py`."""

from __future__ import annotations

import importlib
import pkgutil

import extensions
from server.module import Module


def available() -> set[str]:
    return {info.name for info in pkgutil.iter_modules(extensions.__path__) if not info.name.startswith("_")}


def load(name: str) -> type[Module]:
    mod = importlib.import_module(f"extensions.{name}")
    for value in vars(mod).values():
        if isinstance(value, type) and issubclass(value, Module) and value is not Module and \
                getattr(value, "name", None) == name:
            return value
    raise LookupError(f"extensions/{name}.py defines no Module named {name!r}")


def resolve(names: list[str]) -> list[type[Module]]:
    """Module classes for `names`, dependencies first, each once."""
    ordered: list[type[Module]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        cls = load(name)
        for dep in cls.depends:
            visit(dep)
        ordered.append(cls)

    for name in names:
        visit(name)
    return ordered
