"""Transfer evaluation: another dataset than the run's, VOC07 multi-label low-shot, input adaptation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from conftest import class_images, write_image
from emanorm import cli
from emanorm.data import build_augmentation, dataset_info, load_dataset
from emanorm.data.voc import VOC_CLASSES, find_voc_root, read_voc_labels
from emanorm.errors import UserError
from emanorm.evaluation import MultiLabelSVMTask, class_average_precisions, knn_monitor, lowshot_svm
from emanorm.evaluation.transfer import ChannelAdapter, adapted_transform, describe_adaptation
from emanorm.train import resolve_config, train

# -- a VOC2007 stand-in -----------------------------------------------------------------------------

PRESENT = ("car", "cat", "dog", "person")  # the only classes with objects; the other 16 are all -1


def _objects(i: int, split: str) -> list[tuple[str, bool]]:
    """Objects of image i: its main class; every 3rd image also a second class; some difficult."""
    main = PRESENT[i % 4]
    objects = [(main, False)]
    if i % 3 == 0:
        objects.append((PRESENT[(i + 1) % 4], split == "test" and i % 2 == 0))  # difficult only in test
    if i % 5 == 4:
        objects.append((main, True))  # a difficult extra of the main class: still a positive
    if i % 7 == 6:
        objects.append((PRESENT[(i + 2) % 4], True))  # the only object of that class: difficult
    return objects


def _xml(objects: list[tuple[str, bool]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        for n, d in objects
    )
    size = "<size><width>48</width><height>40</height></size>"
    return f"<annotation><folder>VOC2007</folder>{size}{body}</annotation>"


def write_voc(root: Path, n_trainval: int = 24, n_test: int = 12, class_files: bool = True) -> Path:
    """root/VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main} with the devkit's conventions."""
    voc = root / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (voc / "Annotations").mkdir()
    ids = {"trainval": [f"{i:06d}" for i in range(n_trainval)],
           "test": [f"{i:06d}" for i in range(n_trainval, n_trainval + n_test)]}
    ids["train"], ids["val"] = ids["trainval"][::2], ids["trainval"][1::2]
    labels = {}
    for split in ("trainval", "test"):
        main_class = [PRESENT.index(_objects(i, split)[0][0]) for i in range(len(ids[split]))]
        pictures = class_images(np.array(main_class), 3, 40, 48, seed=len(split))
        for i, image_id in enumerate(ids[split]):
            objects = _objects(i, split)
            write_image(voc / "JPEGImages" / f"{image_id}.jpg", pictures[i])
            (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(objects))
            row = {}
            for c in VOC_CLASSES:
                mine = [d for n, d in objects if n == c]
                row[c] = -1 if not mine else (1 if not all(mine) else 0)
            labels[image_id] = row
    for split, split_ids in ids.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        if class_files:
            for c in VOC_CLASSES:
                (main / f"{c}_{split}.txt").write_text("".join(f"{i} {labels[i][c]:2d}\n" for i in split_ids))
    return root


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory: pytest.TempPathFactory, tiny_fashion_mnist_dir: Path) -> Path:
    """A real run directory: MoCo-EMAN, 2 steps on a 1-channel, 28 px Fashion-MNIST stand-in."""
    out = tmp_path_factory.mktemp("transfer") / "moco"
    cfg = resolve_config(None, {
        "method": "moco", "norm": "eman", "max_steps": 2, "batch_size": 16, "device": "cpu", "out": str(out),
        "data_dir": str(tiny_fashion_mnist_dir), "knn_bank_size": 32, "monitor_test_size": 16,
        "method_args": {"queue_size": 32, "dim": 8},
    })
    train(cfg, monitor=knn_monitor, progress=False)
    return out


# -- the VOC reader -----------------------------------------------------------------------------------


