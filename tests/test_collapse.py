"""The collapse alarm (issue 27): the signals the methods log, the watch, the trainer and doctor."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from emanorm import collapse
from emanorm.cli import main
from emanorm.collapse import CollapseWatch, collapse_rules, scan_records
from emanorm.methods.tensors import output_spread
from emanorm.train import train
from test_calibration import tiny_cfg
from test_methods import make

LN_4096 = math.log(4096)


def dino_records(losses: list[float], every: int = 20, **extra) -> list[dict]:
    return [{"kind": "train", "step": every * (i + 1), "loss": v, **extra} for i, v in enumerate(losses)]


def test_dino_loss_at_ln_k_over_the_window_sounds_once_at_the_right_step():
    watch = CollapseWatch("dino", {"out_dim": 4096})
    records = dino_records([8.2, 8.25, LN_4096, LN_4096 - 0.001, 8.3170, 8.318, 8.318, 8.318, 8.318])
    alarms = [watch.observe(r) for r in records]
    fired = [a for a in alarms if a is not None]
    assert len(fired) == 1
    alarm = fired[0]
    assert (alarm.since_step, alarm.step) == (60, 160)  # 100 steps of logs at ln K, the first at 60
    assert alarm.metric == "loss"
    assert "within 0.1% of ln K = 8.3178 (K = 4096)" in alarm.message
    assert watch.alarm is alarm


def test_a_loss_above_ln_k_while_the_lr_warms_up_is_not_a_uniform_student():
    # the start of small-dino runs that went on to learn (BN and calibrated EMAN teachers, seed 0): the
    # loss begins above ln K and comes down through it; the one-sided rule sounded at step 120 there
    losses = [8.47, 8.429, 8.39, 8.353, 8.345, 8.339, 8.331, 8.324, 8.29, 8.259, 8.22, 8.183, 8.14, 8.103]
    alarm, seen = scan_records(dino_records(losses), "dino", {"out_dim": 4096})
    assert alarm is None and seen == len(losses)
    # the same logs held just above the band for the window are not a uniform student either
    assert scan_records(dino_records([LN_4096 * 1.0015] * 12), "dino", {"out_dim": 4096})[0] is None


def test_a_healthy_log_resets_the_window_and_values_missing_or_not_finite_do_not():
    watch = CollapseWatch("dino", {"out_dim": 4096})
    for r in dino_records([LN_4096, LN_4096, LN_4096, 8.0, LN_4096, LN_4096, LN_4096, LN_4096, LN_4096]):
        alarm = watch.observe(r)
    assert alarm is None  # the 8.0 at step 80 broke the window: 100..180 is only 80 steps
    assert watch.observe({"kind": "train", "step": 190, "loss": float("nan")}) is None
    alarm = watch.observe({"kind": "train", "step": 200, "loss": LN_4096})
    assert alarm is not None and (alarm.since_step, alarm.step) == (100, 200)  # the NaN kept the window


def test_uniform_teacher_targets_sound_the_alarm_and_name_the_calibration():
    records = dino_records([8.0] * 8, target_entropy=0.995)
    alarm, seen = scan_records(records, "dino", {"out_dim": 4096})
    assert seen == 8
    assert alarm is not None and alarm.metric == "target_entropy"
    assert "--calibrate-bn" in alarm.message
    healthy, _ = scan_records(dino_records([8.0] * 8, target_entropy=0.97), "dino", {"out_dim": 4096})
    assert healthy is None


def test_moco_and_byol_watch_the_spread_of_the_outputs_and_others_nothing():
    assert [r.metric for r in collapse_rules("moco")] == ["output_std"]
    assert [r.metric for r in collapse_rules("byol")] == ["output_std"]
    assert collapse_rules("fixmatch") == []
    collapsed = [{"kind": "train", "step": 50 * i, "output_std": 0.01} for i in range(1, 5)]
    assert scan_records(collapsed, "byol")[0].since_step == 50
    assert scan_records(collapsed, "fixmatch") == (None, 4)


def test_output_spread_is_about_one_when_spread_and_zero_when_collapsed():
    torch.manual_seed(0)
    assert output_spread(torch.randn(512, 64)).item() == pytest.approx(1.0, abs=0.05)
    assert output_spread(torch.randn(1, 64).expand(512, 64)).item() == pytest.approx(0.0, abs=1e-6)


def test_the_methods_log_the_signals_the_watch_reads():
    g = torch.Generator().manual_seed(0)
    for name, key in (("moco", "output_std"), ("byol", "output_std"), ("dino", "target_entropy")):
        method = make(name, "eman")
        batch = {k: torch.randn(4, 1, 8, 8, generator=g) for k in method.unlabeled_views}
        batch["epoch"] = torch.tensor(0)
        _, logs = method.training_step(batch, 0)
        assert key in logs, name
        assert 0.0 < float(logs[key]) <= (1.0 + 1e-6 if key == "target_entropy" else 10.0), (name, logs)
    # a uniform teacher output gives entropy 1 (as a fraction of ln K); one-hot targets give 0
    dino = make("dino", "eman")
    k = dino.options["out_dim"]
    uniform = torch.full((4, k), 1.0 / k)
    assert (torch.special.entr(uniform).sum(-1).mean() / math.log(k)).item() == pytest.approx(1.0)


def test_the_trainer_says_it_in_one_line_keeps_it_in_metrics_and_summary(
    tiny_fashion_mnist_dir, tmp_path, monkeypatch, capsys
):
    # every logged spread counts as collapsed and the window is one log interval: the alarm must
    # sound at the second log, once
    monkeypatch.setattr(collapse, "OUTPUT_STD_LIMIT", 1e9)
    monkeypatch.setattr("emanorm.train.hooks.CollapseWatch", functools.partial(CollapseWatch, window_steps=1))
    out = tmp_path / "run"
    summary = train(tiny_cfg(tiny_fashion_mnist_dir, out, max_steps=4, log_every=1), progress=False)
    assert summary["collapse"]["metric"] == "output_std"
    assert (summary["collapse"]["since_step"], summary["collapse"]["step"]) == (1, 2)
    printed = [line for line in capsys.readouterr().out.splitlines() if "collapse alarm" in line]
    assert len(printed) == 1 and printed[0].startswith("warning: collapse alarm at step 2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "alarm"] == [2]
    assert json.loads((out / "summary.json").read_text())["collapse"]["step"] == 2


def test_a_healthy_run_has_no_alarm_and_doctor_reads_its_metrics(tiny_fashion_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(tiny_cfg(tiny_fashion_mnist_dir, out, max_steps=3, log_every=1), progress=False)
    assert summary["collapse"] is None
    capsys.readouterr()
    status = main(["doctor", str(out)])
    text = capsys.readouterr().out
    assert "collapse: no alarm in 3 training records (metrics.jsonl)" in text
    assert status == 0, text
    # the same run with a collapsed history (as a long run would have logged it): exit 1, one line
    with (out / "metrics.jsonl").open("a") as f:
        for step in range(20, 200, 20):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0, "output_std": 0.003}) + "\n")
    assert main(["doctor", str(out)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "collapse" in line]
    assert lines == [lines[0]] and lines[0].startswith("collapse alarm at step 120")
