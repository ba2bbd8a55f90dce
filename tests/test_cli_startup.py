"""A command line that answers at once (issue 31 item 1): ``--version``, every ``--help``,
``presets`` and argument or config errors never import torch, scikit-learn or matplotlib.

Each case runs in a fresh interpreter (an import already made by the test process would hide one)
and reports which heavy modules ``sys.modules`` holds after ``emanorm.cli.main`` returned.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import HANG_BOUND_S

HEAVY = ("torch", "sklearn", "matplotlib")

PROBE = """
import json, sys
from emanorm.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
print("\\n" + json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def run_probe(*args: str) -> tuple[int, list[str], str]:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=HANG_BOUND_S)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    return verdict["code"], verdict["heavy"], done.stderr


COMMANDS = [
    "--version", "--help", "train --help", "eval --help", "eval knn --help", "eval linear --help",
    "eval finetune --help", "eval retrieval --help", "eval lowshot --help", "export --help",
    "compare --help", "doctor --help", "presets --help", "presets", "presets small-moco",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_version_help_and_presets_import_no_heavy_library(command):
    code, heavy, _ = run_probe(*command.split())
    assert code in (0, None) and heavy == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--norm", "EMAN"], "unknown norm 'EMAN' (did you mean 'eman'?)"),
        (["train", "--method", "simclr"], "unknown method 'simclr'"),
        (["train", "--epochs", "-3"], "epochs must be positive"),
        (["train", "--lr", "abc"], "invalid float value"),
        (["train", "--set", "knn_kk=3"], "did you mean 'knn_k'?"),
        (["train", "--config", "no-such-preset"], "unknown preset"),
        (["presets", "small-mocco"], "did you mean 'small-moco'?"),
        (["nosuch"], "invalid choice"),
    ],
)
def test_argument_and_config_errors_answer_before_torch(args, message):
    code, heavy, stderr = run_probe(*args)
    assert code == 2 and message in stderr and heavy == [], stderr


def test_print_config_answers_before_torch(tmp_path):
    code, heavy, _ = run_probe("train", "--method", "moco", "--max-steps", "3", "--print-config")
    assert code == 0 and heavy == []


def test_importing_the_package_and_its_config_schema_imports_no_torch():
    code = (
        "import sys, emanorm, emanorm.train, emanorm.evaluation, emanorm.train.config, emanorm.catalog; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_BOUND_S)
    assert done.stdout.strip() == "[]", done.stderr
    used = "import sys, emanorm; emanorm.EMATeacher; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", used], capture_output=True, text=True, timeout=HANG_BOUND_S)
    assert done.stdout.strip() == "True", done.stderr  # a torch name still works, loaded on use


def test_a_finished_started_or_busy_out_is_refused_before_torch(tmp_path):
    from emanorm.train.lock import LOCK_NAME, run_lock

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    code, heavy, stderr = run_probe("train", "--max-steps", "1", "--out", str(finished))
    assert code == 2 and "already holds a finished run" in stderr and heavy == [], stderr

    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("method: moco\n")
    code, heavy, stderr = run_probe("train", "--max-steps", "1", "--out", str(started), "--resume")
    assert code == 2 and "--resume with a different config (" in stderr
    assert "method: 'moco' -> 'fixmatch'" in stderr
    assert heavy == []

    busy = tmp_path / "busy"
    busy.mkdir()
    with run_lock(busy / LOCK_NAME, remove=True):
        code, heavy, stderr = run_probe("train", "--max-steps", "1", "--out", str(busy))
    assert code == 2 and "another process is training the run in" in stderr and heavy == [], stderr
    assert list(busy.iterdir()) == []  # the refused probe wrote nothing there
