"""Augmented views of character images, seen identically by teacher and student.

Function matching (Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov 2022, "Knowledge distillation:
A good teacher is patient and consistent", §3-4): distillation works best when the teacher and
the student see *the same* aggressively augmented view of every image ("consistent") over long
training ("patient"), so the student learns to match the teacher's function on many points near
the data rather than its outputs on the data alone. In this library the teachers and the student
of a :class:`~lightning_metakd.modules.DistillationModule` already receive the same episode
tensors, so an augmentation in the data pipeline (``train_transform`` of any data module) is
consistent by construction.

Augmentations for character images (KanjiVG, Omniglot, class folders; all go through
:class:`~lightning_metakd.data.ClassDataset`), each a small callable class with plain
constructor arguments, so LightningCLI builds it from YAML::

    data:
      init_args:
        train_transform:
          class_path: lightning_metakd.data.augment.RandomAffine
          init_args: {degrees: 10, shear: 10, scale: [0.9, 1.1], translate: 0.1}

- :class:`RandomAffine` — a random rotation, shear, scale and translation;
- :class:`ElasticDistortion` — Simard, Steinkraus & Platt (2003), "Best Practices for
  Convolutional Neural Networks Applied to Visual Document Analysis", §2: a smoothed random
  displacement field, the distortion a pen stroke plausibly has;
- :class:`RandomLowResolution` — a coarse scan: the image reduced to a few pixels a side by
  area averaging and scaled back up (as the UCI digits count ink in 4 × 4 blocks, and as
  low-resolution sensors and thumbnails look);
- :class:`RandomDilation` — a bolder pen: the strokes thickened by a grey dilation (a max
  filter), as a broad pen or a scanner's bleed draws them;
- :class:`RandomFitToFrame` — size normalisation: the drawing's ink scaled to fill the frame (as
  the NIST forms behind the UCI and MNIST digits were normalised before they were scanned);
- :class:`Compose` — several of them in order.

Random numbers come from torch's default CPU generator. A :class:`~lightning_metakd.data.
ClassDataset` seeds it for every image from the task being loaded and restores it afterwards
(:func:`~lightning_metakd.data.dataset.view_seeds`), so the views of a training run are the same
with 0 or 8 DataLoader workers, after a resume, and whatever else draws random numbers; called on
their own, the transforms follow ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_range(value: Any, name: str, low: float, high: float, example: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(
            f"{name} must be a number in [{low}, {high}], got {value!r}; e.g. {example}."
        )
    return float(value)


def _check_pixels(value: Any, name: str, least: int, example: str) -> tuple[int, int]:
    """``(low, high)`` whole pixels with ``least <= low <= high``, else a one-line error."""
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not least <= value[0] <= value[1]
    ):
        raise ValueError(
            f"{name} must be (low, high) whole pixels with {least} <= low <= high, got "
            f"{value!r}; e.g. {name}: {example}."
        )
    return int(value[0]), int(value[1])


def _as_batch(image: Tensor, name: str) -> tuple[Tensor, bool]:
    """``[C, H, W]`` → ``[1, C, H, W]`` (and whether it was one image); ``[B, C, H, W]`` as is."""
    if not isinstance(image, Tensor) or image.dim() not in (3, 4) or not image.is_floating_point():
        got = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else type(image)
        raise ValueError(
            f"{name} takes float images [C, H, W] (or a batch [B, C, H, W]), got {got}; apply it "
            "as a data module's train_transform, which hands it each image in [0, 1]."
        )
    return (image.unsqueeze(0), True) if image.dim() == 3 else (image, False)


def _sample(grid: Tensor, images: Tensor, fill: float) -> Tensor:
    """Bilinear resampling of ``images`` at ``grid`` (normalised coordinates); outside: ``fill``.

    Each output pixel is a convex combination of input pixels and ``fill``, so images in [0, 1]
    stay in [0, 1] for ``fill`` in [0, 1].
    """
    out = F.grid_sample(
        images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out + fill


class RandomAffine:
    """A random affine view: rotation, shear, isotropic scale and translation, about the centre.

    For each image, ``a ~ U(−degrees, degrees)``, ``s ~ U(−shear, shear)`` (degrees, along x),
    ``k ~ U(scale[0], scale[1])`` and ``t ~ U(−translate, translate)²`` (a fraction of the image
    size) give the map ``x ↦ R(a) · Sh(s) · k · x + t`` in centred coordinates; the output is the
    input resampled bilinearly through its inverse, pixels from outside the image are ``fill``
    (0: the black background of KanjiVG and inverted Omniglot; 1 for black-on-white strokes).

    Shapes: ``[C, H, W]`` → ``[C, H, W]`` (a batch ``[B, C, H, W]`` draws one map per image).

    Args:
        degrees: the largest rotation, in degrees, 0 to 180.
        shear: the largest shear angle, in degrees, 0 to 60.
        scale: ``(low, high)``, ``0 < low ≤ high``; ``(1, 1)`` keeps the size.
        translate: the largest shift along each axis, as a fraction of the size, 0 to 1.
        fill: the value of pixels from outside the image, 0 to 1.

    Example:
        >>> import torch
        >>> image = torch.rand(1, 28, 28)
        >>> torch.allclose(RandomAffine(0, 0, (1, 1), 0)(image), image, atol=1e-5)  # the identity
        True
        >>> RandomAffine()(image).shape
        torch.Size([1, 28, 28])
    """

    def __init__(
        self,
        degrees: float = 10.0,
        shear: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
        translate: float = 0.1,
        fill: float = 0.0,
    ) -> None:
        self.degrees = _check_range(degrees, "degrees", 0, 180, "degrees=10")
        self.shear = _check_range(shear, "shear", 0, 60, "shear=10")
        if (
            not isinstance(scale, Sequence)
            or len(scale) != 2
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in scale)
            or not 0 < scale[0] <= scale[1]
        ):
            raise ValueError(
                f"scale must be (low, high) with 0 < low <= high, got {scale!r}; e.g. "
                "scale: [0.9, 1.1] (or [1, 1] to keep the size)."
            )
        self.scale = (float(scale[0]), float(scale[1]))
        self.translate = _check_range(translate, "translate", 0, 1, "translate=0.1")
        self.fill = _check_range(fill, "fill", 0, 1, "fill=0 (black background)")

    def inverse_maps(self, count: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``count`` random inverse maps ``[count, 2, 3]`` for :func:`torch.nn.functional.affine_grid`.

        The forward map is ``y = M x + t`` with ``M = R(a) Sh(s) k``; the sampling grid needs its
        inverse, ``x = M⁻¹ (y − t)``, with ``M⁻¹ = k⁻¹ Sh(−s) R(−a)`` (in normalised coordinates,
        where the image spans [−1, 1], so a shift of ``t`` of the size is ``2t``).
        """
        u = torch.rand(count, 5, dtype=torch.float64)
        angle = math.radians(self.degrees) * (2 * u[:, 0] - 1)
        shear = math.tan(math.radians(self.shear)) * (2 * u[:, 1] - 1)
        low, high = self.scale
        k = low + (high - low) * u[:, 2]
        shift = 2 * self.translate * (2 * u[:, 3:5] - 1)
        cos, sin = angle.cos(), angle.sin()
        rotation_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        shear_inv = torch.eye(2, dtype=torch.float64).repeat(count, 1, 1)
        shear_inv[:, 0, 1] = -shear
        linear = shear_inv @ rotation_inv / k[:, None, None]
        offset = -(linear @ shift.unsqueeze(-1))
        return torch.cat([linear, offset], -1).to(dtype)

    def __call__(self, image: Tensor) -> Tensor:
        images, single = _as_batch(image, "RandomAffine")
        theta = self.inverse_maps(len(images), images.dtype).to(images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = _sample(grid, images, self.fill)
        return out[0] if single else out

    def __repr__(self) -> str:
        return (
            f"RandomAffine(degrees={self.degrees}, shear={self.shear}, scale={self.scale}, "
            f"translate={self.translate}, fill={self.fill})"
        )


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A normalised 1-d Gaussian of standard deviation ``sigma`` pixels, ``2·⌈3σ⌉ + 1`` taps."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


class ElasticDistortion:
    """Elastic distortion (Simard, Steinkraus & Platt 2003, §2): a smooth random displacement field.

    Each pixel gets a displacement ``(Δx, Δy)`` drawn from ``U(−1, 1)``; both fields are convolved
    with a Gaussian of standard deviation ``sigma`` (the elasticity, in pixels) and multiplied by
    ``alpha`` (the intensity, in pixels); the image is resampled bilinearly at the displaced
    positions, with ``fill`` outside it. A small ``sigma`` gives near-random noise, a large one
    near-uniform shifts; between, local warps like those of handwriting. The paper's values for
    28×28 digits are ``sigma = 4`` and ``alpha = 34``; the field is convolved with zero padding,
    so it fades at the borders.

    Shapes: ``[C, H, W]`` → ``[C, H, W]`` (a batch ``[B, C, H, W]`` draws one field per image; all
    channels of an image share it).

    Args:
        alpha: the intensity α ≥ 0, in pixels (0: the identity).
        sigma: the elasticity σ > 0, in pixels.
        fill: the value of pixels from outside the image, 0 to 1.

    Example:
        >>> import torch
        >>> image = torch.rand(1, 28, 28)
        >>> torch.allclose(ElasticDistortion(alpha=0.0)(image), image, atol=1e-5)
        True
        >>> ElasticDistortion(alpha=34.0, sigma=4.0)(image).shape
        torch.Size([1, 28, 28])
    """

    def __init__(self, alpha: float = 34.0, sigma: float = 4.0, fill: float = 0.0) -> None:
        self.alpha = _check_range(alpha, "alpha", 0, 1e4, "alpha=34 (Simard et al.)")
        if not isinstance(sigma, int | float) or not math.isfinite(sigma) or not 0 < sigma <= 1e3:
            raise ValueError(
                f"sigma must be a positive number of pixels, got {sigma!r}; e.g. sigma=4 "
                "(Simard et al.)."
            )
        self.sigma = float(sigma)
        self.fill = _check_range(fill, "fill", 0, 1, "fill=0 (black background)")

    def displacements(self, count: int, height: int, width: int) -> Tensor:
        """``count`` random smoothed fields ``[count, 2, H, W]`` (x, then y), in pixels."""
        field = 2 * torch.rand(count * 2, 1, height, width) - 1
        kernel = gaussian_kernel(self.sigma)
        radius = len(kernel) // 2
        field = F.conv2d(field, kernel.view(1, 1, 1, -1), padding=(0, radius))
        field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(radius, 0))
        return self.alpha * field.view(count, 2, height, width)

    def __call__(self, image: Tensor) -> Tensor:
        images, single = _as_batch(image, "ElasticDistortion")
        count, _, height, width = images.shape
        shift = self.displacements(count, height, width).to(images)
        identity = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(count, 2, 3)
        grid = F.affine_grid(identity, list(images.shape), align_corners=False)
        # pixels to normalised units: the image spans 2 units over `width` (`height`) pixels
        scale = torch.tensor([2.0 / width, 2.0 / height], dtype=images.dtype, device=images.device)
        grid = grid + shift.permute(0, 2, 3, 1) * scale
        out = _sample(grid, images, self.fill)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"ElasticDistortion(alpha={self.alpha}, sigma={self.sigma}, fill={self.fill})"


