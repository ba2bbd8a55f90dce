"""Frozen-feature extraction and the "is the backbone really frozen?" check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


class ImageSource(Protocol):
    """What evaluation needs from a dataset (``emanorm.data.ImageDataset`` satisfies it)."""

    targets: Tensor

    def fetch(self, indices: Tensor) -> Tensor: ...

    def __len__(self) -> int: ...


class TensorImages:
    """An in-memory :class:`ImageSource` over a uint8 ``(N, C, H, W)`` tensor (tests, small data)."""

    def __init__(self, images: Tensor, targets: Tensor, info: Any = None) -> None:
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with N == len(targets); got {tuple(images.shape)} "
                f"and {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets.long()
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def fetch(self, indices: Tensor) -> Tensor:
        return self.images[indices]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def iterate_dataset(
    dataset: ImageSource,
    indices: Tensor | None = None,
    batch_size: int = 256,
    *,
    prefetch: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` batches of ``dataset`` in the order of ``indices`` (all by default).

    Batches come from ``dataset.fetch``; with ``prefetch`` the next batch is fetched on a background
    thread while the caller runs the model on the current one (file datasets decode in ``fetch``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if indices is None:
        indices = torch.arange(len(dataset))
    indices = torch.as_tensor(indices, dtype=torch.long)
    targets = torch.as_tensor(dataset.targets, dtype=torch.long)
    chunks = list(torch.split(indices, batch_size))
    if not prefetch or len(chunks) <= 1:
        for chunk in chunks:
            yield dataset.fetch(chunk), targets[chunk]
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(dataset.fetch, chunks[0])
        for i, chunk in enumerate(chunks):
            images = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(dataset.fetch, chunks[i + 1])
            yield images, targets[chunk]


class _SizedBatches:
    """``iterate_dataset`` with a ``len`` so progress bars know the total."""

    def __init__(self, dataset: ImageSource, indices: Tensor | None, batch_size: int) -> None:
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size

    def __len__(self) -> int:
        n = len(self.dataset) if self.indices is None else len(self.indices)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iterate_dataset(self.dataset, self.indices, self.batch_size)


def dataset_batches(
    dataset: ImageSource, indices: Tensor | None = None, batch_size: int = 256
) -> _SizedBatches:
    """A re-iterable, sized view of :func:`iterate_dataset` (for ``extract_features``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _SizedBatches(dataset, indices, batch_size)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["x"], batch.get("y")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


# no_grad, not inference_mode: the features later feed autograd (linear probe); inference tensors cannot
@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[Any],
    device: str | torch.device,
    *,
    transform: nn.Module | None = None,
    amp: bool = False,
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Run a frozen ``encoder`` over ``batches``; return ``(features float32 (N, D) on CPU, labels (N,))``.

    ``batches`` yields ``(x, y)`` pairs or ``{"x": ..., "y": ...}`` dicts; ``x`` is moved to ``device``
    and passed through ``transform`` (e.g. ``build_augmentation("none", info)``) before the encoder.
    The encoder runs in eval mode (BN uses its running statistics, nothing is updated) under
    ``torch.no_grad``; its previous train/eval mode is restored afterwards. ``amp`` enables
    bf16 autocast on CUDA (ignored on CPU). Labels are -1 where a batch carries none.
    """
    device = resolve_device(device)
    was_training = encoder.training
    encoder.eval()
    if transform is not None:
        transform = transform.to(device)
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    try:
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            x, y = _split_batch(batch)
            x = x.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            with autocast:
                f = encoder(x)
            if f.ndim != 2:
                f = torch.flatten(f, 1)
            feats.append(f.float().cpu())
            labels.append(
                torch.full((f.shape[0],), -1, dtype=torch.long)
                if y is None
                else torch.as_tensor(y).long().cpu()
            )
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features got no batches")
    return torch.cat(feats), torch.cat(labels)


def state_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (BN running statistics included)."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_state_unchanged(module: nn.Module, snapshot: Mapping[str, Tensor]) -> None:
    """Raise ``RuntimeError`` naming the first tensor of ``module`` that differs from ``snapshot``.

    Bitwise comparison: a frozen backbone must not move at all (weights, BN running mean/var and
    ``num_batches_tracked``).
    """
    current = module.state_dict(keep_vars=True)
    if current.keys() != snapshot.keys():
        diff = sorted(set(current) ^ set(snapshot))
        raise RuntimeError(f"backbone state keys changed during evaluation: {diff[:5]}")
    for name, value in current.items():
        before = snapshot[name]
        value = value.detach()
        if value.shape != before.shape or not torch.equal(value, before.to(value.device)):
            raise RuntimeError(
                f"frozen backbone tensor '{name}' changed during evaluation (weights and BN statistics "
                "must stay fixed: keep the backbone in eval mode and out of the optimizer)"
            )


@contextlib.contextmanager
def assert_frozen(module: nn.Module) -> Iterator[None]:
    """Context manager: snapshot ``module`` on entry, :func:`assert_state_unchanged` on exit."""
    snapshot = state_snapshot(module)
    yield
    assert_state_unchanged(module, snapshot)
