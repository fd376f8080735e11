"""Single-factor interventions ``do(x)`` on images and on prompt texts, pure torch.

CLIP-ICM ("Learning Invariant Causal Mechanism from Vision-Language Models", https://arxiv.org/abs/2405.15289)
estimates which feature directions a nuisance factor moves from *interventional pairs*: an input and a copy of
it with one factor changed. Here:

* **image interventions** act on ``(b, 3, H, W)`` images in ``[0, 1]``; :func:`intervene` wraps them for images
  normalised with a backbone's mean/std (un-normalise, intervene, re-normalise). Every function takes an
  optional ``torch.Generator`` (a CPU one; draws are moved to the images' device) so pairs are reproducible;
  the registry :data:`IMAGE_INTERVENTIONS` maps the names of ``InvarianceConfig.INTERVENTIONS`` to them;
* **text interventions** swap the prompt template (``"a photo of a {}."`` -> ``"a sketch of a {}."``) or add
  an attribute word (``"a blurry photo of a {}."``); :func:`text_deltas` encodes the pairs into feature
  differences ``f(t) - f(do(t))``.

Defaults follow common augmentation settings (SimCLR/torchvision): colour jitter 0.4/0.4/0.4/0.1, blur sigma in
[0.1, 2.0] with a kernel of ~10% of the image side, posterize to 4 bits, solarize above 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...config import unknown_name_error
from .config import InvarianceConfig

__all__ = [
    "IMAGE_INTERVENTIONS",
    "ImageIntervention",
    "color_jitter",
    "equalize",
    "gaussian_blur",
    "get_intervention",
    "grayscale",
    "intervene",
    "invert",
    "posterize",
    "solarize",
    "text_deltas",
    "text_pairs",
]

# ITU-R 601 luma weights, as PIL and torchvision use for grayscale
_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: torch.Tensor, what: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a (batch, 3, H, W) tensor; got {shape}.")
    if not images.is_floating_point():
        raise TypeError(
            f"{what} must be floating point (values in [0, 1], or normalised for intervene()); got {images.dtype}. "
            "Convert uint8 images with images.float() / 255."
        )


def _uniform(
    batch: int, low: float, high: float, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """``(batch, 1, 1, 1)`` draws from U[low, high], drawn on the CPU generator then moved to ``like``."""
    draws = torch.rand(batch, generator=generator, dtype=torch.float64)
    return (low + (high - low) * draws).to(like.device, like.dtype).view(batch, 1, 1, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """``(b, 1, H, W)`` luma of ``(b, 3, H, W)`` RGB images."""
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """``(b, 3, H, W)`` RGB in [0, 1] -> HSV with every channel in [0, 1] (hue 0 where undefined)."""
    r, g, b = images.unbind(dim=1)
    maxc = images.amax(dim=1)
    minc = images.amin(dim=1)
    span = maxc - minc
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    saturation = torch.where(
        maxc > 0, span / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    rc, gc, bc = (maxc - r) / safe_span, (maxc - g) / safe_span, (maxc - b) / safe_span
    hue = torch.where(r == maxc, bc - gc, torch.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(span > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, maxc], dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * frac)
    t = value * (1.0 - saturation * (1.0 - frac))
    # (r, g, b) of each of the six hue sectors
    table = torch.stack(
        [
            torch.stack([value, t, p], dim=1),
            torch.stack([q, value, p], dim=1),
            torch.stack([p, value, t], dim=1),
            torch.stack([p, q, value], dim=1),
            torch.stack([t, p, value], dim=1),
            torch.stack([value, p, q], dim=1),
        ],
        dim=1,
    )  # (b, 6, 3, H, W)
    index = sector.unsqueeze(1).unsqueeze(1).expand(-1, 1, 3, -1, -1)  # (b, 1, 3, H, W)
    return torch.gather(table, 1, index).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# image interventions on [0, 1] images
# ---------------------------------------------------------------------------------------------------------------
def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue changes, one draw per image, in this fixed order.

    Brightness scales the image by ``U[1 - brightness, 1 + brightness]``; contrast and saturation blend with the
    image's mean gray level and with its grayscale copy by factors drawn alike; hue is rotated by
    ``U[-hue, hue]`` turns in HSV space. Values are clipped to [0, 1] after every step (as torchvision does;
    unlike torchvision the order is fixed, so a draw is fully described by the four factors).

    Args:
        images: ``(b, 3, H, W)`` in [0, 1].
        generator: CPU generator for the draws (None: the global one).
        brightness / contrast / saturation: maximal relative change, each in [0, 1] (0: unchanged).
        hue: maximal hue rotation in turns, in [0, 0.5].

    Returns:
        ``(b, 3, H, W)`` in [0, 1], same dtype and device.

    Example:
        >>> out = color_jitter(torch.rand(2, 3, 8, 8), torch.Generator().manual_seed(0))
        >>> out.shape, bool(out.min() >= 0 and out.max() <= 1)
        (torch.Size([2, 3, 8, 8]), True)
    """
    _check_images(images)
    for name, value, top in (("brightness", brightness, 1), ("contrast", contrast, 1), ("saturation", saturation, 1)):
        if not 0 <= value <= top:
            raise ValueError(f"color_jitter {name} must be in [0, {top}]; got {value!r}.")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"color_jitter hue must be in [0, 0.5] (turns); got {hue!r}.")
    b = images.shape[0]
    out = images
    if brightness:
        out = (out * _uniform(b, 1 - brightness, 1 + brightness, generator, out)).clamp(0, 1)
    if contrast:
        factor = _uniform(b, 1 - contrast, 1 + contrast, generator, out)
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
        out = (factor * out + (1 - factor) * mean).clamp(0, 1)
    if saturation:
        factor = _uniform(b, 1 - saturation, 1 + saturation, generator, out)
        out = (factor * out + (1 - factor) * _gray(out)).clamp(0, 1)
    if hue:
        shift = _uniform(b, -hue, hue, generator, out).view(b, 1, 1)
        hsv = _rgb_to_hsv(out)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        out = _hsv_to_rgb(hsv).clamp(0, 1)
    return out


