"""Backbones and heads."""

from emanorm.models.backbones import (
    BACKBONES,
    Classifier,
    ResNet2x,
    SmallResNet,
    WideResNet,
    build_backbone,
    build_classifier,
)
from emanorm.models.heads import DINOHead, MLPHead

__all__ = [
    "BACKBONES",
    "Classifier",
    "DINOHead",
    "MLPHead",
    "ResNet2x",
    "SmallResNet",
    "WideResNet",
    "build_backbone",
    "build_classifier",
]
