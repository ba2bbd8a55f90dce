"""Tests of emanorm.evaluation: kNN, retrieval, linear, fine-tune, low-shot, export, and the commands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from emanorm.cli.evaluate import add_eval_parsers, add_export_parser
from emanorm.data.datasets import FASHION_MNIST_SYSTEM_DIR
from emanorm.errors import UserError
from emanorm.evaluation import (
    MulticlassSVMTask,
    TensorImages,
    assert_frozen,
    assert_state_unchanged,
    context,
    dataset_batches,
    export_backbone,
    extract_features,
    finetune,
    knn_predict,
    linear_probe,
    load_exported,
    lowshot_svm,
    protocols,
    retrieval_scores,
    state_snapshot,
    stratified_split,
    train_finetune,
)

# --- brute-force references ------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_knn(train, labels, queries, k, temperature, num_classes):
    train, queries, labels = _unit(train.numpy()), _unit(queries.numpy()), labels.numpy()
    out = []
    for q in queries:
        sims = train @ q
        order = np.argsort(-sims, kind="stable")[: min(k, len(train))]
        votes = np.zeros(num_classes)
        for j in order:
            votes[labels[j]] += math.exp(sims[j] / temperature)
        out.append(int(np.argmax(votes)))  # first maximum: ties go to the smaller class
    return torch.tensor(out)


def ref_retrieval(db, db_labels, queries, q_labels, topk):
    db, queries = _unit(db.numpy()), _unit(queries.numpy())
    db_labels, q_labels = db_labels.numpy(), q_labels.numpy()
    aps, recalls = [], []
    for q, y in zip(queries, q_labels, strict=True):
        order = np.argsort(-(db @ q), kind="stable")[: min(topk, len(db))]
        rel = db_labels[order] == y
        precision = np.cumsum(rel) / np.arange(1, len(order) + 1)
        aps.append(precision[rel].mean() if rel.any() else 0.0)
        total = (db_labels == y).sum()
        recalls.append(rel.sum() / total if total else 0.0)
    return {"map": float(np.mean(aps)), "recall": float(np.mean(recalls))}


# --- kNN -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 20, 500])  # 500 > database size: use everything
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_knn_matches_brute_force(k, temperature):
    gen = torch.Generator().manual_seed(k)
    train = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (60,), generator=gen)
    queries = torch.randn(25, 8, generator=gen, dtype=torch.float64)
    pred = knn_predict(train, labels, queries, k=k, temperature=temperature, num_classes=5)
    assert pred.dtype == torch.long
    assert torch.equal(pred, ref_knn(train, labels, queries, k, temperature, 5))


def test_knn_chunked_equals_unchunked_and_scale_invariant():
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(50, 6, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    queries = torch.randn(23, 6, generator=gen)
    full = knn_predict(train, labels, queries, k=7, chunk_size=10_000)
    for chunk in (1, 4, 22):
        assert torch.equal(knn_predict(train, labels, queries, k=7, chunk_size=chunk), full)
    # Features are L2-normalised inside: scaling rows changes nothing.
    scale = torch.rand(50, 1, generator=gen) * 10 + 0.1
    assert torch.equal(knn_predict(train * scale, labels, queries * 3, k=7), full)


def test_knn_votes_are_summed_exp_weights_and_ties_go_to_smaller_class():
    e = torch.eye(3)

    # One neighbour of class 1 at similarity 0.9, two of class 0 at 0.85 each (angles in the e0-e1 plane).
    def at(cos):
        return torch.tensor([cos, math.sqrt(1 - cos**2), 0.0])

    train = torch.stack([at(0.9), at(0.85), at(0.85) * torch.tensor([1.0, -1.0, 1.0])])
    labels = torch.tensor([1, 0, 0])
    q = e[:1]
    # T=0.07: exp(0.9/T) > 2 exp(0.85/T): the single nearest neighbour wins; T=1: the two win.
    assert knn_predict(train, labels, q, k=3, temperature=0.07).item() == 1
    assert knn_predict(train, labels, q, k=3, temperature=1.0).item() == 0
    # An exact tie in votes: two neighbours at the same similarity with labels 2 and 1 -> class 1.
    train = torch.stack([e[0], e[1]])
    q = (e[0] + e[1])[None]
    assert knn_predict(train, torch.tensor([2, 1]), q, k=2).item() == 1
    assert knn_predict(train, torch.tensor([1, 2]), q, k=2).item() == 1


def test_knn_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(x, torch.zeros(4, dtype=torch.long), x, k=0)
    with pytest.raises(ValueError, match=">= 0"):
        knn_predict(x, torch.tensor([0, 1, -1, 0]), x)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_predict(x, torch.tensor([0, 1, 2, 0]), x, num_classes=2)
    with pytest.raises(ValueError, match="dim"):
        knn_predict(x, torch.zeros(4, dtype=torch.long), torch.randn(2, 5))


# --- retrieval -------------------------------------------------------------------------------------------


def test_retrieval_hand_computed():
    angles = torch.tensor([10.0, 20.0, 30.0, 40.0]) * math.pi / 180
    db = torch.stack([angles.cos(), angles.sin()], dim=1)
    db_labels = torch.tensor([1, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    q_labels = torch.tensor([1, 2])  # label 2 is nowhere in the database
    s = retrieval_scores(db, db_labels, queries, q_labels, topk=3)
    # query 0: relevance 1,0,1 in the top 3 -> AP (1/1 + 2/3) / 2, recall 2/3; query 1: 0 and 0.
    assert s["map"] == pytest.approx((1 + 2 / 3) / 2 / 2)
    assert s["recall"] == pytest.approx((2 / 3) / 2)
    # topk beyond the database: everything is retrieved, recall 1 for query 0.
    s = retrieval_scores(db, db_labels, queries, q_labels, topk=100)
    assert s["map"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3 / 2)
    assert s["recall"] == pytest.approx(0.5)


@pytest.mark.parametrize("topk", [1, 10, 1000])
def test_retrieval_matches_brute_force_and_chunking(topk):
    gen = torch.Generator().manual_seed(topk)
    db = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    db_labels = torch.randint(0, 4, (80,), generator=gen)
    queries = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    q_labels = torch.randint(0, 6, (30,), generator=gen)  # labels 4, 5: no relevant item
    assert (q_labels >= 4).any()
    expected = ref_retrieval(db, db_labels, queries, q_labels, topk)
    for chunk in (None, 1, 7):
        got = retrieval_scores(db, db_labels, queries, q_labels, topk=topk, chunk_size=chunk)
        assert got["map"] == pytest.approx(expected["map"], abs=1e-12)
        assert got["recall"] == pytest.approx(expected["recall"], abs=1e-12)


# --- features and the frozen check -----------------------------------------------------------------------


def tiny_backbone(channels: int = 1) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net.feature_dim = 4
    return net


class ToFloat(nn.Module):
    """Stand-in for build_augmentation("none"): uint8 -> float in [0, 1]."""

    def forward(self, x):
        return x.float() / 255


class RandomFlip(ToFloat):
    """Stand-in for the weak augmentation: per-sample random horizontal flip."""

    def forward(self, x):
        x = super().forward(x)
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


def test_extract_features_eval_mode_labels_and_no_state_change():
    net = tiny_backbone().train()
    images = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8)
    data = TensorImages(images, torch.arange(10) % 3)
    before = state_snapshot(net)
    feats, labels = extract_features(
        net, dataset_batches(data, torch.tensor([9, 0, 4]), 2), "cpu", transform=ToFloat(), progress=False
    )
    assert feats.shape == (3, 4) and feats.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1]
    assert_state_unchanged(net, before)  # eval mode: BN running stats untouched
    assert net.training  # the caller's mode is restored
    net.eval()
    with torch.no_grad():
        expected = net(images[[9, 0, 4]].float() / 255)
    assert torch.allclose(feats, expected)
    # dict batches without labels
    feats, labels = extract_features(net, [{"x": images[:4].float()}], "cpu", progress=False)
    assert labels.tolist() == [-1] * 4


def test_frozen_check_catches_bn_statistics_and_weights():
    net = tiny_backbone().train()
    with pytest.raises(RuntimeError, match=r"'1\.running_mean'"), assert_frozen(net):
        net(torch.randn(4, 1, 5, 5))  # train mode: BN statistics move
    net.eval()
    with assert_frozen(net):
        net(torch.randn(4, 1, 5, 5))  # eval mode: fine
    snap = state_snapshot(net)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(RuntimeError, match=r"'0\.weight'"):
        assert_state_unchanged(net, snap)


# --- linear probe ----------------------------------------------------------------------------------------


def clusters(n_per_class, num_classes, dim, seed, spread=0.6):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 2
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_stratified_split():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 1)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(31))
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]  # singleton class stays in train
    again = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(again[1], val)
    assert not torch.equal(stratified_split(labels, 0.1, seed=4)[1], val)


def test_linear_probe_learns_and_never_looks_at_the_test_set_for_the_lr():
    x, y = clusters(30, 3, 8, seed=0)
    xt, yt = clusters(10, 3, 8, seed=1)
    kw = dict(lrs=(0.01, 0.3, 3.0), epochs=6, batch_size=16, seed=0, device="cpu", progress=False)
    res = linear_probe(x, y, xt, yt, **kw)
    assert res["top1"] > 0.9 and res["top5"] == 1.0
    assert res["num_val"] == 9 and res["num_train"] == 90
    assert res["best_lr"] in (0.01, 0.3, 3.0) and set(res["val_top1"]) == {"0.01", "0.3", "3"}
    # Garbage test labels change the test score, not the lr choice or the validation scores.
    shuffled = linear_probe(x, y, xt, (yt + 1) % 3, **kw)
    assert shuffled["best_lr"] == res["best_lr"] and shuffled["val_top1"] == res["val_top1"]
    assert shuffled["top1"] < 0.2
    # A single lr skips the search.
    single = linear_probe(x, y, xt, yt, **{**kw, "lrs": (0.3,)})
    assert single["val_top1"] == {} and single["best_lr"] == 0.3


def test_linear_probe_reports_divergence_and_needs_a_validation_split():
    x, y = clusters(5, 2, 4, seed=0)
    # Huge lrs: the first steps push the logits past float32 range and the loss becomes NaN.
    res = linear_probe(x * 100, y, x, y, lrs=(1e37, 3e37), epochs=3, progress=False)
    assert res["val_top1"] == {"1e+37": -1.0, "3e+37": -1.0} and res["diverged"]
    with pytest.raises(ValueError, match="validation split"):
        linear_probe(x[[0, 5]], y[[0, 5]], x, y, lrs=(0.1, 1.0), progress=False)  # one label per class


# --- fine-tuning -----------------------------------------------------------------------------------------


def bright_dark_images(n, seed):
    """Class 1 images are bright, class 0 dark: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 170, 60)
    images = (base + torch.randint(-40, 40, (n, 1, 6, 6), generator=gen)).clamp(0, 255).to(torch.uint8)
    return TensorImages(images, labels)


