"""Fused EMA update (EMATeacher.update) against the per-tensor state_dict loop of public code.

    python benchmarks/ema_update.py [--model resnet50] [--repeats 30]

Both run in this process on the same model, alternating, after warm-up; prints the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

from emanorm import EMATeacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import state_dict_ema  # the benchmarks folder is not a package: imported by path


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    student = getattr(torchvision.models, args.model)().to(device)
    teacher = EMATeacher(student, norm="eman", momentum=0.999)
    reference_teacher = EMATeacher(student, norm="eman", momentum=0.999).module

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fused() -> None:
        teacher.update(student)
        sync()

    def loop() -> None:
        state_dict_ema(reference_teacher, student, 0.999)
        sync()

    for _ in range(3):  # warm-up
        fused()
        loop()
    fused_times, loop_times = [], []
    for _ in range(args.repeats):  # alternate so drift hits both equally
        fused_times += timed(fused, 1)
        loop_times += timed(loop, 1)
    f, r = statistics.median(fused_times), statistics.median(loop_times)
    n = sum(p.numel() for p in student.state_dict().values())
    print(f"model={args.model} device={device} tensors={len(student.state_dict())} elements={n:,}")
    print(f"fused _foreach update : {f * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"state_dict Python loop: {r * 1e3:8.2f} ms")
    print(f"speedup={r / f:.2f}")


if __name__ == "__main__":
    main()
