"""The batched augmentation ops: each draws its parameters per sample (on the CPU, from an optional
``torch.Generator``) and applies them vectorised on the batch's device: crops and flips as one
``grid_sample`` or one gather, colour jitter with per-sample factors, blur as a grouped
convolution, RandAugment by groups of samples that drew the same op. The presets that combine them
are :mod:`emanorm.data.augment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from emanorm.data.images import Box
from emanorm.data.registry import DataError

Generator = torch.Generator | None


def _uniform(n: int, lo: float, hi: float, g: Generator) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _coin(n: int, p: float, g: Generator) -> Tensor:
    return torch.rand(n, generator=g) < p


def _rows(mask: Tensor) -> Tensor:
    return mask.nonzero().squeeze(1)


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma as in torchvision's rgb_to_grayscale, keeping a channel dim of 1."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0]).add_(0.587 * x[:, 1]).add_(0.114 * x[:, 2]).unsqueeze(1)


# Per-sample colour ops: ``f`` has shape (n, 1, 1, 1); formulas follow torchvision's functional ops.
# In-place steps on fresh temporaries compute the same values as the plain expressions, with fewer
# large allocations (each costs page faults on the CPU, more than the arithmetic at 224 px).
def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f).clamp_(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x).add_((1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (f * x).add_((1 - f) * _gray(x)).clamp_(0, 1)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the HSV hue by ``f`` (in turns, per sample), fused: RGB -> HSV -> RGB in one pass.

    HSV keeps V = max and V*S = max - min, so only the hue (in sixths of a turn) is computed, as
    torchvision does (r, then g, then b wins a tie for the max); RGB comes back through the closed
    form V - delta * clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6, n = 5, 3, 1. Works per channel
    plane (elementwise ops), which is several times faster on CPU than reductions over dim 1.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    # Every step writes into one of a few buffers (out=, in place): the same values as the plain
    # expressions maxc == r ? (g - b) / d : maxc == g ? (b - r) / d + 2 : (r - g) / d + 4, etc.
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    delta = torch.minimum(r, g)
    torch.minimum(delta, b, out=delta)
    torch.sub(maxc, delta, out=delta)
    inv = delta.clamp_min(1e-12).reciprocal_()  # what ``1 / t`` computes
    h6 = torch.sub(r, g).mul_(inv).add_(4)
    other = torch.sub(b, r).mul_(inv).add_(2)
    where = torch.eq(maxc, g)
    torch.where(where, other, h6, out=h6)
    torch.sub(g, b, out=other).mul_(inv)
    torch.eq(maxc, r, out=where)
    torch.where(where, other, h6, out=h6)
    h6.add_(6 * f[:, 0])
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    k, mirrored = other, inv  # buffers free from here on
    for i, n in enumerate((5.0, 3.0, 1.0)):
        torch.add(h6, n, out=k).remainder_(6)
        torch.neg(k, out=mirrored).add_(4)  # 4 - k
        torch.minimum(k, mirrored, out=k).clamp_(0, 1).mul_(delta)
        torch.sub(maxc, k, out=out[:, i])
    return out


class _Op:
    """One augmentation step: ``op(x, generator) -> x`` on a float batch in [0, 1]; never in place."""

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


_TRIES = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes, then falls back


def fallback_box(height: int, width: int, ratio: tuple[float, float]) -> Box:
    """get_params' box when no try fits: the largest centred crop whose aspect ratio is in bounds."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class CropDraws:
    """The uniform draws behind RandomResizedCrop boxes for a batch of ``n`` images of any sizes.

    Drawn before the images are decoded (their sizes unknown); ``box(row, height, width)`` then
    applies torchvision's ``RandomResizedCrop.get_params`` to them: area fraction ~ U(scale), log
    aspect ratio ~ U(log ratio), the first of 10 tries that fits, top and left uniform over the valid
    positions, else the centred fallback. ``flipped(row)``: the horizontal flip, p = ``flip_p``.
    """

    scale: tuple[float, float]
    ratio: tuple[float, float]
    area: list[list[float]]  # (n, 10) uniforms
    log_ratio: list[list[float]]  # (n, 10) uniforms
    top: list[float]
    left: list[float]
    flip: list[bool]

    def box(self, row: int, height: int, width: int) -> Box:
        area = height * width
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for u_area, u_ratio in zip(self.area[row], self.log_ratio[row], strict=True):
            target = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
            aspect = math.exp(lo + u_ratio * (hi - lo))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.top[row] * (height - h + 1)), int(self.left[row] * (width - w + 1)), h, w
        return fallback_box(height, width, self.ratio)

    def flipped(self, row: int) -> bool:
        return self.flip[row]


