"""``emanorm compare``: grid planning, tables, curves, and tiny end-to-end grids on real Fashion-MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from emanorm.cli import main
from emanorm.errors import UserError
from emanorm.experiments.grid import (
    RunBusyError,
    build_variants,
    parse_init_from,
    parse_method_args,
    parse_variant,
    plan_grid,
    run_lock,
)
from emanorm.experiments.plots import band, plot_curves
from emanorm.experiments.report import (
    aggregate,
    calibration_note,
    collect_cells,
    format_stats,
    markdown_table,
    render_markdown,
    summarize,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# a few steps on the real data with small monitor sets (as tests/test_train.py's tiny_config)
TINY = [
    "--max-steps", "2",
    "--set", "batch_size=16",
    "--set", "unlabeled_ratio=1",
    "--set", "knn_bank_size=64",
    "--set", "monitor_test_size=64",
    "--set", "log_every=1",
    "--device", "cpu",
    "--no-progress",
]  # fmt: skip


@pytest.fixture
def one_thread():
    """Runs in this process use one thread: on a shared 2-core machine that beats oversubscribing."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _table_rows(markdown: str, section: str) -> list[list[str]]:
    """The body rows of the first table after heading ``section``, split into cells."""
    text = markdown.split(section, 1)[1]
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows[1:]  # without the header


# -- tables ---------------------------------------------------------------------------------------


def test_summarize_and_format_mean_std_over_seeds():
    stats = summarize([67.0, 68.0, 69.0])
    assert stats is not None
    assert stats.n == 3 and stats.mean == pytest.approx(68.0)
    assert stats.std == pytest.approx(1.0)  # sample std (ddof 1), not population std 0.816
    assert format_stats(stats) == "68.00 ± 1.00"
    assert format_stats(summarize([55.555])) == "55.55" or format_stats(summarize([55.555])) == "55.56"
    assert "±" not in format_stats(summarize([55.5]))  # one seed: no spread to show
    assert format_stats(summarize([])) == "–"
    assert format_stats(summarize([float("nan"), 50.0])) == "50.00"  # non-finite values are dropped


def test_markdown_table_rows_columns_and_seed_counts():
    cells = {
        ("bn", "fixmatch"): [58.0, 60.0],
        ("bn", "moco"): [52.5, 52.5],
        ("eman", "fixmatch"): [69.0, 70.0],
        ("eman", "moco"): [55.0],  # one seed missing
    }
    text = markdown_table(["bn", "eman", "gn"], ["fixmatch", "moco"], cells)
    lines = text.splitlines()
    assert lines[0] == "| norm | fixmatch | moco | seeds |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| bn | 59.00 ± 1.41 | 52.50 ± 0.00 | 2 |"
    assert lines[3] == "| eman | 69.50 ± 0.71 | 55.00 (n=1) | 2 |"
    assert lines[4] == "| gn | – | – | – |"
    assert len(lines) == 5
    assert "seeds" not in markdown_table(["bn"], ["moco"], cells, seeds_column=False)
    assert "| a\\|b |" in markdown_table(["a|b"], ["moco"], {})  # a pipe in a label cannot break the table


def test_collect_and_render_results_from_entries():
    def entry(variant, method, seed, status="ok", **kw):
        return {
            "name": f"{method}-{variant}-s{seed}",
            "run_dir": f"/x/{method}-{variant}-s{seed}",
            "variant": variant,
            "method": method,
            "seed": seed,
            "status": status,
            **kw,
        }

    entries = [
        entry("bn", "fixmatch", 0, primary=60.0, metrics={"knn": 70.0}, wall_clock_s=100.0),
        entry("bn", "fixmatch", 1, primary=62.0, metrics={"knn": 72.0}, wall_clock_s=120.0),
        entry("eman", "fixmatch", 0, primary=65.0, metrics={"knn": 75.0}, wall_clock_s=110.0),
        entry("eman", "fixmatch", 1, status="failed", error="loss is nan at step 3"),
    ]
    cells = collect_cells(entries, "primary")
    assert cells == {("bn", "fixmatch"): [60.0, 62.0], ("eman", "fixmatch"): [65.0]}
    assert collect_cells(entries, "knn")[("bn", "fixmatch")] == [70.0, 72.0]
    table = aggregate(["bn", "eman"], ["fixmatch"], cells)
    assert table["bn"]["fixmatch"]["n"] == 2 and table["bn"]["fixmatch"]["mean"] == pytest.approx(61.0)
    md = render_markdown(title="t", rows=["bn", "eman"], columns=["fixmatch"], entries=entries)
    assert _table_rows(md, "## Top-1")[0] == ["bn", "61.00 ± 1.41", "2"]
    assert _table_rows(md, "## Top-1")[1] == ["eman", "65.00", "1"]
    assert _table_rows(md, "## Wall-clock")[0] == ["bn", "110.0 ± 14.1", "2"]
    assert "fixmatch-eman-s1" in md.split("## Runs not in the tables")[1]
    assert "loss is nan at step 3" in md


