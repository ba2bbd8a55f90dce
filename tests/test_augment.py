"""Augmentation presets: shapes, ranges, per-sample randomness, and agreement with torchvision's ops."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from emanorm.data import AUGMENTATIONS, DatasetInfo, build_augmentation
from emanorm.data.augment import (
    ColorJitter,
    Cutout,
    GaussianBlur,
    RandAugment,
    RandomResizedCropFlip,
    RandomTranslateFlip,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    dino_local_size,
)

RANDOM = [p for p in AUGMENTATIONS if p != "none"]


def _info(channels: int, size: int) -> DatasetInfo:
    return DatasetInfo("test", 10, channels, size, (0.5,) * channels, (0.25,) * channels)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content (not pure noise) so crops, flips and blurs change pixel values
    base = torch.randint(0, 256, (n, channels, size // 4 + 1, size // 4 + 1), generator=g, dtype=torch.uint8)
    return TF.resize(base, [size, size], antialias=True)


def _denorm(y: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    return y * torch.tensor(info.std).view(1, -1, 1, 1) + torch.tensor(info.mean).view(1, -1, 1, 1)


@pytest.mark.parametrize("preset", AUGMENTATIONS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 32), (3, 28)])
def test_preset_shape_dtype_range(preset: str, channels: int, size: int) -> None:
    info = _info(channels, size)
    aug = build_augmentation(preset, info)
    x = _images(16, channels, size)
    y = aug(x, generator=torch.Generator().manual_seed(0))
    side = dino_local_size(size) if preset == "dino_local" else size  # DINO's local crops are smaller
    assert y.shape == (16, channels, side, side) and y.dtype == torch.float32 and y.is_contiguous()
    z = _denorm(y, info)
    assert torch.isfinite(y).all() and z.min() >= -1e-4 and z.max() <= 1 + 1e-4
    if preset == "none":
        assert torch.allclose(z, x.float() / 255, atol=1e-5)


@pytest.mark.parametrize(("preset", "size"), [("moco", 96), ("strong", 96), ("byol1", 224), ("weak", 224)])
def test_preset_large_sizes(preset: str, size: int) -> None:
    info = _info(3, size)
    aug = build_augmentation(preset, info)
    x = _images(2, 3, size)
    y = aug(x)
    assert y.shape == (2, 3, size, size) and torch.isfinite(y).all()
    z = _denorm(y, info)
    assert z.min() >= -1e-4 and z.max() <= 1 + 1e-4 and not torch.allclose(z, x.float() / 255, atol=1e-2)
    if preset == "weak":  # FixMatch's ImageNet weak view is RandomResizedCrop + flip
        assert isinstance(aug.ops[0], RandomResizedCropFlip)
    if preset in ("moco", "byol1"):
        assert isinstance(aug.ops[-1], GaussianBlur) and aug.ops[-1].kernel_size == blur_kernel_size(size)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 9


@pytest.mark.parametrize("preset", RANDOM)
@pytest.mark.parametrize("channels", [1, 3])
def test_fresh_randomness_per_sample(preset: str, channels: int) -> None:
    info = _info(channels, 32)
    x = _images(1, channels, 32).expand(8, -1, -1, -1)
    y = build_augmentation(preset, info)(x, generator=torch.Generator().manual_seed(1))
    distinct = {tuple(v.flatten()[::7].tolist()) for v in y}
    assert len(distinct) >= 5, f"{preset}: identical inputs gave only {len(distinct)} distinct outputs"


@pytest.mark.parametrize("preset", RANDOM)
def test_generator_reproduces_and_float_input(preset: str) -> None:
    info = _info(3, 32)
    aug = build_augmentation(preset, info)
    x = _images(6, 3, 32)
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x.float() / 255, generator=torch.Generator().manual_seed(7))
    c = aug(x, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c)


def test_input_resized_empty_and_errors() -> None:
    info = _info(3, 32)
    y = build_augmentation("none", info)(_images(2, 3, 48))
    assert y.shape == (2, 3, 32, 32)
    for preset in AUGMENTATIONS:
        assert build_augmentation(preset, info)(_images(0, 3, 32)).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="none, weak, strong, moco, byol1, byol2"):
        build_augmentation("simclr", info)
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        build_augmentation("weak", info)(_images(2, 1, 32))


def test_crop_flip_is_exact_identity_or_mirror() -> None:
    x = _images(64, 3, 16).float() / 255
    op = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    y = op(x, torch.Generator().manual_seed(0))
    same = (y - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_crop_boxes_follow_torchvision_bounds() -> None:
    op = RandomResizedCropFlip(32, scale=(0.2, 1.0))
    top, left, h, w = op.boxes(2000, 32, 32, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.15 and area.max() <= 1.0 and area.std() > 0.1
    assert ((w / h) >= 0.6).all() and ((w / h) <= 1.6).all()


def test_translate_is_a_shifted_reflect_padded_copy() -> None:
    x = _images(32, 1, 12).float()
    op = RandomTranslateFlip(pad=2, flip_p=0.0)
    y = op(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(4):
        windows = [padded[i, :, dy:dy + 12, dx:dx + 12] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)
    shifts = {tuple(y[i, 0, 5, 3:8].tolist()) for i in range(32)}
    assert len(shifts) > 5


@pytest.mark.parametrize(("ours", "theirs", "factor"), [
    (adjust_brightness, TF.adjust_brightness, 1.3),
    (adjust_contrast, TF.adjust_contrast, 0.7),
    (adjust_saturation, TF.adjust_saturation, 1.4),
    (adjust_hue, TF.adjust_hue, 0.08),
    (adjust_hue, TF.adjust_hue, -0.1),
])
def test_colour_formulas_match_torchvision(ours, theirs, factor: float) -> None:
    x = _images(4, 3, 8).float() / 255
    f = torch.full((4, 1, 1, 1), factor)
    assert torch.allclose(ours(x.clone(), f), theirs(x, factor), atol=1e-5)
    # per-sample factors: each sample gets its own
    fs = torch.tensor([0.9, 1.0, 1.1, 1.2]).view(4, 1, 1, 1) if ours is not adjust_hue else \
        torch.tensor([-0.1, 0.0, 0.05, 0.1]).view(4, 1, 1, 1)
    per = ours(x.clone(), fs)
    for i in range(4):
        assert torch.allclose(per[i], theirs(x[i], float(fs[i])), atol=1e-5)


def test_colour_jitter_grey_input_skips_colour() -> None:
    op = ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0, channels=1)
    assert op.saturation == 0 and op.hue == 0
    x = _images(8, 1, 8).float() / 255
    y = op(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, x)  # brightness and contrast still apply


def test_blur_matches_torchvision_per_sample_sigma() -> None:
    x = _images(5, 3, 20).float() / 255
    op = GaussianBlur(5, (0.1, 2.0), p=1.0)
    y = op(x, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.rand(5, generator=g)  # the apply-coin draws, then one sigma per sample
    sigmas = torch.rand(5, generator=g) * 1.9 + 0.1
    for i in range(5):
        ref = TF.gaussian_blur(x[i], [5, 5], [float(sigmas[i])] * 2)
        assert torch.allclose(y[i], ref, atol=1e-5)


def test_cutout_box() -> None:
    x = torch.zeros(16, 1, 20, 20)
    y = Cutout(0.5)(x, torch.Generator().manual_seed(0))
    filled = (y == 0.5).sum(dim=(1, 2, 3))
    assert (filled > 0).all() and (filled <= 100).all() and (filled == 100).any()


def test_randaugment_matches_torchvision() -> None:
    from torchvision.transforms.v2 import RandAugment as TvRandAugment

    tv = TvRandAugment(num_ops=2, magnitude=10)
    space = getattr(tv, "_AUGMENTATION_SPACE", None)
    apply = getattr(tv, "_apply_image_or_video_transform", None)
    if space is None or apply is None:
        pytest.skip("torchvision's RandAugment internals changed; nothing to compare against")
    ours = RandAugment(2, 10)
    assert tuple(space) == RandAugment.OPS
    x = _images(3, 3, 32).float() / 255
    for name, (mags, signed) in space.items():
        assert (name in RandAugment.SIGNED) == signed
        m = mags(31, 32, 32)
        mag = float(m[10]) if m is not None else 0.0
        assert math.isclose(ours.op_magnitude(name, 32, 32), mag, rel_tol=1e-6, abs_tol=1e-6), name
        for sign in (1.0, -1.0) if signed else (1.0,):
            expected = apply(x, name, sign * mag, tv.interpolation, tv._fill)
            assert torch.allclose(ours.apply(x, name, sign * mag), expected, atol=1e-6), name


def test_randaugment_draws_per_sample() -> None:
    op = RandAugment(1, 10)
    x = _images(1, 3, 16).float().expand(64, -1, -1, -1) / 255
    y = op(x, torch.Generator().manual_seed(0))
    assert len({tuple(v.flatten()[::5].tolist()) for v in y}) > 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", AUGMENTATIONS)
def test_cuda_matches_cpu(preset: str) -> None:
    info = _info(3, 32)
    aug = build_augmentation(preset, info)
    x = _images(8, 3, 32)
    cpu = aug(x, generator=torch.Generator().manual_seed(2))
    gpu = aug(x.cuda(), generator=torch.Generator().manual_seed(2))
    # nearest-neighbour geometry (RandAugment) may round a boundary pixel differently on the GPU
    close = ((cpu - gpu.cpu()).abs() < 1e-3).float().mean()
    assert gpu.is_cuda and gpu.dtype == torch.float32 and close > 0.99
