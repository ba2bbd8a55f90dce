"""The one training loop every method runs on.

data -> method.training_step -> optimizer -> method.after_step (teacher update) -> logs,
evaluation and checkpoints. Methods are known only through their small interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from emanorm.errors import UserError
from emanorm.train import checkpoint as ckpt
from emanorm.train.config import SEMI_SUPERVISED, comparable, dump_config
from emanorm.train.distributed import (
    DistInfo,
    average_batchnorm_statistics,
    barrier,
    cleanup,
    init_distributed,
)

log = logging.getLogger("emanorm")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# -- building blocks -------------------------------------------------------------------------------
def make_method(cfg: dict[str, Any], info: Any, distributed: bool, device_type: str = "cpu") -> nn.Module:
    """The method a config asks for, with backbones built for the norm it needs."""
    from emanorm.methods import build_method
    from emanorm.models import build_backbone

    warned = []

    def backbone_factory(kind: str) -> nn.Module:
        if kind == "sync_bn" and not distributed:
            if not warned:
                log.info("SyncBN on one process is plain BN: falling back to bn")
                warned.append(True)
            kind = "bn"
        if kind == "sync_bn" and device_type != "cuda":
            raise UserError(
                "SyncBN across processes needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU); "
                "on CPU use --norm bn or --norm eman"
            )
        return build_backbone(
            cfg["backbone"], in_channels=info.channels, image_size=info.image_size, norm=kind
        )

    try:
        return build_method(
            cfg["method"],
            backbone_factory=backbone_factory,
            num_classes=info.num_classes,
            norm=cfg["norm"],
            momentum=cfg["ema_momentum"],
            eman_momentum=cfg["eman_momentum"],
            bn_momentum=cfg["bn_momentum"],
            **(cfg.get("method_args") or {}),
        )
    except ValueError as err:
        raise UserError(str(err)) from None


def use_channels_last(cfg: dict[str, Any]) -> bool:
    """Whether to run the networks in channels_last memory format.

    ``auto`` means on, on every device: on this project's CPU it was never slower (1.00-1.5x
    faster per step for the small net and the ResNets, docs/performance.md) and on CUDA it is
    what cuDNN prefers with AMP. ``false`` keeps NCHW, e.g. for a model that needs it.
    """
    return cfg["channels_last"] in (True, "auto")


def lr_factor(step: int, total: int, warmup: int, schedule: str, milestones: list[float]) -> float:
    """Linear warm-up, then cosine, step (x0.1 at each milestone fraction) or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return 0.1 ** sum(step >= m * total for m in milestones)
    return 1.0


class RunLogger:
    """metrics.jsonl (one record per line), TensorBoard events and the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is optional at run time
            log.info("tensorboard is not installed: no TensorBoard events")

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- evaluation during training ----------------------------------------------------------------------
@torch.no_grad()
def _features(encoder: nn.Module, dataset: Any, indices: torch.Tensor, device: torch.device, amp) -> Any:
    from emanorm.data import eval_batches

    feats, labels = [], []
    for images, targets in eval_batches(dataset, 512, device, indices=indices):
        with amp():
            feats.append(encoder(images).float())
        labels.append(targets.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate_during_training(
    method: nn.Module, cfg: dict[str, Any], train_ds: Any, test_ds: Any, device: torch.device, amp
) -> dict[str, float]:
    """kNN (k=20, weighted) of teacher and student features; test accuracy for semi-supervised methods."""
    from emanorm.evaluation import knn_predict

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
    for which in ("teacher", "student"):
        encoder = method.encoder(which)
        bank_f, bank_y = _features(encoder, train_ds, bank, device, amp)
        query_f, query_y = _features(encoder, test_ds, queries, device, amp)
        pred = knn_predict(bank_f, bank_y, query_f, k=cfg["knn_k"], num_classes=train_ds.info.num_classes)
        results[f"knn_{which}"] = 100.0 * (pred.to(query_y.device) == query_y).float().mean().item()
        classifier = method.classifier(which) if cfg["method"] in SEMI_SUPERVISED else None
        if classifier is not None:
            # a Classifier is backbone + fc: reuse the features instead of a second pass
            if getattr(classifier, "backbone", None) is encoder and hasattr(classifier, "fc"):
                logits = classifier.fc(query_f.to(next(classifier.fc.parameters()).dtype))
            else:
                logits = _features(classifier, test_ds, queries, device, amp)[0]
            results[f"test_acc_{which}"] = 100.0 * (logits.argmax(1) == query_y).float().mean().item()
    method.train(was_training)
    return results


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic write; a full disk or a vanished directory is a clear error and the old file stays."""
    try:
        ckpt.atomic_save(state, path)
    except OSError as err:
        raise UserError(
            f"could not write checkpoint {path}: {err.strerror or err}; the previous checkpoint is intact"
        ) from None


