"""Every GPU figure of docs/performance.md in one command, within a time budget (issue 20).

    python benchmarks/gpu_suite.py --device cuda --data-dir .device-data/fashion-mnist --out "$OUT"
    python benchmarks/gpu_suite.py --device cpu --quick --out /tmp/gpu-suite    # dry run, ~75 CPU-s

Parts, in this order (each in its own process, with its own timeout; a part that fails, times out
or does not fit the remaining budget is recorded as such and the suite goes on):

  cuda_tests         pytest -m cuda (junit XML kept)
  matrix_eager       FixMatch-EMAN's training step (small-fixmatch, Fashion-MNIST): bf16 / fp32 x
                     channels_last / NCHW, no compile; images/s, warm-up time, CUDA peak memory
  main_fixmatch      the main job: emanorm train FixMatch-EMAN, 40 labels per class; wall-clock and
                     teacher test accuracy. Steps: --main-steps, or auto: what fits --main-seconds at
                     the step rate matrix_eager measured for the default cell (bf16, channels_last)
  main_supervised    emanorm train supervised on all 60,000 labels (the accuracy to be within 2 points of)
  throughput_resnet18_cifar   step_throughput.py --backbone resnet18_cifar --standin 32
  matrix_compile     the same step with --compile: (bf16, channels_last) and (fp32, NCHW)
  throughput_resnet50         step_throughput.py --backbone resnet50 --standin 224
  peer_lightly       peer_lightly.py (skipped when lightly is not installed)
  file_pipeline      benchmarks/file_pipeline.py (skipped until that benchmark exists)
  ema_update         ema_update.py: the fused teacher update against the state_dict loop
  split_bn           split_bn.py: what --bn-splits 8 (per-GPU BN emulated) costs per step, MoCo and BYOL
  step_sync          a training step never waits for the host: 20 train_steps of every method's
                     small preset under torch.cuda.set_sync_debug_mode("error") (any device
                     synchronisation is an error); on a CPU (--quick dry run) the same steps with
                     every Tensor -> Python conversion (item, float, bool, tolist, numpy) an error

Files under --out (at most 8 come back from a lent machine): gpu_suite.json (every figure, the
machine, the card, torch / CUDA versions, the date, each part's status and command), gpu_suite.log
(each part's full output), gpu_suite.png, cuda_tests.xml, summary.md (tables for the docs). The JSON
and the log are rewritten after every part, so a killed run still leaves what it measured.
``--quick`` shrinks every part to a few steps (a dry run of the whole chain, not figures).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the benchmarks folder is not a package: imported by path
    EmanormPath,
    alternate,
    bench_config,
    cpu_model,
    load_run_dataset,
    standin_dataset,
    sync,
)
from emanorm.errors import UserError
from emanorm.train.distributed import pick_device

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
FILE_PIPELINE = BENCH / "file_pipeline.py"  # the ImageNet-path issue's benchmark, once it lands
OUTPUT_FILES = ("gpu_suite.json", "gpu_suite.log", "gpu_suite.png", "cuda_tests.xml", "summary.md")

#: The matrix cells: (amp, channels_last, compile). The first is emanorm's GPU default.
EAGER_CELLS = [("bf16", True, False), ("bf16", False, False), ("off", True, False), ("off", False, False)]
COMPILE_CELLS = [("bf16", True, True), ("off", False, True)]


@dataclass(frozen=True)
class Part:
    name: str
    timeout_s: float  # on the GPU; --quick gives every part QUICK_TIMEOUT_S
    run: Callable[[Suite], dict[str, Any]]


QUICK_TIMEOUT_S = 150.0
#: a part is skipped, not started, when less than this is left of the budget
MIN_PART_S, QUICK_MIN_PART_S = 20.0, 5.0


class PartSkipped(Exception):
    """Raised by a part that cannot run here (a missing package or benchmark): recorded, not an error."""


# -- the suite -----------------------------------------------------------------------------------------
class Suite:
    """Runs the parts in order within the budget and keeps the JSON, the log and the summary current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.timeout = 0.0  # the running part's timeout
        self.current: subprocess.Popen | None = None  # the running part's process
        self.partial: dict[str, Any] = {}  # what a failing part measured before it failed
        self.deadline = self.started + args.budget_s
        self.log_path = self.out / "gpu_suite.log"
        command = shlex.join([sys.executable, "benchmarks/gpu_suite.py", *args.argv])
        self.log_path.write_text(f"# {command}\n")
        self.results: dict[str, Any] = {
            "suite": {"command": command, "device": args.device,
                      "quick": args.quick, "budget_s": args.budget_s, "workers": args.workers,
                      "out": str(self.out), "files": list(OUTPUT_FILES)},
            "machine": machine_info(args.device),
            "parts": {},
        }
        if args.commit:  # a copied working tree has no .git to ask
            self.results["machine"]["emanorm_commit"] = args.commit

    # -- bookkeeping
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def save(self) -> None:
        self.results["suite"]["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.results["headline"] = headline(self.results["parts"])
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        src = str(REPO / "src")  # this checkout's emanorm even when another one is pip-installed
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.args.quick:
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def command(self, cmd: list[str], timeout: float, label: str) -> dict[str, Any]:
        """Run ``cmd`` in its own process group (so loader workers and torchrun ranks die with it on
        a timeout), its output appended to the log. Raises on a non-zero exit or a timeout."""
        self.log(f"\n## {label}: {shlex.join(cmd)}  (timeout {timeout:.0f} s)")
        start, cpu, before = time.perf_counter(), children_cpu_seconds(), self.log_path.stat().st_size
        with open(self.log_path, "a") as log:
            proc = self.current = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                self.stop_current()
                raise PartTimeout(f"{label} passed its {timeout:.0f} s timeout") from None
            finally:
                self.current = None
        seconds = round(time.perf_counter() - start, 1)
        cpu_s = round(children_cpu_seconds() - cpu, 1)
        output = self.output_since(before)
        self.log(f"## {label}: exit {rc} after {seconds} s ({cpu_s} CPU-s)")
        if rc != 0:
            raise PartFailed(f"{label} exited with {rc}: {last_error_line(output)}")
        return {"seconds": seconds, "cpu_s": cpu_s}

    def stop_current(self) -> None:
        """Kill the running part's whole process group (its own session: Ctrl-C does not reach it)."""
        proc = self.current
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def output_since(self, offset: int) -> str:
        """What the log gained after byte ``offset`` (a part's own output)."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # -- the loop
    def run(self, parts: list[Part]) -> None:
        for part in parts:
            entry: dict[str, Any] = {"status": "running"}
            self.results["parts"][part.name] = entry
            budget = self.remaining() - (2.0 if self.args.quick else 10.0)  # the plot and the files
            nominal = QUICK_TIMEOUT_S if self.args.quick else part.timeout_s
            self.timeout = min(nominal, budget)
            if self.timeout < (QUICK_MIN_PART_S if self.args.quick else MIN_PART_S):
                entry.update(status="skipped", reason=f"time budget: {max(budget, 0):.0f} s left")
            else:
                start = time.perf_counter()
                try:
                    entry.update(status="ok", result=part.run(self))
                except PartSkipped as why:
                    entry.update(status="skipped", reason=str(why))
                except PartTimeout as why:
                    entry.update(status="timeout", reason=str(why))
                except PartFailed as why:
                    entry.update(status="failed", reason=str(why))
                except Exception as err:  # a bug in one part's parsing must not lose the others
                    entry.update(status="failed", reason=f"{type(err).__name__}: {err}")
                    self.log(traceback.format_exc())
                entry["seconds"] = round(time.perf_counter() - start, 1)
                if entry["status"] != "ok" and "partial" in self.partial:
                    entry["result"] = self.partial["partial"]
            self.partial = {}
            line = f"[{part.name}] {entry['status']}"
            line += f" in {entry['seconds']} s" if "seconds" in entry else ""
            print(line + (f": {entry['reason']}" if "reason" in entry else ""), flush=True)
            self.log(f"# {line}")
            self.save()


class PartFailed(Exception):
    pass


class PartTimeout(Exception):
    pass


def children_cpu_seconds() -> float:
    """CPU-seconds of every finished child process so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def last_error_line(output: str) -> str:
    """The last line of a part's output that reads like an error (the JSON's one-line reason)."""
    lines = [line for line in output.splitlines()[-200:] if line.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|error:|FAILED|Exception)", line):
            return line.strip()[:300]
    return (lines[-1].strip()[:300] if lines else "")


# -- machine -------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """The card, driver, torch / CUDA / cuDNN versions, CPU and the date (UTC)."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device": device,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": {name: importlib.util.find_spec(name) is not None
                     for name in ("pytest", "lightly", "psutil", "timm")},
        "emanorm_commit": git_commit(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=False)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    return info


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


