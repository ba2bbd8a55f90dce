"""inspect_teacher and `emanorm doctor`: one hand-made broken teacher per finding."""

import copy
from dataclasses import asdict

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from emanorm import EMATeacher, inspect_teacher
from emanorm.cli import main
from emanorm.data import dataset_info
from emanorm.teacher_check import find_teacher_pair
from emanorm.train import resolve_config
from emanorm.train.restore import make_method
from test_teacher import make_student, train_student_steps


def trained_pair():
    student = make_student()
    teacher = EMATeacher(student, momentum=0.9)
    train_student_steps(student)
    teacher.update(student)
    return student, teacher


def kinds(report):
    return sorted(f.kind for f in report.findings)


def test_healthy_teacher_has_no_findings_and_a_lag():
    student, teacher = trained_pair()
    report = inspect_teacher(student, teacher)
    assert report.ok and kinds(report) == []
    assert 0 < report.parameter_lag < 1 and 0 < report.statistics_lag < 1
    assert "no problems found" in report.format()
    exact = inspect_teacher(student, copy.deepcopy(student).eval().requires_grad_(False))
    assert exact.parameter_lag == 0 and exact.statistics_lag == 0


def test_statistics_never_averaged():
    student, _ = trained_pair()
    teacher = make_student().eval().requires_grad_(False)  # fresh BN buffers: 0 / 1
    weights = {k: v for k, v in student.state_dict().items() if "running" not in k}
    teacher.load_state_dict(weights, strict=False)
    report = inspect_teacher(student, teacher)
    assert kinds(report) == ["stale_statistics"]
    assert report.findings[0].names == ("1", "4")


def test_batch_norm_in_training_mode():
    student, _ = trained_pair()
    teacher = copy.deepcopy(student).requires_grad_(False).train()
    assert kinds(inspect_teacher(student, teacher)) == ["batch_statistics"]
    # the BN baseline of EMATeacher uses batch statistics by design
    assert inspect_teacher(student, EMATeacher(student, norm="bn").train()).ok


def test_teacher_parameters_with_requires_grad():
    student, _ = trained_pair()
    teacher = copy.deepcopy(student).eval()
    report = inspect_teacher(student, teacher)
    assert kinds(report) == ["requires_grad"] and len(report.findings[0].names) == 10


@pytest.mark.parametrize("layer", [nn.Dropout(0.3), StochasticDepth(0.2, "row")])
def test_active_dropout(layer):
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), layer, nn.Linear(4, 2)).eval()
    teacher = copy.deepcopy(student).requires_grad_(False)
    teacher[2].train()
    assert kinds(inspect_teacher(student, teacher)) == ["dropout"]
    assert inspect_teacher(student, EMATeacher(student).train()).ok  # EMATeacher: never stochastic


def test_mismatched_pair_and_mixed_arguments():
    report = inspect_teacher(make_student().state_dict(), make_student("gn").state_dict())
    assert "mismatch" in kinds(report)
    with pytest.raises(TypeError, match="two modules or two state dicts"):
        inspect_teacher(make_student(), make_student().state_dict())


def test_state_dicts_of_other_code_bases():
    student, teacher = trained_pair()
    s, t = student.state_dict(), teacher.module.state_dict()
    timm_style = {"state_dict": s, "state_dict_ema": t, "epoch": 3}
    moco_style = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in s.items()},
                                 **{f"module.encoder_k.{k}": v for k, v in t.items()}}}
    for checkpoint in (timm_style, moco_style):
        found_s, found_t, _ = find_teacher_pair(checkpoint)
        assert inspect_teacher(found_s, found_t).ok
    custom = {f"net.{k}": v for k, v in s.items()} | {f"ema.{k}": v for k, v in t.items()}
    found_s, found_t, where = find_teacher_pair(custom, student_prefix="net.", teacher_prefix="ema.")
    assert found_s.keys() == s.keys() and "prefixes" in where
    with pytest.raises(ValueError, match="--student-prefix"):
        find_teacher_pair({"weights": s})


def test_doctor_command(tmp_path, capsys):
    student, teacher = trained_pair()
    stale = make_student().state_dict()  # an EMA that never received the statistics
    torch.save({"state_dict": student.state_dict(), "state_dict_ema": stale}, tmp_path / "broken.pth")
    assert main(["doctor", str(tmp_path / "broken.pth")]) == 1
    out = capsys.readouterr().out
    assert "entries 'state_dict' and 'state_dict_ema'" in out and "stale_statistics" in out
    torch.save({"state_dict": student.state_dict(), "state_dict_ema": teacher.module.state_dict()},
               tmp_path / "good.pth")
    assert main(["doctor", str(tmp_path / "good.pth")]) == 0
    torch.save({"weights": student.state_dict()}, tmp_path / "odd.pth")
    assert main(["doctor", str(tmp_path / "odd.pth")]) == 2
    assert "no student / teacher pair" in capsys.readouterr().err
    assert main(["doctor", str(tmp_path / "missing")]) == 2


def test_doctor_on_an_emanorm_checkpoint(tmp_path, capsys):
    cfg = resolve_config(None, {"method": "fixmatch", "norm": "eman", "device": "cpu"})
    info = dataset_info(cfg["dataset"])
    method = make_method(cfg, info, distributed=False)
    state = method.state_dict()
    for key in state:  # a teacher that never received the student's statistics
        if key.startswith("teacher.") and key.endswith("running_mean"):
            state[key] = torch.zeros_like(state[key])
        elif key.startswith("student.") and key.endswith("running_mean"):
            state[key] = torch.ones_like(state[key])
    path = tmp_path / "last.pt"
    torch.save({"config": cfg, "method": state, "dataset_info": asdict(info)}, path)
    assert main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert "emanorm fixmatch run, teacher mode 'eman'" in out and "stale_statistics" in out


def test_non_finite_tensors_are_problems_named_on_either_side():
    student, teacher = trained_pair()
    s_state, t_state = student.state_dict(), copy.deepcopy(teacher.module.state_dict())
    t_state["0.weight"] = torch.full_like(t_state["0.weight"], float("nan"))
    report = inspect_teacher(s_state, t_state)
    assert kinds(report) == ["non_finite"] and report.findings[0].names == ("teacher 0.weight",)
    bad_student = {**s_state, "1.running_var": torch.full_like(s_state["1.running_var"], float("inf"))}
    report = inspect_teacher(bad_student, teacher.module.state_dict())
    assert kinds(report) == ["non_finite"] and report.findings[0].names == ("student 1.running_var",)


def test_nothing_compared_is_a_problem():
    ints = {"a": torch.arange(3), "b": torch.ones(2, dtype=torch.int64)}
    report = inspect_teacher(ints, {k: v.clone() for k, v in ints.items()})
    assert kinds(report) == ["nothing_compared"] and report.compared == 0
    complex_state = {"z": torch.ones(3, dtype=torch.complex64)}
    assert kinds(inspect_teacher(complex_state, complex_state)) == ["nothing_compared"]


def test_a_lag_no_ema_produces_is_flagged():
    student, teacher = trained_pair()
    far = {k: v * 50 if k.endswith("weight") else v for k, v in teacher.module.state_dict().items()}
    report = inspect_teacher(student.state_dict(), far)
    assert kinds(report) == ["implausible_lag"] and report.parameter_lag > 1
