"""The trainer end to end: every (method, norm) pair, run directories, CLI errors.

Fast layer: the stand-in Fashion-MNIST of conftest (120/40 images whose grey level encodes the
label) and one pair per norm. ``slow``: the rest of the 50 pairs, and one run on the real data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import HANG_BOUND_S
from emanorm.errors import UserError
from emanorm.evaluation import knn_monitor
from emanorm.methods import METHODS
from emanorm.train import load_backbone, resolve_config, train
from emanorm.train.checkpoint import safe_load

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# Tiny but real: a few steps, small heads and monitor sets.
METHOD_ARGS = {
    "moco": {"queue_size": 64, "dim": 16},
    "byol": {"hidden_dim": 32, "proj_dim": 16},
    "dino": {"out_dim": 32, "hidden_dim": 16, "local_crops": 2},
    "fixmatch": {},
    "meanteacher": {},
    "supervised": {},
    "mocov3": {"dim": 16, "hidden_dim": 32},
}


def tiny_config(method: str, norm: str, out: Path, data_dir: Path | str | None = None, **extra) -> dict:
    """A 2-step config; ``data_dir=None`` is the system Fashion-MNIST (slow tests only)."""
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
        "data_dir": None if data_dir is None else str(data_dir),
        "method_args": METHOD_ARGS[method],
    }
    if method in ("fixmatch", "meanteacher", "supervised"):
        overrides["labels_per_class"] = 4
    overrides.update(extra)
    return resolve_config(None, overrides)


# The fast layer trains each norm once and each method at least once; the other pairs are slow.
FAST_PAIRS = {
    ("fixmatch", "eman"), ("moco", "shuffle_bn"), ("byol", "bn"), ("meanteacher", "teacher_pn"),
    ("supervised", "sync_bn"), ("dino", "gn"), ("fixmatch", "student_pn"), ("moco", "default"),
    ("byol", "in"), ("mocov3", "eman"),
}  # fmt: skip
VALID = [
    pytest.param(m, n, marks=() if (m, n) in FAST_PAIRS else pytest.mark.slow, id=f"{m}-{n}")
    for m, cls in METHODS.items() for n in cls.NORMS
]  # fmt: skip
INVALID = [(m, n) for m, cls in METHODS.items() for n in ("shuffle_bn", "eman") if n not in cls.NORMS]


def test_the_fast_pairs_cover_every_method_and_every_norm():
    assert {m for m, _ in FAST_PAIRS} == set(METHODS)
    assert {n for _, n in FAST_PAIRS} == {n for cls in METHODS.values() for n in cls.NORMS}
    assert all(n in METHODS[m].NORMS for m, n in FAST_PAIRS)


def check_run_directory(run: Path, method: str, norm: str, trained: torch.nn.Module,
                        test_images: int) -> dict:
    """Everything a 2-step run writes; returns its final evaluation (over ``test_images`` images)."""
    saved = json.loads((run / "summary.json").read_text())
    assert saved["steps"] == 2 and saved["method"] == method and saved["norm"] == norm
    assert saved["dataset"] == "fashion_mnist"
    if method in ("fixmatch", "meanteacher", "supervised"):
        # 2 steps leave the head near chance; the figure is a count over the monitored test images
        assert (saved["final"]["test_acc_teacher"] * test_images / 100).is_integer()
        rows = (run / "labeled_split.csv").read_text().split()
        assert rows[0].startswith("Index") and len(rows) == 1 + 40  # 4 labels x 10 classes
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == method and config["norm"] == norm and config["max_steps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_records)
    assert any(r["kind"] == "eval" for r in records)
    assert any((run / "tb").iterdir())
    assert safe_load(run / "checkpoints" / "last.pt")["global_step"] == 2
    # The saved teacher is the trained one: same tensors, same features for the same images.
    backbone, cfg = load_backbone(run, "teacher")
    assert cfg["method"] == method
    expected = trained.encoder("teacher").state_dict()
    assert backbone.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    images = torch.rand(4, 1, 28, 28)
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), trained.encoder("teacher")(images))
    return saved["final"]


@pytest.mark.parametrize(("method", "norm"), VALID)
def test_every_valid_pair_trains_and_writes_a_run_directory(method, norm, tmp_path, tiny_fashion_mnist_dir):
    run = tmp_path / "run"
    cfg = tiny_config(method, norm, run, tiny_fashion_mnist_dir)
    summary, trained = train(cfg, monitor=knn_monitor, progress=False, return_method=True)
    assert summary["steps"] == 2 and summary["method"] == method and summary["norm"] == norm
    final = check_run_directory(run, method, norm, trained, test_images=40)
    # The stand-in's grey level encodes the label, so even 2 steps give features far above chance
    # (10%). Per-image normalisation (gn, in) removes most of that code: measured 27.5-40% there,
    # 40-85% elsewhere (the EMAN teacher's statistics have barely moved from their start: 40%).
    floor = 20.0 if norm in ("gn", "in") else 35.0
    assert final["knn_teacher"] >= floor and final["knn_student"] >= floor, final
    assert final["knn_bank"] == 64 and final["knn_k"] == cfg["knn_k"]


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fixmatch_eman_trains_on_the_real_fashion_mnist(tmp_path):
    run = tmp_path / "run"
    # a larger kNN bank than the stand-in's, so that the figure means something on real images
    cfg = tiny_config("fixmatch", "eman", run, knn_bank_size=2000, monitor_test_size=500)
    summary, trained = train(cfg, monitor=knn_monitor, progress=False, return_method=True)
    assert summary["steps"] == 2
    final = check_run_directory(run, "fixmatch", "eman", trained, test_images=500)
    assert final["knn_bank"] == 2000
    # near-random features already sort Fashion-MNIST well (measured 68.4% teacher, 65.6% student)
    assert final["knn_teacher"] > 50.0 and final["knn_student"] > 50.0, final


@pytest.mark.parametrize(("method", "norm"), INVALID)
def test_invalid_pairs_fail_clearly(method, norm, tmp_path, tiny_fashion_mnist_dir):
    with pytest.raises(UserError, match=f"norm '{norm}' is not valid for method '{method}'"):
        train(tiny_config(method, norm, tmp_path / "run", tiny_fashion_mnist_dir), monitor=knn_monitor,
              progress=False)
    assert not (tmp_path / "run").exists()


def test_eman_teacher_statistics_follow_the_student(tmp_path, tiny_fashion_mnist_dir):
    """After training, the EMAN teacher's BN statistics are an EMA of the student's: moved from their
    defaults (mean 0, var 1) towards the student's, yet not a copy of them."""
    cfg = tiny_config("fixmatch", "eman", tmp_path / "run", tiny_fashion_mnist_dir, max_steps=3,
                      ema_momentum=0.5, calibrate_bn_batches=0)  # the defaults it moves from: uncalibrated
    _, method = train(cfg, monitor=knn_monitor, progress=False, return_method=True)
    teacher = method.teacher.module.state_dict()
    student = method.student.state_dict()
    means = [k for k in teacher if k.endswith("running_mean")]
    assert means
    for key in means:
        t, s = teacher[key], student[key]
        assert t.abs().sum() > 0 and not torch.equal(t, s), key
        # an EMA of a sequence of student values lies nearer the student's last value than the default
        assert (t - s).norm() < s.norm(), key
    counts = [k for k in teacher if k.endswith("num_batches_tracked")]
    assert all(teacher[k].item() == student[k].item() == 3 for k in counts)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m emanorm ARGS`` in a fresh interpreter (its import costs ~6 CPU seconds)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "emanorm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=HANG_BOUND_S,
    )


