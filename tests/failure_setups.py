"""What the rows of docs/failures.md run against: one ``setup_<name>(tmp)`` per ``{name}`` placeholder.

Each setup builds its files under ``tmp`` (the row's own empty directory, also ``{tmp}`` in the
row) and returns the path that replaces ``{name}``. Setups of one row share ``tmp``. Add a function
here to add a placeholder; tests/test_failures_catalogue.py refuses a row naming an unknown one.
The hostile files are also used by the class tests in tests/test_data_hardening.py.
"""

from __future__ import annotations

import atexit
import gzip
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from conftest import HANG_BOUND_S, write_cifar, write_fashion_mnist, write_stl10

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
MARKER = "code-ran"  # a hostile pickle creates this file next to its data dir when its code runs


# -- hostile pickles -------------------------------------------------------------------------------


class _Call:
    """Pickles as ``func(*args)``: what ``__reduce__`` lets any pickle do when it loads."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def code_pickles(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict[str, bytes]:
    """Pickles that run code when loaded, each creating ``marker`` if it ever runs.

    ``quiet_eval`` evaluates to a valid CIFAR batch, so a loader that runs it trains on normally.
    """
    import builtins
    import os
    import subprocess

    data = np.zeros((2, 3072), dtype=np.uint8)
    quiet = (f"__import__('pathlib').Path({str(marker)!r}).touch() or "
             f"{{'data': __import__('numpy').zeros((20, 3072), 'uint8'), 'labels': [0, 1] * 10}}")
    calls = {
        "os_system": _Call(os.system, f"touch '{marker}'"),
        "quiet_eval": _Call(builtins.eval, quiet),
        "exec": _Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": _Call(subprocess.call, ["touch", str(marker)]),
        # the code hidden inside an otherwise valid batch dict
        "nested_in_dict": {"data": data, "labels": [0, 1],
                           "batch_label": _Call(os.system, f"touch '{marker}'")},
        "import_getattr": _Call(getattr, _Call(builtins.__import__, "os"), "system"),
    }
    return {name: pickle.dumps(obj, protocol=protocol) for name, obj in calls.items()}


def python2_style_pickle(entry: dict) -> bytes:
    """``entry`` pickled as the official CIFAR archive is: protocol 2 naming ``numpy.core.multiarray``."""
    raw = pickle.dumps(entry, protocol=2)
    return raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar_with_batch(root: Path, content: bytes, name: str = "data_batch_1") -> Path:
    """A CIFAR-10 stand-in whose ``name`` file holds ``content``."""
    write_cifar(root, "cifar10")
    (root / "cifar-10-batches-py" / name).write_bytes(content)
    return root


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def flipped(data: bytes, at: float = 0.5) -> bytes:
    """``data`` with a run of bytes in the middle overwritten (a corrupt copy)."""
    i = int(len(data) * at)
    return data[:i] + bytes(b ^ 0x5A for b in data[i:i + 64]) + data[i + 64:]


# -- setups: one per placeholder -------------------------------------------------------------------


def setup_cifar_pickle_runs_code(tmp: Path) -> Path:
    """CIFAR-10 whose data_batch_1 runs ``os.system`` when unpickled (H-1)."""
    return write_cifar_with_batch(tmp / "cifar", code_pickles(tmp / MARKER)["os_system"])


def setup_cifar_pickle_quiet_code(tmp: Path) -> Path:
    """CIFAR-10 whose data_batch_1 runs code and then yields a valid batch (H-1, the quiet kind)."""
    return write_cifar_with_batch(tmp / "cifar", code_pickles(tmp / MARKER)["quiet_eval"])


def setup_cifar_truncated_batch(tmp: Path) -> Path:
    root = write_cifar(tmp / "cifar", "cifar10")
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(truncated(batch.read_bytes()))
    return root


def setup_cifar100_code_test_file(tmp: Path) -> Path:
    """CIFAR-100 whose ``test`` file runs code (the held-out split, read for evaluation)."""
    root = write_cifar(tmp / "cifar100", "cifar100", per_file=4, n_test=20)
    (root / "cifar-100-python" / "test").write_bytes(code_pickles(tmp / MARKER)["exec"])
    return root


def setup_empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def setup_fashion_incomplete(tmp: Path) -> Path:
    """A Fashion-MNIST copy without its test images (M-1: refused, not replaced by the system copy)."""
    root = write_fashion_mnist(tmp / "fashion", n_train=40, n_test=20)
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    return root


def setup_fashion_tiny(tmp: Path) -> Path:
    return write_fashion_mnist(tmp / "fashion")


def setup_fashion_truncated_gz(tmp: Path) -> Path:
    root = write_fashion_mnist(tmp / "fashion", n_train=40, n_test=20)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(truncated(path.read_bytes()))
    return root


def setup_fashion_corrupt_gz(tmp: Path) -> Path:
    root = write_fashion_mnist(tmp / "fashion", n_train=40, n_test=20)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(flipped(path.read_bytes()))
    return root


def setup_stl10_empty_file(tmp: Path) -> Path:
    root = write_stl10(tmp / "stl10", n_train=10, n_test=10, n_unlabeled=10)
    (root / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"")
    return root


def _index_csv(tmp: Path, content: bytes) -> Path:
    path = tmp / "labels.csv"
    path.write_bytes(content)
    return path


def setup_index_csv_huge(tmp: Path) -> Path:
    """An Index beyond 64 bits (L-10: was "Overflow when unpacking long long" without the file)."""
    return _index_csv(tmp, b"Index\n3\n" + b"9" * 30 + b"\n")


def setup_index_csv_binary(tmp: Path) -> Path:
    return _index_csv(tmp, b"Index\n3\n\xff\xfe\x00\x01\n")


def setup_index_csv_nul(tmp: Path) -> Path:
    return _index_csv(tmp, b"Index\n3\x00\n4\n")


def setup_config_not_text(tmp: Path) -> Path:
    path = tmp / "config.yaml"
    path.write_bytes(gzip.compress(b"method: fixmatch\n"))
    return path


def setup_results_not_text(tmp: Path) -> Path:
    path = tmp / "results.json"
    path.write_bytes(b"\x80\x04" + pickle.dumps({"runs": []}))
    return path


def setup_results_nested(tmp: Path) -> Path:
    path = tmp / "results.json"
    path.write_bytes(b"[" * 100_000)
    return path


def setup_voc_entity_bomb(tmp: Path) -> Path:
    """A VOC2007 tree (every split from Annotations) whose one annotation is a "billion laughs"."""
    from conftest import class_images, write_image

    voc = tmp / "VOC2007"
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (voc / "Annotations").mkdir()
    for split in ("train", "val", "trainval", "test"):
        (main / f"{split}.txt").write_text("000001\n")
    write_image(voc / "JPEGImages" / "000001.jpg", class_images(np.zeros(1, int), 3, 32, 32)[0])
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    (voc / "Annotations" / "000001.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l0 "lol">{entities}]>'
        "<annotation><object><name>&l9;</name></object></annotation>")
    return tmp


_TRAINED: list[Path] = []


def setup_trained_run(tmp: Path) -> Path:
    """A copy of a finished 1-step FixMatch run on a tiny Fashion-MNIST (trained once per session)."""
    return Path(shutil.copytree(_trained(), tmp / "run"))


def _trained() -> Path:
    if not _TRAINED:
        cache = Path(tempfile.mkdtemp(prefix="emanorm-catalogue-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        data = write_fashion_mnist(cache / "fashion")
        command = [sys.executable, "-m", "emanorm", "train", "--data-dir", str(data),
                   "--out", str(cache / "run"), "--max-steps", "1", "--batch-size", "16", "--device", "cpu",
                   "--no-progress"]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=HANG_BOUND_S)
        _TRAINED.append(cache / "run")
    return _TRAINED[0]


# -- trainer, checkpoints and outputs (issue 15: H-3, M-7, M-8, M-10, M-11, M-12, L-8, L-10) ------------
def setup_finished_run(tmp: Path) -> Path:
    """A run directory a user has: config, metrics, summary and a checkpoint (their bytes only)."""
    run = tmp / "mine"
    (run / "checkpoints").mkdir(parents=True)
    for name, text in (("config.yaml", "method: fixmatch\n"), ("metrics.jsonl", '{"step": 1}\n'),
                       ("summary.json", "{}\n"), ("checkpoints/last.pt", "weights")):
        (run / name).write_text(text)
    return run


def _trained_checkpoint(tmp: Path, edit) -> Path:
    import torch  # the checkpoint rows need it; the data rows do not

    run = setup_trained_run(tmp)
    path = run / "checkpoints" / "last.pt"
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, path)
    return run


def setup_nonfinite_run(tmp: Path) -> Path:
    """A trained run whose checkpoint holds an inf BN statistic (written by some other tool)."""
    def poison(data: dict) -> None:
        key = next(k for k in data["method"] if k.endswith("running_var"))
        data["method"][key].fill_(float("inf"))
    return _trained_checkpoint(tmp, poison)


def setup_checkpoint_method_5(tmp: Path) -> Path:
    return _trained_checkpoint(tmp, lambda data: data["config"].update(method=5))


def setup_checkpoint_info_list(tmp: Path) -> Path:
    return _trained_checkpoint(tmp, lambda data: data.update(dataset_info=[1, 2, 3]))


def setup_checkpoint_huge_classes(tmp: Path) -> Path:
    return _trained_checkpoint(tmp, lambda data: data["dataset_info"].update(num_classes=300_000_000))


def setup_text_checkpoint(tmp: Path) -> Path:
    path = tmp / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n")
    return path


def setup_random_checkpoint(tmp: Path) -> Path:
    path = tmp / "random.pt"
    path.write_bytes(bytes(range(7, 256)) * 4)
    return path


def setup_a_dir(tmp: Path) -> Path:
    folder = tmp / "adir"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


def setup_a_file(tmp: Path) -> Path:
    path = tmp / "afile.txt"
    path.write_text("mine")
    return path


def setup_trained_data(tmp: Path) -> Path:
    """The tiny Fashion-MNIST the shared trained run was trained on."""
    return _trained().parent / "fashion"


def setup_unfinished_run_without_config(tmp: Path) -> Path:
    """A trained run whose summary.json and config.yaml were deleted: only its checkpoint is left."""
    run = setup_trained_run(tmp)
    (run / "summary.json").unlink()
    (run / "config.yaml").unlink()
    return run



# -- issue 30: doctor, checkpoint digests, run files, trackers, merges --------------------------------
def _timm_style(tmp: Path, edit) -> Path:
    """A timm ModelEma-style checkpoint (state_dict / state_dict_ema), after edit(student, teacher)."""
    import torch

    student = {"conv.weight": torch.linspace(-1, 1, 24).reshape(3, 2, 2, 2), "bn.running_mean": torch.ones(3),
               "bn.running_var": torch.full((3,), 2.0), "bn.num_batches_tracked": torch.tensor(5)}
    teacher = {k: v.clone() if not v.is_floating_point() else v * 0.99 for k, v in student.items()}
    edit(student, teacher)
    path = tmp / "timm.pth"
    torch.save({"state_dict": student, "state_dict_ema": teacher}, path)
    return path


def setup_timm_nan_teacher(tmp: Path) -> Path:
    """A teacher that is all NaN (was: "no problems found", lag nan, exit 0)."""
    return _timm_style(tmp, lambda s, t: [v.fill_(float("nan")) for v in t.values() if v.is_floating_point()])


def setup_timm_inf_teacher(tmp: Path) -> Path:
    return _timm_style(tmp, lambda s, t: t["conv.weight"].fill_(float("inf")))


def setup_timm_integer_only(tmp: Path) -> Path:
    """Student and teacher hold integer tensors only (was: "no problems found ... 0 tensors compared")."""
    def keep_integers(s: dict, t: dict) -> None:
        for state in (s, t):
            for key in [k for k, v in state.items() if v.is_floating_point()]:
                state[key] = state[key].long()
    return _timm_style(tmp, keep_integers)


def setup_timm_complex_only(tmp: Path) -> Path:
    """Student and teacher hold complex tensors only (was: "no problems found ... 0 tensors compared")."""
    import torch

    def keep_complex(s: dict, t: dict) -> None:
        for state in (s, t):
            for key in list(state):
                if state[key].is_floating_point():
                    state[key] = torch.complex(state[key], state[key] / 2)
                else:
                    del state[key]
    return _timm_style(tmp, keep_complex)


def setup_timm_far_teacher(tmp: Path) -> Path:
    """A teacher 1000 times the student: a lag no EMA produces."""
    return _timm_style(tmp, lambda s, t: t["conv.weight"].mul_(1000))



def _damaged_copy(tmp: Path, count: int = 2000) -> Path:
    """A copy of the shared trained run whose checkpoint has ``count`` bytes flipped in the middle."""
    run = setup_trained_run(tmp)
    path = run / "checkpoints" / "last.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return run


def setup_damaged_run(tmp: Path) -> Path:
    """A trained run whose last.pt has 2,000 flipped bytes in the middle (was: accepted)."""
    return _damaged_copy(tmp)


def setup_damaged_unfinished_run(tmp: Path) -> Path:
    """The damaged run without its summary.json: ``--resume`` has to read the checkpoint."""
    run = _damaged_copy(tmp)
    (run / "summary.json").unlink()
    return run


def setup_damaged_checkpoint(tmp: Path) -> Path:
    return _damaged_copy(tmp) / "checkpoints" / "last.pt"


def damage_a_local_header(path: Path, count: int = 2000) -> None:
    """Flip ``count`` bytes of ``path`` from its largest zip member's local header + 22 on: the sizes,
    the name and what follows (was: a UnicodeDecodeError traceback, the name being flagged UTF-8)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    for i in range(member.header_offset + 22, min(len(data), member.header_offset + 22 + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def setup_header_damaged_run(tmp: Path) -> Path:
    """A trained run whose last.pt has a damaged local header (see ``damage_a_local_header``)."""
    run = setup_trained_run(tmp)
    damage_a_local_header(run / "checkpoints" / "last.pt")
    return run


def setup_header_damaged_unfinished_run(tmp: Path) -> Path:
    """That run without its summary.json: ``--resume`` has to read the checkpoint."""
    run = setup_header_damaged_run(tmp)
    (run / "summary.json").unlink()
    return run


def setup_header_damaged_checkpoint(tmp: Path) -> Path:
    return setup_header_damaged_run(tmp) / "checkpoints" / "last.pt"



def _unfinished_run_with_metrics(tmp: Path, content: bytes) -> Path:
    """The shared trained run without summary.json (so ``--resume`` resumes it) and this metrics.jsonl."""
    run = setup_trained_run(tmp)
    (run / "summary.json").unlink()
    (run / "metrics.jsonl").write_bytes(content)
    return run


_GOOD_RECORD = b'{"kind": "train", "step": 1, "epoch": 0, "loss": 1.5}\n'


def setup_metrics_torn(tmp: Path) -> Path:
    """metrics.jsonl whose last line was cut mid-write (was: JSONDecodeError on --resume)."""
    return _unfinished_run_with_metrics(tmp, _GOOD_RECORD + b'{"kind": "train", "st')


def setup_metrics_binary(tmp: Path) -> Path:
    return _unfinished_run_with_metrics(tmp, _GOOD_RECORD + b"\xff\xfe\x00garbage\n")


def setup_metrics_list(tmp: Path) -> Path:
    return _unfinished_run_with_metrics(tmp, _GOOD_RECORD + b"[1, 2, 3]\n")


def setup_metrics_string_step(tmp: Path) -> Path:
    return _unfinished_run_with_metrics(tmp, _GOOD_RECORD + b'{"step": "one"}\n')


#: What a damaged metrics.jsonl may hold besides its records: binary bytes, a JSON list, a string step,
#: a record without a step; the torn last line of a killed write is added after the records.
DAMAGED_METRICS_LINES = (b"\xff\xfe\x00", b"[1, 2]", b'{"kind": "train", "step": "3", "loss": 1.0}',
                         b'{"kind": "train", "loss": 1.0}')


def setup_run_metrics_damaged(tmp: Path) -> Path:
    """A finished run whose metrics.jsonl holds every kind of damaged line between and after its two
    records (was: ``doctor RUN`` gave a UnicodeDecodeError or ValueError traceback)."""
    run = setup_trained_run(tmp)
    first, *rest = [line for line in (run / "metrics.jsonl").read_bytes().split(b"\n") if line]
    torn = b'{"step": 2, "lo'
    (run / "metrics.jsonl").write_bytes(b"\n".join([first, *DAMAGED_METRICS_LINES, *rest, torn]))
    return run


def setup_trackers_json_damaged(tmp: Path) -> Path:
    """An unfinished run whose trackers.json is ``{bad`` (was: a traceback)."""
    run = _unfinished_run_with_metrics(tmp, _GOOD_RECORD)
    (run / "trackers.json").write_text("{bad")
    return run



def setup_closed_port(tmp: Path) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released): an unreachable server
    that answers at once, so no row ever waits on or contacts the network."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_unfinished_run(tmp: Path) -> Path:
    """The shared trained run without its summary.json: ``--resume`` continues it."""
    run = setup_trained_run(tmp)
    (run / "summary.json").unlink()
    return run



def _merge_file(tmp: Path, name: str, **changes) -> Path:
    """A results.json of ``compare`` holding one finished run, with ``changes`` to its entry (raw JSON text
    values allowed through ``json.dumps``: NaN and Infinity are what Python's json writes)."""
    import json

    entry = {"name": "fixmatch-eman-s0", "status": "ok", "variant": "eman", "method": "fixmatch", "seed": 0,
             "norm": "eman", "primary": 50.0, "metrics": {"test_acc": 50.0, "knn": 45.0},
             "curve": [[1, 40.0], [2, 45.0]], "wall_clock_s": 12.0, **changes}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"which": "teacher", "runs": [entry]}))
    return path


