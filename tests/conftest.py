"""Shared fixtures: tiny stand-in datasets in every on-disk layout emanorm.data reads.

Each ``*_dir`` fixture is session-scoped and returns the ``data_dir`` to pass to
``emanorm.data.load_dataset``. Image content encodes the label so tests can check the pairing:
class ``k`` images are brightest in channel ``k % 3`` (RGB layouts) or have mean ~ 20 * k (grey).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emanorm.data.datasets import FASHION_MNIST_SYSTEM_DIR

# Tests run tiny models, where a second thread costs more than it gives (and on a shared 2-core
# machine oversubscribes it); subprocesses started by tests inherit the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every ``distributed`` test (torchrun or spawned ranks) belongs to the slow layer."""
    for item in items:
        if item.get_closest_marker("distributed") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def torchrun_command(nproc: int, *target: str, dist_timeout_s: float) -> tuple[list[str], dict[str, str]]:
    """``python -m torch.distributed.run`` with ``nproc`` CPU ranks on this machine, one thread each.

    ``target`` is what torchrun starts (a script and its arguments, or ``-m emanorm ...``). The
    ranks give up on a dead peer after ``dist_timeout_s`` (emanorm's ``EMANORM_DIST_TIMEOUT``), so
    a fault test fails in bounded time instead of hanging. Returns ``(command, env)``.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMANORM_DIST_TIMEOUT": str(dist_timeout_s)}
    return [*command, *target], env


def run_two_rank_script(tmp_path: Path, source: str, *, dist_timeout_s: float, timeout: float) -> Path:
    """``source`` written as a script and run on 2 torchrun ranks with ``(output file, tests dir)``
    as its arguments; asserts it succeeded and returns the output file the script wrote."""
    import subprocess

    script, out = tmp_path / "worker.py", tmp_path / "out.pt"
    script.write_text(source)
    command, env = torchrun_command(2, str(script), str(out), str(Path(__file__).parent),
                                    dist_timeout_s=dist_timeout_s)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    # torchrun's summary fills the tail: put each rank's own error lines (a traceback's last line, a C++
    # abort's what()) first
    errors = [line for line in result.stderr.splitlines()
              if re.search(r"Error|Exception|terminate called|what\(\)|[Tt]imed? ?out", line)
              and "Warning" not in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + result.stderr[-3000:]
    return out


def spawn_ranks(worker, *leading, nprocs: int = 2) -> dict:
    """``worker(rank, *leading, port, results)`` in ``nprocs`` spawned processes (for a gloo group
    on a free local port); returns a copy of ``results``, the dict the ranks filled."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(*leading, port, results), nprocs=nprocs, join=True)
    return dict(results)


#: How long a test waits for something that must happen (a process reaching a point, a file
#: appearing) before calling it a hang. Generous on purpose: no test depends on the machine's speed.
HANG_BOUND_S = 900.0


def wait_until(condition, what: str, *, bound_s: float = HANG_BOUND_S, process=None) -> None:
    """Poll ``condition()`` until it is true. Fails if ``process`` ends first, or after ``bound_s``
    (a hang, not a slow machine)."""
    import time

    deadline = time.monotonic() + bound_s
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {bound_s:.0f} s, a hang")
        time.sleep(0.05)


