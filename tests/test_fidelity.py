"""Faithful at scale: gradient accumulation is the same optimisation as one step on the whole batch,
and a training step never reads a value back from the device."""

from __future__ import annotations

import pytest
import torch

import test_methods as _methods_tests  # tests/ is on the path, as for conftest
from conftest import HANG_BOUND_S, run_two_rank_script
from emanorm.methods import Method
from emanorm.methods.tensors import logs_to_floats
from emanorm.train import train_step
from emanorm.train.finite import FiniteWatch, NonFiniteLossError

make, make_batch = _methods_tests.make, _methods_tests.make_batch
_one_thread = _methods_tests._one_thread

#: Every EMA-teacher method (and FixMatch's teacher-free form, and the supervised baseline) with a
#: BatchNorm-free backbone; DINO with clipping on and its last layer frozen in epoch 0; MoCo v3 (no
#: ``gn`` norm of its own) with every BatchNorm, its MLP heads' included, made GroupNorm.
BN_FREE = {
    "moco": {"norm": "gn"},
    "byol": {"norm": "gn"},
    "fixmatch": {"norm": "gn"},
    "fixmatch-default": {"norm": "default", "gn": True},
    "meanteacher": {"norm": "gn"},
    "dino": {"norm": "gn", "clip_grad": 0.05, "freeze_last_layer_epochs": 1},
    "mocov3": {"norm": "default", "gn_everywhere": True},
    "supervised": {"norm": "gn"},  # the labeled-only baseline: no teacher, plain cross-entropy
}

#: The cases where ``--accumulate N`` is exactly one step on the whole batch: not MoCo v3, whose
#: in-batch InfoNCE takes each micro-batch's keys as its negatives (as MoCo v3's own code would).
ACCUMULATION_EXACT = [case for case in BN_FREE if case != "mocov3"]


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def build(case: str) -> Method:
    options = dict(BN_FREE[case])
    name, norm = case.split("-")[0], options.pop("norm")
    if options.pop("gn", False):  # FixMatch's own form with a GN backbone
        torch.manual_seed(0)
        method = make(name, norm, **options)
        _methods_tests.convert_norm(method.student, "gn")
        if method.eval_ema is not None:
            method.eval_ema = method.make_teacher(method.student, mode="eman")
        return method
    if options.pop("gn_everywhere", False):  # backbone, projector and predictor; a GN teacher again
        torch.manual_seed(0)
        method = make(name, norm, **options)
        _methods_tests.convert_norm(method, "gn")
        method.teacher = method.make_teacher(method.student)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules())
        return method
    torch.manual_seed(0)
    return make(name, norm, **options)


def run_steps(
    method: Method, accumulate: int, steps: int = 3, batch_scale: int = 2, *,
    wrapper: torch.nn.Module | None = None, wrapper_as_method: bool = False, shard: tuple[int, int] = (0, 1),
) -> list[torch.Tensor]:
    """``steps`` train_steps of batches of ``batch_scale`` x the tests' size; returns the losses.

    ``wrapper`` (a DDP of ``method``) runs the step (as ``step_fn``, or as ``method`` itself with
    ``wrapper_as_method``); ``shard = (rank, world)``: this rank's contiguous share of each batch.
    """
    method.train()
    opt = torch.optim.SGD(method.parameter_groups(1e-3), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    rank, world = shard
    step_fn, target = (None, wrapper) if wrapper_as_method else (wrapper, method)
    losses = []
    for step in range(steps):
        parts = [make_batch(method, seed=10 * step + i) for i in range(batch_scale)]
        batch = {k: torch.cat([p[k] for p in parts]) if parts[0][k].dim() else parts[0][k] for k in parts[0]}
        batch = {k: v.chunk(world)[rank] if v.dim() else v for k, v in batch.items()}
        batch["epoch"] = torch.tensor(step // 2)  # DINO: frozen last layer, then not
        loss, _ = train_step(step_fn, target, batch, step, 10, opt, scheduler, accumulate=accumulate)
        losses.append(loss)
    return losses


def assert_same_state(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str,
                      rtol: float = 1e-11, atol: float = 1e-12) -> None:
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=f"{key} ({where})")


@pytest.mark.parametrize("case", ACCUMULATION_EXACT)
def test_accumulate_equals_one_step_on_the_whole_batch(case, float64):
    whole = build(case)
    whole_losses = run_steps(whole, accumulate=1)
    for accumulate in (2, 4):
        micro = build(case)
        micro_losses = run_steps(micro, accumulate=accumulate)
        torch.testing.assert_close(
            torch.stack(micro_losses), torch.stack(whole_losses), rtol=1e-12, atol=1e-12
        )
        assert_same_state(micro.state_dict(), whole.state_dict(), f"accumulate {accumulate}")
    # the runs trained: the student moved, and DINO's centre and MoCo's queue pointer too
    start = build(case).state_dict()
    trained = whole.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in trained.items() if k.startswith("student."))
    if case == "dino":
        assert whole.center.abs().sum() > 0
    if case == "moco":
        assert int(whole.queue_ptr) == 3 * 2 * _methods_tests.B % whole.queue.shape[0]


