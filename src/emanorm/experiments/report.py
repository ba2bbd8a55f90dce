"""Tables of a comparison: mean ± std over seeds per (variant, method) cell, as Markdown.

The std is the sample standard deviation over seeds (``ddof = 1``); a cell with one seed shows
only its mean. The ``seeds`` column holds the most seeds any cell of the row has; a cell with
fewer adds ``(n=k)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emanorm.catalog import TEACHER_NORMS
from emanorm.train.config import SEMI_SUPERVISED

MISSING = "–"


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample std over seeds; 0.0 for a single seed
    n: int


def summarize(values: Iterable[float]) -> Stats | None:
    """Mean, sample std and count of the finite values, or None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return Stats(statistics.fmean(finite), std, len(finite))


def format_stats(stats: Stats | None, digits: int = 2) -> str:
    """``67.10 ± 0.30``; one seed: ``67.10``; nothing: ``–``."""
    if stats is None:
        return MISSING
    if stats.n == 1:
        return f"{stats.mean:.{digits}f}"
    return f"{stats.mean:.{digits}f} ± {stats.std:.{digits}f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(
    rows: Sequence[str],
    columns: Sequence[str],
    cells: Mapping[tuple[str, str], Sequence[float]],
    *,
    row_header: str = "norm",
    digits: int = 2,
    seeds_column: bool = True,
) -> str:
    """A Markdown table: ``rows`` x ``columns``, each cell the mean ± std of its values.

    ``cells[(row, column)]`` holds one value per seed; absent cells show ``–``.
    """
    header = [row_header, *columns] + (["seeds"] if seeds_column else [])
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        stats = {col: summarize(cells.get((row, col), ())) for col in columns}
        most = max((s.n for s in stats.values() if s is not None), default=0)
        parts = [_escape(row)]
        for col in columns:
            text = format_stats(stats[col], digits)
            s = stats[col]
            if seeds_column and s is not None and s.n < most:
                text += f" (n={s.n})"
            parts.append(text)
        if seeds_column:
            parts.append(str(most) if most else MISSING)
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def collect_cells(entries: Iterable[Mapping[str, Any]], metric: str) -> dict[tuple[str, str], list[float]]:
    """``{(variant, method): [value per seed]}`` from raw entries holding ``metrics[metric]``
    (``metric="primary"`` takes each entry's protocol metric, ``"wall_clock_s"`` its wall-clock)."""
    cells: dict[tuple[str, str], list[float]] = {}
    for entry, value in _entry_values(entries, metric):
        cells.setdefault((entry["variant"], entry["method"]), []).append(value)
    return cells


def _entry_values(
    entries: Iterable[Mapping[str, Any]], metric: str
) -> Iterable[tuple[Mapping[str, Any], float]]:
    """``(entry, value)`` of every successful entry that holds ``metric`` (see :func:`collect_cells`)."""
    for entry in entries:
        if entry.get("status") != "ok":
            continue
        if metric in ("primary", "wall_clock_s"):
            value = entry.get(metric)
        else:
            value = entry.get("metrics", {}).get(metric)
        if value is not None:
            yield entry, float(value)


def paired_differences(
    entries: Iterable[Mapping[str, Any]], against: str, metric: str = "primary"
) -> dict[tuple[str, str], dict[str, Any]]:
    """Per-seed differences of every row to row ``against``, column by column.

    ``{(variant, method): {"values": [row - against per shared seed], "seeds": [...], "higher": k}}``.
    Pairing by seed removes what the seeds share (the labeled split, the initial weights, the data
    order), so a gap smaller than the seed-to-seed spread can still show up consistently.
    """
    by_cell: dict[tuple[str, str], dict[int, float]] = {}
    for entry, value in _entry_values(entries, metric):
        if entry.get("seed") is not None and math.isfinite(value):
            by_cell.setdefault((entry["variant"], entry["method"]), {})[int(entry["seed"])] = value
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (variant, method), values in by_cell.items():
        base = by_cell.get((against, method))
        if variant == against or base is None:
            continue
        seeds = sorted(set(values) & set(base))
        if seeds:
            diffs = [values[s] - base[s] for s in seeds]
            out[(variant, method)] = {"values": diffs, "seeds": seeds, "higher": sum(d > 0 for d in diffs)}
    return out


