"""Evaluation of frozen or fine-tuned backbones: kNN, retrieval, linear, fine-tuning, low-shot, export.

See docs/evaluation.md for each protocol and how it relates to the paper's.

The names load lazily (PEP 562): the command line reads the defaults it shows in ``--help``
without importing torch or scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emanorm._lazy import lazy_package

_MODULES = {
    "export": ("EXPORT_FORMATS", "backbone_state_dict", "export_backbone", "load_exported"),
    "features": (
        "TensorImages", "assert_frozen", "assert_state_unchanged", "dataset_batches", "extract_features",
        "iterate_dataset", "resolve_device", "state_snapshot",
    ),
    "finetune": ("DEFAULT_BACKBONE_LRS", "BackboneClassifier", "finetune", "train_finetune"),
    "knn": ("knn_accuracy", "knn_predict"),
    "linear": ("DEFAULT_LINEAR_LRS", "linear_probe", "stratified_split", "topk_accuracies", "train_linear"),
    "lowshot": (
        "DEFAULT_COSTS", "DEFAULT_SHOTS", "LowShotTask", "MulticlassSVMTask", "MultiLabelSVM",
        "MultiLabelSVMTask", "class_average_precisions", "lowshot_svm", "select_cost",
    ),
    "monitor": ("knn_monitor",),
    "retrieval": ("retrieval_scores",),
    "settings": ("FinetuneSettings", "LinearSettings", "ProbeSettings"),
}
_WHERE = {name: f"emanorm.evaluation.{module}" for module, names in _MODULES.items() for name in names}
lazy_package(__name__, _WHERE)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from emanorm.evaluation.export import EXPORT_FORMATS, backbone_state_dict, export_backbone, load_exported
    from emanorm.evaluation.features import (
        TensorImages,
        assert_frozen,
        assert_state_unchanged,
        dataset_batches,
        extract_features,
        iterate_dataset,
        resolve_device,
        state_snapshot,
    )
    from emanorm.evaluation.finetune import DEFAULT_BACKBONE_LRS, BackboneClassifier, finetune, train_finetune
    from emanorm.evaluation.knn import knn_accuracy, knn_predict
    from emanorm.evaluation.linear import (
        DEFAULT_LINEAR_LRS,
        linear_probe,
        stratified_split,
        topk_accuracies,
        train_linear,
    )
    from emanorm.evaluation.lowshot import (
        DEFAULT_COSTS,
        DEFAULT_SHOTS,
        LowShotTask,
        MulticlassSVMTask,
        MultiLabelSVM,
        MultiLabelSVMTask,
        class_average_precisions,
        lowshot_svm,
        select_cost,
    )
    from emanorm.evaluation.monitor import knn_monitor
    from emanorm.evaluation.retrieval import retrieval_scores
    from emanorm.evaluation.settings import FinetuneSettings, LinearSettings, ProbeSettings

__all__ = [
    "DEFAULT_BACKBONE_LRS",
    "DEFAULT_COSTS",
    "DEFAULT_LINEAR_LRS",
    "DEFAULT_SHOTS",
    "EXPORT_FORMATS",
    "BackboneClassifier",
    "FinetuneSettings",
    "LinearSettings",
    "LowShotTask",
    "MultiLabelSVM",
    "MultiLabelSVMTask",
    "MulticlassSVMTask",
    "ProbeSettings",
    "TensorImages",
    "assert_frozen",
    "assert_state_unchanged",
    "backbone_state_dict",
    "class_average_precisions",
    "dataset_batches",
    "export_backbone",
    "extract_features",
    "finetune",
    "iterate_dataset",
    "knn_accuracy",
    "knn_monitor",
    "knn_predict",
    "linear_probe",
    "load_exported",
    "lowshot_svm",
    "resolve_device",
    "retrieval_scores",
    "select_cost",
    "state_snapshot",
    "stratified_split",
    "topk_accuracies",
    "train_finetune",
    "train_linear",
]
