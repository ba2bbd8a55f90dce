"""compare: grid rows that would train the same model are found and trained once."""

import importlib.util
import json

import pytest

from emanorm.cli import main
from emanorm.experiments.grid import (
    build_variants,
    identical_runs,
    method_has_batch_norm,
    parse_variant,
    plan_grid,
)
from test_compare import FMNIST, TINY, one_thread  # noqa: F401 (one_thread is a fixture)


def _specs(tmp_path, norms, backbone="small", methods=("fixmatch",), **kwargs):
    variants = build_variants(norms, **kwargs)
    return plan_grid(list(methods), variants, [0], tmp_path, common={"max_steps": 2, "backbone": backbone})


def test_rows_without_batch_norm_collapse(tmp_path):
    norms = ["default", "bn", "eman", "teacher_pn", "shuffle_bn", "gn"]
    specs = _specs(tmp_path, norms, eman_momentums=[0.9])
    asked = []

    def no_batch_norm(cfg):
        asked.append(cfg["norm"])
        return False

    same = identical_runs(specs, has_batch_norm=no_batch_norm)
    assert asked == ["bn"]  # one build per group, not per run
    # default (no teacher) and shuffle_bn (draws permutations) stay separate runs
    assert {k: v[0] for k, v in same.items()} == {
        "fixmatch-eman-s0": "fixmatch-bn-s0",
        "fixmatch-eman-m-0.9-s0": "fixmatch-bn-s0",
        "fixmatch-teacher_pn-s0": "fixmatch-bn-s0",
        "fixmatch-gn-s0": "fixmatch-bn-s0",
    }
    assert "no BatchNorm" in same["fixmatch-eman-s0"][1]
    assert identical_runs(specs, has_batch_norm=lambda cfg: True) == {}


def test_literal_duplicates_and_real_builds(tmp_path):
    variants = build_variants(["bn"], custom=[parse_variant("again:norm=bn")])
    specs = plan_grid(["fixmatch"], variants, [0], tmp_path, common={"max_steps": 2})
    assert identical_runs(specs) == {"fixmatch-again-s0": ("fixmatch-bn-s0", "the same config")}
    cfg = specs[0].config
    assert method_has_batch_norm(cfg)  # the small ResNet
    convnext = {"backbone": "torchvision:convnext_tiny", "dataset": "cifar10"}  # 32 px: ConvNeXt's minimum
    assert not method_has_batch_norm({**cfg, **convnext})
    # BYOL's projector and predictor hold BatchNorm1d: EMAN still differs from BN on ConvNeXt
    byol = _specs(tmp_path, ["bn"], methods=("byol",))[0].config
    assert method_has_batch_norm({**byol, **convnext})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.usefixtures("one_thread")
def test_compare_trains_identical_rows_once(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fixmatch", "--norms", "bn,eman", "--seeds", "1",
            "--set", "labels_per_class=4", "--set", "backbone=timm:test_efficientnet_ln", *TINY,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "fixmatch-eman-s0 would train the same model as fixmatch-bn-s0" in err
    assert not (out / "runs" / "fixmatch-eman-s0").exists()  # never trained
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == ["bn", "eman"] and runs[1]["same_as"] == "fixmatch-bn-s0"
    assert runs[0]["primary"] == runs[1]["primary"]
    assert "Trained once and reported in both rows" in (out / "results.md").read_text()