# -- the parts -----------------------------------------------------------------------------------------
def cuda_tests(s: Suite) -> dict[str, Any]:
    xml = s.out / "cuda_tests.xml"
    # --quick collects only the files that hold CUDA tests (collecting every file costs ~20 s on a CPU)
    targets = ["tests/test_cuda.py", "tests/test_augment.py"] if s.args.quick else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *targets]
    try:
        run = s.command(cmd, s.timeout, "cuda_tests")
    except PartFailed:
        if xml.exists():
            s.partial = {"partial": junit_summary(xml)}
        raise
    return {**run, **junit_summary(xml)}


def junit_summary(xml: Path) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest junit XML file."""
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = ("failed" if tag == "failure" else tag), (node.get("message") or "")[:300]
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), **({"message": message} if message else {})})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"tests": len(cases), **counts, "cases": cases}


def matrix_part(cells: list[tuple[str, bool, bool]], label: str,
                quick_cells: int | None = None) -> Callable[[Suite], dict[str, Any]]:
    def run(s: Suite) -> dict[str, Any]:
        cell_json = s.work / f"{label}.json"
        chosen = cells[:quick_cells] if s.args.quick else cells
        cmd = [sys.executable, __file__, "--measure-cells",
               json.dumps([{"amp": a, "channels_last": c, "compile": k} for a, c, k in chosen]),
               "--cell-json", str(cell_json), "--device", s.args.device,
               "--compile-backend", s.args.compile_backend or ("eager" if s.args.quick else "inductor")]
        if s.args.data_dir:
            cmd += ["--data-dir", s.args.data_dir]
        if s.args.quick:
            cmd.append("--quick")
        try:
            run_ = s.command(cmd, s.timeout, label)
        finally:  # cells finished before a timeout or a crash still count
            if cell_json.exists():
                s.partial = {"partial": {"cells": json.loads(cell_json.read_text())}}
        cells_out = json.loads(cell_json.read_text())
        if not any(c["status"] == "ok" for c in cells_out):
            raise PartFailed(f"no cell ran: {cells_out[0].get('error') if cells_out else 'none written'}")
        return {**run_, "cells": cells_out}

    return run


def main_steps(s: Suite) -> tuple[int, str]:
    """The main job's step count: --main-steps, or what fits --main-seconds at the measured rate."""
    if s.args.quick:
        return 4, "quick"
    if s.args.main_steps != "auto":
        return int(s.args.main_steps), "--main-steps"
    eager = s.results["parts"].get("matrix_eager", {}).get("result", {}).get("cells", [])
    default = next((c for c in eager if c["status"] == "ok" and c["cell"] == {
        "amp": "bf16", "channels_last": True, "compile": False}), None)
    if default is None:
        return 3000, "fallback (matrix_eager gave no rate)"
    steps = int(default["steps_per_s"] * s.args.main_seconds) // 100 * 100
    return max(500, min(steps, 30000)), (f"auto: {default['steps_per_s']:.1f} steps/s x "
                                         f"{s.args.main_seconds:.0f} s")


