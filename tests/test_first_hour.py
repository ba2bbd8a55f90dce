"""What a new user meets first (issue 21): introspection, feedback, one unit, finished runs.

Most tests here need no training; the ones that train do a few steps on the 120-image stand-in
of Fashion-MNIST and are marked slow.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import emanorm
from conftest import HANG_BOUND_S
from emanorm.cli import build_parser, main
from emanorm.cli.train import format_report
from emanorm.data.datasets import DATASETS
from emanorm.errors import UserError
from emanorm.evaluation import knn_monitor
from emanorm.evaluation.monitor import percent
from emanorm.models import BACKBONES
from emanorm.train import build_run, resolve_config, train
from emanorm.train.config import DEFAULTS, METHODS, NORMS
from emanorm.train.curves import plot_run_curves
from emanorm.train.loop import light_run
from emanorm.train.recipe import amp_context

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(data_dir: Path, out: Path, **extra) -> dict:
    """FixMatch-EMAN on the stand-in: 7 steps per epoch (120 images, batch 16)."""
    overrides = {
        "data_dir": str(data_dir), "max_steps": 3, "batch_size": 16, "unlabeled_ratio": 1,
        "labels_per_class": 2, "knn_bank_size": 64, "monitor_test_size": 40, "log_every": 1,
        "device": "cpu", "out": str(out),
    }
    overrides.update(extra)
    return resolve_config(None, overrides)


def tiny_flags(data_dir: Path, out: Path) -> list[str]:
    return [
        "train", "--data-dir", str(data_dir), "--max-steps", "3", "--batch-size", "16",
        "--unlabeled-ratio", "1", "--labels-per-class", "2", "--set", "knn_bank_size=64",
        "--set", "monitor_test_size=40", "--device", "cpu", "--out", str(out), "--no-progress",
    ]  # fmt: skip


# -- help and introspection -------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"emanorm {emanorm.__version__}"


def test_train_help_lists_the_registries_and_defaults():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    for name in (*BACKBONES, *DATASETS, *METHODS, *NORMS):
        assert name in text, name
    assert f"(default {DEFAULTS['seed']})" in text and "--print-config" in text


def test_eval_help_names_the_real_output_file_and_the_defaults():
    ev = build_parser()._subparsers._group_actions[0].choices["eval"]
    protocols = ev._subparsers._group_actions[0].choices
    assert "eval_<protocol>_<which>" in protocols["knn"].format_help()
    lowshot = " ".join(protocols["lowshot"].format_help().split())
    assert "(default [1, 2, 4, 8, 16])" in lowshot and "(default 5)" in lowshot
    linear = " ".join(protocols["linear"].format_help().split())
    assert "(default 1)" in linear and "(default 256)" in linear  # --repeats, --probe-batch-size


def test_presets_name_prints_the_preset(capsys):
    assert main(["presets", "small-fixmatch"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"] == "fixmatch" and shown["labels_per_class"] == 10
    assert main(["presets", "no-such-preset"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'no-such-preset'" in err and "small-fixmatch" in err and len(err.splitlines()) == 1


def test_print_config_shows_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "moco", "--max-steps", "7", "--out", str(out), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg == resolve_config(None, {"method": "moco", "max_steps": 7, "out": str(out)})
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter importing torch: ~6 CPU-seconds
def test_presets_into_a_closed_pipe_is_quiet():
    """`emanorm presets | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.run(
        f"{sys.executable} -m emanorm presets | head -1",
        shell=True, capture_output=True, text=True, timeout=HANG_BOUND_S,
    )
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="amp fp16 needs a CUDA device"):
        amp_context(torch.device("cpu"), "fp16")
    context, scaler = amp_context(torch.device("cpu"), "bf16")
    assert scaler is None and context() is not None


# -- the report and the unit --------------------------------------------------------------------------


def test_percent_rounds_away_float_noise():
    assert percent(0.6999999881) == 70.0 and percent(torch.tensor(0.5).item()) == 50.0
    assert percent(1 / 3) == 33.3333


def test_supervised_report_has_one_network_and_knn_says_its_protocol():
    final = {"test_acc_teacher": 62.5, "test_acc_student": 62.5, "knn_teacher": 70.1, "knn_student": 70.1,
             "knn_k": 20, "knn_bank": 100}
    summary = {"method": "supervised", "norm": "bn", "dataset": "fashion_mnist", "steps": 3, "labeled": 100,
               "wall_clock_s": 1.0, "run_dir": "r", "final": final, "environment": {"threads": 1}}
    report = format_report(summary)
    assert "student" not in report and report.count("62.50%") == 1 and "model" in report
    assert "kNN accuracy 70.10% (k=20, bank of 100 training images)" in report and "1 CPU thread" in report
    report = format_report({**summary, "method": "fixmatch"})
    assert "teacher" in report and "student" in report


def test_run_curves_from_metrics(tmp_path):
    records = [{"kind": "train", "step": s, "epoch": 0, "loss": 2.0 / s, "mask": 0.1 * s} for s in (1, 2, 3)]
    records.append({"kind": "eval", "step": 3, "epoch": 0, "knn_teacher": 20.0, "knn_k": 20, "knn_bank": 64})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut by a ki')
    path = plot_run_curves(metrics, tmp_path / "curves.png")
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_run_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") is None


def test_light_run_shrinks_only_the_monitor_sets(tiny_fashion_mnist_dir, tmp_path):
    cfg = tiny(tiny_fashion_mnist_dir, tmp_path / "run", eval_light_size=16)
    run = build_run(cfg)
    light = light_run(run)
    assert light.cfg["knn_bank_size"] == 16 and light.cfg["monitor_test_size"] == 16
    assert run.cfg["knn_bank_size"] == 64 and light.method is run.method
    assert light_run(build_run({**cfg, "eval_light_size": None})).cfg["knn_bank_size"] == 64


# -- compare -------------------------------------------------------------------------------------------


def test_compare_report_only_refuses_a_grid_not_in_out(tmp_path, capsys):
    out = tmp_path / "grid"
    out.mkdir()
    (out / "results.md").write_text("the earlier table\n")
    argv = ["compare", "--methods", "fixmatch", "--norms", "bn", "--max-steps", "2", "--out", str(out)]
    assert main([*argv, "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "none of the 3 runs of this grid is in" in err and "Traceback" not in err
    assert (out / "results.md").read_text() == "the earlier table\n"


def test_compare_dry_run_checks_init_from_sources(tmp_path, capsys):
    argv = ["compare", "--methods", "fixmatch", "--norms", "eman", "--max-steps", "2", "--out",
            str(tmp_path / "grid"), "--init-from", f"moco={tmp_path}/no-such-run-s{{seed}}", "--dry-run"]
    assert main(argv) == 2
    assert "--init-from sources are not ready" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_compare_progress_counts_the_steps_of_running_runs(tmp_path):
    from emanorm.experiments.grid import RunSpec, StepProgress

    def spec(name: str, steps: int, done: int | None) -> RunSpec:
        run_dir = tmp_path / name
        run_dir.mkdir()
        if done is not None:
            (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": done}) + "\n{cut")
        return RunSpec("eman", "fixmatch", 0, name, run_dir, {"max_steps": steps})

    specs = [spec("a", 10, 4), spec("b", 20, None), spec("c", 5, 9)]
    assert StepProgress.applies(specs)
    assert not StepProgress.applies([RunSpec("v", "moco", 0, "d", tmp_path, {"max_steps": None})])

    class Bar:
        n = 0
        desc = "compare"

        def refresh(self) -> None:
            pass

        def set_description_str(self, desc: str, refresh: bool = True) -> None:
            self.desc = desc

    progress = StepProgress(Bar(), specs, interval=0.01)
    # c has trained its 5 steps but is not finished (its final evaluation runs): not 100% yet
    assert progress.total() == 35 and progress.done() == 4 + 0 + 4
    progress.finished.add("b")
    with progress:
        progress.refresh()
    assert progress.bar.n == 4 + 20 + 4 and progress.bar.desc == "compare [final evaluation: c]"
    progress.finished.add("c")
    progress.refresh()
    assert progress.bar.n == 4 + 20 + 5 and progress.bar.desc == "compare"


# -- training: feedback, environment, finished runs ----------------------------------------------------


def test_a_run_reports_units_protocol_environment_and_curves(tiny_fashion_mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_flags(tiny_fashion_mnist_dir, run)) == 0
    captured = capsys.readouterr()
    assert "bank of 64 training images" in captured.out and "k=20" in captured.out
    summary = json.loads((run / "summary.json").read_text())
    final = summary["final"]
    assert final["knn_k"] == 20 and final["knn_bank"] == 64
    for key in ("knn_teacher", "knn_student", "test_acc_teacher", "test_acc_student"):
        assert 0.0 <= final[key] <= 100.0 and round(final[key], 4) == final[key]
    # the stand-in's grey level encodes the label: kNN far above chance (10%) even after 2 steps
    assert final["knn_teacher"] >= 25.0 and final["knn_student"] >= 25.0, final
    assert summary["environment"]["threads"] == torch.get_num_threads()
    assert summary["environment"]["torch"] == torch.__version__ and summary["environment"]["device"] == "cpu"
    assert summary["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["environment"]["cpu_model"]  # issue 31: kernels and round-off follow the CPU
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals[-1]["knn_teacher"] == final["knn_teacher"] and evals[-1]["light"] is False


def test_resume_of_a_finished_run_changes_nothing(tiny_fashion_mnist_dir, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    flags = tiny_flags(tiny_fashion_mnist_dir, run)
    assert main(flags) == 0
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="emanorm"):
        assert main([*flags, "--resume"]) == 0
    assert "already finished" in caplog.text and "run directory" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    # L-4: a finished run without its checkpoint is refused, its results are kept
    (run / "checkpoints" / "last.pt").unlink()
    assert main([*flags, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "last.pt is missing" in err and "--force" in err and len(err.splitlines()) == 1
    assert (run / "summary.json").read_bytes() == before[run / "summary.json"]
    assert (run / "metrics.jsonl").read_bytes() == before[run / "metrics.jsonl"]


def test_fresh_run_with_resume_says_nothing_about_resuming(tiny_fashion_mnist_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="emanorm"):
        train(tiny(tiny_fashion_mnist_dir, tmp_path / "run"), resume=True, progress=False)
    assert not [r for r in caplog.records if "--resume" in r.getMessage() and r.levelno >= logging.INFO]


def test_a_failed_run_leaves_no_empty_run_directory(tiny_fashion_mnist_dir, tmp_path, monkeypatch):
    import emanorm.train.loop as loop

    def broken_step(*args, **kwargs):
        raise UserError("the first step failed")

    monkeypatch.setattr(loop, "train_step", broken_step)  # fails before the first checkpoint
    out = tmp_path / "runs" / "run"
    with pytest.raises(UserError, match="the first step failed"):
        train(tiny(tiny_fashion_mnist_dir, out), progress=False)
    assert not out.exists()
    monkeypatch.undo()

    def broken_monitor(method, run):
        raise UserError("the monitor failed")

    # a failure after a checkpoint (here: the final evaluation) keeps the run: it can be resumed
    with pytest.raises(UserError, match="the monitor failed"):
        train(tiny(tiny_fashion_mnist_dir, out), monitor=broken_monitor, progress=False)
    assert (out / "checkpoints" / "last.pt").exists()


def test_evaluations_along_training_change_no_weight_and_report_progress(
    tiny_fashion_mnist_dir, tmp_path, caplog
):
    """eval_every=1 with light evaluations over 2 epochs: bitwise the same networks as eval_every=0,
    a line per tenth of the steps without a bar, and the evaluation records marked light."""
    common = {"max_steps": 10, "eval_light_size": 16}
    with caplog.at_level(logging.INFO, logger="emanorm"):
        _, with_evals = train(tiny(tiny_fashion_mnist_dir, tmp_path / "a", eval_every=1, **common),
                              monitor=knn_monitor, progress=False, return_method=True)
    messages = [r.getMessage() for r in caplog.records]
    _, without = train(tiny(tiny_fashion_mnist_dir, tmp_path / "b", eval_every=0, **common),
                       monitor=knn_monitor, progress=False, return_method=True)
    a, b = with_evals.state_dict(), without.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(m.startswith("step ") and "loss" in m for m in messages) == 10
    assert any("final evaluation ..." in m for m in messages)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["light"] for r in evals] == [True, False] and evals[0]["knn_bank"] == 16
    assert evals[-1]["knn_bank"] == 64  # the final one: knn_bank_size of the 120 labeled training images


def test_compare_knn_table_says_its_protocol():
    from emanorm.experiments.report import knn_protocol

    new = {"status": "ok", "final": {"knn_teacher": 80.0, "knn_k": 20, "knn_bank": 10000}}
    old = {"status": "ok", "final": {"knn_teacher": 80.0}}  # a record from before knn_k/knn_bank
    assert knn_protocol([new, old]) == "k=20, a bank of 10,000 labeled training images"
    assert "knn_bank_size" in knn_protocol([old])


def test_dev_extra_installs_what_the_optional_tests_need():
    """`pip install -e ".[dev]"` (CI) must not leave the timm, lightly or psutil tests skipped."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    dev = {req.split(">")[0].split("=")[0].strip() for req in project["optional-dependencies"]["dev"]}
    assert {"timm", "lightly", "psutil", "pytest"} <= dev


def test_verbose_logs_the_set_up(tiny_fashion_mnist_dir, tmp_path, caplog):
    parser = build_parser()
    assert parser.parse_args(["-v", "train"]).verbose and parser.parse_args(["train", "-v"]).verbose
    assert not parser.parse_args(["train"]).verbose
    with caplog.at_level(logging.DEBUG, logger="emanorm"):
        build_run(tiny(tiny_fashion_mnist_dir, tmp_path / "run"))
    text = caplog.text
    assert "data: fashion_mnist" in text and "120 training and 40 test images" in text
    assert "trainable parameters" in text and "norm plan: NormPlan(norm='eman'" in text
    assert "CPU thread(s)" in text and torch.__version__ in text


@pytest.mark.slow  # fresh interpreters importing torch: ~6 CPU-seconds
def test_the_command_makes_openmp_threads_wait_passively_and_the_library_leaves_it_alone():
    import os

    def policy(code: str, **extra: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        shown = subprocess.run([sys.executable, "-c", code + "; print(os.environ.get('OMP_WAIT_POLICY'))"],
                               env={**env, **extra}, capture_output=True, text=True, timeout=HANG_BOUND_S)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.strip().splitlines()[-1]

    command = "import os; from emanorm.cli import main; main(['presets', 'small-moco']); import torch"
    assert policy(command) == "PASSIVE"
    assert policy(command, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice is kept
    assert policy("import os, emanorm, emanorm.train, torch") == "None"  # a library import decides nothing