def test_the_report_says_which_eman_rows_started_calibrated():
    def entry(variant, norm, batches=None, status="ok", method="moco"):
        fields = {"variant": variant, "norm": norm, "status": status, "run_method": method}
        return fields if batches is None else {**fields, "calibrate_bn_batches": batches}

    entries = [
        entry("eman", "eman", 0), entry("eman", "eman", 0),
        entry("EMAN, calibrated", "eman", 20), entry("tpn", "teacher_pn", 20),
        entry("old", "eman"),  # a results.json from before entries recorded it
        entry("bn", "bn", 20), entry("lost", "eman", 20, status="failed"),  # no such teacher; not reported
        entry("default", "default", 20, method="fixmatch"),  # its EMA evaluation copy is EMAN's
        entry("default", "default", 20, method="moco"),  # ShuffleBN: no such copy
    ]
    assert calibration_note(entries) == (
        "Start of the EMAN / PN teachers' BN statistics (and FixMatch's EMA copy in `default`): calibrated "
        "on 20 batches before step 0 (`calibrate_bn_batches`, not the paper's start): `EMAN, calibrated`, "
        "`default`, `tpn`; not recorded (an entry "
        "from before emanorm recorded it): `old`; the student's initial statistics, mean 0 / variance 1 "
        "(the paper's start, uncalibrated): `eman`."
    )
    assert calibration_note([entry("bn", "bn", 20), entry("default", "default", 0)]) is None  # moco's


def test_paired_differences_pair_by_seed_and_count_wins():
    from emanorm.experiments.report import aggregate_paired, paired_differences, paired_table

    def entry(variant, seed, value, status="ok"):
        name = f"fixmatch-{variant}-s{seed}"
        return {"name": name, "run_dir": name, "variant": variant, "method": "fixmatch", "seed": seed,
                "status": status, "primary": value}

    entries = [
        entry("bn", 0, 60.0), entry("bn", 1, 70.0), entry("bn", 2, 65.0),
        entry("eman", 0, 61.0), entry("eman", 1, 72.0), entry("eman", 2, 64.0),  # +1, +2, -1
        entry("default", 0, 80.0), entry("default", 1, 99.0, status="failed"),  # only seed 0 pairs
        entry("gn", 5, 50.0),  # no bn run with seed 5: no pair
    ]
    diffs = paired_differences(entries, "bn")
    assert diffs[("eman", "fixmatch")] == {"values": [1.0, 2.0, -1.0], "seeds": [0, 1, 2], "higher": 2}
    assert diffs[("default", "fixmatch")]["values"] == [20.0]
    assert ("gn", "fixmatch") not in diffs and ("bn", "fixmatch") not in diffs
    rows = _table_rows("\n" + paired_table(["bn", "eman", "default", "gn"], ["fixmatch"], diffs), "\n")
    assert rows == [["eman", "+0.67 ± 1.53 (2/3)"], ["default", "+20.00 (1/1)"]]
    assert aggregate_paired(diffs)["eman"]["fixmatch"]["mean"] == pytest.approx(2 / 3)
    md = render_markdown(
        title="t", rows=["bn", "eman"], columns=["fixmatch"], entries=entries, paired_against="bn"
    )
    assert _table_rows(md, "## Paired difference to `bn`")[0] == ["eman", "+0.67 ± 1.53 (2/3)"]
    assert "## Paired" not in render_markdown(title="t", rows=["bn"], columns=["fixmatch"], entries=entries)