def train_part(method: str) -> Callable[[Suite], dict[str, Any]]:
    def run(s: Suite) -> dict[str, Any]:
        out = s.work / f"run-{method}"
        cmd = [sys.executable, "-m", "emanorm", "train", "--method", method, "--device", s.args.device,
               "--seed", "0", "--eval-every", "0", "--no-progress", "--force", "--out", str(out)]
        if method == "fixmatch":
            steps, why = main_steps(s)
            cmd += ["--norm", "eman", "--labels-per-class", "40", "--max-steps", str(steps)]
        else:  # the supervised model on all 60,000 labels, a few epochs at a larger batch
            why = "supervised: --supervised-epochs"
            cmd += ["--label-fraction", "1.0", "--batch-size", "256"]
            cmd += ["--max-steps", "4"] if s.args.quick else ["--epochs", str(s.args.supervised_epochs)]
        if s.args.quick:
            cmd += ["--batch-size", "8", "--set", "knn_bank_size=200", "--set", "monitor_test_size=500"]
        if s.args.data_dir:
            cmd += ["--data-dir", s.args.data_dir]
        run_ = s.command(cmd, s.timeout, f"main_{method}")
        summary = json.loads((out / "summary.json").read_text())
        rates = [r["img_per_s"] for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
        final = summary["final"]
        return {**run_, "steps": summary["steps"], "steps_from": why, "labeled": summary["labeled"],
                "epochs": summary["epochs"], "wall_clock_s": summary["wall_clock_s"],
                "process_s": run_["seconds"], "test_acc": final.get("test_acc_teacher"), "final": final,
                "median_img_per_s": statistics.median(rates) if rates else None}

    return run


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparison_part(script: str, full: list[str], quick: list[str], label: str,
                    needs: str | None = None) -> Callable[[Suite], dict[str, Any]]:
    """step_throughput.py / peer_lightly.py with ``--json``; their figures go into the suite's JSON."""

    def run(s: Suite) -> dict[str, Any]:
        if needs and importlib.util.find_spec(needs) is None:
            raise PartSkipped(f"{needs} is not installed (pip install -e '.[bench]'; on a lent machine "
                              "install the wheels carried in .device-data/wheels)")
        out = s.work / f"{label}.json"
        cmd = [sys.executable, str(BENCH / script), "--device", s.args.device, "--json", str(out),
               "--workers", str(s.args.workers), *(quick if s.args.quick else full)]
        run_ = s.command(cmd, s.timeout, label)
        figures = json.loads(out.read_text())
        return {**run_, "speedup": figures["speedup"], "methods": figures["methods"],
                "args": figures["args"], "other_processes_cpu_share": figures["other_processes_cpu_share"]}

    return run


def contract_lines(text: str) -> dict[str, float]:
    """The ``key=value`` lines a benchmark ends with (``speedup=2.41``)."""
    found = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+)=([-+0-9.eE]+|nan|inf)", line.strip())
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def file_pipeline(s: Suite) -> dict[str, Any]:
    script = FILE_PIPELINE
    if not script.exists():
        raise PartSkipped("benchmarks/file_pipeline.py does not exist yet (the ImageNet-path issue)")
    # its flags are its own: pass only the ones its --help offers
    helptext = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=s.env(),
                              capture_output=True, text=True, timeout=min(60, s.timeout), check=False).stdout
    out = s.work / "file_pipeline.json"
    cmd = [sys.executable, str(script)]
    if "--device" in helptext:
        cmd += ["--device", s.args.device]
    if "--json" in helptext:
        cmd += ["--json", str(out)]
    if s.args.quick and "--quick" in helptext:
        cmd.append("--quick")
    before = s.log_path.stat().st_size
    run_ = s.command(cmd, s.timeout, "file_pipeline")
    text = s.output_since(before)
    result: dict[str, Any] = {**run_, "command": shlex.join(cmd), **contract_lines(text)}
    if out.exists():
        result["figures"] = json.loads(out.read_text())
    return result


