"""Training schemes, looked up by `scheme.name` in `SCHEMES`; adding one is its module plus
one line here."""

from semiseg.registry import Registry
from semiseg.schemes.base import Scheme, SchemeOptions, StepOutput, Views, unwrap
from semiseg.schemes.cps import CPSScheme
from semiseg.schemes.fixmatch import FixMatchScheme
from semiseg.schemes.mean_teacher import MeanTeacherScheme
from semiseg.schemes.self_training import SelfTrainingScheme
from semiseg.schemes.semi import SemiOptions, SemiScheme
from semiseg.schemes.stpg import STPGScheme
from semiseg.schemes.supervised import SupervisedScheme
from semiseg.schemes.teaching import Teaching
from semiseg.schemes.unimatch import UniMatchScheme

SCHEMES: Registry[type[Scheme]] = Registry("scheme", default="supervised")
SCHEMES.add(SupervisedScheme)
SCHEMES.add(FixMatchScheme)
SCHEMES.add(UniMatchScheme)
SCHEMES.add(MeanTeacherScheme)
SCHEMES.add(CPSScheme)
SCHEMES.add(SelfTrainingScheme)
SCHEMES.add(STPGScheme)


def get_scheme(name: str) -> type[Scheme]:
    return SCHEMES.get(name)


__all__ = [
    "SCHEMES",
    "CPSScheme",
    "FixMatchScheme",
    "MeanTeacherScheme",
    "Scheme",
    "SchemeOptions",
    "SelfTrainingScheme",
    "SemiOptions",
    "SemiScheme",
    "STPGScheme",
    "StepOutput",
    "SupervisedScheme",
    "Teaching",
    "UniMatchScheme",
    "Views",
    "get_scheme",
    "unwrap",
]
