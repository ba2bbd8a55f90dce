"""``emanorm compare``: train a grid of methods x normalizations x seeds, evaluate, tabulate, plot."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from emanorm.catalog import DEFAULT_LINEAR_LRS
from emanorm.cli.common import add_command, add_repeatable, fraction, positive_int
from emanorm.cli.train import add_schema_flag
from emanorm.errors import Interrupted, UserError
from emanorm.train.config import METHODS, NORMS

COMPARE_HELP = """\
Train every (variant, method, seed) of a grid, each as a normal run directory under OUT/runs/,
evaluate each with the protocol that fits it (test accuracy for semi-supervised methods; kNN and
a linear probe on 10% of the labels for self-supervised ones), and write OUT/results.md (mean ±
std over seeds), OUT/results.json (every raw number with its run directory) and OUT/curves.png
(kNN accuracy along training). Finished runs are never trained again; unfinished ones resume.

  emanorm compare --methods fixmatch,moco,byol --norms default,bn,eman --seeds 3
  emanorm compare --methods fixmatch,moco --norms bn,eman,teacher_pn,student_pn \\
      --eman-momentums 0.9,0.99999 --bn-momentums 0.1,0.001          (Table 8 rows)
  emanorm compare --methods fixmatch --norms default,eman --supervised \\
      --init-from scratch,moco-eman=runs/ssl/runs/moco-eman-s{seed}   (Table 6 rows)

See docs/compare.md.
"""


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to the ``emanorm`` command's subparsers; its handler is ``run_compare``."""
    p = add_command(
        subparsers, "compare",
        "train and compare a grid of methods x normalizations x seeds (Table 1 / Figure 3)", COMPARE_HELP,
    )
    grid = p.add_argument_group("the grid (rows x columns x seeds)")
    grid.add_argument(
        "--methods",
        default="fixmatch,moco,byol",
        help=f"columns, from {', '.join(METHODS)} (default %(default)s)",
    )
    grid.add_argument(
        "--norms", default="default,bn,eman", help=f"rows, from {', '.join(NORMS)} (default %(default)s)"
    )
    grid.add_argument("--seeds", type=positive_int, default=3, help="seeds per cell (default %(default)s)")
    grid.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+N-1 (default 0)")
    grid.add_argument(
        "--eman-momentums",
        metavar="M,...",
        help="extra rows eman(m=M): EMAN statistics momentum M, parameter momentum unchanged (Table 8)",
    )
    grid.add_argument(
        "--bn-momentums",
        metavar="B,...",
        help="each teacher_pn / student_pn row becomes one row per PyTorch BN momentum B "
        "(labelled alpha = 1 - B, the paper's Eq. 4): 0.1,0.001 gives alpha 0.9 and 0.999 (Table 8)",
    )
    grid.add_argument(
        "--supervised",
        action="store_true",
        help="add a 'supervised' row (labeled images only, same labels and budget) "
        "to the semi-supervised columns",
    )
    grid.add_argument(
        "--init-from",
        metavar="SPEC,...",
        help="cross every row with start points: 'scratch', a run directory or checkpoint, or NAME=PATH; "
        "{seed} in PATH is the run's seed (Table 6)",
    )
    add_repeatable(
        grid, "--variant", "LABEL:KEY=VALUE,...",
        "a custom row, e.g. 'eman-lr0.1:norm=eman,lr=0.1' (repeatable; method=NAME runs another method)",
    )
    cfg = p.add_argument_group("settings passed to every run")
    cfg.add_argument(
        "--config",
        help="a preset or YAML file for every run ({method} = the column's method); "
        "default: the small-<method> preset",
    )
    # Type, metavar and allowed values from the config schema, as `emanorm train`'s flags.
    add_schema_flag(cfg, "dataset", "dataset of every run (default: the preset's)")
    add_schema_flag(cfg, "data_dir", "where the dataset lives")
    budget = cfg.add_mutually_exclusive_group()
    add_schema_flag(budget, "epochs", "budget of every run in epochs")
    add_schema_flag(budget, "max_steps", "budget of every run in optimizer steps")
    add_schema_flag(
        cfg, "eval_every", "kNN monitor every N epochs: the points of curves.png (0: only at the end)"
    )
    add_schema_flag(cfg, "device", "training device (default auto: GPU if any)")
    add_repeatable(
        cfg, "--set", "KEY=VALUE", "override any config key of every run, as `emanorm train --set` "
        "(repeatable)",
    )
    add_repeatable(
        cfg, "--method-arg", "METHOD:KEY=VALUE",
        "an option of one method's runs, e.g. byol:hidden_dim=512 (repeatable; see docs/methods.md)",
    )
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--which", choices=["teacher", "student"], default="teacher", help="network to report")
    ev.add_argument(
        "--paired-against",
        default="auto",
        metavar="ROW",
        help="add a table of per-seed differences of every row to ROW (e.g. bn); 'auto': bn when "
        "there is a bn row; 'none': no such table",
    )
    ev.add_argument(
        "--no-linear", action="store_true", help="self-supervised columns report kNN, no linear probe"
    )
    ev.add_argument(
        "--linear-fraction",
        type=fraction,
        default=0.1,
        help="labels for the linear probe (default 0.1 = 10%%)",
    )
    ev.add_argument(
        "--linear-epochs",
        type=positive_int,
        default=50,
        help="linear-probe epochs on cached features (default 50)",
    )
    ev.add_argument(
        "--linear-lrs",
        default=",".join(f"{lr:g}" for lr in DEFAULT_LINEAR_LRS),
        help="linear-probe lr grid, chosen on a validation split of the labels (default %(default)s)",
    )
    run = p.add_argument_group("running")
    run.add_argument("--out", default="runs/compare", help="output folder (default %(default)s)")
    run.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs trained at once as subprocesses, CPU threads split between them "
        "(default 1: one at a time, in this process)",
    )
    run.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    run.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    add_repeatable(
        run, "--merge-results", "FILE",
        "an earlier compare's results.json (repeatable): its finished runs that are not finished "
        "in OUT are reported from it and not trained, e.g. seeds trained elsewhere; a run in two files "
        "is an error unless one file's copy is marked merged from the other",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_compare)
    return p