def ema_update(s: Suite) -> dict[str, Any]:
    args = ["--model", "resnet18", "--repeats", "3"] if s.args.quick else ["--model", "resnet50",
                                                                          "--repeats", "30"]
    before = s.log_path.stat().st_size
    run_ = s.command([sys.executable, str(BENCH / "ema_update.py"), "--device", s.args.device, *args],
                     s.timeout, "ema_update")
    text = s.output_since(before)
    times = dict(re.findall(r"^(fused _foreach update|state_dict Python loop)\s*:\s*([0-9.]+) ms", text,
                            re.M))
    return {**run_, "model": args[1], **contract_lines(text),
            "fused_ms": float(times.get("fused _foreach update", "nan")),
            "loop_ms": float(times.get("state_dict Python loop", "nan"))}


def split_bn(s: Suite) -> dict[str, Any]:
    args = ["--methods", "moco", "--blocks", "1", "--steps", "1", "--batch-size", "16"] if s.args.quick else [
        "--batch-size", "256", "--blocks", "9", "--steps", "4", "--threads", "0"]
    before = s.log_path.stat().st_size
    run_ = s.command([sys.executable, str(BENCH / "split_bn.py"), "--device", s.args.device, *args],
                     s.timeout, "split_bn")
    text = s.output_since(before)
    per_method = {m: float(r) for m, r in re.findall(r"^(\w+): 8 splits / 1 split = ([0-9.]+)", text, re.M)}
    return {**run_, "command_args": args, **contract_lines(text), "methods": per_method}


#: The methods whose steps step_sync checks (each through its small preset).
SYNC_METHODS = ("fixmatch", "moco", "byol", "meanteacher", "dino", "supervised", "mocov3")