class RandomResizedCropFlip(_Op):
    """torchvision's RandomResizedCrop box sampling (10 tries, then a centre crop) per sample, plus a
    horizontal flip with probability ``flip_p``; crop, resize and flip are one bilinear grid_sample."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> None:
        self.size, self.scale, self.ratio, self.flip_p = size, scale, ratio, flip_p

    def draw(self, n: int, g: Generator) -> CropDraws:
        """Draws for ``n`` boxes on images whose sizes are not known yet (file datasets: the boxes are
        taken from each whole decoded image); same order of draws as ``boxes``, then the flips."""
        area = torch.rand(n, _TRIES, generator=g)
        log_ratio = torch.rand(n, _TRIES, generator=g)
        top, left = torch.rand(n, generator=g), torch.rand(n, generator=g)
        flip = _coin(n, self.flip_p, g)
        return CropDraws(tuple(self.scale), tuple(self.ratio), area.tolist(), log_ratio.tolist(),
                         top.tolist(), left.tolist(), flip.tolist())

    def boxes(self, n: int, height: int, width: int, g: Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample (top, left, h, w) as float tensors, same distribution as torchvision's get_params."""
        area = height * width
        tries = 10
        target = (torch.rand(n, tries, generator=g) * (self.scale[1] - self.scale[0]) + self.scale[0]) * area
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(torch.rand(n, tries, generator=g) * (hi - lo) + lo)
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.int().argmax(1, keepdim=True)  # first valid try
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        top = torch.floor(torch.rand(n, generator=g) * (height - h + 1))
        left = torch.floor(torch.rand(n, generator=g) * (width - w + 1))
        # Fallback when no try fits: the largest centred crop whose ratio is within bounds.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        found = ok.any(1)
        w = torch.where(found, w, torch.full_like(w, fw))
        h = torch.where(found, h, torch.full_like(h, fh))
        top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
        left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
        return top, left, h, w

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        b, _, height, width = x.shape
        top, left, h, w = self.boxes(b, height, width, g)
        sign = torch.where(_coin(b, self.flip_p, g), -1.0, 1.0)
        # Sampling grid in grid_sample's normalised coordinates (align_corners=False: -1/+1 are the outer
        # pixel edges): output pixel centre u maps to scale * u + centre, so the box maps exactly.
        params = torch.stack([w / width * sign, (2 * left + w) / width - 1,
                              h / height, (2 * top + h) / height - 1], 1)
        params = params.to(device=x.device, dtype=x.dtype, non_blocking=True)
        u = (torch.arange(self.size, device=x.device, dtype=x.dtype) * 2 + 1) / self.size - 1
        gx = params[:, 0, None, None] * u[None, None, :] + params[:, 1, None, None]
        gy = params[:, 2, None, None] * u[None, :, None] + params[:, 3, None, None]
        grid = torch.stack(torch.broadcast_tensors(gx, gy), -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomTranslateFlip(_Op):
    """Reflect-pad by ``pad`` and take a random crop of the original size (FixMatch's weak
    augmentation: translate up to 12.5%), plus a horizontal flip; one gather for the whole batch."""

    def __init__(self, pad: int, flip_p: float = 0.5) -> None:
        self.pad, self.flip_p = pad, flip_p

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        b, c, height, width = x.shape
        p = self.pad
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        flip = _coin(b, self.flip_p, g)
        cols = torch.arange(width)
        cols = dx[:, None] + torch.where(flip[:, None], cols.flip(0), cols)
        rows = dy[:, None] + torch.arange(height)
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        rows = rows.to(x.device, non_blocking=True)[:, None, :, None].expand(b, c, height, width + 2 * p)
        cols = cols.to(x.device, non_blocking=True)[:, None, None, :].expand(b, c, height, width)
        return xp.gather(2, rows).gather(3, cols)


class ColorJitter(_Op):
    """With probability ``p`` per sample: brightness, contrast, saturation and hue jitter in a random
    order drawn per sample (as torchvision's ColorJitter), factors drawn per sample."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float,
                 channels: int = 3) -> None:
        if channels == 1:  # no colour to shift in a grey image
            saturation, hue = 0.0, 0.0
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.hue, self.p = hue, p

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        rows = _rows(_coin(x.shape[0], self.p, g))
        n = rows.numel()
        strengths = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = [_uniform(n, 1 - s, 1 + s, g) for s in strengths[:3]]
        factors.append(_uniform(n, -self.hue, self.hue, g))
        order = torch.rand(n, 4, generator=g).argsort(1)
        if n == 0:
            return x
        fns = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        rows_d = rows.to(x.device, non_blocking=True)
        sub = x.index_select(0, rows_d)
        for k in range(4):
            for op in range(4):
                if strengths[op] == 0:
                    continue
                sel = _rows(order[:, k] == op)
                if sel.numel() == 0:
                    continue
                sel_d = sel.to(x.device, non_blocking=True)
                f = factors[op][sel].to(x.device, x.dtype, non_blocking=True).view(-1, 1, 1, 1)
                sub.index_copy_(0, sel_d, fns[op](sub.index_select(0, sel_d), f))
        return x.index_copy(0, rows_d, sub)


class RandomGrayscale(_Op):
    """Replace an RGB image by its luma (kept 3-channel) with probability ``p`` per sample."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        rows = _rows(_coin(x.shape[0], self.p, g))
        if rows.numel() == 0:
            return x
        rows = rows.to(x.device, non_blocking=True)
        sub = x.index_select(0, rows)  # only the chosen rows: the same values, a fifth of the work
        return x.index_copy(0, rows, _gray(sub).expand_as(sub))


class GaussianBlur(_Op):
    """With probability ``p`` per sample, a Gaussian blur with sigma ~ U(sigma) drawn per sample,
    ``kernel_size`` taps, reflect padding (torchvision's kernel); one grouped separable convolution."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        b, c, height, width = x.shape
        rows = _rows(_coin(b, self.p, g))
        sig = _uniform(rows.numel(), *self.sigma, g)
        n, k = rows.numel(), self.kernel_size
        if n == 0:
            return x
        half = k // 2
        t = torch.arange(-half, half + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (t / sig[:, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
        kernel = kernel.to(x.device, x.dtype, non_blocking=True)
        rows_d = rows.to(x.device, non_blocking=True)
        sub = (x if n == b else x.index_select(0, rows_d)).reshape(1, n * c, height, width)
        sub = F.pad(sub, (half, half, half, half), mode="reflect")
        sub = F.conv2d(sub, kernel.view(n * c, 1, k, 1), groups=n * c)
        sub = F.conv2d(sub, kernel.view(n * c, 1, 1, k), groups=n * c).view(n, c, height, width)
        return sub if n == b else x.index_copy(0, rows_d, sub)


class RandomSolarize(_Op):
    """Invert pixels >= ``threshold`` with probability ``p`` per sample."""

    def __init__(self, p: float, threshold: float = 0.5) -> None:
        self.p, self.threshold = p, threshold

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        rows = _rows(_coin(x.shape[0], self.p, g))
        if rows.numel() == 0:
            return x
        rows = rows.to(x.device, non_blocking=True)
        sub = x.index_select(0, rows)
        return x.index_copy(0, rows, torch.where(sub >= self.threshold, 1 - sub, sub))


class Cutout(_Op):
    """Fill a square of side ``fraction * size`` at a uniform random centre (clipped at the borders)
    with grey ``fill``, in every sample (as FixMatch's strong augmentation)."""

    def __init__(self, fraction: float, fill: float = 0.5) -> None:
        self.fraction, self.fill = fraction, fill

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        b, _, height, width = x.shape
        half_h, half_w = self.fraction * height / 2, self.fraction * width / 2
        cy, cx = _uniform(b, 0, height, g), _uniform(b, 0, width, g)
        y0, y1 = (cy - half_h).round()[:, None], (cy + half_h).round()[:, None]
        x0, x1 = (cx - half_w).round()[:, None], (cx + half_w).round()[:, None]
        ys, xs = torch.arange(height), torch.arange(width)
        m = ((ys >= y0) & (ys < y1))[:, None, :, None] & ((xs >= x0) & (xs < x1))[:, None, None, :]
        fill = torch.full_like(x[:1, :1, :1, :1], self.fill)
        return torch.where(m.to(x.device, non_blocking=True), fill, x)


class RandAugment(_Op):
    """RandAugment(num_ops, magnitude) with torchvision's op set, magnitudes and op definitions, drawn
    per sample: each round draws an op (and a sign) per sample, then each group of samples sharing
    (op, sign) goes through ``torchvision.transforms.v2.functional`` at once."""

    OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
           "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
    SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                        "Contrast", "Sharpness"})

    def __init__(self, num_ops: int = 2, magnitude: int = 10, num_magnitude_bins: int = 31,
                 fill: float | None = None) -> None:
        if not 0 <= magnitude < num_magnitude_bins:
            raise DataError(f"RandAugment magnitude={magnitude} must be in [0, {num_magnitude_bins})")
        self.num_ops, self.magnitude = num_ops, magnitude
        self.num_magnitude_bins, self.fill = num_magnitude_bins, fill

    def op_magnitude(self, op: str, height: int, width: int) -> float:
        """torchvision RandAugment's magnitude of ``op`` at bin ``magnitude`` (unsigned)."""
        frac = self.magnitude / (self.num_magnitude_bins - 1)
        if op in ("ShearX", "ShearY"):
            return 0.3 * frac
        if op == "TranslateX":
            return 150.0 / 331.0 * width * frac
        if op == "TranslateY":
            return 150.0 / 331.0 * height * frac
        if op == "Rotate":
            return 30.0 * frac
        if op in ("Brightness", "Color", "Contrast", "Sharpness"):
            return 0.9 * frac
        if op == "Posterize":
            return float(round(8 - self.magnitude / ((self.num_magnitude_bins - 1) / 4)))
        if op == "Solarize":
            return 1.0 - frac
        return 0.0

    def apply(self, x: Tensor, op: str, magnitude: float) -> Tensor:
        """Apply one op to a float batch in [0, 1], exactly as torchvision's RandAugment would."""
        fill = None if self.fill is None else [self.fill] * x.shape[1]
        if op in ("ShearX", "ShearY"):
            # torchvision shears by atan(magnitude) degrees about the top-left corner
            deg = math.degrees(math.atan(magnitude))
            shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
            return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                             interpolation=TF.InterpolationMode.NEAREST, fill=fill, center=[0, 0])
        if op in ("TranslateX", "TranslateY"):
            shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
            return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                             interpolation=TF.InterpolationMode.NEAREST, fill=fill)
        if op == "Rotate":
            return TF.rotate(x, angle=magnitude, interpolation=TF.InterpolationMode.NEAREST, fill=fill)
        if op == "Brightness":
            return TF.adjust_brightness(x, 1.0 + magnitude)
        if op == "Color":
            return TF.adjust_saturation(x, 1.0 + magnitude)
        if op == "Contrast":
            return TF.adjust_contrast(x, 1.0 + magnitude)
        if op == "Sharpness":
            return TF.adjust_sharpness(x, 1.0 + magnitude)
        if op == "Posterize":
            return TF.posterize(x, bits=int(magnitude))
        if op == "Solarize":
            return TF.solarize(x, threshold=magnitude)
        if op == "AutoContrast":
            return TF.autocontrast(x)
        if op == "Equalize":
            return TF.equalize(x)
        return x

    def __call__(self, x: Tensor, g: Generator) -> Tensor:
        b, _, height, width = x.shape
        signed = torch.tensor([op in self.SIGNED for op in self.OPS])
        for _ in range(self.num_ops):
            op = torch.randint(len(self.OPS), (b,), generator=g)
            negative = (torch.rand(b, generator=g) <= 0.5) & signed[op]
            key = op * 2 + negative.long()
            # Sort the batch by (op, sign) so each group is a contiguous slice: one gather in, one
            # scatter out, and no per-group indexing.
            order = torch.argsort(key, stable=True)
            keys, counts = torch.unique_consecutive(key[order], return_counts=True)
            order_d = order.to(x.device, non_blocking=True)
            xs = x.index_select(0, order_d)
            pieces = []
            for piece, k in zip(xs.split(counts.tolist()), keys.tolist(), strict=True):
                name = self.OPS[k // 2]
                mag = self.op_magnitude(name, height, width) * (-1.0 if k % 2 else 1.0)
                pieces.append(self.apply(piece, name, mag))
            x = torch.empty_like(xs).index_copy_(0, order_d, torch.cat(pieces))
        return x
