"""Linear classification on cached frozen features, with a learning-rate search on a validation split.

Protocol (paper Sec. 5.2, adapted): SGD with momentum 0.9, 50 epochs, learning rate divided by 10 at
60% and 80% of training (epochs 30 and 40 of 50), best lr picked from a grid. The paper picks the lr
on ImageNet val; here it is picked on a stratified validation split carved from the *training*
labels, then the classifier is retrained on all training labels and evaluated once on the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from emanorm.evaluation.features import resolve_device
from emanorm.evaluation.knn import check_labels
from emanorm.evaluation.settings import DEFAULT_LINEAR_LRS, LinearSettings

__all__ = ["DEFAULT_LINEAR_LRS", "LinearSettings", "linear_probe", "train_linear"]
Model = TypeVar("Model")


def stratified_split(labels: Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split positions ``0..len(labels)-1`` into (train, val), about ``val_fraction`` of each class in val.

    Seeded and device-independent. A class with >= 2 samples gives at least one to val and keeps at
    least one for training; a class with a single sample stays in training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels).cpu().long()
    gen = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_val = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train = torch.cat(train_parts).sort().values if train_parts else torch.empty(0, dtype=torch.long)
    val = torch.cat(val_parts).sort().values if val_parts else torch.empty(0, dtype=torch.long)
    return train, val


def topk_accuracies(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` as fractions; k is capped at the number of classes."""
    if logits.shape[0] == 0:
        return {f"top{k}": 0.0 for k in ks}
    labels = labels.to(logits.device)
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred == labels[:, None]
    return {f"top{k}": float(correct[:, : min(k, maxk)].any(dim=1).float().mean()) for k in ks}


def milestones(epochs: int) -> list[int]:
    """The paper's lr drops (x0.1 at epochs 30 and 40 of 50), scaled to ``epochs``."""
    return sorted({max(1, round(epochs * 0.6)), max(1, round(epochs * 0.8))})


@torch.no_grad()
def predict_logits(model: nn.Module, features: Tensor, chunk: int = 65536) -> Tensor:
    """Logits of ``model`` over ``features`` in chunks (on the model's device)."""
    device = next(model.parameters()).device
    if features.shape[0] == 0:
        return torch.empty(0, model(torch.zeros(1, features.shape[1], device=device)).shape[1], device=device)
    return torch.cat([model(features[i : i + chunk].to(device)) for i in range(0, features.shape[0], chunk)])


def search_lr(
    lrs: Sequence[float], fit: Callable[[float], tuple[Model, bool]], validate: Callable[[Model], float]
) -> tuple[float, dict[str, float]]:
    """The learning-rate search of the linear and fine-tuning protocols: ``(best lr, {lr: score})``.

    ``lrs`` ascending and distinct; ``fit(lr)`` trains on the fit part of the labels and returns
    ``(model, diverged)``, ``validate(model)`` its top-1 on the validation part. A diverged lr scores
    -1; ties keep the smaller lr. A single lr is returned without training anything (scores ``{}``).
    """
    if len(lrs) == 1:
        return lrs[0], {}
    best_lr, best_acc = lrs[0], -2.0
    scores: dict[str, float] = {}
    for lr in lrs:
        model, diverged = fit(lr)
        acc = -1.0 if diverged else validate(model)
        scores[f"{lr:g}"] = acc
        if acc > best_acc:  # strict: ties keep the smaller lr
            best_lr, best_acc = lr, acc
    return best_lr, scores


def train_linear(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    lr: float,
    settings: LinearSettings | None = None,
    desc: str = "linear",
    **overrides: Any,
) -> tuple[nn.Linear, bool]:
    """Train a linear classifier on fixed features; returns ``(classifier, diverged)``.

    Initialised as in MoCo's linear protocol (weights N(0, 0.01), zero bias). Training stops early
    and reports ``diverged=True`` when the loss becomes non-finite (a too-large lr in the grid).
    """
    st = LinearSettings.resolve(settings, overrides)
    epochs, batch_size = st.epochs, st.batch_size
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = resolve_device(st.device)
    gen = torch.Generator().manual_seed(st.seed)
    x = features.to(device, torch.float32)
    y = labels.to(device).long()
    clf = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) * 0.01)
        clf.bias.zero_()
    clf.to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=st.momentum, weight_decay=st.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(epochs), gamma=0.1)
    n = x.shape[0]
    for _ in tqdm(range(epochs), desc=desc, disable=not st.progress, leave=False):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            return clf, True
        sched.step()
    return clf, False


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    settings: LinearSettings | None = None,
    **overrides: Any,
) -> dict[str, object]:
    """Linear evaluation of frozen features: lr search on a validation split, retrain, test once.

    With several ``lrs`` each is trained on the training features minus a stratified, seeded
    ``val_fraction`` validation split and scored (top-1) on that split; the best (ties: the smaller
    lr) is retrained on all training features and evaluated on the test features. A single lr skips
    the search. Returns fractions in [0, 1]: ``top1``, ``top5``, ``best_lr``, ``val_top1`` per lr
    (-1 for a diverged lr), and the sizes used. The test set is used only for the final evaluation.
    """
    st = LinearSettings.resolve(settings, overrides)
    lrs, seed = st.lrs, st.seed
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate")
    if any(lr <= 0 for lr in lrs):
        raise ValueError(f"learning rates must be > 0, got {list(lrs)}")
    train_labels = check_labels(train_labels, train_feats.shape[0], "train_labels", num_classes)
    test_labels = check_labels(test_labels, test_feats.shape[0], "test_labels", num_classes)
    if train_feats.shape[0] == 0:
        raise ValueError("linear_probe needs at least one training feature")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max() if len(test_labels) else 0)) + 1
    lrs = sorted(set(float(lr) for lr in lrs))
    fit_idx, val_idx = stratified_split(train_labels, st.val_fraction, seed)
    if len(lrs) > 1 and len(val_idx) == 0:
        raise ValueError(
            "too few training labels to carve a validation split for the lr search "
            "(every class has a single sample); pass a single learning rate"
        )

    def fit(lr: float) -> tuple[nn.Linear, bool]:
        return train_linear(
            train_feats[fit_idx],
            train_labels[fit_idx],
            num_classes,
            lr=lr,
            settings=st,
            desc=f"linear lr={lr:g}",
        )

    def validate(clf: nn.Linear) -> float:
        return topk_accuracies(predict_logits(clf, train_feats[val_idx]), train_labels[val_idx], (1,))["top1"]

    best_lr, val_top1 = search_lr(lrs, fit, validate)
    clf, diverged = train_linear(
        train_feats, train_labels, num_classes, lr=best_lr, settings=st, desc=f"linear final lr={best_lr:g}"
    )
    result: dict[str, object] = topk_accuracies(predict_logits(clf, test_feats), test_labels, (1, 5))
    result.update(
        best_lr=best_lr,
        val_top1=val_top1,
        diverged=diverged,
        epochs=st.epochs,
        batch_size=st.batch_size,
        num_train=int(train_feats.shape[0]),
        num_val=len(val_idx) if len(lrs) > 1 else 0,
        num_test=int(test_feats.shape[0]),
        num_classes=num_classes,
    )
    return result