def setup_merge_bad_curve(tmp: Path) -> Path:
    """A malformed curve (was: a crash after results.json and results.md were written)."""
    return _merge_file(tmp, "bad_curve", curve=[["a"], 3])


def setup_merge_metrics_list(tmp: Path) -> Path:
    """``"metrics": [1, 2]`` (was: AttributeError, an empty grid folder left)."""
    return _merge_file(tmp, "metrics_list", metrics=[1, 2])


def setup_merge_score_12345(tmp: Path) -> Path:
    return _merge_file(tmp, "score_12345", primary=12345, metrics={"test_acc": 12345})


def setup_merge_score_negative(tmp: Path) -> Path:
    return _merge_file(tmp, "score_negative", primary=-50.0, metrics={"test_acc": -50.0})


def setup_merge_score_nan(tmp: Path) -> Path:
    """NaN (was: shown as "–" but counted as merged)."""
    return _merge_file(tmp, "score_nan", primary=float("nan"), metrics={"test_acc": float("nan")})


def setup_merge_knn_inf(tmp: Path) -> Path:
    return _merge_file(tmp, "knn_inf", metrics={"test_acc": 50.0, "knn": float("inf")})



def setup_checkpoint_dir(tmp: Path) -> Path:
    """A directory named last.pt (was: ".../last.pt/checkpoints/last.pt" not found)."""
    folder = tmp / "last.pt"
    folder.mkdir()
    return folder


def setup_index_csv_two_index_columns(tmp: Path) -> Path:
    """Header ``Index,Index`` (was: the second column used silently)."""
    return _index_csv(tmp, b"Index,Index\n0,1\n2,3\n")


def setup_index_csv_fifo(tmp: Path) -> Path:
    """A FIFO as the label CSV (was: "not found"; reading it would block)."""
    path = tmp / "labels.csv"
    os.mkfifo(path)
    return path


def setup_checkpoint_with_global(tmp: Path) -> Path:
    """A checkpoint holding a pickled ``datetime`` (was: torch's advice with colour codes quoted)."""
    import datetime

    import torch

    path = tmp / "odd.pt"
    torch.save({"when": datetime.datetime(2020, 1, 1)}, path)
    return path


SETUPS = {name[len("setup_"):]: fn for name, fn in list(globals().items()) if name.startswith("setup_")}
