"""The trainer's own records in a run directory (``metrics.jsonl``, ``trackers.json``), read back
on ``--resume`` (and metrics.jsonl by ``doctor`` and ``curves.png``). They are records, not inputs:
a damaged one never stops a resume or a reader. What cannot be read is dropped (metrics) or started
anew (tracker runs), each with one line saying so."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from emanorm.errors import UserError

log = logging.getLogger("emanorm")


def _json_object(line: bytes) -> dict[str, Any] | None:
    """One metrics line as a JSON object, or None when it is none (torn, binary, a list, a string)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def is_integer(value: Any) -> bool:
    """An int and not a bool (JSON's ``true`` is one to Python): a step, a bank size, a k."""
    return isinstance(value, int) and not isinstance(value, bool)


def _record_step(line: bytes) -> int | None:
    """The ``step`` of one metrics line, or None when the line is no record (torn, binary, not an
    object, a step that is not an integer)."""
    record = _json_object(line)
    step = record.get("step", 0) if record is not None else None
    return step if is_integer(step) else None


def _numbered_lines(path: Path) -> list[tuple[int, bytes]]:
    """The non-blank lines of a file with their line numbers (1-based, as an editor shows them)."""
    return [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]


def read_metrics_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl that carry an integer ``step``, in file order, for readers
    that draw or judge a run (``curves.png``, ``doctor``); damaged lines are skipped, with one line
    saying how many. A file that cannot be read gives no records (also said)."""
    try:
        lines = _numbered_lines(path)
    except OSError as err:
        log.warning("warning: cannot read %s (%s); its records are left out", path, err.strerror or err)
        return []
    records, damaged, first_damaged = [], 0, None
    for number, line in lines:
        record = _json_object(line)
        if record is None or not is_integer(record.get("step")):
            damaged += 1
            first_damaged = first_damaged or number
        else:
            records.append(record)
    if damaged:
        log.warning("warning: %s: skipped %d damaged line(s) (the first is line %d); read %d records",
                    path, damaged, first_damaged, len(records))
    return records


def keep_metrics_until(path: Path, resume_step: int) -> None:
    """Rewrite ``metrics.jsonl`` with its valid records up to ``resume_step`` (what a resumed run
    logs again comes after them); damaged lines are dropped, with one line saying how many."""
    try:
        lines = _numbered_lines(path)
    except OSError as err:
        log.warning("warning: cannot read %s (%s); it starts again from step %d", path,
                    err.strerror or err, resume_step)
        lines = []
    kept, damaged, first_damaged = [], 0, None
    for number, line in lines:
        step = _record_step(line)
        if step is None:
            damaged += 1
            first_damaged = first_damaged or number
        elif step <= resume_step:
            kept.append(line.decode("utf-8"))
    if damaged:
        log.warning(
            "warning: %s: dropped %d damaged line(s) (the first is line %d); kept %d valid records up "
            "to step %d", path, damaged, first_damaged, len(kept), resume_step,
        )
    try:
        path.write_text("".join(line + "\n" for line in kept))
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}") from None


def read_tracker_ids(path: Path) -> dict[str, str]:
    """The tracker run ids of ``trackers.json`` (tracker name -> run id); a file that cannot be
    read, or that holds anything else, means new tracker runs (said in one line)."""
    try:
        ids: Any = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        why = getattr(err, "strerror", None) or type(err).__name__
        log.warning("warning: cannot read %s (%s); the trackers start new runs", path, why)
        return {}
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        log.warning("warning: %s holds no tracker run ids; the trackers start new runs", path)
        return {}
    return ids
