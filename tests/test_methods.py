"""Methods: every (method, norm) pair, the forward plans, the teacher rules, state round trips."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from conftest import spawn_ranks
from emanorm import cosine_momentum, warmup_momentum
from emanorm.methods import ALL_NORMS, METHODS, Method, build_method
from emanorm.methods.tensors import cat_for_splits, logs_to_floats, split_from_splits
from emanorm.norms import SplitBatchNorm2d, convert_norm

IMAGE = (1, 8, 8)
NUM_CLASSES = 3
B = 4  # batch size per view (divisible by num_splits=2)

# Small hyper-parameters so every test stays fast on a shared CPU.
SMALL = {
    "moco": {"dim": 4, "queue_size": 8, "num_splits": 2},
    "byol": {"hidden_dim": 8, "proj_dim": 4, "num_splits": 2},
    "dino": {"out_dim": 8, "hidden_dim": 8, "bottleneck_dim": 4, "local_crops": 2, "num_splits": 2},
    "fixmatch": {"num_splits": 2, "threshold": 0.3},
    "meanteacher": {"num_splits": 2, "rampup_steps": 2},
    "supervised": {},
    "mocov3": {"dim": 4, "hidden_dim": 8},
}


class TinyBackbone(nn.Module):
    """conv + norm + ReLU + global pool: ``(B, 1, 8, 8) -> (B, 6)``."""

    feature_dim = 6

    def __init__(self, kind: str = "bn") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        # On one process sync_bn falls back to bn, as the trainer's factory does.
        if kind in ("gn", "in"):
            convert_norm(self, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))


def factory(kind: str) -> nn.Module:
    return TinyBackbone(kind)


def make(name: str, norm: str = "default", momentum: float = 0.9, **options) -> Method:
    opts = {**SMALL[name], **options}
    return build_method(name, backbone_factory=factory, num_classes=NUM_CLASSES, norm=norm, momentum=momentum,
                        eman_momentum=None, bn_momentum=0.1, **opts)


def make_batch(method: Method, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = {k: torch.randn(B, *IMAGE, generator=gen) * 2 + 1
             for k in (*method.labeled_views, *method.unlabeled_views)}
    if method.labeled_views:
        batch["y"] = torch.randint(0, NUM_CLASSES, (B,), generator=gen)
    batch["epoch"] = torch.tensor(0)  # as BatchStream's batches (DINO's schedules count epochs)
    if "u_w" in batch:  # diagnostics only, -1 = unknown (as BatchStream's "y_u")
        batch["y_u"] = torch.randint(0, NUM_CLASSES, (B,), generator=gen)
        batch["y_u"][0] = -1
    return batch


def train(method: Method, steps: int = 2, total: int = 10) -> list[dict[str, float]]:
    method.train()
    opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05, momentum=0.9)
    all_logs = []
    for step in range(steps):
        loss, logs = method(make_batch(method, seed=step), step)
        assert loss.ndim == 0 and math.isfinite(loss.item())
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values()), logs
        logs = logs_to_floats(logs)
        assert all(math.isfinite(v) for v in logs.values()), logs
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, total)
        all_logs.append(logs)
    return all_logs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra intra-op threads only contend for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VALID = [(name, norm) for name, cls in METHODS.items() for norm in cls.NORMS]
INVALID = [(name, norm) for name, cls in METHODS.items() for norm in ALL_NORMS if norm not in cls.NORMS]


# -- building ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "norm"), VALID)
def test_every_valid_pair_trains(name, norm):
    torch.manual_seed(0)
    method = make(name, norm)
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    logs = train(method)
    assert "loss" in logs[-1]
    after = method.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("conv.weight"))
    x = torch.randn(2, *IMAGE)
    for which in ("teacher", "student"):
        features = method.encoder(which).eval()(x)
        assert features.shape == (2, TinyBackbone.feature_dim) and torch.isfinite(features).all()
        assert not torch.allclose(features[0], features[1])
        clf = method.classifier(which)
        if not METHODS[name].semi_supervised:
            assert clf is None
        else:
            assert clf(torch.randn(2, *IMAGE)).shape == (2, NUM_CLASSES)


def test_supervised_rejects_teacher_norms_and_shuffle():
    rejected = {n for name, n in INVALID if name == "supervised"}
    assert rejected == {"shuffle_bn", "eman", "teacher_pn", "student_pn"}
    for norm in ("eman", "shuffle_bn", "teacher_pn", "student_pn"):
        with pytest.raises(ValueError, match=r"allowed: default, bn, sync_bn, gn, in"):
            make("supervised", norm)


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_norm_option_and_name_raise(name):
    with pytest.raises(ValueError, match=r"norm 'layer_norm'.*allowed: default, bn"):
        make(name, "layer_norm")
    with pytest.raises(ValueError, match=r"unknown option\(s\) bogus .*allowed: "):
        make(name, bogus=1)
    if METHODS[name].OPTIONS:
        option, default = next(iter(METHODS[name].OPTIONS.items()))
        with pytest.raises(ValueError, match=option):
            make(name, **{option: "not-a-" + type(default).__name__})
    with pytest.raises(ValueError, match="unknown method 'simclr'; allowed: fixmatch, moco, byol"):
        build_method("simclr", backbone_factory=factory, num_classes=3, norm="bn", momentum=0.9,
                     eman_momentum=None, bn_momentum=0.1)


def test_out_of_range_options_raise():
    with pytest.raises(ValueError, match="threshold"):
        make("fixmatch", threshold=1.5)
    with pytest.raises(ValueError, match="distribution must be one of none, align"):
        make("fixmatch", distribution="uniform")
    with pytest.raises(ValueError, match="temperature"):
        make("moco", temperature=0.0)


@pytest.mark.parametrize(
    ("name", "norm", "mode", "kind"),
    [
        ("moco", "default", "bn", "bn"),
        ("moco", "eman", "eman", "bn"),
        ("byol", "default", "bn", "sync_bn"),
        ("byol", "gn", "bn", "gn"),
        ("fixmatch", "default", None, "bn"),
        ("fixmatch", "bn", "bn", "bn"),
        ("fixmatch", "student_pn", "student_pn", "bn"),
        ("meanteacher", "default", "bn", "bn"),
        ("meanteacher", "teacher_pn", "teacher_pn", "bn"),
        ("supervised", "in", None, "in"),
    ],
)
def test_norm_plan(name, norm, mode, kind):
    method = make(name, norm)
    assert method.plan.layer_kind == kind
    assert (method.teacher.norm if method.teacher is not None else None) == mode


def test_shuffle_bn_uses_split_bn_in_student_and_teacher_and_shuffles_teacher_input():
    method = make("moco", "shuffle_bn")
    assert method.plan.shuffle and method.plan.num_splits == 2
    for net in (method.student, method.teacher.module):
        splits = [m for m in net.modules() if isinstance(m, SplitBatchNorm2d)]
        assert splits and all(m.num_splits == 2 for m in splits)
    seen = []
    method.teacher.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    batch = make_batch(method)
    torch.manual_seed(1)
    method.training_step(batch, 0)
    assert seen[0].shape == batch["view2"].shape and not torch.equal(seen[0], batch["view2"])
    # Same samples, permuted.
    assert torch.allclose(seen[0].sum(0), batch["view2"].sum(0), atol=1e-5)


def test_default_moco_is_shuffle_bn_and_default_byol_sync_bn():
    assert make("moco").plan.resolved == "shuffle_bn"
    assert make("byol").plan.resolved == "sync_bn"


def test_bn_momentum_reaches_student_and_teacher():
    method = build_method("fixmatch", backbone_factory=factory, num_classes=3, norm="teacher_pn",
                          momentum=0.9, eman_momentum=None, bn_momentum=0.001, num_splits=2)
    for net in (method.student, method.teacher.module):
        assert all(m.momentum == 0.001 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


# -- FixMatch's two forms ----------------------------------------------------------------------
def _record_calls(module: nn.Module) -> list[torch.Tensor]:
    calls: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(args[0].detach().clone()))
    return calls


def test_fixmatch_default_form_is_one_forward_over_cat_x_uw_us():
    method = make("fixmatch", "default")
    assert method.teacher is None and method.eval_ema is not None
    student_calls, ema_calls = _record_calls(method.student), _record_calls(method.eval_ema)
    batch = make_batch(method)
    method.training_step(batch, 0)
    assert len(student_calls) == 1 and not ema_calls
    assert torch.equal(student_calls[0], torch.cat([batch["x"], batch["u_w"], batch["u_s"]]))


@pytest.mark.parametrize("norm", ["bn", "eman", "student_pn", "teacher_pn", "gn"])
def test_fixmatch_ema_form_student_sees_x_us_and_teacher_sees_uw(norm):
    method = make("fixmatch", norm)
    student_calls, teacher_calls = _record_calls(method.student), _record_calls(method.teacher)
    batch = make_batch(method)
    method.training_step(batch, 0)
    assert len(student_calls) == 1 and len(teacher_calls) == 1
    assert torch.equal(student_calls[0], torch.cat([batch["x"], batch["u_s"]]))
    assert torch.equal(teacher_calls[0], batch["u_w"])


def test_fixmatch_pseudo_labels_come_from_teacher_and_threshold_masks():
    method = make("fixmatch", "eman", threshold=0.0)
    batch = make_batch(method)
    with torch.no_grad():
        teacher_pl = method.teacher(batch["u_w"]).argmax(1)
    logs = logs_to_floats(method.training_step(batch, 0)[1])
    assert logs["mask"] == 1.0
    known = batch["y_u"] >= 0
    expected = (teacher_pl == batch["y_u"])[known].float().mean().item()
    assert logs["pl_acc"] == pytest.approx(expected) and logs["pl_precision"] == pytest.approx(expected)
    # The older key name works too; unknown targets only: NaN, nothing to log.
    batch["u_y"] = batch.pop("y_u")
    assert method.training_step(batch, 0)[1]["pl_acc"] == pytest.approx(expected)
    batch["u_y"] = torch.full_like(batch["u_y"], -1)
    assert method.training_step(batch, 0)[1]["pl_acc"].isnan()
    assert "pl_acc" not in logs_to_floats(method.training_step(batch, 0)[1])
    method = make("fixmatch", "eman", threshold=1.0)
    logs = logs_to_floats(method.training_step(make_batch(method), 0)[1])
    assert logs["mask"] == 0.0 and logs["loss_u"] == 0.0 and "pl_precision" not in logs and "pl_acc" in logs


def test_fixmatch_distribution_alignment_runs_and_tracks_prior():
    method = make("fixmatch", "eman", distribution="align")
    train(method)
    prior = method.class_prior
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(prior, torch.full_like(prior, 1 / NUM_CLASSES))


def test_fixmatch_eval_ema_updates_in_eman_mode_and_serves_classifier_teacher():
    method = make("fixmatch", "default")
    assert method.eval_ema.norm == "eman"
    assert method.classifier("teacher") is method.eval_ema.module
    before = copy.deepcopy(method.eval_ema.state_dict())
    train(method)
    after = method.eval_ema.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("running_mean"))
    plain = make("fixmatch", "default", eval_ema=False)
    assert plain.eval_ema is None and plain.classifier("teacher") is plain.student


def test_split_bn_cat_keeps_each_emulated_gpu_labeled_and_unlabeled():
    x, u = torch.arange(4.0), torch.arange(10.0, 18.0)
    cat = cat_for_splits([x, u], 2)
    # Chunk 0 = x[:2] + u[:4], chunk 1 = x[2:] + u[4:].
    assert cat.tolist() == [0, 1, 10, 11, 12, 13, 2, 3, 14, 15, 16, 17]
    back = split_from_splits(cat, [4, 8], 2)
    assert torch.equal(back[0], x) and torch.equal(back[1], u)
    with pytest.raises(ValueError, match="not divisible by num_splits=3"):
        cat_for_splits([x, u], 3)


def test_fixmatch_shuffle_bn_student_forward_is_interleaved_per_split():
    method = make("fixmatch", "shuffle_bn")
    calls = _record_calls(method.student)
    batch = make_batch(method)
    method.training_step(batch, 0)
    assert torch.equal(calls[0], cat_for_splits([batch["x"], batch["u_s"]], 2))


# -- the teacher ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["moco", "byol", "dino", "fixmatch", "meanteacher"])
def test_eman_teacher_output_is_independent_of_batch_mates(name):
    method = make(name, "eman")
    train(method)
    method.train()
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(1, *IMAGE, generator=gen)
    mates_a = torch.randn(3, *IMAGE, generator=gen)
    mates_b = torch.randn(3, *IMAGE, generator=gen) * 5 + 3
    out_a = method.teacher_forward(torch.cat([sample, mates_a]))[0]
    out_b = method.teacher_forward(torch.cat([mates_b, sample]))[-1]
    torch.testing.assert_close(out_a, out_b)


def test_bn_teacher_does_depend_on_batch_mates():
    """The control for the test above: a BN-mode teacher uses batch statistics."""
    method = make("fixmatch", "bn")
    method.train()
    sample = torch.randn(1, *IMAGE)
    out_a = method.teacher_forward(torch.cat([sample, torch.randn(3, *IMAGE)]))[0]
    out_b = method.teacher_forward(torch.cat([sample, torch.randn(3, *IMAGE) * 5 + 3]))[0]
    assert not torch.allclose(out_a, out_b)


@pytest.mark.parametrize(("name", "norm"), [(n, m) for n, m in VALID if METHODS[n].NORMS != ("default",)])
def test_gradient_never_reaches_the_teacher(name, norm):
    method = make(name, norm)
    method.train()
    loss, _ = method(make_batch(method), 0)
    loss.backward()
    for teacher in (method.teacher, getattr(method, "eval_ema", None)):
        if teacher is None:
            continue
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    trainable = {id(p) for g in method.parameter_groups(0.0) for p in g["params"]}
    for teacher in (method.teacher, getattr(method, "eval_ema", None)):
        if teacher is not None:
            assert not trainable & {id(p) for p in teacher.parameters()}
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["byol", "fixmatch", "meanteacher"])
def test_after_step_moves_the_teacher_by_eq1(name):
    method = make(name, "eman", momentum=0.8)
    train(method, steps=1)
    t = {k: v.clone() for k, v in method.teacher.module.state_dict().items()}
    s = method.teacher_source().state_dict()
    method.after_step(3, 10)
    m = cosine_momentum(0.8, 3, 10) if name == "byol" else 0.8
    assert method.current_momentum == pytest.approx(m)
    new = method.teacher.module.state_dict()
    for key, value in new.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, m * t[key] + (1 - m) * s[key])


def test_momentum_warmup_is_an_explicit_option():
    method = make("fixmatch", "eman", momentum=0.99)
    assert method.momentum_at(0, 100) == 0.99
    method = make("fixmatch", "eman", momentum=0.99, momentum_warmup=True)
    assert method.momentum_at(0, 100) == warmup_momentum(0.99, 0) == 0.0
    assert method.momentum_at(3, 100) == pytest.approx(0.75)
    assert method.momentum_at(1000, 2000) == 0.99


def test_byol_momentum_follows_the_cosine_schedule():
    method = make("byol", "eman", momentum=0.9)
    for step, total in [(0, 10), (5, 10), (9, 10), (10, 10)]:
        method.after_step(step, total)
        assert method.current_momentum == pytest.approx(cosine_momentum(0.9, step, total))
    assert method.momentum_at(0, 10) == pytest.approx(0.9)
    assert method.momentum_at(10, 10) == pytest.approx(1.0)


def test_teacher_update_after_moving_the_method():
    """``.to()`` replaces buffers; the teacher must keep updating the live ones."""
    method = make("fixmatch", "eman", momentum=0.5)
    method.double()
    method.train()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in make_batch(method).items()}
    method(batch, 0)[0].backward()
    method.after_step(0, 10)
    t = method.teacher.module.backbone.norm.running_mean
    s = method.student.backbone.norm.running_mean
    assert t.dtype == torch.float64 and torch.count_nonzero(t) > 0
    torch.testing.assert_close(t, 0.5 * s)  # teacher started at 0, student moved once


# -- MoCo -------------------------------------------------------------------------------------
def test_moco_queue_pointer_advances_and_wraps():
    method = make("moco", "eman", queue_size=3 * B)
    method.train()
    assert method.queue.shape == (3 * B, 4) and int(method.queue_ptr) == 0
    keys_seen = []
    method.teacher.register_forward_hook(lambda _m, _a, out: keys_seen.append(out.detach().clone()))
    for step in range(4):
        method.training_step(make_batch(method, seed=step), step)
        assert int(method.queue_ptr) == step * B % (3 * B)  # the keys wait for after_step
        method.after_step(step, 10)
        assert int(method.queue_ptr) == (step + 1) * B % (3 * B)
    # After 4 steps the first slot holds the keys of step 3 (wrapped), slots 1-2 those of steps 1-2.
    expected = torch.nn.functional.normalize(keys_seen[3], dim=1)
    torch.testing.assert_close(method.queue[:B], expected)
    torch.testing.assert_close(method.queue[B:2 * B], torch.nn.functional.normalize(keys_seen[1], dim=1))


def test_moco_symmetric_enqueues_both_views():
    method = make("moco", "eman", queue_size=4 * B, symmetric=True)
    method.training_step(make_batch(method), 0)
    method.after_step(0, 10)
    assert int(method.queue_ptr) == 2 * B


def test_moco_queue_must_be_a_multiple_of_the_batch():
    method = make("moco", "eman", queue_size=10)
    message = r"queue_size 10 must be a multiple of the global key batch 4 \(e.g. 8 or 12\)"
    with pytest.raises(ValueError, match=message):
        method.training_step(make_batch(method), 0)


def test_moco_updates_teacher_before_the_key_forward():
    method = make("moco", "eman")
    order: list[str] = []
    update = method.teacher.update
    method.teacher.update = lambda *a, **k: (order.append("update"), update(*a, **k))[1]
    method.teacher.register_forward_pre_hook(lambda *_: order.append("key forward"))
    method.student.register_forward_pre_hook(lambda *_: order.append("query forward"))
    method.training_step(make_batch(method), 0)
    assert order == ["query forward", "update", "key forward"]
    # after_step does not update a second time.
    method.after_step(0, 10)
    assert order.count("update") == 1


def test_moco_logs_the_info_nce_and_top1_of_a_case_worked_by_hand():
    """Queries, keys and queue built by hand (the network's outputs replaced): query ``i`` is the
    unit vector ``e_i``, its key is ``e_i`` too except key 0, which is ``(e_0 + e_1) / sqrt 2``; the
    queue holds ``e_0`` and rows at 0.5 from every query. Query 0's positive (0.71) loses to the
    queue's ``e_0`` (1.0), the other three win: top-1 is 3/4, and the loss is the cross-entropy of
    these logits. The student must see view1 and the teacher view2."""
    method = make("moco", "eman")  # dim 4 = B, queue of 8
    batch = make_batch(method)
    eye = torch.eye(B)
    queries = eye.clone()
    keys = eye.clone()
    keys[0] = torch.nn.functional.normalize(eye[0] + eye[1], dim=0)
    with torch.no_grad():
        method.queue.copy_(torch.full((8, B), 0.5))
        method.queue[0] = eye[0]

    def student_hook(_module, inputs, _out):
        assert torch.equal(inputs[0], batch["view1"])
        return queries

    def teacher_forward(x: torch.Tensor) -> torch.Tensor:
        assert torch.equal(x, batch["view2"])
        return keys

    method.student.register_forward_hook(student_hook)
    method.teacher_forward = teacher_forward
    _, logs = method.training_step(batch, 0)
    assert logs["acc"].item() == 0.75
    temperature = method.options["temperature"]
    rows = [[2 ** -0.5, 1.0, *[0.5] * 7]] + [[1.0, 0.0, *[0.5] * 7]] * 3  # [positive, queue...] per query
    expected = sum(-math.log(math.exp(r[0] / temperature) / sum(math.exp(v / temperature) for v in r))
                   for r in rows) / B
    assert logs["loss"].item() == pytest.approx(expected, rel=1e-5)


# -- BYOL -------------------------------------------------------------------------------------
def test_byol_parameter_groups_exclude_bias_and_every_norm_param_including_predictor():
    method = make("byol", "bn")
    groups = {g["name"]: g for g in method.parameter_groups(1e-6)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lars_exclude"] is True
    predictor_bn = [m for m in method.predictor.modules() if isinstance(m, nn.BatchNorm1d)]
    assert predictor_bn
    for layer in predictor_bn:
        assert id(layer.weight) in no_decay and id(layer.bias) in no_decay
    assert id(method.student.backbone.conv.bias) in no_decay
    assert id(method.student.backbone.conv.weight) not in no_decay
    linear_weights = [m.weight for m in method.predictor.modules() if isinstance(m, nn.Linear)]
    assert all(id(w) in {id(p) for p in groups["decay"]["params"]} for w in linear_weights)


def test_byol_gn_converts_heads_too():
    method = make("byol", "gn")
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in method.modules())


def test_byol_loss_is_symmetric_regression():
    method = make("byol", "eman")
    method.train()
    batch = make_batch(method)
    loss, _ = method.training_step(batch, 0)
    swapped, _ = method.training_step({"view1": batch["view2"], "view2": batch["view1"]}, 0)
    torch.testing.assert_close(loss, swapped)
    assert 0.0 <= loss.item() <= 8.0


# -- Mean Teacher / supervised ----------------------------------------------------------------
def test_meanteacher_consistency_ramps_up():
    method = make("meanteacher", "eman", consistency=10.0, rampup_steps=4)
    assert method.consistency_weight(0) == pytest.approx(10.0 * math.exp(-5.0))
    assert method.consistency_weight(4) == pytest.approx(10.0)
    assert method.consistency_weight(100) == pytest.approx(10.0)
    method.train()
    logs = logs_to_floats(method.training_step(make_batch(method), 4)[1])
    assert logs["weight_c"] == 10.0 and "teacher_acc_u" in logs


def test_supervised_teacher_is_the_student():
    method = make("supervised", "bn")
    assert method.teacher is None
    assert method.encoder("teacher") is method.student.backbone is method.encoder("student")
    assert method.classifier("teacher") is method.student
    assert method.unlabeled_views == {} and method.labeled_views == {"x": "weak"}
    with pytest.raises(ValueError, match="which must be one of teacher, student"):
        method.encoder("ema")


# -- state round trip -------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "norm"), [
    ("moco", "shuffle_bn"), ("moco", "eman"), ("byol", "eman"), ("dino", "eman"), ("fixmatch", "default"),
    ("fixmatch", "eman"), ("meanteacher", "teacher_pn"), ("supervised", "bn"),
])
def test_state_dict_round_trip(name, norm):
    options = {"queue_size": 3 * B} if name == "moco" else {}  # 2 steps must not wrap the queue
    torch.manual_seed(0)
    method = make(name, norm, **options)
    train(method)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    fresh = make(name, norm, **options)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    a, b = method.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if name == "moco":
        assert "queue" in a and "queue_ptr" in a and int(a["queue_ptr"]) != 0
    # The restored teacher gives the same features.
    method.eval()
    fresh.eval()
    x = torch.randn(3, *IMAGE)
    torch.testing.assert_close(method.encoder("teacher")(x), fresh.encoder("teacher")(x))
    # The restored teacher updates its live tensors.
    fresh.train()
    torch.manual_seed(2)
    train(fresh, steps=1)


def test_method_logs_are_0d_tensors_and_forward_is_training_step():
    method = make("fixmatch", "eman")
    batch = make_batch(method)
    torch.manual_seed(0)
    loss_a, logs_a = method(batch, 0)
    torch.manual_seed(0)
    loss_b, logs_b = method.training_step(batch, 0)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs_a.values())
    assert logs_to_floats(logs_a) == logs_to_floats(logs_b)
    torch.testing.assert_close(loss_a, loss_b)


# -- two processes (gloo, CPU) ------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights and queue on both ranks
        out = {}
        for name, norm in [("moco", "shuffle_bn"), ("fixmatch", "shuffle_bn"), ("fixmatch", "align")]:
            options = {"queue_size": 4 * B * world} if name == "moco" else {}
            if norm == "align":
                norm, options = "eman", {"distribution": "align"}
            method = make(name, norm, **options)
            assert method.plan.num_splits == 1  # real per-rank BN, no split emulation
            model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
            opt = torch.optim.SGD(method.parameter_groups(0.0), lr=0.05)
            for step in range(2):
                loss, _ = model(make_batch(method, seed=10 * rank + step), step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                method.after_step(step, 10)
            out[name + norm + str(options)] = {k: v.clone() for k, v in method.state_dict().items()
                                                if k in ("queue", "queue_ptr", "class_prior")}
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~9 CPU-seconds
@pytest.mark.distributed
def test_two_ranks_share_queue_and_prior_and_shuffle_across_ranks():
    results = spawn_ranks(_ddp_worker, 2)
    for key, state in results[0].items():
        for name, value in state.items():
            assert torch.equal(value, results[1][key][name]), (key, name)
    moco = next(v for k, v in results[0].items() if k.startswith("moco"))
    assert int(moco["queue_ptr"]) == 2 * 2 * B  # 2 steps x 2 ranks x B keys


@pytest.mark.slow  # compiling: ~5 CPU-seconds
def test_moco_trains_under_torch_compile_like_eager():
    """The compiled step must not read a buffer it writes: MoCo enqueues in after_step (#7)."""
    torch.manual_seed(0)
    eager = make("moco", "eman", queue_size=4 * B)
    compiled = copy.deepcopy(eager)
    step_fn = torch.compile(compiled)  # inductor, as `--compile`; aot_eager does not show the bug
    for method, fn in ((eager, eager), (compiled, step_fn)):
        method.train()
        opt = torch.optim.SGD(method.parameter_groups(0.0), lr=0.05)
        for step in range(2):
            loss, _ = fn(make_batch(method, seed=step), step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step, 10)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, msg=key)
    assert int(compiled.queue_ptr) == 2 * B
