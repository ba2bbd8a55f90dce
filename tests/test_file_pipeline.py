"""The file-image (ImageNet) path: training crops from the whole image, the evaluation transform,
reduced-size and device JPEG decoding, and bad files (docs/data.md, "File images")."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from conftest import HANG_BOUND_S
from emanorm.data import BatchStream, DataError, FileImageDataset, load_dataset
from emanorm.data.augment import RandomResizedCropFlip
from emanorm.data.datasets import DEFAULT_MAX_IMAGE_PIXELS, dataset_info, decode_views
from emanorm.data.stream import _CROP, _generator

pytest.importorskip("skimage")
from emanorm.data.samples import write_photo_folder


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-like JPEGs of real photos: 3 classes x 4 train + 1 val, sides 300-600 px, quality 90."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), classes=3, per_class=4, val_per_class=1)


def _files(paths: list[Path], size: int, **kw) -> FileImageDataset:
    base = dataset_info("folder", image_size=size)
    return FileImageDataset([str(p) for p in paths], torch.full((len(paths),), -1), base, "train", **kw)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    info = dataset_info("folder")
    return x * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)


# -- the boxes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("height", "width", "scale"), [(400, 600, (0.2, 1.0)), (451, 300, (0.08, 1.0))])
def test_training_boxes_follow_torchvisions_get_params(height, width, scale):
    """Area fraction, aspect ratio and position of the boxes drawn for a file image against
    torchvision's RandomResizedCrop.get_params on the same full-size, non-square image."""
    n = 4000
    op = RandomResizedCropFlip(224, scale)
    draws = op.draw(n, torch.Generator().manual_seed(1))
    ours = np.array([draws.box(i, height, width) for i in range(n)], dtype=float)
    torch.manual_seed(2)
    image = torch.zeros(3, height, width)
    ref = np.array([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                   dtype=float)
    for name, f in [("area fraction", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                    ("log aspect ratio", lambda b: np.log(b[:, 3] / b[:, 2])),
                    ("centre y", lambda b: (b[:, 0] + b[:, 2] / 2) / height),
                    ("centre x", lambda b: (b[:, 1] + b[:, 3] / 2) / width),
                    ("top", lambda b: b[:, 0] / np.maximum(height - b[:, 2], 1)),
                    ("left", lambda b: b[:, 1] / np.maximum(width - b[:, 3], 1))]:
        p = stats.ks_2samp(f(ours), f(ref)).pvalue
        assert p > 1e-3, f"{name}: KS p={p:.2g}"
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert abs(np.mean(draws.flip) - 0.5) < 0.03


def test_the_fallback_box_is_get_params_fallback():
    # A 20x1000 strip with scale >= 0.9: no try fits, both fall back to the same centred box.
    op = RandomResizedCropFlip(32, (0.9, 1.0))
    draws = op.draw(50, torch.Generator().manual_seed(0))
    ref = T.RandomResizedCrop.get_params(torch.zeros(1, 20, 1000), [0.9, 1.0], [3 / 4, 4 / 3])
    assert {draws.box(i, 20, 1000) for i in range(50)} == {ref}


def _ramp(path: Path, height: int = 400, width: int = 600) -> None:
    """Red encodes x and green encodes y, so a view's corner pixels tell the box it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], 2).round().astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)


def test_each_view_is_its_box_of_the_whole_image_resized_and_flipped(tmp_path):
    """Through BatchStream: every view's edges sit where the stream's generator put its box (PNG and
    JPEG files, the latter also decoded at reduced size when the box is large)."""
    paths = []
    for i, suffix in enumerate([".png", ".jpg"] * 4):
        paths.append(tmp_path / f"ramp{i}{suffix}")
        _ramp(paths[-1])
    size, batch, seed = 128, 8, 5
    ds = _files(paths, size)
    stream = BatchStream(unlabeled=ds, unlabeled_views={"a": "weak", "b": "strong"}, batch_size=batch,
                         seed=seed, augment_options={"cutout": 0.0})
    out = next(iter(stream))
    view = _unnormalise(out["a"])  # weak at >= 128 px: RandomResizedCrop(0.08-1) + flip, nothing else
    op = stream.augment[("unlabeled", "weak")].crop
    assert op is not None and op.scale == (0.08, 1.0)
    draws = op.draw(batch, _generator(seed, _CROP, 0, 0, 0, 0, 0))
    for row in range(batch):
        top, left, h, w = draws.box(row, 400, 600)
        red = view[row, 0].mean(0) * 599  # x along the view's columns (rows averaged)
        green = view[row, 1].mean(1) * 399  # y along the view's rows
        if draws.flipped(row):
            red = red.flip(0)
        step_x, step_y = w / size, h / size
        tol_x, tol_y = 3 + 1.5 * step_x, 3 + 1.5 * step_y
        assert abs(red[0] - (left + step_x / 2)) < tol_x and abs(red[-1] - (left + w - step_x / 2)) < tol_x
        assert abs(green[0] - (top + step_y / 2)) < tol_y and abs(green[-1] - (top + h - step_y / 2)) < tol_y
        assert (red[1:] - red[:-1]).min() > -1.0  # increasing after the flip is undone: flip matches


def test_weak_at_small_size_keeps_its_translate_and_the_none_view_its_centre(tmp_path):
    _ramp(tmp_path / "r.png")
    ds = _files([tmp_path / "r.png"] * 2, 32)
    out = next(iter(BatchStream(unlabeled=ds, unlabeled_views={"n": "none"}, batch_size=2)))
    red = _unnormalise(out["n"])[0, 0].mean(0) * 599
    assert abs(red[0] - 100) < 12 and abs(red[-1] - 499) < 12  # the centred 400x400 square


def test_views_show_content_from_outside_the_centre_square(tmp_path):
    """The issue's example: 512x256 images whose left and right quarters are red and blue. The old
    pipeline cropped the centre square first, so no view ever showed either colour."""
    rgb = np.full((256, 512, 3), 128, np.uint8)
    rgb[:, :128] = (255, 0, 0)
    rgb[:, 384:] = (0, 0, 255)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"quarters{i}.{('png', 'jpg')[i % 2]}")
        Image.fromarray(rgb).save(paths[-1], quality=95)
    ds = _files(paths, 128)
    stream = BatchStream(unlabeled=ds, unlabeled_views={"a": "weak", "b": "weak"}, batch_size=4, seed=0)
    views = torch.cat([_unnormalise(v) for batch in [*stream, *stream] for k, v in batch.items()
                       if k in ("a", "b")])
    red = (views[:, 0] > 0.8) & (views[:, 1] < 0.2) & (views[:, 2] < 0.2)
    blue = (views[:, 2] > 0.8) & (views[:, 0] < 0.2) & (views[:, 1] < 0.2)
    assert red.flatten(1).any(1).float().mean() > 0.3 and blue.flatten(1).any(1).float().mean() > 0.3
    # the evaluation view (resize 146, centre crop 128) stays inside the grey middle
    ev = ds.fetch([0, 1]).float() / 255
    assert not ((ev[:, 0] > 0.8) & (ev[:, 1] < 0.2)).any() and not ((ev[:, 2] > 0.8) & (ev[:, 0] < 0.2)).any()


# -- determinism --------------------------------------------------------------------------------------
def test_same_seed_same_crops_with_workers_and_on_resume(photo_dir):
    ds = load_dataset("imagenet", "train", photo_dir, image_size=64)
    kw = dict(unlabeled=ds, unlabeled_views={"q": "moco", "k": "moco"}, batch_size=4, seed=3)
    serial = list(BatchStream(**kw))
    parallel = list(BatchStream(**kw, num_workers=2))
    resumed = BatchStream(**kw, num_workers=1)
    resumed.set_epoch(0, 1)
    assert len(serial) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(serial[1:], list(resumed), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = next(iter(BatchStream(**{**kw, "seed": 4})))
    assert not torch.equal(other["q"], serial[0]["q"])
    assert not torch.equal(serial[0]["q"], serial[0]["k"])  # two views of one decode, two boxes


def test_fixmatch_views_of_files(photo_dir):
    ds = load_dataset("folder", "train", photo_dir, image_size=128)
    stream = BatchStream(ds, None, ds, None, labeled_views={"x": "weak"},
                         unlabeled_views={"u_w": "weak", "u_s": "strong"}, batch_size=2,
                         unlabeled_batch_size=4, seed=0)
    batch = next(iter(stream))
    assert batch["x"].shape == (2, 3, 128, 128) and batch["u_s"].shape == (4, 3, 128, 128)
    assert batch["u_w"].dtype == torch.float32 and torch.isfinite(batch["u_s"]).all()


# -- evaluation transform -------------------------------------------------------------------------------
def test_evaluation_view_is_resize_256_centre_crop_224(photo_dir):
    ds = load_dataset("imagenet", "val", photo_dir, image_size=224)
    assert ds.crop_fraction == 0.875
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    whole = T.Compose([T.Resize(224), T.CenterCrop(224), T.PILToTensor()])
    full = load_dataset("imagenet", "val", photo_dir, image_size=224, crop_fraction=1.0)
    for i, path in enumerate(ds.paths):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        ours, ref = ds.fetch([i])[0].float(), reference(rgb).float()
        # same decoder (libjpeg-turbo), tensor vs PIL antialiased resize: within a few levels
        assert ours.shape == ref.shape == (3, 224, 224) and (ours - ref).abs().mean() < 2.0
        assert (full.fetch([i])[0].float() - whole(rgb).float()).abs().mean() < 2.0


def test_large_jpegs_decode_at_reduced_size_and_still_match(tmp_path):
    from emanorm.data.samples import photo

    big = tmp_path / "retina.jpg"
    Image.fromarray(photo("retina")).save(big, quality=90)  # 1411 px: >= 4 x 256 at 224
    ds = _files([big], 224)
    with Image.open(big) as im:
        ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(im.convert("RGB")).float()
    assert (ds.fetch([0])[0].float() - ref).abs().mean() < 3.0


# -- bad input ----------------------------------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_its_header_with_the_file_named(tmp_path, monkeypatch):
    bomb = tmp_path / "train" / "x" / "bomb.png"
    bomb.parent.mkdir(parents=True)
    Image.new("1", (20000, 20000)).save(bomb)  # 400M pixels in a few dozen KB
    assert bomb.stat().st_size < 1_000_000
    ds = load_dataset("folder", "train", tmp_path, image_size=32)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    for call in (lambda: ds.fetch([0]), lambda: ds.fetch_views([0], [None])):
        with pytest.raises(DataError, match=r"bomb\.png is 20000x20000 = 400000000 pixels.*max_image_pixels"):
            call()
    assert not decoded  # refused before any decoding
    monkeypatch.undo()
    small = load_dataset("folder", "train", tmp_path, image_size=32, max_image_pixels=10**9)
    assert small.max_image_pixels == 10**9 and ds.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="max_image_pixels"):
        _files([bomb], 32, max_image_pixels=0)


def test_cmyk_sixteen_bit_palette_and_grey_images_decode_in_every_path(tmp_path):
    colour = (200, 100, 50)
    solid = Image.new("RGB", (48, 32), colour)
    files = {"cmyk.jpg": solid.convert("CMYK"), "palette.png": solid.convert("P"),
             "palette_alpha.png": solid.convert("RGBA").convert("P"),
             "rgba.png": solid.convert("RGBA"), "grey.jpg": solid.convert("L"),
             "grey16.png": Image.fromarray(np.full((32, 48), 40000, np.uint16)), "rgb.bmp": solid,
             "rgb.tif": solid, "rgb.webp": solid}
    for name, im in files.items():
        im.save(tmp_path / name, quality=95) if name.endswith(".jpg") else im.save(tmp_path / name)
    paths = [tmp_path / n for n in files]
    ds = _files(paths, 16)
    grey = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    expected = {"grey.jpg": (grey,) * 3, "grey16.png": (40000 >> 8,) * 3}  # 16-bit scaled, not clipped
    op = RandomResizedCropFlip(16)
    views = ds.fetch_views(list(range(len(paths))), [op.draw(len(paths), torch.Generator()), None])
    evals = ds.fetch(list(range(len(paths))))
    for i, name in enumerate(files):
        want = torch.tensor(expected.get(name, colour), dtype=torch.float)
        for got in (views[0][i], views[1][i], evals[i]):
            assert got.shape == (3, 16, 16), name
            assert (got.float().mean((1, 2)) - want).abs().max() < 6, (name, got.float().mean((1, 2)))


def test_a_corrupt_file_read_by_workers_is_one_line_naming_it(corrupt_folder_dir):
    ds = load_dataset("folder", "train", corrupt_folder_dir, image_size=16)
    stream = BatchStream(unlabeled=ds, unlabeled_views={"q": "moco"}, batch_size=len(ds), num_workers=2)
    with pytest.raises(DataError) as err:
        list(stream)
    assert "broken.jpg" in str(err.value) and "\n" not in str(err.value)
    assert "Traceback" not in str(err.value) and "worker" not in str(err.value)


@pytest.mark.slow
def test_cli_corrupt_file_with_two_workers_prints_one_line(tmp_path, corrupt_folder_dir):
    cmd = [sys.executable, "-m", "emanorm", "train", "--method", "moco", "--dataset", "folder",
           "--data-dir", str(corrupt_folder_dir), "--set", "image_size=32", "--max-steps", "2",
           "--method-arg", "queue_size=64", "--batch-size", "4", "--num-workers", "2", "--device", "cpu",
           "--no-progress", "--out", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND_S,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("emanorm: error")]
    assert len(errors) == 1 and "broken.jpg" in errors[0], result.stderr  # progress lines aside


def test_a_symlink_loop_or_a_second_link_does_not_repeat_images(tmp_path):
    from torchvision.datasets import ImageFolder

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    reference = [p for p, _ in ImageFolder(str(tmp_path / "train")).samples]
    assert load_dataset("folder", "train", tmp_path).paths == reference  # torchvision's order
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "a" / "loop")  # a/loop -> a
    os.symlink(tmp_path / "train" / "b" / "0.png", tmp_path / "train" / "b" / "again.png")
    ds = load_dataset("folder", "train", tmp_path)
    assert ds.targets.tolist() == [0, 0, 1, 1] and ds.paths == reference


# -- the device decoder ---------------------------------------------------------------------------------
def test_the_device_decoder_path_gives_the_cpu_views_when_run_on_the_cpu(photo_dir, tmp_path):
    """read_views + decode_views (the nvJPEG path) exercised with device="cpu": same boxes, same
    pixels up to the reduced-size decodes the CPU path may use; non-RGB JPEGs decoded by the reader."""
    ds = load_dataset("imagenet", "train", photo_dir, image_size=128)
    with Image.open(ds.paths[0]) as im:
        im.convert("CMYK").save(tmp_path / "cmyk.jpg")
    ds.paths[1] = str(tmp_path / "cmyk.jpg")
    op = RandomResizedCropFlip(128, (0.2, 1.0))
    draws = [op.draw(len(ds), torch.Generator().manual_seed(v)) for v in range(2)]
    encoded = ds.read_views(range(len(ds)), draws)
    assert encoded.jpeg[1] is None and encoded.decoded[1] is not None and encoded.jpeg[0] is not None
    cpu = ds.fetch_views(range(len(ds)), draws)
    for c, d in zip(cpu, decode_views(encoded, "cpu"), strict=True):
        assert d.shape == c.shape and d.dtype == torch.uint8
        assert (d.float() - c.float()).abs().mean() < 3.0


def test_the_stream_carries_undecoded_batches_through_workers(photo_dir):
    """The stream's device-decoder path (on CUDA it is the default) forced on the CPU: workers send
    bytes and boxes, the main process decodes; same seed, same batches, serial or with workers."""
    ds = load_dataset("imagenet", "train", photo_dir, image_size=64)
    kw = dict(unlabeled=ds, unlabeled_views={"q": "moco", "k": "moco"}, batch_size=4, seed=2)
    runs = []
    for workers in (0, 2):
        stream = BatchStream(**kw, num_workers=workers)
        stream._requests = [dataclasses.replace(r, encoded=True) for r in stream._requests]
        runs.append(list(stream))
    plain = list(BatchStream(**kw))
    for a, b, c in zip(*runs, plain, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (a["q"] - c["q"]).abs().mean() < 0.1  # normalised units: decoders differ slightly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_gpu_decoding_gives_the_cpu_views(photo_dir, tmp_path):
    ds = load_dataset("imagenet", "train", photo_dir, image_size=224)
    Image.open(ds.paths[0]).convert("CMYK").save(tmp_path / "cmyk.jpg")  # decoded on the CPU instead
    ds.paths[1] = str(tmp_path / "cmyk.jpg")
    n = len(ds)
    op = RandomResizedCropFlip(224, (0.2, 1.0))
    draws = [op.draw(n, torch.Generator().manual_seed(v)) for v in range(2)]
    cpu = ds.fetch_views(range(n), draws)
    gpu = decode_views(ds.read_views(range(n), draws), "cuda")
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda" and g.shape == c.shape
        assert (g.cpu().float() - c.float()).abs().mean() < 4.0  # nvJPEG vs libjpeg, reduced decodes
    kw = dict(unlabeled=ds, unlabeled_views={"q": "moco", "k": "moco"}, batch_size=4, seed=0)
    on_gpu = next(iter(BatchStream(**kw, device="cuda", num_workers=2)))
    assert on_gpu["q"].device.type == "cuda" and math.isfinite(on_gpu["q"].sum().item())
