"""bn_splits: the paper's per-GPU BatchNorm emulated on one process (issue 18, the code part)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emanorm.errors import UserError
from emanorm.methods import build_method
from emanorm.models import build_backbone
from emanorm.norms import SplitBatchNorm1d, SplitBatchNorm2d
from emanorm.train import build_run, resolve_config
from emanorm.train.config import check_feasible, comparable


def method(name: str, norm: str, bn_splits: int, **options):
    return build_method(
        name, backbone_factory=lambda kind: build_backbone("small", in_channels=1, image_size=28, norm=kind),
        num_classes=10, norm=norm, momentum=0.99, eman_momentum=None, bn_momentum=0.1, bn_splits=bn_splits,
        **options,
    )


@pytest.mark.parametrize(("name", "norm"), [("fixmatch", "bn"), ("fixmatch", "eman"), ("fixmatch", "default"),
                                            ("moco", "bn"), ("moco", "eman"), ("byol", "teacher_pn"),
                                            ("meanteacher", "student_pn")])  # fmt: skip
def test_every_batchnorm_plan_splits_the_student_and_the_teacher(name, norm):
    options = {"queue_size": 64, "dim": 16} if name == "moco" else {}
    m = method(name, norm, 4, **options)
    assert m.plan.num_splits == 4 and not m.plan.shuffle
    splits = [layer.num_splits for layer in m.student.modules() if isinstance(layer, SplitBatchNorm2d)]
    assert splits and set(splits) == {4}
    if m.teacher is not None:
        layers = [layer for layer in m.teacher.modules() if isinstance(layer, SplitBatchNorm2d)]
        assert {layer.num_splits for layer in layers} == {4}
    assert method(name, norm, 1, **options).plan.num_splits == 1  # default: whole batch, as before


@pytest.mark.parametrize("norm", ["bn", "eman"])
def test_bn_splits_split_the_heads_batchnorm1d_too(norm):
    # Under DDP every BN layer is per GPU, BYOL's projector and predictor included.
    m = method("byol", norm, 4, hidden_dim=32, proj_dim=16)
    for net in (m.student, m.predictor, m.teacher):
        heads = [layer for layer in net.modules() if isinstance(layer, torch.nn.BatchNorm1d)]
        assert heads and all(isinstance(layer, SplitBatchNorm1d) and layer.num_splits == 4 for layer in heads)
    # a training step runs and its loss is finite
    batch = {"view1": torch.randn(8, 1, 28, 28), "view2": torch.randn(8, 1, 28, 28)}
    loss, _ = m.training_step(batch, step=0)
    assert torch.isfinite(loss)
    # ShuffleBN keeps splitting the backbone only (MoCo's demo); its heads stay whole-batch BN
    shuffled = method("byol", "shuffle_bn", 1, hidden_dim=32, proj_dim=16, num_splits=4)
    assert any(isinstance(layer, SplitBatchNorm2d) for layer in shuffled.student.modules())
    assert not any(isinstance(layer, SplitBatchNorm1d) for layer in shuffled.student.modules())


def test_student_statistics_are_per_split_not_per_batch():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4, 1, 28, 28), 5 + 3 * torch.randn(4, 1, 28, 28)])  # two very different halves

    def first_bn_output(bn_splits: int) -> torch.Tensor:
        torch.manual_seed(1)  # the same weights for both
        m = method("fixmatch", "bn", bn_splits)
        first = next(layer for layer in m.student.modules() if isinstance(layer, torch.nn.BatchNorm2d))
        seen = {}
        first.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out.detach().clone()))
        m.student.train()
        m.student(x)
        return seen["out"]

    split, whole = first_bn_output(2), first_bn_output(1)
    gap = lambda out: (out[:4].mean(dim=(0, 2, 3)) - out[4:].mean(dim=(0, 2, 3))).abs().mean()  # noqa: E731
    assert gap(split) < 0.1 * gap(whole)  # each split normalised with its own statistics


@pytest.mark.parametrize(("name", "norm", "message"), [
    ("fixmatch", "gn", "needs BatchNorm layers"),
    ("moco", "in", "needs BatchNorm layers"),
    ("moco", "shuffle_bn", "does not combine with shuffle_bn"),
])  # fmt: skip
def test_bn_splits_where_it_cannot_apply_is_refused(name, norm, message):
    with pytest.raises(ValueError, match=message):
        method(name, norm, 8, **({"queue_size": 64, "dim": 16} if name == "moco" else {}))


def test_a_batch_the_splits_do_not_divide_is_refused_before_training(tiny_fashion_mnist_dir):
    settings = {"method": "fixmatch", "norm": "bn", "bn_splits": 8, "batch_size": 12, "labels_per_class": 4,
                "max_steps": 1, "device": "cpu", "data_dir": str(tiny_fashion_mnist_dir)}
    with pytest.raises(UserError, match=r"batch_size 12 must be divisible by .* \(1 x 1 x 8 = 8\)"):
        resolve_config(None, settings)  # refused with the config, before any data is read
    cfg = resolve_config(None, {**settings, "batch_size": 16})
    cfg["batch_size"] = 12  # a config edited after validation still meets the method's own check
    with pytest.raises(UserError, match="batch_size 12 must be divisible"):
        build_run(cfg)


def test_the_batch_is_checked_against_processes_accumulate_and_splits_together():
    # the recipe calls check_feasible with the process count: 2 processes x 2 micro-batches x 8 BN groups
    # need 32 samples; each factor alone divides 16 (was: a ValueError at step 0)
    cfg = resolve_config(None, {"method": "fixmatch", "norm": "bn", "batch_size": 16, "accumulate": 2,
                                "bn_splits": 8, "max_steps": 1, "device": "cpu"})  # fits one process
    with pytest.raises(UserError, match=r"^batch_size 16 must be divisible by processes x accumulate x "
                                        r"bn_splits \(2 x 2 x 8 = 32\)"):
        check_feasible(cfg, world_size=2)
    check_feasible({**cfg, "batch_size": 32}, world_size=2)  # 8 per process and micro-batch: 1 per group
    check_feasible({**cfg, "bn_splits": 4}, world_size=2)  # 16 = 2 x 2 x 4


def test_config_and_resume_compatibility():
    with pytest.raises(UserError, match="bn_splits must be"):
        resolve_config(None, {"max_steps": 1, "bn_splits": 0})
    old = resolve_config(None, {"max_steps": 1})
    del old["bn_splits"]  # a run directory written before the key existed
    assert comparable(old) == comparable(resolve_config(None, {"max_steps": 1}))


# -- BN per contiguous chunk equals the (N/s, s*C) layout it replaced --------------------
def _layout_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The forward this class had until 2026-12-06: the splits side by side as channels,
    ``(N/s, s*C, *)``, through one F.batch_norm (copying the activations in and out)."""
    factor = 0.0 if layer.momentum is None else layer.momentum
    if layer.track_running_stats:
        layer.num_batches_tracked.add_(1)
        if layer.momentum is None:
            factor = 1.0 / float(layer.num_batches_tracked)
    n, c, *rest = x.shape
    s = layer.num_splits
    xs = x.view(s, n // s, c, *rest).transpose(0, 1).reshape(n // s, s * c, *rest)
    running_mean = running_var = None
    if layer.track_running_stats:
        running_mean, running_var = layer.running_mean.repeat(s), layer.running_var.repeat(s)
    weight = layer.weight.repeat(s) if layer.affine else None
    bias = layer.bias.repeat(s) if layer.affine else None
    out = F.batch_norm(xs, running_mean, running_var, weight, bias, True, factor, layer.eps)
    if layer.track_running_stats:
        with torch.no_grad():
            layer.running_mean.copy_(running_mean.view(s, c).mean(0))
            layer.running_var.copy_(running_var.view(s, c).mean(0))
    return out.view(n // s, s, c, *rest).transpose(0, 1).reshape(n, c, *rest)


SPLIT_CASES = [
    ("2d", (16, 3, 5, 4), {}),
    ("2d channels_last", (16, 3, 5, 4), {"channels_last": True}),
    ("2d no affine, cumulative", (8, 3, 4, 4), {"affine": False, "momentum": None}),
    ("2d no running statistics", (8, 3, 4, 4), {"track_running_stats": False}),
    ("1d features", (16, 5), {}),
    ("1d sequence", (8, 5, 3), {}),
]


@pytest.mark.parametrize(("shape", "options"), [(s, o) for _, s, o in SPLIT_CASES],
                         ids=[name for name, _, _ in SPLIT_CASES])
def test_split_statistics_per_chunk_equal_the_layout_forward(shape, options):
    options = dict(options)
    channels_last = options.pop("channels_last", False)
    cls = SplitBatchNorm2d if len(shape) == 4 else SplitBatchNorm1d
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 1
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    grad = torch.randn(*shape, generator=gen, dtype=torch.float64)
    fast = cls(shape[1], 4, dtype=torch.float64, **options)
    if fast.affine:
        with torch.no_grad():
            fast.weight.uniform_(0.5, 1.5, generator=gen)
            fast.bias.uniform_(-1, 1, generator=gen)
    slow = cls(shape[1], 4, dtype=torch.float64, **options)
    slow.load_state_dict(fast.state_dict())
    for step in range(2):  # twice: the running statistics' second update starts from the first's
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fast, out_slow = fast(xa), _layout_reference(slow, xb)
        torch.testing.assert_close(out_fast, out_slow, rtol=1e-12, atol=1e-12)
        (out_fast * grad).sum().backward()
        (out_slow * grad).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(fast.named_parameters(), slow.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(fast.named_buffers(), slow.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
        x = x * 0.5 + step


def test_split_batchnorm_is_per_gpu_batchnorm_with_averaged_running_statistics():
    """What ``--bn-splits s`` emulates: s GPUs, each with its own BatchNorm on its share of the batch
    (outputs and gradients exactly theirs), and the running statistics averaged across them, as
    the trainer's all-reduce does after each step under torchrun."""
    gen = torch.Generator().manual_seed(0)
    splits, channels = 4, 3
    split = SplitBatchNorm2d(channels, splits, dtype=torch.float64)
    gpus = [torch.nn.BatchNorm2d(channels, dtype=torch.float64) for _ in range(splits)]
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5, generator=gen)
        split.bias.uniform_(-1, 1, generator=gen)
    for gpu in gpus:
        gpu.load_state_dict(split.state_dict())
    for step in range(2):
        x = torch.randn(16, channels, 5, 4, generator=gen, dtype=torch.float64) * (2 + step) + step
        grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        xs, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = split(xs)
        outs = [gpu(chunk) for gpu, chunk in zip(gpus, xg.chunk(splits), strict=True)]
        assert torch.equal(out, torch.cat(outs))  # each share normalised with its own statistics
        (out * grad).sum().backward()
        (torch.cat(outs) * grad).sum().backward()
        assert torch.equal(xs.grad, xg.grad)
        torch.testing.assert_close(split.weight.grad, sum(g.weight.grad for g in gpus), rtol=1e-13, atol=0)
        with torch.no_grad():  # the all-reduce average of the running statistics across the GPUs
            for name in ("running_mean", "running_var"):
                average = torch.stack([getattr(g, name) for g in gpus]).mean(0)
                torch.testing.assert_close(getattr(split, name), average, rtol=1e-14, atol=1e-15)
                for gpu in gpus:
                    getattr(gpu, name).copy_(average)
