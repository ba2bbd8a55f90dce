"""Hostile and broken data files, by class: every loader of in-memory data meets every kind of bad file.

Each must end in one ``UserError`` line that names the file (or the directory) and never run code
from it; see docs/failures.md for the same cases through the CLI.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import write_cifar, write_fashion_mnist, write_stl10
from emanorm.data import datasets as ds_mod
from emanorm.data import formats, load_dataset, read_split_csv
from emanorm.data.safe_pickle import load_data_pickle
from emanorm.data.voc import parse_annotation
from emanorm.errors import UserError
from emanorm.experiments.evaluate import MergedResults
from emanorm.train.presets import load_config_source
from failure_setups import MARKER, code_pickles, flipped, python2_style_pickle, truncated

# Every file an in-memory loader reads: (dataset, split, path under its data_dir).
CIFAR_FILES = [("cifar10", "train", "cifar-10-batches-py/data_batch_1"),
               ("cifar10", "train", "cifar-10-batches-py/data_batch_5"),
               ("cifar10", "test", "cifar-10-batches-py/test_batch"),
               ("cifar100", "train", "cifar-100-python/train"),
               ("cifar100", "test", "cifar-100-python/test")]
FASHION_FILES = [("fashion_mnist", "train", "train-images-idx3-ubyte.gz"),
                 ("fashion_mnist", "train", "train-labels-idx1-ubyte.gz"),
                 ("fashion_mnist", "test", "t10k-images-idx3-ubyte.gz"),
                 ("fashion_mnist", "test", "t10k-labels-idx1-ubyte.gz")]
STL_FILES = [("stl10", "train", "stl10_binary/train_X.bin"),
             ("stl10", "train", "stl10_binary/train_y.bin"),
             ("stl10", "test", "stl10_binary/test_X.bin"),
             ("stl10", "unlabeled", "stl10_binary/unlabeled_X.bin")]
CODE_KINDS = sorted(code_pickles(Path("x")))


def _dataset(name: str, root: Path) -> Path:
    if name == "fashion_mnist":
        return write_fashion_mnist(root, n_train=20, n_test=10)
    if name == "stl10":
        return write_stl10(root, n_train=4, n_test=4, n_unlabeled=4)
    return write_cifar(root, name, per_file=4, n_test=6)


def _one_line_naming(err: pytest.ExceptionInfo, *names: object) -> str:
    message = str(err.value)
    assert isinstance(err.value, UserError), type(err.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, message
    return message


@pytest.fixture(autouse=True)
def no_system_fallback(monkeypatch, tmp_path_factory) -> None:
    """A real Fashion-MNIST copy where the system one lives: a loader must never fall back to it."""
    decoy = write_fashion_mnist(tmp_path_factory.mktemp("decoy"), n_train=30, n_test=30)
    monkeypatch.setattr(formats, "FASHION_MNIST_SYSTEM_DIR", decoy)


# -- H-1: pickles that run code --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", CODE_KINDS)
@pytest.mark.parametrize(("name", "split", "rel"), CIFAR_FILES, ids=[f[2] for f in CIFAR_FILES])
def test_cifar_pickle_that_runs_code_is_refused(name, split, rel, kind, protocol, tmp_path: Path) -> None:
    root = _dataset(name, tmp_path / "data")
    target = root / rel
    target.write_bytes(code_pickles(tmp_path / MARKER, protocol)[kind])
    with pytest.raises(UserError) as err:
        load_dataset(name, split, root)
    message = _one_line_naming(err, target)
    assert "is refused" in message and "nothing of it was run" in message
    assert not (tmp_path / MARKER).exists(), "the pickle's code ran"


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_data_unpickler_reads_every_protocol_and_python2_archives(protocol: int, tmp_path: Path) -> None:
    entry = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4], b"filenames": [b"a.png"] * 3,
             b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)}
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    loaded = load_data_pickle(path)
    assert loaded[b"labels"] == [3, 1, 4] and np.array_equal(loaded[b"data"], entry[b"data"])
    # the official archive: protocol 2, numpy 1.x module names
    path.write_bytes(python2_style_pickle(entry))
    assert b"cnumpy.core.multiarray\n" in path.read_bytes()
    assert np.array_equal(load_data_pickle(path)[b"data"], entry[b"data"])


def test_python2_style_cifar_archive_loads(tmp_path: Path) -> None:
    root = write_cifar(tmp_path, "cifar10", per_file=4, n_test=6)
    sub = root / "cifar-10-batches-py"
    for f in sub.iterdir():
        entry = pickle.loads(f.read_bytes())
        entry = {k.encode(): v for k, v in entry.items()}  # Python 2 str keys read back as bytes
        f.write_bytes(python2_style_pickle(entry))
    assert len(load_dataset("cifar10", "train", root)) == 20


def test_codecs_encode_only_spells_bytes(tmp_path: Path) -> None:
    # protocol 2 spells bytes as _codecs.encode(text, 'latin1'); any other codec is refused
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps(b"\x00\xff", protocol=2))
    assert b"c_codecs\nencode\n" in path.read_bytes() and load_data_pickle(path) == b"\x00\xff"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="zlib"):
        load_data_pickle(path)


# -- M-3: truncated and corrupt files, for every file of every in-memory loader --------------------


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.37, 0.99])
@pytest.mark.parametrize(("name", "split", "rel"), CIFAR_FILES + FASHION_FILES + STL_FILES,
                         ids=[f[2] for f in CIFAR_FILES + FASHION_FILES + STL_FILES])
def test_truncated_file_is_one_line_naming_it(name, split, rel, keep, tmp_path: Path) -> None:
    root = _dataset(name, tmp_path / "data")
    target = root / rel
    target.write_bytes(truncated(target.read_bytes(), keep))
    with pytest.raises(UserError) as err:
        load_dataset(name, split, root)
    _one_line_naming(err, target)


@pytest.mark.parametrize(("name", "split", "rel"), FASHION_FILES, ids=[f[2] for f in FASHION_FILES])
def test_corrupt_gz_is_one_line_naming_it(name, split, rel, tmp_path: Path) -> None:
    root = _dataset(name, tmp_path / "data")
    target = root / rel
    target.write_bytes(flipped(target.read_bytes()))
    with pytest.raises(UserError) as err:
        load_dataset(name, split, root)
    assert "truncated or corrupt" in _one_line_naming(err, target)


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b", b"not gzip at all",
                                     gzip.compress(b"\x00\x00\x08\x03" + b"\xff" * 12)],
                         ids=["empty", "gzip-magic-only", "not-gzip", "header-claims-terabytes"])
def test_idx_header_and_gzip_framing(content: bytes, tmp_path: Path) -> None:
    root = _dataset("fashion_mnist", tmp_path / "data")
    target = root / "train-images-idx3-ubyte.gz"
    target.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_dataset("fashion_mnist", "train", root)
    _one_line_naming(err, target)


def test_idx_read_is_exact(tmp_path: Path) -> None:
    """Raw and gzipped IDX read back bit for bit; a byte past the header's promise is refused."""
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    raw = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "a.gz"):
        assert np.array_equal(ds_mod.read_idx(tmp_path / name), array)
    (tmp_path / "b").write_bytes(raw + b"\x00")
    with pytest.raises(UserError, match=r"holds more"):
        ds_mod.read_idx(tmp_path / "b")


