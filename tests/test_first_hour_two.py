"""The first hour, round two (issue 31): the machine in summary.json, an ETA with the evaluations,
Ctrl-C that says what it kept, reports and flags for methods without labels.

Nothing here depends on the machine's speed: clocks are simulated, and a process is signalled
only once a file shows it has reached the point the test needs (polled with a generous bound).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import signal_when_ready
from emanorm.train.environment import cpu_capability, cpu_model, machine_environment
from emanorm.train.progress import (
    PlannedEvaluation,
    TrainingProgress,
    evaluation_images,
    planned_evaluations,
    report_evaluation,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


# -- item 2: the machine a figure was measured on ---------------------------------------------------


def test_cpu_capability_is_torchs_and_the_model_comes_from_cpuinfo(tmp_path):
    assert cpu_capability() == torch.backends.cpu.get_cpu_capability()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9654 96-Core"
    assert cpu_model(tmp_path / "missing")  # falls back to platform: some name, never an error
    assert set(machine_environment()) == {"cpu_capability", "cpu_model"}


# -- item 5: the ETA includes the planned evaluations ---------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_planned_evaluations_follow_the_loops_schedule():
    # the main job: 1,500 steps, 312 per epoch (60,000 unlabeled / 192), an evaluation every epoch
    plan = planned_evaluations(1500, 312, 1, light_images=4000, final_images=20000)
    assert [e.step for e in plan] == [312, 624, 936, 1248, 1500]  # the README's 4 light ones, then the final
    assert [e.final for e in plan] == [False] * 4 + [True] and plan[-1].images == 20000
    assert planned_evaluations(100, 10, 0, 5, 50) == [PlannedEvaluation(100, True, 50)]
    assert [e.step for e in planned_evaluations(100, 10, 3, 5, 50)] == [30, 60, 90, 100]
    cfg = {"knn_bank_size": 10000, "monitor_test_size": None}
    assert evaluation_images(cfg, labeled_train_images=60000, test_images=10000) == 20000
    assert evaluation_images({**cfg, "monitor_test_size": 40}, 100, 10000) == 140


def test_eta_counts_the_evaluations_still_planned_and_the_rate_leaves_them_out():
    clock = FakeClock()
    plan = planned_evaluations(30, 10, 1, light_images=100, final_images=400)  # after 10, 20 and 30
    progress = TrainingProgress(30, 0, "run", enabled=False, evaluations=plan, clock=clock)
    assert progress.eta_text() == "?"  # nothing timed yet
    for step in range(1, 11):
        clock.now += 1.0  # a step a second
        progress.advance(step)
    assert progress.steps_per_second() == pytest.approx(1.0)
    assert progress.eta_seconds() is None and progress.eta_text() == "00:20+eval"  # no evaluation measured
    with progress.evaluating("evaluation", final=False, images=100):
        report_evaluation("teacher", 50, 100)
        clock.now += 5.0  # 0.05 s per image
    assert progress.steps_per_second() == pytest.approx(1.0)  # the evaluation is not in the rate
    # 20 steps at 1/s, one more light evaluation (5 s) and the final one (400 images at 0.05 s: 20 s)
    assert progress.eta_seconds() == pytest.approx(20 + 5 + 20)
    for step in range(11, 21):
        clock.now += 1.0
        progress.advance(step)
    with progress.evaluating("evaluation", final=False, images=100):
        clock.now += 5.0
    assert progress.eta_seconds() == pytest.approx(10 + 20)
    for step in range(21, 31):
        clock.now += 1.0
        progress.advance(step)
    assert progress.eta_seconds() == pytest.approx(20)  # only the final evaluation is left
    with progress.evaluating("final evaluation", final=True, images=400):
        clock.now += 30.0
    assert progress.eta_seconds() == pytest.approx(0) and progress.steps_per_second() == pytest.approx(1.0)
    progress.close()


def test_an_evaluation_shows_its_own_progress_on_the_bar(capsys):
    progress = TrainingProgress(10, 0, "fixmatch-eman", enabled=True, clock=FakeClock())
    with progress.evaluating("final evaluation", final=True, images=10):
        report_evaluation("student", 3, 4)
        shown = progress.bar.desc
    progress.close()
    assert shown == "fixmatch-eman [final evaluation 75%: student]"
    assert progress.bar.desc == "fixmatch-eman"
    report_evaluation("teacher", 1, 2)  # nobody listens: ignored


# -- item 4: Ctrl-C ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_says_on_its_own_line_which_checkpoint_is_kept_and_how_to_continue(
    tiny_fashion_mnist_dir, tmp_path
):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "emanorm", "train", "--data-dir", str(tiny_fashion_mnist_dir),
        "--max-steps", "100000", "--batch-size", "16", "--unlabeled-ratio", "1", "--labels-per-class", "2",
        "--device", "cpu",
        "--set", "checkpoint_every_steps=1", "--set", "knn_bank_size=64", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    checkpoint = out / "checkpoints" / "last.pt"
    status, err = signal_when_ready(command, env, checkpoint, "the first checkpoint", signal.SIGINT)  # Ctrl-C
    assert status == 130, err
    last = err.rstrip("\n").split("\n")[-1]  # the progress bar redraws with \r: a shared line would show here
    assert last.startswith("emanorm: interrupted; the last checkpoint is kept at "), repr(last)
    assert str(checkpoint) in last and "--resume" in last and "Traceback" not in err
    assert checkpoint.exists()


# -- item 3: the README's examples, in order, after the main job -------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
#: What every training command gets appended so that the sequence runs in minutes on the 120-image
#: stand-in: 1 step of batch 16 (``--set`` wins over the example's own --epochs / --batch-size),
#: a 64-image kNN bank and 40 test images, no evaluation along training, on the CPU, no bar.
SHORT_TRAIN = [
    "--set", "epochs=null", "--set", "max_steps=1", "--set", "batch_size=16", "--set", "knn_bank_size=64",
    "--set", "monitor_test_size=40", "--set", "eval_every=0", "--device", "cpu", "--no-progress",
]  # fmt: skip


def readme_commands() -> list[str]:
    """The lines of the README's "The command line" block, comments removed, in order."""
    section = README.read_text().split("## The command line", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def shortened(command: str, data: dict[str, Path]) -> tuple[list[str] | None, str]:
    """(argv for ``emanorm.cli.main``, what was changed) for one README line; argv None: not run."""
    import shlex

    argv = shlex.split(command)
    if argv[0] != "emanorm":
        return None, "needs torchrun on 8 processes and ImageNet"
    argv = argv[1:]
    if argv[-1] == "...":
        return None, "a pattern (any train command with -v), not a command"
    if "--data-dir" in argv and argv[argv.index("--data-dir") + 1].startswith("/data/"):
        return [*argv, "--print-config"], "needs ImageNet: only its config is resolved (--print-config)"
    if "train" in argv and "--print-config" not in argv:
        dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "fashion_mnist"
        # a preset's 20 calibration batches become the stand-in epoch's 7, with a warning
        return [*argv, "--data-dir", str(data[dataset]), *SHORT_TRAIN], "1 step on the stand-in"
    if argv[0] == "compare":
        flags = ["--seeds", "1", "--max-steps", "1", "--data-dir", str(data["fashion_mnist"]),
                 "--device", "cpu",
                 "--no-progress", "--set", "batch_size=16", *SHORT_TRAIN[6:10]]  # fmt: skip
        return [*argv, *flags], "1 seed of 1 step on the stand-in"
    if argv[0] == "eval":
        return [*argv, "--device", "cpu", "--no-progress"], "on the CPU"
    return argv, "as written"


@pytest.mark.slow
def test_the_readme_examples_run_in_order_after_the_main_job(
    tiny_fashion_mnist_dir, cifar10_dir, tmp_path, monkeypatch, capsys
):
    """Each line of the README's command-line block, in order, after `emanorm train` (the main job),
    in one directory: none collides with an earlier run's directory. Shortened as ``shortened``
    says (1 training step on stand-in data); the ImageNet lines only resolve their config."""
    from emanorm.cli import main

    monkeypatch.chdir(tmp_path)
    data = {"fashion_mnist": tiny_fashion_mnist_dir, "cifar10": cifar10_dir}
    main_job = ["train", "--data-dir", str(tiny_fashion_mnist_dir), *SHORT_TRAIN]
    assert main(main_job) == 0
    capsys.readouterr()
    # run again, the finished main job is refused in one line that offers what helps (not --resume)
    assert main(main_job) == 2
    refusal = capsys.readouterr().err.strip()
    assert "already holds a finished run" in refusal and "--out" in refusal and "--force" in refusal
    assert "--resume" not in refusal and len(refusal.splitlines()) == 1
    ran = []
    for command in readme_commands():
        argv, how = shortened(command, data)
        if argv is None:
            continue
        if "mlflow" in argv and not _importable("mlflow"):
            argv = [a.replace("jsonl,mlflow", "jsonl") for a in argv]  # the optional tracker is not installed
            how += ", without mlflow (not installed)"
        try:
            code = main(argv)
        except SystemExit as stop:  # --version
            code = stop.code
        output = capsys.readouterr()
        assert code == 0, f"{command} ({how}) exited {code}: {output.err[-2000:]}"
        ran.append((command, output.out))
    assert len(ran) >= 12
    outputs = dict(ran)
    moco = next(out for cmd, out in ran if cmd.startswith("emanorm train --method moco --norm eman"))
    assert "unlabeled images" in moco and " labeled" not in moco.replace("unlabeled", "")  # issue 31 item 6
    assert Path("runs/fixmatch-eman-fashion_mnist-s0-from-moco-eman-fashion_mnist-s0/summary.json").exists()
    assert outputs["emanorm --version"].startswith("emanorm ")
    assert (tmp_path / "cmp" / "results.md").exists() and "Traceback" not in "".join(outputs.values())


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- item 6: methods that use no labels ------------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    ["--method", "moco", "--labels-per-class", "10"],
    ["--method", "byol", "--label-fraction", "0.1"],
    ["--method", "dino", "--label-index-csv", "split.csv"],
    ["--method", "moco", "--set", "labels_per_class=5"],
    ["--method", "mocov3", "--labels-per-class", "10"],
])  # fmt: skip
def test_label_flags_for_a_method_without_labels_are_refused_in_one_line(flags, capsys):
    from emanorm.cli import main

    assert main(["train", *flags, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trains without labels" in err and "fixmatch" in err and len(err.splitlines()) == 1
    assert main(["train", "--method", "fixmatch", "--labels-per-class", "4", "--print-config"]) == 0


@pytest.mark.parametrize(("flags", "source"), [
    (["--methods", "moco", "--set", "labels_per_class=5"], "--set gives moco labels_per_class=5"),
    (["--methods", "fixmatch,byol", "--set", "label_fraction=0.1"], "--set gives byol label_fraction=0.1"),
    (["--methods", "dino", "--variant", "few:labels_per_class=4"],
     "--variant 'few' gives dino labels_per_class=4"),
])  # fmt: skip
def test_compare_refuses_label_keys_for_a_self_supervised_column_before_training(
    flags, source, tmp_path, capsys
):
    from emanorm.cli import main

    out = tmp_path / "grid"
    assert main(["compare", *flags, "--norms", "eman", "--seeds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and source in err and "trains without labels" in err, err
    if "fixmatch" in flags[1]:  # the way out names the grid's column that uses labels
        assert "give it to fixmatch only with a row limited to it (--variant " in err
        assert "'LABEL:label_fraction=0.1,columns=[fixmatch]')" in err
    else:
        assert "methods that use labels: fixmatch, meanteacher, supervised" in err
    assert not out.exists()  # nothing trained, nothing written


def test_compare_gives_label_keys_to_the_columns_that_use_them(tmp_path, capsys):
    """What the refusal suggests works; the supervised row and a semi-supervised grid keep their labels."""
    from emanorm.cli import main

    out = tmp_path / "grid"
    grid = ["compare", "--norms", "eman", "--seeds", "1", "--max-steps", "1", "--out", str(out), "--dry-run"]
    few = "few:labels_per_class=4,columns=[fixmatch]"
    assert main([*grid, "--methods", "fixmatch,moco", "--variant", few, "--supervised"]) == 0
    assert main([*grid, "--methods", "fixmatch,meanteacher", "--set", "labels_per_class=4"]) == 0
    assert "fixmatch-few-s0" in capsys.readouterr().out


def test_a_self_supervised_row_in_a_semi_supervised_column_drops_its_labels(tmp_path, capsys):
    """`method=moco` in a FixMatch column: the column recipe's 10 labels per class are not the row's
    (its written config is what a --jobs > 1 compare trains with `emanorm train --config`, which
    refuses label keys for moco); a `method=supervised` row keeps them."""
    from emanorm.cli import main
    from emanorm.experiments import build_variants, parse_variant, plan_grid
    from emanorm.experiments.runner import write_run_config

    custom = [parse_variant("ssl:method=moco,norm=eman"), parse_variant("sup:method=supervised,norm=bn")]
    variants = build_variants(["eman"], custom=custom)
    specs = {s.name: s for s in plan_grid(["fixmatch"], variants, [0], tmp_path / "grid")}
    assert specs["fixmatch-eman-s0"].config["labels_per_class"] == 10  # the small-fixmatch preset's
    assert specs["fixmatch-sup-s0"].config["labels_per_class"] == 10
    ssl = specs["fixmatch-ssl-s0"].config
    assert ssl["method"] == "moco" and all(ssl[k] is None for k in ("labels_per_class", "label_fraction"))
    written = write_run_config(specs["fixmatch-ssl-s0"], tmp_path / "configs")
    capsys.readouterr()
    assert main(["train", "--config", str(written), "--print-config"]) == 0, capsys.readouterr().err


def test_ctrl_c_in_compare_says_on_its_own_line_to_rerun_the_same_command(tmp_path, monkeypatch, capsys):
    """As for SIGTERM (tests/test_compare.py): the same compare command resumes the grid; exit 130."""
    from emanorm.cli import main
    from emanorm.experiments import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", interrupted)
    out = tmp_path / "grid"
    code = main(["compare", "--methods", "fixmatch", "--norms", "eman", "--seeds", "1", "--max-steps", "1",
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 130
    last = err.rstrip("\n").split("\n")[-1]  # after the progress bar's last line break: a line of its own
    assert last == (
        "emanorm: compare interrupted; unfinished runs keep their last checkpoints: rerun the same compare "
        "command to resume (a run continues from its last checkpoint, finished runs are not trained again)"
    ), err


def test_a_self_supervised_report_counts_unlabeled_images():
    from emanorm.cli.train import format_report

    summary = {"method": "moco", "norm": "eman", "dataset": "fashion_mnist", "steps": 3, "labeled": 60000,
               "unlabeled": 60000, "wall_clock_s": 1.0, "run_dir": "r", "final": {}, "environment": {}}
    assert "3 steps, 60,000 unlabeled images," in format_report(summary)
    assert "3 steps, 60,000 unlabeled images," in format_report({**summary, "method": "mocov3"})
    old = {k: v for k, v in summary.items() if k != "unlabeled"}  # a summary written before issue 31
    assert "60,000 unlabeled images" in format_report(old)
    fixmatch = {**summary, "method": "fixmatch", "labeled": 100}
    assert "100 labeled and 60,000 unlabeled images" in format_report(fixmatch)
    supervised = {**summary, "method": "supervised", "labeled": 100, "unlabeled": 0}
    assert "100 labeled images" in format_report(supervised)


def test_compare_does_not_pass_on_trains_resume_hint(tmp_path, monkeypatch):
    """Ctrl-C in a grid run: compare's own 'interrupted' (rerunning compare resumes), not train's."""
    from emanorm.errors import Interrupted
    from emanorm.experiments import runner

    def interrupted(*args, **kwargs):
        raise Interrupted("interrupted; continue with --resume")

    monkeypatch.setattr(runner, "train", interrupted)
    spec = runner.RunSpec("eman", "fixmatch", 0, "a", tmp_path / "a", {"max_steps": 1})
    with pytest.raises(KeyboardInterrupt) as caught:
        runner._run_in_process(spec, tmp_path / "a.log")
    assert not isinstance(caught.value, Interrupted)


def test_progress_lines_without_a_bar_print_the_last_logged_loss(caplog):
    """Without a bar, a line per tenth of the steps; its loss is the last train record's (a step's
    own loss is a device tensor, and reading it would wait for the device's queue)."""
    import logging

    from emanorm.train.logger import Progress

    progress = Progress("run", 20, 0, bar=False, is_main=True)
    with caplog.at_level(logging.INFO, logger="emanorm"):
        progress.advance(1)  # not a tenth: no line
        progress.advance(2)  # nothing logged yet: no loss
        progress.show_record({"step": 2, "loss": 1.25, "img_per_s": 3.0})
        progress.advance(3)
        progress.advance(4)
        progress.show_record({"step": 6, "loss": 0.5, "img_per_s": 3.0})
        progress.advance(6)
    assert caplog.messages == ["step 2/20", "step 4/20, loss 1.2500 (logged at step 2)",
                               "step 6/20, loss 0.5000"]
    progress.close()


def readme_python_blocks() -> list[str]:
    """The README's Python snippets, in order."""
    return [block.split("```", 1)[0] for block in README.read_text().split("```python\n")[1:]]


def test_the_readme_python_snippets_run_in_order(tiny_fashion_mnist_dir, capsys):
    """Each snippet as a reader would run it after the previous ones (one namespace), with the
    loaders it leaves to the reader given as two tiny batches and a 2-step budget on stand-in data."""
    blocks = readme_python_blocks()
    assert len(blocks) == 3, "a README snippet was added or removed: run it here too"
    torch.manual_seed(0)
    images = [torch.rand(4, 3, 32, 32) for _ in range(4)]
    namespace: dict = {"unlabeled_loader": [(images[0], images[1]), (images[2], images[3])],
                       "two_view_loader": [(images[0], images[1]), (images[2], images[3])], "total_steps": 2}
    budget = '"max_steps": 50}'
    assert budget in blocks[1]
    blocks[1] = blocks[1].replace(budget, f'"max_steps": 2, "batch_size": 16, "data_dir": '
                                          f'{str(tiny_fashion_mnist_dir)!r}, "calibrate_bn_batches": 0}}')
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    teacher, student = namespace["teacher"].module, namespace["student"]  # snippet 1: the teacher moved
    # (no pseudo-label reaches 0.95 on an untrained net: the loss is 0 and only BN statistics move)
    moved = student.bn1.running_mean
    assert moved.abs().sum() > 0 and teacher.bn1.running_mean.abs().sum() > 0  # EMAN's EMA (Eq. 9)
    assert not torch.equal(teacher.bn1.running_mean, moved)  # ... which lags the student's
    assert capsys.readouterr().out.startswith("0 ")  # snippet 2 printed its step-0 loss
    assert isinstance(namespace["teacher_backbone"], torch.nn.Module)
    assert torch.isfinite(namespace["loss"]) and namespace["step"] == 1  # snippet 3's two steps
