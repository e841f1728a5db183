"""Configs in the layout semiseg used before components owned their options.

That layout had one flat `policy` and `loss` section holding every policy's and loss's
fields, every scheme's fields in `scheme`, and top-level `stpg`, `selftrain` and
`detector` sections whatever ran. Checkpoints and run folders written then store it; so
that they still resume, evaluate and plot, `upgrade` moves those sections to the component
they belong to and drops the fields the chosen components do not take (they were ignored
then). A YAML file a user writes gets no silent upgrade: `moved_section` turns the unknown
key into an error that says where its options live now.
"""

from __future__ import annotations

import copy
import dataclasses

MOVED = {
    "stpg": (
        "scheme",
        "stpg",
        "its options are now those of scheme 'stpg': put them under `scheme:`",
    ),
    "selftrain": (
        "scheme",
        "self_training",
        "its options are now those of scheme 'self_training': put them under `scheme:`",
    ),
    "detector": (
        "policy.detector",
        "rankweight",
        "the detector belongs to policy 'rankweight': put it under `policy:` as `detector:`",
    ),
}


def moved_section(key: str) -> str | None:
    """The error message for a top-level section of the old layout, or None."""
    if key not in MOVED:
        return None
    return f"the top-level section '{key}' is gone: {MOVED[key][2]}"


def is_legacy(data: dict) -> bool:
    return isinstance(data, dict) and any(key in data for key in MOVED)


def upgrade_values(data: dict) -> dict:
    """Option values whose type changed since: FPL's `loss.rescale` was a bool, True being
    what is now 'each' (every view scaled to its own weighted cross-entropy)."""
    loss = data.get("loss") if isinstance(data, dict) else None
    if isinstance(loss, dict) and isinstance(loss.get("rescale"), bool):
        data = {**data, "loss": {**loss, "rescale": "each" if loss["rescale"] else "off"}}
    return data


def upgrade(data: dict) -> dict:
    """A saved config of the old layout, or with old option values, in the current one;
    other configs as they are."""
    data = upgrade_values(data)
    if not is_legacy(data):
        return data
    from semiseg.config import registries

    data = copy.deepcopy(data)
    found = registries()
    scheme = dict(data.get("scheme") or {})
    scheme_name = scheme.get("name", found["scheme"].default)
    policy = data.get("policy")
    for key, (target, owner, _) in MOVED.items():
        section = data.pop(key, None) or {}
        if target == "scheme" and scheme_name == owner:
            scheme.update(section)
        elif (
            target == "policy.detector" and isinstance(policy, dict) and policy.get("name") == owner
        ):
            policy["detector"] = section
    data["scheme"] = scheme
    teaches = scheme_name in found["scheme"] and found["scheme"].get(scheme_name).teaches
    for kind in ("scheme", "policy", "loss"):
        section = data.get(kind)
        if kind != "scheme" and not teaches:
            data[kind] = None
            continue
        if not isinstance(section, dict):
            continue
        name = section.get("name", found[kind].default)
        if name not in found[kind]:
            continue
        known = {f.name for f in dataclasses.fields(found[kind].options(name))}
        data[kind] = {k: v for k, v in section.items() if k in known}
    return data
