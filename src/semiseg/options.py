"""Typed options of components (schemes, policies, unlabeled losses) and their errors.

Every component owns a dataclass of its options, beside its class, subclassing `Options`;
`semiseg.config` builds the one a config section names and checks every key and type
against it. `validate` adds the range checks a type annotation cannot express; it raises
`OptionError` with the bare option name, and the config prefixes the section
(`policy.momentum`). This module imports nothing heavy, so component modules and the
config can both depend on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """'; did you mean NAME?' when `word` looks like a typo of one of `choices`, else ''
    (appended to errors about unknown keys and names)."""
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending dotted key."""


class OptionError(ConfigError):
    """An option value out of its range: `key` is the option's name inside its section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key = key
        self.message = message


@dataclass
class Options:
    """Base of option dataclasses. Subclasses extend `validate` (calling super) with checks
    of their own fields."""

    def validate(self) -> None:
        """Raise `OptionError` for a value outside its range."""

    def require(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise OptionError(key, f"{message}, got {getattr(self, key)!r}")

    def positive(self, *keys: str) -> None:
        for key in keys:
            self.require(getattr(self, key) > 0, key, "must be positive")

    def probability(self, *keys: str) -> None:
        for key in keys:
            self.require(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")

    def decay(self, *keys: str) -> None:
        for key in keys:
            self.require(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")


@dataclass
class ComponentOptions(Options):
    """Options of a registered component: `name` picks the component in its registry."""

    name: str = ""
