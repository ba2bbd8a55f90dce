"""The batch stream: deterministic, rank-sharded, resumable batches of augmented views for a method."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from emanorm.data.augment import AUGMENTATIONS, BatchAugment, RandomResizedCropFlip, build_augmentation
from emanorm.data.images import EncodedViews, decode_views
from emanorm.data.registry import DataError, ImageDataset

RESERVED_KEYS = ("y", "y_u", "index", "index_l", "epoch")
# Stream ids mixed into the seeds so the labeled and unlabeled orders (and the crops of file images)
# are independent.
_MAIN, _CYCLED, _AUGMENT, _CROP = 0, 1, 2, 3


def _seed(*words: int) -> int:
    """A 63-bit seed from integers, well mixed (so nearby (epoch, step) pairs give unrelated streams)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*words))


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


class _Part:
    """One side of the stream (labeled or unlabeled): its dataset, indices, views and batch size."""

    def __init__(self, name: str, dataset: ImageDataset, indices: Tensor | None, views: Mapping[str, str],
                 batch_size: int, world_size: int) -> None:
        if batch_size < 1:
            raise DataError(f"{name} batch size {batch_size} must be >= 1")
        self.name, self.dataset, self.views = name, dataset, dict(views)
        idx = (torch.arange(len(dataset)) if indices is None
               else torch.as_tensor(indices, dtype=torch.long).cpu())
        if idx.numel() == 0:
            raise DataError(f"{name} indices are empty")
        if idx.min() < 0 or idx.max() >= len(dataset):
            raise DataError(f"{name} indices outside [0, {len(dataset)}) of {dataset!r}")
        self.indices = idx
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size


@dataclass(frozen=True)
class _Request:
    """How one part of a step is read: ``fetch`` (in-memory data, evaluation), or, for a file dataset
    with training views, ``fetch_views`` (or ``read_views`` for a device decoder) with each view's crop
    drawn from ``generator(seed, _CROP, epoch, step, rank, part, view)``: the same boxes whichever
    process (main or a DataLoader worker) reads the files."""

    dataset: ImageDataset
    crops: tuple[RandomResizedCropFlip | None, ...] | None = None  # per view; None: plain fetch
    seed_words: tuple[int, ...] = ()  # (seed, rank, part)
    encoded: bool = False

    def __call__(self, indices: Tensor, epoch: int, step: int) -> Any:
        if self.crops is None:
            return self.dataset.fetch(indices)
        seed, rank, pid = self.seed_words
        n = len(indices)
        draws = [None if op is None else op.draw(n, _generator(seed, _CROP, epoch, step, rank, pid, vid))
                 for vid, op in enumerate(self.crops)]
        if self.encoded:
            return self.dataset.read_views(indices, draws)
        return self.dataset.fetch_views(indices, draws)


@dataclass(frozen=True)
class _LoadFailure:
    """A DataError raised in a loader worker, carried back as its one-line message: re-raised in the
    main process it names the file, without the worker's traceback wrapped around it."""

    message: str


class _StepFetcher(Dataset):
    """Map-style dataset over planned steps, so a DataLoader's workers decode file images in parallel."""

    def __init__(self, requests: list[_Request], plans: list[list[Tensor]], steps: Sequence[tuple[int, int]]
                 ) -> None:
        self.requests, self.plans, self.steps = requests, plans, list(steps)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> list[Any] | _LoadFailure:
        epoch, step = self.steps[i]
        try:
            return [r(idx, epoch, step) for r, idx in zip(self.requests, self.plans[i], strict=True)]
        except DataError as err:
            return _LoadFailure(str(err).splitlines()[0] if str(err) else repr(err))


