"""The calibrated start (issue 27): BN statistics from data before step 0, given to the teacher."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import update_bn

from conftest import spawn_ranks
from emanorm import calibrate_batchnorm
from emanorm.errors import UserError
from emanorm.norms import SplitBatchNorm2d, convert_to_split_bn
from emanorm.train import build_run, resolve_config, train
from emanorm.train.recipe import calibrate_start
from test_methods import make  # tests/ is on the path, as for conftest


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6),
    )


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=g) * 3 + 2 for _ in range(n)]


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_calibrate_batchnorm_equals_torchs_update_bn_and_changes_nothing_else():
    data = batches()
    ours, theirs = small_net(), small_net()
    ours.eval()
    theirs.eval()
    params = {k: v.clone() for k, v in ours.named_parameters()}
    momenta = [m.momentum for m in ours.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    rng = torch.get_rng_state()
    assert calibrate_batchnorm(ours, data) == len(data)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws left the global generator alone
    update_bn(data, theirs)
    for key, value in statistics(theirs).items():
        assert torch.equal(statistics(ours)[key], value), key
    # the statistics describe the data (mean about 2 after the first conv's bias is small), not 0/1
    assert not torch.allclose(ours[1].running_var, torch.ones(4))
    assert all(torch.equal(p, params[k]) for k, p in ours.named_parameters())
    assert [m.momentum for m in ours.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)] == momenta
    assert not any(m.training for m in ours.modules())  # the eval mode it was given is restored


def test_calibration_accepts_loader_style_batches_and_refuses_none():
    net = small_net()
    assert calibrate_batchnorm(net, [(x, torch.zeros(16)) for x in batches(2)]) == 2
    with pytest.raises(ValueError, match="no batches"):
        calibrate_batchnorm(net, [])
    assert calibrate_batchnorm(nn.Linear(3, 3), iter(())) == 0  # no BatchNorm: nothing to read


def test_split_batchnorm_calibrates_to_the_mean_of_its_splits():
    data = batches(3)
    layer = convert_to_split_bn(nn.Sequential(nn.BatchNorm2d(1)), 4)[0]
    assert isinstance(layer, SplitBatchNorm2d)
    calibrate_batchnorm(layer, data)
    chunks = [c for x in data for c in x.chunk(4)]
    mean = torch.stack([c.mean() for c in chunks]).mean()
    var = torch.stack([c.var() for c in chunks]).mean()
    assert layer.running_mean.item() == pytest.approx(mean.item(), rel=1e-5)
    assert layer.running_var.item() == pytest.approx(var.item(), rel=1e-5)


TEACHER_METHODS = [("moco", "eman"), ("byol", "eman"), ("fixmatch", "eman"), ("fixmatch", "default"),
                   ("meanteacher", "teacher_pn"), ("dino", "student_pn"), ("moco", "bn"), ("mocov3", "eman")]


def method_batch(name: str, method) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    keys = list(method.labeled_views) + list(method.unlabeled_views)
    batch = {k: torch.randn(8, 1, 8, 8, generator=g) * 2 + 1 for k in keys}
    batch["y"] = torch.arange(8) % 3
    batch["epoch"] = torch.tensor(0)
    return batch


@pytest.mark.parametrize(("name", "norm"), TEACHER_METHODS)
def test_every_ema_copy_starts_from_the_calibrated_student_statistics(name, norm):
    method = make(name, norm)
    copies = method.ema_copies()
    assert copies, "each of these forms has an EMA copy"
    before = {k: v.clone() for k, v in copies[0].module.state_dict().items()}
    n = method.calibrate_statistics([method_batch(name, method), method_batch(name, method)])
    assert n >= 2
    source = method.teacher_source().state_dict()
    for ema in copies:
        for key, value in ema.module.state_dict().items():
            if "running" in key or "num_batches" in key:
                assert torch.equal(value, source[key]), key
            else:  # parameters untouched
                assert torch.equal(value, before[key]), key
    assert not torch.allclose(copies[0].module.backbone.norm.running_var, torch.ones(6))


def tiny_cfg(data_dir, out, **extra) -> dict:
    # calibrate_bn_batches 0 unless a test asks: small-moco's 20 would calibrate the runs meant as "plain"
    overrides = {"method": "moco", "norm": "eman", "dataset": "fashion_mnist", "data_dir": str(data_dir),
                 "calibrate_bn_batches": 0,
                 "max_steps": 3, "batch_size": 8, "knn_bank_size": 32, "monitor_test_size": 16,
                 "device": "cpu", "out": str(out), "eval_every": 0, "logger": "jsonl",
                 "method_args": {"queue_size": 64}}  # fmt: skip
    overrides.update(extra)
    return resolve_config(None, overrides)


def test_a_calibrated_run_starts_from_data_statistics_and_trains_on_the_same_batches(
    tiny_fashion_mnist_dir, tmp_path
):
    plain = build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "a"))
    calibrated = build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "b", calibrate_bn_batches=2))
    again = build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "c", calibrate_bn_batches=2))
    t_plain = plain.method.teacher.module.state_dict()
    t_cal = calibrated.method.teacher.module.state_dict()
    stats = [k for k in t_cal if k.endswith("running_var")]
    assert stats
    assert all(torch.equal(t_plain[k], torch.ones_like(t_plain[k])) for k in stats)  # the cold start
    assert not any(torch.equal(t_cal[k], torch.ones_like(t_cal[k])) for k in stats)
    # bitwise reproducible, and the weights are those of the uncalibrated build
    for key, value in again.method.state_dict().items():
        assert torch.equal(value, calibrated.method.state_dict()[key]), key
    for key, value in plain.method.student.named_parameters():
        assert torch.equal(value, dict(calibrated.method.student.named_parameters())[key])
    # the same manually computed statistics: the student in train mode over the first two batches
    manual = copy.deepcopy(plain.method.student)
    plain.stream.set_epoch(0)
    first_two = [b for _, b in zip(range(2), plain.stream, strict=False)]
    assert not plain.method.options["symmetric"]  # MoCo v2: the student's query forward is view1's
    calibrate_batchnorm(manual, [b["view1"] for b in first_two])
    for key, value in manual.state_dict().items():
        if "running" in key:
            assert torch.equal(value, t_cal[key]), key
    # training then reads the batches an uncalibrated run reads
    plain.stream.set_epoch(0)
    calibrated.stream.set_epoch(0)
    first_plain, first_cal = next(iter(plain.stream)), next(iter(calibrated.stream))
    assert all(torch.equal(first_plain[k], first_cal[k]) for k in first_plain)


def test_a_resumed_build_never_calibrates_again(tiny_fashion_mnist_dir, tmp_path):
    cfg = tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "r", calibrate_bn_batches=2)
    resumed = build_run(cfg, resuming=True)
    stats = [v for k, v in resumed.method.teacher.module.state_dict().items() if k.endswith("running_var")]
    assert all(torch.equal(v, torch.ones_like(v)) for v in stats)


def test_calibration_settings_are_checked_before_anything_is_built(tiny_fashion_mnist_dir, tmp_path):
    with pytest.raises(UserError, match="calibrate_bn_batches must be an integer >= 0"):
        tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "x", calibrate_bn_batches=-1)
    with pytest.raises(UserError, match="calibrate_bn_batches must be an integer >= 0"):
        tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "x", calibrate_bn_batches=2.5)
    with pytest.raises(UserError, match="calibrate_bn_batches 99 is more than the 15 batches of an epoch"):
        calibrate_start(build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "x")).method,
                        build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "y")).stream, 99)


def test_more_calibration_batches_than_an_epoch_has_use_the_whole_epoch_and_say_so(tiny_fashion_mnist_dir,
                                                                                    tmp_path):
    """A preset's 20 on a small dataset: epoch 0's 15 batches are all there is, and the run says it
    used them (the same statistics as asking for 15)."""
    asked = build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "x", calibrate_bn_batches=99))
    assert asked.warnings == [
        "calibrate_bn_batches 99 is more than the 15 batches of an epoch: calibrated on all of them"]
    whole = build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "y", calibrate_bn_batches=15))
    assert whole.warnings == []
    for (name, value), (_, same) in zip(asked.method.state_dict().items(), whole.method.state_dict().items(),
                                        strict=True):
        assert torch.equal(value, same), name
    uncalibrated = build_run(tiny_cfg(tiny_fashion_mnist_dir, tmp_path / "z")).method.state_dict()
    teacher_var = next(k for k in uncalibrated if k.startswith("teacher.") and k.endswith("running_var"))
    assert not torch.equal(asked.method.state_dict()[teacher_var], uncalibrated[teacher_var])


def test_the_summary_records_the_calibration_and_a_resume_keeps_the_start_it_had(
    tiny_fashion_mnist_dir, tmp_path, caplog
):
    """A run started uncalibrated (as the small presets were before 2026-12-06) resumes under a
    config that asks for 20: the setting acts only before step 0, so the run is not refused and
    keeps, and records, the start it had."""
    out = tmp_path / "run"
    summary = train(tiny_cfg(tiny_fashion_mnist_dir, out, calibrate_bn_batches=2), progress=False)
    assert summary["calibrate_bn_batches"] == 2
    assert "calibrate_bn_batches: 2" in (out / "config.yaml").read_text()

    old = tmp_path / "old"
    train(tiny_cfg(tiny_fashion_mnist_dir, old), progress=False)
    (old / "summary.json").unlink()  # unfinished again: the resume restores its checkpoint
    with caplog.at_level(logging.INFO, logger="emanorm"):
        resumed = train(tiny_cfg(tiny_fashion_mnist_dir, old, calibrate_bn_batches=20), resume=True,
                        progress=False)
    assert resumed["calibrate_bn_batches"] == 0
    assert "calibrate_bn_batches: 0" in (old / "config.yaml").read_text()
    assert any("calibrate_bn_batches stays 0 (asked: 20)" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="max_steps"):  # what does change the run is still refused
        train(tiny_cfg(tiny_fashion_mnist_dir, old, calibrate_bn_batches=20, max_steps=4), resume=True,
              progress=False)


def test_the_flag_sets_the_config_key(tiny_fashion_mnist_dir, tmp_path):
    from emanorm.cli import build_parser
    from emanorm.cli.train import train_overrides

    args = build_parser().parse_args(["train", "--calibrate-bn", "20"])
    assert train_overrides(args)["calibrate_bn_batches"] == 20


# -- two ranks: each rank's statistics become the mean over ranks ---------------------------------
def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = small_net()
        calibrate_batchnorm(net, batches(2, seed=10 + rank))
        results[rank] = {k: v.clone() for k, v in statistics(net).items() if "running" in k}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed  # two spawned ranks: ~10 CPU-seconds, the slow layer
def test_ranks_average_their_calibrated_statistics():
    results = spawn_ranks(_rank)
    single = []
    for rank in range(2):
        net = small_net()
        calibrate_batchnorm(net, batches(2, seed=10 + rank))
        single.append(statistics(net))
    for key in results[0]:
        expected = (single[0][key] + single[1][key]) / 2
        torch.testing.assert_close(results[0][key], expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(results[0][key], results[1][key])

