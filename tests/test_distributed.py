"""Two CPU processes under torchrun (gloo): every method trains, and the ranks agree."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import HANG_BOUND_S, torchrun_command

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist"),
]

WORKER = """
import json, os, sys, torch
from emanorm.evaluation import knn_monitor
from emanorm.train import resolve_config, train
overrides = json.loads(sys.argv[1])
summary, method = train(
    resolve_config(None, overrides), monitor=knn_monitor, progress=False, return_method=True
)
rank = int(os.environ["RANK"])
stats = {k: v for k, v in method.state_dict().items()
         if "running_" in k or k.endswith("queue") or k == "center"}
params = {k: v for k, v in method.state_dict().items() if k.startswith("teacher.")}
torch.save({"summary": summary, "stats": stats, "teacher": params}, f"{overrides['out']}/rank{rank}.pt")
"""

CASES = {
    "fixmatch": {"norm": "eman", "labels_per_class": 4},
    "meanteacher": {"norm": "eman", "labels_per_class": 4},
    "supervised": {"norm": "bn", "labels_per_class": 4},
    "moco": {"norm": "eman", "method_args": {"queue_size": 64, "dim": 16}},
    "byol": {"norm": "eman", "method_args": {"hidden_dim": 32, "proj_dim": 16}},
    "dino": {"norm": "eman", "method_args": {"out_dim": 32, "hidden_dim": 16, "local_crops": 2}},
    "mocov3": {"norm": "eman", "method_args": {"dim": 16, "hidden_dim": 32}},
}


def torchrun(tmp_path: Path, overrides: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command, env = torchrun_command(nproc, str(script), json.dumps(overrides), dist_timeout_s=HANG_BOUND_S)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_BOUND_S)


@pytest.mark.parametrize("method", list(CASES))
def test_two_ranks_train_and_agree(method, tmp_path):
    out = tmp_path / "run"
    overrides = {
        "method": method,
        "max_steps": 3,
        "batch_size": 16,
        "unlabeled_ratio": 1,
        "device": "cpu",
        "knn_bank_size": 32,
        "monitor_test_size": 32,
        "out": str(out),
        **CASES[method],
    }
    result = torchrun(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["summary"]["steps"] == 3
    # the labeled split is identical on both ranks
    assert ranks[0]["summary"]["labeled_split_sha1"] == ranks[1]["summary"]["labeled_split_sha1"]
    # teacher statistics (and MoCo's queue) identical: no rank drifts, no rank-0 broadcast needed
    assert ranks[0]["stats"].keys() == ranks[1]["stats"].keys()
    assert any(k.startswith("teacher.") for k in ranks[0]["stats"]) or method == "supervised"
    for key, value in ranks[0]["stats"].items():
        assert torch.equal(value, ranks[1]["stats"][key]), key
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
    assert (out / "summary.json").exists() and (out / "checkpoints" / "last.pt").exists()
