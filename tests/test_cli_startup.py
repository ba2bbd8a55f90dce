"""A command line that answers at once (issue 31 item 1): ``--version``, every ``--help``,
``presets`` and argument or config errors never import torch, scikit-learn or matplotlib.

Each case runs in a fresh interpreter (an import already made by the test process would hide one)
and reports which heavy modules ``sys.modules`` holds after ``emanorm.cli.main`` returned.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import HANG_BOUND_S

HEAVY = ("torch", "sklearn", "matplotlib")

PROBE = """
import json, sys
from emanorm.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
print("\\n" + json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def run_probe(*args: str) -> tuple[int, list[str], str]:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=HANG_BOUND_S)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    return verdict["code"], verdict["heavy"], done.stderr


COMMANDS = [
    "--version", "--help", "train --help", "eval --help", "eval knn --help", "eval linear --help",
    "eval finetune --help", "eval retrieval --help", "eval lowshot --help", "export --help",
    "compare --help", "doctor --help", "presets --help", "presets", "presets small-moco",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_version_help_and_presets_import_no_heavy_library(command):
    code, heavy, _ = run_probe(*command.split())
    assert code in (0, None) and heavy == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--norm", "EMAN"], "unknown norm 'EMAN' (did you mean 'eman'?)"),
        (["train", "--method", "simclr"], "unknown method 'simclr'"),
        (["train", "--epochs", "-3"], "epochs must be positive"),
        (["train", "--lr", "abc"], "invalid float value"),
        (["train", "--set", "knn_kk=3"], "did you mean 'knn_k'?"),
        (["train", "--config", "no-such-preset"], "unknown preset"),
        (["presets", "small-mocco"], "did you mean 'small-moco'?"),
        (["nosuch"], "invalid choice"),
    ],
)
def test_argument_and_config_errors_answer_before_torch(args, message):
    code, heavy, stderr = run_probe(*args)
    assert code == 2 and message in stderr and heavy == [], stderr


def test_print_config_answers_before_torch(tmp_path):
    code, heavy, _ = run_probe("train", "--method", "moco", "--max-steps", "3", "--print-config")
    assert code == 0 and heavy == []


def test_importing_the_package_and_its_config_schema_imports_no_torch():
    code = (
        "import sys, emanorm, emanorm.train, emanorm.evaluation, emanorm.train.config, emanorm.catalog, "
        "emanorm.experiments, emanorm.experiments.grid, emanorm.experiments.planner; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_BOUND_S)
    assert done.stdout.strip() == "[]", done.stderr
    used = "import sys, emanorm; emanorm.EMATeacher; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", used], capture_output=True, text=True, timeout=HANG_BOUND_S)
    assert done.stdout.strip() == "True", done.stderr  # a torch name still works, loaded on use
    used = (
        "import sys; from emanorm.experiments.grid import run_grid; import emanorm.experiments as e; "
        "print(e.run_grid is run_grid, e.plot_curves.__module__, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", used], capture_output=True, text=True, timeout=HANG_BOUND_S)
    assert done.stdout.strip() == "True emanorm.experiments.plots True", done.stderr


def test_a_finished_started_or_busy_out_is_refused_before_torch(tmp_path):
    from emanorm.train.lock import LOCK_NAME, run_lock

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    code, heavy, stderr = run_probe("train", "--max-steps", "1", "--out", str(finished))
    assert code == 2 and "already holds a finished run" in stderr and heavy == [], stderr

    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("method: moco\n")
    code, heavy, stderr = run_probe("train", "--max-steps", "1", "--out", str(started), "--resume")
    assert code == 2 and "--resume with a different config (" in stderr
    assert "method: 'moco' -> 'fixmatch'" in stderr
    assert heavy == []

    busy = tmp_path / "busy"
    busy.mkdir()
    with run_lock(busy / LOCK_NAME, remove=True):
        code, heavy, stderr = run_probe("train", "--max-steps", "1", "--out", str(busy))
    assert code == 2 and "another process is training the run in" in stderr and heavy == [], stderr
    assert list(busy.iterdir()) == []  # the refused probe wrote nothing there