def test_band_and_plot(tmp_path):
    steps, means, stds = band([[(10, 50.0), (20, 60.0)], [(10, 54.0), (20, 62.0), (30, 70.0)]])
    assert steps == [10, 20, 30]
    assert means == pytest.approx([52.0, 61.0, 70.0])
    assert stds[0] == pytest.approx(math.sqrt(8.0)) and stds[2] == 0.0
    path = plot_curves({"moco": {"bn": [[(1, 50.0), (2, 55.0)]]}, "byol": {}}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


# -- the grid ---------------------------------------------------------------------------------------


def test_table8_variants_from_flags():
    variants = build_variants(
        ["default", "bn", "eman", "teacher_pn", "student_pn"],
        eman_momentums=[0.9, 0.99999],
        bn_momentums=[0.1, 0.001],
    )
    labels = [v.label for v in variants]
    assert labels == [
        "default",
        "bn",
        "eman",
        "eman(m=0.9)",
        "eman(m=0.99999)",
        "teacher_pn(alpha=0.9)",
        "teacher_pn(alpha=0.999)",
        "student_pn(alpha=0.9)",
        "student_pn(alpha=0.999)",
    ]
    by_label = {v.label: v.overrides for v in variants}
    assert by_label["eman(m=0.99999)"] == {"norm": "eman", "eman_momentum": 0.99999}
    assert by_label["student_pn(alpha=0.999)"] == {"norm": "student_pn", "bn_momentum": 0.001}
    with pytest.raises(UserError, match="teacher_pn / student_pn"):
        build_variants(["bn", "eman"], bn_momentums=[0.1])
    with pytest.raises(UserError, match="unknown norm 'batchnorm'"):
        build_variants(["batchnorm"])


def test_plan_grid_names_configs_and_special_rows(tmp_path):
    variants = build_variants(
        ["eman"],
        supervised=True,
        init_from=parse_init_from("scratch,pre=runs/ssl/moco-eman-s{seed}"),
        custom=[parse_variant("slow lr:norm=bn,lr=0.003,method_args.threshold=0.7,columns=[fixmatch]")],
    )
    specs = plan_grid(
        ["fixmatch", "moco"],
        variants,
        [0, 1],
        tmp_path,
        common={"max_steps": 7},
        method_args=parse_method_args(["moco:queue_size=64", "supervised:label_smoothing=0.1"]),
    )
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert names[0] == "fixmatch-eman-from-scratch-s0"  # seed-major order
    by_name = {s.name: s for s in specs}
    s = by_name["moco-eman-from-pre-s1"]
    assert s.run_dir == tmp_path / "runs" / "moco-eman-from-pre-s1"
    assert s.config["out"] == str(s.run_dir)
    assert s.config["init_from"] == "runs/ssl/moco-eman-s1" and s.config["seed"] == 1
    assert s.config["max_steps"] == 7 and s.config["epochs"] is None  # the budget replaced the preset's
    assert s.config["method_args"]["queue_size"] == 64  # --method-arg moco:... reaches MoCo runs only
    assert "queue_size" not in by_name["fixmatch-eman-from-pre-s1"].config["method_args"]
    assert by_name["fixmatch-eman-from-scratch-s0"].config["init_from"] is None
    # the supervised row: the FixMatch column's labels and budget, no FixMatch options, not for MoCo
    sup = by_name["fixmatch-supervised-from-scratch-s0"].config
    assert sup["method"] == "supervised" and sup["norm"] == "default"
    assert sup["eval_every"] == 0  # its epochs are passes over the labels: monitored at the end only
    assert sup["method_args"] == {"label_smoothing": 0.1}  # only its own --method-arg
    assert sup["labels_per_class"] == by_name["fixmatch-eman-from-scratch-s0"].config["labels_per_class"]
    assert not any(n.startswith("moco-supervised") for n in names)
    # a custom row limited to one column, with a dotted method option
    slow = by_name["fixmatch-slow-lr-from-scratch-s0"].config
    assert slow["lr"] == 0.003 and slow["method_args"]["threshold"] == 0.7 and slow["norm"] == "bn"
    assert "moco-slow-lr-from-scratch-s0" not in by_name
    assert len(specs) == 2 * (2 * 2 + 2 + 2)  # seeds x (eman rows x 2 methods + supervised + slow lr)


def test_plan_grid_rejects_bad_grids(tmp_path):
    with pytest.raises(UserError, match="use --norms"):
        plan_grid(["moco"], build_variants(["bn"]), [0], tmp_path, common={"norm": "eman"})
    with pytest.raises(UserError, match="supervised with norm eman"):
        plan_grid(["supervised"], build_variants(["eman"]), [0], tmp_path)
    with pytest.raises(UserError, match="unknown method 'simclr'"):
        plan_grid(["simclr"], build_variants(["bn"]), [0], tmp_path)
    with pytest.raises(UserError, match="method_args threshold"):
        plan_grid(["moco"], [parse_variant("t:norm=bn,method_args.threshold=0.7")], [0], tmp_path)
    with pytest.raises(UserError, match="unknown option"):
        plan_grid(["moco"], build_variants(["bn"]), [0], tmp_path, common={"learning_rate": 0.1})
    with pytest.raises(UserError, match="LABEL:KEY=VALUE"):
        parse_variant("no-colon")


def test_run_lock_refuses_a_second_trainer(tmp_path):
    lock = tmp_path / "run.lock"
    with run_lock(lock), pytest.raises(RunBusyError, match="another process is training it"), run_lock(lock):
        pass
    with run_lock(lock) as fd:  # released with its holder
        assert fd is not None


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["compare", "--methods", "moco", "--norms", "bn,bn", "--out", str(tmp_path)]) == 2
    assert "lists 'bn' twice" in capsys.readouterr().err
    assert main(["compare", "--methods", "fixmatch", "--norms", "eman", "--init-from", "nowhere/run",
                 "--out", str(tmp_path), "--no-progress"]) == 2  # fmt: skip
    assert "--init-from sources are not ready: nowhere/run (not found)" in capsys.readouterr().err
    assert main(["compare", "--methods", "fixmatch", "--norms", "bn,eman", "--paired-against", "gn",
                 "--out", str(tmp_path), "--no-progress"]) == 2  # fmt: skip
    assert "--paired-against 'gn' is not a row of this grid; rows: bn, eman" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was trained


