"""The trainer on real Fashion-MNIST: every (method, norm) pair, run directories, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from emanorm.errors import UserError
from emanorm.evaluation import knn_monitor
from emanorm.methods import METHODS
from emanorm.train import load_backbone, resolve_config, train
from emanorm.train.checkpoint import safe_load

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")

# Tiny but real: a few steps on the real data, small heads and monitor sets.
METHOD_ARGS = {
    "moco": {"queue_size": 64, "dim": 16},
    "byol": {"hidden_dim": 32, "proj_dim": 16},
    "dino": {"out_dim": 32, "hidden_dim": 16, "local_crops": 2},
    "fixmatch": {},
    "meanteacher": {},
    "supervised": {},
    "mocov3": {"dim": 16, "hidden_dim": 32},
}


def tiny_config(method: str, norm: str, out: Path, **extra) -> dict:
    overrides = {
        "method": method,
        "norm": norm,
        "max_steps": 2,
        "batch_size": 16,
        "unlabeled_ratio": 1,
        "knn_bank_size": 64,
        "monitor_test_size": 64,
        "log_every": 1,
        "device": "cpu",
        "out": str(out),
        "method_args": METHOD_ARGS[method],
    }
    if method in ("fixmatch", "meanteacher", "supervised"):
        overrides["labels_per_class"] = 4
    overrides.update(extra)
    return resolve_config(None, overrides)


VALID = [(m, n) for m, cls in METHODS.items() for n in cls.NORMS]
INVALID = [(m, n) for m, cls in METHODS.items() for n in ("shuffle_bn", "eman") if n not in cls.NORMS]


@pytest.mark.parametrize(("method", "norm"), VALID)
def test_every_valid_pair_trains_and_writes_a_run_directory(method, norm, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(method, norm, run), monitor=knn_monitor, progress=False)
    assert summary["steps"] == 2 and summary["method"] == method and summary["norm"] == norm
    saved = json.loads((run / "summary.json").read_text())
    assert {"method", "norm", "dataset", "steps", "final"} <= saved.keys()
    assert 0.0 <= saved["final"]["knn_teacher"] <= 100.0
    if method in ("fixmatch", "meanteacher", "supervised"):
        assert "test_acc_teacher" in saved["final"]
        assert (run / "labeled_split.csv").read_text().startswith("Index")
        assert len((run / "labeled_split.csv").read_text().split()) == 1 + 40
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == method and config["norm"] == norm and config["max_steps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_records)
    assert any(r["kind"] == "eval" for r in records)
    assert any((run / "tb").iterdir())
    state = safe_load(run / "checkpoints" / "last.pt")
    assert state["global_step"] == 2
    backbone, cfg = load_backbone(run, "teacher")
    assert cfg["method"] == method
    assert backbone(torch.zeros(2, 1, 28, 28)).shape[0] == 2


@pytest.mark.parametrize(("method", "norm"), INVALID)
def test_invalid_pairs_fail_clearly(method, norm, tmp_path):
    with pytest.raises(UserError, match=f"norm '{norm}' is not valid for method '{method}'"):
        train(tiny_config(method, norm, tmp_path / "run"), monitor=knn_monitor, progress=False)


def test_eman_teacher_statistics_follow_the_student(tmp_path):
    """After training, the EMAN teacher's BN statistics are an EMA of the student's, not defaults."""
    cfg = tiny_config("fixmatch", "eman", tmp_path / "run", max_steps=3, ema_momentum=0.5)
    _, method = train(cfg, monitor=knn_monitor, progress=False, return_method=True)
    teacher_stats = {k: v for k, v in method.teacher.module.state_dict().items() if "running_mean" in k}
    assert teacher_stats and all(v.abs().sum() > 0 for v in teacher_stats.values())


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "emanorm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_clean_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert pattern in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "simclr"], "unknown method 'simclr'"),
        (["--norm", "batchnorm"], "unknown norm 'batchnorm'"),
        (["--dataset", "mnist3d"], "mnist3d"),
        (["--config", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--epochs", "-3"], "epochs must be positive"),
        (["--batch-size", "0"], "batch_size must be positive"),
        (["--ema-momentum", "1.5"], "ema_momentum must lie in [0, 1]"),
        (["--labels-per-class", "7000"], "7000"),
        (["--method", "supervised", "--norm", "shuffle_bn"], "not valid for method 'supervised'"),
        (["--method-arg", "thresh=0.9"], "unknown option(s) thresh"),
        (["--set", "learning_rate=0.1"], "unknown option(s) in command line: learning_rate"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, message, tmp_path):
    budget = [] if "--epochs" in args else ["--max-steps", "1"]
    result = run_cli("train", *budget, "--out", str(tmp_path / "run"), "--no-progress", *args)
    assert_clean_error(result, message)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_bad_config_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: [fixmatch\n")
    assert_clean_error(run_cli("train", "--config", str(bad_yaml)), "invalid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: fixmatch\nlearning_rate: 0.1\nmax_steps: 1\n")
    assert_clean_error(run_cli("train", "--config", str(unknown)), "unknown option(s)")
    assert_clean_error(run_cli("train", "--config", str(tmp_path / "missing.yaml")), "config file not found")


def test_cli_refuses_to_overwrite_and_checks_resume_config(tmp_path):
    run = tmp_path / "run"
    common = [
        "--max-steps",
        "1",
        "--batch-size",
        "16",
        "--unlabeled-ratio",
        "1",
        "--labels-per-class",
        "4",
        "--set",
        "knn_bank_size=32",
        "--set",
        "monitor_test_size=32",
        "--out",
        str(run),
        "--no-progress",
    ]
    first = run_cli("train", *common)
    assert first.returncode == 0, first.stderr
    assert "teacher" in first.stdout and str(run) in first.stdout
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    assert_clean_error(run_cli("train", *common), "already holds a finished run")
    assert_clean_error(
        run_cli("train", *common, "--resume", "--lr", "0.5"), "--resume with a different config"
    )
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint  # nothing damaged
    resumed = run_cli("train", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr


def test_budget_flags_replace_the_presets(tmp_path):
    cfg = resolve_config(None, {"epochs": 3})
    assert cfg["epochs"] == 3 and cfg["max_steps"] is None
    cfg = resolve_config("small-moco", {"max_steps": 7})
    assert cfg["max_steps"] == 7 and cfg["epochs"] is None and cfg["method"] == "moco"
    with pytest.raises(UserError, match="choose one way to pick labels"):
        resolve_config(None, {"label_fraction": 0.1, "label_index_csv": "x.csv"})


def test_presets_all_resolve():
    from emanorm.train.config import preset_names

    names = preset_names()
    assert {
        "small-fixmatch",
        "small-moco",
        "small-byol",
        "imagenet-moco",
        "imagenet-byol",
        "imagenet-fixmatch",
    } <= set(names)
    for name in names:
        cfg = resolve_config(name)
        assert cfg["preset"] == name


def test_train_step_stops_on_a_non_finite_loss_before_touching_anything():
    from emanorm.train import NonFiniteLossError, train_step

    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    model.after_step = lambda step, total: calls.append(step)  # the teacher update must not run
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def nan_step(batch, step):
        return model(batch["x"]).sum() * float("nan"), {}

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7"):
        train_step(nan_step, model, {"x": torch.ones(1, 2)}, 7, 10, optimizer, scheduler)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    def good_step(batch, step):
        return model(batch["x"]).sum(), {"seen": 1.0}

    _, logs = train_step(good_step, model, {"x": torch.ones(1, 2)}, 8, 10, optimizer, scheduler)
    assert logs == {"seen": 1.0} and calls == [8] and not torch.equal(before[0], model.weight)

    # a finite loss whose update makes the weights non-finite stops before the teacher moves
    for group in optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteLossError, match="parameters became non-finite at step 9"):
        train_step(good_step, model, {"x": torch.ones(1, 2)}, 9, 10, optimizer, scheduler)
    assert calls == [8]
