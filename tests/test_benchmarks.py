"""The benchmark machinery (benchmarks/): it runs, prints its contract line, and measures what it claims.

No timing assertions: the figures themselves live in docs/performance.md.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from emanorm import EMATeacher
from emanorm.evaluation import knn_monitor
from emanorm.train import train

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def needs_data(test):
    """The benchmark scripts read the system Fashion-MNIST: the slow layer, skipped without it."""
    missing = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
    return pytest.mark.slow(missing(test))


sys.path.insert(0, str(BENCH))  # benchmarks/_common.py is imported by path, as the scripts do


def load(name: str):
    """Import benchmarks/<name>.py (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # Other test files run on the same two cores; keep this one from oversubscribing them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ["--blocks", "1", "--steps", "1", "--warmup", "1", "--block-warmup", "0", "--batch-size", "16",
        "--no-memory"]


@needs_data
def test_step_throughput_runs_every_method_and_ends_with_the_contract_line(capsys):
    bench = load("step_throughput")
    results = bench.main([*TINY, "--workers", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"speedup=\d+\.\d\d", lines[-1]), lines[-1]
    assert set(results["methods"]) == {"fixmatch", "moco", "byol"}
    for method, summary in results["methods"].items():
        assert summary["emanorm"]["median"] > 0 and summary["reference"]["median"] > 0, method
        assert any(line.startswith(method) for line in lines)
    assert float(lines[-1].split("=")[1]) == pytest.approx(
        min(s["speedup"] for s in results["methods"].values()), abs=0.006)
    # FixMatch counts labeled + unlabeled images (16 + 3 x 16), MoCo the batch
    assert results["methods"]["fixmatch"]["images_per_step"] == 64
    assert results["methods"]["moco"]["images_per_step"] == 16
    assert results["machine"]["cpu"]


def test_unknown_method_is_refused(capsys):
    bench = load("step_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--methods", "simclr"])
    assert "simclr" in capsys.readouterr().err


def tiny_cfg(method: str, out: Path, data_dir: Path) -> dict:
    from _common import bench_config

    extra = {"max_steps": 3, "batch_size": 16, "knn_bank_size": 32, "monitor_test_size": 32,
             "log_every": 1, "out": str(out), "data_dir": str(data_dir)}
    if method == "fixmatch":
        extra["unlabeled_ratio"] = 2
    return bench_config(method, "cpu", extra)


@pytest.mark.parametrize("method", ["fixmatch", "moco"])
def test_emanorm_path_is_the_trainers_step(method, tmp_path, tiny_fashion_mnist_dir):
    """Two steps of the benchmark's EmanormPath leave the method exactly as `emanorm train` does."""
    load("step_throughput")
    from _common import EmanormPath

    cfg = tiny_cfg(method, tmp_path / "run", tiny_fashion_mnist_dir)
    cfg["max_steps"] = 2
    _, trained = train(dict(cfg), monitor=knn_monitor, progress=False, return_method=True)
    path = EmanormPath(dict(cfg))
    for _ in range(2):
        path.step()
    expected, got = trained.state_dict(), path.method.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=f"{method}: {name} differs")
    assert path.images_per_step == (16 + 32 if method == "fixmatch" else 16)


def test_reference_ema_loop_equals_the_fused_teacher_update():
    from _common import state_dict_ema

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    fused = EMATeacher(student, norm="eman", momentum=0.9)
    loop = EMATeacher(student, norm="eman", momentum=0.9).module
    student(torch.randn(8, 1, 6, 6))  # moves the student's BN statistics
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    fused.update(student)
    state_dict_ema(loop, student, 0.9)
    for (name, a), b in zip(fused.module.state_dict().items(), loop.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("preset", ["none", "weak", "strong", "moco", "byol1", "byol2"])
def test_pil_presets_give_normalised_tensors_of_the_dataset_shape(preset):
    from _common import pil_transform, standin_dataset

    ds = standin_dataset(32, 4, channels=3)
    image = __import__("PIL.Image").Image.fromarray(ds.images[0].permute(1, 2, 0).numpy())
    out = pil_transform(preset, ds.info)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    if preset == "none":
        mean = torch.tensor(ds.info.mean).view(3, 1, 1)
        std = torch.tensor(ds.info.std).view(3, 1, 1)
        torch.testing.assert_close(out, (ds.images[0].float() / 255 - mean) / std)


def test_alternate_times_every_path_per_block_and_summarise_pairs_rounds():
    from _common import Path_, alternate, summarise

    class Fake(Path_):
        def __init__(self, name: str) -> None:
            self.name, self.images_per_step, self.calls = name, 10, []

        def start_block(self) -> None:
            self.calls.append("start")

        def step(self) -> None:
            self.calls.append("step")

        def end_block(self) -> None:
            self.calls.append("end")

    a, b = Fake("a"), Fake("b")
    rates = alternate([a, b], blocks=3, steps=2, warmup=1)
    assert len(rates["a"]) == len(rates["b"]) == 3 and all(r > 0 for r in rates["a"] + rates["b"])
    assert a.calls.count("step") == 1 + 3 * 2 and a.calls.count("start") == a.calls.count("end") == 4
    s = summarise({"a": [4.0, 8.0, 6.0], "b": [2.0, 2.0, 3.0]}, "a", "b")
    assert s["speedup"] == pytest.approx(2.0) and s["a"]["median"] == 6.0


def test_memory_probe_reports_peaks(tiny_fashion_mnist_dir):
    pytest.importorskip("psutil")
    from _common import EmanormPath, measure_memory

    cfg = tiny_cfg("moco", Path("unused"), tiny_fashion_mnist_dir)
    path = EmanormPath(cfg)
    mem = measure_memory(path, 2)
    assert mem["peak_pss_tree_mib"] > 50 and mem["peak_rss_main_mib"] > 50
    assert mem["lifetime_peak_rss_main_mib"] >= mem["peak_rss_main_mib"] * 0.99


@needs_data
def test_peer_lightly_smoke(capsys):
    pytest.importorskip("lightly")
    bench = load("peer_lightly")
    results = bench.main([*TINY, "--workers", "0", "--methods", "moco,byol"])
    assert re.fullmatch(r"speedup=\d+\.\d\d", capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results["methods"]) == {"moco", "byol"}


@needs_data
def test_time_to_accuracy_records_curves_and_ends_with_the_ratio_line(capsys):
    bench = load("time_to_accuracy")
    result = bench.main(["--max-steps", "2", "--eval-every", "1", "--test-size", "64", "--workers", "0"])
    assert re.fullmatch(r"time_ratio=(\d+\.\d\d|nan)", capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("emanorm", "reference"):
        curve = result["curves"][name]
        assert [c["step"] for c in curve] == [1, 2]
        assert curve[0]["seconds"] <= curve[1]["seconds"]
        # a count of the 64 test images (2 steps leave the classifier near chance: nothing more to say)
        assert all((c["accuracy"] * 64 / 100).is_integer() for c in curve), curve
    assert result["target"] == min(max(c["accuracy"] for c in cv) for cv in result["curves"].values())


def test_file_pipeline_times_both_paths_and_ends_with_the_contract_line(capsys):
    pytest.importorskip("skimage")
    bench = load("file_pipeline")
    result = bench.main(["--images", "16", "--batch", "4", "--passes", "1", "--size", "64", "--workers", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"speedup=\d+\.\d\d", lines[-1]) and result["speedup"] > 0
    assert any(line.startswith("| emanorm |") for line in lines)
    assert any(line.startswith("| reference |") for line in lines)