def _common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from emanorm.experiments.grid import _set_override, parse_key_value

    common: dict[str, Any] = {}
    for text in args.set:
        key, value = parse_key_value(text)
        _set_override(common, key, value)
    for key in ("dataset", "data_dir", "epochs", "max_steps", "eval_every", "device"):
        value = getattr(args, key)
        if value is not None:
            common[key] = value
    return common


def _linear_lrs(args: argparse.Namespace) -> tuple[float, ...]:
    """``--linear-lrs`` as numbers, checked (torch-free: before anything is imported or trained)."""
    lrs = []
    for item in args.linear_lrs.split(","):
        try:
            lr = float(item)
        except ValueError:
            raise UserError(f"--linear-lrs takes numbers like 0.1,1,10, got {item!r}") from None
        if lr <= 0:
            raise UserError(f"--linear-lrs values must be > 0, got {item!r}")
        lrs.append(lr)
    if not lrs:
        raise UserError("--linear-lrs is empty")
    return tuple(lrs)


def _linear_settings(args: argparse.Namespace):
    from emanorm.experiments.evaluate import LinearProtocol

    if args.no_linear:
        return None
    return LinearProtocol(
        fraction=args.linear_fraction, epochs=args.linear_epochs, lrs=_linear_lrs(args), which=args.which
    )


def check_merge_files(args: argparse.Namespace) -> None:
    """A ``--merge-results`` file that is not there, answered before torch loads (reading one is
    :class:`emanorm.experiments.evaluate.MergedResults`'s)."""
    for path in args.merge_results:
        if not Path(path).exists():
            raise UserError(f"--merge-results {Path(path)}: no such file")


def parse_grid(args: argparse.Namespace):
    """(methods, variants, seeds) of a ``compare`` command line, checked against the torch-free
    tables (names, norms, ``--variant`` syntax, momentums, seeds)."""
    from emanorm.experiments.grid import (
        build_variants,
        parse_floats,
        parse_init_from,
        parse_seeds,
        parse_variant,
        split_list,
    )

    methods = split_list(args.methods, "--methods")
    variants = build_variants(
        split_list(args.norms, "--norms"),
        eman_momentums=parse_floats(args.eman_momentums, "--eman-momentums"),
        bn_momentums=parse_floats(args.bn_momentums, "--bn-momentums"),
        init_from=parse_init_from(args.init_from),
        custom=[parse_variant(text) for text in args.variant],
        supervised=args.supervised,
    )
    seeds = parse_seeds(args.seeds, args.first_seed)
    return methods, variants, seeds


def plan_specs(args: argparse.Namespace, methods, variants, seeds):
    """Every run of the grid (:func:`emanorm.experiments.grid.plan_grid`), a method's own norms and
    options checked last (against the torch-free catalog)."""
    from emanorm.experiments.grid import parse_method_args, plan_grid

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} exists and is not a directory; choose a folder for the grid")
    return plan_grid(
        methods,
        variants,
        seeds,
        args.out,
        config=args.config,
        common=_common_overrides(args),
        method_args=parse_method_args(args.method_arg),
    )


