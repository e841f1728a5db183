"""What is registered, and which schemes, policies and unlabeled losses combine.

Everything here is read from the registries (`semiseg.schemes.SCHEMES`,
`semiseg.pseudo.POLICIES`, `semiseg.pseudo.LOSSES`): a component registered by a user
appears in `semiseg components` and in these tables like a built-in one. The README's
component tables are this module's output (`semiseg components --markdown`), kept equal by
a test.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from semiseg.config import Config, DataConfig, registries
from semiseg.options import ConfigError

SECTION_KINDS = ("scheme", "policy", "loss")


@dataclass(frozen=True)
class Combination:
    """One scheme x policy x loss; `policy`/`loss` None means the section is absent.
    `refused` is the reason the config is refused at load, None when it trains."""

    scheme: str
    policy: str | None
    loss: str | None
    refused: str | None


def combination_refusal(scheme: str, policy: str | None, loss: str | None) -> str | None:
    """Why a config of these components is refused at load (each component's
    `check_config` on the combination, every option at its default), or None."""
    found = registries()
    cfg = Config(
        data=DataConfig(root="-", labeled="-"),
        scheme=found["scheme"].options(scheme)(),
        policy=found["policy"].options(policy)() if policy is not None else None,
        loss=found["loss"].options(loss)() if loss is not None else None,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for kind in SECTION_KINDS:
                options = getattr(cfg, kind)
                if options is not None:
                    found[kind].get(options.name).check_config(cfg)
    except ConfigError as err:
        return str(err)
    return None


def combinations() -> list[Combination]:
    """Every registered scheme with every policy and loss, and with neither section."""
    found = registries()
    out = []
    for scheme in found["scheme"].names():
        out.append(Combination(scheme, None, None, combination_refusal(scheme, None, None)))
        for policy in found["policy"].names():
            for loss in found["loss"].names():
                out.append(
                    Combination(scheme, policy, loss, combination_refusal(scheme, policy, loss))
                )
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "{...}" if dataclasses.is_dataclass(value) else value
    return "required"


def _options(options_cls: type) -> str:
    cells = [
        f"`{f.name}` ({_default(f)})" for f in dataclasses.fields(options_cls) if f.name != "name"
    ]
    return ", ".join(cells) if cells else "-"


def options_text(options_cls: type) -> str:
    """The options and their defaults, as plain text."""
    cells = [f"{f.name}={_default(f)}" for f in dataclasses.fields(options_cls) if f.name != "name"]
    return ", ".join(cells) if cells else "none"


def combination_table() -> str:
    """Markdown: schemes down, policies across; a cell lists the losses that train."""
    found = registries()
    policies, losses = found["policy"].names(), found["loss"].names()
    results = {(c.scheme, c.policy, c.loss): c.refused for c in combinations()}
    header = (
        "| scheme | "
        + " | ".join(f"`{p}`" for p in policies)
        + " | no `policy`, no `loss` section |"
    )
    lines = [header, "|---|" + "---|" * (len(policies) + 1)]
    reasons: list[str] = []
    for scheme in found["scheme"].names():
        cells = []
        for policy in policies:
            working = [f"`{loss}`" for loss in losses if results[scheme, policy, loss] is None]
            refused = [
                results[scheme, policy, loss]
                for loss in losses
                if results[scheme, policy, loss] is not None
            ]
            if working:
                cells.append(", ".join(working))
            else:
                reason = refused[0]
                if reason not in reasons:
                    reasons.append(reason)
                cells.append(f"refused ({reasons.index(reason) + 1})")
        if results[scheme, None, None] is not None:
            cells.append("refused")
        elif found["scheme"].get(scheme).teaches:
            cells.append(f"the defaults, `{found['policy'].default}` and `{found['loss'].default}`")
        else:
            cells.append("trains")
        lines.append(f"| `{scheme}` | " + " | ".join(cells) + " |")
    notes = [f"({i}) {reason}" for i, reason in enumerate(reasons, start=1)]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def component_tables() -> str:
    """Markdown: each registered component, what it does and its options (defaults)."""
    parts = []
    for kind, registry in registries().items():
        lines = [f"| `{kind}.name` | what it does | options (default) |", "|---|---|---|"]
        for component in registry:
            lines.append(
                f"| `{component.name}` | {component.summary} | {_options(component.Options)} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def markdown() -> str:
    """The README's block: the component tables, then the combination table."""
    return (
        component_tables()
        + "\nWhich combinations train (a cell lists the unlabeled losses that do, with that "
        + "scheme and policy):\n\n"
        + combination_table()
    )


BEGIN, END = "<!-- components:begin -->", "<!-- components:end -->"


def readme_block(text: str) -> str:
    """The generated part of a README (between the markers, without them)."""
    if BEGIN not in text or END not in text:
        raise ConfigError(f"the README has no {BEGIN} ... {END} block")
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n") + "\n"


def with_readme_block(text: str) -> str:
    """`text` with its generated block replaced by the current tables."""
    readme_block(text)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{markdown()}{END}{tail}"
