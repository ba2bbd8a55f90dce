"""Lab workflow: gradient accumulation, preemption (SIGTERM/SIGUSR1) with exact resume, trackers."""

from __future__ import annotations

import importlib
import json
import os
import signal
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import HANG_BOUND_S, torchrun_command, wait_until
from emanorm.errors import UserError
from emanorm.train import checkpoint as ckpt
from emanorm.train import loop, resolve_config, train
from emanorm.train.loop import train_step
from emanorm.train.preemption import RESUMABLE_EXIT, Preempted
from emanorm.train.recipe import build_run

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

CASES = {  # one SSL method and one semi-supervised method, BatchNorm-free
    "moco": {"method_args": {"queue_size": 64, "dim": 16}},
    "fixmatch": {"labels_per_class": 4},
}


def tiny(method: str, data_dir: Path, out: Path | None = None, **extra) -> dict:
    overrides = {
        "method": method,
        "norm": "gn",
        "max_steps": 3,
        "batch_size": 8,
        "unlabeled_ratio": 2,
        "knn_bank_size": 32,
        "monitor_test_size": 32,
        "log_every": 1,
        "device": "cpu",
        "data_dir": str(data_dir),
        "eval_every": 0,
        "out": str(out) if out else None,
        **CASES[method],
        **extra,
    }
    return resolve_config(None, overrides)


# -- gradient accumulation ------------------------------------------------------------------------
def weights_after(cfg: dict, accumulate: int, steps: int = 3) -> dict[str, torch.Tensor]:
    run = build_run(cfg)
    run.method.train()
    for step, batch in zip(range(steps), run.stream, strict=False):
        train_step(
            run.step_fn, run.method, batch, step, run.total_steps, run.optimizer, run.scheduler,
            amp=run.amp, scaler=run.scaler, accumulate=accumulate,
        )
    return {k: v.clone() for k, v in run.method.state_dict().items()}


@pytest.mark.parametrize("method", list(CASES))
def test_two_micro_batches_equal_one_batch_of_twice_the_size(method, tiny_fashion_mnist_dir):
    cfg = tiny(method, tiny_fashion_mnist_dir)
    whole = weights_after(cfg, accumulate=1)
    halves = weights_after(cfg, accumulate=2)
    assert whole.keys() == halves.keys()
    teacher_keys = [k for k in whole if k.startswith(("teacher.", "eval_ema."))]
    assert teacher_keys or method == "fixmatch"
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)
    # and the run really trained: the weights moved away from their initial values
    start = {k: v for k, v in build_run(cfg).method.state_dict().items()}
    assert any(not torch.equal(start[k], whole[k]) for k in whole if k.startswith("student."))


def test_moco_moves_its_teacher_and_enqueues_once_per_real_step(tiny_fashion_mnist_dir):
    cfg = tiny("moco", tiny_fashion_mnist_dir)
    run = build_run(cfg)
    updates = []
    original = run.method.teacher.update
    run.method.teacher.update = lambda *a, **k: (updates.append(1), original(*a, **k))[1]
    batch = next(iter(run.stream))
    train_step(run.step_fn, run.method, batch, 0, 10, run.optimizer, run.scheduler, accumulate=4)
    assert len(updates) == 1
    assert int(run.method.queue_ptr) == cfg["batch_size"]  # the keys of all 4 micro-batches


def test_accumulate_must_divide_the_batch(tiny_fashion_mnist_dir):
    with pytest.raises(UserError, match="batch_size 8 must be divisible by accumulate 3"):
        tiny("moco", tiny_fashion_mnist_dir, accumulate=3)
    with pytest.raises(UserError, match="accumulate must be a positive int"):
        tiny("moco", tiny_fashion_mnist_dir, accumulate=0.5)


# -- preemption ------------------------------------------------------------------------------------


def _stop_flag_rank(rank: int, port: int, results: dict) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from emanorm.train.preemption import StopSignals

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=HANG_BOUND_S))
    try:
        # a GPU run's device (never touched: the flag lives on the CPU, in a gloo group of its own)
        with StopSignals(torch.device("cuda", rank), distributed=True) as stop:
            quiet = stop.requested()
            if rank == 1:
                stop.received = "SIGTERM"
            results[rank] = (quiet, stop.requested(), stop.received, stop._group is not None)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed  # two spawned ranks: the slow layer
