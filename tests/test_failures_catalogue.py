"""Every row of docs/failures.md, run as written: the catalogue cannot drift from the code.

The table's format is described at the top of docs/failures.md; placeholders are the setups of
tests/failure_setups.py. Each row runs ``emanorm ...`` as its own process in a fresh directory (a
child forked from a worker that imported emanorm once; ``EMANORM_CATALOGUE_SUBPROCESS=1`` starts
``python -m emanorm`` per row) and checks the exit status, that stderr holds no traceback, that the
message fragments share one line of stderr, and the ``kept`` clauses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import HANG_BOUND_S
from failure_setups import SETUPS

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "failures.md"
COLUMNS = ["case", "command", "exit", "message contains", "kept"]
# {F}: the fast training flags, one token in the table, four flags when run.
FAST_FLAGS = ["--max-steps", "1", "--batch-size", "16", "--device", "cpu", "--no-progress"]
PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)\}")
ENV_SETTING = re.compile(r"[A-Z_][A-Z0-9_]*=")


@dataclass
class Row:
    line: int
    case: str
    command: list[str]
    exit: int
    message: list[str]
    kept: list[str]

    @property
    def id(self) -> str:
        return self.case.split()[0] if self.case else f"line{self.line}"


def _cells(line: str) -> list[str]:
    # split on the pipes that separate cells; a pipe inside backquotes is escaped as \|
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _quoted(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def parse_catalogue(text: str) -> list[Row]:
    """The rows of every table whose header is ``COLUMNS`` (other tables are prose)."""
    rows, in_table = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if not in_table:
            in_table = cells == COLUMNS
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the |---| rule
        assert len(cells) == len(COLUMNS), f"docs/failures.md:{number}: {len(cells)} cells, expected 5"
        case, command, exit_code, message, kept = cells
        commands = _quoted(command)
        assert len(commands) == 1, f"docs/failures.md:{number}: the command cell needs one `...` span"
        rows.append(Row(number, case, shlex.split(commands[0]), int(exit_code), _quoted(message),
                        _quoted(kept)))
    return rows


ROWS = parse_catalogue(CATALOGUE.read_text())


def _fingerprint(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class Substitution:
    """Placeholder values of one row: ``{tmp}`` its directory, ``{name}`` what ``setup_name`` made."""

    def __init__(self, tmp: Path) -> None:
        self.values = {"tmp": str(tmp)}
        self.tmp = tmp

    def __call__(self, text: str) -> str:
        def value(match: re.Match) -> str:
            name = match.group(1)
            if name not in self.values:
                assert name in SETUPS, f"unknown placeholder {{{name}}}; setups: {', '.join(sorted(SETUPS))}"
                self.values[name] = str(SETUPS[name](self.tmp))
            return self.values[name]

        return PLACEHOLDER.sub(value, text)


# A worker that imports emanorm once, then forks one child per row: each row is its own process (its
# exit status, its stderr, nothing shared) without paying the torch import again. The worker runs no
# torch op before forking, so the children start clean. EMANORM_CATALOGUE_SUBPROCESS=1 runs
# `python -m emanorm` per row instead (also covers the import itself; slower).
WORKER = r"""
import importlib, json, os, sys, traceback
import emanorm.cli
emanorm.cli.build_parser()  # imports every subcommand's module
for name in PRELOAD:  # what the commands import lazily, so a child does not import it again
    try:
        importlib.import_module(name)
    except ImportError:
        pass
