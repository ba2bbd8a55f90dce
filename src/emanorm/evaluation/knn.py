"""Weighted kNN classification on frozen features (InstDisc-style voting, as in the paper's Table 4)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# Similarity-matrix elements per chunk (2**26 float32 = 256 MiB): bounds memory whatever the database size.
_SIMILARITY_BUDGET = 2**26


def l2_normalize(x: Tensor) -> Tensor:
    """Row-wise L2 normalisation in at least float32 (bf16/fp16 lose too much in the dot products)."""
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}")
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)


def query_chunks(num_queries: int, database_size: int, chunk_size: int | None) -> Iterator[slice]:
    """Slices over the queries so that one chunk's similarity matrix stays within the budget."""
    if chunk_size is None:
        chunk_size = max(1, _SIMILARITY_BUDGET // max(database_size, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    for start in range(0, num_queries, chunk_size):
        yield slice(start, min(start + chunk_size, num_queries))


def check_labels(labels: Tensor, n: int, what: str, num_classes: int | None = None) -> Tensor:
    """Validate a 1-D label vector of length ``n`` with values in ``[0, num_classes)``."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{what} must be 1-D with {n} entries (one per row), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{what} contain {int(labels.min())}; labels must be >= 0 (-1 = unknown)")
    if num_classes is not None and n and int(labels.max()) >= num_classes:
        raise ValueError(f"{what} contain {int(labels.max())}, outside [0, num_classes={num_classes})")
    return labels.long()


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Predict a label for each query by weighted voting of its ``k`` nearest training features.

    Features are L2-normalised; neighbours are ranked by cosine similarity ``s``; each of the ``k``
    nearest votes for its class with weight ``exp(s / temperature)`` and the class with the largest
    summed weight wins (exact ties go to the smaller class index). ``k`` larger than the database
    uses the whole database. Queries are processed ``chunk_size`` at a time (None: sized so one
    chunk's similarity matrix holds at most 2**26 entries). Runs on the device of ``train_features``;
    returns a LongTensor of shape ``(num_queries,)`` on that device.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    db = l2_normalize(train_features)
    labels = check_labels(train_labels, db.shape[0], "train_labels", num_classes).to(db.device)
    if db.shape[0] == 0:
        raise ValueError("knn_predict needs at least one training feature")
    queries = l2_normalize(query_features)
    if queries.shape[1] != db.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != train dim {db.shape[1]}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    k = min(k, db.shape[0])
    out = torch.empty(queries.shape[0], dtype=torch.long, device=db.device)
    for sl in query_chunks(queries.shape[0], db.shape[0], chunk_size):
        sim = queries[sl].to(db.device, db.dtype) @ db.T
        top_sim, top_idx = sim.topk(k, dim=1)
        # exp(s/T) <= exp(1/0.07) ~ 1.6e6: no overflow in float32 for any sensible temperature.
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=db.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        out[sl] = votes.argmax(dim=1)
    return out


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    **kwargs: object,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict` against ``query_labels``."""
    pred = knn_predict(train_features, train_labels, query_features, **kwargs)  # type: ignore[arg-type]
    query_labels = torch.as_tensor(query_labels).to(pred.device)
    if query_labels.shape != pred.shape:
        raise ValueError(f"query_labels shape {tuple(query_labels.shape)} != predictions {tuple(pred.shape)}")
    return float((pred == query_labels).float().mean()) if pred.numel() else 0.0
