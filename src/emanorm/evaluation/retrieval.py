"""Image retrieval on frozen features: top-k mAP and recall (paper Table 4, following CSQ [49])."""

from __future__ import annotations

import torch
from torch import Tensor

from emanorm.evaluation.knn import check_labels, l2_normalize, query_chunks


def retrieval_scores(
    database_features: Tensor,
    database_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    topk: int = 1000,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mean average precision and recall over the top ``topk`` retrievals of each query.

    The database is ranked by cosine similarity to the query; an item is relevant when its label
    equals the query's. Per query, with ``rel_i`` the relevance at rank ``i <= topk``:

    * AP = mean of precision@i over the ranks i that hold a relevant item (0 when none does);
    * recall = (relevant items in the top ``topk``) / (relevant items in the whole database),
      defined as 0 when the database holds no item of the query's label.

    Both are averaged over all queries (fractions in [0, 1]). ``topk`` larger than the database uses
    the whole database. Chunked over queries like :func:`knn_predict`; runs on the database's device.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    db = l2_normalize(database_features)
    if db.shape[0] == 0:
        raise ValueError("retrieval_scores needs a non-empty database")
    db_labels = check_labels(database_labels, db.shape[0], "database_labels").to(db.device)
    queries = l2_normalize(query_features)
    if queries.shape[1] != db.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != database dim {db.shape[1]}")
    q_labels = check_labels(query_labels, queries.shape[0], "query_labels").to(db.device)
    if queries.shape[0] == 0:
        raise ValueError("retrieval_scores needs at least one query")
    num_classes = max(int(db_labels.max()), int(q_labels.max())) + 1
    relevant_in_db = torch.bincount(db_labels, minlength=num_classes).to(db.dtype)
    k = min(topk, db.shape[0])
    ranks = torch.arange(1, k + 1, device=db.device, dtype=db.dtype)
    ap_sum = torch.zeros((), dtype=torch.float64, device=db.device)
    recall_sum = torch.zeros((), dtype=torch.float64, device=db.device)
    for sl in query_chunks(queries.shape[0], db.shape[0], chunk_size):
        sim = queries[sl].to(db.device, db.dtype) @ db.T
        top_idx = sim.topk(k, dim=1).indices  # sorted, most similar first
        rel = (db_labels[top_idx] == q_labels[sl, None]).to(db.dtype)
        hits = rel.sum(dim=1)
        precision_at_i = rel.cumsum(dim=1) / ranks
        ap = (precision_at_i * rel).sum(dim=1) / hits.clamp(min=1)
        total_relevant = relevant_in_db[q_labels[sl]]
        recall = torch.where(total_relevant > 0, hits / total_relevant.clamp(min=1), torch.zeros_like(hits))
        ap_sum += ap.double().sum()
        recall_sum += recall.double().sum()
    n = queries.shape[0]
    return {"map": float(ap_sum) / n, "recall": float(recall_sum) / n}