def one_line(stderr: str) -> str:
    """The refusal, checked to be the only line on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--norms", "bn,EMAN"], "unknown norm 'EMAN' in --norms (did you mean 'eman'?); allowed: default,"),
        (["--methods", "simclr"], "unknown method 'simclr' in --methods; allowed: fixmatch, moco,"),
        (["--methods", "fixmach"], "unknown method 'fixmach' in --methods (did you mean 'fixmatch'?)"),
        (["--method-arg", "bol:dim=8"], "--method-arg names unknown method 'bol' (did you mean 'byol'?)"),
        (["--variant", "no-colon"], "--variant takes LABEL:KEY=VALUE"),
        (["--set", "knn_kk=3"], "did you mean 'knn_k'?"),
        (["--set", "norm=eman"], "--set norm=... would be overridden by the grid; use --norms"),
        (["--eman-momentums", "2"], "--eman-momentums values must lie in [0, 1], got '2'"),
        (["--linear-lrs", "0.1,x"], "--linear-lrs takes numbers like 0.1,1,10, got 'x'"),
        (["--norms", "bn,eman", "--paired-against", "gn"], "--paired-against 'gn' is not a row of this grid"),
        (["--config", "no-such-preset"], "unknown preset"),
        (["--methods", "supervised", "--norms", "eman"], "supervised with norm eman (allowed: default, bn,"),
        (["--methods", "moco", "--method-arg", "moco:nosuch=1"], "moco with method_args nosuch (allowed:"),
        (
            ["--methods", "moco", "--norms", "eman", "--set", "labels_per_class=5"],
            "--set gives moco labels_per_class=5, but moco trains without labels",
        ),
    ],
)
def test_compare_argument_errors_answer_before_torch(tmp_path, args, message):
    out = tmp_path / "grid"
    code, heavy, stderr = run_probe("compare", *args, "--out", str(out))
    assert code == 2 and message in one_line(stderr) and heavy == [], stderr
    assert not out.exists()


def test_a_missing_merge_file_is_refused_before_torch(tmp_path):
    missing = tmp_path / "elsewhere" / "results.json"
    code, heavy, stderr = run_probe("compare", "--merge-results", str(missing), "--out", str(tmp_path / "g"))
    assert code == 2 and one_line(stderr) == f"emanorm: error: --merge-results {missing}: no such file"
    assert heavy == []


def test_missing_paths_are_refused_before_torch_in_the_loaders_words(tmp_path):
    missing = tmp_path / "missing"
    out = str(tmp_path / "run")
    cases = [
        (["train", "--max-steps", "1", "--out", out, "--data-dir", str(missing)],
         f"fashion_mnist: data_dir {missing} is not a directory (it does not exist); leave it out to use "
         "/usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`)"),
        (["train", "--dataset", "cifar10", "--max-steps", "1", "--out", out, "--data-dir", str(missing)],
         f"cifar10: data_dir {missing} is not a directory (it does not exist)"),
        (["train", "--dataset", "stl10", "--max-steps", "1", "--out", out],
         "stl10 needs data_dir; expected DIR/stl10_binary/ (binary layout)"),
        (["train", "--max-steps", "1", "--out", out, "--label-index-csv", f"{missing}.csv"],
         f"split CSV {missing}.csv not found"),
        (["train", "--max-steps", "1", "--out", out, "--method", "supervised", "--norm", "eman"],
         "norm 'eman' is not valid for method 'supervised'; allowed: default, bn, sync_bn, gn, in"),
        (["train", "--max-steps", "1", "--out", out, "--method", "moco", "--method-arg", "nosuch=1"],
         "unknown option(s) nosuch for method 'moco'; allowed: dim=128, queue_size=65536, temperature=0.2, "
         "symmetric=False, num_splits=8, momentum_warmup=False, exclude_bias_and_norm=False"),
        (["train", "--max-steps", "1", "--out", out, "--init-from", str(missing)],
         f"checkpoint or run directory not found: {missing}"),
        *[(["eval", protocol, str(missing)], f"no run directory or checkpoint at '{missing}'")
          for protocol in ("knn", "linear", "finetune", "retrieval", "lowshot")],
        (["export", str(missing)], f"no run directory or checkpoint at '{missing}'"),
        (["doctor", str(missing)], f"checkpoint or run directory not found: {missing}"),
    ]  # fmt: skip
    for args, message in cases:
        code, heavy, stderr = run_probe(*args)
        assert code == 2 and one_line(stderr) == f"emanorm: error: {message}" and heavy == [], (args, stderr)
    assert not (tmp_path / "run").exists() and not missing.exists()


def test_the_early_path_messages_are_the_loaders_own(tmp_path):
    """The early refusals repeat what the loaders and the methods say once torch is there (the
    wording is theirs)."""
    from emanorm.data import load_dataset
    from emanorm.data.splits import read_split_csv
    from emanorm.errors import UserError
    from emanorm.evaluation.context import load_run_backbone
    from emanorm.methods import build_method
    from emanorm.train.checkpoint import resolve_checkpoint_path

    missing = tmp_path / "missing"
    expected = {
        ("train", "--data-dir"): lambda: load_dataset("fashion_mnist", "train", data_dir=missing),
        ("train", "--dataset", "cifar10", "--data-dir"):
            lambda: load_dataset("cifar10", "train", data_dir=missing),
        ("train", "--label-index-csv"): lambda: read_split_csv(missing),
        ("train", "--init-from"): lambda: resolve_checkpoint_path(missing),
        ("eval", "knn"): lambda: load_run_backbone(missing, "teacher"),
        ("doctor",): lambda: resolve_checkpoint_path(missing),
    }
    for args, load in expected.items():
        with pytest.raises((UserError, FileNotFoundError)) as refused:
            load()
        extra = ["--max-steps", "1", "--out", str(tmp_path / "run")] if args[0] == "train" else []
        code, _, stderr = run_probe(*args, str(missing), *extra)
        assert code == 2 and one_line(stderr) == f"emanorm: error: {refused.value}", (args, stderr)
    for method, norm, options in (("supervised", "eman", {}), ("moco", "eman", {"nosuch": 1})):
        with pytest.raises(ValueError) as refused:  # both checked before anything is built
            build_method(method, backbone_factory=None, num_classes=10, norm=norm, momentum=0.99,
                         eman_momentum=None, bn_momentum=0.1, **options)  # fmt: skip
        args = ["train", "--method", method, "--norm", norm, "--max-steps", "1", "--out", str(tmp_path)]
        args += [f"--method-arg={key}={value}" for key, value in options.items()]
        code, _, stderr = run_probe(*args)
        assert code == 2 and one_line(stderr) == f"emanorm: error: {refused.value}", (method, stderr)
    for dataset in ("cifar10", "stl10", "imagenet", "folder", "voc2007"):  # no data_dir at all
        with pytest.raises(FileNotFoundError) as refused:
            load_dataset(dataset, "train")
        code, _, stderr = run_probe("train", "--dataset", dataset, "--max-steps", "1", "--out", str(tmp_path))
        assert code == 2 and one_line(stderr) == f"emanorm: error: {refused.value}", (dataset, stderr)


def test_a_missing_data_dir_is_left_to_the_loader_where_it_reads_nothing(tmp_path):
    """--resume of a finished run reports it and loads nothing: a --data-dir that is gone since is
    not refused (the early check covers only what the trainer would read)."""
    from emanorm.cli.train import refuse_before_loading
    from emanorm.errors import UserError
    from emanorm.train.config import resolve_config
    from emanorm.train.lock import CHECKPOINT_FILE

    run = tmp_path / "run"
    cfg = resolve_config(None, {"out": str(run), "data_dir": str(tmp_path / "gone"),
                                "init_from": str(tmp_path / "gone-too")})  # fmt: skip
    with pytest.raises(UserError, match=r"data_dir .* does not exist"):
        refuse_before_loading(cfg, True, False)
    run.mkdir()
    (run / "summary.json").write_text("{}")
    refuse_before_loading(cfg, True, False)  # finished, resumed: the summary is reported
    with pytest.raises(UserError, match="data_dir"):
        refuse_before_loading(cfg, True, True)  # --force trains again: it reads the data
    (run / "summary.json").unlink()
    (run / CHECKPOINT_FILE).parent.mkdir()
    (run / CHECKPOINT_FILE).write_bytes(b"")
    cfg["data_dir"] = None
    refuse_before_loading(cfg, True, False)  # a resumed checkpoint replaces --init-from
    with pytest.raises(UserError, match="checkpoint or run directory not found"):
        refuse_before_loading(cfg, False, True)


def test_resume_of_a_run_that_does_not_exist_is_refused_in_one_line(tmp_path):
    missing = tmp_path / "nonexistent"
    code, heavy, stderr = run_probe("train", "--max-steps", "1", "--resume", "--out", str(missing))
    line = one_line(stderr)
    assert code == 2 and heavy == []
    assert line.startswith(f"emanorm: error: --resume: {missing} does not exist")
    assert "no run to continue" in line and "--resume auto" in line
    assert not missing.exists()  # nothing was created


def test_resume_auto_of_a_missing_directory_goes_past_that_check(tmp_path):
    """--resume auto starts a run that is not there: the next check (a missing --data-dir, answered
    before torch too) is the one that stops it, so it went past the resume check."""
    missing = tmp_path / "nonexistent"
    code, heavy, stderr = run_probe(
        "train", "--max-steps", "1", "--resume", "auto", "--out", str(missing),
        "--data-dir", str(tmp_path / "no"),
    )
    line = one_line(stderr)
    assert code == 2 and heavy == [] and "data_dir" in line and "no run to continue" not in line
    assert not missing.exists()
