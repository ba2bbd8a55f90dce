"""The run recipe: everything a config describes, built once, in one order.

``build_run(cfg)`` turns a resolved config into a :class:`Run`: the datasets and the labeled
split, the method (student and EMA teacher, on the device, in its memory format), the batch
stream, the optimizer, the learning-rate schedule and the AMP context. The training loop, the
benchmarks, ``--init-from``, checkpoint loading and loops of your own all start from it, so a run
is set up the same way everywhere. Nothing here writes files or evaluates anything.

    run = build_run(resolve_config(None, {"method": "moco", "max_steps": 100}))
    for batch in run.stream:
        loss, logs = train_step(run.step_fn, run.method, batch, step, run.total_steps,
                                run.optimizer, run.scheduler, amp=run.amp, scaler=run.scaler)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from emanorm.data import BatchStream, DatasetInfo, ImageDataset, load_dataset, pretrain_split, select_labeled
from emanorm.errors import UserError
from emanorm.methods import Method
from emanorm.optim import build_optimizer
from emanorm.train.config import check_feasible
from emanorm.train.distributed import DistInfo, single_process
from emanorm.train.restore import (  # re-exported: rebuilding a method lived here
    initialise_from,
    make_method,
)

log = logging.getLogger("emanorm")

AmpContext = Callable[[], Any]


# -- the pieces ------------------------------------------------------------------------------------
def use_channels_last(cfg: Mapping[str, Any]) -> bool:
    """Whether to run the networks in channels_last memory format.

    ``auto`` means on, on every device: on this project's CPU it was never slower (1.00-1.5x
    faster per step for the small net and the ResNets, docs/performance.md) and on CUDA it is
    what cuDNN prefers with AMP. ``false`` keeps NCHW, e.g. for a model that needs it.
    """
    return cfg["channels_last"] in (True, "auto")


def lr_factor(
    step: int, total: int, warmup: int, schedule: str, milestones: list[float], *,
    warmup_from_zero: bool = False, floor: float = 0.0,
) -> float:
    """Linear warm-up, then cosine, step (x0.1 at each milestone fraction) or constant.

    The warm-up goes from 1/W to 1 (``(step + 1) / W``), or with ``warmup_from_zero`` from 0 to 1
    as DINO's ``linspace(0, lr, W)``; the cosine goes from 1 to ``floor`` (DINO's ``min_lr / lr``).
    """
    if warmup > 0 and step < warmup:
        if warmup_from_zero:
            return step / (warmup - 1) if warmup > 1 else 0.0
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return 0.1 ** sum(step >= m * total for m in milestones)
    return 1.0


def cosine_weight_decay(start: float, end: float, total: int) -> Callable[[int], float]:
    """DINO's weight-decay schedule: ``end + (start - end) (1 + cos(pi step / total)) / 2``."""
    return lambda step: end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(step / max(1, total), 1.0)))


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR``, plus, with ``weight_decay_at``, the weight decay of every group that has one
    (the decayed group; the exempt group stays at 0) set to ``weight_decay_at(step)`` at each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float],
                 weight_decay_at: Callable[[int], float] | None = None) -> None:
        self.weight_decay_at = weight_decay_at
        for group in optimizer.param_groups:
            group.setdefault("decayed", group.get("weight_decay", 0.0) > 0)
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.weight_decay_at is not None:
            value = self.weight_decay_at(self.last_epoch)
            for group in self.optimizer.param_groups:
                # (a group loaded from an older checkpoint has no "decayed")
                if group.get("decayed", group["weight_decay"] > 0):
                    group["weight_decay"] = value

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("weight_decay_at", None)  # a function: rebuilt from the config, never saved
        return state


