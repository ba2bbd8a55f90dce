"""Norm conversion, split BN and ShuffleBN."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanorm.models import MLPHead
from emanorm.norms import (
    NORM_KINDS,
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    convert_norm,
    convert_to_split_bn,
    group_count,
    shuffle_batch,
    unshuffle_batch,
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        MLPHead(16, 64, 8, batch_norm=True, last_batch_norm=True),
    )
    # Non-trivial affine weights, so that copying them is actually checked.
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net


def _affine(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in net.modules()
            if isinstance(m, _BatchNorm | nn.GroupNorm) and m.weight is not None]


@pytest.mark.parametrize("kind", ["gn", "in"])
def test_convert_to_batch_independent_norms(kind: str) -> None:
    net = _net()
    before = _affine(net)
    net = convert_norm(net, kind, num_groups=32)
    assert not any(isinstance(m, _BatchNorm) for m in net.modules())
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 4
    for gn in gns:
        assert gn.num_channels % gn.num_groups == 0
    assert [g.num_groups for g in gns] == ([24, 16, 8, 1] if kind == "gn" else [48, 16, 1, 1])
    for a, b in zip(before, _affine(net), strict=True):
        torch.testing.assert_close(a, b)
    x = torch.randn(4, 3, 8, 8)
    out = net(x)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    # No cross-sample dependency left: a sample's output does not depend on the others.
    torch.testing.assert_close(net(x[:1]), out[:1], rtol=1e-4, atol=1e-5)


def test_instance_norm_matches_torch_instance_norm() -> None:
    bn = nn.BatchNorm2d(6)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    gn = convert_norm(bn, "in")
    ref = nn.InstanceNorm2d(6, affine=True)
    ref.load_state_dict(gn.state_dict())
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(gn(x), ref(x))


def test_convert_sync_bn_and_back_keeps_types_and_statistics() -> None:
    net = _net()
    net.train()
    net(torch.randn(4, 3, 8, 8))  # non-default running statistics
    types = [type(m) for m in net.modules() if isinstance(m, _BatchNorm)]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plain = copy.deepcopy(net)
    sync = convert_norm(net, "sync_bn")
    assert all(type(m) is nn.SyncBatchNorm for m in sync.modules() if isinstance(m, _BatchNorm))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(sync(x), plain(x))  # one process: plain BN statistics
    sync.load_state_dict(state)
    back = convert_norm(sync, "bn")
    assert [type(m) for m in back.modules() if isinstance(m, _BatchNorm)] == types
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_convert_norm_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="allowed: bn, sync_bn, gn, in"):
        convert_norm(_net(), "ln")
    assert NORM_KINDS == ("bn", "sync_bn", "gn", "in")


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (48, 24), (16, 16), (7, 7), (96, 32), (33, 11)])
def test_group_count(channels: int, groups: int) -> None:
    assert group_count(channels, 32) == groups


def _chunked_reference(x: torch.Tensor, bn: nn.Module, splits: int) -> tuple[torch.Tensor, dict]:
    """Plain BN applied to each chunk, each starting from the same running statistics."""
    outs, means, vars_ = [], [], []
    plain = nn.BatchNorm1d if isinstance(bn, nn.BatchNorm1d) else nn.BatchNorm2d
    for chunk in x.chunk(splits):
        ref = plain(bn.num_features)
        ref.load_state_dict(bn.state_dict())
        ref.train()
        outs.append(ref(chunk))
        means.append(ref.running_mean)
        vars_.append(ref.running_var)
    return torch.cat(outs), {"mean": torch.stack(means).mean(0), "var": torch.stack(vars_).mean(0)}


def test_split_batch_norm_equals_bn_per_chunk() -> None:
    torch.manual_seed(0)
    split = SplitBatchNorm2d(5, num_splits=4)
    nn.init.uniform_(split.weight, 0.5, 1.5)
    nn.init.uniform_(split.bias, -1, 1)
    # Chunks with different statistics, so per-chunk and whole-batch BN differ clearly.
    x = torch.randn(8, 5, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1) + torch.arange(8).view(8, 1, 1, 1)
    expected, stats = _chunked_reference(x, split, 4)
    out = split(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(split.running_mean, stats["mean"])
    torch.testing.assert_close(split.running_var, stats["var"])
    assert int(split.num_batches_tracked) == 1
    assert not torch.allclose(out, nn.functional.batch_norm(x, None, None, split.weight, split.bias, True))
    # Gradients flow to the input and the affine parameters: those of BN applied chunk by chunk.
    x.requires_grad_(True)
    split(x).square().sum().backward()
    weight, bias = (p.detach().clone().requires_grad_() for p in (split.weight, split.bias))
    x_ref = x.detach().clone().requires_grad_(True)
    chunks = [nn.functional.batch_norm(c, None, None, weight, bias, True) for c in x_ref.chunk(4)]
    torch.cat(chunks).square().sum().backward()
    for got, want in ((split.weight.grad, weight.grad), (split.bias.grad, bias.grad), (x.grad, x_ref.grad)):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want)
    x = x.detach()
    # Eval mode is plain BN with the running statistics.
    split.eval()
    plain = nn.BatchNorm2d(5).eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain(x))


@pytest.mark.parametrize("shape", [(8, 5), (8, 5, 3)])
def test_split_batch_norm_1d_equals_bn_per_chunk(shape) -> None:
    torch.manual_seed(0)
    split = SplitBatchNorm1d(5, num_splits=4)
    nn.init.uniform_(split.weight, 0.5, 1.5)
    nn.init.uniform_(split.bias, -1, 1)
    scale = torch.arange(1, 9, dtype=torch.float32).view(8, *[1] * (len(shape) - 1))
    x = torch.randn(*shape) * scale + scale  # chunks with different statistics
    expected, stats = _chunked_reference(x, split, 4)
    out = split(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(split.running_mean, stats["mean"])
    torch.testing.assert_close(split.running_var, stats["var"])
    assert not torch.allclose(out, nn.functional.batch_norm(x, None, None, split.weight, split.bias, True))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        split(torch.randn(8, 5, 2, 2))
    split.eval()
    plain = nn.BatchNorm1d(5).eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain(x))


def assert_split_is_per_chunk_bn(split: nn.Module, reference: nn.Module) -> None:
    """Same weights as ``reference``: equal in eval mode (running statistics); in training mode
    each half of the batch is normalised by its own statistics, so the outputs differ."""
    x = torch.randn(4, 3, 8, 8)
    x[2:] = x[2:] * 3 + 1  # halves with different statistics
    split.eval(), reference.eval()
    torch.testing.assert_close(split(x), reference(x))
    split.train(), reference.train()
    assert not torch.allclose(split(x), reference(x), atol=1e-3)


def test_convert_to_split_bn_one_d_splits_the_heads_and_converts_back() -> None:
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    reference = copy.deepcopy(net)
    split = convert_to_split_bn(net, 2, one_d=True)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in split.modules()) == 2
    assert sum(isinstance(m, SplitBatchNorm1d) for m in split.modules()) == 2
    assert split.state_dict().keys() == state.keys()
    assert_split_is_per_chunk_bn(split, reference)
    plain = convert_norm(split, "bn")
    assert {type(m) for m in plain.modules() if isinstance(m, _BatchNorm)} == {nn.BatchNorm1d, nn.BatchNorm2d}


def test_split_batch_norm_rejects_indivisible_batch() -> None:
    with pytest.raises(ValueError, match="batch size 6 is not divisible by num_splits=4"):
        SplitBatchNorm2d(3, num_splits=4)(torch.randn(6, 3, 2, 2))


def test_convert_to_split_bn() -> None:
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    reference = copy.deepcopy(net)
    split = convert_to_split_bn(net, 2)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in split.modules()) == 2
    assert sum(type(m) is nn.BatchNorm1d for m in split.modules()) == 2  # heads untouched
    assert split.state_dict().keys() == state.keys()
    assert_split_is_per_chunk_bn(split, reference)
    with pytest.raises(ValueError, match="num_splits"):
        convert_to_split_bn(net, 0)


def test_shuffle_unshuffle_single_process() -> None:
    torch.manual_seed(0)
    x = torch.arange(32, dtype=torch.float32).view(16, 2)
    shuffled, idx = shuffle_batch(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(shuffled.sort(0).values, x)
    # A per-sample function applied to the shuffled batch comes back in the original order.
    torch.testing.assert_close(unshuffle_batch(shuffled * 3 + 1, idx), x * 3 + 1)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different RNG per rank: the permutation must still be shared
        x = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank
        shuffled, idx = shuffle_batch(x)
        restored = unshuffle_batch(shuffled * 2, idx)
        torch.save({"x": x, "shuffled": shuffled, "restored": restored}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~9 CPU-seconds
@pytest.mark.distributed
def test_shuffle_unshuffle_distributed(tmp_path) -> None:
    world = 2
    mp.spawn(_distributed_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    everything = torch.cat([r["x"] for r in results])
    together = torch.cat([r["shuffled"] for r in results])
    # The ranks' shares form one permutation of the global batch (nothing lost, nothing twice).
    assert torch.equal(together[together[:, 0].argsort()], everything)
    # Samples really move between ranks with this seed (not a local shuffle).
    assert not torch.equal(results[0]["shuffled"].sort(0).values, results[0]["x"])
    for r in results:
        torch.testing.assert_close(r["restored"], r["x"] * 2)


class _BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BN subclass whose forward does more than BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_bn_subclass_with_own_forward_is_not_silently_replaced() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), _BatchNormAct(8))
    assert convert_norm(net, "bn")[1].__class__ is _BatchNormAct
    for kind in ("gn", "in", "sync_bn"):
        with pytest.raises(ValueError, match=r"cannot convert .*_BatchNormAct"):
            convert_norm(net, kind)
    with pytest.raises(ValueError, match="cannot convert"):
        convert_to_split_bn(net, 2)