# -- malformed content -----------------------------------------------------------------------------


BAD_CIFAR_ENTRIES = {
    "a-list": [1, 2, 3],
    "no-labels": {"data": np.zeros((2, 3072), np.uint8)},
    "float-data": {"data": np.full((2, 3072), 0.5), "labels": [0, 1]},
    "data-beyond-bytes": {"data": np.full((2, 3072), 300), "labels": [0, 1]},
    "data-not-whole-images": {"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]},
    "string-labels": {"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]},
    "count-mismatch": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]},
    "label-out-of-range": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},
    "nested-labels": {"data": np.zeros((2, 3072), np.uint8), "labels": [[0], [1]]},
}


@pytest.mark.parametrize("kind", sorted(BAD_CIFAR_ENTRIES))
def test_malformed_cifar_batch(kind: str, tmp_path: Path) -> None:
    root = write_cifar(tmp_path, "cifar10", per_file=4, n_test=6)
    target = root / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(pickle.dumps(BAD_CIFAR_ENTRIES[kind]))
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", "test", root)
    _one_line_naming(err, "test_batch" if kind != "label-out-of-range" else root)


def test_empty_splits_are_refused(tmp_path: Path) -> None:
    cifar = write_cifar(tmp_path / "c", "cifar10", per_file=4, n_test=6)
    (cifar / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "labels": []}))
    with pytest.raises(UserError, match="holds no images"):
        load_dataset("cifar10", "test", cifar)
    fashion = write_fashion_mnist(tmp_path / "f", n_train=20, n_test=0)
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte\.gz holds no images"):
        load_dataset("fashion_mnist", "test", fashion)
    stl = write_stl10(tmp_path / "s", n_train=4, n_test=0, n_unlabeled=4)
    with pytest.raises(UserError, match=r"test_X\.bin is empty"):
        load_dataset("stl10", "test", stl)


def test_fashion_labels_out_of_range(tmp_path: Path) -> None:
    from conftest import write_idx

    root = write_fashion_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.full(10, 200, np.uint8))
    with pytest.raises(UserError) as err:
        load_dataset("fashion_mnist", "test", root)
    assert "label 200" in _one_line_naming(err, root / "t10k-labels-idx1-ubyte.gz")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
@pytest.mark.parametrize(("name", "split", "rel"), [CIFAR_FILES[0], FASHION_FILES[0], STL_FILES[0]],
                         ids=["cifar", "fashion", "stl"])
def test_unreadable_file(name, split, rel, tmp_path: Path) -> None:
    root = _dataset(name, tmp_path / "data")
    (root / rel).chmod(0)
    with pytest.raises(UserError) as err:
        load_dataset(name, split, root)
    _one_line_naming(err, root / rel)


# -- M-1: a given data_dir is used or refused, never replaced --------------------------------------


