"""``--init-from``: a MoCo-EMAN run starts a FixMatch-EMAN run (the paper's Table 6 chain)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import emanorm.train.recipe as init_module
from emanorm import cli
from emanorm.errors import UserError
from emanorm.evaluation import knn_monitor
from emanorm.train import resolve_config, train
from emanorm.train.checkpoint import safe_load
from emanorm.train.restore import initialise_from, make_method

TINY = {"knn_bank_size": 64, "monitor_test_size": 64, "log_every": 1, "device": "cpu", "batch_size": 16}


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory: pytest.TempPathFactory, tiny_fashion_mnist_dir: Path) -> Path:
    """MoCo-EMAN, 2 steps on the stand-in Fashion-MNIST; momentum 0.5 so the teacher differs from
    the student."""
    out = tmp_path_factory.mktemp("chain") / "moco"
    cfg = resolve_config(
        None,
        {**TINY, "method": "moco", "norm": "eman", "max_steps": 2, "ema_momentum": 0.5, "out": str(out),
         "data_dir": str(tiny_fashion_mnist_dir), "method_args": {"queue_size": 64, "dim": 16}},
    )
    train(cfg, monitor=knn_monitor, progress=False)
    return out


def source_backbone(run: Path, which: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of ``which`` read straight from the checkpoint (not via load_backbone)."""
    prefix = "teacher.module.backbone." if which == "teacher" else "student.backbone."
    state = safe_load(run)["method"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for name, value in state.items():
        assert torch.equal(value.cpu(), expected[name]), name


def fixmatch_config(out: Path, **extra) -> dict:
    return resolve_config(
        None,
        {**TINY, "method": "fixmatch", "norm": "eman", "max_steps": 1, "unlabeled_ratio": 1,
         "labels_per_class": 4, "out": str(out), **extra},
    )


def test_fixmatch_eman_starts_from_the_moco_eman_teacher(moco_run, tmp_path, monkeypatch,
                                                         tiny_fashion_mnist_dir):
    teacher = source_backbone(moco_run, "teacher")
    student = source_backbone(moco_run, "student")
    # The source is not trivial: trained statistics, and a teacher that differs from the student.
    assert any(v.abs().sum() > 0 for k, v in teacher.items() if k.endswith("running_mean"))
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if k.endswith("running_var"))

    seen = {}
    original = init_module.initialise_from

    def spy(method, path, which="teacher", **kwargs):
        original(method, path, which, **kwargs)
        # What the trainer starts from: right after initialisation, before any step (the preset's
        # calibrated start is not applied with --init-from: test below).
        seen["student"] = {k: v.clone() for k, v in method.encoder("student").state_dict().items()}
        seen["teacher"] = {k: v.clone() for k, v in method.encoder("teacher").state_dict().items()}
        seen["fc"] = {k: v.clone() for k, v in method.student.fc.state_dict().items()}

    monkeypatch.setattr(init_module, "initialise_from", spy)
    out = tmp_path / "fixmatch"
    cfg = fixmatch_config(out, init_from=str(moco_run), data_dir=str(tiny_fashion_mnist_dir))
    summary, method = train(cfg, progress=False, return_method=True)

    for which in ("student", "teacher"):  # parameters AND BN statistics (running_*, num_batches_tracked)
        assert seen[which].keys() == teacher.keys()
        for name, value in seen[which].items():
            assert torch.equal(value, teacher[name]), (which, name)
    assert method.encoder("student") is not method.encoder("teacher")
    # The step that followed moved the student, so the snapshot above was the starting point.
    moved = method.encoder("student").state_dict()
    assert any(not torch.equal(moved[k], teacher[k]) for k in teacher if k.endswith("weight"))
    assert seen["fc"]["weight"].shape == (10, 128)  # the classifier exists only here: fresh

    assert summary["init_from"] == str(moco_run)
    assert json.loads((out / "summary.json").read_text())["init_from"] == str(moco_run)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init_from"] == str(moco_run) and config["init_which"] == "teacher"


def test_a_calibrating_preset_keeps_the_start_points_statistics(moco_run, tmp_path, tiny_fashion_mnist_dir):
    """small-fixmatch calibrates (calibrate_bn_batches 20), but a run from --init-from starts from
    the statistics it was given, as docs/transfer.md says, not from ones measured again."""
    from emanorm.train import build_run

    cfg = fixmatch_config(tmp_path / "f", init_from=str(moco_run), data_dir=str(tiny_fashion_mnist_dir))
    assert cfg["calibrate_bn_batches"] == 20
    start = build_run(cfg).method.encoder("teacher").state_dict()
    given = source_backbone(moco_run, "teacher")
    statistics = [k for k in given if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(start[k], given[k]) for k in statistics)
    fresh = build_run(fixmatch_config(tmp_path / "g", data_dir=str(tiny_fashion_mnist_dir))).method
    measured = fresh.encoder("teacher").state_dict()  # without --init-from the preset does calibrate
    assert not all(torch.equal(measured[k], torch.ones_like(measured[k])) for k in statistics if "var" in k)


