"""emanorm: self- and semi-supervised learning with EMA teachers and EMAN.

The public names load lazily (PEP 562): ``import emanorm`` imports no torch until one of them is
used, so the ``emanorm`` command answers ``--version``, ``--help`` and bad arguments at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emanorm._lazy import lazy_package

__version__ = "0.1.0"

_WHERE = {
    "NORM_MODES": "emanorm.catalog",
    "TEACHER_MODES": "emanorm.catalog",
    "TeacherMode": "emanorm.catalog",
    "calibrate_batchnorm": "emanorm.calibration",
    "EMATeacher": "emanorm.teacher",
    "NoBatchNormWarning": "emanorm.teacher",
    "cosine_momentum": "emanorm.teacher",
    "ema_update_": "emanorm.teacher",
    "warmup_momentum": "emanorm.teacher",
    "TeacherReport": "emanorm.teacher_check",
    "inspect_teacher": "emanorm.teacher_check",
}
lazy_package(__name__, _WHERE)
__all__ = [
    "NORM_MODES",
    "TEACHER_MODES",
    "EMATeacher",
    "NoBatchNormWarning",
    "TeacherMode",
    "TeacherReport",
    "calibrate_batchnorm",
    "cosine_momentum",
    "ema_update_",
    "inspect_teacher",
    "warmup_momentum",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from emanorm.calibration import calibrate_batchnorm
    from emanorm.catalog import NORM_MODES, TEACHER_MODES, TeacherMode
    from emanorm.teacher import EMATeacher, NoBatchNormWarning, cosine_momentum, ema_update_, warmup_momentum
    from emanorm.teacher_check import TeacherReport, inspect_teacher