def test_dino_centre_moves_once_with_the_mean_over_every_micro_batch(float64):
    method = build("dino")
    method.train()
    batch = make_batch(method)
    method.training_step(batch, 0)  # a stash of another step: dropped
    with torch.no_grad():
        globals_ = torch.cat([batch["global1"], batch["global2"]])
        mean = method.teacher(globals_).mean(0, keepdim=True)
    expected = (1 - method.options["center_momentum"]) * mean
    halves = [{k: (v[i::2] if v.dim() else v) for k, v in batch.items()} for i in range(2)]
    for half in halves:
        method.training_step(half, 1)
    method.after_step(1, 10)
    torch.testing.assert_close(method.center, expected, rtol=1e-12, atol=1e-15)


# -- two gloo ranks against one process --------------------------------------------------------
#: (case, accumulate per rank) run under 2-rank DDP; the reference is one process, accumulate 1.
DDP_CASES = [("moco", 1), ("byol", 1), ("fixmatch", 1), ("fixmatch-default", 1), ("meanteacher", 1),
             ("dino", 1), ("dino", 2), ("mocov3", 1), ("supervised", 1)]

DDP_WORKER = """
import datetime, os, sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)
import test_fidelity as fidelity
# the bound the test gives (conftest.torchrun_command), not gloo's default of 30 min
timeout = datetime.timedelta(seconds=float(os.environ["EMANORM_DIST_TIMEOUT"]))
torch.distributed.init_process_group("gloo", timeout=timeout)
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
states = {}
for case, accumulate in fidelity.DDP_CASES:
    method = fidelity.build(case)
    ddp = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
    # DINO: the DDP wrapper given as the method itself (train_step unwraps it)
    fidelity.run_steps(method, accumulate, wrapper=ddp, wrapper_as_method=case == "dino", shard=(rank, world))
    states[f"{case}-{accumulate}"] = method.state_dict()
if rank == 0:
    torch.save(states, sys.argv[1])
del ddp  # DDP holds the process group: one left to interpreter exit aborts in gloo's threads
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(tmp_path, float64):
    """GN backbones, float64: DDP's averaged gradients over two half batches (and, for DINO, two
    micro-batches per rank) equal one process's whole-batch step; MoCo's gathered keys, DINO's
    all-reduced centre, its clipping of the averaged gradient and its frozen first epoch included."""
    # every DDP_CASES case in one job: the job's bound is twice the usual
    out = run_two_rank_script(tmp_path, DDP_WORKER, dist_timeout_s=HANG_BOUND_S, timeout=2 * HANG_BOUND_S)
    ranks = torch.load(out, weights_only=True)
    for case, accumulate in DDP_CASES:
        reference = build(case)
        run_steps(reference, accumulate=1)
        assert_same_state(ranks[f"{case}-{accumulate}"], reference.state_dict(),
                          f"2 ranks, accumulate {accumulate}", rtol=1e-10, atol=1e-12)


# -- no host synchronisation in a step ---------------------------------------------------------
#: Tensor -> Python conversions that wait for the device when the tensor lives on a GPU.
CONVERSIONS = ("item", "__float__", "__bool__", "tolist", "numpy")

SYNC_CASES = [
    ("moco", "shuffle_bn", {}), ("moco", "eman", {"symmetric": True}), ("byol", "eman", {}),
    ("fixmatch", "default", {}), ("fixmatch", "eman", {}), ("meanteacher", "eman", {}),
    ("supervised", "bn", {}), ("dino", "eman", {"clip_grad": 0.05, "freeze_last_layer_epochs": 1}),
    ("mocov3", "eman", {}),
]


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every conversion of a floating or bool tensor to Python while the fixture is active."""
    seen: list[str] = []
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if self.is_floating_point() or self.dtype == torch.bool:
                seen.append(f"{_name} of a {tuple(self.shape)} {self.dtype} tensor")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


