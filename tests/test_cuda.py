"""CUDA tests (``pytest -m cuda``): what only a GPU can show. They skip without CUDA.

``benchmarks/gpu_suite.py`` runs them on a lent GPU. The augmentation test (CUDA equals CPU for the
same generator) lives with the other augmentation tests: ``tests/test_augment.py::test_cuda_matches_cpu``.
The training steps come from ``benchmarks/_common.EmanormPath``, which builds the step exactly as
``emanorm train`` does (its equality with the trainer is checked in ``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import HANG_BOUND_S, torchrun_command
from emanorm import EMATeacher
from emanorm.models import build_backbone

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # benchmarks/_common.py is imported by path, as the scripts do

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

#: small heads and queues so every method runs a few steps in a second
SMALL = {
    "fixmatch": {"unlabeled_ratio": 2, "labels_per_class": 4},
    "moco": {"method_args": {"queue_size": 64, "dim": 16}},
    "byol": {"method_args": {"hidden_dim": 32, "proj_dim": 16}},
}


def tiny_cfg(method: str, data_dir: Path, **extra: object) -> dict:
    from _common import bench_config

    overrides = {"data_dir": str(data_dir), "batch_size": 8, "log_every": 1, "max_steps": 10,
                 **SMALL[method], **extra}
    return bench_config(method, "cuda", overrides)


def floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("method", ["fixmatch", "moco", "byol"])
def test_train_step_under_bf16_autocast_stays_finite(method, tiny_fashion_mnist_dir):
    from _common import EmanormPath

    path = EmanormPath(tiny_cfg(method, tiny_fashion_mnist_dir, amp="bf16"))
    dtypes: set[torch.dtype] = set()
    first_conv = next(m for m in path.method.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    losses = []
    for _ in range(4):
        path.step()  # train_step raises NonFiniteLossError on a non-finite loss or weights
        losses.append(path.last_logs["loss"])
    assert torch.bfloat16 in dtypes, f"autocast did not reach the convolutions: {dtypes}"
    assert all(torch.isfinite(torch.tensor(losses))), losses
    for name, value in floating_state(path.method).items():
        assert value.is_cuda and torch.isfinite(value).all(), name


@pytest.mark.parametrize("norm", ["eman", "bn", "student_pn", "teacher_pn"])
def test_fused_ema_update_on_cuda_equals_cpu(norm):
    torch.manual_seed(0)
    student = build_backbone("small", in_channels=3, image_size=32)
    student.train()
    student(torch.randn(16, 3, 32, 32))  # non-trivial BN statistics
    student_gpu = copy.deepcopy(student).cuda()
    teacher, teacher_gpu = EMATeacher(student, norm=norm, momentum=0.9), EMATeacher(student_gpu, norm=norm,
                                                                                  momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same change on both students, then one fused update each
        with torch.no_grad():
            for p, p_gpu in zip(student.parameters(), student_gpu.parameters(), strict=True):
                delta = torch.randn(p.shape, generator=gen) * 0.1
                p.add_(delta)
                p_gpu.add_(delta.cuda())
        x = torch.randn(16, 3, 32, 32, generator=gen)
        student(x)
        student_gpu(x.cuda())
        teacher.update(student)
        teacher_gpu.update(student_gpu)
    expected, got = teacher.module.state_dict(), teacher_gpu.module.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert got[name].is_cuda, name
        if value.is_floating_point():
            torch.testing.assert_close(got[name].cpu(), value, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name].cpu(), value), name


@pytest.mark.parametrize("method", ["fixmatch", "moco"])
def test_eman_teacher_outputs_are_batch_independent_on_cuda(method, tiny_fashion_mnist_dir):
    from _common import EmanormPath

    path = EmanormPath(tiny_cfg(method, tiny_fashion_mnist_dir, amp="off", norm="eman"))
    for _ in range(3):  # move the student, its statistics and the teacher away from the start
        path.step()
    model = path.method
    model.train()  # the teacher must ignore the mode its parent is in
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 1, 28, 28, generator=gen)
    mates_a = torch.randn(7, 1, 28, 28, generator=gen)
    mates_b = torch.randn(7, 1, 28, 28, generator=gen) * 5 + 3  # BN batch statistics would move a lot
    with torch.no_grad():
        out_a = model.teacher_forward(torch.cat([sample, mates_a]).cuda())[0]
        out_b = model.teacher_forward(torch.cat([mates_b, sample]).cuda())[-1]
        alone = model.teacher_forward(sample.cuda())[0]
    # TF32 convolutions may round differently per batch size: close, not bitwise
    torch.testing.assert_close(out_a, out_b, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(alone, out_a, rtol=1e-3, atol=1e-3)


DDP_WORKER = """
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from _common import EmanormPath, bench_config

spec = json.loads(sys.argv[2])
dist.init_process_group("nccl")
torch.cuda.set_device(0)
cfg = bench_config("fixmatch", "cuda", spec["overrides"])


def run(ddp):
    path = EmanormPath(dict(cfg))
    if ddp:  # wrapped the way emanorm.train wraps the method for torchrun
        path.step_fn = torch.nn.parallel.DistributedDataParallel(
            path.method, device_ids=[0], broadcast_buffers=False)
    for _ in range(3):
        path.step()
    return {k: v.detach().float().cpu() for k, v in path.method.state_dict().items() if v.is_floating_point()}


plain, wrapped = run(False), run(True)
probe = torch.ones(1, device="cuda")
dist.all_reduce(probe)
torch.save({"plain": plain, "ddp": wrapped, "backend": dist.get_backend(), "world": dist.get_world_size(),
            "probe": probe.item()}, spec["out"])
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_one_gpu_nccl_ddp_run_trains_like_the_plain_method(tmp_path, tiny_fashion_mnist_dir):
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "ddp.pt"
    overrides = {"data_dir": str(tiny_fashion_mnist_dir), "batch_size": 8, "log_every": 1, "max_steps": 10,
                 "amp": "off", **SMALL["fixmatch"]}
    spec = json.dumps({"overrides": overrides, "out": str(out)})
    command, env = torchrun_command(1, str(script), str(BENCH), spec, dist_timeout_s=HANG_BOUND_S)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_BOUND_S,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert result["backend"] == "nccl" and result["world"] == 1 and result["probe"] == 1.0
    assert result["plain"].keys() == result["ddp"].keys()
    for name, value in result["ddp"].items():
        assert torch.isfinite(value).all(), name
        # one rank: DDP's all-reduce averages over one gradient, so the run matches the plain one
        torch.testing.assert_close(value, result["plain"][name], rtol=1e-3, atol=1e-4, msg=name)
