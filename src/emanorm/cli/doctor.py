"""``emanorm doctor RUN_OR_CHECKPOINT``: check the EMA teacher of a run or of any checkpoint.

The parser and its handler; the check itself is :func:`emanorm.teacher_check.inspect_teacher`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emanorm.collapse import collapse_rules, scan_records
from emanorm.errors import UserError

if TYPE_CHECKING:
    from emanorm.teacher_check import TeacherReport

DOCTOR_HELP = """\
Check an EMA teacher against its student: BatchNorm statistics never averaged (the teacher's still
0 / 1 while the student's moved), teacher BatchNorm in training mode, teacher parameters that
require gradients, active dropout / drop-path in the teacher, and the parameter and statistics lag
(||teacher - student|| / ||student||); NaN / inf in either network, nothing to compare, or a lag
above 1 (a damaged file or a mismatched pair). For a run directory, also the collapse alarm over its
metrics.jsonl (DINO's loss at ln K or uniform teacher targets, MoCo/BYOL outputs that no longer
differ across the batch; docs/methods.md). Exit status 0: no problem found; 1: problems found.

An emanorm run directory or checkpoint is rebuilt as its method (the layer checks then describe
the teacher this version of emanorm builds; the tensors are the checkpoint's). Any other
checkpoint is read as tensors only (never unpickling code): timm ModelEma (state_dict /
state_dict_ema), Mean Teacher (state_dict / ema_state_dict), MoCo (encoder_q. / encoder_k.),
solo-learn and lightly (backbone. / momentum_backbone. or backbone_momentum.), byol-pytorch
(online_encoder. / target_encoder.); other layouts with --student-key/--teacher-key or
--student-prefix/--teacher-prefix.
"""


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``doctor`` to a subparsers object."""
    p = subparsers.add_parser(
        "doctor",
        help="check the EMA teacher of a run or checkpoint",
        description=DOCTOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory or a checkpoint file")
    p.add_argument("--student-key", help="checkpoint entry holding the student's state dict")
    p.add_argument("--teacher-key", help="checkpoint entry holding the teacher's state dict")
    p.add_argument("--student-prefix", help="key prefix of the student's tensors in one state dict")
    p.add_argument("--teacher-prefix", help="key prefix of the teacher's tensors in one state dict")
    p.set_defaults(func=run_doctor)
    return p


def run_doctor(args: argparse.Namespace) -> int:
    """The ``doctor`` handler: print the teacher report; 1 when it found problems."""
    if not Path(args.path).exists():  # answered before torch loads, in resolve_checkpoint_path's words
        raise UserError(f"checkpoint or run directory not found: {Path(args.path)}")
    # imported here: `emanorm doctor --help` answers without torch
    from emanorm.teacher_check import (
        Finding,
        TeacherReport,
        find_teacher_pair,
        inspect_teacher,
        non_finite_names,
    )
    from emanorm.train.checkpoint import safe_load
    from emanorm.train.restore import method_from_checkpoint

    data = safe_load(args.path)
    layout = (args.student_key, args.teacher_key, args.student_prefix, args.teacher_prefix)
    emanorm_run = not any(layout) and all(k in data for k in ("config", "method", "dataset_info"))
    weights = data.get("method") if emanorm_run else None
    bad = non_finite_names(weights) if isinstance(weights, dict) else []
    if bad:  # a problem to report (exit 1), not a file to refuse: the run is not rebuilt
        finding = Finding("non_finite", f"{len(bad)} tensor(s) hold NaN or inf", tuple(bad))
        report = TeacherReport(findings=[finding])
        where = "emanorm run (not rebuilt: its weights hold NaN or inf)"
        collapse = None
    elif emanorm_run:
        method = method_from_checkpoint(data, args.path)
        if method.teacher is None:
            cfg = data["config"]
            raise UserError(
                f"{args.path}: {cfg['method']} with norm {cfg['norm']} has no EMA teacher to check"
            )
        report = inspect_teacher(method.teacher_source(), method.teacher)
        where = f"emanorm {data['config']['method']} run, teacher mode {method.teacher.norm!r}"
        collapse = collapse_lines(Path(args.path), data["config"]["method"], method.options)
    else:
        collapse = None
        try:
            student, teacher, where = find_teacher_pair(
                data, student_key=args.student_key, teacher_key=args.teacher_key,
                student_prefix=args.student_prefix, teacher_prefix=args.teacher_prefix,
            )
        except ValueError as err:
            raise UserError(f"{args.path}: {err}") from None
        report = inspect_teacher(student, teacher)
    print(f"{args.path}: {where}")
    print(report.format())
    if collapse is not None:
        print(collapse[0])
    if not report.ok:  # the verdict on stderr too, in one line, for logs and scripts that keep only it
        print(f"emanorm: doctor: {args.path}: {problems_line(report)}", file=sys.stderr)
    return 0 if report.ok and (collapse is None or collapse[1]) else 1


def problems_line(report: TeacherReport) -> str:
    """``2 problems: non_finite (teacher fc.weight, ...); nothing_compared``."""
    parts = []
    for finding in report.findings:
        names = ", ".join(finding.names[:3]) + (", ..." if len(finding.names) > 3 else "")
        parts.append(f"{finding.kind} ({names})" if names else finding.kind)
    count = len(report.findings)
    return f"{count} problem{'s' * (count != 1)}: " + "; ".join(parts)


def collapse_lines(path: Path, method: str, options: dict[str, Any]) -> tuple[str, bool] | None:
    """The collapse alarm's verdict on a run directory's metrics.jsonl: ``(line, ok)``; ``None``
    for a checkpoint file or a run without training records."""
    from emanorm.train.curves import read_metrics  # matplotlib

    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return None
    alarm, seen = scan_records(read_metrics(metrics), method, options)
    if alarm is not None:
        return alarm.message + " (metrics.jsonl)", False
    if not collapse_rules(method, options):
        return None
    return f"collapse: no alarm in {seen} training records (metrics.jsonl)", True
