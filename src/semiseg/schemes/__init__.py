"""Training schemes, looked up by `scheme.name`."""

from semiseg.schemes.base import Scheme, StepOutput, unwrap
from semiseg.schemes.supervised import SupervisedScheme

SCHEMES: dict[str, type[Scheme]] = {"supervised": SupervisedScheme}


def get_scheme(name: str) -> type[Scheme]:
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; available: {sorted(SCHEMES)}")
    return SCHEMES[name]


__all__ = ["SCHEMES", "Scheme", "StepOutput", "SupervisedScheme", "get_scheme", "unwrap"]