# -- the run directory ----------------------------------------------------------------------------
def prepare_run_dir(cfg: dict[str, Any], resume: bool, force: bool) -> Path:
    run_dir = Path(cfg["out"])
    config_file = run_dir / "config.yaml"
    finished = (run_dir / "summary.json").exists()
    started = (run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME).exists() or config_file.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    if resume and config_file.exists() and not force:
        import yaml

        try:
            previous = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{config_file} is not valid YAML; use --force to start over") from None
        old, new = comparable(previous), comparable(cfg)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
            raise UserError(f"--resume with a different config ({details}); use --force to override")
    elif not resume and (finished or started) and not force:
        state = "a finished run" if finished else "an unfinished run"
        raise UserError(f"{run_dir} already holds {state}; use --resume to continue or --force to overwrite")
    if force and not resume and run_dir.exists():
        for name in ("checkpoints", "tb", "metrics.jsonl", "summary.json"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to run directory {run_dir}: {err.strerror}") from None
    return run_dir


def train_step(
    step_fn: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, dict[str, Any]]],
    method: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    total_steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    amp: Callable[[], Any] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimisation step exactly as ``emanorm train`` runs it, for loops of your own.

    ``step_fn`` runs ``method.training_step`` (the method itself, its DDP wrapper or a compiled
    version). Forward under ``amp``, a finite-loss check, backward (scaled with ``scaler``), the
    optimizer step, a finite-weights check, the scheduler step, the BN-statistics all-reduce
    across ranks, then ``method.after_step`` (the teacher update). Returns the loss and the
    method's logs; raises :class:`NonFiniteLossError` before the teacher moves.
    """
    with amp():
        loss, logs = step_fn(batch, step)
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(f"loss is {loss.item()} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    # A finite loss can still step into non-finite weights (a huge lr): stop before the teacher
    # copies them and before any checkpoint holds them.
    params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        raise NonFiniteLossError(
            f"parameters became non-finite at step {step}; the loss was {loss.item():.4g}"
        )
    scheduler.step()
    average_batchnorm_statistics(method)
    method.after_step(step, total_steps)
    return loss, logs


def default_run_dir(cfg: dict[str, Any]) -> str:
    return f"runs/{cfg['method']}-{cfg['norm']}-{cfg['dataset']}-s{cfg['seed']}"


# -- the loop -----------------------------------------------------------------------------------------
def amp_context(device: torch.device, amp: str) -> tuple[Callable[[], Any], torch.amp.GradScaler | None]:
    """``(autocast context factory, GradScaler or None)`` for ``amp`` (auto: bf16 on CUDA, off on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def labeled_subset(cfg: dict[str, Any], train_ds: Any) -> torch.Tensor | None:
    """The labeled indices the config asks for (seeded, equal on every rank), or None for all."""
    from emanorm.data import select_labeled

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


def load_run_dataset(cfg: dict[str, Any], split: str) -> Any:
    """Split ``split`` of the config's dataset; a missing or broken dataset is a one-line UserError."""
    from emanorm.data import load_dataset

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


def train(
    cfg: dict[str, Any],
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    return_method: bool = False,
) -> Any:
    """Run (or continue) the training a resolved config describes.

    Returns the summary, or ``(summary, method)`` with ``return_method`` (for use as a library).
    """
    dist_info = init_distributed(cfg["device"])
    try:
        summary, method = _train(cfg, dist_info, resume, force, progress)
        return (summary, method) if return_method else summary
    finally:
        cleanup()


def _train(
    cfg: dict[str, Any], dist_info: DistInfo, resume: bool, force: bool, progress: bool
) -> tuple[dict[str, Any], nn.Module]:
    from emanorm.data import BatchStream, write_split_csv
    from emanorm.optim import build_optimizer

    device = dist_info.device
    if cfg["out"] is None:
        cfg["out"] = default_run_dir(cfg)
    if dist_info.is_main:
        run_dir = prepare_run_dir(cfg, resume, force)
    barrier()
    run_dir = Path(cfg["out"])
    if cfg["batch_size"] % dist_info.world_size:
        raise UserError(
            f"batch_size {cfg['batch_size']} must be divisible by the process count {dist_info.world_size}"
        )
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg["seed"])

    # data
    from emanorm.data import pretrain_split

    train_ds = load_run_dataset(cfg, "train")
    test_ds = load_run_dataset(cfg, "test")
    info = train_ds.info
    labeled = labeled_subset(cfg, train_ds)
    if labeled is None:
        labeled = (train_ds.targets >= 0).nonzero().flatten()
    split_digest = hashlib.sha1(labeled.cpu().numpy().tobytes()).hexdigest()
    if dist_info.distributed:  # a split drawn per rank would silently train on different labels
        digests: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(digests, split_digest)
        if len(set(digests)) != 1:
            raise UserError(
                f"the labeled split differs between ranks ({digests}); check --data-dir on every node"
            )

    # method
    with warnings.catch_warnings(record=True) as caught:  # e.g. EMAN on a model without BatchNorm
        warnings.simplefilter("always", UserWarning)
        method = make_method(cfg, info, dist_info.distributed, device.type).to(device)
    build_warnings = list(dict.fromkeys(str(w.message) for w in caught))  # each shown once
    for message in build_warnings:
        log.warning("warning: %s", message)
    if use_channels_last(cfg):
        method = method.to(memory_format=torch.channels_last)
    resuming = resume and (run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME).exists()
    if cfg["init_from"] and not resuming:  # a resumed run loads its own weights over these anyway
        from emanorm.train.init import initialise_from

        target = {"backbone": cfg["backbone"], "channels": info.channels, "image_size": info.image_size}
        initialise_from(method, cfg["init_from"], cfg["init_which"], target=target)

    per_rank = cfg["batch_size"] // dist_info.world_size
    has_labeled = bool(method.labeled_views)
    has_unlabeled = bool(method.unlabeled_views)
    if not has_labeled and not has_unlabeled:
        raise UserError(f"method {cfg['method']} declares no views")
    # STL-10 adds its 100k unlabeled images to the unlabeled side
    unlabeled_split = pretrain_split(cfg["dataset"])
    unlabeled_ds = train_ds
    if has_unlabeled and unlabeled_split != "train":
        unlabeled_ds = load_run_dataset(cfg, unlabeled_split)
    unlabeled_indices = torch.arange(len(unlabeled_ds))
    stream = BatchStream(
        labeled=train_ds if has_labeled else None,
        labeled_indices=labeled if has_labeled else None,
        unlabeled=unlabeled_ds if has_unlabeled else None,
        unlabeled_indices=unlabeled_indices if has_unlabeled else None,
        labeled_views=method.labeled_views,
        unlabeled_views=method.unlabeled_views,
        batch_size=per_rank,
        unlabeled_batch_size=per_rank * (cfg["unlabeled_ratio"] if has_labeled else 1),
        seed=cfg["seed"],
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        device=device,
        num_workers=cfg["num_workers"],
        augment_options=cfg["augment_options"],
        loader_timeout=cfg["loader_timeout"],
    )
    steps_per_epoch = stream.steps_per_epoch
    if steps_per_epoch < 1:
        raise UserError(f"the dataset is too small for batch size {cfg['batch_size']}: zero steps per epoch")
    total_steps = cfg["max_steps"] or cfg["epochs"] * steps_per_epoch
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = int(cfg["warmup_epochs"] * steps_per_epoch)

    groups = method.parameter_groups(cfg["weight_decay"])
    optimizer = build_optimizer(
        groups,
        cfg["optimizer"],
        lr=cfg["lr"],
        momentum=cfg["sgd_momentum"],
        weight_decay=cfg["weight_decay"],
        nesterov=cfg["nesterov"],
        eta=cfg["lars_eta"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, warmup_steps, cfg["schedule"], cfg["lr_milestones"]),
    )
    amp, scaler = amp_context(device, cfg["amp"])

    # resume
    epoch, step_in_epoch, global_step, elapsed = 0, 0, 0, 0.0
    checkpoint_file = run_dir / "checkpoints" / ckpt.CHECKPOINT_NAME
    if resume and checkpoint_file.exists():
        state = ckpt.safe_load(checkpoint_file, map_location=device)
        ckpt.load_matching(method, state["method"], f"checkpoint {checkpoint_file}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        elapsed = state.get("elapsed", 0.0)
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dist_info.rank] if dist_info.rank < len(rngs) else rngs[0])
        if not torch.equal(state["labeled_indices"].cpu(), labeled.cpu()):
            raise UserError("the labeled split differs from the checkpoint's; was the dataset changed?")
        log.info("resumed from %s at step %d (epoch %d)", checkpoint_file, global_step, epoch)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)

    if dist_info.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        write_split_csv(labeled, run_dir / "labeled_split.csv")
    logger = RunLogger(run_dir, dist_info.is_main, global_step)

    model: nn.Module = method
    if dist_info.distributed:
        model = nn.parallel.DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # never overwrite the teacher's statistics with rank 0's
        )
    step_fn = torch.compile(model) if cfg["compile"] else model

    def save_checkpoint(epoch_: int, step_in_epoch_: int) -> None:
        rngs = [ckpt.rng_state()]
        if dist_info.distributed:
            gathered: list[Any] = [None] * dist_info.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if dist_info.is_main:
            write_checkpoint(
                {
                    "format": 1,
                    "config": cfg,
                    "dataset_info": asdict(info),
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch_,
                    "step_in_epoch": step_in_epoch_,
                    "global_step": global_step,
                    "elapsed": elapsed + time.perf_counter() - started,
                    "rng": rngs,
                    "labeled_indices": labeled.cpu(),
                },
                checkpoint_file,
            )

    bar = None
    if progress and dist_info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=global_step, desc=f"{cfg['method']}-{cfg['norm']}", unit="step")
    started = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    method.train()
    while global_step < total_steps:
        stream.set_epoch(epoch, step_in_epoch)
        for batch in stream:
            try:
                loss, logs = train_step(
                    step_fn, method, batch, global_step, total_steps, optimizer, scheduler,
                    amp=amp, scaler=scaler,
                )
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err}; stopped, the last good checkpoint is kept at {checkpoint_file}"
                ) from None
            global_step += 1
            step_in_epoch += 1
            window_images += sum(v.shape[0] for k, v in batch.items() if v.dim() == 4)
            if global_step % cfg["log_every"] == 0 or global_step == total_steps:
                seconds = max(time.perf_counter() - window_start, 1e-9)
                record = {"kind": "train", "step": global_step, "epoch": epoch, "loss": float(loss.detach())}
                record.update({k: float(v) for k, v in logs.items()})
                record["lr"] = optimizer.param_groups[0]["lr"]
                record["img_per_s"] = window_images / seconds
                logger.record(record)
                window_start, window_images = time.perf_counter(), 0
                if bar is not None:
                    shown = {"loss": f"{record['loss']:.3f}", "img/s": f"{record['img_per_s']:.0f}"}
                    if "mask" in record:
                        shown["mask"] = f"{record['mask']:.2f}"
                    bar.set_postfix(shown, refresh=False)
            if bar is not None:
                bar.update(1)
            if cfg["checkpoint_every_steps"] and global_step % cfg["checkpoint_every_steps"] == 0:
                save_checkpoint(epoch, step_in_epoch)
            if global_step >= total_steps:
                break
        epoch_done = step_in_epoch >= steps_per_epoch
        if epoch_done:
            epoch, step_in_epoch = epoch + 1, 0
        finished = global_step >= total_steps
        if finished or (cfg["eval_every"] and epoch_done and epoch % cfg["eval_every"] == 0):
            if dist_info.is_main:
                last_eval = evaluate_during_training(method, cfg, train_ds, test_ds, device, amp)
                logger.record({"kind": "eval", "step": global_step, "epoch": epoch, **last_eval})
                if bar is not None:
                    bar.write(
                        f"step {global_step} epoch {epoch}: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in last_eval.items())
                    )
            barrier()
        save_checkpoint(epoch, step_in_epoch)
    if bar is not None:
        bar.close()
    if not last_eval and dist_info.is_main:  # resumed a run that had already finished its steps
        last_eval = evaluate_during_training(method, cfg, train_ds, test_ds, device, amp)
    logger.close()

    wall = elapsed + time.perf_counter() - started
    summary = {
        "method": cfg["method"],
        "norm": cfg["norm"],
        "dataset": cfg["dataset"],
        "backbone": cfg["backbone"],
        "seed": cfg["seed"],
        "steps": global_step,
        "epochs": total_epochs,
        "labeled": len(labeled),
        "labeled_split_sha1": split_digest,
        "init_from": cfg["init_from"],
        "wall_clock_s": round(wall, 1),
        "run_dir": str(run_dir),
        "final": last_eval,
    }
    if build_warnings:
        summary["warnings"] = build_warnings
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    barrier()
    return summary, method
