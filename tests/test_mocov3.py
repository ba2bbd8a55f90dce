"""MoCo v3: every norm, the loss by hand, the cross-rank gather, ViT heads-only EMAN, the CLI."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import spawn_ranks
from emanorm import NoBatchNormWarning, cosine_momentum
from emanorm.cli import main
from emanorm.data import DatasetInfo, build_augmentation
from emanorm.errors import UserError
from emanorm.losses import in_batch_info_nce
from emanorm.methods import METHODS, MoCoV3, build_method
from emanorm.models import MLPHead
from emanorm.norms import SplitBatchNorm1d, SplitBatchNorm2d
from emanorm.optim import LARS
from emanorm.train import resolve_config

B = 4
IMAGE = (1, 8, 8)
SMALL = {"dim": 4, "hidden_dim": 8}


class TinyCNN(nn.Module):
    feature_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))


class TinyViT(nn.Module):
    """A BatchNorm-free backbone shaped like timm's ViT: ``patch_embed.proj``, LayerNorm, no BN."""

    feature_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, 6, 4, stride=4)
        self.norm = nn.LayerNorm(6)
        self.mlp = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        return self.mlp(self.norm(tokens)).mean(dim=1)


def make(norm: str = "default", backbone: type[nn.Module] = TinyCNN, bn_splits: int = 1, **options) -> MoCoV3:
    method = build_method("mocov3", backbone_factory=lambda kind: backbone(), num_classes=3, norm=norm,
                          momentum=0.9, eman_momentum=None, bn_momentum=0.1, bn_splits=bn_splits,
                          **{**SMALL, **options})
    assert isinstance(method, MoCoV3)
    return method


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.randn(B, *IMAGE, generator=g), "view2": torch.randn(B, *IMAGE, generator=g) + 0.5}


def steps(method: MoCoV3, n: int = 2, total: int = 10) -> list[float]:
    method.train()
    opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.1, momentum=0.9)
    losses = []
    for step in range(n):
        loss, logs = method(batch(step), step)
        assert math.isfinite(loss.item()) and set(logs) == {"loss", "acc", "momentum", "output_std"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, total)
        losses.append(loss.item())
    return losses


def test_registered_everywhere():
    assert METHODS["mocov3"] is MoCoV3
    cfg = resolve_config(None, {"method": "mocov3"})
    assert cfg["preset"] == "small-mocov3" and cfg["method_args"]["temperature"] == 0.2
    for preset in ("imagenet-mocov3", "imagenet-mocov3-vit"):
        assert resolve_config(preset)["method"] == "mocov3"


@pytest.mark.parametrize("norm", MoCoV3.NORMS)
def test_every_norm_builds_and_steps(norm):
    torch.manual_seed(0)
    method = make(norm)
    before = {k: v.clone() for k, v in method.teacher.module.state_dict().items()}
    steps(method)
    expected_mode = norm if norm in ("eman", "teacher_pn", "student_pn") else "bn"
    assert method.teacher.norm == expected_mode
    # on one process default is plain BN (MoCo v3's SyncBN under DDP)
    assert method.plan.layer_kind == ("sync_bn" if norm == "sync_bn" else "bn")
    moved = [k for k, v in method.teacher.module.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("head" in k for k in moved) and any("backbone" in k for k in moved)
    assert method.classifier() is None and method.encoder("teacher") is method.teacher.module.backbone


def test_default_with_bn_splits_is_per_gpu_bn_everywhere():
    method = make("default", bn_splits=2)
    assert method.plan.resolved == "bn" and method.plan.num_splits == 2
    for net in (method.student, method.predictor):
        layers = [m for m in net.modules() if isinstance(m, _BatchNorm)]
        assert layers and all(isinstance(m, SplitBatchNorm1d | SplitBatchNorm2d) for m in layers)
    steps(method, n=1)


def test_invalid_norms_and_options_fail_clearly():
    for norm in ("shuffle_bn", "gn"):
        with pytest.raises(ValueError, match=r"allowed: default, bn, sync_bn, eman, teacher_pn, student_pn"):
            make(norm)
    with pytest.raises(ValueError, match="temperature"):
        make(temperature=0.0)
    with pytest.raises(ValueError, match="freeze_patch_embed needs a ViT backbone"):
        make(freeze_patch_embed=True)
    with pytest.raises(ValueError, match="zero_init_residual needs a torchvision ResNet"):
        make(zero_init_residual=True)


def test_heads_are_mocov3s():
    method = make(projector_layers=3, predictor_last_batch_norm=True)
    projector, predictor = method.student.head.net, method.predictor.net
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in projector if isinstance(m, nn.Linear))
    assert not projector[-1].affine and not predictor[-1].affine and predictor[1].affine
    resnet_form = make(projector_layers=2, predictor_last_batch_norm=False)
    last = resnet_form.predictor.net[-1]
    assert isinstance(last, nn.Linear) and last.bias is None
    assert len(resnet_form.student.head.net) == 5
    assert MLPHead(4, 8, 2, last_batch_norm=True).net[-1].affine  # the default keeps BYOL-style heads


