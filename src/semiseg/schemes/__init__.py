"""Training schemes, looked up by `scheme.name`."""

from semiseg.schemes.base import Scheme, StepOutput, unwrap
from semiseg.schemes.cps import CPSScheme
from semiseg.schemes.fixmatch import FixMatchScheme
from semiseg.schemes.mean_teacher import MeanTeacherScheme
from semiseg.schemes.self_training import SelfTrainingScheme
from semiseg.schemes.semi import SemiScheme
from semiseg.schemes.stpg import STPGScheme
from semiseg.schemes.supervised import SupervisedScheme
from semiseg.schemes.unimatch import UniMatchScheme

SCHEMES: dict[str, type[Scheme]] = {
    "supervised": SupervisedScheme,
    "fixmatch": FixMatchScheme,
    "unimatch": UniMatchScheme,
    "mean_teacher": MeanTeacherScheme,
    "cps": CPSScheme,
    "self_training": SelfTrainingScheme,
    "stpg": STPGScheme,
}


def get_scheme(name: str) -> type[Scheme]:
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; available: {sorted(SCHEMES)}")
    return SCHEMES[name]


__all__ = [
    "SCHEMES",
    "CPSScheme",
    "FixMatchScheme",
    "MeanTeacherScheme",
    "Scheme",
    "SelfTrainingScheme",
    "SemiScheme",
    "STPGScheme",
    "StepOutput",
    "SupervisedScheme",
    "UniMatchScheme",
    "get_scheme",
    "unwrap",
]
