"""Registries that map a config `name` to a component class and its options dataclass.

A component class carries `name` (what a config's `name:` says), `Options` (its options
dataclass, a `semiseg.options.ComponentOptions` subclass) and `summary` (one line for
tables). Adding one is its module plus one line, `POLICIES.add(MyPolicy)`; nothing else
in semiseg names it. The registries themselves live with their components:
`semiseg.schemes.SCHEMES`, `semiseg.pseudo.POLICIES`, `semiseg.pseudo.LOSSES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Generic, TypeVar

from semiseg.options import ComponentOptions, ConfigError, did_you_mean

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Components of one kind ('scheme', 'policy', 'loss'), looked up by name."""

    def __init__(self, kind: str, default: str):
        self.kind = kind
        self.default = default
        self._entries: dict[str, T] = {}

    def add(self, component: T) -> T:
        """Register `component` under `component.name` (usable as a class decorator)."""
        name = getattr(component, "name", None)
        options = getattr(component, "Options", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} needs a class attribute `name`, {component!r} has none")
        if not (isinstance(options, type) and issubclass(options, ComponentOptions)):
            raise TypeError(
                f"{self.kind} {name!r} needs an `Options` dataclass subclassing ComponentOptions"
            )
        if options().name != name:
            raise TypeError(
                f"{self.kind} {name!r}: its Options default `name` is {options().name!r}"
            )
        if name in self._entries and self._entries[name] is not component:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered ({self._entries[name]!r})"
            )
        self._entries[name] = component
        return component

    def remove(self, name: str) -> None:
        del self._entries[name]

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
                + did_you_mean(name, self.names())
            )
        return self._entries[name]

    def options(self, name: str) -> type[ComponentOptions]:
        return self.get(name).Options

    def names(self) -> list[str]:
        return list(self._entries)

    def owners(self, key: str) -> list[str]:
        """Names of the components that have an option called `key`."""
        return [
            name
            for name, c in self._entries.items()
            if key in {f.name for f in dataclasses.fields(c.Options)}
        ]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())