def step_sync(s: Suite) -> dict[str, Any]:
    out = s.work / "step_sync.json"
    cmd = [sys.executable, __file__, "--sync-check", str(out), "--device", s.args.device]
    if s.args.quick:
        cmd.append("--quick")
    try:
        run_ = s.command(cmd, s.timeout, "step_sync")
    finally:  # methods checked before a timeout or a crash still count
        if out.exists():
            s.partial = {"partial": {"methods": json.loads(out.read_text())}}
    methods = json.loads(out.read_text())
    failed = [name for name, entry in methods.items() if entry["status"] != "ok"]
    if failed:
        raise PartFailed(f"steps that synchronise: {', '.join(failed)} ({methods[failed[0]].get('error')})")
    return {**run_, "methods": methods}


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[str]:
    """Any device synchronisation inside the block is an error: CUDA's sync debug mode on a GPU;
    on a CPU (nothing to wait for) every Tensor -> Python conversion of a floating or bool tensor,
    the calls that would synchronise on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield 'torch.cuda.set_sync_debug_mode("error")'
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    names = ("item", "__float__", "__bool__", "tolist", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def guarded(name: str) -> Callable[..., Any]:
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.is_floating_point() or self.dtype == torch.bool:
                raise RuntimeError(f"Tensor.{name} of a {self.dtype} tensor inside a training step")
            return originals[name](self, *args, **kwargs)
        return call

    for name in originals:
        setattr(torch.Tensor, name, guarded(name))
    try:
        yield "Tensor -> Python conversions (CPU stand-in for the CUDA sync debug mode)"
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def sync_check(args: argparse.Namespace) -> None:
    """Run every method's steps inside :func:`no_host_sync`; the JSON is rewritten after each method."""
    from emanorm.train import resolve_config, train_step

    device = pick_device(args.device)
    steps = 4 if args.quick else 20
    results: dict[str, Any] = {}
    for method in SYNC_METHODS:
        entry: dict[str, Any] = {"steps": steps}
        try:
            overrides: dict[str, Any] = {"device": args.device, "log_every": 10**9, "seed": 0}
            if args.quick:
                overrides["batch_size"] = 8
            cfg = resolve_config(f"small-{method}", overrides)
            # stand-in images of the preset's dataset shape: the check needs no data files
            path = EmanormPath(cfg, standin_dataset(28, 512, channels=1))
            for _ in range(3):  # warm-up: lazy initialisation (cuDNN, allocator) may synchronise
                path.step()
            batches = [next(path._batches) for _ in range(steps)]  # the data pipeline is not the step
            with no_host_sync(device) as mode:
                for batch in batches:
                    train_step(path.step_fn, path.method, batch, path.global_step, path.total_steps,
                               path.optimizer, path.scheduler, amp=path.amp, scaler=path.scaler,
                               finite_watch=path.finite_watch)
                    path.global_step += 1
            path.finite_watch.check()  # the one read-back, after the steps
            entry.update(status="ok", mode=mode, amp=cfg["amp"], batch_size=cfg["batch_size"])
        except Exception as err:  # one method's failure must not hide the others'
            entry.update(status="failed", error=f"{type(err).__name__}: {str(err).strip()[:400]}")
            traceback.print_exc()
        results[method] = entry
        Path(args.sync_check).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({method: entry}), flush=True)


TINY = ["--methods", "fixmatch", "--blocks", "1", "--steps", "1", "--warmup", "1", "--block-warmup", "0",
        "--standin-count", "512", "--no-memory"]
PARTS = [
    Part("cuda_tests", 100, cuda_tests),
    Part("matrix_eager", 60, matrix_part(EAGER_CELLS, "matrix_eager")),
    Part("main_fixmatch", 160, train_part("fixmatch")),
    Part("main_supervised", 90, train_part("supervised")),
    Part("throughput_resnet18_cifar", 75, comparison_part(
        "step_throughput.py",
        ["--backbone", "resnet18_cifar", "--standin", "32", "--blocks", "4", "--steps", "10", "--no-memory"],
        [*TINY, "--backbone", "resnet18_cifar", "--standin", "32", "--batch-size", "2"],
        "throughput_resnet18_cifar")),
    Part("matrix_compile", 120, matrix_part(COMPILE_CELLS, "matrix_compile", quick_cells=1)),
    Part("throughput_resnet50", 100, comparison_part(
        "step_throughput.py",
        ["--backbone", "resnet50", "--standin", "224", "--standin-count", "1024", "--batch-size", "64",
         "--blocks", "3", "--steps", "5", "--warmup", "3", "--no-memory"],
        # the same chain at 32 px: a 224 px ResNet-50 step takes seconds on a CPU
        [*TINY, "--backbone", "resnet50", "--standin", "32", "--batch-size", "2"],
        "throughput_resnet50")),
    Part("peer_lightly", 60, comparison_part(
        "peer_lightly.py",
        ["--backbone", "resnet18_cifar", "--standin", "32", "--blocks", "4", "--steps", "10", "--no-memory"],
        [*TINY[2:], "--methods", "moco", "--batch-size", "16"],
        "peer_lightly", needs="lightly")),
    Part("file_pipeline", 60, file_pipeline),
    Part("ema_update", 40, ema_update),
    Part("split_bn", 40, split_bn),
    Part("step_sync", 90, step_sync),
]
PART_NAMES = [p.name for p in PARTS]


# -- the matrix cells (run in a process of their own: --measure-cells) --------------------------------
def measure_cells(args: argparse.Namespace) -> None:
    """Time emanorm's FixMatch-EMAN step per cell; the JSON is rewritten after every cell."""
    device = pick_device(args.device)
    cells, results, cache = json.loads(args.measure_cells), [], {}
    for cell in cells:
        entry: dict[str, Any] = {"cell": cell}
        try:
            entry.update(measure_cell(cell, args, device, cache), status="ok")
        except Exception as err:  # a cell that fails (a compile error) must not lose the other cells
            entry.update(status="failed", error=f"{type(err).__name__}: {str(err).strip()[:400]}")
            traceback.print_exc()
        results.append(entry)
        Path(args.cell_json).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(entry), flush=True)


