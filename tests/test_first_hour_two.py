"""The first hour, round two (issue 31): the machine in summary.json, an ETA with the evaluations,
Ctrl-C that says what it kept, reports and flags for methods without labels.

Nothing here depends on the machine's speed: clocks are simulated, and a process is signalled
only once a file shows it has reached the point the test needs (polled with a generous bound).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emanorm.train.environment import cpu_capability, cpu_model, machine_environment
from emanorm.train.progress import (
    PlannedEvaluation,
    TrainingProgress,
    evaluation_images,
    planned_evaluations,
    report_evaluation,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def wait_for(condition, what: str, bound_s: float = 600.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; the bound only catches a hung test, not a slow machine."""
    deadline = time.monotonic() + bound_s
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {bound_s:.0f} s")
        time.sleep(0.1)


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
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = out / "checkpoints" / "last.pt"
        wait_for(checkpoint.exists, "the first checkpoint", process=process)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    last = err.rstrip("\n").split("\n")[-1]  # the progress bar redraws with \r: a shared line would show here
    assert last.startswith("emanorm: interrupted; the last checkpoint is kept at "), repr(last)
    assert str(checkpoint) in last and "--resume" in last and "Traceback" not in err
    assert checkpoint.exists()
