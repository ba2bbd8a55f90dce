"""A check of an EMA teacher against its student: ``inspect_teacher(student, teacher)``.

It finds what silently breaks EMA teachers: BatchNorm statistics that were never averaged
(the teacher's still at their initial 0 / 1 while the student's moved), teacher layers that
normalise with batch statistics, teacher parameters that require gradients, active dropout or
drop-path in the teacher; and it measures how far the teacher lags behind the student. It
takes two modules (an :class:`~emanorm.teacher.EMATeacher` included) or two plain state
dicts, so a checkpoint of any library (lightly, solo-learn, timm's ``ModelEma``) can be checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from emanorm.teacher import EMATeacher, _unwrap

STATISTICS = ("running_mean", "running_var")
# Stochastic layers known by class name (timm, torchvision), so that neither is imported here.
_STOCHASTIC_NAMES = ("DropPath", "DropBlock2d", "StochasticDepth")
_SHOWN = 5
#: An EMA teacher is a convex combination of past students: its distance to the student stays
#: well below the student's own norm. A larger lag means damaged weights or a mismatched pair.
MAX_PLAUSIBLE_LAG = 1.0


@dataclass(frozen=True)
class Finding:
    """One problem: its ``kind``, a one-line ``message`` and the layers or tensors it concerns."""

    kind: str
    message: str
    names: tuple[str, ...] = ()


@dataclass
class TeacherReport:
    """What :func:`inspect_teacher` found.

    Attributes:
        findings: the problems, empty for a healthy teacher. Kinds: ``stale_statistics``,
            ``batch_statistics``, ``requires_grad``, ``dropout``, ``mismatch``, ``non_finite``
            (NaN / inf in either network), ``nothing_compared`` (no floating tensor in common),
            ``implausible_lag`` (parameter lag above :data:`MAX_PLAUSIBLE_LAG`).
        parameter_lag: ``||t - s|| / ||s||`` over the floating tensors other than BN statistics.
        statistics_lag: the same over the BN running statistics (``None`` without BatchNorm).
        compared: how many tensors were compared.
    """

    findings: list[Finding] = field(default_factory=list)
    parameter_lag: float | None = None
    statistics_lag: float | None = None
    compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def format(self) -> str:
        """The report as text: one line per finding, then the lags."""
        count = len(self.findings)
        lines = [f"teacher check: {count or 'no'} problem{'s' * (count != 1)} found"]
        for finding in self.findings:
            names = ", ".join(finding.names[:_SHOWN])
            more = f" and {len(finding.names) - _SHOWN} more" if len(finding.names) > _SHOWN else ""
            lines.append(f"  {finding.kind}: {finding.message}" + (f" ({names}{more})" if names else ""))
        if self.parameter_lag is not None:
            lines.append(f"  parameter lag: {self.parameter_lag:.4g} (||teacher - student|| / ||student||)")
        if self.statistics_lag is not None:
            lines.append(f"  statistics lag: {self.statistics_lag:.4g} (the same over BN running statistics)")
        lines.append(f"  {self.compared} tensors compared")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _is_statistic(name: str) -> bool:
    return name.rpartition(".")[2] in STATISTICS


def _relative_distance(pairs: list[tuple[Tensor, Tensor]]) -> float | None:
    if not pairs:
        return None
    diff = sum(float((t.double() - s.double()).pow(2).sum()) for t, s in pairs)
    norm = sum(float(s.double().pow(2).sum()) for _, s in pairs)
    return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


def _stale_statistics(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> list[str]:
    """BN layers whose teacher statistics are still 0 / 1 while the student's moved."""
    stale = []
    for key in teacher:
        if not key.endswith(".running_mean") and key != "running_mean":
            continue
        layer = key.removesuffix("running_mean").rstrip(".")
        var_key = f"{layer}.running_var" if layer else "running_var"
        if var_key not in teacher or key not in student or var_key not in student:
            continue
        t_mean, t_var = teacher[key], teacher[var_key]
        initial = bool((t_mean == 0).all()) and bool((t_var == 1).all())
        moved = not ((student[key] == 0).all() and (student[var_key] == 1).all())
        if initial and moved:
            stale.append(layer or "(root)")
    return stale