def measure_cell(cell: dict[str, Any], args: argparse.Namespace, device: torch.device,
                 cache: dict[str, Any]) -> dict[str, Any]:
    inductor = args.compile_backend == "inductor"
    overrides: dict[str, Any] = {"amp": cell["amp"], "channels_last": cell["channels_last"],
                                 "compile": cell["compile"] and inductor}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.quick:
        overrides["batch_size"] = 8
    cfg = bench_config("fixmatch", args.device, overrides)
    if "ds" not in cache:
        cache["ds"] = load_run_dataset(cfg, "train")
    path = EmanormPath(cfg, cache["ds"])
    if cell["compile"] and not inductor:  # --quick on a CPU: dynamo's capture without inductor's minute
        path.step_fn = torch.compile(path.method, backend=args.compile_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks, steps, warmup = (1, 2, 1) if args.quick else (3, 20, 5)
    start = time.perf_counter()
    for _ in range(warmup):  # the first step compiles (and the first steps warm the allocator)
        path.step()
    sync(device)
    warmup_s = time.perf_counter() - start
    rates = alternate([path], blocks=blocks, steps=steps, warmup=0)[path.name]
    out = {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
           "steps_per_s": statistics.median(rates) / path.images_per_step,
           "images_per_step": path.images_per_step, "warmup_steps": warmup, "warmup_s": round(warmup_s, 2),
           "blocks": blocks, "steps": steps, "backbone": cfg["backbone"], "batch_size": cfg["batch_size"],
           "compile_backend": args.compile_backend if cell["compile"] else None}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del path
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- the report ----------------------------------------------------------------------------------------
def headline(parts: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, in one place (None where a part did not run)."""

    def result(name: str) -> dict[str, Any]:
        entry = parts.get(name, {})
        return entry.get("result", {}) if entry.get("status") == "ok" else {}

    fix, sup = result("main_fixmatch"), result("main_supervised")
    out: dict[str, Any] = {
        "fixmatch_40_per_class_test_acc": fix.get("test_acc"),
        "fixmatch_wall_clock_s": fix.get("wall_clock_s"),
        "fixmatch_steps": fix.get("steps"), "supervised_60000_test_acc": sup.get("test_acc"),
        "supervised_wall_clock_s": sup.get("wall_clock_s"),
    }
    if fix.get("test_acc") is not None and sup.get("test_acc") is not None:
        gap = sup["test_acc"] - fix["test_acc"]
        out.update(gap_points=round(gap, 2),
                   goal_within_2_points_in_2_minutes=bool(gap <= 2 and fix["wall_clock_s"] <= 120))
    for name in ("throughput_resnet18_cifar", "throughput_resnet50", "peer_lightly"):
        out[f"{name}_speedup"] = result(name).get("speedup")
    tests = parts.get("cuda_tests", {}).get("result", {})
    out["cuda_tests"] = {k: tests.get(k) for k in ("tests", "passed", "failed", "error", "skipped")}
    out["statuses"] = {name: entry.get("status") for name, entry in parts.items()}
    return out


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def cell_label(cell: dict[str, Any], sep: str) -> str:
    return sep.join(("bf16" if cell["amp"] == "bf16" else "fp32",
                     "channels_last" if cell["channels_last"] else "NCHW",
                     "compile" if cell["compile"] else "eager"))


def summary_markdown(results: dict[str, Any]) -> str:
    m, parts, h = results["machine"], results["parts"], results["headline"]
    lines = [f"# gpu_suite: {m.get('gpu', 'no GPU')} ({m['device']}), {m['date_utc']}", "",
             f"torch {m['torch']}, CUDA {m['cuda']} (torch build), cuDNN {m['cudnn']}, torchvision "
             f"{m['torchvision']}, Python {m['python']}, driver/card {m.get('nvidia_smi', '-')}, "
             f"CPU {m['cpu']} "
             f"({m['cores']} cores), emanorm {m['emanorm_commit']}; "
             + ("--quick dry run: not figures" if results["suite"]["quick"] else "full run"),
             f"`{results['suite']['command']}`", "",
             "| part | status | s | note |", "|---|---|---|---|"]
    for name, entry in parts.items():
        lines.append(f"| {name} | {entry['status']} | {fmt(entry.get('seconds'))} | "
                     f"{entry.get('reason', '')} |")
    lines += ["", "Main job (teacher / model test accuracy on the 10,000 test images):", "",
              "| run | labels | steps | wall-clock s | test acc % |", "|---|---|---|---|---|"]
    for name, labels in (("main_fixmatch", "40 per class"), ("main_supervised", "all 60,000")):
        r = parts.get(name, {}).get("result", {})
        lines.append(f"| {name} | {labels} | {fmt(r.get('steps'), 'd')} | {fmt(r.get('wall_clock_s'))} | "
                     f"{fmt(r.get('test_acc'), '.2f')} |")
    lines += ["", f"Gap {fmt(h.get('gap_points'), '.2f')} points; goal (<= 2 points in <= 120 s) met: "
              f"{fmt(h.get('goal_within_2_points_in_2_minutes'))}", "",
              "| throughput | method | emanorm img/s | other img/s | speedup |", "|---|---|---|---|---|"]
    for name in ("throughput_resnet18_cifar", "throughput_resnet50", "peer_lightly"):
        for method, fig in parts.get(name, {}).get("result", {}).get("methods", {}).items():
            other = "lightly" if "lightly" in fig else "reference"
            lines.append(f"| {name} | {method} | {fig['emanorm']['median']:,.0f} | "
                         f"{fig[other]['median']:,.0f} | "
                         f"{fig['speedup']:.2f} |")
    lines += ["", "| FixMatch-EMAN step (small, Fashion-MNIST) | img/s | warm-up s | CUDA peak MiB |",
              "|---|---|---|---|"]
    for name in ("matrix_eager", "matrix_compile"):
        for c in parts.get(name, {}).get("result", {}).get("cells", []):
            error = f" {c['error']}" if c["status"] != "ok" else ""
            peak = fmt(c.get("cuda_max_allocated_mib"), ",.0f")
            lines.append(f"| {cell_label(c['cell'], ', ')} | {fmt(c.get('img_per_s'), ',.0f')} | "
                         f"{fmt(c.get('warmup_s'))} | {peak} |{error}")
    ema = parts.get("ema_update", {}).get("result", {})
    if ema:
        lines += ["", f"EMA update ({ema['model']}): fused {fmt(ema['fused_ms'], '.2f')} ms, state_dict loop "
                  f"{fmt(ema['loop_ms'], '.2f')} ms, speedup {fmt(ema.get('speedup'), '.2f')}"]
    split = parts.get("split_bn", {}).get("result", {})
    if split:
        each = ", ".join(f"{m} {r:.2f}x" for m, r in split.get("methods", {}).items())
        lines += ["", f"--bn-splits 8 over 1 split, step time: {each or '-'}"]
    fp = parts.get("file_pipeline", {})
    lines += ["", f"File pipeline: {fp.get('status')}" + (
        f", {fp['result'].get('command')}: speedup {fmt(fp['result'].get('speedup'), '.2f')}"
        if fp.get("status") == "ok" else f" ({fp.get('reason', '')})")]
    t = h["cuda_tests"]
    lines += [f"CUDA tests: {fmt(t['passed'], 'd')} passed, {fmt(t['failed'], 'd')} failed, "
              f"{fmt(t['error'], 'd')} errors, {fmt(t['skipped'], 'd')} skipped of {fmt(t['tests'], 'd')}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    parts = results["parts"]
    fig = Figure(figsize=(14, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    m = results["machine"]
    fig.suptitle(f"emanorm gpu_suite: {m.get('gpu', m['device'])}, torch {m['torch']}, "
                 f"CUDA {m['cuda']}, {m['date_utc']}"
                 + ("  (--quick dry run: not figures)" if results["suite"]["quick"] else ""))

    def empty(ax: Any, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
        ax.set_axis_off()

    # (a) step throughput against the reference / lightly
    ax = axes[0, 0]
    labels, ours, theirs = [], [], []
    for name, short in (("throughput_resnet18_cifar", "r18c 32"), ("throughput_resnet50", "r50 224"),
                        ("peer_lightly", "lightly")):
        for method, fig_ in parts.get(name, {}).get("result", {}).get("methods", {}).items():
            other = "lightly" if "lightly" in fig_ else "reference"
            labels.append(f"{short}\n{method}")
            ours.append(fig_["emanorm"]["median"])
            theirs.append(fig_[other]["median"])
    if labels:
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="emanorm")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="reference / lightly")
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("training images / s")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("step throughput")
    else:
        empty(ax, "no step-throughput figures")
    # (b) the compile / bf16 / channels_last matrix
    ax = axes[0, 1]
    cells = [c for n in ("matrix_eager", "matrix_compile")
             for c in parts.get(n, {}).get("result", {}).get("cells", []) if c["status"] == "ok"]
    if cells:
        names = [cell_label(c["cell"], "\n") for c in cells]
        ax.bar(range(len(cells)), [c["img_per_s"] for c in cells])
        ax.set_xticks(range(len(cells)), names, fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title("FixMatch-EMAN step (small, Fashion-MNIST)")
    else:
        empty(ax, "no matrix figures")
    # (c) the main job
    ax = axes[1, 0]
    runs = [(label, parts.get(n, {}).get("result", {})) for n, label in
            (("main_fixmatch", "FixMatch-EMAN\n40 labels/class"),
             ("main_supervised", "supervised\n60,000 labels"))]
    runs = [(label, r) for label, r in runs if r.get("test_acc") is not None]
    if runs:
        bars = ax.bar([label for label, _ in runs], [r["test_acc"] for _, r in runs])
        for bar, (_, r) in zip(bars, runs, strict=True):
            ax.annotate(f"{r['test_acc']:.2f}%\n{r['wall_clock_s']:.0f} s, {r['steps']} steps",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set_ylabel("test accuracy %")
        ax.set_ylim(0, 105)
        ax.set_title("main job: accuracy and wall-clock")
    else:
        empty(ax, "no main-job figures")
    # (d) what ran
    ax = axes[1, 1]
    ax.set_axis_off()
    text = "\n".join(f"{n:27s} {e['status']:8s} {fmt(e.get('seconds')):>7s} s  {e.get('reason', '')[:45]}"
                     for n, e in parts.items())
    ax.text(0, 1, text, family="monospace", fontsize=8, va="top")
    fig.savefig(path, dpi=90)


# -- command line --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="a few steps per part: a dry run of the chain")
    p.add_argument("--out", default="runs/gpu_suite", help="the folder the output files go to")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST's folder (default: emanorm's lookup)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's time budget (s)")
    p.add_argument("--parts", default=",".join(PART_NAMES), help=f"comma-separated subset of {PART_NAMES}")
    p.add_argument("--workers", type=int, default=None,
                   help="reference / lightly loader workers per loader (default: (cores - 2) / 2; quick 1)")
    p.add_argument("--main-steps", default="auto",
                   help="FixMatch steps of the main job, or auto: what fits --main-seconds")
    p.add_argument("--main-seconds", type=float, default=75.0,
                   help="training time the auto step count aims at (the GPU goal is 2 minutes in all)")
    p.add_argument("--supervised-epochs", type=int, default=5)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the matrix (default inductor; quick: eager)")
    p.add_argument("--commit", default=None,
                   help="the emanorm commit to record (default: git rev-parse HEAD, where there is a .git)")
    p.add_argument("--work-dir", default=None, help="where run directories go (default: a temporary folder)")
    p.add_argument("--measure-cells", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cell-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sync-check", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PART_NAMES]
    if bad:
        p.error(f"unknown part(s) {bad}; allowed: {', '.join(PART_NAMES)}")
    if args.main_steps != "auto" and not (args.main_steps.isdigit() and int(args.main_steps) > 0):
        p.error(f"--main-steps must be a positive integer or auto, got {args.main_steps!r}")
    if args.workers is None:
        args.workers = 1 if args.quick else max(1, ((os.cpu_count() or 2) - 2) // 2)
    if args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        pick_device(args.device)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    if args.measure_cells:
        measure_cells(args)
        return {}
    if args.sync_check:
        sync_check(args)
        return {}
    suite = Suite(args)
    m = suite.results["machine"]
    print(f"# gpu_suite on {m.get('gpu', m['device'])}: torch {m['torch']}, CUDA {m['cuda']}, "
          f"{m['date_utc']}; budget {args.budget_s:.0f} s; out {suite.out}", flush=True)
    def stop(signum: int, _frame: Any) -> None:
        suite.stop_current()
        for entry in suite.results["parts"].values():
            if entry["status"] == "running":  # the JSON says which part the signal cut short
                entry.update(status="killed", reason=f"the suite got signal {signum}")
        suite.save()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        suite.run([p for p in PARTS if p.name in args.parts])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not args.work_dir:  # run directories and per-part JSON: their figures are in the JSON now
            shutil.rmtree(suite.work, ignore_errors=True)
    suite.save()
    plot(suite.results, suite.out / "gpu_suite.png")
    summary = summary_markdown(suite.results)
    (suite.out / "summary.md").write_text(summary)
    if not (suite.out / "cuda_tests.xml").exists():  # the same set of files whatever ran
        (suite.out / "cuda_tests.xml").write_text('<?xml version="1.0"?>\n<testsuites/>\n')
    print(summary, flush=True)
    return suite.results


if __name__ == "__main__":
    main()
