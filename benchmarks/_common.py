"""Shared machinery of the benchmarks (docs/performance.md).

* :class:`EmanormPath`: emanorm's own training step, built from the trainer's pieces and run exactly
  as ``emanorm.train.loop`` runs one step (BatchStream -> method.training_step -> backward ->
  optimizer -> scheduler -> method.after_step, plus the loop's per-step checks and logging).
* :class:`ReferencePath` and its subclasses: the same method, model, batch and data written the way
  the paper's public code runs it: a torchvision-style dataset of PIL images, per-sample torchvision
  transforms in a ``DataLoader`` with worker processes, fp32 NCHW, the EMA update as a Python loop
  over ``state_dict``, no compilation.
* :func:`alternate`: both paths in one process, in alternating timed blocks after warm-up.
* :func:`probe_memory`: the peak memory of one path, in a fresh process.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms as T

from emanorm.data import DatasetInfo, TensorImageDataset, eval_batches
from emanorm.data.augment import blur_kernel_size
from emanorm.methods import METHODS as METHOD_CLASSES
from emanorm.methods.tensors import logs_to_floats
from emanorm.models import Classifier, MLPHead, build_backbone
from emanorm.train import build_run, resolve_config, train_step
from emanorm.train.distributed import pick_device, single_process
from emanorm.train.finite import FiniteWatch
from emanorm.train.presets import parse_key_value
from emanorm.train.recipe import labeled_indices, load_run_dataset
from emanorm.train.recipe import planned_steps as total_steps_of

#: The preset each benchmarked method runs (the CPU-sized recipes `emanorm train` uses).
PRESETS = {"fixmatch": "small-fixmatch", "moco": "small-moco", "byol": "small-byol"}


# -- machine and configuration -----------------------------------------------------------------------
def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 (read once, closed at exit)
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a figure needs next to it: machine, load, versions, date."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _busy_seconds() -> float:
    """CPU-seconds every process of the machine has spent since boot (/proc/stat, idle excluded)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much CPU other processes took while a benchmark ran: the machine's busy CPU-seconds minus
    this process's and its finished children's (loader workers, memory probes), as a share of all
    cores. My own load average would count the benchmark itself."""

    def __enter__(self) -> OtherLoad:
        self.wall, self.busy, self.mine = time.perf_counter(), _busy_seconds(), self._mine()
        return self

    @staticmethod
    def _mine() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.wall
        others = (_busy_seconds() - self.busy) - (self._mine() - self.mine)
        self.share = max(0.0, others) / (wall * (os.cpu_count() or 1))


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` config overrides, read as ``emanorm train --set`` and ``compare --set`` read them
    (values as YAML: ``true``, ``0.5``, ``[1, 2]``; dashes in keys become underscores)."""
    return dict(parse_key_value(item) for item in items)


def bench_config(method: str, device: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config of ``emanorm train --method METHOD`` (its small preset) plus overrides."""
    if method not in PRESETS:
        raise ValueError(f"unknown benchmark method {method!r}; allowed: {', '.join(PRESETS)}")
    extra = dict(overrides or {})
    method_args = extra.pop("method_args", None)
    cfg = resolve_config(PRESETS[method], {"device": device, **extra})
    if method_args:
        cfg["method_args"] = {**cfg["method_args"], **method_args}
    return cfg


def standin_dataset(size: int, count: int, channels: int = 3, seed: int = 0) -> TensorImageDataset:
    """Random uint8 images with random labels (10 classes): stand-in data for throughput only."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (count,), generator=g)
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.5,), (0.25,))
    info = DatasetInfo(f"standin{size}", 10, channels, size, mean, std)
    return TensorImageDataset(images, targets, info, "train")


def train_dataset(cfg: dict[str, Any], standin: int | None = None, standin_count: int = 4096) -> Any:
    """The training split the trainer would load, or a stand-in of ``standin`` px RGB images."""
    if standin:
        return standin_dataset(standin, standin_count)
    return load_run_dataset(cfg, "train")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the two paths -------------------------------------------------------------------------------------
class Path_:
    """A training path the harness times: ``start_block`` / ``step`` x n / ``end_block``."""

    name = "path"
    device = torch.device("cpu")
    images_per_step = 0
    #: torch intra-op threads while this path runs (None: leave the process default)
    threads: int | None = None

    def start_block(self) -> None:
        """Untimed set-up before a timed block (e.g. start loader workers and fill their pipeline)."""

    def step(self) -> None:
        raise NotImplementedError

    def end_block(self) -> None:
        """Untimed tear-down after a timed block (e.g. stop loader workers so they idle nothing)."""


