"""The evaluation protocols as workflows on a trained run, in one place.

A workflow loads a run's backbone and the evaluation data and takes frozen features
(:func:`prepare`, :func:`frozen_features`, in :mod:`emanorm.evaluation.context`), runs one
protocol (:func:`eval_knn`, :func:`eval_linear`, :func:`eval_finetune`, :func:`eval_retrieval`,
:func:`eval_lowshot`, here) and records its scores as percents (:func:`result_record`,
:func:`results_in_percent`, in :mod:`emanorm.evaluation.records`); each name is imported from the
module that defines it. ``emanorm eval`` (``cli/evaluate.py``) and ``emanorm compare``'s linear
probe (``experiments/evaluate.py``) both run through here; the numerical protocols live beside this
module (``knn.py``, ``linear.py``, ...).
Mistakes a user can fix raise :class:`emanorm.errors.UserError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from emanorm.data import build_augmentation
from emanorm.errors import UserError
from emanorm.evaluation.context import EvalContext, check_writable, load_run_backbone, run_dir_of
from emanorm.evaluation.export import backbone_state_dict, export_backbone, load_exported
from emanorm.evaluation.features import ImageSource, assert_frozen
from emanorm.evaluation.finetune import finetune
from emanorm.evaluation.knn import knn_predict
from emanorm.evaluation.linear import linear_probe
from emanorm.evaluation.lowshot import MultiLabelSVMTask, lowshot_svm
from emanorm.evaluation.records import ProtocolResult
from emanorm.evaluation.retrieval import retrieval_scores
from emanorm.evaluation.settings import FinetuneSettings, LinearSettings
from emanorm.evaluation.transfer import adapted_transform


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A protocol's ValueError comes from a user's setting (too few labels, bad grid): one line."""
    try:
        yield
    except ValueError as err:
        raise UserError(str(err)) from err


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std())


def _repeated_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-1/top-5 mean and std over the label subsets of ``repeats``, with every run's record."""
    top1, top1_std = _mean_std([r["top1"] for r in runs])
    top5, top5_std = _mean_std([r["top5"] for r in runs])
    return {"top1": top1, "top5": top5, "top1_std": top1_std, "top5_std": top5_std, "runs": runs}


def _repeated_rows(results: dict[str, Any], lr_name: str, lr_key: str) -> list[tuple[str, str]]:
    """The table of a linear or fine-tuning result: accuracies, each run's chosen lr, labels used."""
    runs = results["runs"]
    return [
        ("top-1 %", _pct(results["top1"])),
        ("top-5 %", _pct(results["top5"])),
        (lr_name, ", ".join(f"{r[lr_key]:g}" for r in runs)),
        ("train labels", str(runs[0]["num_train"])),
    ]


def _training_settings(
    epochs: int, batch_size: int, weight_decay: float, val_fraction: float, seeds: list[int]
) -> dict[str, Any]:
    """The settings a trained protocol (linear, finetune) records beside its learning rates."""
    return {"epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay,
            "val_fraction": val_fraction, "seeds": seeds}


def _database_and_queries(ctx: EvalContext, database: str, queries: str) -> tuple[Any, Any]:
    """Frozen features of the labeled training images (the database) and of the test split."""
    with assert_frozen(ctx.backbone):
        return (ctx.features(ctx.train_set, ctx.labeled(), database),
                ctx.features(ctx.test_set, ctx.test_indices, queries))


def eval_knn(ctx: EvalContext, *, k: int = 20, temperature: float = 0.07) -> ProtocolResult:
    """Weighted kNN: labeled training images are the database, the test split the queries."""
    (db_f, db_y), (q_f, q_y) = _database_and_queries(ctx, "train features", "test features")
    with _user_errors():
        pred = knn_predict(
            db_f.to(ctx.device),
            db_y.to(ctx.device),
            q_f.to(ctx.device),
            k=k,
            temperature=temperature,
            num_classes=ctx.num_classes,
        )
    top1 = float((pred.cpu() == q_y).float().mean())
    results = {"top1": top1, "num_database": len(db_y), "num_queries": len(q_y)}
    rows = [("top-1 %", _pct(top1)), ("k", str(k)), ("database", str(len(db_y)))]
    return ProtocolResult("knn", results, {"k": k, "temperature": temperature}, rows)


def eval_retrieval(ctx: EvalContext, *, topk: int = 1000) -> ProtocolResult:
    """Top-k mAP / recall: labeled training images are the database, the test split the queries."""
    (db_f, db_y), (q_f, q_y) = _database_and_queries(ctx, "database features", "query features")
    with _user_errors():
        scores = retrieval_scores(
            db_f.to(ctx.device), db_y.to(ctx.device), q_f.to(ctx.device), q_y.to(ctx.device), topk=topk
        )
    results = {**scores, "num_database": len(db_y), "num_queries": len(q_y)}
    rows = [(f"mAP@{topk} %", _pct(scores["map"])), (f"recall@{topk} %", _pct(scores["recall"]))]
    return ProtocolResult("retrieval", results, {"topk": topk}, rows)


