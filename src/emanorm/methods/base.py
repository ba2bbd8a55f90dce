"""The shared base of every method: options, the normalization plan, the teacher, helpers.

A method is an ``nn.Module`` holding a trainable student (plus heads) and, for the EMA-teacher
methods, an :class:`~emanorm.teacher.EMATeacher`. ``training_step(batch, step)`` returns the
loss and a dict of 0-d tensor logs (converted to numbers by the trainer at its log steps only, so a
step never waits for the device); ``before_optimizer_step()`` runs between the (last micro-batch's)
backward and ``optimizer.step()``, on the all-reduced, unscaled gradients (DINO clips and freezes
there); ``after_step(step, total_steps)`` runs after ``optimizer.step()`` and moves the teacher.
What a step contributes to once-a-step work (MoCo's keys, DINO's centre) is :meth:`Method.stash`-ed
by every micro-batch and applied once in ``after_step``, so gradient accumulation is the same
optimisation as one step on the whole batch. ``forward`` is ``training_step`` so that
``DistributedDataParallel`` can wrap the whole method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.calibration import calibrate_batchnorm
from emanorm.catalog import ALL_NORMS, NORM_PLANS, TEACHER_NORMS
from emanorm.methods.tensors import batch_get, cat_for_splits, split_from_splits
from emanorm.models import Classifier
from emanorm.norms import convert_norm, convert_to_split_bn, is_distributed, shuffle_batch, unshuffle_batch
from emanorm.optim import parameter_groups
from emanorm.teacher import EMATeacher, warmup_momentum

BackboneFactory = Callable[[str], nn.Module]

__all__ = [
    "ALL_NORMS",
    "TEACHER_NORMS",
    "Classifier",
    "Method",
    "NormPlan",
    "Projected",
    "plan_norm",
]


@dataclass(frozen=True)
class NormPlan:
    """What one ``--norm`` value means for one method.

    Attributes:
        norm: the value asked for (``default`` included).
        resolved: ``norm`` with ``default`` replaced by the method's own default; FixMatch keeps
            ``default`` (its teacher-free form).
        layer_kind: the norm layers the backbone is built with (``bn``/``sync_bn``/``gn``/``in``).
        teacher_mode: the :class:`EMATeacher` mode, or ``None`` where the form has no teacher.
        shuffle: the teacher's input is shuffled across the (global) batch (ShuffleBN).
        num_splits: ``> 1`` where the BN layers of the backbone compute statistics per sub-batch
            (ShuffleBN on one process, emulating ``num_splits`` GPUs); ``1`` otherwise.
    """

    norm: str
    resolved: str
    layer_kind: str
    teacher_mode: str | None
    shuffle: bool = False
    num_splits: int = 1


def plan_norm(
    method: str,
    norm: str,
    *,
    allowed: Sequence[str],
    default: str,
    num_splits: int = 1,
    bn_splits: int = 1,
) -> NormPlan:
    """Resolve ``norm`` for ``method`` (Table 1 / Table 8 of the paper); ``ValueError`` if not allowed.

    ``num_splits`` is ShuffleBN's emulated GPU count on one process; ``bn_splits`` makes every
    other BatchNorm plan compute batch statistics per split of each rank's batch, unshuffled: the
    paper's per-GPU BN emulated on one process (with DDP: splits per rank).
    """
    if norm not in allowed:
        raise ValueError(f"norm {norm!r} is not valid for method {method!r}; allowed: {', '.join(allowed)}")
    resolved = default if norm == "default" else norm
    # NORM_PLANS: the layer kind and teacher mode of each value ("default" left: FixMatch's own
    # form, one network and no teacher)
    choice = NORM_PLANS[resolved]
    kind = choice.layer_kind
    if choice.shuffle:
        if bn_splits > 1:
            raise ValueError("bn_splits does not combine with shuffle_bn (it splits BN with num_splits)")
        # Under DDP every rank's plain BN is already "per GPU"; on one process split BN emulates it.
        splits = 1 if is_distributed() else int(num_splits)
        return NormPlan(norm, resolved, kind, choice.teacher_mode, shuffle=True, num_splits=splits)
    if bn_splits > 1 and kind != "bn":
        raise ValueError(
            f"bn_splits={bn_splits} needs BatchNorm layers; norm {resolved!r} builds {kind} layers"
        )
    return NormPlan(norm, resolved, kind, choice.teacher_mode, num_splits=bn_splits)


def _check_option(method: str, name: str, value: Any, default: Any) -> Any:
    """Type-check one option against its default's type (ints are accepted for floats)."""
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(
            f"option {name!r} of method {method!r} must be "
            f"{'a finite number' if isinstance(default, float) else type(default).__name__}, got {value!r}"
        )
    return value


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """``ValueError`` naming the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_range(
    name: str, value: float, low: float, high: float = float("inf"), *, low_open: bool = False
) -> None:
    """``ValueError`` unless ``low <= value <= high`` (``low < value`` with ``low_open``); NaN is refused."""
    if math.isnan(value) or (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")


# -- small modules shared by the methods -----------------------------------------------------
# ``Classifier`` (backbone + ``fc``) comes from emanorm.models and is re-exported here.
class Projected(nn.Module):
    """``backbone`` followed by a projection ``head`` (MoCo's MLP, BYOL's projector)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


