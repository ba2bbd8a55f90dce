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