for request in map(json.loads, sys.stdin):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.update(request.get("env", {}))
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["emanorm", *request["argv"]]
            code = emanorm.cli.main(request["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"exit": code}), flush=True)
"""
PRELOAD = ["emanorm.train.loop", "emanorm.methods", "emanorm.models", "emanorm.data", "emanorm.data.voc",
           "emanorm.experiments.evaluate", "emanorm.experiments.grid", "emanorm.train.recipe", "tqdm.auto",
           "torch.utils.tensorboard"]


class Runner:
    def __init__(self) -> None:
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.subprocess = os.environ.get("EMANORM_CATALOGUE_SUBPROCESS") == "1" or not hasattr(os, "fork")
        self.worker = None
        if not self.subprocess:
            source = f"PRELOAD = {PRELOAD!r}\n{WORKER}"
            self.worker = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=self.env)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
        if self.worker is None:
            result = subprocess.run([sys.executable, "-m", "emanorm", *argv], capture_output=True, text=True,
                                    cwd=cwd, env={**self.env, **(env or {})}, timeout=HANG_BOUND_S)
            return result.returncode, result.stderr
        out, err = cwd.parent / f"{cwd.name}.stdout", cwd.parent / f"{cwd.name}.stderr"
        request = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "env": env or {}}
        assert self.worker.stdin is not None and self.worker.stdout is not None
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        reply = self.worker.stdout.readline()
        assert reply, "the catalogue worker died"
        return json.loads(reply)["exit"], err.read_text(errors="replace")

    def close(self) -> None:
        if self.worker is not None:
            assert self.worker.stdin is not None
            self.worker.stdin.close()
            self.worker.wait(timeout=HANG_BOUND_S)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def test_catalogue_parses() -> None:
    assert len(ROWS) >= 10
    ids = [r.id for r in ROWS]
    assert len(set(ids)) == len(ids), "case ids (first word of `case`) must be unique"
    for row in ROWS:
        assert row.message, f"docs/failures.md:{row.line}: `message contains` needs a `...` fragment"
        used = set(PLACEHOLDER.findall(" ".join(row.command + row.message + row.kept))) - {"tmp"}
        assert used <= set(SETUPS), f"docs/failures.md:{row.line}: no setup for {used - set(SETUPS)}"


def test_the_tests_cited_for_cases_that_are_not_rows_exist() -> None:
    # the tables with a `test` column name the test that covers each case: a renamed or deleted test
    # would leave the catalogue citing nothing
    cited, defined = set(), set()
    in_table = False
    for line in CATALOGUE.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if not in_table:
            in_table, column = "test" in cells, cells.index("test") if "test" in cells else -1
            continue
        if in_table and len(cells) > column:
            cited.update(re.findall(r"`(test_\w+)`", cells[column]))
    for path in Path(__file__).resolve().parent.rglob("test_*.py"):
        defined.update(re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(), flags=re.M))
    assert len(cited) >= 5, "no table of failures.md cites a test"
    assert cited <= defined, f"docs/failures.md cites tests that do not exist: {sorted(cited - defined)}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_catalogue_row(row: Row, tmp_path: Path, runner: Runner) -> None:
    sub = Substitution(tmp_path)
    argv: list[str] = []
    env: dict[str, str] = {}
    command = list(row.command)
    while command and ENV_SETTING.match(command[0]):  # NAME=value before the command: its environment
        name, _, value = command.pop(0).partition("=")
        env[name] = sub(value)
    for token in command:
        argv += FAST_FLAGS if token == "{F}" else [sub(token)]
    assert argv[0] != "emanorm", f"docs/failures.md:{row.line}: leave out the leading 'emanorm'"
    kept = [sub(k) for k in row.kept]
    same = {k[len("same "):]: _fingerprint(Path(k[len("same "):])) for k in kept if k.startswith("same ")}
    code, stderr = runner.run(argv, tmp_path, env)
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    where = f"docs/failures.md:{row.line} ({row.case}): {shown} emanorm {shlex.join(argv)}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, where
    assert code == row.exit, where
    fragments = [sub(m) for m in row.message]
    assert any(all(f in line for f in fragments) for line in stderr.splitlines()), where
    for clause in kept:
        if clause.startswith("same "):
            path = clause[len("same "):]
            assert _fingerprint(Path(path)) == same[path], f"{where}\n{path} changed"
        elif clause.startswith("no "):
            assert not Path(clause[len("no "):]).exists(), f"{where}\n{clause[3:]} exists"
        else:
            assert Path(clause).exists(), f"{where}\n{clause} is missing"