# -- end to end on real Fashion-MNIST -----------------------------------------------------------------


def test_compare_grid_outputs_and_second_invocation_redoes_nothing(tmp_path, capsys, one_thread,
                                                                  tiny_fashion_mnist_dir):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fixmatch", "--norms", "bn,eman", "--seeds", "2",
            "--set", "labels_per_class=4", *TINY, "--data-dir", str(tiny_fashion_mnist_dir),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0  # --jobs 1: one run after another in this process
    capsys.readouterr()
    # results.md: both rows, 2 seeds each
    md = (out / "results.md").read_text()
    rows = _table_rows(md, "## Top-1")
    assert [r[0] for r in rows] == ["bn", "eman"]
    assert all(r[-1] == "2" and "±" in r[1] for r in rows)
    assert "Start of the EMAN / PN teachers' BN statistics" in md  # the preset's start, whichever it is
    # results.json: 4 raw entries, each with its run directory and the numbers of its summary.json
    record = json.loads((out / "results.json").read_text())
    runs = record["runs"]
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    assert {(r["variant"], r["seed"]) for r in runs} == {("bn", 0), ("bn", 1), ("eman", 0), ("eman", 1)}
    for r in runs:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["norm"] == r["variant"] and summary["seed"] == r["seed"] and summary["steps"] == 2
        assert r["metrics"]["test_acc"] == summary["final"]["test_acc_teacher"] == r["primary"]
        assert r["curve"] and r["curve"][-1] == [2, summary["final"]["knn_teacher"]]
    mean_bn = sum(r["primary"] for r in runs if r["variant"] == "bn") / 2
    assert record["tables"]["top1"]["bn"]["fixmatch"]["mean"] == pytest.approx(mean_bn)
    assert f"{mean_bn:.2f}" in rows[0][1]
    # paired against bn (auto: the grid has a bn row): eman's per-seed differences
    by = {(r["variant"], r["seed"]): r["primary"] for r in runs}
    paired = record["tables"]["paired"]
    assert paired["against"] == "bn" and list(paired["top1"]) == ["eman"]
    assert paired["top1"]["eman"]["fixmatch"]["values"] == pytest.approx(
        [by[("eman", s)] - by[("bn", s)] for s in (0, 1)]
    )
    assert _table_rows(md, "## Paired difference to `bn`")[0][0] == "eman"
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "configs" / "fixmatch-eman-s1.yaml").exists()  # `emanorm train --config` reproduces it

    # a second invocation trains nothing and reports the same numbers
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoints/last.pt")}
    assert len(mtimes) == 4
    assert main(argv) == 0
    assert "4 finished, 0 to resume, 0 new" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    again = json.loads((out / "results.json").read_text())
    assert [r["primary"] for r in again["runs"]] == [r["primary"] for r in runs]

    # a run without summary.json (as after a kill) is resumed from its checkpoint, not retrained
    victim = out / "runs" / "fixmatch-eman-s1"
    metrics = victim / "metrics.jsonl"
    train_records = [line for line in metrics.read_text().splitlines() if '"train"' in line]
    (victim / "summary.json").unlink()
    assert main(argv) == 0
    assert "3 finished, 1 to resume, 0 new" in capsys.readouterr().err
    assert json.loads((victim / "summary.json").read_text())["steps"] == 2
    assert [line for line in metrics.read_text().splitlines() if '"train"' in line] == train_records
    assert {p: p.stat().st_mtime_ns for p in mtimes if victim not in p.parents} == {
        p: t for p, t in mtimes.items() if victim not in p.parents
    }

    # a start-only setting changed since the grid started (the presets' calibrated start came later):
    # not a different config; the unfinished run resumes with the start it had (the preset's 20)
    (victim / "summary.json").unlink()
    assert main([*argv, "--set", "calibrate_bn_batches=0"]) == 0
    assert "3 finished, 1 to resume, 0 new" in capsys.readouterr().err
    assert json.loads((victim / "summary.json").read_text())["calibrate_bn_batches"] == 20

    # the same --out with another config is refused, not mixed into the table
    changed = [a if a != "labels_per_class=4" else "labels_per_class=5" for a in argv]
    assert main(changed) == 2
    assert "different config" in capsys.readouterr().err
    assert all(p.exists() for p in mtimes)