def plan_from_args(args: argparse.Namespace):
    """(methods, variants, seeds, specs) of a ``compare`` command line, validated."""
    methods, variants, seeds = parse_grid(args)
    return methods, variants, seeds, plan_specs(args, methods, variants, seeds)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, rebuilt from the parsed options that differ from their defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    add_compare_parser(parser.add_subparsers())
    defaults = vars(parser.parse_args(["compare"]))
    words = ["emanorm", "compare"]
    for key, value in vars(args).items():
        if key not in defaults or key == "func" or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for item in value:
                words += [flag, shlex.quote(str(item))]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _print_plan(specs, merged, same=None) -> None:
    width = max(len(s.name) for s in specs)
    same = same or {}
    for spec in specs:
        cfg = spec.config
        budget = f"{cfg['max_steps']} steps" if cfg["max_steps"] else f"{cfg['epochs']} epochs"
        extra = f", init from {cfg['init_from']}" if cfg.get("init_from") else ""
        if merged.covers(spec):
            extra += f", reported from {merged.entries[spec.name][0][0]}"
        if spec.name in same:
            extra += f", same model as {same[spec.name][0]} ({same[spec.name][1]})"
        state = "merged" if merged.covers(spec) else "same" if spec.name in same else spec.state()
        print(f"  {spec.name:<{width}}  {state:<8}  {cfg['method']}/{cfg['norm']}, {budget}{extra}")


def _paired_row(choice: str, rows: list[str]) -> str | None:
    """The row ``--paired-against`` names, checked against the grid's rows."""
    if choice == "none":
        return None
    if choice == "auto":
        return "bn" if "bn" in rows else None
    if choice not in rows:
        raise UserError(f"--paired-against {choice!r} is not a row of this grid; rows: {', '.join(rows)}")
    return choice


#: Ctrl-C in ``compare``: as for SIGTERM, the same command picks the grid up again (exit 130).
COMPARE_INTERRUPTED = (
    "compare interrupted; unfinished runs keep their last checkpoints: rerun the same compare command "
    "to resume (a run continues from its last checkpoint, finished runs are not trained again)"
)


def run_compare(args: argparse.Namespace) -> int:
    """The ``compare`` handler; Ctrl-C ends it with one line saying how to resume the grid (the
    progress bar is closed by then, so the line stands on its own)."""
    try:
        return compare(args)
    except KeyboardInterrupt:  # a run's own Interrupted too: its --resume hint is for `emanorm train`
        raise Interrupted(COMPARE_INTERRUPTED) from None


