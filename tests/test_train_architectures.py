"""The trainer on a BatchNorm-free network: the teacher warning is shown once and recorded."""

import importlib.util
import json
import logging

import pytest

from emanorm.train import train
from test_train import tiny_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


def test_eman_without_batch_norm_warns_once_and_records_it(tmp_path, caplog, tiny_fashion_mnist_dir):
    run = tmp_path / "run"
    cfg = tiny_config("fixmatch", "eman", run, tiny_fashion_mnist_dir,
                      backbone="timm:test_efficientnet_ln")  # LayerNorm, 0.1M
    with caplog.at_level(logging.WARNING, logger="emanorm"):
        train(cfg, progress=False)
    shown = [r.getMessage() for r in caplog.records if "no BatchNorm" in r.getMessage()]
    assert len(shown) == 1 and "plain EMA teacher" in shown[0]
    recorded = json.loads((run / "summary.json").read_text())["warnings"]
    assert len(recorded) == 1 and "EMATeacher(norm='eman')" in recorded[0]