@pytest.mark.slow  # the linear probe over the real training and test sets (600 / 10000 images)
@needs_fmnist
def test_compare_self_supervised_linear_probe_and_failed_runs(tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    argv = [
        "compare", "--methods", "byol", "--norms", "eman", "--seeds", "1",
        "--set", "method_args={hidden_dim: 32, proj_dim: 16}",
        # a row whose runs fail at start (a batch larger than the dataset): the others go on
        "--variant", "broken:norm=bn,batch_size=70000",
        "--linear-fraction", "0.01", "--linear-epochs", "2", "--linear-lrs", "0.1,1",
        *TINY, "--out", str(out),
    ]  # fmt: skip
    assert main([*argv, "--jobs", "2"]) == 1  # two training subprocesses at once; one fails
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "byol-broken-s0" in err and "70000" in err
    record = json.loads((out / "results.json").read_text())
    by_name = {r["name"]: r for r in record["runs"]}
    ok, broken = by_name["byol-eman-s0"], by_name["byol-broken-s0"]
    assert broken["status"] == "failed" and "70000" in broken["error"]  # the subprocess's error line
    assert "emanorm: error:" in Path(broken["log"]).read_text()
    assert (out / "logs" / "byol-eman-s0.log").exists()
    assert ok["status"] == "ok" and ok["protocol"] == "linear"
    # a count of the 10000 test images (2 BYOL steps and 2 probe epochs: near chance, measured 9.38%)
    top1 = ok["metrics"]["linear_top1"]
    assert abs(top1 * 100 - round(top1 * 100)) < 1e-3 and ok["primary"] == top1
    assert ok["linear"]["num_train"] == 600 and ok["linear"]["num_test"] == 10000  # 1% labels, whole test set
    assert (
        ok["metrics"]["knn"]
        == json.loads((Path(ok["run_dir"]) / "summary.json").read_text())["final"]["knn_teacher"]
    )
    md = (out / "results.md").read_text()
    assert "linear probe" in md and "1% of the training labels" in md
    assert _table_rows(md, "## Top-1") == [["eman", f"{ok['primary']:.2f}", "1"], ["broken", "–", "–"]]
    assert "byol-broken-s0" in md.split("## Runs not in the tables")[1]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    # the probe is cached in the run directory: a report-only pass does not recompute it
    cache = Path(ok["run_dir"]) / "compare_linear.json"
    before = cache.stat().st_mtime_ns
    assert main([*argv, "--report-only"]) == 0
    assert cache.stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text())["runs"][0]["primary"] == ok["primary"]


