"""The monitor the trainer calls along training: kNN of both networks, test accuracy of classifiers.

``emanorm train`` passes :func:`knn_monitor` to :func:`emanorm.train.train` as its ``monitor``;
any callable ``(method, run) -> dict[str, float]`` can take its place.

Accuracies are percents rounded to :data:`PERCENT_DIGITS` decimals (the unit of every file a user
reads, docs/evaluation.md); ``knn_k`` and ``knn_bank`` say how the kNN figures were measured.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from emanorm.data import eval_batches
from emanorm.evaluation.knn import knn_predict
from emanorm.train.progress import report_evaluation
from emanorm.train.recipe import Run

#: Decimals of a percent kept in summary.json / metrics.jsonl / eval_*.json (1e-6 as a fraction).
PERCENT_DIGITS = 4


def percent(fraction: float) -> float:
    """A fraction in [0, 1] as a percent without float noise: 0.6999999881 -> 70.0."""
    return round(100.0 * float(fraction), PERCENT_DIGITS)


class _Count:
    """Images through the networks so far in one evaluation, reported to the progress bar."""

    def __init__(self, total: int) -> None:
        self.done, self.total = 0, total

    def add(self, phase: str, images: int) -> None:
        self.done += images
        report_evaluation(phase, self.done, self.total)


@torch.no_grad()
def _features(
    encoder: nn.Module, dataset: Any, indices: Tensor, device: torch.device, amp: Any,
    count: _Count | None = None, phase: str = "",
) -> Any:
    feats, labels = [], []
    for images, targets in eval_batches(dataset, 512, device, indices=indices):
        with amp():
            feats.append(encoder(images).float())
        labels.append(targets.to(device))
        if count is not None:
            count.add(phase, len(targets))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_monitor(method: nn.Module, run: Run) -> dict[str, float]:
    """kNN (k=``knn_k``, weighted) of teacher and student features over a labeled bank of
    ``knn_bank_size`` training images; test accuracy for methods with a classifier. Percent.

    ``knn_k`` and ``knn_bank`` (the bank actually used: at most the labeled images) are in the
    result so that every kNN figure carries its protocol."""
    cfg, train_ds, test_ds, device, amp = run.cfg, run.train_ds, run.test_ds, run.device, run.amp
    was_training = method.training
    method.eval()
    results: dict[str, float] = {}
    gen = torch.Generator().manual_seed(cfg["seed"])
    labeled = (train_ds.targets >= 0).nonzero().flatten()
    bank = labeled[torch.randperm(len(labeled), generator=gen)[: cfg["knn_bank_size"]]]
    test_size = (
        len(test_ds) if cfg["monitor_test_size"] is None else min(len(test_ds), cfg["monitor_test_size"])
    )
    queries = torch.arange(test_size)
    count = _Count(2 * (len(bank) + test_size))
    for which in ("teacher", "student"):
        encoder = method.encoder(which)
        bank_f, bank_y = _features(encoder, train_ds, bank, device, amp, count, which)
        query_f, query_y = _features(encoder, test_ds, queries, device, amp, count, which)
        pred = knn_predict(bank_f, bank_y, query_f, k=cfg["knn_k"], num_classes=train_ds.info.num_classes)
        results[f"knn_{which}"] = percent((pred.to(query_y.device) == query_y).float().mean().item())
        classifier = method.classifier(which) if method.semi_supervised else None
        if classifier is not None:
            # a Classifier is backbone + fc: reuse the features instead of a second pass
            if getattr(classifier, "backbone", None) is encoder and hasattr(classifier, "fc"):
                logits = classifier.fc(query_f.to(next(classifier.fc.parameters()).dtype))
            else:
                logits = _features(classifier, test_ds, queries, device, amp)[0]
            results[f"test_acc_{which}"] = percent((logits.argmax(1) == query_y).float().mean().item())
    results["knn_k"] = cfg["knn_k"]
    results["knn_bank"] = len(bank)
    method.train(was_training)
    return results