class RandomLowResolution:
    """A coarse scan, with probability ``probability``: reduce to ``s × s`` pixels, scale back up.

    For each image, with probability ``probability``, a side ``s`` is drawn uniformly from the
    integers ``sizes[0] … sizes[1]``; the image is reduced to ``s × s`` by area averaging (each
    output pixel the mean ink of its block, as a scanner of coarse cells counts it) and scaled
    back to its size bicubically (antialiased), then clipped to [0, 1]. The other images pass
    unchanged. The handwriting renderer draws such scans for a fifth of its drawings
    (``HandwritingConfig.low_resolution``); as a view, the teacher and the student see the same
    coarse scan of any data set.

    Shapes: ``[C, H, W]`` → ``[C, H, W]`` (a batch ``[B, C, H, W]`` draws per image).

    Args:
        probability: the chance that an image is scanned coarsely, 0 to 1.
        sizes: ``(low, high)`` sides in pixels, ``1 ≤ low ≤ high``; sides at or above the
            image's leave it as it is.

    Example:
        >>> import torch
        >>> image = torch.rand(1, 28, 28)
        >>> torch.equal(RandomLowResolution(probability=0.0)(image), image)
        True
        >>> RandomLowResolution(probability=1.0, sizes=(8, 8))(image).shape
        torch.Size([1, 28, 28])
    """

    def __init__(self, probability: float = 0.5, sizes: tuple[int, int] = (8, 16)) -> None:
        self.probability = _check_range(probability, "probability", 0, 1, "probability=0.5")
        self.sizes = _check_pixels(sizes, "sizes", 1, "[8, 16]")

    def __call__(self, image: Tensor) -> Tensor:
        images, single = _as_batch(image, "RandomLowResolution")
        height, width = images.shape[-2:]
        u = torch.rand(len(images), dtype=torch.float64)
        low, high = self.sizes
        sides = torch.randint(low, high + 1, (len(images),))
        out = images.clone()
        for i in range(len(images)):
            side = int(sides[i])
            if u[i] >= self.probability or side >= min(height, width):
                continue
            coarse = F.interpolate(images[i : i + 1], size=(side, side), mode="area")
            fine = F.interpolate(
                coarse, size=(height, width), mode="bicubic", align_corners=False, antialias=True
            )
            out[i] = fine[0].clamp(0.0, 1.0)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomLowResolution(probability={self.probability}, sizes={self.sizes})"