def _prepare_dir(kind: str, name: str, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "no-such-dir"
    if kind == "a-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file"
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    root = _dataset(name, tmp_path / "data")  # incomplete: the first file the split needs is gone
    first = {"fashion_mnist": FASHION_FILES, "cifar10": CIFAR_FILES, "cifar100": CIFAR_FILES[3:],
             "stl10": STL_FILES}[name][0][2]
    (root / first).unlink()
    return root


@pytest.mark.parametrize("kind", ["missing", "a-file", "empty", "incomplete"])
@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "stl10", "voc2007"])
def test_given_data_dir_is_used_or_refused(name: str, kind: str, tmp_path: Path) -> None:
    if name == "voc2007" and kind == "incomplete":
        pytest.skip("VOC's incomplete trees are covered by tests/test_transfer.py")
    data_dir = _prepare_dir(kind, name, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, "train", data_dir, download=False)
    message = _one_line_naming(err, data_dir)
    assert str(ds_mod.FASHION_MNIST_SYSTEM_DIR) not in message.split("leave it out to use")[0]


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "stl10", "folder"])
def test_empty_data_dir_string_is_refused(name: str, tmp_path: Path, monkeypatch) -> None:
    _dataset("fashion_mnist", tmp_path)  # a dataset in the working directory is not taken for ""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir is an empty string"):
        load_dataset(name, "train", "")


def test_fashion_mnist_without_data_dir_uses_the_system_copy(tmp_path: Path) -> None:
    # the automatic lookup applies only when no data_dir is given
    assert len(load_dataset("fashion_mnist", "test")) == 30


def test_given_fashion_dir_is_not_downloaded_into(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded into a given data_dir")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_download)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks train-images"):
        load_dataset("fashion_mnist", "train", tmp_path / "empty", download=True)
    assert not any((tmp_path / "empty").iterdir())


def test_torchvision_layout_still_found(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(raw, n_train=20, n_test=10)
    assert len(load_dataset("fashion_mnist", "test", tmp_path)) == 10


# -- M-4 / L-10: split CSVs ------------------------------------------------------------------------


BAD_CSVS = {
    "beyond-64-bits": (b"Index\n1\n" + b"9" * 30 + b"\n", "is not a dataset index"),
    "negative-beyond-64-bits": (b"Index\n-" + b"9" * 25 + b"\n", "is not a dataset index"),
    "more-digits-than-int-takes": (b"Index\n" + b"1" * 5000 + b"\n", "is not an integer"),
    "not-utf8": (b"Index\n\xff\xfe\n", "not a text CSV"),
    "nul-byte": (b"Index\n3\x00\n", "is not an integer"),
    "field-over-csv-limit": (b"Index\n\"" + b"1" * 200_000 + b"\"\n", "not a readable CSV"),
    "float": (b"Index\n1.5\n", "is not an integer"),
    "empty-file": (b"", "no 'Index' column"),
    "gzip-bytes": (gzip.compress(b"Index\n1\n"), "not a text CSV"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CSVS))
def test_bad_split_csv_is_one_line_naming_it(kind: str, tmp_path: Path) -> None:
    content, expected = BAD_CSVS[kind]
    path = tmp_path / "split.csv"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_split_csv(path)
    message = _one_line_naming(err, path)
    assert expected in message and len(message) < 400


def test_split_csv_with_bom_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "split.csv"
    path.write_bytes("\ufeffIndex , Name\n 4 ,a\n2,b\n".encode())
    assert read_split_csv(path).tolist() == [4, 2]


# -- VOC annotations, JSON and YAML inputs ---------------------------------------------------------


BAD_XML = {
    "entity-bomb": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
                   "<annotation><object><name>&b;</name></object></annotation>",
    "external-entity": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                       "<annotation><object><name>&x;</name></object></annotation>",
    "truncated": "<annotation><object><name>dog</na",
    "not-xml": "\x00\x01\x02",
}


@pytest.mark.parametrize("kind", sorted(BAD_XML))
def test_bad_voc_annotation(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "000001.xml"
    path.write_text(BAD_XML[kind])
    with pytest.raises(UserError) as err:
        parse_annotation(path)
    _one_line_naming(err, path)


BAD_TEXT = {
    "binary": b"\x80\x04\x95" + bytes(range(256)),
    "nested": b"[" * 100_000,
    "gzip": gzip.compress(b"{}"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TEXT))
def test_bad_merge_results_and_config_files(kind: str, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_bytes(BAD_TEXT[kind])
    with pytest.raises(UserError) as err:
        MergedResults([str(results)], which="teacher", linear=None)
    _one_line_naming(err, results)
    config = tmp_path / "config.yaml"
    config.write_bytes(BAD_TEXT[kind])
    with pytest.raises(UserError) as err:
        load_config_source(str(config))
    _one_line_naming(err, config)


def test_hostile_pickle_as_merge_results_is_not_unpickled(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_bytes(code_pickles(tmp_path / MARKER)["os_system"])
    with pytest.raises(UserError):
        MergedResults([str(results)], which="teacher", linear=None)
    assert not (tmp_path / MARKER).exists()
