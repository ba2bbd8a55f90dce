"""Low-shot classification with linear SVMs on frozen features (paper Table 5, following [16, 30]).

For each number of shots k and each draw: sample k training images per class, fit a linear SVM on
their L2-normalised features for every cost C in the grid, keep the C that scores best on a
validation subset of the *training* set that is disjoint from the k-shot samples, and score that
SVM once on the test set. The test set never takes part in choosing C.

The per-task pieces (how samples are drawn, how an SVM is fit and scored) live in a
:class:`LowShotTask`: :class:`MulticlassSVMTask` for single-label targets (accuracy) and
:class:`MultiLabelSVMTask` for multi-label ones (one binary SVM per class, mean average precision,
as for VOC07).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC
from torch import Tensor
from tqdm.auto import tqdm

from emanorm.catalog import DEFAULT_SHOTS

DEFAULT_COSTS: np.ndarray = 2.0 ** np.arange(-5, 6)


class LowShotTask(Protocol):
    """What :func:`lowshot_svm` needs to know about a kind of target (single- or multi-label)."""

    def sample(
        self, labels: np.ndarray, shots: Sequence[int], val_per_class: int, rng: np.random.Generator
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Return ({k: training indices}, validation indices), the validation disjoint from all of them."""
        ...

    def fit(self, x: np.ndarray, y: np.ndarray, cost: float) -> Any: ...

    def score(self, model: Any, x: np.ndarray, y: np.ndarray) -> float: ...


class _LinearSVCTask:
    """What the two SVM tasks share: the ``LinearSVC`` settings and how one is fit."""

    def __init__(self, max_iter: int = 2000, random_state: int = 0) -> None:
        self.max_iter = max_iter
        self.random_state = random_state

    def _fit_svc(self, x: np.ndarray, y: np.ndarray, cost: float) -> LinearSVC:
        svm = LinearSVC(C=cost, max_iter=self.max_iter, random_state=self.random_state)
        with warnings.catch_warnings():
            # Few samples and a large C often stop at max_iter; the C search copes with a slightly
            # under-converged SVM, and the warning would flood the output.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return svm.fit(x, y)


