"""EMATeacher: the contract of the foundation issue, clause by clause."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from emanorm import EMATeacher, cosine_momentum, warmup_momentum


def make_student(norm: str = "bn") -> nn.Module:
    layers = {
        "bn": lambda c: nn.BatchNorm2d(c),
        "gn": lambda c: nn.GroupNorm(2, c),
        "none": lambda c: nn.Identity(),
    }
    make_norm = layers[norm]
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        make_norm(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        make_norm(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def train_student_steps(student: nn.Module, steps: int = 3, seed: int = 0) -> None:
    """Change the student's parameters and BN statistics like training would."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=gen) * 2 + 1
        loss = student(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_deep_copy_frozen_and_no_grad_outputs():
    student = make_student()
    teacher = EMATeacher(student)
    assert teacher.module is not student
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for p_s, p_t in zip(student.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(p_s, p_t) and p_s.data_ptr() != p_t.data_ptr()
    out = teacher(torch.randn(2, 3, 6, 6, requires_grad=True))
    assert not out.requires_grad


@pytest.mark.parametrize("norm", ["eman", "bn", "student_pn", "teacher_pn"])
def test_parameters_follow_eq1_exactly(norm):
    student = make_student()
    teacher = EMATeacher(student, norm=norm, momentum=0.9)
    before = {k: v.clone() for k, v in teacher.module.named_parameters()}
    train_student_steps(student)
    teacher.update(student)
    for name, s in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * s.detach()
        torch.testing.assert_close(
            dict(teacher.module.named_parameters())[name], expected, rtol=1e-6, atol=1e-7
        )
    # an explicit momentum overrides the constructor's
    snapshot = {k: v.clone() for k, v in teacher.module.named_parameters()}
    teacher.update(student, momentum=0.5)
    for name, s in student.named_parameters():
        expected = 0.5 * snapshot[name] + 0.5 * s.detach()
        torch.testing.assert_close(
            dict(teacher.module.named_parameters())[name], expected, rtol=1e-6, atol=1e-7
        )


def _stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers() if k.endswith(("running_mean", "running_var"))}


def test_eman_statistics_follow_eq9_with_parameter_momentum_by_default():
    student = make_student()
    teacher = EMATeacher(student, norm="eman", momentum=0.8)
    before = _stats(teacher.module)
    train_student_steps(student)
    teacher.update(student)
    after, s = _stats(teacher.module), _stats(student)
    assert before.keys() == after.keys() and len(after) == 4
    for name in after:
        torch.testing.assert_close(after[name], 0.8 * before[name] + 0.2 * s[name], rtol=1e-6, atol=1e-7)


def test_eman_buffer_momentum_separate_from_parameters():
    student = make_student()
    teacher = EMATeacher(student, norm="eman", momentum=0.999, buffer_momentum=0.5)
    before = _stats(teacher.module)
    train_student_steps(student)
    teacher.update(student)
    s = _stats(student)
    for name, value in _stats(teacher.module).items():
        torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * s[name], rtol=1e-6, atol=1e-7)


def test_integer_buffers_are_copied():
    student = make_student()
    teacher = EMATeacher(student)
    train_student_steps(student, steps=5)
    teacher.update(student)
    counts = {k: v for k, v in teacher.module.named_buffers() if k.endswith("num_batches_tracked")}
    assert counts and all(int(v) == 5 for v in counts.values())


def test_eman_is_batch_independent_even_after_parent_train():
    student = make_student()
    train_student_steps(student)
    teacher = EMATeacher(student, norm="eman")
    teacher.update(student, momentum=0.0)  # teacher == student, statistics included
    parent = nn.ModuleDict({"student": student, "teacher": teacher})
    parent.train()  # a parent's .train() must not switch the teacher's BN to batch statistics
    x = torch.randn(6, 3, 6, 6)
    stats_before = _stats(teacher.module)
    alone = teacher(x[:1])
    together = teacher(x)[:1]
    torch.testing.assert_close(alone, together)
    # a teacher forward never changes the statistics
    for name, value in _stats(teacher.module).items():
        assert torch.equal(value, stats_before[name])
    # even someone calling teacher.module.train() directly does not bring batch statistics back
    teacher.module.train()
    torch.testing.assert_close(teacher(x[:1]), together)
    # and the output equals the student's own inference output (Eq. 8 with copied statistics)
    student.eval()
    torch.testing.assert_close(together, student(x[:1]))


def test_bn_mode_uses_batch_statistics_and_own_running_stats():
    student = make_student()
    teacher = EMATeacher(student, norm="bn", bn_momentum=0.5)
    teacher.train()
    x = torch.randn(6, 3, 6, 6) * 3 + 2
    assert not torch.allclose(teacher(x[:2])[:1], teacher(x)[:1])
    train_student_steps(student)
    before = _stats(teacher.module)
    teacher.update(student)
    for name, value in _stats(teacher.module).items():  # parameters only: statistics untouched
        assert torch.equal(value, before[name])
    assert not any(torch.equal(v, _stats(student)[k]) for k, v in before.items() if "mean" in k)


def test_student_pn_copies_statistics():
    student = make_student()
    teacher = EMATeacher(student, norm="student_pn", momentum=0.99)
    train_student_steps(student)
    teacher.update(student)
    s = _stats(student)
    for name, value in _stats(teacher.module).items():
        assert torch.equal(value, s[name])
    teacher.train()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(teacher(x[:1]), teacher(x)[:1])


