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

__all__ = [
    "NORM_MODES",
    "TEACHER_MODES",
    "EMATeacher",
    "NoBatchNormWarning",
    "TeacherMode",
    "cosine_momentum",
    "ema_update_",
    "warmup_momentum",
]
__version__ = "0.1.0"