def _compare_states(
    student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], report: TeacherReport
) -> None:
    missing = sorted(set(student) - set(teacher))
    extra = sorted(set(teacher) - set(student))
    if missing or extra:
        report.findings.append(
            Finding(
                "mismatch",
                f"student and teacher hold different tensors: {len(missing)} only in the student, "
                f"{len(extra)} only in the teacher",
                tuple(missing[:_SHOWN] + extra[:_SHOWN]),
            )
        )
    shapes = [k for k in set(student) & set(teacher) if student[k].shape != teacher[k].shape]
    if shapes:
        report.findings.append(Finding("mismatch", "tensors of different shapes", tuple(sorted(shapes))))
    common = sorted(
        k for k in set(student) & set(teacher)
        if k not in shapes and student[k].is_floating_point() and teacher[k].is_floating_point()
    )
    stale = _stale_statistics(student, teacher)
    if stale:
        report.findings.append(
            Finding(
                "stale_statistics",
                f"{len(stale)} BatchNorm layer(s) whose teacher statistics were never averaged "
                "(still running_mean 0 / running_var 1 while the student's moved)",
                tuple(stale),
            )
        )
    pairs = [(teacher[k].detach().cpu(), student[k].detach().cpu()) for k in common]
    labelled = list(zip(common, pairs, strict=True))
    report.parameter_lag = _relative_distance([p for k, p in labelled if not _is_statistic(k)])
    report.statistics_lag = _relative_distance([p for k, p in labelled if _is_statistic(k)])
    report.compared = len(common)
    report.findings.extend(_damage_findings(student, teacher, report))


def non_finite_names(state: Mapping[str, object]) -> list[str]:
    """The names of the floating (or complex) tensors of ``state`` that hold NaN or inf, sorted."""
    return [
        str(k) for k, v in sorted(state.items(), key=lambda item: str(item[0]))
        if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())
        and not bool(torch.isfinite(v.detach()).all())
    ]


def _non_finite(state: Mapping[str, Tensor], side: str) -> list[str]:
    return [f"{side} {name}" for name in non_finite_names(state)]


def _damage_findings(
    student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], report: TeacherReport
) -> list[Finding]:
    """What no healthy pair shows: NaN / inf anywhere, nothing to compare, an impossible lag."""
    findings = []
    bad = _non_finite(teacher, "teacher") + _non_finite(student, "student")
    if bad:
        findings.append(Finding("non_finite", f"{len(bad)} tensor(s) hold NaN or inf", tuple(bad)))
    if report.compared == 0:
        findings.append(Finding(
            "nothing_compared",
            "student and teacher share no floating-point tensor of the same shape: nothing was checked",
        ))
    lag = report.parameter_lag
    if not bad and lag is not None and lag > MAX_PLAUSIBLE_LAG:
        findings.append(Finding(
            "implausible_lag",
            f"parameter lag {lag:.4g} is beyond what an EMA of the student produces (at most "
            f"{MAX_PLAUSIBLE_LAG:g}): the file is likely damaged, or the two are not student and teacher",
        ))
    return findings


def _is_stochastic(module: nn.Module) -> bool:
    if isinstance(module, _DropoutNd) or type(module).__name__ in _STOCHASTIC_NAMES:
        rate = getattr(module, "p", getattr(module, "drop_prob", 1.0))
        return bool(rate) and module.training
    return False


def _check_modules(teacher: nn.Module, batch_statistics_expected: bool, report: TeacherReport) -> None:
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    if trainable:
        report.findings.append(
            Finding(
                "requires_grad",
                f"{len(trainable)} teacher parameter(s) require gradients: an optimizer may train them",
                tuple(trainable),
            )
        )
    if not batch_statistics_expected:
        batch = [
            n or "(root)" for n, m in teacher.named_modules() if isinstance(m, _BatchNorm) and m.training
        ]
        if batch:
            report.findings.append(
                Finding(
                    "batch_statistics",
                    f"{len(batch)} teacher BatchNorm layer(s) in training mode: they normalise with the "
                    "batch's statistics and overwrite the averaged ones (call .eval() on the teacher)",
                    tuple(batch),
                )
            )
    dropout = [n or "(root)" for n, m in teacher.named_modules() if _is_stochastic(m)]
    if dropout:
        report.findings.append(
            Finding(
                "dropout",
                f"{len(dropout)} dropout / drop-path layer(s) active in the teacher: its targets are noisy",
                tuple(dropout),
            )
        )