@pytest.mark.parametrize(("name", "norm", "options"), SYNC_CASES, ids=[f"{n}-{m}" for n, m, _ in SYNC_CASES])
def test_a_train_step_converts_nothing_to_python_numbers(name, norm, options, request):
    torch.manual_seed(0)
    method = make(name, norm, **options)
    method.train()
    opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = [make_batch(method, seed=s) for s in range(4)]
    for batch in batches:
        batch["epoch"] = torch.tensor(0)
    watch = FiniteWatch()
    seen = request.getfixturevalue("conversions")  # patched from here on: building may convert
    outputs = []
    for step, batch in enumerate(batches):
        outputs.append(train_step(None, method, batch, step, 10, opt, scheduler, finite_watch=watch,
                                  accumulate=2 if step == 3 else 1))
    assert seen == []
    for loss, logs in outputs:
        assert loss.ndim == 0 and all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())
    watch.check()  # the read-backs happen here, at the caller's log step ...
    logs_to_floats({"loss": outputs[-1][0], **outputs[-1][1]})
    assert seen  # ... and the counting sees them


def test_the_watch_reports_the_first_non_finite_step_with_the_immediate_message():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model.after_step = lambda step, total: None
    watch = FiniteWatch()
    scale = {"value": 1.0}

    def step_fn(batch, step):
        return model(batch["x"]).sum() * scale["value"], {}

    batch = {"x": torch.ones(2, 2)}
    for step in range(3):
        train_step(step_fn, model, batch, step, 10, optimizer, scheduler, finite_watch=watch)
    watch.check()  # all finite so far: nothing raised
    scale["value"] = float("nan")
    for step in range(3, 5):  # the step goes on (nothing is read back) ...
        train_step(step_fn, model, batch, step, 10, optimizer, scheduler, finite_watch=watch)
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 3$"):  # ... the check names the first
        watch.check()
    scale["value"] = 1.0
    model.load_state_dict(torch.nn.Linear(2, 1).state_dict())  # finite weights again

    # finite loss, non-finite update: the parameters message with the loss
    model2 = torch.nn.Linear(2, 1)
    model2.after_step = lambda step, total: None
    opt2 = torch.optim.SGD(model2.parameters(), lr=float("inf"))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    watch2 = FiniteWatch()
    loss, _ = train_step(lambda b, s: (model2(b["x"]).sum(), {}), model2, batch, 9, 10, opt2, sched2,
                         finite_watch=watch2)
    message = rf"^parameters became non-finite at step 9; the loss was {loss.item():.4g}$"
    with pytest.raises(NonFiniteLossError, match=message):
        watch2.check()

    # a micro-batch's loss: named as the immediate check names it
    watch3 = FiniteWatch()
    nan_half = {"x": torch.tensor([[1.0, 1.0], [float("nan"), 1.0]])}
    train_step(step_fn, model, nan_half, 4, 10, optimizer, scheduler, finite_watch=watch3, accumulate=2)
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 4 \(micro-batch 2\)$"):
        watch3.check()


def test_bn_statistics_are_averaged_across_ranks_in_their_own_precision(monkeypatch):
    """Two ranks with the same statistics (a stand-in all-reduce doubles them): the average is each
    buffer exactly, float64 ones included (a float32 average would round 1 + 1e-12 to 1)."""
    import torch.distributed as dist

    from emanorm import norms

    reduced: list[torch.dtype] = []

    def all_reduce(tensor: torch.Tensor) -> None:
        reduced.append(tensor.dtype)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3).double(), torch.nn.BatchNorm1d(3))
    fine = torch.tensor([1 + 1e-12, 2 - 3e-13, 0.1], dtype=torch.float64)
    model[0].running_mean.copy_(fine)
    model[0].running_var.copy_(fine * 3)
    model[1].running_mean.copy_(torch.tensor([0.1, 0.2, 0.3]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms.average_batchnorm_statistics(model)
    assert sorted(map(str, reduced)) == ["torch.float32", "torch.float64"]  # one all-reduce per dtype
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