def _fetched(items: Iterator[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, _LoadFailure):
            raise DataError(item.message)
        yield item


class BatchStream:
    """Batches of augmented views for a method, sharded by rank and resumable mid-epoch.

    An epoch is one pass over the unlabeled indices when there are any (else the labeled ones); the
    other side cycles, with a fresh permutation per cycle. Step ``s`` of epoch ``e`` takes the global
    batch ``perm(seed, e)[s*G:(s+1)*G]`` (``G = world_size * batch``, last partial batch dropped) and
    rank ``r`` keeps ``global[r::world_size]``. Augmentation draws come from a generator seeded by
    (seed, epoch, step, rank, view), so ``set_epoch(e, s)`` reproduces exactly what an uninterrupted
    run would have yielded from step ``s`` on.

    Each batch holds one float tensor per view key (normalised, on ``device``), ``"y"`` (labels of
    the labeled part), ``"y_u"`` (targets of the unlabeled part, -1 where unknown: for diagnostics
    such as pseudo-label accuracy, never for training) and, with ``return_index``, ``"index"``
    (dataset indices of the unlabeled part, or the labeled one when alone) and ``"index_l"``.
    ``"epoch"`` is the batch's epoch as a 0-d int64 CPU tensor, for methods whose schedules count
    epochs (DINO's teacher-temperature warm-up and frozen last layer).
    """

    def __init__(self, labeled: ImageDataset | None = None, labeled_indices: Tensor | None = None,
                 unlabeled: ImageDataset | None = None, unlabeled_indices: Tensor | None = None, *,
                 labeled_views: Mapping[str, str] | None = None,
                 unlabeled_views: Mapping[str, str] | None = None,
                 batch_size: int = 64, unlabeled_batch_size: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", num_workers: int = 0,
                 return_index: bool = False, augment_options: Mapping[str, object] | None = None,
                 loader_timeout: float = 300.0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} world_size={world_size}: need 0 <= rank < world_size")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0")
        labeled_views, unlabeled_views = dict(labeled_views or {}), dict(unlabeled_views or {})
        keys = list(labeled_views) + list(unlabeled_views)
        clash = sorted({k for k in keys if keys.count(k) > 1 or k in RESERVED_KEYS})
        if clash:
            raise DataError(f"view keys {clash} repeat or use a reserved key ({', '.join(RESERVED_KEYS)})")
        for key, preset in {**labeled_views, **unlabeled_views}.items():
            if preset not in AUGMENTATIONS:
                raise DataError(f"view {key!r}: unknown augmentation {preset!r}; choose one of "
                                f"{', '.join(AUGMENTATIONS)}")
        self.labeled = self.unlabeled = None
        if labeled is not None and labeled_views:
            self.labeled = _Part("labeled", labeled, labeled_indices, labeled_views, batch_size, world_size)
            bad = self.labeled.indices[labeled.targets[self.labeled.indices] < 0]
            if bad.numel():
                raise DataError(f"labeled index {bad[0].item()} has no label (target -1) in {labeled!r}")
        if unlabeled is not None and unlabeled_views:
            self.unlabeled = _Part("unlabeled", unlabeled, unlabeled_indices, unlabeled_views,
                                   unlabeled_batch_size or batch_size, world_size)
        if self.labeled is None and self.unlabeled is None:
            raise DataError("BatchStream needs a labeled or an unlabeled dataset together with its views")
        self.main = self.unlabeled or self.labeled
        self.cycled = self.labeled if self.unlabeled is not None else None
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.loader_timeout = float(loader_timeout)
        self.return_index = return_index
        self.epoch, self.start_step = 0, 0
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.main.name} set of {len(self.main.indices)} images is smaller than one "
                            f"global batch of {self.main.global_batch} "
                            f"(world_size {world_size} x {self.main.batch_size})")
        options = dict(augment_options or {})
        infos = {p.name: p.dataset.info for p in self._parts()}
        self.augment: dict[tuple[str, str], BatchAugment] = {
            (part.name, preset): build_augmentation(preset, infos[part.name], **options)
            for part in self._parts() for preset in part.views.values()}
        # File datasets: each view's random crop is taken from the whole image while it is decoded
        # (fetch_views), and only the rest of the preset runs batched on the device.
        self._requests: list[_Request] = []
        self._after_crop: dict[tuple[str, str], BatchAugment] = {}
        for pid, part in enumerate(self._parts()):
            if part.dataset.in_memory or not hasattr(part.dataset, "fetch_views"):
                self._requests.append(_Request(part.dataset))
                continue
            crops = tuple(self.augment[(part.name, preset)].crop for preset in part.views.values())
            encoded = self.device.type == "cuda" and bool(getattr(part.dataset, "gpu_decode", False))
            self._requests.append(_Request(part.dataset, crops, (self.seed, rank, pid), encoded))
            for preset in part.views.values():
                self._after_crop[(part.name, preset)] = self.augment[(part.name, preset)].without_crop()
        self._cycle_cache: tuple[int, Tensor] | None = None

    def _parts(self) -> list[_Part]:
        return [p for p in (self.labeled, self.unlabeled) if p is not None]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.main.indices) // self.main.global_batch

    def __len__(self) -> int:
        """Steps the next iteration yields (the rest of the current epoch)."""
        return self.steps_per_epoch - self.start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Make the next iteration yield steps ``start_step..steps_per_epoch-1`` of ``epoch``."""
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"set_epoch({epoch}, {start_step}): need epoch >= 0 and "
                            f"0 <= start_step <= {self.steps_per_epoch}")
        self.epoch, self.start_step = int(epoch), int(start_step)

    # -- index plans ---------------------------------------------------------------------------

    def _main_perm(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.main.indices), generator=_generator(self.seed, _MAIN, epoch))

    def _cycle_perm(self, cycle: int) -> Tensor:
        if self._cycle_cache is None or self._cycle_cache[0] != cycle:
            part = self.cycled
            n = len(part.indices)
            # A cycle concatenates enough permutations to fill at least one global batch (e.g. 40
            # labels with a global batch of 64), as FixMatch's loaders repeat a small labeled set.
            reps = -(-part.global_batch // n)
            perm = torch.cat([torch.randperm(n, generator=_generator(self.seed, _CYCLED, cycle, r))
                              for r in range(reps)])
            self._cycle_cache = (cycle, perm)
        return self._cycle_cache[1]

    def _cycled_share(self, epoch: int, step: int) -> Tensor:
        part = self.cycled
        per_cycle = (-(-part.global_batch // len(part.indices)) * len(part.indices)) // part.global_batch
        j = epoch * self.steps_per_epoch + step  # the cycled side advances with the global step
        pos = j % per_cycle
        glob = self._cycle_perm(j // per_cycle)[pos * part.global_batch:(pos + 1) * part.global_batch]
        return part.indices[glob[self.rank::self.world_size]]

    def _plans(self, epoch: int, start: int, stop: int) -> list[dict[str, Tensor]]:
        perm, g = self._main_perm(epoch), self.main.global_batch
        plans = []
        for step in range(start, stop):
            glob = perm[step * g:(step + 1) * g]
            p = {self.main.name: self.main.indices[glob[self.rank::self.world_size]]}
            if self.cycled is not None:
                p[self.cycled.name] = self._cycled_share(epoch, step)
            plans.append(p)
        return plans

    def plan(self, epoch: int, step: int) -> dict[str, Tensor]:
        """Dataset indices this rank draws at ``(epoch, step)``, keyed "labeled" / "unlabeled"."""
        return self._plans(epoch, step, step + 1)[0]

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        epoch, start = self.epoch, self.start_step
        self.start_step = 0  # a second pass without set_epoch repeats the whole epoch
        parts = self._parts()
        plans = self._plans(epoch, start, self.steps_per_epoch)
        steps = [(epoch, step) for step in range(start, self.steps_per_epoch)]
        file_based = any(not p.dataset.in_memory for p in parts)
        if self.num_workers > 0 and file_based and plans:
            fetcher = _StepFetcher(self._requests, [[pl[p.name] for p in parts] for pl in plans], steps)
            loader = DataLoader(fetcher, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                pin_memory=self.device.type == "cuda", prefetch_factor=2,
                                timeout=self.loader_timeout)
            images = _fetched(_reported(iter(loader), self.loader_timeout))
        else:
            images = ([r(pl[p.name], e, s) for r, p in zip(self._requests, parts, strict=True)]
                      for pl, (e, s) in zip(plans, steps, strict=True))
        for step, pl, fetched in zip(range(start, self.steps_per_epoch), plans, images, strict=True):
            yield self._batch(epoch, step, parts, pl, fetched)

    def _batch(self, epoch: int, step: int, parts: list[_Part], plan: dict[str, Tensor],
               fetched: list[Tensor]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for pid, (part, raw) in enumerate(zip(parts, fetched, strict=True)):
            if isinstance(raw, Tensor):  # one batch for every view (in-memory data)
                x = _to_device(raw, self.device)
                for vid, (key, preset) in enumerate(part.views.items()):
                    g = _generator(self.seed, _AUGMENT, epoch, step, self.rank, pid, vid)
                    batch[key] = self.augment[(part.name, preset)](x, generator=g)
            else:  # file images: one cropped, resized and flipped batch per view
                views = (decode_views(raw, self.device) if isinstance(raw, EncodedViews)
                         else [_to_device(v, self.device) for v in raw])
                for vid, ((key, preset), x) in enumerate(zip(part.views.items(), views, strict=True)):
                    g = _generator(self.seed, _AUGMENT, epoch, step, self.rank, pid, vid)
                    batch[key] = self._after_crop[(part.name, preset)](x, generator=g)
            idx = plan[part.name]
            targets = _to_device(part.dataset.targets[idx], self.device)
            if part is self.labeled:
                batch["y"] = targets
            else:
                batch["y_u"] = targets
            if self.return_index:
                batch["index" if part is self.main else "index_l"] = _to_device(idx, self.device)
        batch["epoch"] = torch.tensor(epoch, dtype=torch.long)
        return batch


def _reported(loader: Iterator[list[Tensor]], timeout: float) -> Iterator[list[Tensor]]:
    """A stalled or crashed loader worker becomes a clear DataError instead of a hang or a traceback."""
    while True:
        try:
            item = next(loader)
        except StopIteration:
            return
        except RuntimeError as err:
            text = str(err)
            if "timed out" in text:
                raise DataError(f"data loading stalled: no batch from the loader workers in {timeout:.0f} s "
                                "(slow or hung storage?)") from None
            if "DataLoader worker" in text:
                raise DataError(f"a data loader worker died: {text.splitlines()[0]}") from None
            raise
        yield item


def eval_batches(dataset: ImageDataset, batch_size: int, device: str | torch.device = "cpu", *,
                 indices: Tensor | None = None, num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` in dataset order (or ``indices`` order): images normalised with preset
    ``none``, on ``device``; the last batch may be smaller. For feature extraction and evaluation."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device)
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    chunks = list(idx.split(batch_size))
    augment = build_augmentation("none", dataset.info)
    if num_workers > 0 and not dataset.in_memory and chunks:
        fetcher = _StepFetcher([_Request(dataset)], [[c] for c in chunks], [(0, 0)] * len(chunks))
        loader = DataLoader(fetcher, batch_size=None, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        images = (f[0] for f in _fetched(iter(loader)))
    else:
        images = (dataset.fetch(c) for c in chunks)
    for chunk, raw in zip(chunks, images, strict=True):
        yield augment(_to_device(raw, device)), _to_device(dataset.targets[chunk], device)
