"""The training input path on an ImageNet-style JPEG folder: emanorm against the per-sample reference.

    OMP_NUM_THREADS=1 python benchmarks/file_pipeline.py                  # CPU, ~2 min; last line speedup=X
    python benchmarks/file_pipeline.py --device cuda --batch 256 --workers 8  # on a GPU (nvJPEG)

Both paths read the same folder (``--data-dir``, or real photographs from scikit-image written as
ImageNet-like JPEGs: sides 300-600 px, quality 90) and make two MoCo v2 views at ``--size`` per image,
with the same number of DataLoader workers:

* emanorm: ``BatchStream`` over ``load_dataset("imagenet", ...)`` with views ``q``/``k`` of preset
  ``moco``. Workers read each file, decode it once (at reduced size when both crops allow), cut both
  RandomResizedCrop boxes out of the whole image, resize and flip them; the main process (or the GPU)
  runs colour jitter, grayscale, blur and normalisation on the batch.
* reference: ``torchvision.datasets.ImageFolder`` (PIL loader) with MoCo v2's transform written in
  torchvision v1 transforms (RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8,
  RandomGrayscale 0.2, PIL Gaussian blur sigma 0.1-2 p=0.5, flip, ToTensor, Normalize) applied twice
  per image in DataLoader workers, batches collated by the DataLoader: the way the paper's code runs.

Measured per pass over the folder: CPU seconds of this process and its loader workers (getrusage;
the workers are counted once they exit at the end of the pass), so "images per CPU-second" is the
per-core throughput and other jobs on a shared machine disturb it little; and wall-clock images/s.
The paths alternate for ``--passes`` passes each; medians are reported. Last line: ``speedup=X``,
emanorm's images per CPU-second over the reference's (on CUDA: wall-clock images/s, GPU work included).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import ImageFilter
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from emanorm.data import BatchStream, load_dataset
from emanorm.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from emanorm.data.samples import write_photo_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # the benchmarks folder is not a package: imported by path


class PILGaussianBlur:
    """MoCo v2's blur: PIL's GaussianBlur with a radius drawn uniformly from ``sigma``."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoViews:
    def __init__(self, transform: T.Compose) -> None:
        self.transform = transform

    def __call__(self, img):
        return [self.transform(img), self.transform(img)]


def reference_transform(size: int) -> TwoViews:
    return TwoViews(T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))


def cpu_seconds() -> float:
    """CPU time of this process plus its finished (waited-for) children: the loader workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_pass(batches, device: torch.device) -> tuple[int, float, float]:
    """(images, CPU seconds, wall seconds) of one pass; every view is made and, on CUDA, finished."""
    cpu, wall, images = cpu_seconds(), time.perf_counter(), 0
    for batch in batches:
        q, k = batch
        images += len(q)
        if device.type == "cuda":
            q, k = q.to(device, non_blocking=True), k.to(device, non_blocking=True)
            torch.cuda.synchronize(device)
    return images, cpu_seconds() - cpu, time.perf_counter() - wall


def emanorm_batches(root: Path, size: int, batch: int, workers: int, device: torch.device, epoch: int):
    ds = load_dataset("imagenet", "train", root, image_size=size)
    stream = BatchStream(unlabeled=ds, unlabeled_views={"q": "moco", "k": "moco"}, batch_size=batch, seed=0,
                         device=device, num_workers=workers)
    stream.set_epoch(epoch)
    return ((b["q"], b["k"]) for b in stream)


def reference_batches(root: Path, size: int, batch: int, workers: int, device: torch.device, epoch: int):
    ds = datasets.ImageFolder(str(root / "train"), transform=reference_transform(size))
    g = torch.Generator().manual_seed(epoch)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=g, persistent_workers=False)
    return ((views[0], views[1]) for views, _ in loader)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="an ImageFolder root with train/ (default: photos)")
    parser.add_argument("--images", type=int, default=384, help="photos to write when no --data-dir")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--passes", type=int, default=3, help="timed passes of each path (alternating)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    print(machine_info(device))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir
        if root is None:
            classes = 8
            root = write_photo_folder(Path(tmp) / "photos", classes=classes, per_class=args.images // classes,
                                      val_per_class=0)
        paths = {"emanorm": emanorm_batches, "reference": reference_batches}
        for make in paths.values():  # warm-up: file cache, imports, allocator
            timed_pass(make(root, args.size, args.batch, args.workers, device, 99), device)
        runs: dict[str, list[tuple[int, float, float]]] = {name: [] for name in paths}
        for p in range(args.passes):
            for name, make in paths.items():
                batches = make(root, args.size, args.batch, args.workers, device, p)
                images, cpu, wall = timed_pass(batches, device)
                runs[name].append((images, cpu, wall))
                print(f"pass {p} {name:9s}: {images} images, {cpu:6.2f} CPU-s "
                      f"({images / cpu:6.1f} img/CPU-s), {wall:6.2f} s wall ({images / wall:6.1f} img/s)",
                      flush=True)
    per_cpu = {n: statistics.median(i / c for i, c, _ in r) for n, r in runs.items()}
    per_wall = {n: statistics.median(i / w for i, _, w in r) for n, r in runs.items()}
    print(f"two MoCo v2 views at {args.size}, batch {args.batch}, {args.workers} worker(s), device {device}")
    print("| path | images per CPU-second | wall img/s |")
    print("|---|---|---|")
    for name in paths:
        print(f"| {name} | {per_cpu[name]:.1f} | {per_wall[name]:.1f} |")
    key = per_wall if device.type == "cuda" else per_cpu
    speedup = key["emanorm"] / key["reference"]
    print(f"speedup={speedup:.2f}")
    return {"speedup": speedup, **{f"{n}_img_per_cpu_s": v for n, v in per_cpu.items()}}


if __name__ == "__main__":
    main()