def inspect_teacher(
    student: nn.Module | Mapping[str, Tensor], teacher: nn.Module | Mapping[str, Tensor]
) -> TeacherReport:
    """Check ``teacher`` against ``student``; both modules or both state dicts.

    With modules, the layers are checked too (training mode, ``requires_grad``, dropout); an
    :class:`~emanorm.teacher.EMATeacher` is checked through its module, and in its mode ``bn``
    BatchNorm in training mode is the baseline's design, not a finding. With state dicts only
    the tensors are compared (stale statistics and lags). Wrapper prefixes (``module.``,
    ``_orig_mod.``) are ignored on modules.
    """
    report = TeacherReport()
    if isinstance(student, nn.Module) != isinstance(teacher, nn.Module):
        raise TypeError("inspect_teacher takes two modules or two state dicts, not one of each")
    if isinstance(teacher, nn.Module):
        expected = isinstance(teacher, EMATeacher) and teacher.rules.batch_statistics
        module = teacher.module if isinstance(teacher, EMATeacher) else _unwrap(teacher)
        student_module = _unwrap(student.module if isinstance(student, EMATeacher) else student)
        _check_modules(module, expected, report)
        with torch.no_grad():
            _compare_states(student_module.state_dict(), module.state_dict(), report)
        return report
    _compare_states(dict(student), dict(teacher), report)
    return report


# Where checkpoints of other code bases keep the two networks: entries of the checkpoint dict
# (timm's ModelEma, Mean Teacher), then key prefixes of one state dict (MoCo, solo-learn /
# lightly Lightning modules, byol-pytorch, emanorm's own method state).
ENTRY_PAIRS = (("state_dict", "state_dict_ema"), ("state_dict", "ema_state_dict"), ("model", "model_ema"))
PREFIX_PAIRS = (
    ("encoder_q.", "encoder_k."),
    ("backbone.", "momentum_backbone."),
    ("backbone.", "backbone_momentum."),
    ("online_encoder.", "target_encoder."),
    ("student.", "teacher.module."),
)


def _tensors(value: object) -> dict[str, Tensor] | None:
    if isinstance(value, Mapping) and value and all(isinstance(v, Tensor) for v in value.values()):
        return {str(k).removeprefix("module."): v for k, v in value.items()}
    return None


def split_by_prefix(
    state: Mapping[str, Tensor], student_prefix: str, teacher_prefix: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The two state dicts held in one under ``student_prefix`` and ``teacher_prefix``."""
    student = {k[len(student_prefix) :]: v for k, v in state.items() if k.startswith(student_prefix)}
    teacher = {k[len(teacher_prefix) :]: v for k, v in state.items() if k.startswith(teacher_prefix)}
    return student, teacher


def find_teacher_pair(
    checkpoint: Mapping[str, object],
    *,
    student_key: str | None = None,
    teacher_key: str | None = None,
    student_prefix: str | None = None,
    teacher_prefix: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """``(student_state, teacher_state, where)`` from a loaded checkpoint of any code base.

    Explicit entries (``student_key`` / ``teacher_key``) or prefixes win; otherwise the
    layouts of :data:`ENTRY_PAIRS` and :data:`PREFIX_PAIRS` are tried, ``module.`` prefixes
    ignored. ``ValueError`` naming the checkpoint's entries when no pair is found.
    """
    shown = ", ".join(sorted(map(str, checkpoint))[:8])
    hint = "name them with --student-key/--teacher-key or --student-prefix/--teacher-prefix"
    if student_key or teacher_key:
        s_state, t_state = _tensors(checkpoint.get(student_key)), _tensors(checkpoint.get(teacher_key))
        if s_state and t_state:
            return s_state, t_state, f"entries {student_key!r} and {teacher_key!r}"
        raise ValueError(
            f"entries {student_key!r} and {teacher_key!r} are not both state dicts (entries: {shown})"
        )
    explicit = student_prefix is not None or teacher_prefix is not None
    if not explicit:
        for s_key, t_key in ENTRY_PAIRS:
            s_state, t_state = _tensors(checkpoint.get(s_key)), _tensors(checkpoint.get(t_key))
            if s_state and t_state:
                return s_state, t_state, f"entries {s_key!r} and {t_key!r}"
    flat = (
        _tensors(checkpoint.get("state_dict")) or _tensors(checkpoint.get("method")) or _tensors(checkpoint)
    )
    prefixes = [(student_prefix or "", teacher_prefix or "")] if explicit else PREFIX_PAIRS
    for s_prefix, t_prefix in prefixes:
        s_state, t_state = split_by_prefix(flat or {}, s_prefix, t_prefix)
        if s_state and t_state:
            return s_state, t_state, f"prefixes {s_prefix!r} and {t_prefix!r}"
    raise ValueError(f"found no student / teacher pair in this checkpoint (entries: {shown}); {hint}")


__all__ = [
    "ENTRY_PAIRS",
    "MAX_PLAUSIBLE_LAG",
    "PREFIX_PAIRS",
    "Finding",
    "TeacherReport",
    "find_teacher_pair",
    "inspect_teacher",
    "non_finite_names",
    "split_by_prefix",
]
