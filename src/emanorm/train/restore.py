"""Methods from a config or from a checkpoint: ``make_method``, ``load_backbone``, ``load_method``,
``method_from_checkpoint`` and ``initialise_from`` (``--init-from``).

The recipe (:mod:`emanorm.train.recipe`) builds a run's method with :func:`make_method`; evaluation,
export, ``doctor`` and ``--init-from`` rebuild a trained one from its checkpoint, without data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from emanorm.errors import UserError
from emanorm.methods import METHODS, Method, build_method
from emanorm.models import build_backbone
from emanorm.train.checkpoint import load_matching, safe_load, state_mismatch

log = logging.getLogger("emanorm")

__all__ = ["check_checkpoint", "initialise_from", "load_backbone", "load_method", "make_method",
           "method_from_checkpoint"]


def make_method(cfg: Mapping[str, Any], info: Any, distributed: bool, device_type: str = "cpu") -> Method:
    """The method a config asks for, with backbones built for the norm layers its plan needs."""
    warned = []

    def backbone_factory(layer_kind: str) -> nn.Module:
        if layer_kind == "sync_bn" and not distributed:
            if not warned:
                log.info("SyncBN on one process is plain BN: falling back to bn")
                warned.append(True)
            layer_kind = "bn"
        if layer_kind == "sync_bn" and device_type != "cuda":
            raise UserError(
                "SyncBN across processes needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU); "
                "on CPU use --norm bn or --norm eman"
            )
        return build_backbone(
            cfg["backbone"], in_channels=info.channels, image_size=info.image_size, norm=layer_kind
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
            bn_splits=cfg.get("bn_splits", 1),  # configs written before bn_splits existed: 1
            **(cfg.get("method_args") or {}),
        )
    except ValueError as err:
        raise UserError(str(err)) from None


# -- a run's method from a checkpoint ----------------------------------------------------------------
#: Sane ranges of a checkpoint's dataset description: anything outside is a damaged file, refused
#: before a network of that size is allocated.
_INFO_RANGES = {"num_classes": (1, 100_000), "channels": (1, 16), "image_size": (1, 8192)}


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_checkpoint(data: Mapping[str, Any], path: str | Path) -> None:
    """Refuse (one line) a checkpoint whose metadata is malformed or whose weights are not finite."""
    if not all(k in data for k in ("config", "method", "dataset_info")):
        keys = ", ".join(map(str, sorted(data)[:8]))
        raise UserError(f"{path} is not an emanorm checkpoint (keys: {keys})")
    cfg, info, weights = data["config"], data["dataset_info"], data["method"]
    for key, value, kind in (("config", cfg, dict), ("dataset_info", info, dict), ("method", weights, dict)):
        if not isinstance(value, kind):
            kind_name = type(value).__name__
            raise UserError(f"checkpoint {path} is malformed: {key} is a {kind_name}, not a mapping")
    if cfg.get("method") not in METHODS:
        raise UserError(f"checkpoint {path} names method {cfg.get('method')!r}; known: {', '.join(METHODS)}")
    for key, (low, high) in _INFO_RANGES.items():
        if not _int_in(info.get(key), low, high):
            raise UserError(
                f"checkpoint {path} is malformed: dataset_info {key} = {info.get(key)!r} "
                f"(expected an integer in [{low}, {high}])"
            )
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise UserError(f"checkpoint {path} is malformed: its weights are not all named tensors")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise UserError(
            f"checkpoint {path} holds non-finite values in {len(bad)} tensors (e.g. {', '.join(bad[:3])}); "
            "it cannot be evaluated or exported"
        )


def method_from_checkpoint(data: Mapping[str, Any], path: str | Path) -> Method:
    """The method a checkpoint describes, on CPU, with its weights, without touching any data."""
    check_checkpoint(data, path)
    try:
        method = make_method(data["config"], SimpleNamespace(**data["dataset_info"]), distributed=False)
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"checkpoint {path} is malformed: its config lacks or garbles {err}") from None
    load_matching(method, data["method"], f"checkpoint {path}")
    return method


def load_backbone(path: str | Path, which: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone of a run (a run directory or a ``.pt`` file) with its trained weights."""
    if which not in ("teacher", "student"):
        raise UserError(f"--which must be teacher or student, got {which!r}")
    data = safe_load(path)
    encoder = method_from_checkpoint(data, path).encoder(which)
    encoder.eval()
    return encoder, {**data["config"], "dataset_info": data["dataset_info"]}


def load_method(path: str | Path) -> tuple[Method, dict[str, Any]]:
    """The whole trained method of a run (for classifiers and test accuracy), in eval mode."""
    data = safe_load(path)
    method = method_from_checkpoint(data, path)
    method.eval()
    return method, data["config"]


def _differences(source: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """``"name: source vs target"`` for each of backbone / channels / image size that differs."""
    out = []
    for key, label in (("backbone", "backbone"), ("channels", "channels"), ("image_size", "image size")):
        if key in target and source.get(key) is not None and source[key] != target[key]:
            out.append(f"{label} {source[key]} vs {target[key]}")
    return out


def initialise_from(
    method: nn.Module, path: str | Path, which: str = "teacher", *, target: Mapping[str, Any] | None = None
) -> None:
    """Copy the ``which`` backbone of the run at ``path`` (parameters and BN statistics) into
    the student's and the teacher's backbones (``--init-from``, the paper's Table 6 chain);
    heads keep their fresh initialisation.

    ``target`` (``backbone``, ``channels``, ``image_size`` of the run being started) makes a
    source trained on another backbone, channel count or input size a ``UserError`` naming each
    difference, even where the weights would fit. Without it, mismatched weights still fail with
    the keys and shapes that differ. The source is rebuilt under a forked RNG, so starting from a
    checkpoint draws the same random numbers afterwards as starting from scratch.
    """
    with torch.random.fork_rng(devices=[]):
        source, source_cfg = load_backbone(path, which)
    info = source_cfg.get("dataset_info") or {}
    about = {"backbone": source_cfg.get("backbone"), "channels": info.get("channels"),
             "image_size": info.get("image_size")}
    described = (
        f"the {which} backbone of {path} ({source_cfg.get('method')} on {source_cfg.get('dataset')}: "
        f"{about['backbone']}, {about['channels']} channel(s), {about['image_size']} px)"
    )
    state = source.state_dict()
    targets = {id(method.encoder("student")): method.encoder("student")}
    targets.setdefault(id(method.encoder("teacher")), method.encoder("teacher"))
    differ = _differences(about, target) if target is not None else []
    if differ:  # refused before anything is loaded, with the weights' mismatch too where there is one
        mismatch = state_mismatch(method.encoder("student"), state)
        detail = f"; the weights do not match this model: {mismatch}" if mismatch else ""
        differences = "; ".join(differ)
        raise UserError(f"cannot initialise from {described}: {differences} (source vs this run){detail}")
    for module in targets.values():
        device = next(iter(module.state_dict().values())).device
        load_matching(module, {k: v.to(device) for k, v in state.items()}, described)
    log.info("initialised the backbones from the %s of %s (%s run)", which, path, source_cfg.get("method"))