def test_ranks_agree_on_a_stop_through_a_cpu_group_when_training_on_gpus():
    """The stop flag of a GPU run is all-reduced on the CPU, so reading it never waits for a GPU
    (this machine has none: a flag on the device would fail here)."""
    from conftest import spawn_ranks

    results = spawn_ranks(_stop_flag_rank)
    assert results[0] == (False, True, "a stop signal on another rank", True)
    assert results[1] == (False, True, "SIGTERM", True)
def test_without_a_gloo_group_the_stop_flag_warns_once_and_goes_through_the_device(monkeypatch, caplog):
    """gloo may not reach the peers (a hostname on loopback): one warning naming GLOO_SOCKET_IFNAME,
    and the flag then travels through the device's own process group."""
    import torch.distributed as dist

    from emanorm.train.preemption import StopSignals

    def unreachable(**kwargs):
        assert kwargs["backend"] == "gloo" and kwargs["timeout"].total_seconds() == 300  # bounded
        raise RuntimeError("Connection refused\nat 127.0.1.1")

    monkeypatch.setattr(dist, "new_group", unreachable)
    monkeypatch.delenv("EMANORM_DIST_TIMEOUT", raising=False)
    with caplog.at_level("WARNING", logger="emanorm"), StopSignals(torch.device("cuda"), True) as stop:
        assert stop._group is None
    assert len(caplog.messages) == 1 and "Connection refused" in caplog.messages[0]
    assert "GLOO_SOCKET_IFNAME" in caplog.messages[0] and "127.0.1.1" not in caplog.messages[0]


def signal_at(monkeypatch: pytest.MonkeyPatch, at_step: int, signum: int) -> None:
    """Send ``signum`` to this process during step ``at_step`` (as a scheduler would)."""
    real_step = loop.train_step

    def step_and_signal(*args, **kwargs):
        if args[3] == at_step:
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_and_signal)


def teacher_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = ckpt.safe_load(run_dir)["method"]
    return {k: v for k, v in state.items() if k.startswith(("teacher.", "student."))}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "signum"), [("moco", signal.SIGTERM), ("fixmatch", signal.SIGUSR1)])