def test_teacher_pn_normalizes_with_previous_stats_then_updates():
    student = make_student()
    teacher = EMATeacher(student, norm="teacher_pn", bn_momentum=0.1)
    teacher.train()
    bn = teacher.module[1]
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    # the output must be what eval-mode BN with the statistics before the forward gives
    reference = copy.deepcopy(teacher.module).eval()
    expected = reference(x)
    with torch.no_grad():
        pre_bn = teacher.module[0](x)
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    out = teacher(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bn.running_mean, 0.9 * old_mean + 0.1 * pre_bn.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.9 * old_var + 0.1 * pre_bn.var(dim=(0, 2, 3), unbiased=True))
    # statistics are the teacher's own: an update leaves them alone
    train_student_steps(student)
    kept = _stats(teacher.module)
    teacher.update(student)
    for name, value in _stats(teacher.module).items():
        assert torch.equal(value, kept[name])


@pytest.mark.parametrize("norm", ["eman", "bn", "student_pn", "teacher_pn"])
@pytest.mark.parametrize("layer", ["gn", "none"])
def test_models_without_batchnorm_work_in_every_mode(norm, layer):
    student = make_student(layer)
    teacher = EMATeacher(student, norm=norm, momentum=0.5)
    start = [p.detach().clone() for p in student.parameters()]
    train_student_steps(student)
    teacher.update(student)
    # no statistics to treat: every mode is the plain EMA of the weights, teacher = 0.5 start + 0.5 student
    for begun, now, averaged in zip(start, student.parameters(), teacher.module.parameters(), strict=True):
        assert not torch.equal(begun, now)
        torch.testing.assert_close(averaged, 0.5 * begun + 0.5 * now.detach())
    x = torch.randn(2, 3, 6, 6)
    assert teacher(x).shape == (2, 3)
    torch.testing.assert_close(teacher(x[:1]), teacher(x)[:1])  # no batch statistics anywhere


def test_unknown_mode_and_bad_momentum_raise():
    with pytest.raises(ValueError, match="eman, bn, student_pn, teacher_pn"):
        EMATeacher(make_student(), norm="shuffle")
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(make_student(), momentum=1.5)
    teacher = EMATeacher(make_student())
    with pytest.raises(ValueError, match="momentum"):
        teacher.update(make_student(), momentum=-0.1)


def test_mismatched_student_fails_loudly():
    teacher = EMATeacher(make_student())
    with pytest.raises(ValueError, match="differ"):
        teacher.update(make_student("gn"))
    wider = make_student()
    wider[-1] = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="shape"):
        teacher.update(wider)


def test_update_uses_fused_foreach_ops(monkeypatch):
    calls = []
    original = torch._foreach_lerp_

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", spy)
    student = make_student()
    teacher = EMATeacher(student)
    teacher.update(student)
    n_params = len(list(student.parameters()))
    assert calls[0] == n_params  # one fused call over all parameters, not one per tensor
    assert len(calls) == 2  # parameters, then BN statistics


def test_state_dict_round_trip():
    student = make_student()
    teacher = EMATeacher(student, norm="eman", momentum=0.9)
    train_student_steps(student)
    teacher.update(student)
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    buffer.seek(0)
    restored = EMATeacher(make_student(), norm="eman", momentum=0.9)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(restored(x), teacher(x))
    # updates keep working after loading (the cached tensor lists point at live tensors)
    restored.update(student)
    teacher.update(student)
    torch.testing.assert_close(restored(x), teacher(x))


def test_works_through_ddp_style_wrappers():
    student = make_student()
    teacher = EMATeacher(student)

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner  # what torch.compile's OptimizedModule exposes

    train_student_steps(student)
    teacher.update(Wrapper(student), momentum=0.0)
    for p_s, p_t in zip(student.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(p_s, p_t)


def test_cosine_and_warmup_momentum():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    assert warmup_momentum(0.999, 0) == 0.0
    assert warmup_momentum(0.999, 9) == pytest.approx(0.9)
    assert warmup_momentum(0.999, 10**6) == 0.999
    with pytest.raises(ValueError):
        cosine_momentum(0.99, 1, 0)


def test_teacher_pn_statistics_untouched_by_evaluation_passes():
    student = make_student()
    teacher = EMATeacher(student, norm="teacher_pn")
    teacher.train()
    before = _stats(teacher.module)
    teacher.module.eval()
    teacher.module(torch.randn(4, 3, 6, 6))  # an evaluation pass over the backbone
    teacher.eval()
    teacher(torch.randn(4, 3, 6, 6))  # an eval-mode forward through the wrapper
    for name, value in _stats(teacher.module).items():
        assert torch.equal(value, before[name])


def test_update_after_moving_the_teacher():
    """.to()/.double() replace tensors; the fused lists must follow them."""
    student = make_student()
    teacher = EMATeacher(student, momentum=0.5)
    teacher.double()
    student.double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    for p_t in teacher.module.parameters():
        assert p_t.dtype == torch.float64
    teacher.float()
    student.float()
    teacher.update(student, momentum=0.0)
    for p_s, p_t in zip(student.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(p_s, p_t)
