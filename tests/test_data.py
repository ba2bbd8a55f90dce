"""Datasets in every layout, labeled splits, and the batch stream."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from emanorm.data import (
    DATASETS,
    formats,
    load_dataset,
    pretrain_split,
    read_split_csv,
    select_labeled,
    write_split_csv,
)
from emanorm.data.stream import BatchStream, eval_batches
from emanorm.errors import UserError

# -- datasets ------------------------------------------------------------------------------------


@pytest.mark.slow  # the real data: skipped without `apt-get install dataset-fashion-mnist`
def test_fashion_mnist_real(fashion_mnist_dir: Path) -> None:
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test", fashion_mnist_dir)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.info.num_classes == 10 and train.info.channels == 1 and train.info.image_size == 28
    assert torch.equal(torch.bincount(train.targets), torch.full((10,), 6000))
    x = train.fetch(torch.tensor([0, 59999]))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.uint8 and x.max() > 0
    assert train.in_memory


def test_fashion_mnist_data_dir_and_errors(tiny_fashion_mnist_dir: Path, tmp_path: Path, monkeypatch) -> None:
    ds = load_dataset("fashion_mnist", "test", tiny_fashion_mnist_dir)
    assert len(ds) == 40 and ds.targets[:12].tolist() == [i % 10 for i in range(12)]
    # Class k of the stand-in has mean ~ 20k + 30: labels and images stay paired.
    means = ds.fetch(torch.arange(10)).float().mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])
    monkeypatch.setattr(formats, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist", "train", tmp_path / "empty", download=False)
    assert "nowhere" in str(err.value) and "empty" in str(err.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (bad / stem).write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion_mnist", "test", bad, download=False)


@pytest.mark.parametrize(("name", "n_train", "n_test", "classes"),
                         [("cifar10", 100, 30, 10), ("cifar100", 200, 100, 100)])
def test_cifar(name: str, n_train: int, n_test: int, classes: int, request) -> None:
    root = request.getfixturevalue(f"{name}_dir")
    train, test = load_dataset(name, "train", root), load_dataset(name, "test", root)
    assert (len(train), len(test), train.info.num_classes) == (n_train, n_test, classes)
    assert train.targets.tolist() == [i % classes for i in range(n_train)]
    x = train.fetch([0, 1, 2])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    # class k is brightest in channel k % 3: channel order and label pairing survive the reader
    assert x.float().mean(dim=(2, 3)).argmax(1).tolist() == [0, 1, 2]
    # the archive's own folder works as data_dir too
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert len(load_dataset(name, "val", root / sub)) == n_test


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", "train", tmp_path)
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    with open(sub / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, f)  # no fine_labels
    with pytest.raises(ValueError, match=r"cifar-100-python/test.*fine_labels"):
        load_dataset("cifar100", "test", tmp_path)
    (sub / "train").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cifar-100-python/train"):
        load_dataset("cifar100", "train", tmp_path)


def test_stl10(stl10_dir: Path) -> None:
    sizes = {s: len(load_dataset("stl10", s, stl10_dir)) for s in ("train", "test", "unlabeled")}
    assert sizes == {"train": 20, "test": 10, "unlabeled": 30}
    both = load_dataset("stl10", pretrain_split("stl10"), stl10_dir)
    assert len(both) == 50 and both.info.image_size == 96
    assert both.targets[:20].tolist() == [i % 10 for i in range(20)] and (both.targets[20:] == -1).all()
    x = both.fetch([0, 1, 25])
    assert x.shape == (3, 3, 96, 96)
    # the stand-in has a bright top row: the column-major binary is transposed back correctly
    assert (x[:, :, 0, :] == 255).all() and not (x[:, :, 1:, 0] == 255).all()
    assert x[:2, :, 1:].float().mean(dim=(2, 3)).argmax(1).tolist() == [0, 1]


def test_stl10_malformed(tmp_path: Path) -> None:
    sub = tmp_path / "stl10_binary"
    sub.mkdir()
    (sub / "test_X.bin").write_bytes(b"\x00" * 1000)
    (sub / "test_y.bin").write_bytes(b"\x01")
    with pytest.raises(ValueError, match=r"test_X\.bin"):
        load_dataset("stl10", "test", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_X\.bin"):
        load_dataset("stl10", "train", tmp_path)


def test_imagenet_folder_matches_torchvision_order(imagenet_dir: Path) -> None:
    from torchvision.datasets import ImageFolder

    train = load_dataset("imagenet", "train", imagenet_dir, image_size=32)
    ref = ImageFolder(str(imagenet_dir / "train"))
    assert train.paths == [p for p, _ in ref.samples] and train.targets.tolist() == ref.targets
    assert train.info.num_classes == 3 and train.classes == ["cat", "dog", "fox"] and not train.in_memory
    x = train.fetch(torch.arange(len(train)))
    assert x.shape == (18, 3, 32, 32) and x.dtype == torch.uint8
    # PNG, JPEG and BMP files decode; each class is brightest in its own channel
    assert torch.equal(x.float().mean(dim=(2, 3)).argmax(1), train.targets)
    val = load_dataset("imagenet", "test", imagenet_dir)  # "test" is val/
    assert len(val) == 6 and val.split == "val" and val.fetch([0]).shape == (1, 3, 224, 224)


def test_folder_layouts(imagenet_dir: Path, unlabeled_folder_dir: Path, tmp_path: Path) -> None:
    val = load_dataset("folder", "test", imagenet_dir, image_size=40)
    assert len(val) == 6 and val.info.image_size == 40 and val.targets.tolist() == [0, 0, 1, 1, 2, 2]
    flat = load_dataset("folder", "train", unlabeled_folder_dir, image_size=24)
    assert len(flat) == 12 and (flat.targets == -1).all() and flat.info.num_classes == 0
    assert flat.fetch([3, 4]).shape == (2, 3, 24, 24)
    assert len(load_dataset("folder", "unlabeled", unlabeled_folder_dir)) == 12
    with pytest.raises(FileNotFoundError, match="no val split"):
        load_dataset("folder", "val", unlabeled_folder_dir)
    empty = tmp_path / "empty"
    (empty / "train" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images .* found under .*empty/train"):
        load_dataset("folder", "train", empty)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_dataset("imagenet", "train", tmp_path / "missing_dir")


def test_val_class_not_in_train(tmp_path: Path) -> None:
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "x", classes=("a", "b"), n_train=1, n_val=1)
    write_image_folder(tmp_path / "x", classes=("zebra",), n_train=0, n_val=1)
    with pytest.raises(ValueError, match="zebra"):
        load_dataset("folder", "val", root)


def test_corrupt_image(corrupt_folder_dir: Path) -> None:
    ds = load_dataset("folder", "train", corrupt_folder_dir, image_size=16)
    broken = ds.paths.index(str(corrupt_folder_dir / "train" / "b" / "broken.jpg"))
    ds.fetch([0])  # the good images still load
    with pytest.raises(ValueError, match=r"cannot decode image file .*broken\.jpg"):
        ds.fetch([broken])
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        skipped = load_dataset("folder", "train", corrupt_folder_dir, image_size=16, on_corrupt="skip")
    assert len(skipped) == len(ds) - 1 and skipped.fetch(torch.arange(len(skipped))).shape[0] == len(ds) - 1


def test_bad_names_and_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=", ".join(DATASETS)):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("cifar10", "unlabeled", tmp_path)
    with pytest.raises(FileNotFoundError, match="needs data_dir"):
        load_dataset("stl10", "train")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("cifar10", "train", tmp_path, image_size=64)
    with pytest.raises(UserError):  # the CLI prints these as one line
        load_dataset("nope", "train")


# -- splits --------------------------------------------------------------------------------------


def _targets(per_class: list[int]) -> torch.Tensor:
    t = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    return t[torch.randperm(len(t), generator=torch.Generator().manual_seed(5))]


def test_select_labeled_counts_and_determinism() -> None:
    t = _targets([30, 40, 50])
    a = select_labeled(t, 3, labels_per_class=4, seed=1)
    torch.manual_seed(123)  # the global RNG (which differs between ranks) plays no part
    b = select_labeled(t, 3, labels_per_class=4, seed=1)
    c = select_labeled(t, 3, labels_per_class=4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 12
    assert torch.bincount(t[a], minlength=3).tolist() == [4, 4, 4]
    f = select_labeled(t, 3, fraction=0.1, seed=0)
    assert torch.bincount(t[f], minlength=3).tolist() == [3, 4, 5]
    assert select_labeled(t, 3, fraction=1.0).numel() == 120
    # unlabeled entries (-1) are never picked
    t2 = torch.cat([t, torch.full((50,), -1)])
    assert (t2[select_labeled(t2, 3, fraction=0.5)] >= 0).all()


def test_select_labeled_errors() -> None:
    t = _targets([5, 2])
    with pytest.raises(ValueError, match=r"labels_per_class=3 but class 1 has only 2"):
        select_labeled(t, 2, labels_per_class=3)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"fraction=.* \(0, 1\]"):
            select_labeled(t, 2, fraction=bad)
    with pytest.raises(ValueError, match="exactly one"):
        select_labeled(t, 2)
    with pytest.raises(ValueError, match="exactly one"):
        select_labeled(t, 2, labels_per_class=1, fraction=0.5)


def test_split_csv_round_trip_and_errors(tmp_path: Path) -> None:
    t = _targets([10, 10])
    idx = select_labeled(t, 2, labels_per_class=3, seed=4)
    write_split_csv(idx, tmp_path / "split.csv")
    assert (tmp_path / "split.csv").read_text().splitlines()[0] == "Index"
    assert torch.equal(read_split_csv(tmp_path / "split.csv"), idx)
    assert torch.equal(select_labeled(t, 2, index_csv=tmp_path / "split.csv"), idx)
    (tmp_path / "extra.csv").write_text("Index,ImageID\n7,a\n3,b\n")
    assert select_labeled(t, 2, index_csv=tmp_path / "extra.csv").tolist() == [3, 7]
    (tmp_path / "range.csv").write_text("Index\n3\n20\n")
    with pytest.raises(ValueError, match="Index 20 out of range"):
        select_labeled(t, 2, index_csv=tmp_path / "range.csv")
    (tmp_path / "nocol.csv").write_text("idx\n3\n")
    with pytest.raises(ValueError, match="no 'Index' column"):
        read_split_csv(tmp_path / "nocol.csv")
    (tmp_path / "text.csv").write_text("Index\n3\nfour\n")
    with pytest.raises(ValueError, match=r"text.csv:3: Index 'four'"):
        read_split_csv(tmp_path / "text.csv")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        read_split_csv(tmp_path / "missing.csv")


# -- batch stream ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_train(cifar10_dir: Path):
    return load_dataset("cifar10", "train", cifar10_dir)


def _fixmatch_stream(ds, **kw) -> BatchStream:
    args = dict(labeled=ds, labeled_indices=torch.arange(0, 100, 5), unlabeled=ds,
                labeled_views={"x": "weak"}, unlabeled_views={"u_w": "weak", "u_s": "strong"},
                batch_size=4, unlabeled_batch_size=8, seed=3, return_index=True)
    args.update(kw)
    return BatchStream(**args)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


def test_stream_batches_and_determinism(cifar_train) -> None:
    s = _fixmatch_stream(cifar_train)
    assert s.steps_per_epoch == 100 // 8 and len(s) == 12
    batches = list(s)
    b = batches[0]
    assert set(b) == {"x", "y", "u_w", "u_s", "y_u", "index", "index_l", "epoch"}
    assert b["x"].shape == (4, 3, 32, 32) and b["u_s"].shape == (8, 3, 32, 32)
    assert b["x"].dtype == torch.float32
    assert torch.equal(b["y"], cifar_train.targets[b["index_l"]]) and (b["index_l"] % 5 == 0).all()
    assert torch.equal(b["y_u"], cifar_train.targets[b["index"]])
    assert not torch.equal(b["u_w"], b["u_s"])
    # an epoch is one pass over the unlabeled set: each index once
    seen = torch.cat([x["index"] for x in batches])
    assert seen.unique().numel() == 96
    s.set_epoch(0)
    assert _same(batches, list(s))
    assert _same(batches, list(_fixmatch_stream(cifar_train)))
    assert not torch.equal(next(iter(_fixmatch_stream(cifar_train, seed=4)))["index"], b["index"])
    s.set_epoch(1)
    assert not torch.equal(next(iter(s))["index"], b["index"])


def test_stream_resume_mid_epoch(cifar_train) -> None:
    full = _fixmatch_stream(cifar_train)
    full.set_epoch(2)
    ref = list(full)
    resumed = _fixmatch_stream(cifar_train)
    resumed.set_epoch(2, 5)
    assert len(resumed) == 7
    assert _same(ref[5:], list(resumed))


def test_stream_rank_shards(cifar_train) -> None:
    def indices(rank: int) -> list[torch.Tensor]:
        s = BatchStream(unlabeled=cifar_train, unlabeled_views={"q": "moco", "k": "moco"}, batch_size=6,
                        seed=0, rank=rank, world_size=3, return_index=True)
        assert s.steps_per_epoch == 100 // 18
        return [b["index"] for b in s]

    per_rank = [indices(r) for r in range(3)]
    for step in range(5):
        shares = [per_rank[r][step] for r in range(3)]
        joined = torch.cat(shares)
        assert joined.unique().numel() == 18  # disjoint shares of one global batch
    everything = torch.cat([torch.cat(p) for p in per_rank])
    assert everything.unique().numel() == 90  # an epoch covers all but the dropped remainder


def test_stream_small_labeled_set_cycles(cifar_train) -> None:
    s = _fixmatch_stream(cifar_train, labeled_indices=torch.tensor([1, 2, 3]), batch_size=4)
    labeled = [b["index_l"] for b in s]
    assert all(set(x.tolist()) <= {1, 2, 3} and len(x) == 4 for x in labeled)


def test_stream_labeled_only_and_errors(cifar_train, stl10_dir: Path) -> None:
    s = BatchStream(cifar_train, None, labeled_views={"x": "none"}, batch_size=10)
    b = next(iter(s))
    assert set(b) == {"x", "y", "epoch"} and s.steps_per_epoch == 10
    with pytest.raises(ValueError, match="reserved"):
        BatchStream(cifar_train, labeled_views={"y": "weak"})
    with pytest.raises(ValueError, match="unknown augmentation 'fancy'"):
        BatchStream(cifar_train, labeled_views={"x": "fancy"})
    with pytest.raises(ValueError, match="smaller than one global batch"):
        BatchStream(cifar_train, labeled_views={"x": "weak"}, batch_size=60, world_size=2)
    unl = load_dataset("stl10", "unlabeled", stl10_dir)
    with pytest.raises(ValueError, match="no label"):
        BatchStream(unl, labeled_views={"x": "weak"}, batch_size=2)
    with pytest.raises(ValueError, match="start_step"):
        s.set_epoch(0, 11)


def test_stream_file_dataset_workers(imagenet_dir: Path) -> None:
    ds = load_dataset("imagenet", "train", imagenet_dir, image_size=32)
    kw = dict(unlabeled=ds, unlabeled_views={"u": "weak"}, batch_size=4, seed=1, return_index=True)
    serial = list(BatchStream(**kw))
    parallel = list(BatchStream(**kw, num_workers=1))
    assert len(serial) == 4 and _same(serial, parallel)


def test_eval_batches(cifar_train, imagenet_dir: Path) -> None:
    got = list(eval_batches(cifar_train, 32))
    assert [len(y) for _, y in got] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([y for _, y in got]), cifar_train.targets)
    mean = torch.tensor(cifar_train.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(cifar_train.info.std).view(1, 3, 1, 1)
    expected = (cifar_train.fetch(torch.arange(32)).float() / 255 - mean) / std
    assert torch.allclose(got[0][0], expected, atol=1e-6)
    files = load_dataset("imagenet", "val", imagenet_dir, image_size=16)
    (x, y), = eval_batches(files, 8, indices=torch.tensor([5, 0]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [2, 0]