def test_compare_merges_seeds_trained_elsewhere(tmp_path, capsys, one_thread, tiny_fashion_mnist_dir):
    """--merge-results: a grid reported from runs finished elsewhere plus the ones trained here."""
    grid = ["compare", "--methods", "fixmatch", "--norms", "eman", "--set", "labels_per_class=4", *TINY,
            "--data-dir", str(tiny_fashion_mnist_dir)]
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([*grid, "--seeds", "1", "--out", str(first)]) == 0
    earlier = json.loads((first / "results.json").read_text())["runs"][0]
    capsys.readouterr()

    merge = ["--merge-results", str(first / "results.json")]
    # a budget that does not match the file's run is refused before anything trains
    assert main([*grid, "--seeds", "2", "--max-steps", "3", "--out", str(second), *merge]) == 2
    refused = capsys.readouterr().err
    assert "fixmatch-eman-s0 is not the run this grid plans" in refused
    assert "(budget: {'max_steps': 2} there, {'max_steps': 3} here)" in refused
    assert not (second / "runs").exists()

    assert main([*grid, "--seeds", "2", "--out", str(second), *merge, "--dry-run"]) == 0
    err_out = capsys.readouterr()
    assert "0 finished, 0 to resume, 1 new, 1 from --merge-results" in err_out.err
    assert "fixmatch-eman-s0  merged" in err_out.out
    assert f"reported from {first / 'results.json'}\n" in err_out.out  # the file, not its whole entry

    assert main([*grid, "--seeds", "2", "--out", str(second), *merge]) == 0
    assert not (second / "runs" / "fixmatch-eman-s0").exists()  # seed 0 is not trained again
    record = json.loads((second / "results.json").read_text())
    runs = {r["seed"]: r for r in record["runs"]}
    assert runs[0]["merged_from"] == str(first / "results.json") and "merged_from" not in runs[1]
    assert runs[0]["primary"] == earlier["primary"] and runs[0]["run_dir"] == earlier["run_dir"]
    assert runs[1]["status"] == "ok" and Path(runs[1]["run_dir"]).parent == second / "runs"
    cell = record["tables"]["top1"]["eman"]["fixmatch"]
    assert cell["n"] == 2 and cell["values"] == [runs[0]["primary"], runs[1]["primary"]]
    assert record["merged_from"] == [str(first / "results.json")]
    md = (second / "results.md").read_text()
    assert f"Reported from `{first / 'results.json'}`" in md and "`fixmatch-eman-s0`" in md
    assert _table_rows(md, "## Top-1")[0][-1] == "2"

    # a run finished in --out wins over the file's; an unreadable file is a one-line error
    assert main([*grid, "--seeds", "2", "--out", str(first), *merge, "--report-only"]) == 0
    assert "merged_from" not in json.loads((first / "results.json").read_text())["runs"][0]
    (tmp_path / "bad.json").write_text("{")
    assert main([*grid, "--out", str(second), "--merge-results", str(tmp_path / "bad.json")]) == 2
    assert "not readable as JSON" in capsys.readouterr().err