def probe_label_subsets(
    backbone: nn.Module,
    train_set: ImageSource,
    subsets: Sequence[Tensor],
    test_set: ImageSource,
    test_indices: Tensor,
    *,
    num_classes: int,
    probe: LinearSettings,
    seeds: Sequence[int | None],
    features: Any,
) -> list[dict[str, Any]]:
    """The linear probe on each labeled subset of ``train_set``, features taken once for their union.

    ``features(dataset, indices, desc)`` gives frozen ``(features, labels)``; a seed of ``None``
    keeps ``probe.seed``. The whole protocol runs under the frozen check: no weight or BN statistic
    may move. A ``ValueError`` of the probe (too few labels, bad grid) becomes a :class:`UserError`.
    """
    union = torch.unique(torch.cat(list(subsets)))
    row = torch.full((len(train_set),), -1, dtype=torch.long)
    row[union] = torch.arange(len(union))
    runs = []
    with assert_frozen(backbone):
        f_u, y_u = features(train_set, union, "train features")
        f_t, y_t = features(test_set, test_indices, "test features")
        for seed, subset in zip(seeds, subsets, strict=True):
            part = row[subset]
            extra = {} if seed is None else {"seed": seed}
            with _user_errors():
                runs.append(linear_probe(
                    f_u[part], y_u[part], f_t, y_t, num_classes=num_classes, settings=probe, **extra
                ))
    return runs


def eval_linear(
    ctx: EvalContext,
    *,
    lrs: Sequence[float],
    epochs: int,
    probe_batch_size: int = 256,
    weight_decay: float,
    val_fraction: float,
    repeats: int = 1,
) -> ProtocolResult:
    """Linear classifier on frozen features cached once, lr searched on a validation split."""
    seeds = [ctx.seed + r for r in range(repeats)]
    probe = LinearSettings(
        lrs=tuple(lrs), epochs=epochs, batch_size=probe_batch_size,
        weight_decay=weight_decay, val_fraction=val_fraction, device=ctx.device,
        progress=ctx.progress,
    )
    runs = probe_label_subsets(
        ctx.backbone, ctx.train_set, [ctx.labeled(s) for s in seeds], ctx.test_set, ctx.test_indices,
        num_classes=ctx.num_classes, probe=probe, seeds=seeds, features=ctx.features,
    )
    results = _repeated_results(runs)
    settings = {
        "lrs": list(lrs),
        **_training_settings(epochs, probe_batch_size, weight_decay, val_fraction, seeds),
        "features": "cached once from the eval transform (no augmentation)",
    }
    rows = _repeated_rows(results, "best lr", "best_lr")
    if len(runs) > 1:
        rows.insert(1, ("top-1 std", _pct(results["top1_std"])))
    return ProtocolResult("linear", results, settings, rows)


def eval_finetune(
    ctx: EvalContext,
    *,
    backbone_lrs: Sequence[float],
    classifier_lr: float = 0.1,
    epochs: int,
    weight_decay: float,
    val_fraction: float,
    repeats: int = 1,
) -> ProtocolResult:
    """Fine-tune backbone + classifier: weak augmentation, backbone lr searched on validation."""
    seeds = [ctx.seed + r for r in range(repeats)]
    augment = build_augmentation("weak", ctx.input_info)
    if ctx.input_info is not ctx.info:  # another dataset: its images in the run's channels first
        augment = adapted_transform(ctx.info, ctx.input_info, augment)
    batch_size = ctx.request.batch_size
    tuning = FinetuneSettings(
        backbone_lrs=tuple(backbone_lrs), classifier_lr=classifier_lr, epochs=epochs,
        batch_size=batch_size, weight_decay=weight_decay, val_fraction=val_fraction,
        device=ctx.device, amp=ctx.request.amp, progress=ctx.progress,
    )
    runs = []
    with assert_frozen(ctx.backbone):  # finetune trains a copy; the loaded backbone stays as it was
        for seed in seeds:
            with _user_errors():
                runs.append(
                    finetune(
                        ctx.backbone, ctx.train_set, ctx.labeled(seed), ctx.test_set,
                        num_classes=ctx.num_classes, augment=augment, eval_transform=ctx.transform,
                        test_indices=ctx.test_indices, settings=tuning, seed=seed,
                    )
                )
    results = _repeated_results(runs)
    settings = {
        "backbone_lrs": list(backbone_lrs),
        "classifier_lr": classifier_lr,
        **_training_settings(epochs, batch_size, weight_decay, val_fraction, seeds),
        "augmentation": "weak",
    }
    rows = _repeated_rows(results, "backbone lr", "best_backbone_lr")
    return ProtocolResult("finetune", results, settings, rows)


