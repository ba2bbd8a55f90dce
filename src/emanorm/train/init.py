"""Start a run's backbones from another run (``--init-from``): the paper's Table 6 chain."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from emanorm.train.checkpoint import load_backbone, load_matching

log = logging.getLogger("emanorm")


def initialise_from(method: nn.Module, path: str | Path, which: str = "teacher") -> None:
    """Copy the ``which`` backbone of the run at ``path`` (parameters and BN statistics) into
    the student's and the teacher's backbones; heads keep their fresh initialisation."""
    source, source_cfg = load_backbone(path, which)
    state = source.state_dict()
    targets = {id(method.encoder("student")): method.encoder("student")}
    targets.setdefault(id(method.encoder("teacher")), method.encoder("teacher"))
    for target in targets.values():
        device = next(iter(target.state_dict().values())).device
        load_matching(
            target,
            {k: v.to(device) for k, v in state.items()},
            f"the {which} backbone of {path} ({source_cfg.get('method')}, {source_cfg.get('backbone')})",
        )
    log.info("initialised the backbones from the %s of %s (%s run)", which, path, source_cfg.get("method"))