def test_voc_reader_labels_from_class_files_and_from_annotations_agree(voc_dir, tmp_path):
    root = find_voc_root(voc_dir)
    assert root == voc_dir / "VOCdevkit" / "VOC2007"
    xml_only = write_voc(tmp_path / "xml", class_files=False)
    for split in ("train", "val", "trainval", "test"):
        ids, labels = read_voc_labels(root, split)
        ids2, labels2 = read_voc_labels(find_voc_root(xml_only), split)
        assert ids == ids2 and np.array_equal(labels, labels2) and labels.dtype == np.int8
    ids, labels = read_voc_labels(root, "trainval")
    cols = [VOC_CLASSES.index(c) for c in PRESENT]
    assert labels.shape == (24, 20) and set(np.unique(labels)) == {-1, 0, 1}
    absent = np.delete(labels, cols, axis=1)
    assert (absent == -1).all()
    assert labels[0, VOC_CLASSES.index("car")] == 1  # image 0: a car and a cat
    assert labels[0, VOC_CLASSES.index("cat")] == 1
    assert labels[6, VOC_CLASSES.index("car")] == 0  # only a difficult car: ignored, not negative
    assert labels[4, VOC_CLASSES.index("car")] == 1  # a difficult car beside a plain one: positive


def test_voc_dataset_through_load_dataset(voc_dir):
    ds = load_dataset("voc2007", "test", voc_dir, image_size=20)
    assert len(ds) == 12 and ds.info.num_classes == 20 and ds.info.channels == 3
    assert ds.multilabel and ds.label_matrix.shape == (12, 20)
    assert (ds.targets == -1).all()  # no single label: single-label protocols see it as unlabeled
    x = ds.fetch([0, 5])
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 20, 20)
    # Image content follows the main class (class_images brightens channel label % 3).
    main_of_first = PRESENT.index(_objects(0, "test")[0][0])
    assert x[0].float().mean((1, 2)).argmax() == main_of_first % 3
    assert len(load_dataset("voc2007", "trainval", voc_dir / "VOCdevkit")) == 24