def amp_context(device: torch.device, amp: str) -> tuple[AmpContext, torch.amp.GradScaler | None]:
    """``(autocast context factory, GradScaler or None)`` for ``amp`` (auto: bf16 on CUDA, off on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext, None
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"amp fp16 needs a CUDA device, the run is on {device.type}; use --amp bf16 or off")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def load_run_dataset(cfg: Mapping[str, Any], split: str) -> ImageDataset:
    """Split ``split`` of the config's dataset; a missing or broken dataset is a one-line UserError."""
    try:
        return load_dataset(
            cfg["dataset"],
            split,
            data_dir=cfg["data_dir"],
            image_size=cfg["image_size"],
            on_corrupt=cfg["on_corrupt"],
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise UserError(str(err).splitlines()[0] if str(err) else repr(err)) from None


def labeled_subset(cfg: Mapping[str, Any], train_ds: ImageDataset) -> torch.Tensor | None:
    """The labeled indices the config asks for (seeded, equal on every rank), or None for all."""
    if not any(cfg[k] is not None for k in ("labels_per_class", "label_fraction", "label_index_csv")):
        return None
    try:
        return select_labeled(
            train_ds.targets,
            train_ds.info.num_classes,
            labels_per_class=cfg["labels_per_class"],
            fraction=cfg["label_fraction"],
            index_csv=cfg["label_index_csv"],
            seed=cfg["seed"],
        )
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None


def labeled_indices(cfg: Mapping[str, Any], train_ds: ImageDataset) -> torch.Tensor:
    """The dataset indices a run trains with labels: the config's subset, else every labeled image."""
    labeled = labeled_subset(cfg, train_ds)
    return (train_ds.targets >= 0).nonzero().flatten() if labeled is None else labeled


def planned_steps(cfg: Mapping[str, Any], steps_per_epoch: int) -> int:
    """A run's optimizer steps: ``max_steps``, else ``epochs`` x ``steps_per_epoch``."""
    return cfg["max_steps"] or cfg["epochs"] * steps_per_epoch


# -- the recipe ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run is made of; built by :func:`build_run`."""

    cfg: dict[str, Any]
    dist: DistInfo
    train_ds: ImageDataset
    test_ds: ImageDataset
    info: DatasetInfo
    labeled: torch.Tensor  # dataset indices of the labeled images (all labeled ones without a split)
    split_digest: str  # sha1 of ``labeled``: the same on every rank, recorded in summary.json
    method: Method  # the unwrapped method: checkpoints, after_step, evaluation
    step_fn: Callable[..., Any]  # what a step calls: the method, its DDP wrapper, or a compiled version
    stream: BatchStream
    total_steps: int
    total_epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: AmpContext
    scaler: torch.amp.GradScaler | None
    warnings: list[str]  # what building the method warned about (shown once, kept in summary.json)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch

    @property
    def images_per_step(self) -> int:
        """Dataset images one process takes per step: its labeled plus its unlabeled batch."""
        parts = (self.stream.labeled, self.stream.unlabeled)
        return sum(part.batch_size for part in parts if part is not None)

    def batches(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The stream's batches from the start of ``epoch`` on, epoch after epoch, without end."""
        while True:
            self.stream.set_epoch(epoch, 0)
            yield from self.stream
            epoch += 1


def _split_digest(labeled: torch.Tensor, dist_info: DistInfo) -> str:
    digest = hashlib.sha1(labeled.cpu().numpy().tobytes()).hexdigest()
    if dist_info.distributed:  # a split drawn per rank would silently train on different labels
        digests: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise UserError(
                f"the labeled split differs between ranks ({digests}); check --data-dir on every node"
            )
    return digest


def log_method_setup(method: Method, cfg: Mapping[str, Any], dist_info: DistInfo) -> None:
    """The ``--verbose`` lines about the model: sizes, the normalization plan, devices and threads."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    student = sum(p.numel() for p in method.parameters() if p.requires_grad)
    teacher = 0 if method.teacher is None else sum(t.numel() for t in method.teacher.state_dict().values())
    log.debug("model: %s %s backbone, %s trainable parameters, teacher %s tensor elements (%s)",
              cfg["method"], cfg["backbone"], f"{student:,}", f"{teacher:,}",
              "no teacher" if method.teacher is None else f"teacher norm {method.teacher.norm}")
    log.debug("norm plan: %s", method.plan)
    log.debug("device: %s, %d process(es), %d CPU thread(s) (OMP_NUM_THREADS=%s, OMP_WAIT_POLICY=%s), "
              "torch %s",
              dist_info.device, dist_info.world_size, torch.get_num_threads(),
              os.environ.get("OMP_NUM_THREADS", "unset"), os.environ.get("OMP_WAIT_POLICY", "unset"),
              torch.__version__)


def start_statistics(cfg: Mapping[str, Any], method: Method, stream: BatchStream) -> list[str]:
    """The calibrated start ``calibrate_bn_batches`` asks for, before step 0 of a new run; returns
    what it warned about. A run from ``--init-from`` keeps its start point's statistics."""
    batches = cfg.get("calibrate_bn_batches", 0)
    if not batches:
        return []
    if cfg.get("init_from"):
        log.info("calibrate_bn_batches: not applied, the --init-from start point brings its BatchNorm "
                 "statistics")
        return []
    used = calibrate_start(method, stream, min(batches, stream.steps_per_epoch))
    if not used or batches <= stream.steps_per_epoch:
        return []
    # a preset's 20 on a small dataset: epoch 0 is all there is
    message = (f"calibrate_bn_batches {batches} is more than the {stream.steps_per_epoch} batches of an "
               "epoch: calibrated on all of them")
    log.warning("warning: %s", message)
    return [message]


def calibrate_start(method: Method, stream: BatchStream, batches: int) -> int:
    """Set the student's BN statistics from the first ``batches`` batches of epoch 0 and start
    every EMA copy from them (:meth:`Method.calibrate_statistics`); the stream is left at the start
    of epoch 0, so training sees the same batches as an uncalibrated run. Returns the forwards used."""
    if batches > stream.steps_per_epoch:
        raise UserError(
            f"calibrate_bn_batches {batches} is more than the {stream.steps_per_epoch} batches of an epoch"
        )
    stream.set_epoch(0)
    first = iter(stream)
    try:
        count = method.calibrate_statistics(itertools.islice(first, batches))
    finally:
        first.close()  # a DataLoader's workers stop here, not whenever the generator is collected
    stream.set_epoch(0)
    if count:
        log.info("calibrated the BatchNorm statistics on %d batches (%d forwards) before step 0",
                 batches, count)
    else:
        log.info("calibrate_bn_batches: the model has no BatchNorm running statistics to calibrate")
    return count


def check_micro_batch(method: Method, per_rank: int, accumulate: int) -> None:
    """Each micro-batch of ``accumulate`` must split into the method's BN groups (``bn_splits`` or
    a method's own ``num_splits``): a split that fails only at step 0 is refused here."""
    splits, micro = method.plan.num_splits, per_rank // max(accumulate, 1)
    if accumulate > 1 and splits > 1 and micro % splits:
        raise UserError(
            f"a micro-batch of {micro} (batch {per_rank} per process / accumulate {accumulate}) does not "
            f"split into the {splits} BatchNorm groups; choose a batch divisible by accumulate x {splits}"
        )


def build_run(
    cfg: dict[str, Any],
    dist_info: DistInfo | None = None,
    *,
    resuming: bool = False,
    train_ds: ImageDataset | None = None,
    test_ds: ImageDataset | None = None,
) -> Run:
    """Build the run ``cfg`` describes (``dist_info``: torchrun's ranks; default one process).

    ``resuming`` skips ``--init-from`` (a resumed run loads its own weights over it anyway).
    ``train_ds`` / ``test_ds`` reuse datasets already in memory instead of loading them again.
    Seeds torch with ``cfg["seed"]`` first: two builds of one config hold identical weights.
    """
    dist_info = dist_info or single_process(cfg["device"])
    device = dist_info.device
    check_batch_size(cfg, dist_info)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg["seed"])  # the order below is the order of random draws: keep it
    train_ds = train_ds if train_ds is not None else load_run_dataset(cfg, "train")
    test_ds = test_ds if test_ds is not None else load_run_dataset(cfg, "test")
    labeled, split_digest = labeled_split(cfg, train_ds, test_ds, dist_info)
    method, build_warnings = build_run_method(cfg, train_ds.info, dist_info, resuming)
    stream = batch_stream(cfg, method, train_ds, labeled, dist_info)
    steps_per_epoch = stream.steps_per_epoch
    if steps_per_epoch < 1:
        raise UserError(f"the dataset is too small for batch size {cfg['batch_size']}: zero steps per epoch")
    total_steps = planned_steps(cfg, steps_per_epoch)
    if not resuming:  # a resumed run has its statistics
        build_warnings += start_statistics(cfg, method, stream)
    optimizer, scheduler = optimisation(cfg, method, total_steps, int(cfg["warmup_epochs"] * steps_per_epoch))
    amp, scaler = amp_context(device, cfg["amp"])
    return Run(
        cfg=cfg,
        dist=dist_info,
        train_ds=train_ds,
        test_ds=test_ds,
        info=train_ds.info,
        labeled=labeled,
        split_digest=split_digest,
        method=method,
        step_fn=step_function(cfg, method, dist_info),
        stream=stream,
        total_steps=total_steps,
        total_epochs=math.ceil(total_steps / steps_per_epoch),
        optimizer=optimizer,
        scheduler=scheduler,
        amp=amp,
        scaler=scaler,
        warnings=build_warnings,
    )


def check_batch_size(cfg: Mapping[str, Any], dist_info: DistInfo) -> None:
    """The global batch must split evenly over the processes (and each share over ``accumulate``)."""
    if cfg["batch_size"] % dist_info.world_size:
        raise UserError(
            f"batch_size {cfg['batch_size']} must be divisible by the process count {dist_info.world_size}"
        )
    check_feasible(cfg, dist_info.world_size)


def labeled_split(
    cfg: Mapping[str, Any], train_ds: ImageDataset, test_ds: ImageDataset, dist_info: DistInfo
) -> tuple[torch.Tensor, str]:
    """The labeled indices (all labeled images without a split) and their digest, equal on every rank."""
    info = train_ds.info
    labeled = labeled_indices(cfg, train_ds)
    split_digest = _split_digest(labeled, dist_info)
    log.debug(
        "data: %s from %s, %d training and %d test images, %d labeled, %d classes, %d channel(s) at %d px",
        cfg["dataset"], cfg["data_dir"] or "the default location", len(train_ds), len(test_ds), len(labeled),
        info.num_classes, info.channels, info.image_size,
    )
    return labeled, split_digest


def build_run_method(
    cfg: Mapping[str, Any], info: DatasetInfo, dist_info: DistInfo, resuming: bool
) -> tuple[Method, list[str]]:
    """The method on its device and in its memory format, initialised ``--init-from`` a checkpoint
    unless ``resuming``; with what building it warned about (each message once)."""
    device = dist_info.device
    with warnings.catch_warnings(record=True) as caught:  # e.g. EMAN on a model without BatchNorm
        warnings.simplefilter("always", UserWarning)
        method = make_method(cfg, info, dist_info.distributed, device.type).to(device)
    build_warnings = list(dict.fromkeys(str(w.message) for w in caught))  # each shown once
    for message in build_warnings:
        log.warning("warning: %s", message)
    if use_channels_last(cfg):
        method = method.to(memory_format=torch.channels_last)
    try:
        method.check_batch_size(cfg["batch_size"] // dist_info.world_size)
        check_micro_batch(method, cfg["batch_size"] // dist_info.world_size, cfg.get("accumulate", 1))
    except ValueError as err:
        raise UserError(str(err)) from None
    log_method_setup(method, cfg, dist_info)
    if cfg["init_from"] and not resuming:
        target = {"backbone": cfg["backbone"], "channels": info.channels, "image_size": info.image_size}
        initialise_from(method, cfg["init_from"], cfg["init_which"], target=target)
    return method, build_warnings


def batch_stream(
    cfg: Mapping[str, Any], method: Method, train_ds: ImageDataset, labeled: torch.Tensor, dist_info: DistInfo
) -> BatchStream:
    """This rank's batches: labeled and/or unlabeled views, as the method declares them."""
    per_rank = cfg["batch_size"] // dist_info.world_size
    has_labeled, has_unlabeled = bool(method.labeled_views), bool(method.unlabeled_views)
    if not has_labeled and not has_unlabeled:
        raise UserError(f"method {cfg['method']} declares no views")
    unlabeled_ds = train_ds  # STL-10 adds its 100k unlabeled images to the unlabeled side
    if has_unlabeled and pretrain_split(cfg["dataset"]) != "train":
        unlabeled_ds = load_run_dataset(cfg, pretrain_split(cfg["dataset"]))
    return BatchStream(
        labeled=train_ds if has_labeled else None,
        labeled_indices=labeled if has_labeled else None,
        unlabeled=unlabeled_ds if has_unlabeled else None,
        unlabeled_indices=torch.arange(len(unlabeled_ds)) if has_unlabeled else None,
        labeled_views=method.labeled_views,
        unlabeled_views=method.unlabeled_views,
        batch_size=per_rank,
        unlabeled_batch_size=per_rank * (cfg["unlabeled_ratio"] if has_labeled else 1),
        seed=cfg["seed"],
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        device=dist_info.device,
        num_workers=cfg["num_workers"],
        augment_options=cfg["augment_options"],
        loader_timeout=cfg["loader_timeout"],
    )


def optimisation(
    cfg: Mapping[str, Any], method: Method, total_steps: int, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over the method's parameter groups and its learning-rate schedule."""
    optimizer = build_optimizer(
        method.parameter_groups(cfg["weight_decay"]),
        cfg["optimizer"],
        lr=cfg["lr"],
        momentum=cfg["sgd_momentum"],
        weight_decay=cfg["weight_decay"],
        nesterov=cfg["nesterov"],
        eta=cfg["lars_eta"],
    )
    floor = cfg.get("min_lr", 0.0) / cfg["lr"]
    scheduler = Schedule(
        optimizer,
        lambda s: lr_factor(s, total_steps, warmup_steps, cfg["schedule"], cfg["lr_milestones"],
                            warmup_from_zero=cfg.get("warmup_from_zero", False), floor=floor),
        None if cfg.get("weight_decay_end") is None
        else cosine_weight_decay(cfg["weight_decay"], cfg["weight_decay_end"], total_steps),
    )
    return optimizer, scheduler


def step_function(cfg: Mapping[str, Any], method: Method, dist_info: DistInfo) -> Callable[..., Any]:
    """What a step calls: the method, its DDP wrapper under torchrun, compiled with ``compile``."""
    model: nn.Module = method
    if dist_info.distributed:
        device = dist_info.device
        model = nn.parallel.DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # never overwrite the teacher's statistics with rank 0's
        )
    return torch.compile(model) if cfg["compile"] else model
