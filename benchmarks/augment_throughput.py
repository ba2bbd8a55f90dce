"""Throughput of the augmentation presets against per-sample PIL pipelines (the usual DataLoader way).

    python benchmarks/augment_throughput.py --size 28 --channels 1 --batch 256 --threads 1
    python benchmarks/augment_throughput.py --stream     # whole BatchStream steps on Fashion-MNIST

Times are CPU seconds of this process (``time.process_time``), median of ``--repeats`` batches, so
other jobs on a shared machine disturb them less than wall-clock would.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TVF

from emanorm.data.augment import AUGMENTATIONS, blur_kernel_size, build_augmentation
from emanorm.data.datasets import DatasetInfo


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return sorted(times)[len(times) // 2]


def pil_pipeline(preset: str, size: int, channels: int) -> T.Compose | None:
    """The same preset written the usual way: torchvision v1 transforms on one PIL image at a time."""
    flip = T.RandomHorizontalFlip()
    jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4 if preset == "moco" else 0.2,
                                          0.1 if channels == 3 else 0.0)], p=0.8)
    gray = [T.RandomGrayscale(0.2)] if channels == 3 else []
    blur = ([T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))],
                           p={"moco": 0.5, "byol1": 1.0, "byol2": 0.1}.get(preset, 0))]
            if size > 32 else [])
    weak = ([T.RandomResizedCrop(size), flip] if size >= 128
            else [T.RandomCrop(size, padding=round(0.125 * size), padding_mode="reflect"), flip])
    ops = {
        "none": [],
        "weak": weak,
        "strong": [*weak, T.RandAugment(2, 10)],
        "moco": [T.RandomResizedCrop(size, (0.2, 1.0)), jitter, *gray, *blur, flip],
        "byol1": [T.RandomResizedCrop(size), flip, jitter, *gray, *blur],
        "byol2": [T.RandomResizedCrop(size), flip, jitter, *gray, *blur, T.RandomSolarize(128, 0.2)],
    }[preset]
    return T.Compose([*ops, T.ToTensor(), T.Normalize((0.5,) * channels, (0.25,) * channels)])


def run(size: int, channels: int, batch: int, repeats: int, pil: bool) -> list[dict[str, float | str]]:
    info = DatasetInfo("bench", 10, channels, size, (0.5,) * channels, (0.25,) * channels)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    images = [TVF.to_pil_image(im) for im in x[: min(batch, 256)]]
    rows = []
    for preset in AUGMENTATIONS:
        aug = build_augmentation(preset, info)
        ours = batch / _median_seconds(lambda aug=aug: aug(x), repeats)
        row: dict[str, float | str] = {"preset": preset, "batched_img_s": ours}
        if pil:
            pipe = pil_pipeline(preset, size, channels)

            def per_sample(pipe: T.Compose = pipe) -> torch.Tensor:
                return torch.stack([pipe(im) for im in images])

            row["pil_img_s"] = len(images) / _median_seconds(per_sample, max(3, repeats // 3))
        rows.append(row)
    return rows


def run_stream(repeats: int) -> None:
    """CPU cost of whole BatchStream steps (fetch + every view) on Fashion-MNIST, per method shape."""
    from emanorm.data.datasets import load_dataset
    from emanorm.data.splits import select_labeled
    from emanorm.data.stream import BatchStream

    ds = load_dataset("fashion_mnist", "train")
    labeled = select_labeled(ds.targets, 10, labels_per_class=25)
    shapes = {
        "fixmatch 64+320 (weak; weak+strong)": dict(
            labeled=ds, labeled_indices=labeled, unlabeled=ds, labeled_views={"x": "weak"},
            unlabeled_views={"u_w": "weak", "u_s": "strong"}, batch_size=64, unlabeled_batch_size=320),
        "moco 256 x 2 views": dict(unlabeled=ds, unlabeled_views={"q": "moco", "k": "moco"}, batch_size=256),
        "byol 256 x 2 views": dict(unlabeled=ds, unlabeled_views={"v1": "byol1", "v2": "byol2"},
                                   batch_size=256),
    }
    for name, kw in shapes.items():
        it = iter(BatchStream(**kw))
        batch = next(it)
        seconds = _median_seconds(lambda it=it: next(it), repeats)
        images = sum(v.shape[0] for v in batch.values() if v.dim() == 4)
        print(f"{name:38s} {seconds * 1000:6.1f} ms/step  {images / seconds:8.0f} augmented img/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pil", action="store_true", help="skip the per-sample PIL reference")
    p.add_argument("--stream", action="store_true", help="time whole BatchStream steps instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stream:
        run_stream(args.repeats)
        return
    print(f"# {args.size}x{args.size}x{args.channels}, batch {args.batch}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'preset':8s} {'batched img/s':>14s} {'PIL img/s':>10s} {'speed-up':>9s}")
    for r in run(args.size, args.channels, args.batch, args.repeats, not args.no_pil):
        pil = r.get("pil_img_s")
        extra = f"{pil:10.0f} {r['batched_img_s'] / pil:8.1f}x" if pil else ""
        print(f"{r['preset']:8s} {r['batched_img_s']:14.0f} {extra}")


if __name__ == "__main__":
    main()