# -- the loss ----------------------------------------------------------------------------------
def hand_loss(q: torch.Tensor, keys: torch.Tensor, t: float, offset: int) -> float:
    """MoCo v3's contrastive loss in plain Python: normalise, dot products, log-softmax, x 2t."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]
    qs, ks = [unit(r) for r in q.tolist()], [unit(r) for r in keys.tolist()]
    total = 0.0
    for i, qi in enumerate(qs):
        logits = [sum(a * b for a, b in zip(qi, kj, strict=True)) / t for kj in ks]
        total += -(logits[offset + i] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(qs) * 2 * t


def test_in_batch_info_nce_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, generator=g, dtype=torch.float64)
    keys = torch.randn(6, 5, generator=g, dtype=torch.float64)
    for t, offset in ((1.0, 0), (0.2, 3), (0.5, 2)):
        loss, _ = in_batch_info_nce(q, keys, t, offset)
        assert loss.item() == pytest.approx(hand_loss(q, keys, t, offset), rel=1e-12)


def test_training_step_loss_is_the_symmetric_sum_by_hand():
    torch.manual_seed(0)
    method = make(temperature=0.3).double().train()
    data = {k: v.double() for k, v in batch().items()}
    loss, logs = method.training_step(data, 0)
    # the same forwards again (BN in training mode: batch statistics, running stats irrelevant)
    q1, q2 = (method.predictor(method.student(data[v])) for v in ("view1", "view2"))
    k1, k2 = (method.teacher(data[v]) for v in ("view1", "view2"))
    expected = hand_loss(q1.detach(), k2, 0.3, 0) + hand_loss(q2.detach(), k1, 0.3, 0)
    assert loss.item() == pytest.approx(expected, rel=1e-10) and logs["loss"] == pytest.approx(expected)


def test_momentum_is_cosine_and_the_next_steps():
    method = make()
    method.train()
    assert method.current_momentum == 0.9
    steps(method, n=3, total=10)
    assert method.current_momentum == cosine_momentum(0.9, 3, 10)
    assert make(cosine_momentum=False).momentum_at(5, 10) == 0.9
    last = make()
    last.after_step(9, 10)  # after the last step the teacher no longer moves (momentum 1)
    assert last.current_momentum == 1.0


# -- ViT: BatchNorm only in the heads ----------------------------------------------------------
def test_vit_eman_acts_on_the_heads_only_and_does_not_warn():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoBatchNormWarning)
        method = make("eman", backbone=TinyViT, freeze_patch_embed=True)
    assert not any(isinstance(m, _BatchNorm) for m in method.student.backbone.modules())
    frozen = method.student.backbone.patch_embed.proj.weight.clone()
    assert not method.student.backbone.patch_embed.proj.weight.requires_grad
    assert all(p.requires_grad is False or p is not method.student.backbone.patch_embed.proj.weight
               for g in method.parameter_groups(0.1) for p in g["params"])
    steps(method, n=2)
    assert torch.equal(method.student.backbone.patch_embed.proj.weight, frozen)
    # the teacher's projector normalises with statistics averaged from the student's (Eq. 9)
    t_bn = [m for m in method.teacher.module.head.modules() if isinstance(m, _BatchNorm)]
    assert t_bn and not any(m.training for m in t_bn)
    assert all(m.running_mean.abs().sum() > 0 for m in t_bn)


def test_a_model_without_any_batchnorm_still_warns():
    with pytest.warns(NoBatchNormWarning):
        from emanorm import EMATeacher
        EMATeacher(TinyViT(), norm="eman")


# -- optimiser and augmentation pieces -----------------------------------------------------------
def test_lars_trust_of_update_is_mocov3s_ratio():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    w.grad = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    opt = LARS([{"params": [w], "trust_of_update": True}], lr=0.1, weight_decay=0.2, eta=0.01)
    update = w.grad + 0.2 * w.detach()
    expected = w.detach() - 0.1 * update * (0.01 * w.detach().norm() / update.norm())
    opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=1e-15, atol=1e-15)
    assert all(g["trust_of_update"] for g in make().parameter_groups(1e-6))


def test_crop_scale_option_reaches_the_byol_views():
    info = DatasetInfo("t", 10, 1, 28, (0.5,), (0.25,))
    assert build_augmentation("byol1", info).crop.scale == (0.08, 1.0)
    for preset in ("moco", "byol1", "byol2"):
        assert build_augmentation(preset, info, crop_scale=[0.5, 1.0]).crop.scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        build_augmentation("byol2", info, crop_scale=[0.0, 1.0])


# -- two gloo ranks ------------------------------------------------------------------------------
def _gather_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        method = make("bn")
        g = torch.Generator().manual_seed(7)
        q_all = torch.randn(world * B, 4, generator=g, dtype=torch.float64)
        k_all = torch.randn(world * B, 4, generator=g, dtype=torch.float64)
        mine = slice(rank * B, (rank + 1) * B)
        loss, _ = method.contrastive_loss(q_all[mine], k_all[mine])
        model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        opt = torch.optim.SGD(method.parameter_groups(0.0), lr=0.1)
        for step in range(2):
            step_loss, _ = model(batch(10 * rank + step), step)
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            method.after_step(step, 10)
        results[rank] = {
            "loss": loss.item(),
            "hand": hand_loss(q_all[mine], k_all, 1.0, rank * B),
            "global": in_batch_info_nce(q_all, k_all, 1.0)[0].item(),
            "teacher": {k: v.clone() for k, v in method.teacher.module.named_parameters()},
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_gather_keys_with_positives_offset_by_rank():
    results = spawn_ranks(_gather_worker, 2)
    for rank in (0, 1):
        assert results[rank]["loss"] == pytest.approx(results[rank]["hand"], rel=1e-12)
    # equal per-rank batches: the mean of the ranks' losses is the one-process loss of the global batch
    assert (results[0]["loss"] + results[1]["loss"]) / 2 == pytest.approx(results[0]["global"], rel=1e-12)
    for name, value in results[0]["teacher"].items():
        assert torch.equal(value, results[1]["teacher"][name]), name


# -- the command line ----------------------------------------------------------------------------
def test_cli_trains_mocov3_with_eman_on_stand_in_data(tiny_fashion_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "train", "--method", "mocov3", "--norm", "eman", "--data-dir", str(tiny_fashion_mnist_dir),
        "--max-steps", "3", "--batch-size", "16", "--out", str(out), "--logger", "jsonl",
        "--set", "knn_bank_size=64", "--set", "monitor_test_size=40", "--set", "log_every=1",
        "--method-arg", "dim=8", "--method-arg", "hidden_dim=16",
    ])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mocov3" and summary["norm"] == "eman" and summary["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train_records)


def test_bad_option_from_the_command_line_is_one_line():
    with pytest.raises(UserError, match="projector_layers"):
        from emanorm.train.restore import make_method
        cfg = resolve_config(None, {"method": "mocov3", "method_args": {"projector_layers": 0}})
        make_method(cfg, DatasetInfo("t", 10, 1, 28, (0.5,), (0.25,)), distributed=False)


def test_loss_is_cross_entropy_on_cosine_logits_times_two_t():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    logits = F.normalize(q) @ F.normalize(k).t() / 0.2
    loss, acc = in_batch_info_nce(q, k, 0.2)
    torch.testing.assert_close(loss, 0.4 * F.cross_entropy(logits, torch.arange(4)))
    assert acc.item() == (logits.argmax(1) == torch.arange(4)).float().mean().item()