class EmanormPath(Path_):
    """emanorm's training step as ``emanorm train`` runs it (one process).

    Built by the trainer's own recipe (``emanorm.train.build_run``: method, stream, optimizer,
    schedule, AMP, channels_last, the compile switch); each step is the trainer's own
    ``train_step``, plus its log record every ``log_every``.
    """

    name = "emanorm"

    def __init__(self, cfg: dict[str, Any], train_ds: Any | None = None) -> None:
        self.cfg = cfg
        # the benchmark never evaluates: the training split stands in for the test split
        run = build_run(cfg, single_process(cfg["device"]), train_ds=train_ds, test_ds=train_ds)
        self.run = run
        self.device = run.device
        self.method, self.stream, self.step_fn = run.method, run.stream, run.step_fn
        self.total_steps = run.total_steps
        self.optimizer, self.scheduler = run.optimizer, run.scheduler
        self.amp, self.scaler = run.amp, run.scaler
        self.images_per_step = run.images_per_step
        self.global_step = 0
        self.last_logs: dict[str, float] = {}
        self.finite_watch = FiniteWatch()  # the trainer's device-side non-finite record
        self._batches = run.batches()
        run.method.train()

    def step(self) -> None:
        batch = next(self._batches)
        loss, logs = train_step(
            self.step_fn, self.method, batch, self.global_step, self.total_steps, self.optimizer,
            self.scheduler, amp=self.amp, scaler=self.scaler, finite_watch=self.finite_watch,
        )
        self.global_step += 1
        if self.global_step % self.cfg["log_every"] == 0:  # the loop's log record: one sync per log_every
            self.finite_watch.check()  # raises NonFiniteLossError, as the trainer does at its log steps
            self.last_logs = logs_to_floats({"loss": loss, **logs})

    def teacher_classifier(self) -> nn.Module | None:
        return self.method.classifier("teacher")


# -- the reference path: per-sample PIL, DataLoader workers, fp32 NCHW, state_dict EMA loop ----------
class PILImages(Dataset):
    """A torchvision.datasets-style dataset: a uint8 array in memory, one PIL image per ``__getitem__``
    (as ``torchvision.datasets.FashionMNIST`` / ``CIFAR10`` do), then the per-sample ``transform``."""

    def __init__(self, images: Tensor, targets: Tensor, transform: Callable[[Image.Image], Any]) -> None:
        arr = images.numpy()
        self.data = arr[:, 0] if arr.shape[1] == 1 else np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        self.mode = "L" if arr.shape[1] == 1 else "RGB"
        self.targets = targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[i], mode=self.mode)
        return self.transform(img), self.targets[i]


