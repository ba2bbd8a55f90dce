"""The EMA teacher and Exponential Moving Average Normalization (EMAN).

An EMA teacher is a frozen copy of the student whose parameters follow
``t = m * t + (1 - m) * s`` (Eq. 1 of the paper). EMAN makes the teacher's BatchNorm
layers follow the same rule for their statistics (Eq. 9) and normalise with those
statistics (Eq. 8) instead of with the batch, so a teacher output never depends on the
other samples of the batch. The other modes are the baselines the paper compares.

In standard terms, the ``eman`` mode is ``torch.optim.swa_utils.AveragedModel(student,
multi_avg_fn=get_ema_multi_avg_fn(m), use_buffers=True)`` kept in ``eval()`` mode (a test
checks it bitwise). A teacher is never stochastic: dropout and drop-path are off in every mode.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# The mode table is torch-free (the CLI lists and checks norms before importing torch).
from emanorm.catalog import NORM_MODES, TEACHER_MODES, TeacherMode  # noqa: F401 (re-exported)

#: What :func:`ema_update_` may do with BN running statistics.
STATISTICS_RULES = ("average", "copy", "keep")
_GROUPS = ("params", "statistics", "other_float", "integer")


class NoBatchNormWarning(UserWarning):
    """An EMAN / PN teacher of a model without BatchNorm: it is a plain EMA teacher."""


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``, from base to 1."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def warmup_momentum(momentum: float, step: int) -> float:
    """Mean Teacher's warm-up ``min(m, 1 - 1 / (step + 1))``: a young teacher follows quickly.

    An option, never a silent default: the paper's EMAN uses the constant momentum.
    """
    return min(momentum, 1.0 - 1.0 / (step + 1))


def _check_momentum(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _is_norm_statistic(name: str, batch_norm_names: set[str]) -> bool:
    owner, _, leaf = name.rpartition(".")
    return owner in batch_norm_names and leaf in ("running_mean", "running_var")


def tensor_groups(model: nn.Module) -> dict[str, list[str]]:
    """Names of ``model``'s tensors by the rule they follow: ``params``, ``statistics`` (BN
    running mean / var), ``other_float`` (other floating buffers) and ``integer`` buffers."""
    batch_norm_names = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    groups: dict[str, list[str]] = {g: [] for g in _GROUPS}
    groups["params"] = [n for n, _ in model.named_parameters()]
    for name, buffer in model.named_buffers():
        if not buffer.is_floating_point():
            groups["integer"].append(name)
        elif _is_norm_statistic(name, batch_norm_names):
            groups["statistics"].append(name)
        else:
            groups["other_float"].append(name)
    return groups


def _fused_update_(
    t: dict[str, list[Tensor]], s: dict[str, list[Tensor]], momentum: float, buffer_momentum: float,
    statistics: str,
) -> None:
    """The whole EMA step, one fused op per group: ``t = m * t + (1 - m) * s`` (Eq. 1 and 9)."""
    if t["params"]:
        torch._foreach_lerp_(t["params"], s["params"], 1.0 - momentum)
    if t["other_float"]:
        torch._foreach_lerp_(t["other_float"], s["other_float"], 1.0 - momentum)
    if t["statistics"] and statistics == "average":
        torch._foreach_lerp_(t["statistics"], s["statistics"], 1.0 - buffer_momentum)
    elif t["statistics"] and statistics == "copy":
        torch._foreach_copy_(t["statistics"], s["statistics"])
    if t["integer"]:
        torch._foreach_copy_(t["integer"], s["integer"])


def _lists(model: nn.Module, groups: dict[str, list[str]]) -> dict[str, list[Tensor]]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    known = {name for names in groups.values() for name in names}
    missing, extra = sorted(known - tensors.keys()), sorted(tensors.keys() - known)
    if missing or extra:
        raise ValueError(
            f"student and teacher differ: missing in student {missing[:10]}, "
            f"extra in student {extra[:10]}"
        )
    return {group: [tensors[n] for n in names] for group, names in groups.items()}


def _check_shapes(
    groups: dict[str, list[str]], s: dict[str, list[Tensor]], t: dict[str, list[Tensor]]
) -> None:
    for group, names in groups.items():
        for name, s_tensor, t_tensor in zip(names, s[group], t[group], strict=True):
            if s_tensor.shape != t_tensor.shape:
                raise ValueError(
                    f"student and teacher differ at {name!r}: "
                    f"shape {tuple(s_tensor.shape)} vs {tuple(t_tensor.shape)}"
                )


@torch.no_grad()
def ema_update_(
    teacher: nn.Module,
    student: nn.Module,
    momentum: float,
    *,
    buffer_momentum: float | None = None,
    statistics: str = "average",
) -> None:
    """Move ``teacher`` towards ``student`` in place: ``t = m * t + (1 - m) * s``, fused.

    The update of EMAN for any pair of same-architecture modules (the shape of lightly's
    ``update_momentum``). Parameters and floating buffers follow Eq. 1 with ``momentum``; BN
    running statistics follow ``statistics``: ``"average"`` (Eq. 9 with ``buffer_momentum``,
    ``None``: ``momentum``), ``"copy"`` (the student's) or ``"keep"`` (untouched); integer
    buffers are copied. :class:`EMATeacher` wraps this update and caches the tensor lists.
    """
    if statistics not in STATISTICS_RULES:
        raise ValueError(f"unknown statistics rule {statistics!r}; allowed: {', '.join(STATISTICS_RULES)}")
    m = _check_momentum("momentum", momentum)
    bm = m if buffer_momentum is None else _check_momentum("buffer_momentum", buffer_momentum)
    teacher, student = _unwrap(teacher), _unwrap(student)
    groups = tensor_groups(teacher)
    t, s = _lists(teacher, groups), _lists(student, groups)
    _check_shapes(groups, s, t)
    _fused_update_(t, s, m, bm, statistics)


class EMATeacher(nn.Module):
    """A frozen exponential-moving-average copy of ``student``.

    Args:
        student: any ``nn.Module``; it is deep-copied, the student itself is not touched.
        norm: how the teacher's BatchNorm layers normalise and where their statistics come from
            (:data:`TEACHER_MODES`): ``"eman"``: running statistics, EMA'd from the student's with
            ``buffer_momentum`` (Eq. 8, 9). ``"bn"``: batch statistics in training mode, only
            parameters averaged (the BN baseline). ``"student_pn"``: running statistics copied
            from the student at every update. ``"teacher_pn"``: the teacher's own running
            statistics up to the previous forward, then updated from the current batch with
            ``bn_momentum``. In every mode every other layer is in eval mode: dropout and
            drop-path are off whatever ``.train()`` the teacher or its parent receives.
        momentum: the parameter momentum ``m`` of Eq. 1.
        buffer_momentum: the statistics momentum of Eq. 9 (``"eman"`` only); ``None`` uses the
            parameter momentum of each update (the paper's EMAN).
        bn_momentum: PyTorch's BN momentum for statistics the teacher collects itself
            (``"bn"``, ``"teacher_pn"``); 0.1 is the paper's alpha = 0.9.

    A model without BatchNorm gets a :class:`NoBatchNormWarning` in the modes ``eman``,
    ``student_pn`` and ``teacher_pn``: they only change BatchNorm, so the teacher is a plain EMA.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        norm: str = "eman",
        momentum: float = 0.999,
        buffer_momentum: float | None = None,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if norm not in TEACHER_MODES:
            raise ValueError(f"unknown teacher norm {norm!r}; allowed: {', '.join(NORM_MODES)}")
        self.norm = norm
        self.rules = TEACHER_MODES[norm]
        self.momentum = _check_momentum("momentum", momentum)
        self.buffer_momentum = (
            None if buffer_momentum is None else _check_momentum("buffer_momentum", buffer_momentum)
        )
        self.bn_momentum = _check_momentum("bn_momentum", bn_momentum)

        self.module = copy.deepcopy(_unwrap(student))
        self.module.requires_grad_(False)
        self._batch_norms = [m for m in self.module.modules() if isinstance(m, _BatchNorm)]
        # every other layer is always in eval mode: a teacher is never stochastic
        self._other_layers = [m for m in self.module.modules() if not isinstance(m, _BatchNorm)]
        if not self._batch_norms and not self.rules.batch_statistics:
            warnings.warn(
                f"EMATeacher(norm={norm!r}): the model has no BatchNorm layer, so this teacher is a "
                "plain EMA teacher (EMAN and PN change only BatchNorm; LayerNorm / GroupNorm are "
                "batch-independent already)",
                NoBatchNormWarning,
                stacklevel=2,
            )
        if self.rules.statistics != "batch":
            missing = [
                n
                for n, m in self.module.named_modules()
                if isinstance(m, _BatchNorm) and not m.track_running_stats
            ]
            if missing:
                raise ValueError(
                    f"norm={norm!r} needs running statistics, but these BatchNorm layers were built "
                    f"with track_running_stats=False: {', '.join(missing)}"
                )
        if self.rules.collects:
            for layer in self._batch_norms:
                layer.momentum = self.bn_momentum
        # Teacher PN folds a batch into the statistics only in training forwards through this
        # wrapper, never in evaluation passes over teacher.module.
        self._collecting = False
        if self.rules.statistics == "previous":
            for layer in self._batch_norms:
                layer.register_forward_hook(self._update_statistics_after_forward)

        # Names decide which rule each tensor follows; the lists are built once.
        self._groups = tensor_groups(self.module)
        self._cached_student: Any = None
        self._student_tensors: dict[str, list[Tensor]] = {}
        self._teacher_tensors = self._tensor_lists(self.module)
        self.train(student.training)

    # -- forward -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> EMATeacher:
        """Like ``nn.Module.train``, but only BN layers of mode ``bn`` follow it: every other
        layer stays in eval mode (and EMAN-style BN layers on running statistics)."""
        super().train(mode)
        self.module.eval()
        if self.rules.batch_statistics:
            for layer in self._batch_norms:
                layer.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Guard against someone calling teacher.module.train() directly (written only when
        # needed: torch.compile then sees a read, not a mutation, on every normal call).
        for layer in self._other_layers:
            if layer.training:
                layer.training = False
        if not self.rules.batch_statistics:
            for layer in self._batch_norms:
                layer.training = False
        self._collecting = self.rules.statistics == "previous" and self.training
        try:
            with torch.no_grad():
                return self.module(*args, **kwargs)
        finally:
            self._collecting = False

    def _update_statistics_after_forward(
        self, layer: _BatchNorm, inputs: tuple[Tensor, ...], _: Tensor
    ) -> None:
        """Teacher PN (Eq. 4): after normalising with the previous statistics, fold this batch in."""
        if not self._collecting:
            return
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=count > 1)
        a = layer.momentum if layer.momentum is not None else 0.1
        layer.running_mean.lerp_(mean.to(layer.running_mean.dtype), a)
        layer.running_var.lerp_(var.to(layer.running_var.dtype), a)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # .to(), .cuda(), .double() may replace tensors: the fused lists must point at the new ones.
        result = super()._apply(fn, *args, **kwargs)
        self._teacher_tensors = self._tensor_lists(self.module)
        self._cached_student = None
        return result

    # -- update ------------------------------------------------------------------------------
    def _tensor_lists(self, model: nn.Module) -> dict[str, list[Tensor]]:
        return _lists(model, self._groups)

    def _student_lists(self, student: nn.Module) -> dict[str, list[Tensor]]:
        student = _unwrap(student)
        cached = self._cached_student() if self._cached_student is not None else None
        if cached is not student:
            lists = self._tensor_lists(student)
            _check_shapes(self._groups, lists, self._teacher_tensors)
            self._student_tensors = lists
            self._cached_student = weakref.ref(student)
        return self._student_tensors

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """One EMA step towards ``student``: ``t = m * t + (1 - m) * s`` (Eq. 1 and 9)."""
        m = self.momentum if momentum is None else _check_momentum("momentum", momentum)
        bm = m if self.buffer_momentum is None else self.buffer_momentum
        _fused_update_(self._teacher_tensors, self._student_lists(student), m, bm, self.rules.update_rule)

    @torch.no_grad()
    def copy_statistics_(self, student: nn.Module) -> None:
        """Copy ``student``'s BN running statistics and batch counters into the teacher, whatever
        the mode; parameters untouched. Used after :func:`emanorm.calibrate_batchnorm` so that
        teacher and student start from the same calibrated statistics."""
        s = self._student_lists(student)
        for group in ("statistics", "integer"):
            if self._teacher_tensors[group]:
                torch._foreach_copy_(self._teacher_tensors[group], s[group])

    def extra_repr(self) -> str:
        extra = f"norm={self.norm!r}, momentum={self.momentum}"
        if self.rules.statistics == "average" and self.buffer_momentum is not None:
            extra += f", buffer_momentum={self.buffer_momentum}"
        if self.rules.collects:
            extra += f", bn_momentum={self.bn_momentum}"
        return extra