def eval_lowshot(
    ctx: EvalContext, *, shots: Sequence[int], draws: int = 5, val_per_class: int = 10
) -> ProtocolResult:
    """Linear SVMs on k labeled images per class, C picked on training data.

    Single-label targets: one multi-class SVM, accuracy. Multi-label targets (VOC07): one binary
    SVM per class on k positives per class, mean average precision over classes.
    """
    task = None
    if ctx.multilabel:
        if ctx.labels != {"label_fraction": 1.0}:
            raise UserError(
                f"'{ctx.dataset}' is multi-label: low-shot draws k positives per class itself; "
                "--labels-per-class, --label-fraction and --label-index-csv do not apply"
            )
        pool = torch.arange(len(ctx.train_set))
        pool_labels = torch.as_tensor(ctx.train_set.label_matrix)
        test_labels = torch.as_tensor(ctx.test_set.label_matrix)[ctx.test_indices]
        task = MultiLabelSVMTask(random_state=ctx.seed)
    else:
        pool = ctx.labeled()
        pool_labels = torch.as_tensor(ctx.train_set.targets).long()[pool]

    def pool_features(positions: np.ndarray) -> Tensor:
        return ctx.features(ctx.train_set, pool[torch.as_tensor(positions)], "train features")[0]

    with assert_frozen(ctx.backbone):
        f_t, y_t = ctx.features(ctx.test_set, ctx.test_indices, "test features")
        if ctx.multilabel:
            y_t = test_labels
        with _user_errors():
            res = lowshot_svm(
                pool_features,
                pool_labels,
                f_t,
                y_t,
                shots=shots,
                draws=draws,
                seed=ctx.seed,
                val_per_class=val_per_class,
                task=task,
                progress=ctx.progress,
            )
    metric = "mAP" if ctx.multilabel else "accuracy"
    rows = [
        (f"{k}-shot {metric} %", f"{_pct(v['mean'])} +- {_pct(v['std'])}") for k, v in res["per_shot"].items()
    ]
    settings = {
        "shots": res["shots"],
        "draws": draws,
        "costs": res["costs"],
        "val_per_class": val_per_class,
        "features": "L2-normalised, frozen",
        "metric": metric,
        "train_split": getattr(ctx.train_set, "split", None),
    }
    if ctx.multilabel:
        names = list(getattr(ctx.train_set, "classes", []) or range(ctx.num_classes))
        in_train = (pool_labels == 1).any(0)
        test_pos, test_neg = (test_labels == 1).any(0), (test_labels == -1).any(0)
        scored = torch.nonzero(in_train & test_pos & test_neg).flatten().tolist()
        settings["sampling"] = "k positives per class, union over classes; difficult (0) ignored per class"
        settings["classes_scored"] = [str(names[c]) for c in scored]
        rows.append(("classes scored", f"{len(scored)} of {ctx.num_classes}"))
    return ProtocolResult("lowshot", res, settings, rows)


# --- export ----------------------------------------------------------------------------------------------


def export_run(run: str, which: str, fmt: str, out: str | None) -> tuple[Path, int, str | None]:
    """Write a run's backbone state_dict and read it back; ``(path, tensors, torchvision recipe)``."""
    suffix = ".pth" if fmt == "torchvision" else ".safetensors"
    path = Path(out) if out else run_dir_of(run) / "export" / f"backbone_{which}{suffix}"
    if (path.suffix == ".safetensors") != (fmt == "safetensors"):
        raise UserError(
            f"--out {path} does not fit --format {fmt}: name it *{suffix}, or choose the other format"
        )
    if Path(run).exists():
        check_writable(path, path.parent)
    backbone, config = load_run_backbone(run, which)
    metadata = {"which": which, "source": str(run)}
    metadata.update({k: str(config[k]) for k in ("backbone", "method", "norm", "dataset") if k in config})
    try:
        export_backbone(backbone, path, fmt, metadata=metadata)
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
        raise UserError(f"could not write {path}: {getattr(err, 'strerror', None) or err}") from None
    # Read the file back: what was written is exactly the backbone's state.
    expected, written = backbone_state_dict(backbone), load_exported(path)
    if expected.keys() != written.keys() or any(not torch.equal(expected[k], written[k]) for k in expected):
        raise RuntimeError(f"export check failed: {path} does not match the backbone")
    recipe = None
    if fmt == "torchvision":
        from emanorm.evaluation.export_recipe import torchvision_recipe  # deferred: builds torchvision models

        image_size = int((config.get("dataset_info") or {}).get("image_size", 224))
        recipe = torchvision_recipe(backbone, str(config.get("backbone", "")), path, image_size=image_size)
    return path, len(written), recipe or None