@pytest.mark.parametrize(
    ("method", "norm", "options"),
    [
        ("fixmatch", "eman", {}),
        ("fixmatch", "default", {"eval_ema": True}),  # the evaluation-only EMA copy starts there too
        ("meanteacher", "eman", {}),
        ("supervised", "bn", {}),
    ],
)
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_initialise_from_copies_the_chosen_network_into_every_backbone(moco_run, method, norm, options,
                                                                          which):
    data = safe_load(moco_run)
    cfg = resolve_config(None, {"method": method, "norm": norm, "max_steps": 1, "method_args": options})
    target = make_method(cfg, SimpleNamespace(**data["dataset_info"]), distributed=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    initialise_from(target, moco_run, which, target={"backbone": "small", "channels": 1, "image_size": 28})
    expected = source_backbone(moco_run, which)
    assert_same_state(target.encoder("student"), expected)
    assert_same_state(target.encoder("teacher"), expected)
    if method == "fixmatch" and norm == "default":
        assert_same_state(target.eval_ema.module.backbone, expected)
    # Everything outside the backbones (classifier heads) keeps its fresh initialisation.
    after = target.state_dict()
    heads = [k for k in after if ".fc." in k or k.startswith("student.fc")]
    assert heads and all(torch.equal(after[k], before[k]) for k in heads)


def test_which_matters(moco_run):
    data = safe_load(moco_run)
    cfg = resolve_config(None, {"method": "fixmatch", "norm": "eman", "max_steps": 1})
    a = make_method(cfg, SimpleNamespace(**data["dataset_info"]), distributed=False)
    b = make_method(cfg, SimpleNamespace(**data["dataset_info"]), distributed=False)
    initialise_from(a, moco_run, "teacher")
    initialise_from(b, moco_run, "student")
    sa, sb = a.encoder("student").state_dict(), b.encoder("student").state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_initialising_does_not_consume_random_numbers(moco_run):
    data = safe_load(moco_run)
    cfg = resolve_config(None, {"method": "fixmatch", "norm": "eman", "max_steps": 1})
    method = make_method(cfg, SimpleNamespace(**data["dataset_info"]), distributed=False)
    torch.manual_seed(3)
    initialise_from(method, moco_run)
    after_init = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after_init)


def test_incompatible_sources_are_clear_errors(moco_run):
    data = safe_load(moco_run)
    info = SimpleNamespace(**data["dataset_info"])
    # Another backbone: the keys differ.
    cfg = resolve_config(None, {"method": "fixmatch", "backbone": "resnet18_cifar", "max_steps": 1})
    other = make_method(cfg, info, distributed=False)
    with pytest.raises(UserError, match=r"does not match this model: missing \d+ keys .*unexpected \d+ keys"):
        initialise_from(other, moco_run)
    with pytest.raises(UserError, match=r"backbone small vs resnet18_cifar .*do not match this model: miss"):
        initialise_from(other, moco_run, target={"backbone": "resnet18_cifar", "channels": 1,
                                                  "image_size": 28})
    # Another channel count: the stem's shape differs.
    rgb = make_method(resolve_config(None, {"method": "fixmatch", "max_steps": 1}),
                      SimpleNamespace(**{**data["dataset_info"], "channels": 3}), distributed=False)
    stem = r"shape mismatches \(e\.g\. stem\.0\.weight \(32, 1, 3, 3\) vs \(32, 3, 3, 3\)"
    with pytest.raises(UserError, match=stem):
        initialise_from(rgb, moco_run)
    with pytest.raises(UserError, match=r"channels 1 vs 3; image size 28 vs 32 .*stem\.0\.weight"):
        initialise_from(rgb, moco_run, target={"backbone": "small", "channels": 3, "image_size": 32})
    # Another input size with weights that would fit is still refused when the target is known.
    same = make_method(resolve_config(None, {"method": "fixmatch", "max_steps": 1}), info, distributed=False)
    before = {k: v.clone() for k, v in same.state_dict().items()}
    with pytest.raises(UserError, match=r"image size 28 vs 96 \(source vs this run\)$"):
        initialise_from(same, moco_run, target={"backbone": "small", "channels": 1, "image_size": 96})
    assert all(torch.equal(v, before[k]) for k, v in same.state_dict().items())  # refused before loading


class NotATensor:  # pickled into a checkpoint: safe loading must refuse it without running code
    pass


def test_cli_errors_are_one_line(moco_run, tmp_path, capsys, cifar10_dir, tiny_fashion_mnist_dir):
    common = "--method fixmatch --norm eman --max-steps 1 --batch-size 16 --device cpu --no-progress"
    out = tmp_path / "rgb"
    rc = cli.main(
        f"train {common} --dataset cifar10 --data-dir {cifar10_dir} --labels-per-class 2 "
        f"--init-from {moco_run} --out {out}".split()
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "stem.0.weight (32, 1, 3, 3) vs (32, 3, 3, 3)" in err and "fashion_mnist" in err

    bad = tmp_path / "bad.pt"
    torch.save({"method": NotATensor()}, bad)
    common += f" --data-dir {tiny_fashion_mnist_dir}"
    rc = cli.main(f"train {common} --labels-per-class 2 --init-from {bad} --out {tmp_path / 'x'}".split())
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "refusing to load" in err and len(err.splitlines()) == 1, err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    rc = cli.main(f"train {common} --labels-per-class 2 --init-from {garbage} --out {tmp_path / 'y'}".split())
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(garbage) in err, err

    missing = tmp_path / "nope"
    rc = cli.main(f"train {common} --labels-per-class 2 --init-from {missing} --out {tmp_path / 'z'}".split())
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_from_moco_preset_is_imagenet_fixmatch_at_lr_0_003():
    chained = resolve_config("imagenet-fixmatch-from-moco", {"init_from": "runs/moco"})
    plain = resolve_config("imagenet-fixmatch")
    differ = {k for k in chained if chained[k] != plain[k]}
    assert differ == {"lr", "init_from", "preset"}
    assert chained["lr"] == 0.003 and plain["lr"] == 0.03
