"""What per-GPU BN emulation (``--bn-splits 8``) costs: step time with 8 splits over 1 split.

    python benchmarks/split_bn.py                       # small-moco and small-byol, CPU, one thread
    python benchmarks/split_bn.py --methods moco --blocks 15 --batch-size 256
    python benchmarks/split_bn.py --device cuda --threads 0

Both runs are built in this process from the same preset (``norm bn``, stand-in 28 px images), one
with ``bn_splits=8`` and one without; the same batches go through ``emanorm.train.train_step`` of
each in alternating blocks after warm-up, so the machine's drift hits both. Per method it prints
the median over blocks of (8-split block time / 1-split block time), then
``ratio=<the largest of them>`` (1.00: free). A one-layer forward + backward line per memory
format shows where the cost sits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from emanorm.norms import SplitBatchNorm2d
from emanorm.train import build_run, resolve_config, train_step
from emanorm.train.distributed import single_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import standin_dataset, sync  # the benchmarks folder is not a package: imported by path


def step_runner(method: str, splits: int, args: argparse.Namespace, batches: list[Any]) -> Any:
    torch.manual_seed(0)  # the same initial weights for both runs
    overrides = {"device": args.device, "bn_splits": splits, "norm": "bn", "batch_size": args.batch_size,
                 "max_steps": 10_000, "seed": 0}  # fmt: skip
    cfg = resolve_config(f"small-{method}", overrides)
    dataset = standin_dataset(28, 4 * args.batch_size, channels=1)
    run = build_run(cfg, single_process(args.device), train_ds=dataset, test_ds=dataset)
    run.method.train()
    if not batches:
        stream = iter(run.stream)
        batches.extend(next(stream) for _ in range(args.steps))
    device = torch.device(args.device)

    def block(step0: int) -> float:
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            train_step(run.step_fn, run.method, batch, step0 + i, run.total_steps, run.optimizer,
                       run.scheduler, amp=run.amp, scaler=run.scaler)
        sync(device)
        return time.perf_counter() - start

    return block


def step_ratio(method: str, args: argparse.Namespace) -> float:
    batches: list[Any] = []
    whole, split = step_runner(method, 1, args, batches), step_runner(method, 8, args, batches)
    whole(0), split(0)  # warm-up
    ratios = []
    for b in range(args.blocks):
        step0 = (b + 1) * args.steps
        one, eight = whole(step0), split(step0)
        ratios.append(eight / one)
        print(f"{method} block {b}: 1 split {one / args.steps * 1e3:7.1f} ms/step, "
              f"8 splits {eight / args.steps * 1e3:7.1f} ms/step, ratio {eight / one:.3f}", flush=True)
    ratio = statistics.median(ratios)
    blocks = f"median of {args.blocks} blocks of {args.steps} steps"
    print(f"{method}: 8 splits / 1 split = {ratio:.3f} ({blocks})")
    return ratio


def layer_ratio(channels_last: bool, args: argparse.Namespace, repeats: int = 20) -> float:
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 32, 14, 14, device=device)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_()
    layers = {s: SplitBatchNorm2d(32, s).to(device) for s in (1, 8)}
    times: dict[int, list[float]] = {1: [], 8: []}
    for block in range(args.blocks + 1):
        for s, layer in layers.items():
            start = time.perf_counter()
            for _ in range(repeats):
                layer(x).sum().backward()
            sync(device)
            if block:  # the first block warms up
                times[s].append(time.perf_counter() - start)
    ratio = statistics.median(e / o for e, o in zip(times[8], times[1], strict=True))
    layout = "channels_last" if channels_last else "NCHW"
    print(f"one layer ({args.batch_size}, 32, 14, 14) {layout}, forward + backward: 8 / 1 = {ratio:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> float:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--methods", default="moco,byol", help="small presets (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="a multiple of 8 (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=9, help="timed blocks per run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="steps per block (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's (default: 1)")
    args = parser.parse_args(argv)
    if args.batch_size % 8:
        parser.error(f"--batch-size must be a multiple of 8, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for channels_last in (False, True):
        layer_ratio(channels_last, args)
    worst = max(step_ratio(method, args) for method in args.methods.split(","))
    print(f"ratio={worst:.3f}")
    return worst


if __name__ == "__main__":
    main()
