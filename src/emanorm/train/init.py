"""Start a run's backbones from another run (``--init-from``): the paper's Table 6 chain."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emanorm.errors import UserError
from emanorm.train.checkpoint import load_backbone, load_matching, state_mismatch

log = logging.getLogger("emanorm")


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
    the student's and the teacher's backbones; heads keep their fresh initialisation.

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