def compare(args: argparse.Namespace) -> int:
    """Plan, train what is missing, evaluate, write the three outputs.

    The grid is parsed and checked first: an unknown method or norm, a bad ``--variant``, ``--set``
    or ``--linear-lrs``, label keys for a self-supervised column or a missing ``--merge-results``
    file, a method's own norms and options (:func:`emanorm.experiments.grid.plan_grid`) are answered
    before torch, scikit-learn or matplotlib load; torch loads with the checks that build a network
    (``identical_runs``) and for training.
    """
    methods, variants, seeds = parse_grid(args)
    rows = [v.label for v in variants]
    paired_against = _paired_row(args.paired_against, rows)  # a typo fails before anything trains
    if not args.no_linear:
        _linear_lrs(args)
    check_merge_files(args)
    specs = plan_specs(args, methods, variants, seeds)  # still torch-free
    from emanorm.experiments.evaluate import DatasetCache, MergedResults, evaluate_run, run_identity
    from emanorm.experiments.grid import check_existing, check_init_sources, identical_runs, run_grid
    from emanorm.experiments.plots import curves_from_entries, plot_curves
    from emanorm.experiments.report import (
        aggregate,
        aggregate_paired,
        calibration_note,
        collect_cells,
        paired_differences,
        render_markdown,
    )
    from emanorm.train.lock import check_writable_dir

    linear = _linear_settings(args)
    out = Path(args.out)
    merged = MergedResults(args.merge_results, which=args.which, linear=linear)
    from_files = {s.name: merged.entry(s) for s in specs if merged.covers(s)}  # checked before training
    # rows that would train the same model (e.g. eman and bn without BatchNorm) train once
    same = {k: v for k, v in identical_runs(specs).items() if k not in from_files}
    for name, (earlier, why) in same.items():
        print(f"compare: {name} would train the same model as {earlier} ({why}): reported from it",
              file=sys.stderr)
    to_train = [s for s in specs if s.name not in from_files and s.name not in same]
    check_existing(to_train)
    states = [s.state() for s in to_train]
    print(
        f"compare: {len(specs)} runs ({len(variants)} rows x {len(methods)} methods x {len(seeds)} seeds): "
        f"{states.count('finished')} finished, {states.count('partial')} to resume, "
        f"{states.count('new')} new" + (f", {len(from_files)} from --merge-results" if from_files else ""),
        file=sys.stderr,
    )
    if args.dry_run:
        _print_plan(specs, merged, same)
        check_init_sources(to_train)  # what the real run would refuse, the dry run refuses too
        return 0
    check_writable_dir(out, "--out")  # a read-only folder: refused before anything trains
    outcomes = {}
    if not args.report_only and to_train:
        check_init_sources(to_train)
        out.mkdir(parents=True, exist_ok=True)
        outcomes = {
            o.spec.name: o for o in run_grid(to_train, out, jobs=args.jobs, progress=not args.no_progress)
        }

    datasets = DatasetCache()
    entries = []
    by_name: dict[str, dict] = {}
    for spec in specs:
        if spec.name in from_files:
            entries.append(from_files[spec.name])
            by_name[spec.name] = entries[-1]
            continue
        if spec.name in same:
            earlier = same[spec.name][0]
            entries.append({**by_name[earlier], "name": spec.name, **run_identity(spec), "same_as": earlier})
            by_name[spec.name] = entries[-1]
            continue
        entry = evaluate_run(spec, which=args.which, linear=linear, datasets=datasets)
        outcome = outcomes.get(spec.name)
        if outcome is not None and outcome.status == "failed":
            entry.update(status="failed", error=outcome.error, log=str(out / "logs" / f"{spec.name}.log"))
        entries.append(entry)
        by_name[spec.name] = entry

    if args.report_only and all(e["status"] == "missing" for e in entries):
        raise UserError(
            f"--report-only: none of the {len(entries)} runs of this grid is in {out} (nothing trains with "
            "--report-only); check --out and the grid flags. The files in --out were left unchanged"
        )
    first = specs[0].config
    context = [
        f"Dataset `{first['dataset']}`, backbone `{first['backbone']}`, network evaluated: {args.which}; "
        f"seeds {', '.join(map(str, seeds))}.",
        f"Command: `{command_line(args)}`",
    ]
    for path in args.merge_results:
        names = [e["name"] for e in entries if e.get("merged_from") == path]
        if names:
            context.append(
                f"Reported from `{path}` (trained elsewhere, not here): {', '.join(f'`{n}`' for n in names)}."
            )
    start = calibration_note(entries)
    if start:
        context.append(start)
    if same:
        pairs = ", ".join(f"`{name}` = `{earlier}`" for name, (earlier, _) in same.items())
        reasons = "; ".join(sorted({why for _, why in same.values()}))
        context.append(f"Trained once and reported in both rows, being the same model ({reasons}): {pairs}.")
    linear_dict = linear.as_dict() if linear else None
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(
        title="emanorm compare",
        rows=rows,
        columns=methods,
        entries=entries,
        context=context,
        linear=linear_dict,
        which=args.which,
        paired_against=paired_against,
    )
    (out / "results.md").write_text(markdown)
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "units": "percent",
        "which": args.which,
        "methods": methods,
        "variants": [
            {"label": v.label, "overrides": v.overrides, "method": v.method, "only": v.only} for v in variants
        ],
        "seeds": seeds,
        "merged_from": list(args.merge_results),
        "linear": linear_dict,
        "tables": {
            "top1": aggregate(rows, methods, collect_cells(entries, "primary")),
            "knn": aggregate(rows, methods, collect_cells(entries, "knn")),
            "wall_clock_s": aggregate(rows, methods, collect_cells(entries, "wall_clock_s")),
            "paired": {
                "against": paired_against,
                "top1": aggregate_paired(paired_differences(entries, paired_against))
                if paired_against
                else {},
            },
        },
        "runs": entries,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_curves(
        curves_from_entries(entries),
        out / "curves.png",
        methods=methods,
        variants=rows,
        ylabel=f"kNN top-1 of the {args.which} (%)",
        title=f"{first['dataset']}: kNN accuracy along training (mean ± std over seeds)",
    )
    print(markdown.split("## kNN")[0].rstrip())
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    failed = [e for e in entries if e["status"] == "failed"]
    missing = [e for e in entries if e["status"] == "missing"]
    if failed:
        print(f"\n{len(failed)} of {len(entries)} runs failed:", file=sys.stderr)
        for e in failed:
            hint = f" (log: {e['log']})" if e.get("log") else ""
            print(f"  {e['name']}: {e['error']}{hint}", file=sys.stderr)
        return 1
    if missing and not args.report_only:
        return 1
    return 0
