"""emanorm: self- and semi-supervised learning with EMA teachers and EMAN."""

import os
import sys

# OpenMP threads that wait actively for work spin on a shared CPU and slow every process on it
# (benchmarks/thread_policy.py, docs/performance.md); passive waiting changes no result. It only
# takes effect before torch loads its OpenMP runtime, so it is set here, before torch is imported,
# and never over a value the user chose.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from emanorm.calibration import calibrate_batchnorm
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
    "calibrate_batchnorm",
    "cosine_momentum",
    "ema_update_",
    "inspect_teacher",
    "warmup_momentum",
]
__version__ = "0.1.0"
