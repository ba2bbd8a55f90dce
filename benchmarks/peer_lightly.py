"""Training images per second of emanorm against lightly (MoCo and BYOL), same backbone, batch and data.

    pip install -e ".[bench]"                       # lightly and psutil: benchmark extras only
    python benchmarks/peer_lightly.py --quick
    python benchmarks/peer_lightly.py               # the figures of docs/performance.md

lightly's side is written the way its examples (examples/pytorch/moco.py, byol.py) run it: its own
heads (``MoCoProjectionHead``, ``BYOLProjectionHead`` / ``BYOLPredictionHead``), losses
(``NTXentLoss`` with a memory bank, ``NegativeCosineSimilarity``), transforms (``MoCoV2Transform``,
``BYOLTransform``) applied per PIL image in a DataLoader with ``--workers`` workers, ``update_momentum``
each step with ``cosine_schedule``, momentum networks in training mode. The backbone is emanorm's
(the preset's, ``small`` by default), the batch, head sizes, queue, temperature, learning rate and
momentum come from the same preset as emanorm's side (small-moco / small-byol); images are 28 px
Fashion-MNIST (1 channel, its own mean/std) and Gaussian blur is off as in emanorm's presets at
<= 32 px (and lightly's CIFAR-10 benchmarks). The last line is ``speedup=<smaller of the two>``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Path_ as _Path
from _common import (  # the benchmarks folder is not a package: imported by path
    PILImages,
    _Loader,
    bench_config,
    build_emanorm,
    comparison_main,
    comparison_parser,
    parse_comparison_args,
    pick_device,
    reference_options,
    shared_overrides,
    total_steps_of,
    train_dataset,
)
from emanorm.models import build_backbone

METHODS = ("moco", "byol")


def _lightly() -> Any:
    try:
        import lightly
    except ImportError as err:
        raise SystemExit("lightly is not installed: pip install -e '.[bench]' (or lightly)") from err
    import lightly.loss
    import lightly.models.modules
    import lightly.models.utils
    import lightly.transforms
    import lightly.utils.scheduler

    return lightly


class LightlyPath(_Path):
    """MoCo or BYOL as lightly's examples run them, on emanorm's backbone and data."""

    name = "lightly"
    warm_steps = 3

    def __init__(self, method: str, cfg: dict[str, Any], train_ds: Any, workers: int = 2) -> None:
        lightly = _lightly()
        utils = lightly.models.utils
        heads = lightly.models.modules
        self.method, self.cfg = method, cfg
        self.device = device = pick_device(cfg["device"])
        info = train_ds.info
        normalize = {"mean": list(info.mean), "std": list(info.std)}
        opts = reference_options(cfg)  # the OPTIONS defaults emanorm runs, under method_args
        self.backbone = build_backbone(cfg["backbone"], in_channels=info.channels,
                                       image_size=info.image_size).to(device)
        d = self.backbone.feature_dim
        if method == "moco":
            dim = opts["dim"]
            self.projection_head = heads.MoCoProjectionHead(d, d, dim).to(device)
            self.criterion = lightly.loss.NTXentLoss(temperature=opts["temperature"],
                                                     memory_bank_size=(opts["queue_size"], dim))
            transform = lightly.transforms.MoCoV2Transform(input_size=info.image_size, gaussian_blur=0.0,
                                                           normalize=normalize)
            self.prediction_head = None
        else:
            hidden, proj = opts["hidden_dim"], opts["proj_dim"]
            self.projection_head = heads.BYOLProjectionHead(d, hidden, proj).to(device)
            self.prediction_head = heads.BYOLPredictionHead(proj, hidden, proj).to(device)
            self.criterion = lightly.loss.NegativeCosineSimilarity()
            transform = lightly.transforms.BYOLTransform(
                view_1_transform=lightly.transforms.BYOLView1Transform(
                    input_size=info.image_size, gaussian_blur=0.0, normalize=normalize),
                view_2_transform=lightly.transforms.BYOLView2Transform(
                    input_size=info.image_size, gaussian_blur=0.0, normalize=normalize),
            )
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.update_momentum = utils.update_momentum
        self.cosine_schedule = lightly.utils.scheduler.cosine_schedule
        b = cfg["batch_size"]
        self.loader = _Loader(PILImages(train_ds.images, train_ds.targets, transform), b, workers, device)
        self.total_steps = total_steps_of(cfg, len(train_ds) // b)
        modules = [self.backbone, self.projection_head] + ([self.prediction_head] if self.prediction_head
                                                            else [])
        params = [p for m in modules for p in m.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"],
                                         weight_decay=cfg["weight_decay"])
        self.images_per_step = b
        self.global_step = 0
        self.criterion.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return self.prediction_head(z) if self.prediction_head is not None else z

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def step(self) -> None:
        views, _ = self.loader.next()
        m = self.cosine_schedule(self.global_step, self.total_steps, self.cfg["ema_momentum"], 1.0)
        self.update_momentum(self.backbone, self.backbone_momentum, m=m)
        self.update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        x0, x1 = views[0].to(self.device), views[1].to(self.device)
        if self.method == "moco":
            loss = self.criterion(self.forward(x0), self.forward_momentum(x1))
        else:
            p0, z0 = self.forward(x0), self.forward_momentum(x0)
            p1, z1 = self.forward(x1), self.forward_momentum(x1)
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_step += 1

    def start_block(self) -> None:
        for _ in range(self.warm_steps):
            self.step()

    def end_block(self) -> None:
        self.loader.stop()


def modules_of(path: LightlyPath) -> list[nn.Module]:
    """Every module of the lightly side (for parameter counts in tests)."""
    out = [path.backbone, path.projection_head, path.backbone_momentum, path.projection_head_momentum]
    return out + ([path.prediction_head] if path.prediction_head is not None else [])


def build(method: str, which: str, args: Any, cache: dict[str, Any]) -> _Path:
    if which == "emanorm":
        return build_emanorm(method, args, cache)
    if which != "lightly":
        raise ValueError(f"unknown path {which!r}; allowed: emanorm, lightly")
    cfg = bench_config(method, args.device, shared_overrides(args))
    if "ds" not in cache:
        cache["ds"] = train_dataset(cfg, args.standin, args.standin_count)
    path = LightlyPath(method, cfg, cache["ds"], workers=args.workers)
    path.warm_steps = args.block_warmup
    path.threads = args.other_threads
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_comparison_args(comparison_parser(__doc__, METHODS, "lightly"), argv, METHODS)
    _lightly()
    return comparison_main(args, build=build, other="lightly", script=__file__)


if __name__ == "__main__":
    main()