class MulticlassSVMTask(_LinearSVCTask):
    """Single-label targets: k images per class, one-vs-rest ``LinearSVC``, accuracy."""

    def sample(
        self, labels: np.ndarray, shots: Sequence[int], val_per_class: int, rng: np.random.Generator
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """One permutation per class: the first k are the k-shot set (nested across k), the last
        ``val_per_class`` (fewer if the class is small) the validation set, so the two never overlap."""
        max_k = max(shots)
        train: dict[int, list[np.ndarray]] = {k: [] for k in shots}
        val: list[np.ndarray] = []
        for c in np.unique(labels[labels >= 0]):  # -1 marks an unlabeled image
            members = rng.permutation(np.flatnonzero(labels == c))
            if len(members) < max_k + 1:
                raise ValueError(
                    f"class {c} has {len(members)} training samples; {max_k} shots need at least {max_k + 1} "
                    "(one more for the validation subset that picks C)"
                )
            n_val = min(val_per_class, len(members) - max_k)
            val.append(members[len(members) - n_val :])
            for k in shots:
                train[k].append(members[:k])
        return {k: np.sort(np.concatenate(v)) for k, v in train.items()}, np.sort(np.concatenate(val))

    def fit(self, x: np.ndarray, y: np.ndarray, cost: float) -> LinearSVC:
        return self._fit_svc(x, y, cost)

    def score(self, model: LinearSVC, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(model.predict(x) == y))


class MultiLabelSVM:
    """One fitted binary ``LinearSVC`` per class (the classes with positives in the training labels)."""

    def __init__(self, classes: list[int], svms: list[LinearSVC]) -> None:
        self.classes, self.svms = classes, svms

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Scores ``(N, len(classes))``: the signed distance to each class's hyperplane."""
        return np.stack([svm.decision_function(x) for svm in self.svms], axis=1)


def _multilabel(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"multi-label {what} labels must be (N, num_classes), got shape {labels.shape}")
    bad = np.setdiff1d(np.unique(labels), (-1, 0, 1))
    if bad.size:
        raise ValueError(f"multi-label {what} labels must be 1, -1 or 0 (difficult), got {bad[:5].tolist()}")
    return labels


def class_average_precisions(model: MultiLabelSVM, x: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """AP of each class of ``model`` that has a positive and a negative among ``labels`` != 0.

    ``labels`` ``(N, C)``: 1 positive, -1 negative, 0 difficult (left out of that class's AP).
    AP is scikit-learn's ``average_precision_score`` (precision summed over the recall steps, no
    interpolation), not the VOC07 devkit's 11-point interpolated AP.
    """
    labels = _multilabel(labels, "evaluation")
    scores = model.decision_function(x)
    aps = {}
    for col, c in enumerate(model.classes):
        keep = labels[:, c] != 0
        truth = labels[keep, c] == 1
        if truth.any() and not truth.all():
            aps[c] = float(average_precision_score(truth, scores[keep, col]))
    return aps


class MultiLabelSVMTask(_LinearSVCTask):
    """Multi-label targets (VOC07): labels ``(N, C)`` in {1, -1, 0 = difficult}; one binary
    ``LinearSVC`` per class, scored by the mean over classes of the average precision.

    Sampling: each class's positive training images are shuffled once per draw; the first k are
    that class's k shots and the k-shot training set is the union over classes (nested across k).
    Every class's SVM is fit on the whole union: its positives are the union's images labeled 1
    for it (k or more), its negatives those labeled -1, and difficult ones (0) are left out. The
    validation subset takes up to ``val_per_class`` further positives per class from images
    outside every k-shot set, and is scored by mAP like the test set. Classes without a positive
    training image get no SVM and are not scored (none in VOC07).
    """

    def sample(
        self, labels: np.ndarray, shots: Sequence[int], val_per_class: int, rng: np.random.Generator
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """({k: union of k positives per class}, validation indices outside every k-shot set)."""
        labels = _multilabel(labels, "training")
        max_k = max(shots)
        classes = [c for c in range(labels.shape[1]) if (labels[:, c] == 1).any()]
        if not classes:
            raise ValueError("no class has a positive training image")
        perms = {}
        for c in classes:
            positives = rng.permutation(np.flatnonzero(labels[:, c] == 1))
            if len(positives) < max_k + 1:
                raise ValueError(
                    f"class {c} has {len(positives)} positive training images; {max_k} shots need at least "
                    f"{max_k + 1} (one more for the validation subset that picks C)"
                )
            perms[c] = positives
        train = {k: np.unique(np.concatenate([perms[c][:k] for c in classes])) for k in shots}
        in_shots = np.zeros(len(labels), dtype=bool)
        in_shots[train[max_k]] = True
        val = []
        for c in classes:
            rest = perms[c][max_k:]
            rest = rest[~in_shots[rest]]  # a positive of c may be another class's shot
            if len(rest) == 0:
                raise ValueError(
                    f"class {c}: every positive training image beyond its {max_k} shots is a shot of "
                    "another class; none is left for the validation subset that picks C"
                )
            val.append(rest[len(rest) - min(val_per_class, len(rest)) :])
        return train, np.unique(np.concatenate(val))

    def fit(self, x: np.ndarray, y: np.ndarray, cost: float) -> MultiLabelSVM:
        y = _multilabel(y, "training")
        classes, svms = [], []
        for c in range(y.shape[1]):
            keep = y[:, c] != 0
            truth = (y[keep, c] == 1).astype(np.int64)
            if not truth.any():
                continue  # absent from the training labels: no SVM, not scored
            if truth.all():
                raise ValueError(f"class {c} has no negative training image; a binary SVM needs both")
            svms.append(self._fit_svc(x[keep], truth, cost))
            classes.append(c)
        return MultiLabelSVM(classes, svms)

    def score(self, model: MultiLabelSVM, x: np.ndarray, y: np.ndarray) -> float:
        aps = class_average_precisions(model, x, y)
        if not aps:
            raise ValueError("no class has both a positive and a negative image to compute an AP on")
        return float(np.mean(list(aps.values())))


def _normalized_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    x = torch.as_tensor(x).detach().cpu().double()
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=1).numpy()


def select_cost(
    task: LowShotTask,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    costs: Sequence[float],
) -> tuple[float, Any, list[float]]:
    """Fit one SVM per cost and keep the best on the validation data (ties: the smaller C).

    Takes only training and validation data, so the test set cannot influence the choice.
    Returns ``(cost, fitted model, validation score per cost)``.
    """
    best: tuple[float, Any] | None = None
    best_score = -np.inf
    scores = []
    for cost in costs:
        model = task.fit(x_train, y_train, float(cost))
        score = task.score(model, x_val, y_val)
        scores.append(score)
        if score > best_score:
            best, best_score = (float(cost), model), score
    assert best is not None
    return best[0], best[1], scores


FeatureSource = Tensor | np.ndarray | Callable[[np.ndarray], Tensor | np.ndarray]


def lowshot_svm(
    train_feats: FeatureSource,
    train_labels: Tensor | np.ndarray,
    test_feats: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    draws: int = 5,
    costs: Sequence[float] | np.ndarray = DEFAULT_COSTS,
    seed: int = 0,
    *,
    val_per_class: int = 10,
    task: LowShotTask | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Low-shot linear-SVM evaluation; mean and std (over ``draws``) of the test score per k.

    The score is the ``task``'s: accuracy for :class:`MulticlassSVMTask` (the default, labels
    ``(N,)``), mAP for :class:`MultiLabelSVMTask` (labels ``(N, C)`` in {1, -1, 0}).

    Draw ``d`` uses ``numpy.random.default_rng([seed, d])``, so the same seed gives the same samples
    and the same numbers. ``train_feats`` may also be a callable mapping an array of training
    indices to their features: it is called once, with the indices the draws actually use, so a
    large training set (ImageNet) needs a forward pass over a few thousand images only.
    ``train_labels`` always covers the whole training set (-1 = unlabeled, never sampled).

    Returns ``{"per_shot": {"k": {"mean", "std", "scores", "costs", "val_scores"}}, "shots",
    "draws", "costs", "val_per_class", "seed"}``; scores are fractions in [0, 1] and ``std`` is the
    population std (ddof=0) over draws.
    """
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise ValueError(f"shots must be positive integers, got {shots}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if val_per_class < 1:
        raise ValueError(f"val_per_class must be >= 1, got {val_per_class}")
    costs = [float(c) for c in np.asarray(costs, dtype=float).ravel()]
    if not costs or min(costs) <= 0:
        raise ValueError(f"costs must be positive, got {costs}")
    task = task if task is not None else MulticlassSVMTask(random_state=seed)
    y_all = torch.as_tensor(train_labels).cpu().numpy()
    x_test = _normalized_numpy(test_feats)
    y_test = torch.as_tensor(test_labels).cpu().numpy()
    if len(y_test) != len(x_test):
        raise ValueError(f"test features have {len(x_test)} rows but test labels {len(y_test)}")
    # All draws are planned first: a callable feature source is then asked once for what they use.
    plan = [task.sample(y_all, shots, val_per_class, np.random.default_rng([seed, d])) for d in range(draws)]
    if callable(train_feats):
        needed = np.unique(np.concatenate([np.concatenate([*t.values(), v]) for t, v in plan]))
        x_needed = _normalized_numpy(train_feats(needed))
        if len(x_needed) != len(needed):
            raise ValueError(f"the feature callable returned {len(x_needed)} rows for {len(needed)} indices")
        # Row of each training index in x_pool (-1: not needed), instead of an (N, D) array.
        row = np.full(len(y_all), -1, dtype=np.int64)
        row[needed] = np.arange(len(needed))
        x_pool = x_needed
    else:
        x_pool = _normalized_numpy(train_feats)
        if len(x_pool) != len(y_all):
            raise ValueError(f"train features have {len(x_pool)} rows but train labels {len(y_all)}")
        row = np.arange(len(y_all))
    if x_pool.shape[1] != x_test.shape[1]:
        raise ValueError(f"train feature dim {x_pool.shape[1]} != test feature dim {x_test.shape[1]}")
    per_shot: dict[str, dict[str, list]] = {
        str(k): {"scores": [], "costs": [], "val_scores": []} for k in shots
    }
    bar = tqdm(total=draws * len(shots), desc="lowshot", disable=not progress, leave=False)
    for train_idx, val_idx in plan:
        for k in shots:
            idx = train_idx[k]
            cost, model, val_scores = select_cost(
                task, x_pool[row[idx]], y_all[idx], x_pool[row[val_idx]], y_all[val_idx], costs
            )
            # The only use of the test set: one score of the already chosen SVM.
            entry = per_shot[str(k)]
            entry["scores"].append(task.score(model, x_test, y_test))
            entry["costs"].append(cost)
            entry["val_scores"].append(val_scores)
            bar.update(1)
    bar.close()
    out: dict[str, Any] = {"per_shot": {}}
    for k, entry in per_shot.items():
        scores = np.asarray(entry["scores"])
        out["per_shot"][k] = {"mean": float(scores.mean()), "std": float(scores.std()), **entry}
    out.update(shots=shots, draws=draws, costs=costs, val_per_class=val_per_class, seed=seed)
    return out
