"""The names emanorm knows, in one torch-free table: methods, norm plans, teacher modes, backbones,
datasets, loggers, augmentation options and the evaluation defaults the CLI shows.

The command line lists these choices in ``--help`` and checks a config against them before it
imports torch (``emanorm --help`` and a mistyped ``--norm`` answer at once). The registries that
build things stay beside the code that builds them (``emanorm.methods.METHODS``,
``emanorm.models.BACKBONES``, ``emanorm.data.DATASETS``, ...); ``tests/test_config_schema.py``
checks that every table here equals its registry, so a new method, backbone or dataset is one line here
beside its registry entry, and a forgotten line fails that test. This module imports nothing from
emanorm and nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- methods -------------------------------------------------------------------------------------
#: Every ``--method``, in the registry's order (``emanorm.methods.METHODS``).
METHOD_NAMES: tuple[str, ...] = ("fixmatch", "moco", "byol", "meanteacher", "supervised", "dino", "mocov3")
#: The methods trained with labels and judged by test accuracy (each class's ``semi_supervised``).
SEMI_SUPERVISED: tuple[str, ...] = ("fixmatch", "meanteacher", "supervised")
#: Inclusive bounds of numeric method options (each class's ``OPTION_RANGES``), checked with the
#: config before anything is built. DINO trains with 2 to 10 local crops; far more only multiplies
#: the cost of a step (100000: a hang).
METHOD_OPTION_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "dino": {"local_crops": (0, 64), "center_momentum": (0.0, 1.0)},
}

#: Each method's options and their defaults (each class's ``OPTIONS``; ``--method-arg``), so that
#: an unknown option is refused before torch loads.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "fixmatch": {
        "threshold": 0.95, "lambda_u": 1.0, "temperature": 1.0, "distribution": "none",
        "distribution_momentum": 0.999, "eval_ema": True, "num_splits": 8, "momentum_warmup": False,
        "exclude_bias_and_norm": False,
    },
    "moco": {
        "dim": 128, "queue_size": 65536, "temperature": 0.2, "symmetric": False, "num_splits": 8,
        "momentum_warmup": False, "exclude_bias_and_norm": False,
    },
    "byol": {
        "hidden_dim": 4096, "proj_dim": 256, "num_splits": 8, "momentum_warmup": False,
        "exclude_bias_and_norm": True,
    },
    "meanteacher": {
        "consistency": 100.0, "rampup_steps": 1000, "num_splits": 8, "momentum_warmup": False,
        "exclude_bias_and_norm": False,
    },
    "supervised": {"label_smoothing": 0.0, "exclude_bias_and_norm": False},
    "dino": {
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "head_batch_norm": False,
        "norm_last_layer": True, "local_crops": 8, "student_temp": 0.1, "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 30, "center_momentum": 0.9,
        "freeze_last_layer_epochs": 1, "clip_grad": 3.0, "local_crop_statistics": False, "num_splits": 8,
        "momentum_warmup": False, "exclude_bias_and_norm": True, "exclude_1d_params": False,
    },
    "mocov3": {
        "dim": 256, "hidden_dim": 4096, "temperature": 1.0, "projector_layers": 3, "predictor_layers": 2,
        "predictor_last_batch_norm": True, "cosine_momentum": True, "freeze_patch_embed": False,
        "zero_init_residual": False, "exclude_bias_and_norm": True,
    },
}


# -- teacher modes and norm plans --------------------------------------------------------------
@dataclass(frozen=True)
class TeacherMode:
    """What a teacher mode does with BatchNorm statistics.

    In every mode the parameters and the floating-point buffers other than BN statistics are
    averaged with the momentum ``m`` (Eq. 1), integer buffers (``num_batches_tracked``) are
    copied, and every layer but BatchNorm is in eval mode (no dropout, no drop-path).

    Attributes:
        statistics: where the BN running statistics come from: ``"average"`` (EMA of the
            student's, Eq. 9), ``"copy"`` (the student's, at every update), ``"batch"`` (BN's own
            update from the batches the teacher normalises) or ``"previous"`` (normalise with
            the statistics before this batch, then fold the batch in, Eq. 4).
        batch_statistics: BN normalises with the batch when the teacher is in training mode.
    """

    statistics: str
    batch_statistics: bool

    @property
    def collects(self) -> bool:
        """The teacher gathers its statistics itself from its inputs (``bn_momentum`` applies)."""
        return self.statistics in ("batch", "previous")

    @property
    def update_rule(self) -> str:
        """What an update does with the statistics: an ``ema_update_`` ``statistics`` rule."""
        return "keep" if self.collects else self.statistics


#: The teacher modes: EMAN (Eq. 8, 9) and the baselines of the paper's Tables 1 and 8.
TEACHER_MODES: dict[str, TeacherMode] = {
    "eman": TeacherMode(statistics="average", batch_statistics=False),
    "bn": TeacherMode(statistics="batch", batch_statistics=True),
    "student_pn": TeacherMode(statistics="copy", batch_statistics=False),
    "teacher_pn": TeacherMode(statistics="previous", batch_statistics=False),
}


@dataclass(frozen=True)
class NormChoice:
    """What one ``--norm`` value builds (before a method resolves ``default`` to its own choice).

    Attributes:
        layer_kind: the norm layers of the backbone: ``bn``, ``sync_bn``, ``gn`` or ``in``.
        teacher_mode: the key of :data:`TEACHER_MODES` the EMA teacher runs in; ``None`` for
            ``default`` (FixMatch's own form has no teacher; other methods resolve it first).
        shuffle: the teacher's input is shuffled across the batch (ShuffleBN).
    """

    layer_kind: str
    teacher_mode: str | None
    shuffle: bool = False


#: Every ``--norm`` value, in the order of the paper's Tables 1 and 8.
NORM_PLANS: dict[str, NormChoice] = {
    "default": NormChoice("bn", None),
    "bn": NormChoice("bn", "bn"),
    "sync_bn": NormChoice("sync_bn", "bn"),
    "shuffle_bn": NormChoice("bn", "bn", shuffle=True),
    "gn": NormChoice("gn", "bn"),
    "in": NormChoice("in", "bn"),
    "eman": NormChoice("bn", "eman"),
    "teacher_pn": NormChoice("bn", "teacher_pn"),
    "student_pn": NormChoice("bn", "student_pn"),
}

# The older names, derived from the two tables above (kept: tests, docs and users import them).
#: Every ``--norm`` value.
ALL_NORMS: tuple[str, ...] = tuple(NORM_PLANS)
#: Each method's ``--norm`` values (each class's ``NORMS``): the supervised baseline has no EMA
#: teacher to run in EMAN or PN mode; MoCo v3 keeps BatchNorm in its heads.
METHOD_NORMS: dict[str, tuple[str, ...]] = {
    **{name: ALL_NORMS for name in METHOD_NAMES},
    "supervised": ("default", "bn", "sync_bn", "gn", "in"),
    "mocov3": ("default", "bn", "sync_bn", "eman", "teacher_pn", "student_pn"),
}
#: Norms whose teacher normalises with running statistics (the EMATeacher modes of the same name).
TEACHER_NORMS: tuple[str, ...] = tuple(
    name for name, plan in NORM_PLANS.items()
    if plan.teacher_mode is not None and not TEACHER_MODES[plan.teacher_mode].batch_statistics
)
#: The :class:`EMATeacher` modes.
NORM_MODES: tuple[str, ...] = tuple(TEACHER_MODES)
#: The norm layer kinds a backbone can be built with.
NORM_KINDS: tuple[str, ...] = tuple(dict.fromkeys(plan.layer_kind for plan in NORM_PLANS.values()))


# -- models and data -----------------------------------------------------------------------------
#: ``--backbone`` (``emanorm.models.BACKBONES``); ``timm:`` / ``torchvision:`` take a model name.
BACKBONES: tuple[str, ...] = (
    "small", "resnet18", "resnet34", "resnet50", "resnet50x2", "resnet18_cifar", "resnet34_cifar",
    "resnet50_cifar", "wrn28_2", "timm:<name>", "torchvision:<name>",
)
#: ``--dataset`` (``emanorm.data.DATASETS``).
DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "folder", "voc2007")
#: Where Fashion-MNIST is read from without a ``data_dir`` (the Debian package
#: ``dataset-fashion-mnist``; ``emanorm.data.formats`` and the command line's early checks name it).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The layout a dataset read from files expects in its ``data_dir`` (the loaders' error messages,
#: and the command line's, which refuses a missing ``data_dir`` before torch loads).
FOLDER_LAYOUT = ("an ImageFolder tree DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (or test/), "
                 "or a flat folder of images (unlabeled)")
DATA_DIR_LAYOUTS: dict[str, str] = {
    "cifar10": "DIR/cifar-10-batches-py/ (python-pickle layout)",
    "cifar100": "DIR/cifar-100-python/ (python-pickle layout)",
    "stl10": "DIR/stl10_binary/ (binary layout)",
    "voc2007": "DIR/[VOCdevkit/]VOC2007/ (the devkit layout)",
    "imagenet": FOLDER_LAYOUT,
    "folder": FOLDER_LAYOUT,
}
#: The config's ``augment_options``: ``build_augmentation``'s keyword options and their type
#: (``pair``: a ``[low, high]`` range, checked where it is used).
AUGMENT_OPTIONS: dict[str, str] = {
    "blur": "bool", "cutout": "float", "global_scale": "pair", "local_scale": "pair", "local_size": "int",
    "crop_scale": "pair",
}


# -- running and evaluation ------------------------------------------------------------------------
#: What ``--logger`` may list (``emanorm.train.tracking``).
LOGGERS: tuple[str, ...] = ("jsonl", "tensorboard", "mlflow", "wandb")
#: ``emanorm eval PROTOCOL`` and ``--which`` (``emanorm.evaluation.context``).
EVAL_PROTOCOLS: tuple[str, ...] = ("knn", "linear", "finetune", "retrieval", "lowshot")
EVAL_NETWORKS: tuple[str, ...] = ("teacher", "student")
#: ``emanorm export --format`` (``emanorm.evaluation.export``).
EXPORT_FORMATS: tuple[str, ...] = ("torchvision", "safetensors")
#: The linear probe's learning-rate grid: covers the paper's MoCo grid {15, 30, 60} scale and its
#: BYOL grid {0.2, 0.4, 0.8} scale coarsely.
DEFAULT_LINEAR_LRS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: The paper's fine-tuning backbone-lr grid (Sec. 5.2).
DEFAULT_BACKBONE_LRS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
#: Images per class of the low-shot SVM evaluation.
DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
