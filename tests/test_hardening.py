"""Issue 15, trainer side: each defect class with a test of its class (not of one command).

Bad values are refused up front, one trainer per run directory, nothing non-finite is kept,
full disks and unwritable outputs are one line, nothing a user had is lost on --force, and
malformed checkpoints never reach the model builder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HANG_BOUND_S, wait_until
from emanorm.cli import main
from emanorm.errors import UserError
from emanorm.train import build_run, resolve_config, train, train_step
from emanorm.train import checkpoint as ckpt
from emanorm.train.lock import RunBusyError, run_directory
from emanorm.train.loop import NonFiniteLossError, RunLogger, claim_run_dir, write_checkpoint
from emanorm.train.restore import check_checkpoint


def tiny(out: Path, data_dir: Path | None = None, **extra) -> dict:
    """A 2-step FixMatch config; ``data_dir``: the stand-in Fashion-MNIST of conftest."""
    overrides = {"method": "fixmatch", "max_steps": 2, "batch_size": 8, "unlabeled_ratio": 1,
                 "labels_per_class": 2, "knn_bank_size": 32, "monitor_test_size": 32,
                 "device": "cpu", "out": str(out), "eval_every": 0,
                 "data_dir": None if data_dir is None else str(data_dir)}  # fmt: skip
    overrides.update(extra)
    return resolve_config(None, overrides)


# -- bad values, refused before anything is built (M-9, L-1, L-9) -----------------------------------
BAD_VALUES = [
    ({"warmup_epochs": math.nan}, "warmup_epochs must be a finite number"),
    ({"lr": math.inf}, "lr must be a finite number"),
    ({"lr": math.nan}, "lr must be a finite number"),
    ({"lr": 1e30}, "far too large"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number"),
    ({"schedule": "step", "lr_milestones": "abc"}, "lr_milestones must be a list"),
    ({"lr_milestones": [0.5, 2]}, "lr_milestones must be a list"),
    ({"sgd_momentum": 0}, "nesterov needs sgd_momentum > 0"),
    ({"optimizer": "lars", "lars_eta": -1}, "lars_eta must be a positive number"),
    ({"augment_options": {"nosuch": 1}}, "unknown augment option 'nosuch'; allowed: blur, cutout"),
    ({"augment_options": {"blur": "maybe"}}, "augment option blur must be true or false"),
    ({"augment_options": {"cutout": "half"}}, "augment option cutout must be a number"),
    ({"compile": "maybe"}, "compile must be true or false"),
    ({"nesterov": "abc"}, "nesterov must be true or false"),
    ({"deterministic": "maybe"}, "deterministic must be true or false"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES)
def test_bad_values_are_refused_with_their_name(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        tiny(tmp_path / "run", **overrides)


@pytest.mark.parametrize("flag", ["--lr nan", "--lr inf", "--set warmup_epochs=.nan", "--set compile=maybe"])
def test_bad_values_on_the_command_line_leave_no_run_directory(flag, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--max-steps", "1", "--device", "cpu", "--out", str(out), *flag.split()]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_label_flag_replaces_the_presets_choice_and_set_null_clears_it(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("Index\n0\n1\n")
    cfg = resolve_config("small-fixmatch", {"label_index_csv": str(csv)})  # the preset sets labels_per_class
    assert cfg["label_index_csv"] == str(csv) and cfg["labels_per_class"] is None
    cfg = resolve_config("small-fixmatch", {"label_fraction": 0.1})
    assert cfg["label_fraction"] == 0.1 and cfg["labels_per_class"] is None
    cleared = resolve_config("small-fixmatch", {}, explicit={"labels_per_class": None})
    assert cleared["labels_per_class"] is None
    not_given = resolve_config("small-fixmatch", {"labels_per_class": None})
    assert not_given["labels_per_class"] == 10


def test_a_setting_the_method_cannot_train_fails_before_a_file_is_written(tmp_path, capsys,
                                                                          tiny_fashion_mnist_dir):
    out = tmp_path / "run"
    assert main(["train", "--method", "moco", "--batch-size", "100", "--max-steps", "1",
                 "--data-dir", str(tiny_fashion_mnist_dir),
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 2  # fmt: skip
    assert "queue_size 4096 must be a multiple of the global key batch 100" in capsys.readouterr().err
    assert not out.exists()


# -- one trainer per run directory (H-2) --------------------------------------------------------------
def test_a_second_trainer_on_a_run_directory_is_refused_before_it_touches_anything(tmp_path, capsys):
    out = tmp_path / "run"
    with run_directory(out):
        before = sorted(p.name for p in out.iterdir())
        assert main(["train", "--max-steps", "1", "--device", "cpu", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "another process is training the run in" in err and f"pid {os.getpid()}" in err, err
        assert sorted(p.name for p in out.iterdir()) == before
        with pytest.raises(RunBusyError), run_directory(out):
            pass
    with run_directory(out):  # released with its holder: the next trainer takes it over
        pass


def test_a_run_directory_made_for_a_failed_run_is_removed(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError), run_directory(out):
        raise ValueError("the run failed before writing")
    assert not out.exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(ValueError), run_directory(existing):
        raise ValueError("failed")
    assert existing.is_dir()  # a directory the user had stays


# -- nothing non-finite is kept (H-3) -----------------------------------------------------------------
@pytest.mark.parametrize("where", ["parameter", "bn statistic", "teacher statistic"])
def test_a_step_or_checkpoint_with_non_finite_tensors_is_refused(where, tmp_path, tiny_fashion_mnist_dir):
    run = build_run(tiny(tmp_path / "run", tiny_fashion_mnist_dir, norm="eman"))
    batch = next(iter(run.stream))
    state = run.method.state_dict()
    target = {
        "parameter": next(k for k in state if k.startswith("student.") and k.endswith("weight")),
        "bn statistic": next(k for k in state if k.startswith("student.") and k.endswith("running_var")),
        "teacher statistic": next(k for k in state if k.startswith("teacher.") and k.endswith("running_var")),
    }[where]
    state[target].fill_(math.inf)
    if where != "teacher statistic":  # the student's tensors: caught by the step, before the teacher moves
        teacher_before = {k: v.clone() for k, v in state.items() if k.startswith("teacher.")}
        with pytest.raises(NonFiniteLossError, match=r"non-finite|loss is nan"):
            train_step(run.step_fn, run.method, batch, 0, run.total_steps, run.optimizer, run.scheduler)
        after = run.method.state_dict()
        assert all(torch.equal(after[k], v) for k, v in teacher_before.items())
    path = tmp_path / "last.pt"
    from emanorm.train.loop import save_checkpoint

    with pytest.raises(NonFiniteLossError, match="not checkpointed"):
        save_checkpoint(run, path, {"epoch": 0, "step_in_epoch": 0, "global_step": 0}, 0.0)
    assert not path.exists()
    # a checkpoint written by other means that holds one is refused by eval / export
    data = {"config": run.cfg, "dataset_info": vars(run.info), "method": state}
    with pytest.raises(UserError, match=r"non-finite values in \d+ tensors"):
        check_checkpoint(data, path)


# -- full disks and unwritable places (M-2, M-10, M-11) -----------------------------------------------
def test_a_full_disk_is_one_line_naming_the_file_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.atomic_save({"step": torch.tensor(1)}, path)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos; file write failed")
    for error in (OSError(errno.ENOSPC, "No space left on device"), torch_error):
        def full(*_args, error=error, **_kwargs):
            raise error

        monkeypatch.setattr(ckpt, "atomic_save", full)
        with pytest.raises(UserError, match=f"could not write checkpoint {path}: no space left on device"):
            write_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(ckpt.safe_load(path)["step"]) == 1
    logger = RunLogger(tmp_path, enabled=True, resume_step=0)
    logger.path = Path("/dev/full")  # every write: ENOSPC
    with pytest.raises(UserError, match="no space left on device"):
        logger.record({"kind": "train", "step": 1, "loss": 1.0})
    logger.close()


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    stale = folder / f".{ckpt.CHECKPOINT_NAME}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    (folder / ckpt.CHECKPOINT_NAME).write_bytes(b"kept")
    claim_run_dir(tmp_path / "run", resume=True, force=False)
    assert not stale.exists() and (folder / ckpt.CHECKPOINT_NAME).read_bytes() == b"kept"


def test_force_with_a_broken_new_command_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name, text in (("summary.json", "{}"), ("metrics.jsonl", ""), ("config.yaml", "method: fixmatch\n"),
                       ("checkpoints/last.pt", "weights")):  # fmt: skip
        (out / name).write_text(text)
    rc = main(["train", "--force", "--dataset", "cifar10", "--data-dir", str(tmp_path / "typo"),
               "--max-steps", "1", "--device", "cpu", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 2 and "Traceback" not in capsys.readouterr().err
    kept = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    assert kept == ["checkpoints/last.pt", "config.yaml", "metrics.jsonl", "summary.json"]


# -- malformed checkpoints and messages (M-12, L-10) ---------------------------------------------------
GOOD_INFO = {"name": "fashion_mnist", "num_classes": 10, "channels": 1, "image_size": 28,
             "mean": [0.5], "std": [0.25]}  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"config": {"method": 5}, "dataset_info": GOOD_INFO, "method": {}}, "names method 5"),
        ({"config": {"method": "moco"}, "dataset_info": [1, 2], "method": {}}, "dataset_info is a list"),
        ({"config": {"method": "moco"}, "dataset_info": {**GOOD_INFO, "num_classes": 300_000_000},
          "method": {}}, "num_classes = 300000000"),
        ({"config": {"method": "moco"}, "dataset_info": {**GOOD_INFO, "channels": "1"}, "method": {}},
         "channels = '1'"),
        ({"config": {"method": "moco"}, "dataset_info": GOOD_INFO, "method": {"w": 3}},
         "not all named tensors"),
        ({"config": [], "dataset_info": GOOD_INFO, "method": {}}, "config is a list"),
        ({"weights": {}}, "is not an emanorm checkpoint"),
    ],
)
def test_malformed_checkpoints_are_refused_before_anything_is_built(data, message, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    for command in (["eval", "knn", str(path), "--device", "cpu"], ["export", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(("content", "message"), [
    (b"hello, this is text\n", "is not a PyTorch checkpoint (the file is text)"),
    (os.urandom(256).replace(b"PK", b"pk").lstrip(b"\x80") or b"x", "neither a zip nor a pickle"),
    (b"", "the file is empty"),
])  # fmt: skip
def test_files_that_are_not_checkpoints_are_named_for_what_they_are(content, message, tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)):
        ckpt.safe_load(path)


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys, tiny_fashion_mnist_dir):
    run = tmp_path / "run"
    train(tiny(run, tiny_fashion_mnist_dir), progress=False)
    (tmp_path / "adir").mkdir()
    cases = [
        (["export", str(run), "--out", str(tmp_path / "adir")], "is a directory"),
        (["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "x.pth")], "does not fit"),
        (["eval", "knn", str(run), "--out", str(tmp_path / "adir"), "--device", "cpu"], "is a directory"),
    ]
    for command, message in cases:
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("adir*.tmp")) and not list((tmp_path / "adir").iterdir())
    if os.geteuid() != 0:  # root writes anywhere: the read-only case needs an ordinary user
        run.chmod(0o555)
        try:
            assert main(["eval", "knn", str(run), "--device", "cpu"]) == 2
            assert "read-only" in capsys.readouterr().err
        finally:
            run.chmod(0o755)


def test_resume_compares_with_the_checkpoints_config_when_config_yaml_is_gone(tmp_path, capsys,
                                                                              tiny_fashion_mnist_dir):
    out = tmp_path / "run"
    train(tiny(out, tiny_fashion_mnist_dir, checkpoint_every_steps=1, max_steps=1))
    (out / "summary.json").unlink()
    (out / "config.yaml").unlink()
    rc = main(["train", "--method", "fixmatch", "--max-steps", "1", "--batch-size", "8",
               "--unlabeled-ratio", "1", "--labels-per-class", "2", "--device", "cpu", "--out", str(out),
               "--no-progress", "--data-dir", str(tiny_fashion_mnist_dir),
               "--set", "knn_bank_size=32", "--set", "monitor_test_size=32", "--set", "eval_every=0",
               "--resume", "--lr", "0.5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "differs from the checkpoint's" in err and "lr: 0.03 -> 0.5" in err, err
    assert not (out / "config.yaml").exists()  # nothing rewritten


def test_compare_out_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    assert main(["compare", "--methods", "fixmatch", "--norms", "eman", "--seeds", "1", "--out", str(target),
                 "--no-progress"]) == 2  # fmt: skip
    assert "exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_summary_json_of_a_tiny_run_is_valid(tmp_path, tiny_fashion_mnist_dir):
    summary = train(tiny(tmp_path / "run", tiny_fashion_mnist_dir))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == summary["steps"] == 2


# -- a crash at the end-of-epoch evaluation loses nothing (L-3, L-10) --------------------------------------
def test_a_crash_in_the_final_evaluation_keeps_the_epoch_and_the_resume_logs_its_evaluation(
    tmp_path, tiny_fashion_mnist_dir
):
    out = tmp_path / "run"
    calls = []

    def crashing_monitor(method, run):
        calls.append(1)
        raise KeyboardInterrupt  # killed while evaluating

    with pytest.raises(KeyboardInterrupt):
        train(tiny(out, tiny_fashion_mnist_dir), monitor=crashing_monitor)
    assert ckpt.safe_load(out)["global_step"] == 2  # the checkpoint was written before the evaluation
    summary = train(tiny(out, tiny_fashion_mnist_dir), monitor=lambda method, run: {"knn_teacher": 50.0},
                    resume=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2]
    assert summary["final"] == {"knn_teacher": 50.0} and summary["steps"] == 2


# -- compare's training children die with it (L-7) ----------------------------------------------------------
# The child shares the parent's stdout: it says "armed" once its death signal is set. Both wait for
# an hour, so only the parent's death can end the child within the test.
PARENT = """
import os, subprocess, sys, time
env = {**os.environ, "EMANORM_PARENT_PID": str(os.getpid())}
child = subprocess.Popen([sys.executable, "-c",
    "from emanorm.experiments.grid import die_with_parent; die_with_parent(); "
    "import time; print('armed', flush=True); time.sleep(3600)"],
    env=env)
print(child.pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.slow  # two fresh interpreters and a 3 s wait: ~6 CPU-seconds, ~10 s
@pytest.mark.skipif(os.uname().sysname != "Linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_a_training_child_dies_when_compare_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "armed"  # the child has asked for its signal
    os.kill(child, 0)  # alive
    parent.kill()  # SIGKILL: no cleanup code of the parent runs
    parent.wait()

    def child_gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):  # reap it if it became ours (a subreaper)
            os.waitpid(child, os.WNOHANG)
        return False

    try:
        wait_until(child_gone, "the child's death after its parent was killed")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        raise
    # and a child whose parent is already gone exits at once
    gone = subprocess.run([sys.executable, "-c", "from emanorm.experiments.grid import die_with_parent; "
                           "die_with_parent()"], env={**os.environ, "EMANORM_PARENT_PID": "1"},
                          capture_output=True, text=True, timeout=HANG_BOUND_S)  # fmt: skip
    assert gone.returncode != 0 and "that started this run is gone" in gone.stderr
