"""The methods' losses, as plain functions of tensors (usable in loops of your own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Top-1 accuracy as a 0-d tensor (no synchronisation)."""
    return (logits.argmax(dim=1) == targets).float().mean()


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MoCo's InfoNCE of L2-normalised queries ``q`` against their keys ``k`` and the negatives ``queue``.

    Returns the cross-entropy loss and the top-1 accuracy of the positive (index 0).
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.t()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), accuracy(logits, labels)


def in_batch_info_nce(
    q: Tensor, keys: Tensor, temperature: float, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """MoCo v3's contrastive loss: query ``i`` against every key, its positive is key ``offset + i``.

    ``keys`` are the momentum encoder's outputs of the global batch (every rank's, in rank order);
    ``offset`` is where this rank's keys start (rank x per-rank batch). Both sides are
    L2-normalised here. The cross-entropy is multiplied by ``2 * temperature``, as MoCo v3 does
    (it keeps the gradient's scale independent of the temperature). Returns the loss and the
    top-1 accuracy of the positive.
    """
    logits = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature), accuracy(logits, labels)


def regression_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's ``2 - 2 cos(p, z)``, averaged over the batch (no gradient into the target ``z``)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def pseudo_label_loss(logits: Tensor, pseudo: Tensor, mask: Tensor) -> Tensor:
    """FixMatch's unlabeled loss: cross-entropy to the pseudo-labels, masked, averaged over all images."""
    return (F.cross_entropy(logits, pseudo, reduction="none") * mask).mean()


def softmax_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean Teacher's consistency: MSE between class probabilities, mean over samples and classes
    (the original's sum / (classes x batch))."""
    return F.mse_loss(torch.softmax(student_logits, dim=1), torch.softmax(teacher_logits.float(), dim=1))
