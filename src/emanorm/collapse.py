"""The collapse alarm: training logs that say a self-supervised run stopped learning.

What the literature calls collapse, as it shows in the logged metrics of a run:

- DINO: the loss within 0.1% of ``ln K`` (the cross-entropy between uniform distributions over
  ``K`` outputs: the student's output is uniform, dino#43, dinov2#407), or the teacher's targets
  with an entropy above 0.99 ``ln K`` (logged as ``target_entropy``, a fraction of ``ln K``): the
  teacher gives nothing to learn (a collapse, or an EMAN teacher's cold start, which
  ``--calibrate-bn`` removes);
- MoCo, BYOL: the student's L2-normalised outputs identical across the batch (``output_std``, the
  per-dimension standard deviation over the batch times ``sqrt(d)``: about 1 for outputs spread
  over the sphere, 0 when every image maps to one point; SimSiam's collapse monitor).

A condition must hold at every logged step over a window (``window_steps``, and at least two
records) before the alarm sounds, once per run. Pure Python: the trainer feeds it its log records,
``emanorm doctor RUN`` a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CollapseAlarm", "CollapseRule", "CollapseWatch", "collapse_rules", "scan_records"]

#: DINO: the loss within this fraction of ln K is the uniform output.
LOSS_UNIFORM_TOLERANCE = 1e-3
#: DINO: targets with an entropy above this fraction of ln K are (nearly) uniform.
TARGET_ENTROPY_LIMIT = 0.99
#: MoCo / BYOL: ``output_std`` below this: every image maps to (nearly) one point.
OUTPUT_STD_LIMIT = 0.1
#: How many steps a condition must hold.
WINDOW_STEPS = 100


@dataclass(frozen=True)
class CollapseRule:
    """One symptom: ``metric`` ``above`` (or below) ``threshold`` (and, above it, at most ``ceiling``),
    described as ``what``."""

    metric: str
    threshold: float
    above: bool
    what: str
    ceiling: float = math.inf

    def holds(self, value: float) -> bool:
        return self.threshold <= value <= self.ceiling if self.above else value <= self.threshold


@dataclass(frozen=True)
class CollapseAlarm:
    """The alarm: the step it sounded at, the window's first step, the rule and the last value."""

    step: int
    since_step: int
    metric: str
    value: float
    threshold: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "since_step": self.since_step, "metric": self.metric,
                "value": self.value, "threshold": self.threshold, "message": self.message}


def collapse_rules(method: str, options: Mapping[str, Any] | None = None) -> list[CollapseRule]:
    """The symptoms watched for ``method`` with its options (DINO needs ``out_dim``, its K)."""
    options = options or {}
    if method == "dino":
        k = int(options.get("out_dim", 65536))
        uniform = math.log(k)
        return [
            # both sides: a loss above ln K (a student worse than uniform, as at initialisation while
            # the lr warms up) is not a uniform student
            CollapseRule("loss", uniform * (1 - LOSS_UNIFORM_TOLERANCE), True,
                         f"the DINO loss is within 0.1% of ln K = {uniform:.4f} (K = {k}): the student's "
                         "output is uniform", ceiling=uniform * (1 + LOSS_UNIFORM_TOLERANCE)),
            CollapseRule("target_entropy", TARGET_ENTROPY_LIMIT, True,
                         f"the teacher's targets have an entropy above {TARGET_ENTROPY_LIMIT} ln K: they "
                         "are nearly uniform (a collapse, or an EMAN teacher's cold start if the run "
                         "did not calibrate: try --calibrate-bn 20)"),
        ]
    if method in ("moco", "byol", "mocov3"):
        return [CollapseRule("output_std", OUTPUT_STD_LIMIT, False,
                             f"the student's normalised outputs barely differ across the batch "
                             f"(output_std at most {OUTPUT_STD_LIMIT}; about 1 when spread): every image "
                             "maps to one point")]
    return []


class CollapseWatch:
    """Feed it each training log record (``step`` and metrics); :meth:`observe` returns the alarm
    the first time a rule has held at every record over ``window_steps`` (and two records)."""

    def __init__(self, method: str, options: Mapping[str, Any] | None = None, *,
                 window_steps: int = WINDOW_STEPS) -> None:
        self.rules = collapse_rules(method, options)
        self.window_steps = int(window_steps)
        self.alarm: CollapseAlarm | None = None
        self._since: dict[str, tuple[int, int]] = {}  # metric -> (first step, records) of the run

    def observe(self, record: Mapping[str, Any]) -> CollapseAlarm | None:
        """The alarm if ``record`` completes a window (only once per run), else ``None``."""
        if self.alarm is not None or not self.rules:
            return None
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return None
        for rule in self.rules:
            value = record.get(rule.metric)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                continue  # not logged at this step: the window goes on
            if not rule.holds(value):
                self._since.pop(rule.metric, None)
                continue
            first, records = self._since.get(rule.metric, (step, 0))
            self._since[rule.metric] = (first, records + 1)
            if records + 1 >= 2 and step - first >= self.window_steps:
                self.alarm = CollapseAlarm(
                    step, first, rule.metric, float(value), rule.threshold,
                    f"collapse alarm at step {step}: {rule.what}, at every log since step {first} "
                    f"({rule.metric} {value:.4g})",
                )
                return self.alarm
        return None


def scan_records(records: Iterable[Mapping[str, Any]], method: str,
                 options: Mapping[str, Any] | None = None, *, window_steps: int = WINDOW_STEPS
                 ) -> tuple[CollapseAlarm | None, int]:
    """Run the watch over a run's records (``kind: train`` ones); ``(alarm or None, records seen)``."""
    watch = CollapseWatch(method, options, window_steps=window_steps)
    seen = 0
    for record in records:
        if record.get("kind", "train") != "train":
            continue
        seen += 1
        watch.observe(record)
    return watch.alarm, seen
