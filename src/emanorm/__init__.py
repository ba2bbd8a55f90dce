"""emanorm: self- and semi-supervised learning with EMA teachers and EMAN."""

from emanorm.teacher import NORM_MODES, EMATeacher, cosine_momentum, warmup_momentum

__all__ = ["NORM_MODES", "EMATeacher", "cosine_momentum", "warmup_momentum"]
__version__ = "0.1.0"
