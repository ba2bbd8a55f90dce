"""The mode table, the free update function, never-stochastic teachers, the BN-free warning."""

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.ops import StochasticDepth

from emanorm import NORM_MODES, TEACHER_MODES, EMATeacher, NoBatchNormWarning, ema_update_
from test_teacher import make_student, train_student_steps


def test_mode_table_lists_every_mode_in_order():
    assert NORM_MODES == ("eman", "bn", "student_pn", "teacher_pn") == tuple(TEACHER_MODES)
    assert [m.statistics for m in TEACHER_MODES.values()] == ["average", "batch", "copy", "previous"]
    assert [m.batch_statistics for m in TEACHER_MODES.values()] == [False, True, False, False]
    assert [m.update_rule for m in TEACHER_MODES.values()] == ["average", "keep", "copy", "keep"]


@pytest.mark.parametrize(("norm", "rule"), [("eman", "average"), ("student_pn", "copy"), ("bn", "keep")])
def test_free_function_is_the_teachers_update_bitwise(norm, rule):
    student = make_student()
    teacher = EMATeacher(student, norm=norm, momentum=0.9)
    plain = copy.deepcopy(student)
    for step in range(3):
        train_student_steps(student, steps=1, seed=step)
        teacher.update(student, momentum=0.9 - 0.1 * step)
        ema_update_(plain, student, 0.9 - 0.1 * step, statistics=rule)
    for (name, a), b in zip(teacher.module.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_free_function_buffer_momentum_and_errors():
    student, plain = make_student(), make_student()
    before = {k: v.clone() for k, v in plain.named_buffers()}
    train_student_steps(student)
    ema_update_(plain, student, 0.999, buffer_momentum=0.5)
    expected = 0.5 * before["1.running_mean"] + 0.5 * student[1].running_mean
    torch.testing.assert_close(plain[1].running_mean, expected)
    with pytest.raises(ValueError, match="average, copy, keep"):
        ema_update_(plain, student, 0.9, statistics="mix")
    with pytest.raises(ValueError, match="differ"):
        ema_update_(plain, make_student("gn"), 0.9)


def test_eman_is_averaged_model_with_buffers_in_eval_mode():
    """EMAN in standard terms: swa_utils.AveragedModel(use_buffers=True), EMA averaging, eval()."""
    student = make_student()
    teacher = EMATeacher(student, norm="eman", momentum=0.9)
    averaged = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    averaged.update_parameters(student)  # the first call copies, as EMATeacher's deep copy does
    x = torch.randn(5, 3, 6, 6)
    for step in range(4):
        train_student_steps(student, steps=1, seed=step)
        teacher.update(student)
        averaged.update_parameters(student)
        averaged.eval()
        teacher.train()  # EMAN normalises with running statistics even in training mode
        assert torch.equal(teacher(x), averaged(x))
    ours, theirs = teacher.module.state_dict(), averaged.module.state_dict()
    # every floating tensor equal bitwise; AveragedModel also "averages" the integer step counter
    for name, value in ours.items():
        if value.is_floating_point():
            assert torch.equal(value, theirs[name]), name


class DropPath(nn.Module):
    """Stands in for timm's DropPath where timm is not installed (same rule: active in training)."""

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1))) > 0.5).to(x.dtype)
        return x * keep / 0.5


def _drop_path() -> nn.Module:
    if importlib.util.find_spec("timm") is not None:
        from timm.layers import DropPath as TimmDropPath

        return TimmDropPath(0.5)
    return DropPath()


STOCHASTIC = {
    "dropout": lambda: nn.Dropout(0.5),
    "timm_drop_path": _drop_path,
    "stochastic_depth": lambda: StochasticDepth(0.5, "row"),
}


@pytest.mark.parametrize("layer", list(STOCHASTIC))
@pytest.mark.parametrize("norm", NORM_MODES)
def test_teacher_is_never_stochastic(norm, layer):
    student = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), STOCHASTIC[layer](), nn.Linear(8, 3))
    teacher = EMATeacher(student, norm=norm)
    parent = nn.ModuleDict({"student": student, "teacher": teacher})
    parent.train()
    x = torch.randn(16, 6)
    torch.manual_seed(0)
    first = teacher(x)
    torch.manual_seed(1)
    assert torch.equal(first, teacher(x)) or norm == "teacher_pn"  # PN moves its statistics per forward
    assert not teacher.module[2].training
    assert teacher.module[1].training == (norm == "bn")  # in mode bn only BN uses the batch
    teacher.module.train()  # even a direct .train() on the module is undone at the next forward
    teacher(x)
    assert not teacher.module[2].training


def test_warning_on_models_without_batch_norm():
    for norm in ("eman", "teacher_pn", "student_pn"):
        with pytest.warns(NoBatchNormWarning, match=r"no BatchNorm.*plain EMA"):
            EMATeacher(make_student("gn"), norm=norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMATeacher(make_student("gn"), norm="bn")  # the BN baseline: nothing to warn about
        for norm in NORM_MODES:
            EMATeacher(make_student("bn"), norm=norm)
    assert issubclass(NoBatchNormWarning, UserWarning)