def paired_table(
    rows: Sequence[str],
    columns: Sequence[str],
    diffs: Mapping[tuple[str, str], Mapping[str, Any]],
    *,
    row_header: str = "norm",
) -> str:
    """Markdown: each cell ``+1.23 ± 0.40 (4/5)``: mean ± std of the paired differences, and on
    how many of the paired seeds the row was higher."""
    header = [row_header, *columns]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [diffs.get((row, col)) for col in columns]
        if all(c is None for c in cells):
            continue
        parts = [_escape(row)]
        for cell in cells:
            if cell is None:
                parts.append(MISSING)
                continue
            stats = summarize(cell["values"])
            assert stats is not None
            spread = f" ± {stats.std:.2f}" if stats.n > 1 else ""
            parts.append(f"{stats.mean:+.2f}{spread} ({cell['higher']}/{stats.n})")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def aggregate_paired(
    diffs: Mapping[tuple[str, str], Mapping[str, Any]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """JSON form of :func:`paired_differences`: ``{row: {column: {mean, std, n, values, seeds, higher}}}``."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (row, col), cell in diffs.items():
        stats = summarize(cell["values"])
        assert stats is not None
        table.setdefault(row, {})[col] = {"mean": stats.mean, "std": stats.std, "n": stats.n, **cell}
    return table


def aggregate(
    rows: Sequence[str], columns: Sequence[str], cells: Mapping[tuple[str, str], Sequence[float]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """JSON form of a table: ``{row: {column: {mean, std, n, values}}}`` (absent cells left out)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        for col in columns:
            values = list(cells.get((row, col), ()))
            stats = summarize(values)
            if stats is not None:
                table.setdefault(row, {})[col] = {
                    "mean": stats.mean,
                    "std": stats.std,
                    "n": stats.n,
                    "values": values,
                }
    return table


def protocol_note(methods: Sequence[str], linear: Mapping[str, Any] | None, which: str) -> str:
    """One line saying how each column was measured."""
    semi = [m for m in methods if m in SEMI_SUPERVISED]
    ssl = [m for m in methods if m not in SEMI_SUPERVISED]
    parts = []
    if semi:
        parts.append(f"{', '.join(semi)}: test accuracy of the {which}")
    if ssl and linear:
        lrs = [f"{lr:g}" for lr in linear["lrs"]]
        lr_text = f"lr {lrs[0]}" if len(lrs) == 1 else f"lr from {{{', '.join(lrs)}}} on a validation split"
        parts.append(
            f"{', '.join(ssl)}: linear probe on frozen {which} features with "
            f"{100 * linear['fraction']:g}% of the training labels ({linear['epochs']} epochs, {lr_text})"
        )
    elif ssl:
        parts.append(f"{', '.join(ssl)}: kNN accuracy of the {which} (no linear probe)")
    return "; ".join(parts) + "."


def knn_protocol(entries: Sequence[Mapping[str, Any]]) -> str:
    """``k=20, a bank of 10,000 labeled training images`` from the runs' final records (older
    records without ``knn_k``/``knn_bank`` are described by their config keys)."""
    seen = sorted({
        (int(final["knn_k"]), int(final["knn_bank"]))
        for final in (e.get("final") or {} for e in entries if e.get("status") == "ok")
        if "knn_k" in final and "knn_bank" in final
    })
    if not seen:
        return "k and bank as in each run's config (knn_k, knn_bank_size)"
    return "; ".join(f"k={k}, a bank of {bank:,} labeled training images" for k, bank in seen)


def calibration_note(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """Which rows' EMAN / PN teachers (and FixMatch's default form, which evaluates an EMAN-mode EMA
    copy) started from calibrated BN statistics (``calibrate_bn_batches``) and which from the
    student's initial mean 0 / variance 1 (the paper's start); None when no reported run has such a
    teacher. Runs recorded before entries kept the setting say so."""
    starts: dict[str, set[str]] = {}
    for entry in entries:
        norm, method = entry.get("norm"), entry.get("run_method", entry.get("method"))
        # FixMatch's default form evaluates an EMAN-mode EMA copy, which the calibration starts too
        ema_copy = norm in TEACHER_NORMS or (norm, method) == ("default", "fixmatch")
        if entry.get("status") != "ok" or not ema_copy:
            continue
        batches = entry.get("calibrate_bn_batches")
        if batches is None:
            start = "not recorded (an entry from before emanorm recorded it)"
        elif batches:
            start = (f"calibrated on {batches} batches before step 0 (`calibrate_bn_batches`, "
                     "not the paper's start)")
        else:
            start = "the student's initial statistics, mean 0 / variance 1 (the paper's start, uncalibrated)"
        starts.setdefault(start, set()).add(str(entry.get("variant")))
    if not starts:
        return None
    parts = [f"{start}: {', '.join(f'`{row}`' for row in sorted(rows))}"
             for start, rows in sorted(starts.items())]
    return "Start of the EMAN / PN teachers' BN statistics (and FixMatch's EMA copy in `default`): " + \
        "; ".join(parts) + "."


def render_markdown(
    *,
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    entries: Sequence[Mapping[str, Any]],
    context: Sequence[str] = (),
    linear: Mapping[str, Any] | None = None,
    which: str = "teacher",
    row_header: str = "norm",
    paired_against: str | None = None,
) -> str:
    """``results.md``: the Table-1-style accuracy table, paired differences to ``paired_against``
    (when given), kNN, wall-clock, and the runs left out."""
    lines = [f"# {title}", ""]
    lines += [*context, ""] if context else []
    lines += [
        "## Top-1 accuracy (%)",
        "",
        protocol_note(columns, linear, which) + " Mean ± std over seeds (sample std).",
        "",
        markdown_table(rows, columns, collect_cells(entries, "primary"), row_header=row_header),
        "",
    ]
    if paired_against is not None:
        diffs = paired_differences(entries, paired_against)
        lines += [
            f"## Paired difference to `{paired_against}` (points)",
            "",
            f"Each seed's top-1 minus the top-1 of the `{paired_against}` run with the same seed (same "
            "labeled split, initial weights and data order); mean ± std over seeds, and (k/n): on k of "
            f"the n paired seeds the row beat `{paired_against}`.",
            "",
            paired_table(rows, columns, diffs, row_header=row_header) if diffs else "(no paired seeds yet)",
            "",
        ]
    lines += [
        "## kNN accuracy (%)",
        "",
        f"Weighted kNN on frozen {which} features at the end of training: {knn_protocol(entries)}.",
        "",
        markdown_table(rows, columns, collect_cells(entries, "knn"), row_header=row_header),
        "",
        "## Wall-clock per run (s)",
        "",
        "Training time from each run's summary.json (mean ± std over seeds): the trainer's own kNN "
        "monitor (--eval-every) included, compare's evaluation after training (linear probe) excluded.",
        "",
        markdown_table(
            rows, columns, collect_cells(entries, "wall_clock_s"), row_header=row_header, digits=1
        ),
        "",
    ]
    partial = sorted({str(e["test_images"]) for e in entries if e.get("test_images") not in (None, "all")})
    if partial:
        lines += [
            f"Note: test accuracy and kNN were measured on the first {', '.join(partial)} test images "
            "(monitor_test_size), not the whole test set; the linear probe uses the whole test set.",
            "",
        ]
    left_out = [e for e in entries if e.get("status") != "ok"]
    if left_out:
        lines += ["## Runs not in the tables", ""]
        for e in left_out:
            reason = e.get("error") or ("not trained" if e.get("status") == "missing" else e.get("status"))
            lines.append(f"- `{e['name']}` ({e['run_dir']}): {e.get('status')}: {reason}")
        lines.append("")
    return "\n".join(lines)
