"""DINO: multi-crop views, the loss, centring, sharpening, frozen last layer, clipping, every norm."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_methods as _methods_tests  # tests/ is on the path, as for conftest
from conftest import HANG_BOUND_S, run_two_rank_script
from emanorm import cosine_momentum
from emanorm.data import BatchStream, DataError, build_augmentation
from emanorm.data.augment import dino_local_size
from emanorm.data.datasets import DatasetInfo, TensorImageDataset
from emanorm.errors import UserError
from emanorm.methods import ALL_NORMS, DINO, build_method
from emanorm.methods.dino import dino_loss, teacher_temperature
from emanorm.models import DINOHead

B = 4  # images per view (divisible by num_splits=2)
GLOBAL, LOCAL = 8, 4
SMALL = {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4, "local_crops": 2, "num_splits": 2}


# The tiny backbone of the other methods' tests: conv + norm + ReLU + global pool, any input size.
TinyBackbone = _methods_tests.TinyBackbone


def make(norm: str = "eman", momentum: float = 0.9, **options) -> DINO:
    return build_method("dino", backbone_factory=TinyBackbone, num_classes=3, norm=norm, momentum=momentum,
                        eman_momentum=None, bn_momentum=0.1, **{**SMALL, **options})


def make_batch(method: DINO, seed: int = 0, epoch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for key in method.unlabeled_views:
        size = GLOBAL if key.startswith("global") else LOCAL
        batch[key] = torch.randn(B, 1, size, size, generator=gen) * 2 + 1
    batch["epoch"] = torch.tensor(epoch)
    return batch


def step(method: DINO, opt: torch.optim.Optimizer, batch: dict, index: int, total: int = 10) -> torch.Tensor:
    loss, logs = method(batch, index)
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in logs.values())
    opt.zero_grad()
    loss.backward()
    method.before_optimizer_step()  # DINO's clipping and frozen last layer, as train_step calls it
    opt.step()
    method.after_step(index, total)
    return loss


_one_thread = _methods_tests._one_thread  # the same autouse one-thread fixture as the other methods' tests


# -- every norm --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ALL_NORMS)
def test_every_norm_trains_with_finite_loss_and_no_teacher_gradient(norm):
    torch.manual_seed(0)
    method = make(norm)
    method.train()
    opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05, momentum=0.9)
    for i in range(3):
        step(method, opt, make_batch(method, seed=i, epoch=i), i)
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    trainable = {id(p) for g in method.parameter_groups(0.0) for p in g["params"]}
    assert not trainable & {id(p) for p in method.teacher.parameters()}
    assert method.encoder("teacher") is method.teacher.module.backbone
    assert method.classifier("teacher") is None
    features = method.encoder("teacher").eval()(torch.randn(2, 1, GLOBAL, GLOBAL))
    assert features.shape == (2, TinyBackbone.feature_dim) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    assert method.teacher.norm == (norm if norm in ("eman", "teacher_pn", "student_pn") else "bn")


def test_default_is_sync_bn_and_views_are_two_global_plus_local_crops():
    method = make("default", local_crops=3)
    assert method.plan.resolved == "sync_bn"
    assert method.unlabeled_views == {"global1": "dino_global1", "global2": "dino_global2",
                                      "local1": "dino_local", "local2": "dino_local", "local3": "dino_local"}
    assert list(make(local_crops=0).unlabeled_views) == ["global1", "global2"]


def test_default_on_one_process_is_the_bn_computation():
    """SyncBN falls back to BN on one process, so `default` and `bn` train identically there."""
    states = []
    for norm in ("default", "bn"):
        torch.manual_seed(0)
        method = make(norm)
        method.train()
        opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05, momentum=0.9)
        for i in range(2):
            step(method, opt, make_batch(method, seed=i), i)
        states.append(method.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_options_raise_one_line_errors():
    with pytest.raises(ValueError, match="teacher_temp must lie in"):
        make(teacher_temp=0.0)
    with pytest.raises(ValueError, match="center_momentum must lie in"):
        make(center_momentum=1.5)
    with pytest.raises(ValueError, match="local_crops must lie in"):
        make(local_crops=-1)
    with pytest.raises(KeyError, match="needs batch key 'epoch'"):
        method = make()
        batch = make_batch(method)
        del batch["epoch"]
        method.training_step(batch, 0)


# -- the head and the loss -----------------------------------------------------------------------
def test_dino_head_shape_gelu_bottleneck_and_unit_last_layer():
    head = DINOHead(6, 32, hidden_dim=8, bottleneck_dim=4)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    assert any(isinstance(m, nn.GELU) for m in head.mlp)
    assert head.mlp[-1].out_features == 4
    assert head(torch.randn(5, 6)).shape == (5, 32)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    assert DINOHead(6, 32, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_loss_pairs_every_teacher_global_view_with_every_other_student_view():
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=gen) for _ in range(4)]
    teacher = [F.softmax(torch.randn(3, 5, generator=gen), dim=-1) for _ in range(2)]
    expected, pairs = 0.0, 0
    for i in range(2):
        for v in range(4):
            if v != i:
                expected += -(teacher[i] * F.log_softmax(student[v] / 0.1, dim=-1)).sum(-1).mean()
                pairs += 1
    assert pairs == 6
    torch.testing.assert_close(dino_loss(student, teacher, 0.1), expected / pairs)


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert [teacher_temperature(e, 0.04, 0.07, 4) for e in range(6)] == pytest.approx(
        [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 1) == 0.04
    method = make(warmup_teacher_temp_epochs=3)
    method.train()
    _, logs = method.training_step(make_batch(method, epoch=1), 0)
    assert logs["teacher_temp"] == pytest.approx(0.055)


# -- centring and the teacher momentum -------------------------------------------------------------
def test_center_moves_with_its_momentum_after_the_step_and_the_loss_uses_the_old_one():
    torch.manual_seed(0)
    method = make("eman", center_momentum=0.8)
    method.train()
    outputs = []
    method.teacher.module.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone()))
    opt = torch.optim.SGD(method.parameter_groups(0.0), lr=0.01)
    expected = torch.zeros(1, SMALL["out_dim"])
    for i in range(3):
        before = method.center.clone()
        method(make_batch(method, seed=i), i)
        assert torch.equal(method.center, before)  # training_step never writes the centre
        method.zero_grad()
        step(method, opt, make_batch(method, seed=i), i)
        expected = 0.8 * expected + 0.2 * outputs[-1].mean(0, keepdim=True)
        torch.testing.assert_close(method.center, expected)
    assert method.center.abs().sum() > 0


def test_teacher_momentum_is_cosine_to_one():
    method = make("eman", momentum=0.996)
    assert method.momentum_at(0, 100) == pytest.approx(0.996)
    assert method.momentum_at(50, 100) == pytest.approx(cosine_momentum(0.996, 50, 100))
    assert method.momentum_at(100, 100) == pytest.approx(1.0)


# -- gradients: frozen last layer, clipping --------------------------------------------------------
def _last_layer_grads(method: DINO) -> list[torch.Tensor]:
    return [p.grad for p in method.student.head.last_layer.parameters() if p.requires_grad]


def test_last_layer_is_frozen_during_the_first_epoch_only():
    torch.manual_seed(0)
    method = make("bn", freeze_last_layer_epochs=1, clip_grad=0.0)
    method.train()
    opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.5, momentum=0.9)
    last_layer = list(method.student.head.last_layer.parameters())
    before = [p.detach().clone() for p in last_layer]
    for i in range(2):
        step(method, opt, make_batch(method, seed=i, epoch=0), i)
        # no gradient at all (DINO's None): neither weight decay nor momentum state touches it
        assert all(g is None for g in _last_layer_grads(method))
        assert not any(opt.state.get(p) for p in last_layer)
    assert all(torch.equal(a, b) for a, b in zip(before, last_layer, strict=True))
    step(method, opt, make_batch(method, seed=2, epoch=1), 2)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in _last_layer_grads(method))
    assert not torch.allclose(method.student.head.last_layer.weight, before[0])


def test_each_parameter_gradient_is_clipped_before_the_optimizer_step_not_in_backward():
    torch.manual_seed(0)
    clip = 1e-3
    method = make("bn", clip_grad=clip)
    method.train()
    loss, _ = method.training_step(make_batch(method), 0)
    (loss * 1e4).backward()
    # backward leaves the gradients as they are (no hooks: DDP and accumulation see raw sums)
    assert max(p.grad.norm().item() for p in method.student.parameters() if p.grad is not None) > 10 * clip
    method.before_optimizer_step()
    norms = [p.grad.norm().item() for p in method.student.parameters() if p.grad is not None]
    assert norms and max(norms) <= clip * (1 + 1e-4)


def _one_sgd_step(method: DINO, step_fn=None, scaler=None, batch=None) -> dict[str, torch.Tensor]:
    from emanorm.train import train_step

    opt = torch.optim.SGD(method.parameter_groups(0.0), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    method.train()
    train_step(step_fn, method, batch or make_batch(method), 0, 10, opt, scheduler, scaler=scaler)
    return {k: v.detach().clone() for k, v in method.student.state_dict().items()}


def test_a_deep_copy_clips_and_freezes_like_the_original():
    import copy

    torch.manual_seed(0)
    original = make("bn", clip_grad=1e-6, freeze_last_layer_epochs=1)
    start = {k: v.clone() for k, v in original.student.state_dict().items()}
    twin = copy.deepcopy(original)
    batch = make_batch(original, epoch=0)
    after = _one_sgd_step(twin, batch=batch)
    assert all(torch.equal(v, original.student.state_dict()[k]) for k, v in start.items())  # untouched
    for name, _ in twin.student.named_parameters():  # lr 1, plain SGD: moved by the clipped gradient
        assert (after[name] - start[name]).norm() <= 1e-6 * 1.01, name  # (float32 subtraction)
    assert all(torch.equal(after[k], start[k]) for k in after if k.startswith("head.last_layer"))
    torch.testing.assert_close(after, _one_sgd_step(original, batch=batch), rtol=0, atol=0)


def test_a_compiled_method_clips_and_freezes_like_the_eager_one():
    torch.manual_seed(0)
    eager = make("gn", clip_grad=1e-3, freeze_last_layer_epochs=1)
    torch.manual_seed(0)
    compiled = make("gn", clip_grad=1e-3, freeze_last_layer_epochs=1)
    batch = make_batch(eager, epoch=0)
    expected = _one_sgd_step(eager, batch=batch)
    got = _one_sgd_step(compiled, step_fn=torch.compile(compiled, backend="eager"), batch=batch)
    torch.testing.assert_close(got, expected)


def test_a_loss_scaler_is_unscaled_before_clipping_so_fp16_training_clips_true_gradients():
    # (fp16 used to be refused: the hooks clipped loss-scaled gradients)
    torch.manual_seed(0)
    plain = make("bn", clip_grad=1e-3)
    torch.manual_seed(0)
    scaled = make("bn", clip_grad=1e-3)
    batch = make_batch(plain)
    expected = _one_sgd_step(plain, batch=batch)
    got = _one_sgd_step(scaled, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12), batch=batch)
    torch.testing.assert_close(got, expected)


# -- multi-crop views ------------------------------------------------------------------------------
INFO = DatasetInfo("fake", 3, 1, 28, (0.5,), (0.25,))


def test_dino_presets_make_global_and_local_crops_of_their_sizes():
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert dino_local_size(224) == 96 and dino_local_size(28) == 12
    assert build_augmentation("dino_global1", INFO)(x, generator=g).shape == (5, 1, 28, 28)
    assert build_augmentation("dino_global2", INFO)(x, generator=g).shape == (5, 1, 28, 28)
    assert build_augmentation("dino_local", INFO)(x, generator=g).shape == (5, 1, 12, 12)
    local = build_augmentation("dino_local", INFO, local_size=8, local_scale=[0.1, 0.2])
    assert local(x, generator=g).shape == (5, 1, 8, 8) and local.ops[0].scale == (0.1, 0.2)
    big = DatasetInfo("fake", 3, 3, 224, (0.5,) * 3, (0.25,) * 3)
    names = [type(op).__name__ for op in build_augmentation("dino_global2", big).ops]
    assert names == ["RandomResizedCropFlip", "ColorJitter", "RandomGrayscale", "GaussianBlur",
                     "RandomSolarize"]
    assert build_augmentation("dino_global1", big, global_scale=(0.14, 1)).ops[0].scale == (0.14, 1.0)
    with pytest.raises(DataError, match=r"global_scale=\[0.5, 0.2\] must be \[low, high\]"):
        build_augmentation("dino_global1", INFO, global_scale=[0.5, 0.2])
    with pytest.raises(DataError, match="local_size=0 must be a positive integer"):
        build_augmentation("dino_local", INFO, local_size=0)


def test_batch_stream_yields_multi_crop_views_per_size_and_the_epoch():
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    dataset = TensorImageDataset(images, torch.arange(40) % 3, INFO, "train")
    method = make(local_crops=3)
    stream = BatchStream(unlabeled=dataset, unlabeled_views=method.unlabeled_views, batch_size=8, seed=0)
    stream.set_epoch(2)
    batch = next(iter(stream))
    assert batch["global1"].shape == batch["global2"].shape == (8, 1, 28, 28)
    assert all(batch[f"local{i}"].shape == (8, 1, 12, 12) for i in (1, 2, 3))
    assert not torch.equal(batch["local1"], batch["local2"])  # each view draws its own crops
    assert int(batch["epoch"]) == 2
    method.train()
    loss, _ = method.training_step(batch, 0)
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("norm", ["bn", "shuffle_bn"])
def test_only_global_crops_move_the_student_running_statistics(norm):
    """EMAN averages the student's running statistics into a teacher that sees global crops only."""
    torch.manual_seed(0)
    method = make(norm)
    method.train()
    batch = make_batch(method)
    for key in ("local1", "local2"):
        batch[key] = batch[key] * 10 + 5  # local crops with very different statistics
    reference = make(norm)
    reference.load_state_dict(method.state_dict())
    reference.train()
    method.training_step(batch, 0)
    globals_only = {k: v for k, v in batch.items() if not k.startswith("local")}
    reference.options["local_crops"] = 0
    reference.training_step(globals_only, 0)
    for (name, a), b in zip(method.student.named_buffers(), reference.student.buffers(), strict=True):
        assert torch.equal(a, b), name
    mixed = make(norm, local_crop_statistics=True)
    mixed.load_state_dict(method.state_dict(), strict=False)
    before = mixed.student.backbone.norm.num_batches_tracked.clone()
    mixed.train()
    mixed.training_step(batch, 0)
    assert mixed.student.backbone.norm.num_batches_tracked == before + 2