def test_a_report_merged_beside_the_file_it_merged_keeps_the_runs_first_source(tmp_path):
    """A results.json that merged an earlier file holds that file's runs again, marked
    ``merged_from``; both can be given, and a run is then reported from where it was trained. The
    same run in two files with different results stays an error."""
    from emanorm.experiments.evaluate import MergedResults
    from emanorm.experiments.grid import RunSpec

    name = "fixmatch-eman-s0"
    config = {"norm": "eman", "method": "fixmatch", "max_steps": 100, "epochs": 3}
    planned = RunSpec("eman", "fixmatch", 0, name, tmp_path / "out" / name, config)
    trained = {"name": name, "variant": "eman", "method": "fixmatch", "seed": 0, "norm": "eman",
               "run_method": "fixmatch", "status": "ok", "primary": 70.0, "metrics": {"test_acc": 70.0},
               "protocol": "test_acc", "budget": {"max_steps": 100}}  # fmt: skip
    first, report = tmp_path / "first.json", tmp_path / "report.json"
    first.write_text(json.dumps({"which": "teacher", "runs": [trained]}))
    report.write_text(json.dumps({"which": "teacher", "runs": [{**trained, "merged_from": str(first)}]}))
    both = MergedResults([str(report), str(first)], which="teacher", linear=None)
    assert both.entry(planned)["merged_from"] == str(first)
    alone = MergedResults([str(report)], which="teacher", linear=None)
    assert alone.entry(planned)["merged_from"] == str(report)
    # a copy whose result differs from its origin's is not the same run: which one is meant is unclear
    differs = {**trained, "primary": 71.0, "merged_from": str(first)}
    report.write_text(json.dumps({"which": "teacher", "runs": [differs]}))
    with pytest.raises(UserError, match=f"{name} is in several --merge-results"):
        MergedResults([str(report), str(first)], which="teacher", linear=None).entry(planned)
    # two files that both trained it (no merged_from): an error too
    report.write_text(json.dumps({"which": "teacher", "runs": [trained]}))
    with pytest.raises(UserError, match="several --merge-results"):
        MergedResults([str(report), str(first)], which="teacher", linear=None).entry(planned)


def test_merged_results_check_each_entry_against_the_planned_run(tmp_path):
    """MergedResults on hand-written records: identity, budget, protocol and probe must match."""
    from emanorm.experiments.evaluate import LinearProtocol, MergedResults
    from emanorm.experiments.grid import RunSpec

    linear = LinearProtocol(fraction=0.1, epochs=5, lrs=(1.0,))

    def spec(method="fixmatch", variant="eman", seed=0, **cfg):
        name = f"{method}-{variant}-s{seed}"
        config = {"norm": "eman", "method": method, "max_steps": 100, "epochs": 3, **cfg}
        return RunSpec(variant, method, seed, name, tmp_path / "out" / name, config)

    def entry(method="fixmatch", variant="eman", seed=0, **fields):
        protocol = "test_acc" if method == "fixmatch" else "linear"
        return {"name": f"{method}-{variant}-s{seed}", "variant": variant, "method": method, "seed": seed,
                "norm": "eman", "run_method": method, "status": "ok", "primary": 70.0, "protocol": protocol,
                "budget": {"max_steps": 100}, **fields}  # fmt: skip

    def merged(*entries, which="teacher", probe=linear):
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
        path.write_text(json.dumps({"which": "teacher", "runs": list(entries)}))
        return MergedResults([str(path)], which=which, linear=probe), str(path)

    ok, path = merged(entry())
    assert ok.covers(spec()) and ok.entry(spec())["merged_from"] == path
    assert not ok.covers(spec(seed=1))  # not in the file: trains here
    (spec().run_dir).mkdir(parents=True)
    (spec().run_dir / "summary.json").write_text("{}")
    assert not ok.covers(spec())  # finished in --out: --out wins

    for planned, differs in [
        (spec(variant="bn", norm="bn"), None),  # another row: another name, not covered
        (spec(norm="bn"), "norm: 'eman' there, 'bn' here"),
        (spec(method="fixmatch", seed=0, max_steps=200), "budget"),
    ]:
        fresh, _ = merged(entry())
        if differs is None:
            assert not fresh.covers(planned)
            continue
        with pytest.raises(UserError, match=differs):
            fresh.entry(planned)
    # the start: checked where the entry records it (files before 2026-12-06 do not)
    calibrated, _ = merged(entry(calibrate_bn_batches=20))
    assert calibrated.entry(spec(calibrate_bn_batches=20))["calibrate_bn_batches"] == 20
    hint = r"calibrate_bn_batches: 20 there, 0 here\) \(--set calibrate_bn_batches=N"
    with pytest.raises(UserError, match=hint):
        merged(entry(calibrate_bn_batches=20))[0].entry(spec(calibrate_bn_batches=0))
    assert merged(entry())[0].entry(spec(calibrate_bn_batches=20))["primary"] == 70.0  # unrecorded: unchecked
    # a kNN-scored self-supervised run never stands in for a linear-probe one, nor another probe
    knn, _ = merged(entry("byol", protocol="knn"))
    with pytest.raises(UserError, match="protocol: 'knn' there, 'linear' here"):
        knn.entry(spec("byol"))
    other_probe, _ = merged(entry("byol", linear={**linear.as_dict(), "epochs": 50}))
    with pytest.raises(UserError, match=r"another linear probe .*epochs: 50 there, 5 here"):
        other_probe.entry(spec("byol"))
    same_probe, _ = merged(entry("byol", linear=linear.as_dict()))
    assert same_probe.entry(spec("byol"))["primary"] == 70.0
    # unfinished or unscored entries are not merged: those runs train here
    for unfinished in (entry(status="failed"), entry(primary=None)):
        assert not merged(unfinished)[0].covers(spec())
    # one-line errors for records that are not compare's
    with pytest.raises(UserError, match="evaluated the teacher"):
        merged(entry(), which="student")
    (tmp_path / "bad.json").write_text(json.dumps({"which": "teacher", "runs": [{"status": "ok"}]}))
    with pytest.raises(UserError, match="run #0 has no name"):
        MergedResults([str(tmp_path / "bad.json")], which="teacher", linear=None)
    with pytest.raises(UserError, match="no such file"):
        MergedResults([str(tmp_path / "none.json")], which="teacher", linear=None)


