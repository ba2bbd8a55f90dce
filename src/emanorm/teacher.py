"""The EMA teacher and Exponential Moving Average Normalization (EMAN).

An EMA teacher is a frozen copy of the student whose parameters follow
``t = m * t + (1 - m) * s`` (Eq. 1 of the paper). EMAN makes the teacher's BatchNorm
layers follow the same rule for their statistics (Eq. 9) and normalise with those
statistics (Eq. 8) instead of with the batch, so a teacher output never depends on the
other samples of the batch. The other modes are the baselines the paper compares.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_MODES = ("eman", "bn", "student_pn", "teacher_pn")


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


class EMATeacher(nn.Module):
    """A frozen exponential-moving-average copy of ``student``.

    Args:
        student: any ``nn.Module``; it is deep-copied, the student itself is not touched.
        norm: how the teacher's BatchNorm layers normalise and where their statistics come from:
            ``"eman"``: running statistics, EMA'd from the student's with ``buffer_momentum``
            (Eq. 8, 9). ``"bn"``: batch statistics in training mode, only parameters averaged
            (the BN baseline). ``"student_pn"``: running statistics copied from the student at
            every update. ``"teacher_pn"``: the teacher's own running statistics up to the
            previous forward, then updated from the current batch with ``bn_momentum``.
        momentum: the parameter momentum ``m`` of Eq. 1.
        buffer_momentum: the statistics momentum of Eq. 9 (``"eman"`` only); ``None`` uses the
            parameter momentum of each update (the paper's EMAN).
        bn_momentum: PyTorch's BN momentum for statistics the teacher collects itself
            (``"bn"``, ``"teacher_pn"``); 0.1 is the paper's alpha = 0.9.
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
        if norm not in NORM_MODES:
            raise ValueError(f"unknown teacher norm {norm!r}; allowed: {', '.join(NORM_MODES)}")
        self.norm = norm
        self.momentum = _check_momentum("momentum", momentum)
        self.buffer_momentum = (
            None if buffer_momentum is None else _check_momentum("buffer_momentum", buffer_momentum)
        )
        self.bn_momentum = _check_momentum("bn_momentum", bn_momentum)

        self.module = copy.deepcopy(_unwrap(student))
        self.module.requires_grad_(False)
        self._batch_norms = [m for m in self.module.modules() if isinstance(m, _BatchNorm)]
        batch_norm_names = {n for n, m in self.module.named_modules() if isinstance(m, _BatchNorm)}
        if norm != "bn":
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
        if norm in ("bn", "teacher_pn"):
            for layer in self._batch_norms:
                layer.momentum = self.bn_momentum
        # Teacher PN folds a batch into the statistics only in training forwards through this
        # wrapper, never in evaluation passes over teacher.module.
        self._collecting = False
        if norm == "teacher_pn":
            for layer in self._batch_norms:
                layer.register_forward_hook(self._update_statistics_after_forward)

        # Names decide which rule each tensor follows; the lists are built once.
        self._groups: dict[str, list[str]] = {
            "params": [n for n, _ in self.module.named_parameters()],
            "statistics": [],
            "other_float": [],
            "integer": [],
        }
        for name, buffer in self.module.named_buffers():
            if not buffer.is_floating_point():
                self._groups["integer"].append(name)
            elif _is_norm_statistic(name, batch_norm_names):
                self._groups["statistics"].append(name)
            else:
                self._groups["other_float"].append(name)
        self._cached_student: Any = None
        self._student_tensors: dict[str, list[Tensor]] = {}
        self._teacher_tensors = self._tensor_lists(self.module)
        self.train(student.training)

    # -- forward -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> EMATeacher:
        """Like ``nn.Module.train``, but EMAN-style BN layers stay on running statistics."""
        super().train(mode)
        if self.norm != "bn":
            for layer in self._batch_norms:
                layer.train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.norm != "bn":
            # Guard against someone calling teacher.module.train() directly.
            for layer in self._batch_norms:
                layer.training = False
        self._collecting = self.norm == "teacher_pn" and self.training
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
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        known = {name for names in self._groups.values() for name in names}
        missing, extra = sorted(known - tensors.keys()), sorted(tensors.keys() - known)
        if missing or extra:
            raise ValueError(
                f"student and teacher differ: missing in student {missing[:10]}, "
                f"extra in student {extra[:10]}"
            )
        return {group: [tensors[n] for n in names] for group, names in self._groups.items()}

    def _student_lists(self, student: nn.Module) -> dict[str, list[Tensor]]:
        student = _unwrap(student)
        cached = self._cached_student() if self._cached_student is not None else None
        if cached is not student:
            lists = self._tensor_lists(student)
            for group, names in self._groups.items():
                for name, s, t in zip(names, lists[group], self._teacher_tensors[group], strict=True):
                    if s.shape != t.shape:
                        raise ValueError(
                            f"student and teacher differ at {name!r}: "
                            f"shape {tuple(s.shape)} vs {tuple(t.shape)}"
                        )
            self._student_tensors = lists
            self._cached_student = weakref.ref(student)
        return self._student_tensors

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """One EMA step towards ``student``: ``t = m * t + (1 - m) * s`` (Eq. 1 and 9)."""
        m = self.momentum if momentum is None else _check_momentum("momentum", momentum)
        s = self._student_lists(student)
        t = self._teacher_tensors
        if t["params"]:
            torch._foreach_lerp_(t["params"], s["params"], 1.0 - m)
        if t["other_float"]:
            torch._foreach_lerp_(t["other_float"], s["other_float"], 1.0 - m)
        if t["statistics"]:
            if self.norm == "eman":
                bm = m if self.buffer_momentum is None else self.buffer_momentum
                torch._foreach_lerp_(t["statistics"], s["statistics"], 1.0 - bm)
            elif self.norm == "student_pn":
                torch._foreach_copy_(t["statistics"], s["statistics"])
        if t["integer"]:
            torch._foreach_copy_(t["integer"], s["integer"])

    def extra_repr(self) -> str:
        extra = f"norm={self.norm!r}, momentum={self.momentum}"
        if self.norm == "eman" and self.buffer_momentum is not None:
            extra += f", buffer_momentum={self.buffer_momentum}"
        if self.norm in ("bn", "teacher_pn"):
            extra += f", bn_momentum={self.bn_momentum}"
        return extra
