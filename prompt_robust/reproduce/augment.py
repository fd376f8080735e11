"""The training augmentation of the reference configs: ``TRANSFORMS: ["random_resized_crop", "random_flip",
"normalize"]`` at ``SIZE (224, 224)``, ``INTERPOLATION bicubic`` (every CoOp, CoCoOp, VPT and MaPLe config).

Written with Pillow and Python's ``random`` (torchvision is not a dependency). The crop follows the usual
random-resized-crop rule: an area of 8% to 100% of the image and an aspect ratio between 3/4 and 4/3 (drawn
log-uniformly), ten tries, else the largest centred crop of an allowed aspect ratio; then a horizontal flip with
probability 1/2. Randomness comes from ``random``, which :func:`prompt_robust.training.fit` seeds and checkpoints,
so a resumed run draws the same crops as an uninterrupted one when ``num_workers == 0``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from ..data.loaders import image_transform

__all__ = ["RandomResizedCropFlip"]


class RandomResizedCropFlip:
    """PIL image -> ``(3, S, S)`` tensor: random resized crop (bicubic), random horizontal flip, normalisation.

    Args:
        image_size: side ``S`` of the output.
        mean / std: per-channel normalisation (the backbone's).
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).

    Example:
        >>> from PIL import Image
        >>> RandomResizedCropFlip(8, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (20, 10))).shape
        torch.Size([3, 8, 8])
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.image_size = int(image_size)
        self.scale = scale
        self.ratio = ratio
        # an image already S x S passes the CLIP preprocessing unchanged but for the normalisation
        self._normalize = image_transform(self.image_size, mean, std)

    def _box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return left, top, left + w, top + h
        aspect = width / height  # fallback: the whole image, cut to the nearest allowed aspect ratio
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        crop = image.crop(self._box(*image.size))
        crop = crop.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self._normalize(crop)

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio})"