def test_finetune_separate_learning_rates():
    data = bright_dark_images(16, 0)
    net = tiny_backbone()
    before = state_snapshot(net)
    model, diverged = train_finetune(
        net,
        data,
        torch.arange(16),
        num_classes=2,
        augment=RandomFlip(),
        backbone_lr=0.0,
        classifier_lr=0.5,
        epochs=2,
        batch_size=8,
        device="cpu",
        progress=False,
    )
    assert not diverged
    assert_state_unchanged(net, before)  # the input backbone is copied, never trained
    # backbone lr 0: the copy's weights did not move; the classifier's did.
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, before[name]), name
    assert model.fc.weight.abs().max() > 0.05  # initialised N(0, 0.01), moved by lr 0.5


def test_finetune_searches_backbone_lr_on_validation_and_is_reproducible(caplog):
    train, test = bright_dark_images(40, 0), bright_dark_images(12, 1)
    kw = dict(
        num_classes=2,
        augment=RandomFlip(),
        eval_transform=ToFloat(),
        backbone_lrs=(1e-3, 1e-2),
        classifier_lr=0.5,
        epochs=6,
        batch_size=10,
        device="cpu",
        progress=False,
        seed=0,
    )
    torch.manual_seed(0)
    net = tiny_backbone()
    before = state_snapshot(net)
    res = finetune(net, train, torch.arange(40), test, **kw)
    assert_state_unchanged(net, before)
    assert set(res["val_top1"]) == {"0.001", "0.01"} and res["best_backbone_lr"] in (1e-3, 1e-2)
    assert 0.0 <= res["top1"] <= 1.0 and res["top5"] == 1.0 and res["num_train"] == 40
    assert res["top1"] >= 0.75  # bright vs dark is easy
    assert res["steps"] == 24 and "only 24 optimizer steps" in caplog.text
    assert finetune(net, train, torch.arange(40), test, **kw)["top1"] == res["top1"]


