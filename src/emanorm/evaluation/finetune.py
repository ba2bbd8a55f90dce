"""Fine-tuning the whole network on the labeled subset (paper Sec. 5.2).

The paper trains backbone + a new linear classifier for 50 epochs (lr / 10 at epochs 30 and 40),
classifier lr 1.0 (1% labels) or 0.1 (10% labels), backbone lr searched in {1e-4, 1e-3, 1e-2}.
Here the backbone lr is searched on a stratified validation split of the labeled subset (never on
the test set), then the best setting is retrained on all labels and tested once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from emanorm.evaluation.features import ImageSource, iterate_dataset, resolve_device
from emanorm.evaluation.linear import milestones, search_lr, stratified_split, topk_accuracies
from emanorm.evaluation.settings import DEFAULT_BACKBONE_LRS, FinetuneSettings

__all__ = ["DEFAULT_BACKBONE_LRS", "BackboneClassifier", "FinetuneSettings", "finetune", "train_finetune"]
_MIN_SENSIBLE_STEPS = 200
log = logging.getLogger(__name__)


class BackboneClassifier(nn.Module):
    """``fc(backbone(x))``: a backbone with a freshly initialised linear classifier on top."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=gen) * 0.01)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.backbone(x), 1))


def feature_dim_of(backbone: nn.Module, sample: Tensor) -> int:
    """``backbone.feature_dim`` when present, else the width of one eval-mode forward of ``sample``."""
    dim = getattr(backbone, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    was_training = backbone.training
    backbone.eval()  # eval: the probe forward must not touch BN statistics
    try:
        with torch.no_grad():
            return int(torch.flatten(backbone(sample), 1).shape[1])
    finally:
        backbone.train(was_training)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: ImageSource,
    indices: Tensor | None,
    *,
    transform: nn.Module,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 (fractions) of ``model`` in eval mode over ``dataset[indices]``."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in iterate_dataset(dataset, indices, batch_size):
            with _autocast(device, amp):
                logits.append(model(transform(x.to(device))).float())
            labels.append(y)
    finally:
        model.train(was_training)
    if not logits:
        return {"top1": 0.0, "top5": 0.0}
    return topk_accuracies(torch.cat(logits), torch.cat(labels).to(device), (1, 5))


def train_finetune(
    backbone: nn.Module,
    dataset: ImageSource,
    indices: Tensor,
    *,
    num_classes: int,
    augment: nn.Module,
    backbone_lr: float,
    settings: FinetuneSettings | None = None,
    **overrides: Any,
) -> tuple[BackboneClassifier, bool]:
    """Fine-tune a *copy* of ``backbone`` plus a new classifier on ``dataset[indices]``.

    Returns ``(model, diverged)``. The input ``backbone`` is left untouched. The per-sample
    augmentation draws from the global torch RNG, forked and seeded here so runs repeat exactly.
    """
    st = FinetuneSettings.resolve(settings, overrides)
    epochs, batch_size, seed, amp, classifier_lr = st.epochs, st.batch_size, st.seed, st.amp, st.classifier_lr
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = resolve_device(st.device)
    indices = torch.as_tensor(indices, dtype=torch.long)
    if len(indices) == 0:
        raise ValueError("fine-tuning needs at least one labeled image")
    net = copy.deepcopy(backbone).requires_grad_(True).to(device)
    augment = augment.to(device)
    gen = torch.Generator().manual_seed(seed)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        sample = augment(dataset.fetch(indices[:2]).to(device))
        model = BackboneClassifier(net, feature_dim_of(net, sample), num_classes, seed).to(device)
        opt = torch.optim.SGD(
            [
                {"params": model.backbone.parameters(), "lr": backbone_lr},
                {"params": model.fc.parameters(), "lr": classifier_lr},
            ],
            lr=classifier_lr,
            momentum=st.momentum,
            weight_decay=st.weight_decay,
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(epochs), gamma=0.1)
        model.train()
        loss = torch.zeros(())
        bar = tqdm(range(epochs), desc=f"finetune lr={backbone_lr:g}", disable=not st.progress, leave=False)
        for _ in bar:
            order = indices[torch.randperm(len(indices), generator=gen)]
            for x, y in iterate_dataset(dataset, order, batch_size):
                if x.shape[0] == 1 and batch_size > 1 and len(indices) > 1:
                    continue  # a trailing batch of one breaks BatchNorm in train mode
                x = augment(x.to(device, non_blocking=True))
                with _autocast(device, amp):
                    loss = F.cross_entropy(model(x).float(), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if not torch.isfinite(loss):
                    return model, True
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            sched.step()
    return model, False


def finetune(
    backbone: nn.Module,
    train_set: ImageSource,
    train_indices: Tensor,
    test_set: ImageSource,
    *,
    num_classes: int,
    augment: nn.Module,
    eval_transform: nn.Module,
    test_indices: Tensor | None = None,
    settings: FinetuneSettings | None = None,
    **overrides: Any,
) -> dict[str, object]:
    """Fine-tune backbone + classifier on the labeled ``train_indices``; report test top-1/top-5.

    ``augment`` is the training augmentation (the paper's weak one: ``build_augmentation("weak",
    info)``), ``eval_transform`` the test-time one (``build_augmentation("none", info)``). Several
    ``backbone_lrs`` are compared on a stratified validation split of the labeled images (top-1),
    the best (ties: the smaller lr) is retrained on all of them and tested once. ``backbone`` is not
    modified. Returns fractions in [0, 1] plus the chosen lr and the per-lr validation scores.
    """
    st = FinetuneSettings.resolve(settings, overrides)
    backbone_lrs, classifier_lr = st.backbone_lrs, st.classifier_lr
    epochs, batch_size = st.epochs, st.batch_size
    if not backbone_lrs:
        raise ValueError("backbone_lrs must hold at least one learning rate")
    if any(lr < 0 for lr in backbone_lrs) or classifier_lr <= 0:
        raise ValueError(f"learning rates must be positive, got {list(backbone_lrs)} and {classifier_lr}")
    device = resolve_device(st.device)
    st = replace(st, device=device)
    train_indices = torch.as_tensor(train_indices, dtype=torch.long)
    labels = torch.as_tensor(train_set.targets)[train_indices]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels.unique()[:5].tolist()
        raise ValueError(f"training labels must lie in [0, num_classes={num_classes}); got {bad}")
    eval_transform = eval_transform.to(device)
    common = {"num_classes": num_classes, "augment": augment, "settings": st}
    # the validation split and the test set are scored alike
    score = functools.partial(
        evaluate_classifier, transform=eval_transform, batch_size=batch_size, device=device, amp=st.amp
    )
    steps = epochs * -(-len(train_indices) // batch_size)
    if steps < _MIN_SENSIBLE_STEPS:
        # Epoch-based budgets (the paper's 50 epochs of 1% ImageNet = 2,500 steps) shrink to a handful
        # of steps on a few hundred labels, and the result then mostly measures the step count.
        log.warning(
            "fine-tuning for only %d optimizer steps (%d labeled images, batch %d, %d epochs); "
            "raise --epochs or lower --batch-size for a meaningful number",
            steps,
            len(train_indices),
            batch_size,
            epochs,
        )
    lrs = sorted(set(float(lr) for lr in backbone_lrs))
    val_top1: dict[str, float] = {}
    best_lr = lrs[0]
    if len(lrs) > 1:
        fit_pos, val_pos = stratified_split(labels, st.val_fraction, st.seed)
        if len(val_pos) == 0:
            raise ValueError(
                "too few labels to carve a validation split for the backbone-lr search; pass one backbone lr"
            )

        def fit(lr: float) -> tuple[BackboneClassifier, bool]:
            return train_finetune(backbone, train_set, train_indices[fit_pos], backbone_lr=lr, **common)

        def validate(model: BackboneClassifier) -> float:
            return score(model, train_set, train_indices[val_pos])["top1"]

        best_lr, val_top1 = search_lr(lrs, fit, validate)
    model, diverged = train_finetune(backbone, train_set, train_indices, backbone_lr=best_lr, **common)
    result: dict[str, object] = score(model, test_set, test_indices)
    result.update(
        best_backbone_lr=best_lr,
        classifier_lr=classifier_lr,
        val_top1=val_top1,
        diverged=diverged,
        epochs=epochs,
        batch_size=batch_size,
        steps=steps,
        num_train=len(train_indices),
        num_test=int(len(test_set) if test_indices is None else len(test_indices)),
    )
    return result
