"""The machine a run's figures depend on, besides its config (recorded in ``summary.json``).

PyTorch picks its CPU kernels by the instruction set it finds (``AVX512``, ``AVX2``, ...; forced
with ``ATEN_CPU_CAPABILITY``), and the kernels round differently: the same command on two CPUs
gives accuracies a few tenths apart. The capability and the CPU model are recorded so a figure
can be reproduced on a machine of the same kind.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_capability() -> str:
    """The instruction set PyTorch's CPU kernels use here: ``AVX512``, ``AVX2``, ``DEFAULT``, ..."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # torch < 2.0 has no such query
        return "unknown"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s ``model name`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_environment() -> dict[str, str]:
    """``cpu_capability`` and ``cpu_model`` for ``summary.json``'s ``environment``."""
    return {"cpu_capability": cpu_capability(), "cpu_model": cpu_model()}
