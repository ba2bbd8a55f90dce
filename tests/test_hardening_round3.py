"""Issue 30 (hardening, round three), the cases the catalogue (docs/failures.md) cannot hold as rows:
checkpoints of other writers, run files damaged in many ways, trackers, read-only directories."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from emanorm.cli import main
from emanorm.errors import UserError
from emanorm.train import checkpoint as ckpt
from emanorm.train import tracking
from emanorm.train.run_records import keep_metrics_until, read_tracker_ids
from failure_setups import DAMAGED_METRICS_LINES


def _flip(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_intact_ones_of_any_writer_load(tmp_path):
    state = {"w": torch.randn(64, 64), "step": 3}
    path = tmp_path / "a.pt"
    torch.save(state, path)
    assert torch.equal(ckpt.safe_load(path)["w"], state["w"])
    _flip(path)
    with pytest.raises(UserError, match=r"a\.pt is damaged \(not the file that was written\).*CRC"):
        ckpt.safe_load(path)
    # older files: the legacy pickle format carries no checksum, and neither does a zip written
    # with CRCs turned off: both still load
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(ckpt.safe_load(legacy)["w"], state["w"])
    unchecked = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, unchecked)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(ckpt.safe_load(unchecked)["w"], state["w"])


def test_a_damaged_zip_directory_is_refused_in_one_line(tmp_path):
    path = tmp_path / "a.pt"
    torch.save({"w": torch.randn(8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # the end of the central directory is gone
    with pytest.raises(UserError, match=r"a\.pt"):
        ckpt.safe_load(path)


@pytest.mark.parametrize("reader", ["--resume", "doctor", "--init-from", "export", "eval"])
def test_a_damaged_local_header_is_refused_by_every_reader_in_one_line(tmp_path, capsys, reader):
    # the name of torch's members is flagged UTF-8: flipped name bytes were a UnicodeDecodeError traceback
    from failure_setups import setup_header_damaged_unfinished_run, setup_trained_data

    run = setup_header_damaged_unfinished_run(tmp_path)
    checkpoint = run / "checkpoints" / "last.pt"
    before = _fingerprint(run)
    fast = ["--data-dir", str(setup_trained_data(tmp_path)), "--max-steps", "1", "--batch-size", "16",
            "--device", "cpu", "--no-progress"]
    argv = {"--resume": ["train", "--resume", "--out", str(run), *fast],
            "doctor": ["doctor", str(checkpoint)],
            "--init-from": ["train", "--init-from", str(run), "--out", str(tmp_path / "new"), *fast],
            "export": ["export", str(run)],
            "eval": ["eval", "knn", str(run), "--device", "cpu", "--no-progress"]}[reader]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    damaged = [line for line in err.splitlines() if "damaged" in line]
    assert len(damaged) == 1, err
    assert f"checkpoint {checkpoint} is damaged (not the file that was written): a member name in its zip " \
           "records is not UTF-8" in damaged[0]
    assert _fingerprint(run) == before and not (tmp_path / "new").exists()


def test_every_kind_of_damage_to_a_zip_directory_record_is_one_line(tmp_path):
    # each byte of the first central-directory record flipped in turn: whatever CPython's zipfile raises
    # for it (a name flagged UTF-8 that is not, a method or version it cannot read, "encrypted", a
    # method whose decompressor refuses the bytes, an offset past the file) is reported as damage
    path = tmp_path / "a.pt"
    torch.save({"w": torch.randn(4, 4), "step": 3}, path)
    intact = path.read_bytes()
    start = intact.find(b"PK\x01\x02")
    record_end = start + 46 + int.from_bytes(intact[start + 28:start + 30], "little")
    prefix = f"checkpoint {path} is damaged (not the file that was written): "
    details = set()
    for at in range(start, record_end):
        for flip in (0xFF, 0x01, 0x08):
            data = bytearray(intact)
            data[at] ^= flip
            path.write_bytes(bytes(data))
            try:
                ckpt.verify_checkpoint_integrity(path)
            except UserError as err:
                assert "\n" not in str(err), str(err)
                details.add(str(err).partition(prefix)[2])
    expected = ["a member name in its zip records is not UTF-8", "NotImplementedError: That compression",
                "NotImplementedError: zip file version", "RuntimeError: File <ZipInfo filename='a/data.pkl'",
                "zlib.error: Error -3 while decompressing", "member 'a/data.pkl' starts outside the file",
                "Bad CRC-32 for file 'a/data.pkl'", "File name in directory"]
    for start_of_detail in expected:
        assert any(d.startswith(start_of_detail) for d in details), (start_of_detail, details)
    assert "" not in details  # every refusal says the file is damaged


@pytest.mark.parametrize("damage", [b'{"step": 2, "lo', b"\xff\xfe\x00\n", b"[1, 2]\n", b'{"step": "3"}\n',
                                    b'"text"\n', b'{"step": true}\n'])
def test_damaged_metrics_keep_their_valid_records_up_to_the_resume_step(tmp_path, damage, caplog):
    path = tmp_path / "metrics.jsonl"
    good = [b'{"kind": "train", "step": 1, "loss": 2.0}', b'{"kind": "eval", "step": 2, "knn": 10.0}',
            b'{"kind": "train", "step": 3, "loss": 1.0}']
    path.write_bytes(good[0] + b"\n" + damage + b"\n" + good[1] + b"\n" + good[2] + b"\n")
    keep_metrics_until(path, 2)
    assert path.read_bytes() == good[0] + b"\n" + good[1] + b"\n"
    assert "dropped 1 damaged line(s) (the first is line 2); kept 2 valid records up to step 2" in caplog.text


# records of a step whose values cannot be drawn: read, and drawn without those values
ODD_RECORDS = (b'{"kind": "eval", "step": 2, "knn_bank": [1], "knn_k": "x", "knn": "high"}',
               b'{"kind": "train", "step": 2, "loss": 1' + b"0" * 400 + b"}")


@pytest.mark.parametrize("line", [*DAMAGED_METRICS_LINES, *ODD_RECORDS],
                         ids=["binary", "list", "string-step", "no-step", "odd-eval-values", "huge-integer"])
def test_damaged_metrics_are_skipped_by_curves_and_doctor(tmp_path, line, caplog):
    # run files are records: doctor and curves.png read past what they cannot use (was: tracebacks)
    from emanorm.train.curves import plot_run_curves, read_metrics

    path = tmp_path / "metrics.jsonl"
    good = [b'{"kind": "train", "step": 1, "loss": 2.0}',
            b'{"kind": "eval", "step": 1, "knn": 10.0, "knn_k": 20, "knn_bank": 100}',
            b'{"kind": "train", "step": 3, "loss": 1.0}']
    path.write_bytes(b"\n".join([good[0], line, *good[1:], b'{"step": 4, "lo']))
    kept = [good[0], line, *good[1:]] if line in ODD_RECORDS else good
    assert read_metrics(path) == [json.loads(record) for record in kept]
    damaged = 1 if line in ODD_RECORDS else 2  # the torn last line, and the damaged one
    assert f"metrics.jsonl: skipped {damaged} damaged line(s) (the first is line " in caplog.text
    assert plot_run_curves(path, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_doctor_of_a_run_with_damaged_metrics_reads_past_them(tmp_path, capsys, caplog):
    from failure_setups import setup_run_metrics_damaged

    run = setup_run_metrics_damaged(tmp_path)
    before = _fingerprint(run)
    assert main(["doctor", str(run)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "teacher check: no problems found" in captured.out
    skipped = f"{run}/metrics.jsonl: skipped 5 damaged line(s) (the first is line 2); read 2 records"
    assert skipped in caplog.text  # stderr when run as a command (catalogue row R3-3f)
    assert _fingerprint(run) == before


@pytest.mark.parametrize("content", [b"{bad", b"\xff", b"[1]", b'{"mlflow": 5}', b""])
def test_unreadable_tracker_ids_start_new_runs(tmp_path, content, caplog):
    path = tmp_path / "trackers.json"
    path.write_bytes(content)
    assert read_tracker_ids(path) == {}
    assert "the trackers start new runs" in caplog.text
    path.write_text('{"mlflow": "abc"}')
    assert read_tracker_ids(path) == {"mlflow": "abc"}


# -- trackers: every exception at start, log and finish is one UserError naming tracker and setting ------
class _Broken:
    def __init__(self, *args, **kwargs):
        raise ConnectionError("\x1b[31mserver said no\x1b[0m\nsecond line")


def test_a_tracker_that_fails_to_start_log_or_finish_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setattr(tracking, "MLflowTracker", _Broken)
    with pytest.raises(UserError) as caught:
        tracking.open_trackers("mlflow", tmp_path, {}, 0)
    assert str(caught.value) == ("--logger mlflow failed to start (MLFLOW_TRACKING_URI=http://127.0.0.1:1): "
                                 "ConnectionError: server said no")

    class Flaky:
        def log(self, scalars, step):
            raise RuntimeError("HTTP 503")

        def finish(self, artifacts, status):
            raise ValueError("bad artifact")

    guarded = tracking.GuardedTracker("wandb", "WANDB_MODE=online, WANDB_PROJECT=p", Flaky())
    with pytest.raises(UserError, match=r"^--logger wandb failed to log step 7 \(WANDB_MODE=online, "
                                        r"WANDB_PROJECT=p\): RuntimeError: HTTP 503$"):
        guarded.log({"train/loss": 1.0}, 7)
    with pytest.raises(UserError, match=r"failed to finish its run .*ValueError: bad artifact"):
        guarded.finish([], "finished")


def test_a_read_only_mlflow_store_is_refused_before_training(tmp_path, monkeypatch):
    # root ignores file modes, so the store's folder is reported read-only by os.access
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    real_access = os.access
    def access(path, mode):
        return False if Path(path) == store else real_access(path, mode)

    monkeypatch.setattr(tracking.os, "access", access)
    with pytest.raises(UserError, match=rf"MLFLOW_TRACKING_URI={store.as_uri()}: {store} is not writable"):
        tracking.check_trackers("jsonl,mlflow")
    monkeypatch.setattr(tracking.os, "access", real_access)
    tracking.check_trackers("jsonl,mlflow")  # writable: accepted


@pytest.mark.parametrize("stale_id", ["0123456789abcdef0123456789abcdef", "not-a-run-id/../x", "a\nb"],
                         ids=["missing", "invalid", "two-lines"])
def test_an_mlflow_run_missing_from_the_store_starts_a_new_run(tmp_path, monkeypatch, caplog, stale_id):
    # an id the store calls invalid (MLflow: INVALID_PARAMETER_VALUE) blocked the resume until edited
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "trackers.json").write_text(json.dumps({"mlflow": stale_id}))
    trackers = tracking.open_trackers("mlflow", tmp_path, {"lr": 0.1}, resume_step=3)
    warnings = [r.getMessage() for r in caplog.records if "starting a new run" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], caplog.text
    assert f"named in {tmp_path / 'trackers.json'} is not in the file store" in warnings[0]
    new_id = trackers[0].tracker.run_id
    assert new_id != stale_id
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"mlflow": new_id}
    trackers[0].finish([], "finished")


# -- read-only run directories: root ignores file modes, so the refusal of the file system is simulated
# in-process (os.open / tempfile raise EROFS, as a read-only mount does; checked by hand on a real
# read-only bind mount too) ---------------------------------------------------------------------------
def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_only_lock(monkeypatch):
    from emanorm.train import lock

    real_open = os.open

    def refusing_open(path, flags, *args):
        if str(path).endswith(lock.LOCK_NAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock.os, "open", refusing_open)


@pytest.mark.parametrize("flags", [["--resume"], ["--resume", "auto"], ["--force"]])
def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch, capsys, flags):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method: fixmatch\n")
    (run / "checkpoints" / "last.pt").write_text("weights")
    before = _fingerprint(run)
    _read_only_lock(monkeypatch)
    code = main(["train", *flags, "--out", str(run), "--max-steps", "1", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"cannot write to {run}: Read-only file system (its lock file .lock cannot be created)" in err
    assert _fingerprint(run) == before


@pytest.mark.parametrize("exists", [True, False])
def test_compare_out_read_only_is_one_line_before_anything_trains(tmp_path, monkeypatch, capsys, exists):
    from emanorm.train import lock

    out = tmp_path / "grid"
    if exists:
        out.mkdir()

    def refusing_temporary(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(lock.tempfile, "TemporaryFile", refusing_temporary)
    code = main(["compare", "--methods", "fixmatch", "--norms", "eman", "--seeds", "1", "--max-steps", "1",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    where = out if exists else tmp_path
    assert code == 2 and f"--out {out} is not writable: {where}: Read-only file system" in err
    assert not (out / "logs").exists() and out.exists() == exists


def test_the_first_checkpoint_on_a_full_disk_says_none_was_written(tmp_path, monkeypatch):
    from emanorm.train.loop import write_checkpoint

    def short_write(obj, handle, *args, **kwargs):  # what torch's zip writer says on a full tmpfs
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", short_write)
    path = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(UserError) as caught:
        write_checkpoint({"step": torch.tensor(1)}, path)
    assert str(caught.value) == (f"could not write checkpoint {path}: no space left on device; "
                                 "no checkpoint had been written yet")
    assert not path.exists()


def test_checkpoint_paths_that_are_not_files_are_named(tmp_path):
    folder = tmp_path / "last.pt"
    folder.mkdir()
    with pytest.raises(UserError, match=r"last\.pt is a directory, not a checkpoint file \(nor a run"):
        ckpt.safe_load(folder)
    run = tmp_path / "run"
    (run / "checkpoints" / "last.pt").mkdir(parents=True)
    with pytest.raises(UserError, match=r"run/checkpoints/last\.pt is a directory, not a checkpoint file$"):
        ckpt.safe_load(run)
    with pytest.raises(UserError, match="/dev/null is a character device, not a checkpoint file"):
        ckpt.safe_load("/dev/null")
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"pipe\.pt is a FIFO \(named pipe\), not a checkpoint file"):
        ckpt.safe_load(fifo)


def test_a_refused_pickled_global_is_named_without_torch_advice(tmp_path):
    import datetime

    path = tmp_path / "odd.pt"
    torch.save({"when": datetime.datetime(2020, 1, 1)}, path)
    with pytest.raises(UserError) as caught:
        ckpt.safe_load(path)
    message = str(caught.value)
    assert "(the global datetime.datetime)" in message
    assert "\x1b[" not in message and "two options" not in message and "\n" not in message


def test_label_index_csv_that_is_a_folder_a_fifo_or_has_two_index_columns(tmp_path):
    from emanorm.data.splits import read_split_csv

    with pytest.raises(UserError, match=r"split CSV .* is a directory; give a CSV file"):
        read_split_csv(tmp_path)
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"is not a regular file \(a FIFO, device or socket\)"):
        read_split_csv(fifo)
    twice = tmp_path / "twice.csv"
    twice.write_text("Index,Index\n1,2\n")
    with pytest.raises(UserError, match="2 columns named 'Index'; keep one"):
        read_split_csv(twice)


def test_an_output_on_a_full_disk_leaves_no_empty_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(OSError):
        ckpt.atomic_write_text(tmp_path / "knn.json", "{}\n")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "knn.json").write_text("old\n")
    with pytest.raises(OSError):
        ckpt.atomic_write_text(tmp_path / "knn.json", "{}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]
    assert (tmp_path / "knn.json").read_text() == "old\n"


def test_an_undecodable_image_is_named_by_its_path_not_a_buffer():
    from emanorm.data.datasets import open_image_file

    with pytest.raises(UserError) as caught:
        open_image_file("/data/cat.jpg", data=bytearray(b"not an image" * 8))
    assert str(caught.value) == "cannot decode image file /data/cat.jpg: cannot identify image file"