class RandomDilation:
    """A bolder pen, with probability ``probability``: a grey dilation of radius ``r`` pixels.

    For each image, with probability ``probability``, a radius ``r`` is drawn uniformly from the
    integers ``radii[0] … radii[1]`` and every pixel takes the largest value within ``r`` pixels
    (a ``(2r + 1) × (2r + 1)`` max filter), so white strokes on black grow ``r`` pixels on each
    side. The other images pass unchanged.

    Shapes: ``[C, H, W]`` → ``[C, H, W]`` (a batch ``[B, C, H, W]`` draws per image).

    Args:
        probability: the chance that an image is thickened, 0 to 1.
        radii: ``(low, high)`` radii in pixels, ``0 <= low <= high`` (0: unchanged).

    Example:
        >>> import torch
        >>> image = torch.zeros(1, 9, 9); image[0, 4, 4] = 1.0
        >>> int(RandomDilation(probability=1.0, radii=(1, 1))(image).sum())
        9
    """

    def __init__(self, probability: float = 0.5, radii: tuple[int, int] = (1, 2)) -> None:
        self.probability = _check_range(probability, "probability", 0, 1, "probability=0.5")
        self.radii = _check_pixels(radii, "radii", 0, "[1, 2]")

    def __call__(self, image: Tensor) -> Tensor:
        images, single = _as_batch(image, "RandomDilation")
        u = torch.rand(len(images), dtype=torch.float64)
        radius = torch.randint(self.radii[0], self.radii[1] + 1, (len(images),))
        out = images.clone()
        for i in range(len(images)):
            r = int(radius[i])
            if u[i] < self.probability and r > 0:
                out[i] = F.max_pool2d(images[i : i + 1], 2 * r + 1, stride=1, padding=r)[0]
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomDilation(probability={self.probability}, radii={self.radii})"