def signal_when_ready(command: list[str], env: dict[str, str], ready: Path, what: str,
                      signum: int) -> tuple[int, str]:
    """Start ``command``, wait until ``ready`` exists, send it ``signum``; ``(exit status, stderr)``.

    The child gets the signal's default disposition first: a shell without job control starts
    background jobs with SIGINT ignored, a child inherits that, and Python then installs no
    KeyboardInterrupt handler. The child is killed if it is still running at the end.
    """
    import signal
    import subprocess

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    try:
        wait_until(ready.exists, what, process=process)
        process.send_signal(signum)
        _, err = process.communicate(timeout=HANG_BOUND_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


# -- writers (plain functions, usable from any test) ------------------------------------------------


def class_images(labels: np.ndarray, channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, C, H, W) noise: channel ``label % 3`` bright (C=3), or level rising with the label (C=1)."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 60, size=(len(labels), channels, height, width)).astype(np.uint8)
    for i, y in enumerate(labels):
        if channels == 3:
            x[i, y % 3] += 180
        else:
            x[i] += np.uint8(min(20 * y, 190))
    return x


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 ``array`` as a gzipped IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(root: Path, n_train: int = 120, n_test: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", class_images(labels, 1, 28, 28, seed)[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar(root: Path, name: str = "cifar10", per_file: int = 20, n_test: int = 30) -> Path:
    """Pickle layout: cifar-10-batches-py/{data_batch_1..5,test_batch} or cifar-100-python/{train,test}."""
    classes = 10 if name == "cifar10" else 100
    sub = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    sub.mkdir(parents=True, exist_ok=True)
    files = ([(f"data_batch_{i}", per_file) for i in range(1, 6)] if name == "cifar10"
             else [("train", 5 * per_file)]) + [("test_batch" if name == "cifar10" else "test", n_test)]
    offset = 0
    for fname, n in files:
        labels = (np.arange(offset, offset + n) % classes).astype(np.int64)
        data = class_images(labels, 3, 32, 32, seed=offset).reshape(n, -1)
        entry = {"data": data, ("labels" if name == "cifar10" else "fine_labels"): labels.tolist()}
        if name == "cifar100":
            entry["coarse_labels"] = (labels // 5).tolist()
        with open(sub / fname, "wb") as f:
            pickle.dump(entry, f)
        offset += n
    return root


def write_stl10(root: Path, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 30) -> Path:
    """Binary layout: stl10_binary/{train,test,unlabeled}_X.bin (planes column-major), *_y.bin (1..10)."""
    sub = root / "stl10_binary"
    sub.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4), ("unlabeled", n_unlabeled, 5)):
        labels = np.arange(n) % 10
        images = class_images(labels, 3, 96, 96, seed)
        images[:, :, 0, :] = 255  # a bright top row: a wrong H/W transpose would show as a bright left column
        images.transpose(0, 1, 3, 2).tofile(sub / f"{split}_X.bin")
        if split != "unlabeled":
            (labels + 1).astype(np.uint8).tofile(sub / f"{split}_y.bin")
    return root


def write_image(path: Path, array: np.ndarray) -> None:
    """Save uint8 (C, H, W) as PNG/JPEG/BMP by the file suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    img.save(path, quality=95) if path.suffix in (".jpg", ".jpeg") else img.save(path)


_SIZES = ((40, 30), (30, 52), (64, 64), (24, 36))


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), n_train: int = 6,
                       n_val: int = 2, val_name: str = "val") -> Path:
    """root/train/<class>/*.{png,jpg} and root/<val_name>/<class>/*: varied sizes and formats."""
    for split, n in (("train", n_train), (val_name, n_val)):
        for k, cls in enumerate(classes):
            imgs = class_images(np.full(n, k), 3, 64, 64, seed=k)
            for i in range(n):
                h, w = _SIZES[i % len(_SIZES)]
                suffix = (".png", ".jpg", ".bmp")[i % 3]
                write_image(root / split / cls / f"img_{i:02d}{suffix}", imgs[i, :, :h, :w])
    return root


def write_flat_folder(root: Path, n: int = 12) -> Path:
    """A flat folder of unlabeled images (SSL on a user's own pictures)."""
    imgs = class_images(np.arange(n) % 3, 3, 64, 64, seed=9)
    for i in range(n):
        h, w = _SIZES[i % len(_SIZES)]
        write_image(root / f"photo_{i:03d}{('.png', '.jpg')[i % 2]}", imgs[i, :, :h, :w])
    return root


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST (60000/10000) installed by `apt-get install dataset-fashion-mnist`."""
    if not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not in {FASHION_MNIST_SYSTEM_DIR}")
    return FASHION_MNIST_SYSTEM_DIR


@pytest.fixture(scope="session")
def tiny_fashion_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IDX .gz stand-in: 120 train / 40 test 28x28 grey images, labels i % 10."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion_mnist"))


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 pickle stand-in: 100 train / 30 test, labels i % 10."""
    return write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10")


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-100 pickle stand-in: 200 train / 100 test, labels i % 100."""
    return write_cifar(tmp_path_factory.mktemp("cifar100"), "cifar100", per_file=40, n_test=100)


@pytest.fixture(scope="session")
def stl10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STL-10 binary stand-in: 20 train / 10 test / 30 unlabeled 96x96 images."""
    return write_stl10(tmp_path_factory.mktemp("stl10"))


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder stand-in (also a `folder` dataset): train/ 3 classes x 6, val/ 3 x 2; PNG, JPEG, BMP."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="session")
def unlabeled_folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of 12 unlabeled images of mixed sizes."""
    return write_flat_folder(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="session")
def corrupt_folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder with 2 classes x 3 images, where train/b/broken.jpg is not an image."""
    root = write_image_folder(tmp_path_factory.mktemp("corrupt"), classes=("a", "b"), n_train=3, n_val=1)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root