@pytest.fixture(params=["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def emanorm_cli(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture):
    """Run the CLI: ``emanorm.cli.main`` in this process (fast layer), or ``python -m emanorm`` in a
    fresh interpreter (slow layer: the real entry point, whose stderr also holds any log line)."""
    if request.param == "subprocess":
        return run_cli

    def in_process(*args: str) -> subprocess.CompletedProcess:
        from emanorm import cli

        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as stop:  # argparse rejects a flag by exiting
            code = stop.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["emanorm", *args], code, out, err)

    return in_process


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
def test_cli_bad_input_is_one_clear_line(args, message, tmp_path, tiny_fashion_mnist_dir, emanorm_cli):
    budget = [] if "--epochs" in args else ["--max-steps", "1"]
    data = [] if "--dataset" in args else ["--data-dir", str(tiny_fashion_mnist_dir)]
    result = emanorm_cli("train", *budget, *data, "--out", str(tmp_path / "run"), "--no-progress", *args)
    assert_clean_error(result, message)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_bad_config_files(tmp_path, emanorm_cli):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: [fixmatch\n")
    assert_clean_error(emanorm_cli("train", "--config", str(bad_yaml)), "invalid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: fixmatch\nlearning_rate: 0.1\nmax_steps: 1\n")
    assert_clean_error(emanorm_cli("train", "--config", str(unknown)), "unknown option(s)")
    assert_clean_error(emanorm_cli("train", "--config", str(tmp_path / "missing.yaml")),
                       "config file not found")


def test_cli_refuses_to_overwrite_and_checks_resume_config(tmp_path, tiny_fashion_mnist_dir, emanorm_cli):
    run = tmp_path / "run"
    common = [
        "--data-dir", str(tiny_fashion_mnist_dir), "--max-steps", "1", "--batch-size", "16",
        "--unlabeled-ratio", "1", "--labels-per-class", "4", "--set", "knn_bank_size=32",
        "--set", "monitor_test_size=32", "--out", str(run), "--no-progress",
    ]  # fmt: skip
    first = emanorm_cli("train", *common)
    assert first.returncode == 0, first.stderr
    assert "teacher" in first.stdout and str(run) in first.stdout
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    assert_clean_error(emanorm_cli("train", *common), "already holds a finished run")
    assert_clean_error(
        emanorm_cli("train", *common, "--resume", "--lr", "0.5"), "--resume with a different config"
    )
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint  # nothing damaged
    resumed = emanorm_cli("train", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint  # a finished run is left as is


def test_budget_flags_replace_the_presets(tmp_path):
    cfg = resolve_config(None, {"epochs": 3})
    assert cfg["epochs"] == 3 and cfg["max_steps"] is None
    cfg = resolve_config("small-moco", {"max_steps": 7})
    assert cfg["max_steps"] == 7 and cfg["epochs"] is None and cfg["method"] == "moco"
    with pytest.raises(UserError, match="choose one way to pick labels"):
        resolve_config(None, {"label_fraction": 0.1, "label_index_csv": "x.csv"})


def test_presets_all_resolve():
    from emanorm.train.presets import preset_names

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