# --- low-shot --------------------------------------------------------------------------------------------


class SpyTask(MulticlassSVMTask):
    """Records every array the SVMs are fit on or scored on, in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def fit(self, x, y, cost):
        self.calls.append(("fit", x.copy()))
        return super().fit(x, y, cost)

    def score(self, model, x, y):
        self.calls.append(("score", x.copy()))
        return super().score(model, x, y)


def _lowshot_data():
    x, y = clusters(12, 4, 6, seed=0, spread=1.5)
    xt, yt = clusters(9, 4, 6, seed=1, spread=1.5)
    return x, y, xt, yt


COSTS = (0.05, 1.0, 20.0)


def test_lowshot_c_selection_never_touches_the_test_set():
    x, y, xt, yt = _lowshot_data()
    spy = SpyTask()
    res = lowshot_svm(
        x, y, xt, yt, shots=(1, 4), draws=2, costs=COSTS, val_per_class=3, task=spy, progress=False
    )
    test_rows = _unit(xt.double().numpy())

    def is_test(a):
        return a.shape == test_rows.shape and np.allclose(a, test_rows)

    def overlaps_test(a):
        return bool(np.isclose(a[:, None, :], test_rows[None]).all(-1).any())

    # Per (k, draw): len(COSTS) fits, len(COSTS) validation scores, then exactly one test score.
    block = 2 * len(COSTS) + 1
    assert len(spy.calls) == 4 * block
    for b in range(4):
        calls = spy.calls[b * block : (b + 1) * block]
        *selection, final = calls
        assert final[0] == "score" and is_test(final[1])
        assert not any(overlaps_test(a) for _, a in selection)
    # And the choice of C cannot depend on the test set: adversarial test labels give the same C's.
    flipped = lowshot_svm(
        x, y, xt, (yt + 1) % 4, shots=(1, 4), draws=2, costs=COSTS, val_per_class=3, progress=False
    )
    plain = lowshot_svm(x, y, xt, yt, shots=(1, 4), draws=2, costs=COSTS, val_per_class=3, progress=False)
    for k in ("1", "4"):
        assert flipped["per_shot"][k]["costs"] == plain["per_shot"][k]["costs"]
        assert flipped["per_shot"][k]["val_scores"] == plain["per_shot"][k]["val_scores"]
    assert plain["per_shot"]["4"]["mean"] > flipped["per_shot"]["4"]["mean"]
    assert res["per_shot"]["4"]["costs"] == plain["per_shot"]["4"]["costs"]


def test_lowshot_samples_disjoint_nested_and_reproducible():
    labels = np.repeat(np.arange(3), 10)
    task = MulticlassSVMTask()
    train, val = task.sample(labels, (1, 2, 4), 5, np.random.default_rng([7, 0]))
    assert set(train[1]) <= set(train[2]) <= set(train[4])  # nested shots within a draw
    assert set(train[4]).isdisjoint(val)
    assert np.bincount(labels[train[4]]).tolist() == [4, 4, 4]
    assert np.bincount(labels[val]).tolist() == [5, 5, 5]
    small = task.sample(labels, (8,), 5, np.random.default_rng(0))[1]  # only 2 left per class for val
    assert np.bincount(labels[small]).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="class 0 has 10"):
        task.sample(labels, (10,), 5, np.random.default_rng(0))

    x, y, xt, yt = _lowshot_data()
    kw = dict(shots=(1, 2), draws=3, costs=COSTS, val_per_class=2, progress=False)
    a = lowshot_svm(x, y, xt, yt, seed=5, **kw)
    b = lowshot_svm(x, y, xt, yt, seed=5, **kw)
    assert a == b
    assert a["per_shot"]["1"]["std"] == pytest.approx(np.std(a["per_shot"]["1"]["scores"]))
    c = lowshot_svm(x, y, xt, yt, seed=6, **kw)
    assert any(a["per_shot"][k]["scores"] != c["per_shot"][k]["scores"] for k in ("1", "2"))
    # A feature callable gives the same numbers and is asked only for the rows the draws use.
    asked = []

    def source(idx):
        asked.append(idx)
        return x[torch.as_tensor(idx)]

    assert lowshot_svm(source, y, xt, yt, seed=5, **kw) == a
    assert len(asked) == 1 and len(asked[0]) <= 3 * 4 * (2 + 2)


# --- export ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
def test_export_strict_loads_into_torchvision(tmp_path, arch, fmt):
    torch.manual_seed(0)
    backbone = getattr(torchvision.models, arch)()
    backbone.fc = nn.Identity()
    with torch.no_grad():  # non-default BN statistics, so a lost buffer would show
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(7)
    path = export_backbone(backbone, tmp_path / f"b.{'pth' if fmt == 'torchvision' else 'safetensors'}", fmt)
    if fmt == "torchvision":
        state = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    target = getattr(torchvision.models, arch)()
    target.fc = nn.Identity()
    target.load_state_dict(state, strict=True)
    for k, v in backbone.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert load_exported(path).keys() == state.keys()


def test_export_excludes_classifier_and_wrapper_prefixes(tmp_path):
    classifier = torchvision.models.resnet18(num_classes=7)
    path = export_backbone(classifier, tmp_path / "c.pth")
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    target = torchvision.models.resnet18()
    target.fc = nn.Identity()
    target.load_state_dict(state, strict=True)

    class DDPLike(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torchvision.models.resnet18()
    inner.fc = nn.Identity()
    state = torch.load(export_backbone(DDPLike(inner), tmp_path / "d.pth"), weights_only=True)
    target.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="torchvision, safetensors"):
        export_backbone(inner, tmp_path / "e.onnx", "onnx")


# --- commands, with the upstream pieces faked ------------------------------------------------------------


class MovingBackbone(nn.Module):
    """A broken 'frozen' backbone: it updates a buffer on every forward, even in eval mode."""

    def __init__(self):
        super().__init__()
        self.net = tiny_backbone()
        self.register_buffer("calls", torch.zeros(()))
        self.feature_dim = 4

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run directory plus fakes for load_backbone, load_dataset, build_augmentation, select_labeled."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    info = SimpleNamespace(name="fake", num_classes=2, channels=1, image_size=6)
    splits = {"train": bright_dark_images(48, 0), "test": bright_dark_images(20, 1)}
    for split in splits.values():
        split.info = info
    state = {"backbone": tiny_backbone}

    def load_backbone(path, which):
        if not Path(path).exists():
            raise UserError(f"no run at {path}")
        torch.manual_seed(0 if which == "teacher" else 1)
        return state["backbone"](), {"dataset": "fake", "seed": 0, "backbone": "tiny", "method": "byol"}

    def load_dataset(name, split, data_dir):
        if name != "fake" or split not in splits:
            raise ValueError(f"unknown split {split!r}")
        return splits[split]

    def select_labeled(targets, num_classes, *, labels_per_class=None, fraction=None, index_csv=None, seed=0):
        if index_csv is not None:
            return torch.tensor([int(v) for v in Path(index_csv).read_text().split()[1:]])
        rng = np.random.RandomState(seed)
        t = targets.numpy()
        per = labels_per_class or max(1, round(fraction * (t == 0).sum()))
        return torch.from_numpy(
            np.sort(
                np.concatenate([rng.permutation(np.flatnonzero(t == c))[:per] for c in range(num_classes)])
            )
        )

    # the fakes stand in where the evaluation workflow looks its upstream pieces up
    monkeypatch.setattr(context, "load_backbone", load_backbone)
    monkeypatch.setattr(context, "load_dataset", load_dataset)

    def augmentation(preset, _info):
        return RandomFlip() if preset == "weak" else ToFloat()

    monkeypatch.setattr(context, "build_augmentation", augmentation)
    monkeypatch.setattr(protocols, "build_augmentation", augmentation)
    monkeypatch.setattr(context, "select_labeled", select_labeled)
    return SimpleNamespace(dir=run, state=state)


def run_cli(command: str) -> int:
    """Parse ``command`` (whitespace-separated) with our parsers and run its handler."""
    parser = argparse.ArgumentParser(prog="emanorm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parsers(sub)
    add_export_parser(sub)
    args = parser.parse_args(command.split())
    return args.func(args)


def test_eval_commands_write_json(fake_run, capsys):
    run = fake_run.dir
    assert run_cli(f"eval knn {run} --no-progress --k 5") == 0
    rec = json.loads((run / "eval_knn_teacher.json").read_text())
    assert rec["protocol"] == "knn" and rec["dataset"] == "fake" and rec["test_split"] == "test"
    assert rec["results"]["num_database"] == 48 and rec["results"]["num_queries"] == 20
    assert rec["results"]["top1"] == 100.0 and rec["run_config"]["method"] == "byol"  # bright vs dark
    assert "top-1 %" in capsys.readouterr().out

    ckpt = run / "checkpoints" / "last.pt"  # a checkpoint file resolves to its run directory
    assert run_cli(f"eval retrieval {ckpt} --no-progress --topk 10 --which student") == 0
    rec = json.loads((run / "eval_retrieval_student.json").read_text())
    assert rec["unit"] == "percent"  # every score in eval_*.json is a percent (docs/evaluation.md)
    assert rec["results"]["map"] == 100.0  # every bright image ranks above every dark one
    assert 0.0 < rec["results"]["recall"] <= round(100 * 10 / 24, 4)

    out = run / "lin.json"
    cli = (
        f"eval linear {run} --no-progress --labels-per-class 8 --lrs 0.1 1 --epochs 3 --repeats 2 --out {out}"
    )
    assert run_cli(cli) == 0
    rec = json.loads(out.read_text())
    assert rec["labels"] == {"labels_per_class": 8} and len(rec["results"]["runs"]) == 2
    assert all(r["num_train"] == 16 for r in rec["results"]["runs"])
    assert rec["settings"]["seeds"] == [0, 1]

    assert run_cli(f"eval linear {run} --no-progress --label-fraction 50% --lrs 1 --epochs 2") == 0
    rec = json.loads((run / "eval_linear_teacher_50pct.json").read_text())
    assert rec["results"]["runs"][0]["num_train"] == 24

    csv = run / "subset.csv"
    csv.write_text("Index\n" + "\n".join(str(i) for i in range(0, 48, 4)) + "\n")
    assert run_cli(f"eval knn {run} --no-progress --label-index-csv {csv}") == 0
    rec = json.loads((run / "eval_knn_teacher_subset.json").read_text())
    assert rec["labels"] == {"index_csv": str(csv)} and rec["results"]["num_database"] == 12

    assert run_cli(f"eval lowshot {run} --no-progress --shots 1 2 --draws 2 --val-per-class 3") == 0
    per_shot = json.loads((run / "eval_lowshot_teacher.json").read_text())["results"]["per_shot"]
    assert set(per_shot) == {"1", "2"} and len(per_shot["2"]["scores"]) == 2

    cli = f"eval finetune {run} --labels-per-class 10 --backbone-lrs 0.01 --epochs 2 --batch-size 8"
    assert run_cli(cli + " --no-progress") == 0
    rec = json.loads((run / "eval_finetune_teacher_10perclass.json").read_text())
    assert rec["results"]["runs"][0]["best_backbone_lr"] == 0.01 and rec["settings"]["augmentation"] == "weak"


def test_linear_command_runs_the_frozen_check(fake_run):
    fake_run.state["backbone"] = MovingBackbone
    with pytest.raises(RuntimeError, match="'calls' changed"):
        run_cli(f"eval linear {fake_run.dir} --no-progress --lrs 1 --epochs 1")


def test_eval_user_errors(fake_run, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no run"):
        run_cli(f"eval knn {tmp_path / 'missing'} --no-progress")
    with pytest.raises(UserError, match="cannot load split 'train' of dataset 'other'"):
        run_cli(f"eval knn {fake_run.dir} --dataset other --no-progress")
    with pytest.raises(UserError, match="no 'test' or 'val' split"):
        context.load_test_split("other", "auto", None)
    with pytest.raises(UserError, match="cannot load split 'val'"):
        run_cli(f"eval knn {fake_run.dir} --test-split val --no-progress")
    with pytest.raises(UserError, match="validation split"):
        run_cli(f"eval linear {fake_run.dir} --no-progress --labels-per-class 1 --lrs 0.1 1")
    with pytest.raises(SystemExit):
        run_cli(f"eval linear {fake_run.dir} --labels-per-class 2 --label-fraction 0.1")
    with pytest.raises(SystemExit):
        run_cli(f"eval knn {fake_run.dir} --label-fraction 150%")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            run_cli(f"eval knn {fake_run.dir} --device cuda")
    monkeypatch.setattr(context, "load_backbone", lambda path, which: (tiny_backbone(), {}))
    with pytest.raises(UserError, match="pass --dataset"):
        run_cli(f"eval knn {fake_run.dir}")


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
def test_export_command(fake_run, fmt, capsys):
    assert run_cli(f"export {fake_run.dir} --which student --format {fmt}") == 0
    path = fake_run.dir / "export" / f"backbone_student.{'pth' if fmt == 'torchvision' else 'safetensors'}"
    state = load_exported(path)
    net = tiny_backbone()
    net.load_state_dict(state, strict=True)
    assert str(path) in capsys.readouterr().out


# --- end to end on the real data set ------------------------------------------------------------------------
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="apt-get install dataset-fashion-mnist")


@pytest.mark.slow
@needs_fashion_mnist
def test_commands_end_to_end_on_fashion_mnist(tmp_path, monkeypatch):
    """Every command on real Fashion-MNIST through emanorm.data and a real backbone (checkpoint faked)."""
    from emanorm import models

    run = tmp_path / "run"
    run.mkdir()

    def load_backbone(path, which):
        torch.manual_seed(0)
        backbone = models.build_backbone("small", in_channels=1, image_size=28)
        return backbone, {"dataset": "fashion_mnist", "seed": 0}

    monkeypatch.setattr(context, "load_backbone", load_backbone)
    common = "--no-progress --device cpu --batch-size 512"
    assert run_cli(f"eval knn {run} --labels-per-class 100 {common}") == 0
    top1 = json.loads((run / "eval_knn_teacher_100perclass.json").read_text())["results"]["top1"]
    # percent; a random small CNN already separates Fashion-MNIST well (anchors: ~85% with all data)
    assert top1 > 50
    assert run_cli(f"eval retrieval {run} --labels-per-class 50 --topk 20 {common}") == 0
    assert run_cli(f"eval linear {run} --labels-per-class 20 --lrs 0.3 3 --epochs 5 {common}") == 0
    assert run_cli(f"eval lowshot {run} --shots 1 2 --draws 2 {common}") == 0
    assert run_cli(f"eval finetune {run} --labels-per-class 4 --backbone-lrs 0.01 --epochs 1 {common}") == 0
    assert run_cli(f"export {run} --format safetensors") == 0


@pytest.mark.slow
@needs_fashion_mnist
def test_commands_on_a_trained_run(tmp_path):
    """A real run directory from the trainer, evaluated and exported through the real CLI and loader."""
    from emanorm import cli
    from emanorm.train import restore as recipe

    run = tmp_path / "run"
    train = "--method byol --dataset fashion_mnist --backbone small --max-steps 5 --batch-size 32"
    assert cli.main(f"train {train} --out {run} --device cpu --no-progress".split()) == 0
    _, config = recipe.load_backbone(run, which="teacher")
    assert config["dataset"] == "fashion_mnist"
    for which in ("teacher", "student"):
        assert cli.main(f"eval knn {run} --which {which} --labels-per-class 50 --no-progress".split()) == 0
        rec = json.loads((run / f"eval_knn_{which}_50perclass.json").read_text())
        assert rec["results"]["num_queries"] == 10_000 and rec["run_config"]["method"] == "byol"
    assert cli.main(f"eval linear {run} --labels-per-class 10 --lrs 1 --epochs 2 --no-progress".split()) == 0
    assert cli.main(f"export {run} --which teacher --format torchvision".split()) == 0
    state = torch.load(run / "export" / "backbone_teacher.pth", weights_only=True)
    fresh, _ = recipe.load_backbone(run, which="student")
    fresh.load_state_dict(state, strict=True)  # the teacher's weights load into a rebuilt backbone