def test_split_bn_student_sees_each_crop_size_per_emulated_gpu():
    method = make("shuffle_bn")
    assert method.plan.num_splits == 2
    method.train()
    loss, _ = method.training_step(make_batch(method), 0)
    assert math.isfinite(loss.item())


# -- two ranks against one process -------------------------------------------------------------------
WORKER = """
import datetime, os, sys, torch
from torch import nn
sys.path.insert(0, sys.argv[2])
from test_dino import make, make_batch
# the bound the test gives (conftest.torchrun_command), not gloo's default of 30 min
timeout = datetime.timedelta(seconds=float(os.environ["EMANORM_DIST_TIMEOUT"]))
torch.distributed.init_process_group("gloo", timeout=timeout)
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
torch.manual_seed(0)
method = make("gn", clip_grad=0.0)
model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.1, momentum=0.9)
method.train()
for i in range(3):
    full = make_batch(method, seed=i, epoch=i // 2)
    half = {k: (v[rank::world] if v.dim() else v) for k, v in full.items()}
    loss, _ = model(half, i)
    opt.zero_grad(); loss.backward(); method.before_optimizer_step(); opt.step(); method.after_step(i, 10)
if rank == 0:
    torch.save(method.state_dict(), sys.argv[1])
del model  # DDP holds the process group: one left to interpreter exit aborts in gloo's threads
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process_with_batch_independent_norms(tmp_path):
    """With GN (no batch statistics) and no clipping, DDP's averaged gradients over two half
    batches equal one process's full-batch gradients, and the all-reduced centre is the full-batch
    mean: two ranks and one process agree up to rounding."""
    out = run_two_rank_script(tmp_path, WORKER, dist_timeout_s=HANG_BOUND_S, timeout=HANG_BOUND_S)
    torch.manual_seed(0)
    method = make("gn", clip_grad=0.0)
    opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.1, momentum=0.9)
    method.train()
    for i in range(3):
        step(method, opt, make_batch(method, seed=i, epoch=i // 2), i)
    ranks = torch.load(out, weights_only=True)
    reference = method.state_dict()
    assert ranks.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert reference["center"].abs().sum() > 0


def test_small_dino_preset_trains_and_writes_the_run_directory(tmp_path, tiny_fashion_mnist_dir):
    from emanorm.evaluation import knn_monitor
    from emanorm.train import resolve_config, train

    cfg = resolve_config("small-dino", {
        "max_steps": 2, "batch_size": 16, "knn_bank_size": 64, "monitor_test_size": 64, "log_every": 1,
        "device": "cpu", "out": str(tmp_path / "run"), "data_dir": str(tiny_fashion_mnist_dir),
        "method_args": {"out_dim": 32, "hidden_dim": 16, "local_crops": 2},
    })
    summary = train(cfg, monitor=knn_monitor, progress=False)
    assert summary["method"] == "dino" and summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the stand-in's grey level encodes the label: far above chance (10%) even after 2 steps
    assert saved["method"] == "dino" and saved["final"]["knn_teacher"] >= 25.0, saved["final"]  # measured 40


# -- DINO's schedules: lr warm-up from 0, min_lr, cosine weight decay, 1-D exemption ---------------
def test_lr_and_weight_decay_schedules_follow_dinos_recipe():
    import numpy as np

    from emanorm.train.recipe import Schedule, cosine_weight_decay, lr_factor

    base, min_lr, total, warmup, wd, wd_end = 0.5, 1e-3, 20, 5, 0.04, 0.4
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    exempt_params = [*model[1].parameters(), model[0].bias]
    groups = [{"params": [model[0].weight], "weight_decay": wd},
              {"params": exempt_params, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=base)
    sched = Schedule(opt, lambda s: lr_factor(s, total, warmup, "cosine", [], warmup_from_zero=True,
                                              floor=min_lr / base), cosine_weight_decay(wd, wd_end, total))
    lrs, decays, exempt = [], [], []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        decays.append(opt.param_groups[0]["weight_decay"])
        exempt.append(opt.param_groups[1]["weight_decay"])
        opt.step()
        sched.step()
    # DINO's cosine_scheduler, written out: linspace(0, base, W), then min + (base - min)(1 + cos)/2
    i = np.arange(total - warmup)
    expected_lr = np.concatenate([np.linspace(0, base, warmup),
                                  min_lr + 0.5 * (base - min_lr) * (1 + np.cos(np.pi * i / len(i)))])
    expected_wd = wd_end + 0.5 * (wd - wd_end) * (1 + np.cos(np.pi * np.arange(total) / total))
    np.testing.assert_allclose(lrs, expected_lr, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(decays, expected_wd, rtol=1e-12)
    assert exempt == [0.0] * total
    # the schedule's state saves without its functions (checkpoints load with weights_only)
    import io

    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["last_epoch"] == total
    # without the options: the old warm-up from lr / W and a cosine to 0
    assert lr_factor(0, total, warmup, "cosine", []) == 1 / warmup
    assert lr_factor(total, total, warmup, "cosine", []) == pytest.approx(0.0, abs=1e-15)


def test_exclude_1d_params_exempts_every_bias_and_1d_parameter_as_dino():
    method = make("gn", exclude_bias_and_norm=False, exclude_1d_params=True)
    decay, no_decay = method.parameter_groups(0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    named = dict(method.student.named_parameters())
    exempt = {id(p) for p in no_decay["params"]}
    for name, p in named.items():
        if p.requires_grad:
            assert (id(p) in exempt) == (p.ndim == 1 or name.endswith(".bias")), name


@pytest.mark.parametrize(("override", "message"), [
    ({"min_lr": 1.0, "lr": 0.1}, "min_lr must be a number in"),
    ({"min_lr": -1e-6}, "min_lr must be a number >= 0"),
    ({"min_lr": float("nan")}, "min_lr must be a finite number"),
    ({"weight_decay_end": -0.1}, "weight_decay_end must be a number >= 0"),
    ({"weight_decay_end": "high"}, "weight_decay_end must be a number >= 0"),
    ({"weight_decay_end": float("inf")}, "weight_decay_end must be a finite number"),
    ({"warmup_from_zero": "yes"}, "warmup_from_zero must be true or false"),
])
def test_bad_schedule_options_are_one_line_errors(override, message):
    from emanorm.train import resolve_config

    with pytest.raises(UserError, match=message):
        resolve_config("small-dino", override)
