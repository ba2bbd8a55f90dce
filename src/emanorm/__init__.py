"""emanorm: self- and semi-supervised learning with EMA teachers and EMAN."""

from emanorm.teacher import (
    NORM_MODES,
    TEACHER_MODES,
    EMATeacher,
    NoBatchNormWarning,
    TeacherMode,
    cosine_momentum,
    ema_update_,
    warmup_momentum,
)
from emanorm.teacher_check import TeacherReport, inspect_teacher

__all__ = [
    "NORM_MODES",
    "TEACHER_MODES",
    "EMATeacher",
    "NoBatchNormWarning",
    "TeacherMode",
    "TeacherReport",
    "cosine_momentum",
    "ema_update_",
    "inspect_teacher",
    "warmup_momentum",
]
__version__ = "0.1.0"
