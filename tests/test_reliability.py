"""Runs that survive kills, checkpoints that never run code, bad input that gets a clear answer."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import HANG_BOUND_S, torchrun_command, wait_until
from emanorm.data import DatasetInfo, ImageDataset
from emanorm.errors import UserError
from emanorm.evaluation import knn_monitor
from emanorm.train import checkpoint as ckpt
from emanorm.train import resolve_config, train

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")

TINY = [
    "--batch-size",
    "16",
    "--unlabeled-ratio",
    "1",
    "--set",
    "knn_bank_size=64",
    "--set",
    "monitor_test_size=64",
    "--no-progress",
    "--device",
    "cpu",
]
RESUME_CASES = {
    "fixmatch": ["--method", "fixmatch", "--norm", "eman", "--labels-per-class", "4"],
    "moco": ["--method", "moco", "--norm", "eman", "--method-arg", "queue_size=64", "--method-arg", "dim=16"],
    "dino": ["--method", "dino", "--norm", "eman", "--method-arg", "out_dim=32",
             "--method-arg", "hidden_dim=16", "--method-arg", "local_crops=2"],
}


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "emanorm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def run(*args: str) -> subprocess.CompletedProcess:
    process = cli(*args)
    out, err = process.communicate(timeout=HANG_BOUND_S)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def teacher_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = ckpt.safe_load(run_dir)["method"]
    return {k: v for k, v in state.items() if k.startswith("teacher.")}


# -- exact resume ------------------------------------------------------------
@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("method", list(RESUME_CASES))
def test_sigkill_and_resume_matches_an_uninterrupted_run(method, tmp_path):
    common = [
        *RESUME_CASES[method],
        *TINY,
        "--max-steps",
        "16",
        "--checkpoint-every-steps",
        "3",
        "--set",
        "deterministic=true",
        "--set",
        "eval_every=0",
    ]
    straight = tmp_path / "straight"
    result = run("train", *common, "--out", str(straight))
    assert result.returncode == 0, result.stderr

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _attempt in range(12):
        process = cli("train", *common, "--out", str(killed), "--resume", "auto")
        if kills < 3:
            # wait until training has made progress past a checkpoint, then kill at a random moment
            checkpoint = killed / "checkpoints" / "last.pt"
            start_mtime = checkpoint.stat().st_mtime if checkpoint.exists() else 0

            def progressed(process=process, checkpoint=checkpoint, start_mtime=start_mtime) -> bool:
                if process.poll() is not None:
                    return True
                return checkpoint.exists() and checkpoint.stat().st_mtime != start_mtime

            wait_until(progressed, "a new checkpoint")
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment to kill at, not a wait for anything
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        process.communicate(timeout=HANG_BOUND_S)
        if (killed / "summary.json").exists():
            break
    assert kills >= 1, "the run finished before it could be killed"
    assert (killed / "summary.json").exists()
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["final"] == b["final"] and a["steps"] == b["steps"] == 16
    ta, tb = teacher_state(straight), teacher_state(killed)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs after {kills} kills"
    # metrics.jsonl holds each step once, in order, despite the kills
    steps = [
        json.loads(line)["step"]
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == sorted(set(steps))


# -- safe loading ------------------------------------------------------------
class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ctrl_c_during_a_checkpoint_write_lands_after_it_and_is_not_a_full_disk(tmp_path, monkeypatch):
    # CI saw this: SIGINT arrived while torch.save was writing, torch's zip writer turned the
    # KeyboardInterrupt into "unexpected pos ..." and the trainer said "no space left on device"
    path = tmp_path / "last.pt"
    real_save = torch.save

    class SlowDisk:  # Ctrl-C arrives while torch's C++ zip writer is calling back into Python
        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    def interrupted_save(obj, handle, *args, **kwargs):
        real_save(obj, SlowDisk(handle), *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.default_int_handler)  # as under `emanorm`
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt.write_checkpoint({"step": torch.tensor(7), "w": torch.ones(100_000)}, path)
    finally:
        signal.signal(signal.SIGINT, previous)
    saved = ckpt.safe_load(path)  # the interrupted write finished first, whole
    assert int(saved["step"]) == 7 and torch.equal(saved["w"], torch.ones(100_000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow  # a fresh interpreter importing torch: ~6 CPU-seconds or more
def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "method": Exploit(marker)}, evil)
    with pytest.raises(UserError, match="refusing to load"):
        ckpt.safe_load(evil)
    assert not marker.exists()
    for args in (["eval", "knn", str(evil)], ["export", str(evil), "--which", "teacher"]):
        result = run(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert not marker.exists()
    # a plain pickle (not a torch zip) carrying code is refused as well
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(UserError):
        ckpt.safe_load(raw)
    assert not marker.exists()


def test_truncated_and_corrupt_checkpoints_are_detected(tmp_path):
    good = tmp_path / "good.pt"
    ckpt.atomic_save({"config": {}, "method": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated\.pt is damaged \(not the file that was written\)"):
        ckpt.safe_load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(UserError):
        ckpt.safe_load(garbage)
    with pytest.raises(UserError, match="not found"):
        ckpt.safe_load(tmp_path / "nothing.pt")


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def no_space(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    from emanorm.train.loop import write_checkpoint

    with pytest.raises(UserError, match=r"(?i)no space left on device; the previous checkpoint is intact"):
        write_checkpoint({"step": torch.tensor(3)}, path)
    assert path.read_bytes() == before


@pytest.mark.slow  # a fresh interpreter importing torch: ~6 CPU-seconds or more
def test_unwritable_output_directory_is_a_clear_error(tmp_path, tiny_fashion_mnist_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: simulate with a file in the way
            locked.chmod(0o700)
            (locked / "run").write_text("not a directory")
        result = run("train", "--max-steps", "1", *TINY, "--data-dir", str(tiny_fashion_mnist_dir),
                     "--out", str(locked / "run"))
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert str(locked / "run") in result.stderr
    finally:
        locked.chmod(0o700)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_fashion_mnist_dir):
    out = tmp_path / "run"
    cfg = resolve_config(
        None,
        {
            "max_steps": 30,
            "batch_size": 16,
            "unlabeled_ratio": 1,
            "labels_per_class": 4,
            "lr": 5e5,  # larger values are refused before training (test_hardening)
            "checkpoint_every_steps": 1,
            "out": str(out),
            "device": "cpu",
            "knn_bank_size": 32,
            "monitor_test_size": 32,
            "method": "supervised",
            "norm": "bn",
            "data_dir": str(tiny_fashion_mnist_dir),
        },
    )
    # the loss turns nan/inf, or (a finite loss with a huge lr) the update makes the weights or the
    # BN statistics non-finite
    message = r"(loss is (nan|inf)|(parameters|BN statistics) became non-finite) at step \d+"
    with pytest.raises(UserError, match=message) as info:
        train(cfg, monitor=knn_monitor, progress=False)
    failed_step = int(str(info.value).split("at step ")[1].split(";")[0])
    state = ckpt.safe_load(out)
    assert state["global_step"] == failed_step  # the last good step, nothing after it
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


# -- mismatched weights ------------------------------------------------------------
def test_loading_weights_of_another_architecture_lists_what_differs():
    small = torch.nn.Sequential(torch.nn.Linear(4, 3))
    other = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "1.weight": torch.zeros(2)}
    with pytest.raises(UserError) as info:
        ckpt.load_matching(small, other, "checkpoint x.pt")
    message = str(info.value)
    assert "unexpected 1 keys (e.g. 1.weight)" in message and "0.weight (5, 4) vs (3, 4)" in message


@needs_fmnist
@pytest.mark.slow
def test_init_from_an_incompatible_run_is_a_clear_error(tmp_path):
    source = tmp_path / "source"
    supervised = ["--method", "supervised", "--norm", "bn", "--labels-per-class", "4", "--max-steps", "1"]
    supervised += TINY
    result = run("train", *supervised, "--out", str(source))
    assert result.returncode == 0, result.stderr
    target = run(
        "train",
        *supervised,
        "--backbone",
        "resnet18_cifar",
        "--out",
        str(tmp_path / "target"),
        "--init-from",
        str(source),
    )
    assert target.returncode != 0 and "Traceback" not in target.stderr
    assert "cannot initialise from" in target.stderr and "resnet18_cifar" in target.stderr


# -- bad data ------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter importing torch: ~6 CPU-seconds or more
@pytest.mark.parametrize(
    ("dataset", "layout", "message"),
    [
        ("cifar10", "missing", "is not a directory"),
        ("cifar10", "empty", "cifar"),
        ("imagenet", "malformed", "train"),
    ],
)
def test_missing_empty_or_malformed_data_directories(dataset, layout, message, tmp_path):
    data_dir = tmp_path / "data"
    if layout != "missing":
        data_dir.mkdir()
    if layout == "malformed":
        (data_dir / "readme.txt").write_text("not an ImageFolder")
    result = run(
        "train",
        "--dataset",
        dataset,
        "--data-dir",
        str(data_dir),
        "--max-steps",
        "1",
        *TINY,
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message.lower() in result.stderr.lower()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow  # a fresh interpreter importing torch: ~6 CPU-seconds or more
def test_a_corrupt_image_names_the_file(tmp_path, corrupt_folder_dir):
    result = run(
        "train",
        "--method",
        "moco",
        "--norm",
        "eman",
        "--dataset",
        "folder",
        "--data-dir",
        str(corrupt_folder_dir),
        "--set",
        "image_size=32",
        "--max-steps",
        "2",
        "--method-arg",
        "queue_size=64",
        *TINY,
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "cannot decode image file" in result.stderr


# -- distributed faults ------------------------------------------------------------
@needs_fmnist
@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_stops_the_job_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    fixmatch = [*RESUME_CASES["fixmatch"], "--checkpoint-every-steps", "2", *TINY, "--out", str(out)]
    train_args = [*fixmatch, "--max-steps", "400"]
    command, env = torchrun_command(2, "-m", "emanorm", "train", *train_args, dist_timeout_s=30)
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _kill_one_rank(launcher, out)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    state = ckpt.safe_load(out)
    assert 0 < state["global_step"] < 400
    assert not (out / "summary.json").exists()
    # finish on one process from the same checkpoint (a 2-rank resume is the same code path)
    finish = str(state["global_step"] + 2)
    result = run("train", *fixmatch, "--max-steps", finish, "--resume")
    assert result.returncode != 0  # a changed budget is a changed config: refused without --force
    result = run("train", *fixmatch, "--max-steps", finish, "--resume", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == state["global_step"] + 2


def _kill_one_rank(launcher: subprocess.Popen, out: Path) -> None:
    checkpoint = out / "checkpoints" / "last.pt"
    wait_until(checkpoint.exists, "the first checkpoint", process=launcher)
    workers = subprocess.run(
        ["pgrep", "-f", "--", f"-u -m emanorm train.*{out}"], capture_output=True, text=True
    ).stdout.split()
    victims = [int(pid) for pid in workers if int(pid) != launcher.pid]
    assert victims, "no worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    # the survivor gives up after dist_timeout_s; the bound only tells a hang from a slow machine
    _, stderr = launcher.communicate(timeout=HANG_BOUND_S)
    assert launcher.returncode != 0
    assert "failed" in stderr.lower() or "signal" in stderr.lower()


# -- data loading faults -------------------------------------------------------
class _FaultyFiles(ImageDataset):
    """A 'file' dataset whose loader workers stall or die on the third batch."""

    in_memory = False

    def __init__(self, fault: str) -> None:
        self.info = DatasetInfo("faulty", 2, 1, 8, (0.5,), (0.25,))
        self.targets = torch.arange(64) % 2
        self.split = "train"
        self.fault = fault
        self.calls = 0

    def fetch(self, indices):
        self.calls += 1  # counted inside each worker process
        if self.calls >= 2:
            if self.fault == "stall":
                time.sleep(3600)  # for good: only the loader's timeout gets the stream past it
            else:
                os._exit(1)
        return torch.zeros(len(indices), 1, 8, 8, dtype=torch.uint8)


# A stall is only ended by the timeout, so it is short: whether the first batch beats it or not, the
# hour-long stall ends as "stalled". A crash is reported when the worker dies (SIGCHLD), long before a
# timeout; a short one could fire first on a slow machine and call the crash a stall.
@pytest.mark.parametrize(("fault", "message", "loader_timeout"),
                         [("stall", "data loading stalled", 2), ("crash", "worker died", 60)])
def test_a_stalled_or_crashed_loader_worker_is_reported_not_hung_on(fault, message, loader_timeout):
    from emanorm.data import BatchStream, DataError

    dataset = _FaultyFiles(fault)
    stream = BatchStream(unlabeled=dataset, unlabeled_views={"view": "none"}, batch_size=4, num_workers=1,
                         loader_timeout=loader_timeout)
    started = time.monotonic()
    with pytest.raises(DataError, match=message):
        for _ in stream:
            pass
    assert time.monotonic() - started < HANG_BOUND_S  # the stall lasts an hour: the timeout ended it