class RandomFitToFrame:
    """Size normalisation, with probability ``probability``: the ink's bounding box fills the frame.

    For each image, with probability ``probability``, the smallest box holding every pixel above
    ``threshold`` is cut out and scaled (bilinear, antialiased; the aspect ratio kept) until its
    longer side spans the image less ``margin`` pixels on each side, then centred on a black
    frame — the way the digits of the UCI set (Alpaydin & Kaynak 1998) and of NIST were
    normalised in size before they were scanned. The other images, and images with no ink, pass
    unchanged. Compose it before :class:`RandomLowResolution` for UCI-like coarse scans.

    Shapes: ``[C, H, W]`` → ``[C, H, W]`` (a batch ``[B, C, H, W]`` draws per image).

    Args:
        probability: the chance that an image is normalised, 0 to 1.
        margin: black pixels left on each side of the longer side, ``0 <= margin < H / 2``.
        threshold: the ink level that counts as drawn, in [0, 1).

    Example:
        >>> import torch
        >>> image = torch.zeros(1, 28, 28); image[0, 10:14, 12:14] = 1.0  # a 4 x 2 stroke
        >>> fitted = RandomFitToFrame(probability=1.0, margin=2)(image)
        >>> rows = (fitted[0] > 0.5).any(1).nonzero()
        >>> int(rows.min()), int(rows.max())
        (2, 25)
    """

    def __init__(self, probability: float = 0.5, margin: int = 1, threshold: float = 0.1) -> None:
        self.probability = _check_range(probability, "probability", 0, 1, "probability=0.5")
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"margin must be whole pixels >= 0, got {margin!r}; e.g. margin: 1.")
        self.margin = margin
        self.threshold = _check_range(threshold, "threshold", 0, 0.999, "threshold=0.1")

    def __call__(self, image: Tensor) -> Tensor:
        images, single = _as_batch(image, "RandomFitToFrame")
        height, width = images.shape[-2:]
        if 2 * self.margin >= min(height, width):
            raise ValueError(
                f"RandomFitToFrame(margin={self.margin}) leaves no room in a {height}x{width} "
                f"image; use a margin below {min(height, width) // 2}."
            )
        u = torch.rand(len(images), dtype=torch.float64)
        out = images.clone()
        for i in range(len(images)):
            ink = (images[i] > self.threshold).any(0)
            if u[i] >= self.probability or not ink.any():
                continue
            rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
            top, bottom, left, right = (
                int(rows[0]),
                int(rows[-1]) + 1,
                int(cols[0]),
                int(cols[-1]) + 1,
            )
            box = images[i : i + 1, :, top:bottom, left:right]
            scale = min(
                (height - 2 * self.margin) / box.shape[-2],
                (width - 2 * self.margin) / box.shape[-1],
            )
            size = (max(1, round(box.shape[-2] * scale)), max(1, round(box.shape[-1] * scale)))
            fitted = F.interpolate(
                box, size=size, mode="bilinear", align_corners=False, antialias=True
            )
            y, x = (height - size[0]) // 2, (width - size[1]) // 2
            out[i] = 0.0
            out[i, :, y : y + size[0], x : x + size[1]] = fitted[0].clamp(0.0, 1.0)
        return out[0] if single else out

    def __repr__(self) -> str:
        return (
            f"RandomFitToFrame(probability={self.probability}, margin={self.margin}, "
            f"threshold={self.threshold})"
        )


class Compose:
    """Several transforms applied in order: ``transforms[-1](... transforms[0](image))``.

    Args:
        transforms: callables on a ``[C, H, W]`` image (these classes, or your own).

    Example:
        >>> import torch
        >>> views = Compose([RandomAffine(degrees=15), ElasticDistortion(alpha=8, sigma=3)])
        >>> views(torch.rand(1, 28, 28)).shape
        torch.Size([1, 28, 28])
    """

    def __init__(self, transforms: list[Callable[[Tensor], Any]]) -> None:
        if isinstance(transforms, str) or not isinstance(transforms, Sequence):
            raise ValueError(
                f"transforms must be a list of callables, got {transforms!r}; e.g. "
                "Compose([RandomAffine(), ElasticDistortion()])."
            )
        wrong = [repr(t) for t in transforms if not callable(t)]
        if wrong:
            raise ValueError(f"Compose takes callables on an image; these are not: {wrong}.")
        self.transforms = list(transforms)

    def __call__(self, image: Tensor) -> Tensor:
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


__all__ = [
    "Compose",
    "ElasticDistortion",
    "RandomAffine",
    "RandomDilation",
    "RandomFitToFrame",
    "RandomLowResolution",
    "gaussian_kernel",
]