def test_a_signal_stops_with_a_checkpoint_and_resume_is_exact(method, signum, tiny_fashion_mnist_dir,
                                                              tmp_path, monkeypatch):
    """With --accumulate 2: the stop, the checkpoint and the resume fall on real-step boundaries."""
    straight = tmp_path / "straight"
    train(tiny(method, tiny_fashion_mnist_dir, straight, max_steps=5, accumulate=2), progress=False)

    stopped = tmp_path / "stopped"
    cfg = tiny(method, tiny_fashion_mnist_dir, stopped, max_steps=5, accumulate=2)
    with monkeypatch.context() as patch:
        signal_at(patch, 1, signum)
        with pytest.raises(Preempted, match=rf"stopped by {signal.Signals(signum).name} after step 2; "
                                            r"checkpoint kept at .*last.pt; continue with --resume"):
            train(dict(cfg), progress=False)
    assert signal.getsignal(signum) is signal.SIG_DFL  # handlers restored
    assert ckpt.safe_load(stopped)["global_step"] == 2 and not (stopped / "summary.json").exists()
    train(dict(cfg), resume="auto", progress=False)
    a, b = teacher_state(straight), teacher_state(stopped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_auto_starts_fresh_without_a_checkpoint(tiny_fashion_mnist_dir, tmp_path):
    out = tmp_path / "fresh"
    summary = train(tiny("moco", tiny_fashion_mnist_dir, out, max_steps=1), resume="auto", progress=False)
    assert summary["steps"] == 1 and (out / "summary.json").exists()


# With STEP_GATE set, every rank waits before step HOLD_AT_STEP (0-based) until that file exists: the
# test acts while the run is held at a known step, then opens the gate. The numbers are unchanged.
WORKER = """
import os, sys, time
from pathlib import Path
from emanorm.train import loop
real_step = loop.train_step
gate, hold_at = os.environ.get("STEP_GATE"), int(os.environ.get("HOLD_AT_STEP", "0"))
def gated_step(*args, **kwargs):
    if gate and args[3] >= hold_at:
        while not Path(gate).exists():
            time.sleep(0.05)
    return real_step(*args, **kwargs)
loop.train_step = gated_step
from emanorm.cli import main
sys.exit(main(sys.argv[1:]))
"""


# the tiny FixMatch run both two-rank tests launch
TWO_RANK_FIXMATCH = [
    "train", "--method", "fixmatch", "--labels-per-class", "4", "--batch-size", "16",
    "--unlabeled-ratio", "1", "--device", "cpu", "--no-progress", "--set", "eval_every=0",
]


def launch_two_ranks(
    script: Path, *args: str, dist_timeout_s: int, gate: Path | None = None, hold_at: int = 0
) -> subprocess.Popen:
    """``WORKER`` under torchrun with 2 ranks, in its own session (so killpg reaches every rank);
    with ``gate``, held before step ``hold_at`` until the file ``gate`` exists."""
    command, env = torchrun_command(2, str(script), *args, dist_timeout_s=dist_timeout_s)
    if gate is not None:
        env = {**env, "STEP_GATE": str(gate), "HOLD_AT_STEP": str(hold_at)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def assert_no_emanorm_frame(err: str) -> None:
    frames = [line for line in err.splitlines() if line.strip().startswith('File "')]
    assert not any("emanorm" in frame for frame in frames), err[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_sigterm_stops_two_ranks_at_one_step_and_resume_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    common = [
        *TWO_RANK_FIXMATCH, "--norm", "eman", "--max-steps", "12", "--set", "knn_bank_size=32",
        "--set", "monitor_test_size=32", "--set", "log_every=1",
    ]

    def launch(out: Path, *extra: str, gate: Path | None = None) -> subprocess.Popen:
        return launch_two_ranks(script, *common, "--out", str(out), *extra, dist_timeout_s=HANG_BOUND_S,
                                gate=gate, hold_at=2)

    straight = tmp_path / "straight"
    process = launch(straight)
    _, err = process.communicate(timeout=HANG_BOUND_S)
    assert process.returncode == 0, err[-3000:]

    stopped = tmp_path / "stopped"
    gate = tmp_path / "gate"
    process = launch(stopped, gate=gate)  # held before its third step
    try:
        metrics = stopped / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
                   "step 2 in metrics.jsonl", process=process)
        os.killpg(process.pid, signal.SIGTERM)  # the scheduler signals every process of the job
        gate.touch()
        _, err = process.communicate(timeout=HANG_BOUND_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    lines = [line for line in err.splitlines() if "stopped by" in line]
    assert len(lines) == 2, err[-3000:]  # one line per rank, both at the same step
    assert len({line.split("after step ")[1].split(";")[0] for line in lines}) == 1
    assert "exit status 75" in lines[0]
    # torchrun's agent prints its own SignalException; no frame of emanorm's is in any traceback
    assert_no_emanorm_frame(err)
    state = ckpt.safe_load(stopped)
    assert 0 < state["global_step"] < 12 and not (stopped / "summary.json").exists()

    process = launch(stopped, "--resume", "auto")
    _, err = process.communicate(timeout=HANG_BOUND_S)
    assert process.returncode == 0, err[-3000:]
    a, b = teacher_state(straight), teacher_state(stopped)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_a_killed_rank_is_one_line_on_the_survivor_naming_it(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    gate = tmp_path / "gate"
    process = launch_two_ranks(
        script, *TWO_RANK_FIXMATCH, "--max-steps", "400", "--checkpoint-every-steps", "2",
        "--out", str(out), dist_timeout_s=30, gate=gate, hold_at=2,  # held after the step-2 checkpoint
    )
    try:
        checkpoint = out / "checkpoints" / "last.pt"
        wait_until(checkpoint.exists, "the first checkpoint", process=process)
        workers = subprocess.run(["pgrep", "-f", f"worker.py train.*{out}"], capture_output=True,
                                 text=True).stdout.split()
        ranks = {}
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = int(pid)
        os.kill(ranks[1], signal.SIGKILL)
        gate.touch()  # rank 0 goes on and meets its dead peer
        _, err = process.communicate(timeout=HANG_BOUND_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    ours = [line for line in err.splitlines() if line.startswith("emanorm: error: lost")]
    assert ours and ours[0].startswith("emanorm: error: lost rank 1 of 2"), err[-3000:]
    assert "rerun with --resume" in ours[0]
    assert_no_emanorm_frame(err)


def test_cli_says_a_preempted_run_is_resumable_in_one_line(monkeypatch, capsys, tmp_path):
    from emanorm.cli import main

    def preempted(*_args, **_kwargs):
        raise Preempted("stopped by SIGTERM after step 3; checkpoint kept at x; continue with --resume")

    monkeypatch.setattr("emanorm.train.train", preempted)  # `emanorm train` imports it when it runs
    out = str(tmp_path / "run")
    assert main(["train", "--max-steps", "1", "--device", "cpu", "--out", out]) == RESUMABLE_EXIT == 75
    assert capsys.readouterr().err == (
        "emanorm: stopped by SIGTERM after step 3; checkpoint kept at x; continue with --resume\n"
    )


# -- trackers ----------------------------------------------------------------------------------------
def test_unknown_logger_and_missing_package_are_one_line(tiny_fashion_mnist_dir, monkeypatch):
    with pytest.raises(UserError, match="unknown logger 'comet'; allowed: jsonl, tensorboard, mlflow, wandb"):
        tiny("moco", tiny_fashion_mnist_dir, logger="jsonl,comet")
    from emanorm.train import tracking

    real = importlib.import_module

    def no_mlflow(name, *args):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real(name, *args)

    monkeypatch.setattr(tracking.importlib, "import_module", no_mlflow)
    with pytest.raises(UserError, match=r"pip install 'emanorm\[mlflow\]'"):
        tracking.optional_import("mlflow", "mlflow")


@pytest.mark.slow
def test_mlflow_file_store_holds_params_metrics_artifacts_and_resumes_into_one_run(
    tiny_fashion_mnist_dir, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for its default store
    out = tmp_path / "run"
    cfg = tiny("moco", tiny_fashion_mnist_dir, out, max_steps=4, logger="jsonl,mlflow")
    with monkeypatch.context() as patch:
        signal_at(patch, 1, signal.SIGTERM)
        with pytest.raises(Preempted):
            train(dict(cfg), progress=False)
    train(dict(cfg), resume=True, progress=False)

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("emanorm")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed run wrote into the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "moco" and run.data.params["method_args.queue_size"] == "64"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "config.yaml"} <= artifacts


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-ID.wandb`` file (a LevelDB-style log of 32 KiB
    blocks: each chunk a 7-byte header crc32/length/type, then the bytes)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos = path.read_bytes(), 32768, 7  # 7 bytes: ":W&B", magic, version
    assert raw.startswith(b":W&B")
    records, partial = [], b""
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:  # padding to the end of the block
            pos += room
            continue
        partial += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
            partial = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_config_metrics_and_summary(tiny_fashion_mnist_dir, tmp_path,
                                                                     monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    train(tiny("moco", tiny_fashion_mnist_dir, out, max_steps=3, logger="wandb"), progress=False)
    assert not (out / "tb").exists()  # tensorboard not listed: not written
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    ids = json.loads((out / "trackers.json").read_text())
    records: list = []
    def exited() -> bool:  # W&B's service process may still be writing the file when finish() returns
        nonlocal records
        records = read_wandb_records(run_dirs[0] / f"run-{ids['wandb']}.wandb")
        return any(r.WhichOneof("record_type") == "exit" for r in records)

    wait_until(exited, "W&B's exit record")
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[items["_step"]] = items
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [r["step"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"])
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
    assert config["method"] == "moco" and config["method_args"]["queue_size"] == 64
    files = run_dirs[0] / "files"
    assert (files / "summary.json").exists() and (files / "metrics.jsonl").exists()


# -- the recipe's Run as benchmarks and custom loops use it -----------------------------------------
@pytest.mark.parametrize("method", list(CASES))
def test_run_exposes_labeled_indices_images_per_step_and_endless_batches(method, tiny_fashion_mnist_dir):
    from emanorm.train.recipe import labeled_indices

    cfg = tiny(method, tiny_fashion_mnist_dir)
    run = build_run(cfg)
    assert torch.equal(run.labeled, labeled_indices(cfg, run.train_ds))
    if method == "fixmatch":  # 4 labels per class; 8 labeled + 2 x 8 unlabeled images a step
        assert len(run.labeled) == 40 and run.images_per_step == 24
    else:  # self-supervised: every image counts as labeled, 8 unlabeled images a step
        assert len(run.labeled) == 120 and run.images_per_step == 8
    batches = run.batches()
    for _ in range(run.steps_per_epoch):
        next(batches)
    after_epoch_0 = next(batches)  # the iterator moved on to epoch 1 by itself
    run.stream.set_epoch(1, 0)
    first_of_epoch_1 = next(iter(run.stream))
    assert after_epoch_0.keys() == first_of_epoch_1.keys()
    for key, value in first_of_epoch_1.items():
        assert torch.equal(after_epoch_0[key], value), key