# -- the base class --------------------------------------------------------------------------
class Method(nn.Module):
    """Base class: option checking, the norm plan, student/teacher construction and the API.

    Subclasses set ``name``, ``NORMS`` (allowed ``--norm`` values), ``DEFAULT_NORM``,
    ``OPTIONS`` (name -> default), the view dicts, and implement ``training_step``.
    """

    name: ClassVar[str] = "method"
    NORMS: ClassVar[tuple[str, ...]] = ALL_NORMS
    DEFAULT_NORM: ClassVar[str] = "bn"
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: Inclusive bounds of numeric options, checked with the config before anything is built.
    OPTION_RANGES: ClassVar[dict[str, tuple[float, float]]] = {}
    labeled_views: ClassVar[dict[str, str]] = {}
    unlabeled_views: ClassVar[dict[str, str]] = {}
    #: Trained with labels and judged by test accuracy (FixMatch, Mean Teacher, supervised); the
    #: trainer, the monitor and ``compare`` read it from here.
    semi_supervised: ClassVar[bool] = False

    def __init__(
        self,
        *,
        backbone_factory: BackboneFactory,
        num_classes: int,
        norm: str,
        momentum: float,
        eman_momentum: float | None,
        bn_momentum: float,
        bn_splits: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            allowed = ", ".join(f"{k}={v!r}" for k, v in self.OPTIONS.items()) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method {self.name!r}; allowed: {allowed}"
            )
        self.options: dict[str, Any] = {
            k: _check_option(self.name, k, options.get(k, d), d) for k, d in self.OPTIONS.items()
        }
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        check_range("momentum", float(momentum), 0.0, 1.0)
        check_range("bn_momentum", float(bn_momentum), 0.0, 1.0)
        if eman_momentum is not None:
            check_range("eman_momentum", float(eman_momentum), 0.0, 1.0)
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        self.eman_momentum = None if eman_momentum is None else float(eman_momentum)
        self.bn_momentum = float(bn_momentum)
        self.backbone_factory = backbone_factory
        self.plan = plan_norm(
            self.name, norm, allowed=self.NORMS, default=self.default_norm(),
            num_splits=self.options.get("num_splits", 1), bn_splits=int(bn_splits),
        )
        self.teacher: EMATeacher | None = None
        #: The momentum of the latest teacher update (``nan`` before the first one).
        self.current_momentum = float("nan")
        # What the micro-batches of real step ``_stash_step`` contributed to its once-a-step work.
        self._stash: dict[str, list[Any]] = {}
        self._stash_step: int | None = None

    def default_norm(self) -> str:
        """What ``--norm default`` resolves to here (``DEFAULT_NORM``; a method may depend on DDP)."""
        return self.DEFAULT_NORM

    # -- construction helpers ----------------------------------------------------------------
    def make_backbone(self) -> nn.Module:
        """A fresh backbone with the plan's norm layers."""
        backbone = self.backbone_factory(self.plan.layer_kind)
        if not hasattr(backbone, "feature_dim"):
            raise ValueError("backbone_factory must return a module with a feature_dim attribute")
        return backbone

    def prepare_student(self, student: nn.Module, heads: Sequence[nn.Module] = ()) -> nn.Module:
        """Give ``heads`` the backbone's norm kind and apply split BN / BN momentum to ``student``.

        ``heads`` are the parts not made by ``backbone_factory`` (MLP heads with BatchNorm1d): they
        get GN/IN for the ``gn``/``in`` plans and SyncBN under DDP for ``sync_bn`` (on one process
        the factory's backbone falls back to BN, and so do the heads).
        """
        kind = self.plan.layer_kind
        if kind in ("gn", "in") or (kind == "sync_bn" and is_distributed()):
            for head in heads:
                convert_norm(head, kind)
        if self.plan.num_splits > 1:
            # bn_splits emulates per-GPU BN everywhere, heads included; ShuffleBN only in the
            # backbone, as MoCo's single-device demo (its heads have no BN)
            student = convert_to_split_bn(student, self.plan.num_splits, one_d=not self.plan.shuffle)
        # bn_momentum is PyTorch's BN momentum of every layer that collects running statistics:
        # the student's too, whose statistics EMAN averages and student PN copies (Table 8's alpha).
        for layer in student.modules():
            if isinstance(layer, _BatchNorm):
                layer.momentum = self.bn_momentum
        return student

    def build_predicting_student(
        self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module
    ) -> None:
        """BYOL's and MoCo v3's networks: ``student`` (backbone + projector), its ``predictor``
        (prepared together, heads included) and an EMA ``teacher`` of the student without it."""
        online = self.prepare_student(nn.ModuleDict(
            {"network": Projected(backbone, projector), "predictor": predictor}
        ), heads=[projector, predictor])
        self.student = online["network"]
        self.predictor = online["predictor"]
        self.teacher = self.make_teacher(self.student)

    def make_teacher(self, student: nn.Module, mode: str | None = None) -> EMATeacher:
        """An :class:`EMATeacher` of ``student`` in the plan's mode (or ``mode``)."""
        return EMATeacher(
            student,
            norm=mode or self.plan.teacher_mode or "bn",
            momentum=self.momentum,
            buffer_momentum=self.eman_momentum,
            bn_momentum=self.bn_momentum,
        )

    # -- the API -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch and its logs (0-d tensors, :func:`log_values`)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``training_step``: lets ``DistributedDataParallel`` wrap the method."""
        return self.training_step(batch, step)

    def before_optimizer_step(self) -> None:
        """Called once per real step after the backward of its last micro-batch, after the DDP
        gradient all-reduce and after ``GradScaler.unscale_``, before ``optimizer.step()``: the
        place to change gradients (DINO clips and freezes here). Nothing by default."""

    # -- once-a-step work under gradient accumulation ------------------------------------------
    def first_micro_batch(self, step: int) -> bool:
        """True unless a micro-batch of real step ``step`` has already :meth:`stash`-ed something
        (MoCo moves its teacher on the first micro-batch only)."""
        return self._stash_step != step

    def stash(self, step: int, **values: Any) -> None:
        """Keep what this (micro-)batch contributes to real step ``step``'s once-a-step work; every
        micro-batch of the step adds its share and ``after_step`` applies them all once
        (:meth:`take_stash`). A stash of an earlier step that never finished is dropped."""
        if self._stash_step != step:
            self._stash, self._stash_step = {}, step
        for key, value in values.items():
            self._stash.setdefault(key, []).append(value.detach() if isinstance(value, Tensor) else value)

    def take_stash(self) -> dict[str, list[Any]]:
        """Every micro-batch's stashed values of the step just taken, in order; empties the stash."""
        stash, self._stash, self._stash_step = self._stash, {}, None
        return stash

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after ``optimizer.step()`` with the index of that step: moves the teacher."""
        if self.teacher is not None:
            self.update_teacher(step, total_steps)

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` when a batch of ``batch_size`` images (per rank) cannot train this
        method (called before training starts, so a bad setting fails before any file is written)."""
        splits = self.plan.num_splits
        if splits > 1 and batch_size % splits:
            raise ValueError(f"batch size {batch_size} is not divisible by the {splits} BN splits")

    def momentum_at(self, step: int, total_steps: int | None = None) -> float:
        """The teacher momentum of ``step``: constant, optionally with Mean Teacher's warm-up."""
        m = self.momentum
        if self.options.get("momentum_warmup", False):
            m = warmup_momentum(m, step)
        return m

    @torch.no_grad()
    def update_teacher(self, step: int, total_steps: int | None = None) -> None:
        """One EMA step of the teacher towards the student."""
        assert self.teacher is not None
        m = self.momentum_at(step, total_steps)
        self.teacher.update(self.teacher_source(), m)
        self.current_momentum = m

    def teacher_source(self) -> nn.Module:
        """The student-side module the teacher mirrors."""
        return self.student

    def ema_copies(self) -> list[EMATeacher]:
        """Every EMA copy of :meth:`teacher_source` (the teacher; FixMatch's ``eval_ema``)."""
        return [self.teacher] if self.teacher is not None else []

    def calibration_inputs(self, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """The inputs of the student's training forwards on ``batch`` whose BatchNorm statistics
        its running averages track (one tensor per forward), for :meth:`calibrate_statistics`."""
        raise NotImplementedError(f"method {self.name!r} does not say which inputs calibrate its BatchNorm")

    @torch.no_grad()
    def calibrate_statistics(self, batches: Iterable[Mapping[str, Tensor]]) -> int:
        """Set the student's BN running statistics from ``batches`` (cumulative average, no
        gradient, :func:`emanorm.calibrate_batchnorm`), then give them to every EMA copy, so an
        EMAN / PN teacher does not start from mean 0 / variance 1. Returns the number of
        forwards used (0 for a model without BatchNorm running statistics)."""
        source = self.teacher_source()
        inputs = (x for batch in batches for x in self.calibration_inputs(batch))
        count = calibrate_batchnorm(source, inputs)
        for copy in self.ema_copies():
            copy.copy_statistics_(source)
        return count

    def teacher_forward(self, x: Tensor) -> Tensor:
        """The teacher's output on ``x`` (no gradient), shuffled and unshuffled for ShuffleBN."""
        assert self.teacher is not None
        with torch.no_grad():
            if self.plan.shuffle:
                shuffled, index = shuffle_batch(x)
                return unshuffle_batch(self.teacher(shuffled), index)
            return self.teacher(x)

    def student_forward(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """One student forward over ``cat(parts)``; returns one output per part."""
        splits = self.plan.num_splits
        out = self.student(cat_for_splits(parts, splits))
        return split_from_splits(out, [p.shape[0] for p in parts], splits)

    def encoder(self, which: str = "teacher") -> nn.Module:
        """The backbone (images -> pooled features) of the teacher or the student, for evaluation.

        The live module is returned: evaluation code that trains it must copy it first.
        """
        check_choice("which", which, ("teacher", "student"))
        if which == "teacher" and self.teacher is not None:
            return self.teacher.module.backbone
        return self.student.backbone

    def classifier(self, which: str = "teacher") -> nn.Module | None:
        """Images -> logits for the semi-supervised methods (``None`` for the self-supervised)."""
        check_choice("which", which, ("teacher", "student"))
        return None

    def trainable_modules(self) -> list[nn.Module]:
        """The modules the optimiser trains (never the teacher)."""
        return [self.student]

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups; bias and norm parameters excluded when the option says so."""
        groups = parameter_groups(
            nn.ModuleList(self.trainable_modules()), weight_decay,
            exclude_bias_and_norm=self.options.get("exclude_bias_and_norm", False),
            exclude_1d=self.options.get("exclude_1d_params", False),
        )
        for group in groups:  # the teacher is never trained, whatever the groups helper does
            group["params"] = [p for p in group["params"] if p.requires_grad]
        return [g for g in groups if g["params"]]

    # -- EMATeacher works around ----------------------------------------------------------------
    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"norm={self.plan.norm!r} (resolved {self.plan.resolved!r}), {opts}"


@dataclass(frozen=True)
class CrossViewOutputs:
    """The forwards of BYOL and MoCo v3 on two views: student projections ``z1``, predictions
    ``p1``/``p2`` and teacher targets ``t1``/``t2`` (a prediction meets the other view's target)."""

    z1: Tensor
    p1: Tensor
    p2: Tensor
    t1: Tensor
    t2: Tensor


def cross_view_forwards(
    batch: Mapping[str, Tensor],
    method: str,
    student: Callable[[Tensor], Tensor],
    predictor: Callable[[Tensor], Tensor],
    teacher_forward: Callable[[Tensor], Tensor],
) -> CrossViewOutputs:
    """One forward per view (each view's BN statistics stay its own, as in BYOL and MoCo v3), in
    the order both reference codes run them: student view1, view2, then teacher view1, view2."""
    view1 = batch_get(batch, "view1", method)
    view2 = batch_get(batch, "view2", method)
    z1 = student(view1)
    p1 = predictor(z1)
    p2 = predictor(student(view2))
    return CrossViewOutputs(z1=z1, p1=p1, p2=p2, t1=teacher_forward(view1), t2=teacher_forward(view2))