def test_a_sigterm_caught_by_an_in_process_run_stops_the_grid(tmp_path, monkeypatch):
    # jobs=1 trains in compare's own process, where the trainer's preemption handler takes SIGTERM: the
    # run is checkpointed and raises Preempted. The grid must stop there, not start the next run.
    from emanorm.errors import Preempted
    from emanorm.experiments import runner

    specs = plan_grid(["fixmatch"], build_variants(["bn", "eman"]), [0], tmp_path, common={"max_steps": 2})
    started = []

    def preempted_train(config, **kwargs):
        started.append(config["out"])
        raise Preempted("stopped by SIGTERM after step 1; checkpoint kept")

    monkeypatch.setattr(runner, "train", preempted_train)
    with pytest.raises(Preempted) as stopped:
        runner.run_grid(specs, tmp_path, jobs=1, progress=False)
    assert started == [str(specs[0].run_dir)]  # the second run never started
    assert str(stopped.value) == (
        f"compare stopped by SIGTERM after step 1 of {specs[0].name}; unfinished runs keep their "
        "checkpoints: rerun the same compare command to resume (exit status 75: resumable)")
    assert stopped.value.exit_code == 75


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_compare_resumably_with_checkpoints_kept(tiny_fashion_mnist_dir, tmp_path, jobs):
    import os
    import signal
    import sys

    from conftest import signal_when_ready

    out = tmp_path / "cmp"
    command = [
        sys.executable, "-m", "emanorm", "compare", "--methods", "fixmatch", "--norms", "bn,eman",
        "--seeds", "1", "--data-dir", str(tiny_fashion_mnist_dir), "--max-steps", "100000", "--device", "cpu",
        "--no-progress",
        "--set", "batch_size=16", "--set", "unlabeled_ratio=1", "--set", "knn_bank_size=64",
        "--set", "labels_per_class=2", "--set", "checkpoint_every_steps=1", "--set", "eval_every=0",
        "--jobs", str(jobs), "--out", str(out),
    ]  # fmt: skip
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    first = out / "runs" / "fixmatch-bn-s0" / "checkpoints" / "last.pt"
    status, err = signal_when_ready(command, env, first, "the first run's checkpoint", signal.SIGTERM)
    assert status == 75, err
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("emanorm: compare stopped by SIGTERM") and last.endswith(
        "rerun the same compare command to resume (exit status 75: resumable)"), err
    if jobs == 1:  # one run at a time: the second never started
        assert not (out / "runs" / "fixmatch-eman-s0").exists()
    assert first.exists()  # what was trained is kept for the rerun