def test_voc_reader_errors(voc_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'holdout' for voc2007; choose one of train, val"):
        load_dataset("voc2007", "holdout", voc_dir)
    with pytest.raises(FileNotFoundError, match="no JPEGImages"):
        load_dataset("voc2007", "test", tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(voc_dir, broken)
    main = broken / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    (main / "dog_test.txt").unlink()
    (main / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"19 of the 20 <class>_test\.txt files .*missing e\.g\. dog"):
        load_dataset("voc2007", "test", broken)
    (main / "cat_val.txt").write_text("000001 2\n")
    with pytest.raises(ValueError, match=r"cat_val\.txt: expected '<id> 1\|-1\|0' lines"):
        load_dataset("voc2007", "val", broken)


# -- the multi-label low-shot task ---------------------------------------------------------------------


def multilabel_clusters(n: int, classes: int, dim: int, seed: int, spread: float = 0.5):
    """Features = sum of the present classes' centres + noise; labels 1/-1, a few difficult (0)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    labels = -np.ones((n, classes), dtype=np.int8)
    labels[np.arange(n), np.arange(n) % classes] = 1
    extra = rng.random((n, classes)) < 0.15
    labels[extra] = 1
    feats = (labels == 1).astype(float) @ centres + rng.normal(scale=spread, size=(n, dim))
    difficult = rng.random((n, classes)) < 0.05
    labels[difficult & (labels == -1)] = 0
    return torch.from_numpy(feats).float(), torch.from_numpy(labels)


def test_multilabel_sampling_nested_disjoint_and_reproducible():
    _, labels = multilabel_clusters(60, 4, 5, seed=0)
    labels = labels.numpy()
    labels[:, 3] = -1  # a class absent from the training labels is simply not sampled
    task = MultiLabelSVMTask()
    train_sets, val = task.sample(labels, (1, 2, 4), 3, np.random.default_rng([7, 0]))
    assert set(train_sets[1]) <= set(train_sets[2]) <= set(train_sets[4])
    assert set(train_sets[4]).isdisjoint(val)
    for k, idx in train_sets.items():
        positives = (labels[idx] == 1).sum(0)
        assert (positives[:3] >= k).all() and positives[3] == 0
        assert len(idx) <= 3 * k  # the union of k positives per present class
    assert ((labels[val][:, :3] == 1).sum(0) >= 1).all()
    again = task.sample(labels, (1, 2, 4), 3, np.random.default_rng([7, 0]))
    assert all(np.array_equal(again[0][k], train_sets[k]) for k in train_sets)
    assert np.array_equal(again[1], val)
    with pytest.raises(ValueError, match="positive training images; 60 shots need at least 61"):
        task.sample(labels, (60,), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"labels must be \(N, num_classes\)"):
        task.sample(labels[:, 0], (1,), 3, np.random.default_rng(0))


def test_multilabel_map_is_sklearns_mean_ap_without_difficult_images():
    x, y = multilabel_clusters(80, 4, 6, seed=1)
    xt, yt = multilabel_clusters(40, 4, 6, seed=2)
    task = MultiLabelSVMTask()
    x_unit = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    xt_unit = torch.nn.functional.normalize(xt.double(), dim=1).numpy()
    model = task.fit(x_unit, y.numpy(), 1.0)
    scores = model.decision_function(xt_unit)
    manual = []
    for c in range(4):
        keep = yt[:, c].numpy() != 0
        manual.append(average_precision_score(yt[keep, c].numpy() == 1, scores[keep, c]))
    assert task.score(model, xt_unit, yt.numpy()) == pytest.approx(np.mean(manual))
    assert np.mean(manual) > 0.9  # separable clusters
    # A difficult image is left out: whatever its score, the AP does not move.
    yt_np = yt.numpy().copy()
    yt_np[0, :] = 0
    scores_before = class_average_precisions(model, xt_unit, yt_np)
    shifted = xt_unit.copy()
    shifted[0] = -shifted[0]
    assert class_average_precisions(model, shifted, yt_np) == scores_before


def test_multilabel_lowshot_picks_c_without_the_test_set():
    x, y = multilabel_clusters(80, 4, 6, seed=3, spread=1.5)
    xt, yt = multilabel_clusters(40, 4, 6, seed=4, spread=1.5)
    kw = dict(shots=(1, 4), draws=2, costs=(0.05, 1.0, 20.0), val_per_class=3, progress=False)
    plain = lowshot_svm(x, y, xt, yt, task=MultiLabelSVMTask(), **kw)
    adversarial = lowshot_svm(x, y, xt, -yt, task=MultiLabelSVMTask(), **kw)  # positives <-> negatives
    for k in ("1", "4"):
        assert plain["per_shot"][k]["costs"] == adversarial["per_shot"][k]["costs"]
        assert plain["per_shot"][k]["val_scores"] == adversarial["per_shot"][k]["val_scores"]
        scores = plain["per_shot"][k]["scores"]
        assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)  # one mAP per draw
        assert plain["per_shot"][k]["mean"] == pytest.approx(np.mean(scores))
    assert plain["per_shot"]["4"]["mean"] > adversarial["per_shot"]["4"]["mean"]
    assert plain == lowshot_svm(x, y, xt, yt, task=MultiLabelSVMTask(), **kw)  # reproducible


# -- input adaptation ----------------------------------------------------------------------------------


def test_rgb_copies_of_grey_images_give_the_same_input():
    grey, rgb = dataset_info("fashion_mnist"), dataset_info("cifar10")
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    native = build_augmentation("none", grey)(x)
    adapted = adapted_transform(rgb, grey, build_augmentation("none", grey))(x.expand(-1, 3, -1, -1))
    assert adapted.shape == native.shape and torch.allclose(adapted, native, atol=1e-5)
    # Colour goes through luma weights, and 1 -> 3 replicates.
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255
    assert torch.allclose(ChannelAdapter(3, 1)(red), torch.full((1, 1, 2, 2), 0.299))
    assert torch.equal(ChannelAdapter(1, 3)(x)[:, 2], x[:, 0])
    with pytest.raises(ValueError, match="cannot convert 4-channel images"):
        ChannelAdapter(4, 1)
    change = describe_adaptation(rgb, grey)
    assert set(change) == {"channels", "image_size", "normalisation"}
    assert change["channels"].startswith("3 -> 1")
    assert describe_adaptation(grey, grey) is None


# -- the commands, on a real run ---------------------------------------------------------------------


def eval_json(run: Path, protocol: str, args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{protocol}.json"
    rc = cli.main(f"eval {protocol} {run} --no-progress --device cpu --out {out} {args}".split())
    assert rc == 0
    return json.loads(out.read_text())


def test_voc_lowshot_from_a_fashion_mnist_run(fmnist_run, voc_dir, tmp_path, capsys):
    rec = eval_json(fmnist_run, "lowshot", f"--dataset voc2007 --data-dir {voc_dir} --shots 1 2 --draws 2 "
                    "--val-per-class 2", tmp_path)
    assert rec["dataset"] == "voc2007" and rec["test_split"] == "test"
    assert rec["settings"]["metric"] == "mAP" and rec["settings"]["train_split"] == "trainval"
    assert rec["settings"]["classes_scored"] == list(PRESENT)
    for k in ("1", "2"):
        entry = rec["results"]["per_shot"][k]
        assert len(entry["scores"]) == 2 and all(0.0 < s <= 100.0 for s in entry["scores"])
        assert all(c in [2.0**e for e in range(-5, 6)] for c in entry["costs"])
    assert rec["input_adaptation"]["channels"].startswith("3 -> 1")  # RGB -> grey for the 1-channel run
    assert "image_size" not in rec["input_adaptation"]  # VOC files decode straight to the run's 28 px
    out = capsys.readouterr().out
    assert "1-shot mAP %" in out and "classes scored" in out and "4 of 20" in out


def test_multilabel_only_through_lowshot(fmnist_run, voc_dir, capsys):
    rc = cli.main(f"eval knn {fmnist_run} --dataset voc2007 --data-dir {voc_dir} --no-progress".split())
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "multi-label; only `emanorm eval lowshot`" in err and len(err.splitlines()) == 1
    args = cli.build_parser().parse_args(
        f"eval lowshot {fmnist_run} --dataset voc2007 --data-dir {voc_dir} --labels-per-class 2".split()
    )
    with pytest.raises(UserError, match="multi-label: low-shot draws k positives per class itself"):
        args.func(args)


def test_single_label_transfer_to_rgb_data(fmnist_run, cifar10_dir, tmp_path):
    common = f"--dataset cifar10 --data-dir {cifar10_dir}"
    rec = eval_json(fmnist_run, "linear", f"{common} --lrs 1 --epochs 2", tmp_path)
    assert rec["dataset"] == "cifar10" and rec["run_config"]["dataset"] == "fashion_mnist"
    assert rec["input_adaptation"]["channels"].startswith("3 -> 1")
    assert rec["input_adaptation"]["image_size"].startswith("32 -> 28")
    assert rec["results"]["runs"][0]["num_train"] == 100
    # a count of the 30 stand-in test images (made grey, their colour-coded labels are not learnable)
    count = rec["results"]["top1"] * 30 / 100  # top1 is kept to 4 decimals: 26.6667 is 8.00001 images
    assert count == pytest.approx(round(count), abs=1e-3)
    rec = eval_json(fmnist_run, "lowshot", f"{common} --shots 1 2 --draws 2 --val-per-class 2", tmp_path)
    assert rec["settings"]["metric"] == "accuracy" and set(rec["results"]["per_shot"]) == {"1", "2"}
    # The run's own data needs no adaptation.
    rec = eval_json(fmnist_run, "knn", "--labels-per-class 4", tmp_path)
    assert rec["input_adaptation"] is None


def test_folder_tree_lowshot_for_inaturalist_style_data(fmnist_run, imagenet_dir, tmp_path):
    rec = eval_json(fmnist_run, "lowshot", f"--dataset folder --data-dir {imagenet_dir} --shots 1 2 "
                    "--draws 2 --val-per-class 2", tmp_path)
    assert rec["dataset"] == "folder" and rec["results"]["val_per_class"] == 2
    assert len(rec["results"]["per_shot"]["2"]["scores"]) == 2
    assert rec["input_adaptation"]["channels"].startswith("3 -> 1")