def grayscale(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace every channel by the luma ``0.299 R + 0.587 G + 0.114 B`` (deterministic).

    Args:
        images: ``(b, 3, H, W)`` in [0, 1].
        generator: unused (same signature as the random interventions).

    Example:
        >>> out = grayscale(torch.rand(1, 3, 4, 4))
        >>> bool((out[:, 0] == out[:, 1]).all() and (out[:, 1] == out[:, 2]).all())
        True
    """
    _check_images(images)
    return _gray(images).expand_as(images).contiguous()


def gaussian_blur(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_size: int | None = None,
) -> torch.Tensor:
    """Gaussian blur with a standard deviation drawn per image from ``U[sigma]`` (in pixels).

    The separable kernel is normalised to sum 1 and borders are replicated, so a constant image stays constant.

    Args:
        images: ``(b, 3, H, W)`` in [0, 1].
        generator: CPU generator for the sigma draws.
        sigma: ``(low, high)`` range of the standard deviation, ``0 < low <= high``.
        kernel_size: odd kernel side; None: 10% of the image side made odd (2·floor(s/2) + 1), at least 3.

    Example:
        >>> flat = torch.full((1, 3, 16, 16), 0.3)
        >>> torch.allclose(gaussian_blur(flat, torch.Generator().manual_seed(0)), flat)
        True
    """
    _check_images(images)
    low, high = float(sigma[0]), float(sigma[1])
    if not 0 < low <= high:
        raise ValueError(f"gaussian_blur sigma must be a range (low, high) with 0 < low <= high; got {sigma!r}.")
    b, c, h, w = images.shape
    if kernel_size is None:
        kernel_size = max(3, round(0.1 * min(h, w)) // 2 * 2 + 1)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur kernel_size must be an odd integer >= 1; got {kernel_size!r}.")
    half = kernel_size // 2
    sigmas = _uniform(b, low, high, generator, images).view(b, 1)  # (b, 1)
    coords = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype).view(1, -1)  # (1, K)
    kernel = torch.exp(-(coords**2) / (2 * sigmas**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (b, K)
    weight = kernel.repeat_interleave(c, dim=0)  # (b*c, K): one depthwise filter per image channel
    flat = images.reshape(1, b * c, h, w)
    flat = F.pad(flat, (half, half, half, half), mode="replicate")
    flat = F.conv2d(flat, weight.view(b * c, 1, 1, kernel_size), groups=b * c)  # along W
    flat = F.conv2d(flat, weight.view(b * c, 1, kernel_size, 1), groups=b * c)  # along H
    return flat.reshape(b, c, h, w)


def invert(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``1 - x`` (deterministic; its own inverse).

    Example:
        >>> x = torch.rand(1, 3, 4, 4)
        >>> torch.allclose(invert(invert(x)), x)
        True
    """
    _check_images(images)
    return 1.0 - images


def _to_levels(images: torch.Tensor) -> torch.Tensor:
    """8-bit levels ``round(255 x)`` of [0, 1] images (values outside are clipped), as long."""
    return torch.round(images.clamp(0, 1) * 255).long()


def posterize(images: torch.Tensor, generator: torch.Generator | None = None, *, bits: int = 4) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of every 8-bit channel value (deterministic).

    The image is read as 8-bit levels ``round(255 x)``: ``bits=8`` returns it unchanged up to that
    quantisation (exactly, for images decoded from 8-bit files).

    Args:
        images: ``(b, 3, H, W)`` in [0, 1].
        bits: kept bits, 1..8.

    Example:
        >>> posterize(torch.tensor([0.3, 0.9]).view(1, 1, 1, 2).expand(1, 3, 1, 2), bits=1)[0, 0, 0]
        tensor([0.0000, 0.5020])
    """
    _check_images(images)
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"posterize bits must be an integer in 1..8 (8: unchanged); got {bits!r}.")
    mask = (0xFF << (8 - bits)) & 0xFF
    return (_to_levels(images) & mask).to(images.dtype) / 255.0


def solarize(images: torch.Tensor, generator: torch.Generator | None = None, *, threshold: float = 0.5) -> torch.Tensor:
    """Invert the values strictly above ``threshold`` (deterministic; ``threshold=1`` changes nothing).

    Args:
        images: ``(b, 3, H, W)`` in [0, 1].
        threshold: in [0, 1].

    Example:
        >>> solarize(torch.tensor([0.2, 0.8]).view(1, 1, 1, 2).expand(1, 3, 1, 2))[0, 0, 0]
        tensor([0.2000, 0.2000])
    """
    _check_images(images)
    if not 0 <= threshold <= 1:
        raise ValueError(f"solarize threshold must be in [0, 1] (1: unchanged); got {threshold!r}.")
    return torch.where(images > threshold, 1.0 - images, images)


def equalize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation over 256 levels (deterministic).

    Level ``v`` maps to ``(cdf(v) - cdf(v_min)) / (N - cdf(v_min))`` with ``N`` pixels and ``cdf`` the cumulative
    histogram, so the output's distribution is as close to uniform on [0, 1] as the ties allow. A constant
    channel is left unchanged. The output is not re-quantised to 8 bits.

    Args:
        images: ``(b, 3, H, W)`` in [0, 1].

    Example:
        >>> ramp = (torch.arange(16.0) / 15) ** 2  # 16 distinct 8-bit levels, crowded near 0
        >>> out = equalize(ramp.view(1, 1, 4, 4).expand(1, 3, 4, 4))
        >>> torch.allclose(out[0, 0].flatten(), torch.arange(16.0) / 15)
        True
    """
    _check_images(images)
    b, c, h, w = images.shape
    levels = _to_levels(images).reshape(b, c, h * w)  # (b, c, N)
    hist = torch.zeros(b, c, 256, device=images.device, dtype=torch.float64)
    hist.scatter_add_(2, levels, torch.ones_like(levels, dtype=torch.float64))
    cdf = hist.cumsum(dim=2)  # (b, c, 256)
    cdf_min = torch.gather(cdf, 2, levels.amin(dim=2, keepdim=True))  # (b, c, 1): pixels at the lowest level
    denom = float(h * w) - cdf_min
    mapped = (torch.gather(cdf, 2, levels) - cdf_min) / denom.clamp_min(1.0)  # (b, c, N)
    constant = denom <= 0  # (b, c, 1): a single level, nothing to spread
    out = torch.where(constant, images.reshape(b, c, h * w).to(torch.float64), mapped)
    return out.to(images.dtype).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageIntervention:
    """A registered image intervention.

    Attributes:
        name: registry name (one of ``InvarianceConfig.INTERVENTIONS``).
        fn: ``fn(images_01, generator, **params) -> images_01``.
        random: whether the outcome depends on random draws (then several pairs per image differ).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    random: bool


#: name -> intervention; the names are those of ``InvarianceConfig.INTERVENTIONS``
IMAGE_INTERVENTIONS: dict[str, ImageIntervention] = {
    "color_jitter": ImageIntervention("color_jitter", color_jitter, True),
    "grayscale": ImageIntervention("grayscale", grayscale, False),
    "gaussian_blur": ImageIntervention("gaussian_blur", gaussian_blur, True),
    "invert": ImageIntervention("invert", invert, False),
    "posterize": ImageIntervention("posterize", posterize, False),
    "solarize": ImageIntervention("solarize", solarize, False),
    "equalize": ImageIntervention("equalize", equalize, False),
}
if tuple(IMAGE_INTERVENTIONS) != InvarianceConfig.INTERVENTIONS:  # one list of names, checked at import
    raise RuntimeError("IMAGE_INTERVENTIONS and InvarianceConfig.INTERVENTIONS name different interventions.")


def get_intervention(name: str) -> ImageIntervention:
    """The registered intervention called ``name``; an unknown name is answered with the valid ones.

    Example:
        >>> get_intervention("invert").random
        False
    """
    if name not in IMAGE_INTERVENTIONS:
        raise unknown_name_error("intervention", name, tuple(IMAGE_INTERVENTIONS))
    return IMAGE_INTERVENTIONS[name]


def intervene(
    pixel_values: torch.Tensor,
    name: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
    **params: Any,
) -> torch.Tensor:
    """Apply intervention ``name`` to images normalised with a backbone's ``mean``/``std``.

    The images are un-normalised to [0, 1] (``x * std + mean``), intervened on and normalised again, so the
    result is a valid input of the same backbone.

    Args:
        pixel_values: ``(b, 3, H, W)`` normalised images.
        name: one of :data:`IMAGE_INTERVENTIONS`.
        mean / std: per-channel normalisation (``backbone.image_mean``, ``backbone.image_std``).
        generator: CPU generator of the random interventions.
        **params: overrides of the intervention's defaults (e.g. ``bits=3`` for posterize).

    Returns:
        ``(b, 3, H, W)`` normalised intervened images, same dtype and device.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = intervene(x, "invert", mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> torch.allclose(intervene(y, "invert", mean=(0.5,) * 3, std=(0.25,) * 3), x, atol=1e-6)
        True
    """
    _check_images(pixel_values, "pixel_values")
    spec = get_intervention(name)
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must hold 3 per-channel values (std > 0); got mean={mean!r}, std={std!r}.")
    mean_t = torch.tensor(mean, device=pixel_values.device, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=pixel_values.device, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    images = pixel_values * std_t + mean_t  # (b, 3, H, W) in [0, 1] up to rounding
    try:
        out = spec.fn(images, generator, **params)
    except TypeError as err:
        raise TypeError(f"bad parameters {sorted(params)} for intervention {name!r}: {err}") from err
    return (out - mean_t) / std_t


# ---------------------------------------------------------------------------------------------------------------
# text interventions
# ---------------------------------------------------------------------------------------------------------------
def text_pairs(classnames: Sequence[str], base_template: str, templates: Sequence[str]) -> list[tuple[str, str]]:
    """``(base text, intervened text)`` for every class and template: the class is kept, the wording changes.

    Args:
        classnames: class names.
        base_template: e.g. ``"a photo of a {}."``.
        templates: swapped-in templates, e.g. ``["a sketch of a {}.", "a blurry photo of a {}."]``.

    Example:
        >>> text_pairs(["cat"], "a photo of a {}.", ["a sketch of a {}."])
        [('a photo of a cat.', 'a sketch of a cat.')]
    """
    for template in [base_template, *templates]:
        if template.count("{}") != 1:
            raise ValueError(f"text template {template!r} must contain exactly one '{{}}' for the class name.")
    if not templates:
        raise ValueError("text_pairs needs at least one template to swap for the base template.")
    return [(base_template.format(name), template.format(name)) for name in classnames for template in templates]


def text_deltas(
    encode: Callable[[list[str]], torch.Tensor], pairs: Sequence[tuple[str, str]], batch_size: int = 256
) -> torch.Tensor:
    """Differences ``normalize(f(t)) - normalize(f(do(t)))`` of text pairs, ``(len(pairs), d)``, float32 CPU.

    Args:
        encode: texts -> ``(n, d)`` features, e.g.
            ``lambda texts: backbone.encode_text(backbone.tokenize(texts))``.
        pairs: from :func:`text_pairs`.
        batch_size: texts per ``encode`` call.

    Example:
        >>> fake = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])
        >>> text_deltas(fake, [("ab", "ab")]).abs().max().item()
        0.0
    """
    if not pairs:
        raise ValueError("text_deltas needs at least one (text, intervened text) pair.")
    texts = [text for pair in pairs for text in pair]  # base, intervened, base, intervened, ...
    with torch.no_grad():
        parts = [encode(texts[s : s + batch_size]).float().cpu() for s in range(0, len(texts), batch_size)]
    features = F.normalize(torch.cat(parts), dim=-1).view(len(pairs), 2, -1)  # (m, 2, d)
    return features[:, 0] - features[:, 1]
