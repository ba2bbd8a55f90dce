"""Training methods: one small file per method on :class:`~emanorm.methods.base.Method`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from emanorm.methods.base import ALL_NORMS, TEACHER_NORMS, Method, NormPlan, Projected, plan_norm
from emanorm.methods.byol import BYOL
from emanorm.methods.dino import DINO
from emanorm.methods.fixmatch import FixMatch
from emanorm.methods.meanteacher import MeanTeacher
from emanorm.methods.moco import MoCo
from emanorm.methods.mocov3 import MoCoV3
from emanorm.methods.supervised import Supervised
from emanorm.models import Classifier

#: Method name -> class: the one registry (the CLI's choices, the config's checks and ``compare``
#: derive from it; a new method is one file plus one line here).
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FixMatch, MoCo, BYOL, MeanTeacher, Supervised, DINO, MoCoV3)
}
#: The methods trained with labels (judged by test accuracy), from each class's ``semi_supervised``.
SEMI_SUPERVISED: tuple[str, ...] = tuple(name for name, cls in METHODS.items() if cls.semi_supervised)


def build_method(
    name: str,
    *,
    backbone_factory: Callable[[str], nn.Module],
    num_classes: int,
    norm: str,
    momentum: float,
    eman_momentum: float | None,
    bn_momentum: float,
    bn_splits: int = 1,
    **options: Any,
) -> Method:
    """Build method ``name`` (a key of :data:`METHODS`) with the ``--norm`` plan ``norm``.

    ``backbone_factory(kind)`` returns a fresh backbone with norm layers ``kind`` (``bn``,
    ``sync_bn``, ``gn``, ``in``) and a ``feature_dim``. ``momentum`` is the teacher's parameter
    momentum (BYOL: the base of the cosine schedule), ``eman_momentum`` the EMAN statistics
    momentum (``None``: same as the parameters'), ``bn_momentum`` PyTorch's BN momentum,
    ``bn_splits`` the number of splits of each rank's batch that BatchNorm normalises separately
    (the paper's per-GPU BN on one process; 1: the whole batch). Unknown options or an invalid
    ``(name, norm)`` pair raise ``ValueError``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name](
        backbone_factory=backbone_factory, num_classes=num_classes, norm=norm, momentum=momentum,
        eman_momentum=eman_momentum, bn_momentum=bn_momentum, bn_splits=bn_splits,
        **options,
    )


__all__ = [
    "ALL_NORMS",
    "BYOL",
    "DINO",
    "METHODS",
    "SEMI_SUPERVISED",
    "TEACHER_NORMS",
    "Classifier",
    "FixMatch",
    "MeanTeacher",
    "Method",
    "MoCo",
    "MoCoV3",
    "NormPlan",
    "Projected",
    "Supervised",
    "build_method",
    "plan_norm",
]