class PILCutout:
    """FixMatch's Cutout on a PIL image: a grey square of side ``fraction * size`` at a random centre."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        v = self.fraction * w
        x0, y0 = np.random.uniform(0, w), np.random.uniform(0, h)
        box = (max(0, x0 - v / 2), max(0, y0 - v / 2), min(w, x0 + v / 2), min(h, y0 + v / 2))
        img = img.copy()
        ImageDraw.Draw(img).rectangle(box, fill=127 if img.mode == "L" else (127, 127, 127))
        return img


class MultiView:
    """Several independently augmented views of one image (MoCo's TwoCropsTransform, FixMatch's pair)."""

    def __init__(self, *transforms: Callable[[Image.Image], Tensor]) -> None:
        self.transforms = transforms

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [t(img) for t in self.transforms]


def pil_transform(preset: str, info: DatasetInfo) -> T.Compose:
    """emanorm's preset ``preset`` written with torchvision v1 transforms on one PIL image at a time,
    with the same parameters as ``emanorm.data.build_augmentation`` (docs/data.md)."""
    size, channels = info.image_size, info.channels
    large, blur = size >= 128, size > 32
    flip = T.RandomHorizontalFlip()
    weak = ([T.RandomResizedCrop(size), flip] if large
            else [T.RandomCrop(size, padding=round(0.125 * size), padding_mode="reflect"), flip])
    cutout = 0.5 if size <= 96 else 0.0

    def ssl(scale: tuple[float, float], saturation: float, blur_p: float, solarize_p: float) -> list[Any]:
        sat, hue = (saturation, 0.1) if channels == 3 else (0.0, 0.0)
        ops: list[Any] = [T.RandomResizedCrop(size, scale), flip,
                          T.RandomApply([T.ColorJitter(0.4, 0.4, sat, hue)], p=0.8)]
        if channels == 3:
            ops.append(T.RandomGrayscale(0.2))
        if blur and blur_p > 0:
            ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=blur_p))
        if solarize_p > 0:
            ops.append(T.RandomSolarize(128, p=solarize_p))
        return ops

    ops = {
        "none": [],
        "weak": weak,
        "strong": [*weak, T.RandAugment(2, 10)] + ([PILCutout(cutout)] if cutout > 0 else []),
        "moco": ssl((0.2, 1.0), 0.4, 0.5, 0.0),
        "byol1": ssl((0.08, 1.0), 0.2, 1.0, 0.0),
        "byol2": ssl((0.08, 1.0), 0.2, 0.1, 0.2),
    }[preset]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(info.mean, info.std)])


@torch.no_grad()
def state_dict_ema(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """The EMA update of the paper's public code: a Python loop over ``state_dict`` entries
    (parameters and BN statistics, EMAN's Eq. 1 and 9; integer buffers copied)."""
    student_state = student.state_dict()
    for name, t in teacher.state_dict().items():
        s = student_state[name]
        if t.dtype.is_floating_point:
            t.copy_(t * m + (1.0 - m) * s)
        else:
            t.copy_(s)


def frozen_copy(module: nn.Module) -> nn.Module:
    """The teacher of the paper's code: a deep copy, no gradients, in eval mode for the whole run."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher.eval()


class _Loader:
    """A DataLoader whose iterator lives for one timed block (its workers stop between blocks)."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                 sampler: Any = None) -> None:
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False,
        )
        self.it: Iterator[Any] | None = None

    def next(self) -> Any:
        if self.it is None:
            self.it = iter(self.loader)
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def stop(self) -> None:
        self.it = None  # drops the iterator: its workers shut down


def reference_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The method's options as emanorm runs it: its ``OPTIONS`` defaults under the config's
    ``method_args``, so the reference code is given exactly the hyper-parameters emanorm uses."""
    return {**METHOD_CLASSES[cfg["method"]].OPTIONS, **(cfg.get("method_args") or {})}


class ReferencePath(Path_):
    """Base of the reference steps: plain SGD, per-step cosine LR, per-sample PIL loaders."""

    name = "reference"
    warm_steps = 3  # untimed steps at the start of each block, so the loader pipeline is in steady state

    def __init__(self, cfg: dict[str, Any], train_ds: Any, workers: int = 2) -> None:
        self.cfg, self.ds, self.workers = cfg, train_ds, workers
        self.device = pick_device(cfg["device"])
        self.info = train_ds.info
        self.global_step = 0
        self.loaders: list[_Loader] = []
        self.last_loss = float("nan")

    def _optimizer(self, params: Any, steps_per_epoch: int) -> None:
        cfg = self.cfg
        self.total_steps = total_steps_of(cfg, steps_per_epoch)
        self.optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"],
                                         weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])

    def _set_lr(self) -> None:
        # The paper's code adjusts the learning rate by hand every iteration (cosine).
        progress = min(self.global_step / max(1, self.total_steps), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _to(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def _backward(self, loss: Tensor) -> None:
        self._set_lr()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.global_step % self.cfg["log_every"] == 0:
            self.last_loss = loss.item()

    def start_block(self) -> None:
        for _ in range(self.warm_steps):
            self.step()

    def end_block(self) -> None:
        for loader in self.loaders:
            loader.stop()

    def teacher_classifier(self) -> nn.Module | None:
        return None


class ReferenceFixMatch(ReferencePath):
    """FixMatch with an EMA(N) teacher as the paper's code runs it: labeled loader (weak) and unlabeled
    loader (weak, strong) with per-sample PIL transforms; student on cat(x, u_s); teacher (eval mode)
    on u_w under no_grad; EMA update after the optimizer step."""

    def __init__(self, cfg: dict[str, Any], train_ds: Any, workers: int = 2) -> None:
        super().__init__(cfg, train_ds, workers)
        info, o = self.info, reference_options(cfg)
        self.threshold, self.lambda_u = o["threshold"], o["lambda_u"]
        self.model = Classifier(build_backbone(cfg["backbone"], in_channels=info.channels,
                                               image_size=info.image_size), info.num_classes).to(self.device)
        self.teacher = frozen_copy(self.model)
        labeled = labeled_indices(cfg, train_ds)
        b, mu = cfg["batch_size"], cfg["unlabeled_ratio"]
        images, targets = train_ds.images, train_ds.targets
        lab = PILImages(images[labeled], targets[labeled], pil_transform("weak", info))
        unl = PILImages(images, targets,
                        MultiView(pil_transform("weak", info), pil_transform("strong", info)))
        # FixMatch's code cycles the small labeled set by sampling it with replacement.
        sampler = RandomSampler(lab, replacement=True, num_samples=10**7)
        self.labeled = _Loader(lab, b, workers, self.device, sampler)
        self.unlabeled = _Loader(unl, b * mu, workers, self.device)
        self.loaders = [self.labeled, self.unlabeled]
        self._optimizer(self.model.parameters(), len(train_ds) // (b * mu))
        self.images_per_step = b + b * mu
        self.model.train()

    def step(self) -> None:
        x, y = self.labeled.next()
        (u_w, u_s), _ = self.unlabeled.next()
        x, y, u_w, u_s = self._to(x), self._to(y), self._to(u_w), self._to(u_s)
        logits = self.model(torch.cat([x, u_s]))
        logits_x, logits_s = logits[: x.shape[0]], logits[x.shape[0]:]
        with torch.no_grad():
            probs = torch.softmax(self.teacher(u_w), dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= self.threshold).float()
        loss = F.cross_entropy(logits_x, y) + self.lambda_u * (
            F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
        self._backward(loss)
        state_dict_ema(self.teacher, self.model, self.cfg["ema_momentum"])
        self.global_step += 1

    def teacher_classifier(self) -> nn.Module:
        return self.teacher


class ReferenceMoCo(ReferencePath):
    """MoCo v2 with an EMA(N) key encoder as the paper's code runs it: a two-crop PIL transform, query
    forward, momentum update (state_dict loop) then key forward (key encoder in eval mode), InfoNCE
    against a queue, enqueue."""

    def __init__(self, cfg: dict[str, Any], train_ds: Any, workers: int = 2) -> None:
        super().__init__(cfg, train_ds, workers)
        info = self.info
        o = reference_options(cfg)
        self.temperature = o["temperature"]
        backbone = build_backbone(cfg["backbone"], in_channels=info.channels, image_size=info.image_size)
        d = backbone.feature_dim
        self.encoder_q = nn.Sequential(backbone, MLPHead(d, d, o["dim"], batch_norm=False)).to(self.device)
        self.encoder_k = frozen_copy(self.encoder_q)
        self.queue = F.normalize(torch.randn(o["queue_size"], o["dim"], device=self.device), dim=1)
        self.ptr = 0
        b = cfg["batch_size"]
        two = MultiView(pil_transform("moco", info), pil_transform("moco", info))
        self.loader = _Loader(PILImages(train_ds.images, train_ds.targets, two), b, workers, self.device)
        self.loaders = [self.loader]
        self._optimizer(self.encoder_q.parameters(), len(train_ds) // b)
        self.images_per_step = b
        self.encoder_q.train()

    def step(self) -> None:
        (im_q, im_k), _ = self.loader.next()
        im_q, im_k = self._to(im_q), self._to(im_k)
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            state_dict_ema(self.encoder_k, self.encoder_q, self.cfg["ema_momentum"])
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().t()
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        self._backward(loss)
        n = k.shape[0]
        self.queue[self.ptr:self.ptr + n] = k
        self.ptr = (self.ptr + n) % self.queue.shape[0]
        self.global_step += 1


class ReferenceBYOL(ReferencePath):
    """BYOL with an EMA(N) target as the paper's code runs it: two asymmetric PIL views, online network
    + predictor on each view, target (eval mode) on each view under no_grad, symmetric loss, EMA update
    (state_dict loop, BYOL's cosine momentum) after the optimizer step."""

    def __init__(self, cfg: dict[str, Any], train_ds: Any, workers: int = 2) -> None:
        super().__init__(cfg, train_ds, workers)
        info = self.info
        o = reference_options(cfg)
        backbone = build_backbone(cfg["backbone"], in_channels=info.channels, image_size=info.image_size)
        d = backbone.feature_dim
        self.online = nn.Sequential(backbone, MLPHead(d, o["hidden_dim"], o["proj_dim"])).to(self.device)
        self.predictor = MLPHead(o["proj_dim"], o["hidden_dim"], o["proj_dim"]).to(self.device)
        self.target = frozen_copy(self.online)
        b = cfg["batch_size"]
        views = MultiView(pil_transform("byol1", info), pil_transform("byol2", info))
        self.loader = _Loader(PILImages(train_ds.images, train_ds.targets, views), b, workers, self.device)
        self.loaders = [self.loader]
        params = list(self.online.parameters()) + list(self.predictor.parameters())
        self._optimizer(params, len(train_ds) // b)
        self.images_per_step = b
        self.online.train()
        self.predictor.train()

    def step(self) -> None:
        (v1, v2), _ = self.loader.next()
        v1, v2 = self._to(v1), self._to(v2)
        p1 = self.predictor(self.online(v1))
        p2 = self.predictor(self.online(v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        loss = ((2 - 2 * F.cosine_similarity(p1, z2, dim=1)).mean()
                + (2 - 2 * F.cosine_similarity(p2, z1, dim=1)).mean())
        self._backward(loss)
        progress = min(self.global_step / max(1, self.total_steps), 1.0)
        m = 1 - (1 - self.cfg["ema_momentum"]) * (math.cos(math.pi * progress) + 1) / 2
        state_dict_ema(self.target, self.online, m)
        self.global_step += 1


REFERENCES: dict[str, type[ReferencePath]] = {
    "fixmatch": ReferenceFixMatch, "moco": ReferenceMoCo, "byol": ReferenceBYOL,
}


# -- timing --------------------------------------------------------------------------------------------
def alternate(paths: list[Path_], *, blocks: int, steps: int, warmup: int,
              log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Images/s of each path per timed block: every path warms up, then blocks of ``steps`` steps
    run in turn (A B A B ...; the order flips every round so neither always follows the other).
    Wall-clock, device-synchronised; set-up and tear-down of a block are outside the timing."""
    default_threads = torch.get_num_threads()
    for p in paths:
        torch.set_num_threads(p.threads or default_threads)
        p.start_block()
        for _ in range(warmup):
            p.step()
        sync(p.device)
        p.end_block()
    rates: dict[str, list[float]] = {p.name: [] for p in paths}
    for b in range(blocks):
        for p in (paths if b % 2 == 0 else paths[::-1]):
            torch.set_num_threads(p.threads or default_threads)
            p.start_block()
            sync(p.device)
            start = time.perf_counter()
            for _ in range(steps):
                p.step()
            sync(p.device)
            seconds = time.perf_counter() - start
            p.end_block()
            rates[p.name].append(steps * p.images_per_step / seconds)
            if log:
                log(f"  block {b + 1}/{blocks} {p.name:10s} {rates[p.name][-1]:8.1f} img/s")
    torch.set_num_threads(default_threads)
    return rates


def summarise(rates: dict[str, list[float]], ours: str, theirs: str) -> dict[str, Any]:
    """Medians, spreads and the speedup: the median over rounds of (ours / theirs) in the same round."""
    pairs = [a / b for a, b in zip(rates[ours], rates[theirs], strict=True)]
    return {
        ours: {"median": statistics.median(rates[ours]), "min": min(rates[ours]), "max": max(rates[ours])},
        theirs: {"median": statistics.median(rates[theirs]), "min": min(rates[theirs]),
                 "max": max(rates[theirs])},
        "speedup": statistics.median(pairs),
        "speedup_per_round": [round(r, 3) for r in pairs],
    }


# -- memory --------------------------------------------------------------------------------------------
class TreeMemory:
    """Samples the memory of this process and its children (DataLoader workers) in a thread.

    ``peak_pss``: the largest sum over the process tree of PSS (proportional set size: a page shared
    by n processes counts 1/n in each, so forked workers' shared pages are not counted twice).
    ``peak_rss``: the largest RSS of this process alone while sampling. Both cover only the sampled
    interval (the training steps), not the dataset loading before it.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                full = p.memory_full_info()
                total += full.pss
                if p.pid == self.proc.pid:
                    self.peak_rss = max(self.peak_rss, full.rss)
        self.peak_pss = max(self.peak_pss, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()



def measure_memory(path: Path_, steps: int) -> dict[str, float]:
    """Run ``steps`` steps (one block) under :class:`TreeMemory`; MiB figures."""
    if path.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(path.device)
    with TreeMemory() as mem:
        path.start_block()
        for _ in range(steps):
            path.step()
        sync(path.device)
        path.end_block()
    out = {"peak_pss_tree_mib": mem.peak_pss / 2**20, "peak_rss_main_mib": mem.peak_rss / 2**20,
           # the kernel's lifetime peak of this process, dataset loading included
           "lifetime_peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}
    if path.device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(path.device) / 2**20
    return out


def probe_memory(script: str, args: list[str], timeout: float = 900) -> dict[str, float]:
    """Run ``script args`` in a fresh Python process and read the JSON its last output line holds, so
    every configuration's peak is its own (a process's peak RSS never goes down)."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- evaluation (time-to-accuracy) ---------------------------------------------------------------------
@torch.no_grad()
def accuracy_on(classifier: nn.Module, test_ds: Any, device: torch.device, limit: int | None = None) -> float:
    """Top-1 accuracy (%) of ``classifier`` in eval mode on the test split (preset ``none``)."""
    was = classifier.training
    classifier.eval()
    idx = torch.arange(len(test_ds) if limit is None else min(limit, len(test_ds)))
    correct = total = 0
    for images, targets in eval_batches(test_ds, 512, device, indices=idx):
        correct += (classifier(images).argmax(1) == targets).sum().item()
        total += targets.numel()
    classifier.train(was)
    return 100.0 * correct / max(total, 1)


def print_machine(info: dict[str, Any]) -> None:
    load = info["load_avg_1_5_15"]
    print(f"# {info['date']}  cpu: {info['cpu']} ({info['cores']} cores, torch threads "
          f"{info['torch_threads']})  load avg {load[0]}/{load[1]}/{load[2]}  torch {info['torch']}  "
          f"device {info['device']}{'  gpu ' + info['gpu'] if 'gpu' in info else ''}")


# -- the command-line driver shared by step_throughput.py and peer_lightly.py --------------------------
Builder = Callable[[str, str, Any, dict[str, Any]], Path_]


def comparison_parser(doc: str, methods: tuple[str, ...], other: str) -> Any:
    """The flags of a comparison benchmark (``--quick`` shrinks the defaults)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few short blocks, no memory probes (< 1 min on CPU)")
    p.add_argument("--methods", default=",".join(methods), help=f"comma-separated subset of {methods}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per path (default 6; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 10; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per path (default 5; quick 1)")
    p.add_argument("--block-warmup", type=int, default=None,
                   help=f"untimed {other} steps at the start of each block, to fill its loader pipeline "
                        "(default 3; quick 1)")
    p.add_argument("--workers", type=int, default=2, help=f"{other} DataLoader workers per loader")
    p.add_argument("--other-threads", type=int, default=None,
                   help=f"torch threads of the {other} main process (default: torch's default, "
                        "as its code runs); emanorm always runs with the default")
    p.add_argument("--batch-size", type=int, default=None, help="override the presets' batch size")
    p.add_argument("--backbone", default=None, help="override the presets' backbone (e.g. resnet18)")
    p.add_argument("--standin", type=int, default=None,
                   help="random RGB stand-in images of this size instead of Fashion-MNIST")
    p.add_argument("--standin-count", type=int, default=4096)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="emanorm config override, e.g. channels_last=true or compile=true (repeatable)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak memory per (method, path) in fresh processes (default on; quick off)")
    p.add_argument("--memory-steps", type=int, default=20)
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return p


def parse_comparison_args(p: Any, argv: list[str] | None, methods: tuple[str, ...]) -> Any:
    args = p.parse_args(argv)
    for name, full, short in (("blocks", 6, 2), ("steps", 10, 3), ("warmup", 5, 1), ("block_warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    if args.memory is None:
        args.memory = not args.quick
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in methods]
    if bad:
        p.error(f"unknown method(s) {bad}; allowed: {', '.join(methods)}")
    return args


def emanorm_overrides(args: Any) -> dict[str, Any]:
    """The emanorm config overrides the flags ask for (``--set``, ``--batch-size``, ``--backbone``)."""
    out: dict[str, Any] = parse_set(args.set)
    if args.batch_size:
        out["batch_size"] = args.batch_size
    if args.backbone:
        out["backbone"] = args.backbone
    return out


def shared_overrides(args: Any) -> dict[str, Any]:
    """The overrides the other path shares (model and batch), never emanorm's machinery switches."""
    return {k: v for k, v in emanorm_overrides(args).items() if k in ("batch_size", "backbone")}


def build_emanorm(method: str, args: Any, cache: dict[str, Any]) -> EmanormPath:
    cfg = bench_config(method, args.device, emanorm_overrides(args))
    if "ds" not in cache:
        cache["ds"] = train_dataset(cfg, args.standin, args.standin_count)
    return EmanormPath(cfg, cache["ds"])


def _probe_args(args: Any, method: str, which: str) -> list[str]:
    out = ["--probe", which, "--methods", method, "--device", args.device, "--workers", str(args.workers),
           "--memory-steps", str(args.memory_steps), "--block-warmup", str(args.block_warmup),
           "--standin-count", str(args.standin_count)]
    if args.other_threads:
        out += ["--other-threads", str(args.other_threads)]
    for key in ("batch_size", "backbone", "standin"):
        value = getattr(args, key)
        if value:
            out += [f"--{key.replace('_', '-')}", str(value)]
    for item in args.set:
        out += ["--set", item]
    return out


def comparison_main(args: Any, *, build: Builder, other: str, script: str) -> dict[str, Any]:
    """Time emanorm against ``other`` for every method of ``args``; print a line per method and
    ``speedup=<smallest per-method speedup>`` last. With ``--probe WHICH`` (internal) this process
    only measures the peak memory of one (method, path) and prints it as JSON."""
    if args.probe:
        path = build(args.methods[0], args.probe, args, {})
        if path.threads:
            torch.set_num_threads(path.threads)
        for _ in range(2):  # the first steps allocate the optimizer state and warm the allocator
            path.step()
        print(json.dumps(measure_memory(path, args.memory_steps)))
        return {}
    info = machine_info(torch.device(args.device))
    print_machine(info)
    print(f"# blocks {args.blocks} x {args.steps} steps after {args.warmup} warm-up steps; {other}: "
          f"{args.workers} loader workers, {args.block_warmup} untimed steps per block, "
          f"{args.other_threads or torch.get_num_threads()} torch threads; emanorm overrides: "
          f"{emanorm_overrides(args) or 'none'}", flush=True)
    cache: dict[str, Any] = {}
    results: dict[str, Any] = {"machine": info, "args": vars(args), "methods": {}}
    with OtherLoad() as others:
        _compare_methods(args, build, other, script, cache, results)
    results["speedup"] = min(m["speedup"] for m in results["methods"].values())
    results["other_processes_cpu_share"] = round(others.share, 3)
    print(f"# other processes used {100 * others.share:.0f}% of the CPU during the run"
          + ("  (figures are noisy: rerun on a quiet machine)" if others.share > 0.1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")
    print(f"speedup={results['speedup']:.2f}")
    return results


def _compare_methods(args: Any, build: Builder, other: str, script: str, cache: dict[str, Any],
                     results: dict[str, Any]) -> None:
    for method in args.methods:
        ours, theirs = build(method, "emanorm", args, cache), build(method, other, args, cache)
        rates = alternate([ours, theirs], blocks=args.blocks, steps=args.steps, warmup=args.warmup,
                          log=None if args.quick else (lambda s: print(s, flush=True)))
        summary = summarise(rates, "emanorm", other)
        summary["images_per_step"] = ours.images_per_step
        del ours, theirs
        if args.memory:
            summary["memory_mib"] = {w: probe_memory(script, _probe_args(args, method, w))
                                     for w in ("emanorm", other)}
        results["methods"][method] = summary
        e, r = summary["emanorm"], summary[other]
        line = (f"{method:9s} emanorm {e['median']:8.1f} img/s ({e['min']:.0f}-{e['max']:.0f})   "
                f"{other} {r['median']:8.1f} img/s ({r['min']:.0f}-{r['max']:.0f})   "
                f"speedup {summary['speedup']:.2f}")
        if args.memory:
            mem = summary["memory_mib"]
            line += "   peak PSS " + " / ".join(f"{w} {mem[w]['peak_pss_tree_mib']:.0f} MiB"
                                               for w in ("emanorm", other))
            line += "   peak RSS main " + " / ".join(f"{w} {mem[w]['peak_rss_main_mib']:.0f} MiB"
                                                    for w in ("emanorm", other))
            if "cuda_max_allocated_mib" in mem["emanorm"]:
                line += "   CUDA max allocated " + " / ".join(
                    f"{w} {mem[w]['cuda_max_allocated_mib']:.0f} MiB" for w in ("emanorm", other))
        print(line, flush=True)
