"""A small procedural image-text world: shapes on textured backgrounds in four rendering styles, with captions.

The embedded mini-CLIP is pretrained contrastively on this world and every benchmark runs on it, so nothing has to
be downloaded. An image shows one object (a shape from :data:`CLASSES` or :data:`CROSS_CLASSES`) with a colour, a
size, a position and a small rotation, on a background texture, rendered in one of four styles:

* ``photo``: soft shading, a drop shadow and mild Gaussian noise (the default domain);
* ``sketch``: a grayscale pencil outline with light hatching on near-white paper, the background reduced to faint
  lines;
* ``painting``: strong blur, colour jitter and brush-stroke streaks;
* ``pixel``: pixel art: flat cells on a coarse grid (object, darker outline, smoothed background), four levels
  per channel.

The benchmarks it supports: base-to-new classes (split :data:`CLASSES`), domain generalisation (train on one style,
test on the others), spurious correlation (backgrounds correlated with classes through :func:`habitat`, like
Waterbirds' land and water), image-text retrieval (captions) and cross-dataset transfer (:data:`CROSS_CLASSES`).

Everything is deterministic: attributes come from a local ``torch.Generator`` seeded with ``seed``, textures and
noise from an integer hash of each sample's ``texture_seed`` (so an image depends only on its own attributes), and
captions from ``random.Random(seed)``. Rendering is vectorised over the batch.

Example:
    >>> batch = generate(8, seed=0, styles=("photo", "sketch"))
    >>> batch.images.shape
    torch.Size([8, 3, 32, 32])
    >>> batch.attrs.classes[int(batch.attrs.class_idx[0])] in batch.captions[0]
    True
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigMixin, help_field, unknown_name_error

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "COLOURS",
    "COLOUR_RGB",
    "CROSS_CLASSES",
    "FINE_CLASSES",
    "PATTERNS",
    "PHOTO_EFFECTS",
    "SCENES",
    "SIZES",
    "STYLES",
    "Attributes",
    "WorldBatch",
    "WorldConfig",
    "caption",
    "captions",
    "corpus_words",
    "generate",
    "habitat",
    "normalize_images",
    "photo_effect",
    "render",
    "sample_attributes",
]

# --------------------------------------------------------------------------------------------------- vocabulary

#: The 24 object classes of the main benchmarks (base-to-new splits them in two halves).
CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "ring",
    "diamond",
    "pentagon",
    "arrow",
    "crescent",
    "rectangle",
    "hourglass",
    "drop",
    "flower",
    "cloud",
    "tree",
    "mushroom",
    "house",
    "key",
    "bone",
    "bolt",
    "target",
    "frame",
)

#: 12 further classes, disjoint from :data:`CLASSES` in names and shapes, for the cross-dataset benchmark.
CROSS_CLASSES: tuple[str, ...] = (
    "cup",
    "hat",
    "fish",
    "crown",
    "cactus",
    "snowman",
    "glasses",
    "boat",
    "sun",
    "ladder",
    "tick",
    "leaf",
)

#: 7 fine-grained shapes (regular polygons and stars told apart by their number of sides or points), for the
#: fine-grained datasets of world v2; names that web-like captions rarely use (see :mod:`.world_v2`).
FINE_CLASSES: tuple[str, ...] = (
    "hexagon",
    "heptagon",
    "octagon",
    "four-point star",
    "six-point star",
    "seven-point star",
    "eight-point star",
)

#: Surface patterns of an object; ``"plain"`` (index 0) is a solid fill, the only pattern of world v1.
PATTERNS: tuple[str, ...] = (
    "plain",
    "striped",
    "dotted",
    "checkered",
    "zigzag",
    "wavy",
    "gridded",
    "diagonal",
    "ringed",
    "spotted",
    "speckled",
    "two-tone",
    "hatched",
)

#: Object colours (no white, brown or grey: they would vanish into snow, sand and sketches).
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "black")

#: RGB in [0, 1] of each colour of :data:`COLOURS`.
COLOUR_RGB: MappingProxyType[str, tuple[float, float, float]] = MappingProxyType(
    {
        "red": (0.88, 0.10, 0.10),
        "green": (0.15, 0.82, 0.22),
        "blue": (0.12, 0.25, 0.95),
        "yellow": (0.98, 0.88, 0.12),
        "purple": (0.58, 0.20, 0.80),
        "orange": (1.00, 0.55, 0.05),
        "pink": (1.00, 0.50, 0.78),
        "black": (0.07, 0.07, 0.07),
    }
)

#: Background textures; ``grass`` and ``sand`` are land-like, ``water`` is water-like (for Waterbirds-like tasks).
BACKGROUNDS: tuple[str, ...] = ("grass", "sand", "water", "snow", "sky", "brick")

#: Further backgrounds of world 2, no class's habitat (the scenes of its scene dataset).
SCENES: tuple[str, ...] = ("forest", "rock", "wood", "tiles", "lava", "field")

#: Rendering styles (domains), ``photo`` first: the default domain.
STYLES: tuple[str, ...] = ("photo", "sketch", "painting", "pixel")

#: Object sizes; index 0 is small, 1 is large.
SIZES: tuple[str, ...] = ("small", "large")

# Each class's usual background: four classes per background in CLASSES, two in CROSS_CLASSES.
_HABITAT: dict[str, str] = {
    **dict.fromkeys(("star", "crescent", "cloud", "bolt", "sun", "tick"), "sky"),
    **dict.fromkeys(("tree", "mushroom", "flower", "heart", "leaf", "ladder"), "grass"),
    **dict.fromkeys(("drop", "ring", "circle", "diamond", "fish", "boat"), "water"),
    **dict.fromkeys(("triangle", "bone", "rectangle", "hourglass", "cactus", "crown"), "sand"),
    **dict.fromkeys(("pentagon", "cross", "target", "arrow", "snowman", "hat"), "snow"),
    **dict.fromkeys(("house", "key", "frame", "square", "cup", "glasses"), "brick"),
    **dict.fromkeys(("four-point star", "six-point star", "seven-point star", "eight-point star"), "sky"),
    "hexagon": "brick",
    "heptagon": "sand",
    "octagon": "snow",
}

# Object half-extent as a fraction of the image half-width, per size.
_SCALES: tuple[float, float] = (0.46, 0.7)
# Largest rotation (radians) either way: enough to vary, too little to turn one class into another.
_MAX_ANGLE = math.radians(15.0)
# Images rendered at once (bounds the memory of the intermediate tensors).
_CHUNK = 1024


def habitat(class_name: str) -> str:
    """The background a class usually appears on (the co-occurrence behind spurious correlations).

    Args:
        class_name: a name from :data:`CLASSES` or :data:`CROSS_CLASSES`.

    Returns:
        A name from :data:`BACKGROUNDS`; each background is the habitat of four of :data:`CLASSES` and two of
        :data:`CROSS_CLASSES`.

    Example:
        >>> habitat("cloud"), habitat("fish")
        ('sky', 'water')
    """
    if class_name not in _HABITAT:
        raise unknown_name_error("class", class_name, tuple(_HABITAT))
    return _HABITAT[class_name]


# ------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WorldConfig(ConfigMixin):
    """How images are rendered (what is drawn comes from :class:`Attributes`).

    Example:
        >>> WorldConfig(image_size=64).image_size
        64
    """

    image_size: int = help_field(32, "Side of the square images in pixels, 32 to 64.")
    noise: float = help_field(0.03, "Std of the Gaussian pixel noise of the 'photo' style (0: none).")
    pixel_grid: int = help_field(16, "Side of the coarse grid the 'pixel' style is drawn on, 4 to image_size.")
    outline: float = help_field(
        0.0,
        "Darkening of the object's contour in the photo and painting styles, in [0, 1] (0: none, as in world 1). "
        "A contour keeps the shape visible where object and background have the same brightness (grayscale).",
    )

    def __post_init__(self) -> None:
        if int(self.image_size) != self.image_size or not 32 <= self.image_size <= 64:
            raise ValueError(f"image_size must be an integer in [32, 64]; got {self.image_size!r}.")
        if not 0 <= self.noise <= 0.5:
            raise ValueError(f"noise must be in [0, 0.5]; got {self.noise!r}.")
        if int(self.pixel_grid) != self.pixel_grid or not 4 <= self.pixel_grid <= self.image_size:
            raise ValueError(
                f"pixel_grid must be an integer in [4, image_size={self.image_size}]; got {self.pixel_grid!r}."
            )
        if not 0 <= self.outline <= 1:
            raise ValueError(f"outline must be in [0, 1]; got {self.outline!r}.")


# --------------------------------------------------------------------------------------------------- attributes

_LONG_FIELDS = ("class_idx", "colour", "background", "style", "size", "texture_seed", "pattern")
_FLOAT_FIELDS = ("x", "y", "angle")


@dataclass(frozen=True)
class Attributes:
    """What each image of a batch shows: 1-D tensors of length n, indices into the name tuples beside them.

    Args:
        class_idx: (n,) long, index into ``classes``.
        colour: (n,) long, index into ``colours``.
        background: (n,) long, index into ``backgrounds``.
        style: (n,) long, index into ``styles``.
        size: (n,) long, index into :data:`SIZES` (0 small, 1 large).
        x, y: (n,) float, object centre in image coordinates ([-1, 1], x right, y down).
        angle: (n,) float, object rotation in radians.
        texture_seed: (n,) long, seeds the background texture and the noise of this image.
        pattern: (n,) long, index into ``patterns`` (default: all ``"plain"``, a solid fill).
        classes, colours, backgrounds, styles, patterns: the names the indices refer to.

    Example:
        >>> attrs = sample_attributes(4, seed=0)
        >>> len(attrs), attrs.describe(0)["style"] in STYLES
        (4, True)
    """

    class_idx: Tensor
    colour: Tensor
    background: Tensor
    style: Tensor
    size: Tensor
    x: Tensor
    y: Tensor
    angle: Tensor
    texture_seed: Tensor
    pattern: Tensor | None = None
    classes: tuple[str, ...] = CLASSES
    colours: tuple[str, ...] = COLOURS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    styles: tuple[str, ...] = STYLES
    patterns: tuple[str, ...] = PATTERNS[:1]

    def __post_init__(self) -> None:
        idx = self.class_idx
        n = idx.shape[0] if isinstance(idx, Tensor) and idx.dim() == 1 else -1
        if self.pattern is None and n >= 0:  # every object plain, as in world v1
            object.__setattr__(self, "pattern", torch.zeros(n, dtype=torch.long, device=idx.device))
        for name in _LONG_FIELDS + _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 1 or value.shape[0] != n:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"Attributes.{name} must be a 1-D tensor of length n={n}; got {shape}.")
            floating = value.is_floating_point()
            if (name in _FLOAT_FIELDS) != floating:
                kind = "a float" if name in _FLOAT_FIELDS else "a long"
                raise TypeError(f"Attributes.{name} must be {kind} tensor; got dtype {value.dtype}.")
        for name, vocab in (
            ("class_idx", self.classes),
            ("colour", self.colours),
            ("background", self.backgrounds),
            ("style", self.styles),
            ("size", SIZES),
            ("pattern", self.patterns),
        ):
            value = getattr(self, name)
            if n and (int(value.min()) < 0 or int(value.max()) >= len(vocab)):
                raise ValueError(
                    f"Attributes.{name} must index into {len(vocab)} names {vocab}; got values in "
                    f"[{int(value.min())}, {int(value.max())}]."
                )

    def __len__(self) -> int:
        return self.class_idx.shape[0]

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Attributes:
        """The attributes of a subset of the samples (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, (slice, Tensor)):
            index = torch.as_tensor(index, dtype=torch.long)
        values = {name: getattr(self, name)[index] for name in _LONG_FIELDS + _FLOAT_FIELDS}
        return Attributes(**values, **self._vocab())

    def _vocab(self) -> dict[str, tuple[str, ...]]:
        return {
            "classes": self.classes,
            "colours": self.colours,
            "backgrounds": self.backgrounds,
            "styles": self.styles,
            "patterns": self.patterns,
        }

    @classmethod
    def cat(cls, parts: Sequence[Attributes]) -> Attributes:
        """Concatenate batches of attributes that share their name tuples.

        Args:
            parts: at least one :class:`Attributes`, all with the same ``classes``/``colours``/... tuples.

        Example:
            >>> a, b = sample_attributes(3, seed=0), sample_attributes(2, seed=1)
            >>> len(Attributes.cat([a, b]))
            5
        """
        if not parts:
            raise ValueError("Attributes.cat needs at least one Attributes; got an empty sequence.")
        vocab = parts[0]._vocab()
        for i, part in enumerate(parts):
            if part._vocab() != vocab:
                raise ValueError(
                    f"Attributes.cat: part {i} names other classes/colours/backgrounds/styles/patterns than part 0; sample "
                    "all parts with the same vocabularies."
                )
        values = {name: torch.cat([getattr(p, name) for p in parts]) for name in _LONG_FIELDS + _FLOAT_FIELDS}
        return cls(**values, **vocab)

    def describe(self, i: int) -> dict[str, str | float]:
        """Sample ``i``'s attributes by name: class, colour, background, style, size, pattern, x, y, angle.

        Example:
            >>> sorted(sample_attributes(1, seed=0).describe(0))
            ['angle', 'background', 'class', 'colour', 'pattern', 'size', 'style', 'x', 'y']
        """
        return {
            "class": self.classes[int(self.class_idx[i])],
            "colour": self.colours[int(self.colour[i])],
            "background": self.backgrounds[int(self.background[i])],
            "style": self.styles[int(self.style[i])],
            "size": SIZES[int(self.size[i])],
            "pattern": self.patterns[int(self.pattern[i])],
            "x": float(self.x[i]),
            "y": float(self.y[i]),
            "angle": float(self.angle[i]),
        }


def _check_names(kind: str, names: Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each one of ``valid`` (``kind`` is the singular noun for messages)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError(f"the {kind} names must hold at least one of {tuple(valid)}; got an empty sequence.")
    for name in names:
        if name not in valid:
            raise unknown_name_error(kind, name, tuple(valid))
    if len(set(names)) != len(names):
        raise ValueError(f"the {kind} names must be distinct; got {names}.")
    return names


def _explicit(name: str, value: Tensor | Sequence[int] | None, n: int, size: int) -> Tensor | None:
    if value is None:
        return None
    value = torch.as_tensor(value)
    if value.dtype.is_floating_point or value.dim() != 1 or value.shape[0] != n:
        raise ValueError(
            f"{name} must be a 1-D integer tensor of length n={n}; got {value.dtype} {tuple(value.shape)}."
        )
    value = value.long()
    if n and (int(value.min()) < 0 or int(value.max()) >= size):
        raise ValueError(
            f"{name} must hold indices in [0, {size}); got values in [{int(value.min())}, {int(value.max())}]."
        )
    return value


def sample_attributes(
    n: int,
    seed: int,
    *,
    classes: Sequence[str] = CLASSES,
    colours: Sequence[str] = COLOURS,
    backgrounds: Sequence[str] = BACKGROUNDS,
    styles: Sequence[str] = STYLES,
    patterns: Sequence[str] = PATTERNS[:1],
    class_background_bias: float = 0.0,
    class_idx: Tensor | Sequence[int] | None = None,
    background: Tensor | Sequence[int] | None = None,
    style: Tensor | Sequence[int] | None = None,
    pattern: Tensor | Sequence[int] | None = None,
) -> Attributes:
    """Draw the attributes of ``n`` images, deterministically from ``seed``.

    Unset attributes are uniform over the given names; sizes, positions (kept inside the image), rotations and
    texture seeds are always random. The random draws do not depend on the explicit tensors, so passing e.g.
    ``background`` changes the backgrounds and nothing else.

    Args:
        n: number of samples.
        seed: seed of the local ``torch.Generator`` (the global RNG is never used).
        classes: class names the indices refer to (any of :data:`CLASSES` and :data:`CROSS_CLASSES`).
        colours / backgrounds / styles / patterns: the subsets of :data:`COLOURS` / :data:`BACKGROUNDS` (and
            :data:`SCENES`) /
            :data:`STYLES` / :data:`PATTERNS` to draw from (patterns: ``("plain",)`` by default, as in world v1).
        class_background_bias: probability that a sample's background is its class's :func:`habitat` (else
            uniform over ``backgrounds``, which may also hit the habitat); models real-world co-occurrence.
        class_idx: (n,) explicit class indices into ``classes`` (e.g. balanced classes).
        background: (n,) explicit background indices into ``backgrounds`` (overrides ``class_background_bias``);
            lets a task set backgrounds exactly, e.g. 95% habitat in train and balanced in test.
        style: (n,) explicit style indices into ``styles``.
        pattern: (n,) explicit pattern indices into ``patterns``.

    Example:
        >>> attrs = sample_attributes(100, seed=0, class_background_bias=1.0)
        >>> all(attrs.backgrounds[b] == habitat(attrs.classes[c]) for c, b in zip(attrs.class_idx, attrs.background))
        True
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}.")
    n = int(n)
    classes = _check_names("class", classes, tuple(_SHAPES))
    colours = _check_names("colour", colours, COLOURS)
    backgrounds = _check_names("background", backgrounds, BACKGROUNDS + SCENES)
    styles = _check_names("style", styles, STYLES)
    patterns = _check_names("pattern", patterns, PATTERNS)
    if not 0.0 <= class_background_bias <= 1.0:
        raise ValueError(f"class_background_bias must be a probability in [0, 1]; got {class_background_bias!r}.")
    explicit_class = _explicit("class_idx", class_idx, n, len(classes))
    explicit_background = _explicit("background", background, n, len(backgrounds))
    explicit_style = _explicit("style", style, n, len(styles))
    explicit_pattern = _explicit("pattern", pattern, n, len(patterns))

    gen = torch.Generator().manual_seed(int(seed))
    # Every draw happens in this fixed order whatever is given explicitly.
    drawn_class = torch.randint(len(classes), (n,), generator=gen)
    colour = torch.randint(len(colours), (n,), generator=gen)
    drawn_background = torch.randint(len(backgrounds), (n,), generator=gen)
    use_habitat = torch.rand(n, generator=gen) < class_background_bias
    drawn_style = torch.randint(len(styles), (n,), generator=gen)
    size = torch.randint(len(SIZES), (n,), generator=gen)
    offset = torch.rand(2, n, generator=gen) * 2 - 1  # (2, n) in [-1, 1]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * _MAX_ANGLE
    texture_seed = torch.randint(2**31 - 1, (n,), generator=gen)
    # drawn last (and only with several patterns), so the draws above are those of world v1
    if explicit_pattern is not None:
        drawn_pattern = explicit_pattern
    elif len(patterns) > 1:
        drawn_pattern = torch.randint(len(patterns), (n,), generator=gen)
    else:
        drawn_pattern = torch.zeros(n, dtype=torch.long)

    cls = drawn_class if explicit_class is None else explicit_class
    if explicit_background is not None:
        bg = explicit_background
    elif class_background_bias > 0:
        missing = sorted({habitat(c) for c in classes} - set(backgrounds))
        if missing:
            raise ValueError(
                f"class_background_bias > 0 needs every class's habitat among the backgrounds; {missing} missing "
                f"from {backgrounds}. Add them or pass explicit backgrounds."
            )
        habitat_idx = torch.tensor([backgrounds.index(habitat(c)) for c in classes], dtype=torch.long)
        bg = torch.where(use_habitat, habitat_idx[cls], drawn_background)
    else:
        bg = drawn_background
    # Keep the object inside the image: the larger the object, the smaller the range of its centre.
    reach = 1.0 - 1.1 * torch.tensor(_SCALES)[size]  # (n,)
    return Attributes(
        class_idx=cls,
        colour=colour,
        background=bg,
        style=drawn_style if explicit_style is None else explicit_style,
        size=size,
        x=offset[0] * reach,
        y=offset[1] * reach,
        angle=angle,
        texture_seed=texture_seed,
        pattern=drawn_pattern,
        classes=classes,
        colours=colours,
        backgrounds=backgrounds,
        styles=styles,
        patterns=patterns,
    )


# ------------------------------------------------------------------------------------------------------- shapes
# Signed distance functions (negative inside) in shape coordinates: u right, v up, the shape within [-1, 1]^2.

_Sdf = Callable[[Tensor, Tensor], Tensor]
_SHAPES: dict[str, _Sdf] = {}


def _shape(name: str) -> Callable[[_Sdf], _Sdf]:
    def register(fn: _Sdf) -> _Sdf:
        _SHAPES[name] = fn
        return fn

    return register


def _union(*ds: Tensor) -> Tensor:
    return functools.reduce(torch.minimum, ds)


def _subtract(a: Tensor, b: Tensor) -> Tensor:
    return torch.maximum(a, -b)


def _circle(u: Tensor, v: Tensor, r: float, cx: float = 0.0, cy: float = 0.0) -> Tensor:
    return torch.hypot(u - cx, v - cy) - r


def _ring(u: Tensor, v: Tensor, r_in: float, r_out: float, cx: float = 0.0, cy: float = 0.0) -> Tensor:
    return (torch.hypot(u - cx, v - cy) - (r_in + r_out) / 2).abs() - (r_out - r_in) / 2


def _box(u: Tensor, v: Tensor, hw: float, hh: float, cx: float = 0.0, cy: float = 0.0) -> Tensor:
    dx = (u - cx).abs() - hw
    dy = (v - cy).abs() - hh
    return torch.hypot(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)


def _segment(u: Tensor, v: Tensor, a: tuple[float, float], b: tuple[float, float], r: float) -> Tensor:
    ex, ey = b[0] - a[0], b[1] - a[1]
    wx, wy = u - a[0], v - a[1]
    h = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    return torch.hypot(wx - ex * h, wy - ey * h) - r


def _polygon(u: Tensor, v: Tensor, pts: Sequence[tuple[float, float]]) -> Tensor:
    # Exact distance to a simple polygon; the sign flips once per edge crossed by a ray (even-odd rule).
    dist = (u - pts[0][0]) ** 2 + (v - pts[0][1]) ** 2
    sign = torch.ones_like(u)
    for i in range(len(pts)):
        (ax, ay), (bx, by) = pts[i], pts[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = u - ax, v - ay
        h = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        dist = torch.minimum(dist, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        c1, c2, c3 = v >= ay, v < by, ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign = torch.where(flip, -sign, sign)
    return sign * dist.sqrt()


def _regular(k: int, r: float, phase: float = 90.0) -> list[tuple[float, float]]:
    return [
        (r * math.cos(math.radians(phase + 360 * i / k)), r * math.sin(math.radians(phase + 360 * i / k)))
        for i in range(k)
    ]


def _star_points(k: int, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * k):
        r = r_out if i % 2 == 0 else r_in
        a = math.radians(90 + 180 * i / k)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_STAR = _star_points(5, 1.0, 0.42)
_PENTAGON = _regular(5, 1.0)


@_shape("circle")
def _sdf_circle(u: Tensor, v: Tensor) -> Tensor:
    return _circle(u, v, 0.9)


@_shape("square")
def _sdf_square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.78, 0.78)


@_shape("triangle")
def _sdf_triangle(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v, [(0.0, 0.95), (-0.98, -0.75), (0.98, -0.75)])


@_shape("star")
def _sdf_star(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v - 0.08, _STAR)


@_shape("heart")
def _sdf_heart(u: Tensor, v: Tensor) -> Tensor:
    lobes = _union(_circle(u, v, 0.47, -0.45, 0.38), _circle(u, v, 0.47, 0.45, 0.38))
    return _union(lobes, _polygon(u, v, [(-0.88, 0.22), (0.0, -0.95), (0.88, 0.22), (0.0, 0.45)]))


@_shape("cross")
def _sdf_cross(u: Tensor, v: Tensor) -> Tensor:
    return _union(_box(u, v, 0.27, 0.92), _box(u, v, 0.92, 0.27))


@_shape("ring")
def _sdf_ring(u: Tensor, v: Tensor) -> Tensor:
    return _ring(u, v, 0.58, 0.95)


@_shape("diamond")
def _sdf_diamond(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v, [(0.0, 1.0), (-0.65, 0.0), (0.0, -1.0), (0.65, 0.0)])


@_shape("pentagon")
def _sdf_pentagon(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v + 0.1, _PENTAGON)


@_shape("arrow")
def _sdf_arrow(u: Tensor, v: Tensor) -> Tensor:
    return _union(_box(u, v, 0.5, 0.2, -0.45, 0.0), _polygon(u, v, [(-0.05, 0.7), (-0.05, -0.7), (0.98, 0.0)]))


@_shape("crescent")
def _sdf_crescent(u: Tensor, v: Tensor) -> Tensor:
    return _subtract(_circle(u, v, 0.92), _circle(u, v, 0.78, 0.45, 0.18))


@_shape("rectangle")
def _sdf_rectangle(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.95, 0.45)


@_shape("hourglass")
def _sdf_hourglass(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v, [(-0.75, 0.95), (0.75, 0.95), (0.1, 0.0), (0.75, -0.95), (-0.75, -0.95), (-0.1, 0.0)])


@_shape("drop")
def _sdf_drop(u: Tensor, v: Tensor) -> Tensor:
    return _union(_circle(u, v, 0.6, 0.0, -0.35), _polygon(u, v, [(0.0, 1.0), (-0.52, -0.05), (0.52, -0.05)]))


@_shape("flower")
def _sdf_flower(u: Tensor, v: Tensor) -> Tensor:
    # A daisy on a stem with a leaf: the stem keeps it apart from round shapes even when coarsely drawn.
    centres = [(0.42 * math.cos(a), 0.38 + 0.42 * math.sin(a)) for a in (math.radians(90 + 60 * i) for i in range(6))]
    head = _union(_circle(u, v, 0.24, 0.0, 0.38), *(_circle(u, v, 0.22, x, y) for x, y in centres))
    c = math.sqrt(0.5)
    a, b = (u - 0.32 + v + 0.5) * c, (v + 0.5 - u + 0.32) * c  # leaf axis at 45 degrees
    leaf = torch.maximum(_circle(a, b, 0.3, 0.0, -0.18), _circle(a, b, 0.3, 0.0, 0.18))
    return _union(head, _segment(u, v, (0.0, 0.0), (0.0, -0.95), 0.1), leaf)


@_shape("cloud")
def _sdf_cloud(u: Tensor, v: Tensor) -> Tensor:
    return _union(
        _circle(u, v, 0.42, -0.52, -0.12),
        _circle(u, v, 0.55, 0.05, 0.2),
        _circle(u, v, 0.4, 0.55, -0.1),
        _box(u, v, 0.55, 0.22, 0.0, -0.32),
    )


@_shape("tree")
def _sdf_tree(u: Tensor, v: Tensor) -> Tensor:
    return _union(
        _polygon(u, v, [(0.0, 1.0), (-0.6, 0.25), (0.6, 0.25)]),
        _polygon(u, v, [(0.0, 0.6), (-0.88, -0.45), (0.88, -0.45)]),
        _box(u, v, 0.16, 0.3, 0.0, -0.68),
    )


@_shape("mushroom")
def _sdf_mushroom(u: Tensor, v: Tensor) -> Tensor:
    cap = torch.maximum(_circle(u, v, 0.95, 0.0, -0.05), -(v + 0.05))
    return _union(cap, _box(u, v, 0.26, 0.45, 0.0, -0.5))


@_shape("house")
def _sdf_house(u: Tensor, v: Tensor) -> Tensor:
    body = _union(_box(u, v, 0.65, 0.5, 0.0, -0.45), _polygon(u, v, [(-0.95, 0.05), (0.95, 0.05), (0.0, 0.95)]))
    return _subtract(body, _box(u, v, 0.17, 0.3, 0.0, -0.68))


@_shape("key")
def _sdf_key(u: Tensor, v: Tensor) -> Tensor:
    return _union(
        _ring(u, v, 0.2, 0.45, -0.52, 0.0),
        _box(u, v, 0.6, 0.12, 0.36, 0.0),
        _box(u, v, 0.08, 0.22, 0.6, -0.25),
        _box(u, v, 0.08, 0.22, 0.88, -0.25),
    )


@_shape("bone")
def _sdf_bone(u: Tensor, v: Tensor) -> Tensor:
    ends = [_circle(u, v, 0.27, sx * 0.68, sy * 0.22) for sx in (-1, 1) for sy in (-1, 1)]
    return _union(_box(u, v, 0.66, 0.17), *ends)


@_shape("bolt")
def _sdf_bolt(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v, [(0.3, 1.0), (-0.55, -0.1), (-0.02, -0.1), (-0.3, -1.0), (0.6, 0.18), (0.08, 0.18)])


@_shape("target")
def _sdf_target(u: Tensor, v: Tensor) -> Tensor:
    return _union(_circle(u, v, 0.32), _ring(u, v, 0.62, 0.95))


@_shape("frame")
def _sdf_frame(u: Tensor, v: Tensor) -> Tensor:
    return _subtract(_box(u, v, 0.85, 0.85), _box(u, v, 0.5, 0.5))


@_shape("cup")
def _sdf_cup(u: Tensor, v: Tensor) -> Tensor:
    body = _polygon(u, v, [(-0.75, 0.7), (0.45, 0.7), (0.3, -0.8), (-0.6, -0.8)])
    return _union(body, _ring(u, v, 0.2, 0.42, 0.5, 0.05))


@_shape("hat")
def _sdf_hat(u: Tensor, v: Tensor) -> Tensor:
    return _union(_box(u, v, 0.95, 0.13, 0.0, -0.6), _box(u, v, 0.55, 0.68, 0.0, 0.1))


@_shape("fish")
def _sdf_fish(u: Tensor, v: Tensor) -> Tensor:
    body = (torch.hypot((u + 0.2) / 0.68, v / 0.45) - 1.0) * 0.45
    return _union(body, _polygon(u, v, [(0.35, 0.0), (0.98, 0.55), (0.98, -0.55)]))


@_shape("crown")
def _sdf_crown(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v, [(-0.9, -0.65), (0.9, -0.65), (0.9, 0.7), (0.45, 0.0), (0.0, 0.8), (-0.45, 0.0), (-0.9, 0.7)])


@_shape("cactus")
def _sdf_cactus(u: Tensor, v: Tensor) -> Tensor:
    return _union(
        _segment(u, v, (0.0, -0.95), (0.0, 0.75), 0.2),
        _segment(u, v, (-0.6, -0.15), (0.0, -0.15), 0.14),
        _segment(u, v, (-0.6, -0.15), (-0.6, 0.4), 0.14),
        _segment(u, v, (0.6, 0.15), (0.0, 0.15), 0.14),
        _segment(u, v, (0.6, 0.15), (0.6, 0.65), 0.14),
    )


@_shape("snowman")
def _sdf_snowman(u: Tensor, v: Tensor) -> Tensor:
    return _union(_circle(u, v, 0.52, 0.0, -0.45), _circle(u, v, 0.36, 0.0, 0.42))


@_shape("glasses")
def _sdf_glasses(u: Tensor, v: Tensor) -> Tensor:
    return _union(
        _ring(u, v, 0.2, 0.42, -0.52, 0.0), _ring(u, v, 0.2, 0.42, 0.52, 0.0), _box(u, v, 0.14, 0.08, 0.0, 0.1)
    )


@_shape("boat")
def _sdf_boat(u: Tensor, v: Tensor) -> Tensor:
    hull = _polygon(u, v, [(-0.95, -0.35), (0.95, -0.35), (0.6, -0.85), (-0.6, -0.85)])
    return _union(hull, _polygon(u, v, [(-0.05, -0.25), (-0.05, 0.95), (0.7, -0.25)]))


@_shape("sun")
def _sdf_sun(u: Tensor, v: Tensor) -> Tensor:
    rays = [
        _segment(u, v, (0.68 * math.cos(a), 0.68 * math.sin(a)), (0.92 * math.cos(a), 0.92 * math.sin(a)), 0.08)
        for a in (math.radians(45 * i) for i in range(8))
    ]
    return _union(_circle(u, v, 0.5), *rays)


@_shape("ladder")
def _sdf_ladder(u: Tensor, v: Tensor) -> Tensor:
    rungs = [_box(u, v, 0.5, 0.09, 0.0, y) for y in (-0.55, 0.0, 0.55)]
    return _union(_box(u, v, 0.11, 0.95, -0.5, 0.0), _box(u, v, 0.11, 0.95, 0.5, 0.0), *rungs)


@_shape("tick")
def _sdf_tick(u: Tensor, v: Tensor) -> Tensor:
    return _union(_segment(u, v, (-0.75, 0.05), (-0.25, -0.6), 0.17), _segment(u, v, (-0.25, -0.6), (0.8, 0.75), 0.17))


@_shape("leaf")
def _sdf_leaf(u: Tensor, v: Tensor) -> Tensor:
    # A lens (intersection of two discs) along the diagonal, with a stalk.
    c = math.sqrt(0.5)
    a, b = (u + v) * c, (v - u) * c  # rotate by -45 degrees: a along the leaf
    lens = torch.maximum(_circle(a, b, 0.9, 0.0, -0.5), _circle(a, b, 0.9, 0.0, 0.5))
    return _union(lens, _segment(u, v, (-0.45, -0.45), (-0.85, -0.85), 0.08))


def _register_fine_shapes() -> None:
    """The fine-grained families of :data:`FINE_CLASSES`: regular polygons (a vertex up, like the pentagon) and
    stars whose inner radius grows with the number of points so that every arm stays a few pixels wide."""

    def polygon(sides: int) -> _Sdf:
        pts = _regular(sides, 0.98)
        return lambda u, v: _polygon(u, v, pts)

    def star(points: int, inner: float) -> _Sdf:
        pts = _star_points(points, 1.0, inner)
        return lambda u, v: _polygon(u, v, pts)

    for name, sides in (("hexagon", 6), ("heptagon", 7), ("octagon", 8)):
        _shape(name)(polygon(sides))
    for name, points, inner in (
        ("four-point star", 4, 0.38),
        ("six-point star", 6, 0.5),
        ("seven-point star", 7, 0.55),
        ("eight-point star", 8, 0.6),
    ):
        _shape(name)(star(points, inner))


_register_fine_shapes()


# ----------------------------------------------------------------------------------------------------- textures
# Integer hashing gives every sample its own noise from its texture seed alone, vectorised and device-free.

_M32 = 0xFFFFFFFF
_PRIMES = (0x27D4EB2F, 0x165667B1, 0x1B873593, 0x2C1B3C6D, 0x297A2D39)  # all < 2**31: products fit in int64


def _hash_bits(*keys: Tensor | int) -> Tensor:
    """32 well-mixed bits (int64 tensor) from integer keys (broadcast)."""
    h: Tensor | int = 0x3C6EF372
    for i, key in enumerate(keys):
        key = torch.as_tensor(key, dtype=torch.long) & _M32
        h = ((h ^ key) * _PRIMES[i % len(_PRIMES)]) & _M32
        h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    h = h ^ (h >> 12)
    h = (h * 0x297A2D39) & _M32
    return h ^ (h >> 15)


def _hash01(*keys: Tensor | int) -> Tensor:
    """Uniform floats in [0, 1) from integer keys."""
    return (_hash_bits(*keys) >> 8).float() * (1.0 / 2**24)


def _pair(a: Tensor, b: Tensor) -> Tensor:
    """One integer key from two lattice coordinates (each taken modulo 2**16)."""
    return ((a & 0xFFFF) << 16) | (b & 0xFFFF)


def _gaussian(*keys: Tensor | int) -> Tensor:
    """Standard normal floats from integer keys (Box-Muller on the two 16-bit halves of one hash)."""
    bits = _hash_bits(*keys)
    u1 = ((bits & 0xFFFF).float() + 0.5) * (1.0 / 65536)
    u2 = (bits >> 16).float() * (1.0 / 65536)
    return (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)


def _value_noise(seed: Tensor, salt: int, x: Tensor, y: Tensor) -> Tensor:
    """Smooth noise in [0, 1] with unit lattice spacing; ``seed`` (m, 1, 1) broadcasts against x, y."""
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = x0.long(), y0.long()
    base = _hash_bits(seed, salt)  # hash the per-image keys once, not per pixel
    n00 = _hash01(base, _pair(ix, iy))
    n10 = _hash01(base, _pair(ix + 1, iy))
    n01 = _hash01(base, _pair(ix, iy + 1))
    n11 = _hash01(base, _pair(ix + 1, iy + 1))
    return torch.lerp(torch.lerp(n00, n10, fx), torch.lerp(n01, n11, fx), fy)


def _rgb(r: float, g: float, b: float) -> Tensor:
    return torch.tensor([r, g, b]).view(1, 3, 1, 1)


def _mix(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    return a + (b - a) * t


# Each texture maps (seed (m, 1, 1), X (1, S, S), Y (1, S, S), pixel index (1, S, S)) to RGB (m, 3, S, S); texture
# coordinates are relative to the image, so a 64 px image shows the same texture as a 32 px one, only sharper.


def _tex_grass(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    blades = _value_noise(seed, 1, tx * 3.5 + 0.8 * ty, ty * 0.5)  # thin slanted streaks
    patches = _value_noise(seed, 2, tx * 0.6, ty * 0.6)
    shade = (0.6 + 0.55 * blades + 0.3 * (patches - 0.5)).unsqueeze(1)  # (m, 1, S, S)
    return _rgb(0.28, 0.48, 0.15) * shade


def _tex_sand(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    phase = _hash01(seed, 3) * 2 * math.pi
    warp = _value_noise(seed, 4, tx * 0.5, ty * 0.5)
    ripples = torch.sin(ty * 2.2 + 0.6 * tx + 3 * warp + phase)
    grain = _hash01(_hash_bits(seed, 5), pix)
    shade = 1 + 0.06 * ripples - 0.2 * (grain > 0.85).float() + 0.08 * (grain < 0.08).float()
    return _rgb(0.86, 0.76, 0.54) * shade.unsqueeze(1)


def _tex_water(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    phase = _hash01(seed, 6) * 2 * math.pi
    warp = _value_noise(seed, 7, tx * 0.7, ty * 0.7)
    waves = torch.sin(ty * 3.0 + 1.2 * torch.sin(tx * 1.1 + phase) + 4 * warp + phase)
    crest = waves.clamp(min=0).pow(6).unsqueeze(1)  # bright wave crests
    depth = (0.85 + 0.15 * waves).unsqueeze(1)
    return _rgb(0.08, 0.32, 0.58) * depth + _rgb(0.55, 0.6, 0.55) * crest


def _tex_snow(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    drifts = 0.65 * _value_noise(seed, 8, tx * 0.5, ty * 0.5) + 0.35 * _value_noise(seed, 9, tx * 1.3, ty * 1.3)
    sparkle = (_hash01(_hash_bits(seed, 10), pix) > 0.96).float()
    base = _rgb(0.95, 0.95, 0.96) - _rgb(0.16, 0.15, 0.12) * drifts.unsqueeze(1)
    return base + 0.08 * sparkle.unsqueeze(1)


def _tex_sky(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    height = ((Y + 1) / 2).unsqueeze(1)  # 0 at the top, 1 at the bottom
    blue = _mix(_rgb(0.22, 0.45, 0.88), _rgb(0.55, 0.72, 0.95), height)
    puffs = 0.65 * _value_noise(seed, 11, tx * 0.45, ty * 0.7) + 0.35 * _value_noise(seed, 12, tx * 1.2, ty * 1.2)
    cloud = ((puffs - 0.5) / 0.2).clamp(0, 1).unsqueeze(1)
    return _mix(blue, _rgb(0.95, 0.96, 0.98), 0.9 * cloud)


def _tex_brick(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    by = (Y + 1) * 3 + _hash01(seed, 13)
    row = torch.floor(by)
    bx = (X + 1) * 1.6 + 0.5 * row + _hash01(seed, 14)
    col = torch.floor(bx)
    mortar = (((by - row) < 0.16) | ((bx - col) < 0.08)).float().unsqueeze(1)
    tint = (0.8 + 0.35 * _hash01(_hash_bits(seed, 15), _pair(row.long(), col.long()))).unsqueeze(1)
    return _mix(_rgb(0.62, 0.28, 0.2) * tint, _rgb(0.74, 0.71, 0.66), mortar)


def _tex_forest(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    canopy = _value_noise(seed, 70, tx * 1.4, ty * 1.4)  # leafy blobs
    trunks = (_value_noise(seed, 71, tx * 3.0, ty * 0.15) > 0.72).float()  # dark vertical trunks
    shade = (0.45 + 0.7 * canopy).unsqueeze(1)
    leaves = _mix(_rgb(0.05, 0.25, 0.08), _rgb(0.2, 0.45, 0.12), shade)
    return _mix(leaves, _rgb(0.25, 0.15, 0.08), 0.85 * trunks.unsqueeze(1))


def _tex_rock(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    stone = 0.6 * _value_noise(seed, 72, tx * 0.9, ty * 0.9) + 0.4 * _value_noise(seed, 73, tx * 2.5, ty * 2.5)
    cracks = ((_value_noise(seed, 74, tx * 1.2, ty * 1.2) - 0.5).abs() < 0.03).float()
    grey = (0.35 + 0.35 * stone - 0.2 * cracks).unsqueeze(1)
    return _rgb(0.95, 0.92, 0.88) * grey


def _tex_wood(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    by = (Y + 1) * 2.5 + _hash01(seed, 75)
    plank = torch.floor(by)
    seam = ((by - plank) < 0.06).float()
    grain = torch.sin((X + 1) * 9 + 6 * _value_noise(seed, 76, (X + 1) * 2, by * 2) + plank * 1.7)
    tone = (0.85 + 0.1 * grain + 0.12 * (_hash01(_hash_bits(seed, 77), plank.long()) - 0.5)).unsqueeze(1)
    return _mix(_rgb(0.55, 0.34, 0.16) * tone, _rgb(0.2, 0.12, 0.05), 0.8 * seam.unsqueeze(1))


def _tex_tiles(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    u, v = (X + 1) * 2.5 + _hash01(seed, 78), (Y + 1) * 2.5 + _hash01(seed, 79)
    grout = (((u - torch.floor(u)) < 0.08) | ((v - torch.floor(v)) < 0.08)).float().unsqueeze(1)
    tint = 0.9 + 0.1 * _hash01(_hash_bits(seed, 80), _pair(torch.floor(u).long(), torch.floor(v).long()))
    return _mix(_rgb(0.62, 0.8, 0.88) * tint.unsqueeze(1), _rgb(0.92, 0.92, 0.9), grout)


def _tex_lava(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    tx, ty = (X + 1) * 4, (Y + 1) * 4
    flow = _value_noise(seed, 81, tx * 1.1 + 0.5 * ty, ty * 0.8)
    veins = (1 - ((flow - 0.5).abs() / 0.08)).clamp(0, 1).unsqueeze(1)  # glowing cracks
    crust = (0.5 + 0.5 * _value_noise(seed, 82, tx * 2.2, ty * 2.2)).unsqueeze(1)
    return _mix(_rgb(0.18, 0.06, 0.05) * crust, _rgb(1.0, 0.55, 0.1), veins)


def _tex_field(seed: Tensor, X: Tensor, Y: Tensor, pix: Tensor) -> Tensor:
    # crop rows seen from above, in a random direction, alternating two crops
    theta = _hash01(seed, 83) * math.pi
    along = X * torch.cos(theta) + Y * torch.sin(theta)
    rows = torch.sin(along * 26 + 2 * _value_noise(seed, 84, (X + 1) * 2, (Y + 1) * 2))
    crop = (rows > 0).float().unsqueeze(1)
    return _mix(_rgb(0.55, 0.6, 0.2), _rgb(0.78, 0.7, 0.3), crop) * (0.9 + 0.1 * rows.unsqueeze(1))


_TEXTURES: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "grass": _tex_grass,
    "sand": _tex_sand,
    "water": _tex_water,
    "snow": _tex_snow,
    "sky": _tex_sky,
    "brick": _tex_brick,
    "forest": _tex_forest,
    "rock": _tex_rock,
    "wood": _tex_wood,
    "tiles": _tex_tiles,
    "lava": _tex_lava,
    "field": _tex_field,
}


# ----------------------------------------------------------------------------------------------------- patterns
# Each pattern maps object coordinates (u, v: (m, S, S), object units), one pixel in object units (px: (m, 1, 1))
# and the texture seeds ((m, 1, 1)) to a mask in [0, 1] (1: the pattern's second colour), anti-aliased over about
# a pixel. Patterns live in object coordinates, so they turn and scale with the object. The period is 0.45 object
# units: 5 to 8 pixels at 48 px, resolved by every style but the coarsest pixel art.

_PERIOD = 0.45


def _soft(signed: Tensor, px: Tensor) -> Tensor:
    """Anti-aliased step: 1 where ``signed`` (a distance-like value in object units) is positive."""
    return (0.5 + signed / px).clamp(0, 1)


def _stripes(t: Tensor, px: Tensor, duty: float = 0.5) -> Tensor:
    """Bands across the coordinate ``t``: the mask covers a fraction ``duty`` of each period."""
    phase = t / _PERIOD - torch.floor(t / _PERIOD)  # [0, 1)
    dist = (phase - 0.5).abs() * _PERIOD  # 0 at the band centre
    return _soft(duty * _PERIOD / 2 - dist, px)


def _lines(t: Tensor, px: Tensor, width: float = 0.09) -> Tensor:
    """Thin lines (``width`` object units) at the multiples of the period along ``t``."""
    dist = (t / _PERIOD - torch.round(t / _PERIOD)).abs() * _PERIOD
    return _soft(width / 2 - dist, px)


def _pattern_mask(name: str, u: Tensor, v: Tensor, px: Tensor, seed: Tensor) -> Tensor:
    diag = math.sqrt(0.5)
    if name == "striped":
        return _stripes(v, px)
    if name == "diagonal":
        return _stripes((u + v) * diag, px)
    if name == "checkered":
        a = _stripes(u, px) * 2 - 1
        b = _stripes(v, px) * 2 - 1
        return (0.5 + 0.5 * a * b).clamp(0, 1)
    if name == "dotted":
        du = (u / _PERIOD - torch.round(u / _PERIOD)) * _PERIOD
        dv = (v / _PERIOD - torch.round(v / _PERIOD)) * _PERIOD
        return _soft(0.16 - torch.hypot(du, dv), px)
    if name == "gridded":
        return torch.maximum(_lines(u, px), _lines(v, px))
    if name == "hatched":
        return torch.maximum(_lines((u + v) * diag, px), _lines((u - v) * diag, px))
    if name == "wavy":
        return _stripes(v + 0.12 * torch.sin(u * (2 * math.pi / (1.6 * _PERIOD))), px)
    if name == "zigzag":
        tri = (u / (1.2 * _PERIOD) - torch.floor(u / (1.2 * _PERIOD)) - 0.5).abs() * 2  # triangle wave in [0, 1]
        return _stripes(v + 0.3 * tri, px)
    if name == "ringed":
        return _stripes(torch.hypot(u, v) + _PERIOD / 4, px)
    if name == "spotted":
        blobs = _value_noise(seed, 50, u * (1.6 / _PERIOD) + 50, v * (1.6 / _PERIOD) + 50)
        return _soft((blobs - 0.62) * 0.6, px)
    if name == "speckled":
        cells = _hash01(_hash_bits(seed, 51), _pair(torch.floor(u / px).long(), torch.floor(v / px).long()))
        return (cells > 0.72).float()
    if name == "two-tone":
        return _soft(u, px)
    raise unknown_name_error("pattern", name, PATTERNS)


def _second_colour(colour: Tensor) -> Tensor:
    """A pattern's second colour: near-white on dark objects, near-black on light ones ((m, 3, 1, 1))."""
    light = _luma(colour) < 0.55
    return torch.where(light, torch.full_like(colour, 0.95), torch.full_like(colour, 0.08))


# ---------------------------------------------------------------------------------------------------- rendering


def _blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (m, c, S, S) images with reflected borders."""
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    m, c, h, w = img.shape
    flat = img.reshape(m * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return flat.reshape(m, c, h, w)


def _shift(img: Tensor, k: int) -> Tensor:
    """Shift (m, c, S, S) images k pixels right and down, filling with zeros."""
    return F.pad(img, (k, 0, k, 0))[:, :, : img.shape[2], : img.shape[3]]


def _luma(img: Tensor) -> Tensor:
    return (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)  # (m, 1, S, S)


@dataclass
class _Scene:
    """Per-chunk tensors shared by the styles (m images of side S)."""

    seed: Tensor  # (m, 1, 1) texture seeds
    X: Tensor  # (1, S, S) pixel centres in [-1, 1], x right
    Y: Tensor  # (1, S, S) y down
    pix: Tensor  # (1, S, S) pixel index, row * S + column
    dx: Tensor  # (m, S, S) offset from the object centre in object units
    dy: Tensor  # (m, S, S)
    sdf: Tensor  # (m, S, S) signed distance to the shape in object units
    px: Tensor  # (m, 1, 1) one pixel in object units
    cover: Tensor  # (m, 1, S, S) anti-aliased object coverage in [0, 1]
    colour: Tensor  # (m, 3, 1, 1) object RGB
    background: Tensor  # (m, 3, S, S) background texture
    pattern: Tensor  # (m, 1, S, S) pattern mask in [0, 1], or (m, 1, 1, 1) zeros when every object is plain
    fill: Tensor  # (m, 3, S, S) object surface colour with its pattern, or the colour itself when plain

    def subset(self, idx: Tensor) -> _Scene:
        keep = {"X", "Y", "pix"}
        return _Scene(
            **{f.name: getattr(self, f.name) if f.name in keep else getattr(self, f.name)[idx] for f in fields(self)}
        )


def _shaded(scene: _Scene, config: WorldConfig) -> Tensor:
    """The lit object over its shadow on the background: (m, 3, S, S), no noise."""
    size = config.image_size
    light = (0.86 - 0.2 * (scene.dx + scene.dy)).unsqueeze(1)  # light from the top left
    rim = (0.78 + 0.22 * (-scene.sdf / 0.25).clamp(0, 1)).unsqueeze(1)  # darker towards the outline
    obj = (scene.fill * light * rim).clamp(0, 1)
    if config.outline > 0:
        # a dark contour about 1.5 pixels wide, inside and just outside the shape's edge
        contour = (1 - (scene.sdf / scene.px + 0.25).abs() / 1.5).clamp(0, 1).unsqueeze(1)  # (m, 1, S, S)
        obj = obj * (1 - config.outline * contour)
        cover = torch.maximum(scene.cover, contour)
        k = max(1, round(size / 24))
        shadow = _blur(_shift(cover, k), 0.8 * k)
        ground = scene.background.clamp(0, 1) * (1 - 0.45 * shadow)
        return _mix(ground, obj, cover)
    k = max(1, round(size / 24))
    shadow = _blur(_shift(scene.cover, k), 0.8 * k)
    ground = scene.background.clamp(0, 1) * (1 - 0.45 * shadow)
    return _mix(ground, obj, scene.cover)


def _style_photo(scene: _Scene, config: WorldConfig) -> Tensor:
    img = _shaded(scene, config)
    if config.noise > 0:
        size = config.image_size
        key = torch.arange(3).view(1, 3, 1, 1) * size * size + scene.pix.unsqueeze(1)  # (1, 3, S, S)
        noise = _gaussian(_hash_bits(scene.seed, 20).unsqueeze(1), key)
        img = img + config.noise * noise
    return img


def _style_sketch(scene: _Scene, config: WorldConfig) -> Tensor:
    size = config.image_size
    tx, ty = (scene.X + 1) * 4, (scene.Y + 1) * 4
    paper = 0.95 + 0.04 * (_value_noise(scene.seed, 30, tx * 2, ty * 2) - 0.5).unsqueeze(1)
    # Faint lines where the background texture has edges, hidden behind the object.
    lum = _luma(scene.background.clamp(0, 1))
    edges = ((lum - _blur(lum, 1.0)).abs() * 4).clamp(0, 1) * (1 - scene.cover)
    # A wobbly pencil outline about 1.5 px wide at 32 px, plus light diagonal hatching inside.
    wobble = (_value_noise(scene.seed, 31, tx * 1.5, ty * 1.5) - 0.5) * 1.2
    width = 0.9 + size / 96
    outline = (width - (scene.sdf / scene.px + wobble).abs()).clamp(0, 1).unsqueeze(1)
    stripes = torch.sin((scene.X + scene.Y) * (size / 2) * (2 * math.pi / 3.0 * 32 / size))
    hatch = (stripes > 0.3).float() * scene.cover
    ink = (0.8 * outline + 0.22 * hatch + 0.3 * edges + 0.45 * scene.pattern * scene.cover).clamp(0, 1)
    return _mix(paper, torch.full_like(paper, 0.12), ink).expand(-1, 3, -1, -1)


def _style_painting(scene: _Scene, config: WorldConfig) -> Tensor:
    size = config.image_size
    img = _blur(_shaded(scene, config), 0.028 * size)
    # Brush strokes: noise stretched along a random direction per image.
    theta = _hash01(scene.seed, 40) * math.pi  # (m, 1, 1)
    along = scene.X * torch.cos(theta) + scene.Y * torch.sin(theta)
    across = -scene.X * torch.sin(theta) + scene.Y * torch.cos(theta)
    strokes = _value_noise(scene.seed, 41, along * 3, across * 14).unsqueeze(1)
    # A second layer of strokes shifts the colour towards a random hue per image.
    hue = _hash01(scene.seed.unsqueeze(1), 42, torch.arange(3).view(1, 3, 1, 1)) - 0.5  # (m, 3, 1, 1)
    tint = _value_noise(scene.seed, 43, along * 2, across * 10).unsqueeze(1) - 0.5  # (m, 1, S, S)
    img = img * (0.85 + 0.3 * strokes) + 0.3 * hue * tint
    # Colour jitter: per-image saturation boost and channel gains.
    grey = _luma(img)
    saturation = 1.1 + 0.4 * _hash01(scene.seed, 44).view(-1, 1, 1, 1)
    gains = 0.85 + 0.3 * _hash01(scene.seed.unsqueeze(1), 45, torch.arange(3).view(1, 3, 1, 1))
    return (grey + (img - grey) * saturation) * gains


def _style_pixel(scene: _Scene, config: WorldConfig) -> Tensor:
    size, grid = config.image_size, config.pixel_grid
    # Pixel art: flat cells on a coarse grid, the object filled with its colour inside a darker outline, the
    # background smoothed first so that its texture does not break into speckles.
    cover = F.adaptive_avg_pool2d(scene.cover, grid)  # (m, 1, g, g)
    ground = F.adaptive_avg_pool2d(_blur(scene.background.clamp(0, 1), 0.05 * size), grid)  # (m, 3, g, g)
    body = cover >= 0.35
    rim = (F.max_pool2d(body.float(), 3, stride=1, padding=1) > 0) & ~body
    dark = _luma(scene.colour) < 0.3  # (m, 1, 1, 1): a black object gets a light outline
    outline = torch.where(dark, torch.full_like(scene.colour, 0.75), 0.4 * scene.colour)
    fill = scene.fill if scene.fill.shape[-1] == 1 else F.adaptive_avg_pool2d(scene.fill, grid)  # (m, 3, g | 1, g | 1)
    coarse = torch.where(body, fill, torch.where(rim, outline, ground))
    coarse = torch.round(coarse * 3) / 3  # four levels per channel
    return F.interpolate(coarse, size=size, mode="nearest")


_STYLE_FNS: dict[str, Callable[[_Scene, WorldConfig], Tensor]] = {
    "photo": _style_photo,
    "sketch": _style_sketch,
    "painting": _style_painting,
    "pixel": _style_pixel,
}


def _render_chunk(attrs: Attributes, config: WorldConfig, class_names: tuple[str, ...]) -> Tensor:
    m, size = len(attrs), config.image_size
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1
    Y, X = torch.meshgrid(lin, lin, indexing="ij")
    X, Y = X.unsqueeze(0), Y.unsqueeze(0)  # (1, S, S)
    pix = torch.arange(size * size).view(1, size, size)

    scale = torch.tensor(_SCALES)[attrs.size].view(m, 1, 1)
    dx = (X - attrs.x.view(m, 1, 1)) / scale  # (m, S, S)
    dy = (Y - attrs.y.view(m, 1, 1)) / scale
    cos, sin = attrs.angle.cos().view(m, 1, 1), attrs.angle.sin().view(m, 1, 1)
    u = cos * dx + sin * dy
    v = sin * dx - cos * dy  # v points up
    sdf = torch.empty(m, size, size)
    for k in attrs.class_idx.unique().tolist():
        idx = (attrs.class_idx == k).nonzero().squeeze(1)
        sdf[idx] = _SHAPES[class_names[k]](u[idx], v[idx])
    px = (2.0 / size) / scale  # (m, 1, 1)
    cover = (0.5 - sdf / px).clamp(0, 1).unsqueeze(1)  # (m, 1, S, S)

    seed = attrs.texture_seed.view(m, 1, 1)
    background = torch.empty(m, 3, size, size)
    for k in attrs.background.unique().tolist():
        idx = (attrs.background == k).nonzero().squeeze(1)
        background[idx] = _TEXTURES[attrs.backgrounds[k]](seed[idx], X, Y, pix)
    rgb = torch.tensor([COLOUR_RGB[c] for c in attrs.colours])[attrs.colour].view(m, 3, 1, 1)
    pattern, fill = torch.zeros(m, 1, 1, 1), rgb
    if bool((attrs.pattern > 0).any()) or attrs.patterns[0] != "plain":
        pattern = torch.zeros(m, 1, size, size)
        for k in attrs.pattern.unique().tolist():
            if attrs.patterns[k] != "plain":
                idx = (attrs.pattern == k).nonzero().squeeze(1)
                pattern[idx, 0] = _pattern_mask(attrs.patterns[k], u[idx], v[idx], px[idx], seed[idx])
        fill = _mix(rgb, _second_colour(rgb), pattern)  # (m, 3, S, S)
    scene = _Scene(seed, X, Y, pix, dx, dy, sdf, px, cover, rgb, background, pattern, fill)

    out = torch.empty(m, 3, size, size)
    for k in attrs.style.unique().tolist():
        idx = (attrs.style == k).nonzero().squeeze(1)
        out[idx] = _STYLE_FNS[attrs.styles[k]](scene.subset(idx), config)
    return out.clamp_(0, 1)


#: Effects a photo found on the web may carry: black and white, out of focus, over- or under-exposed.
PHOTO_EFFECTS: tuple[str, ...] = ("grayscale", "blur", "jitter")


def photo_effect(images: Tensor, effect: str, seed: Tensor) -> Tensor:
    """Apply a web-photo effect to rendered ``(m, 3, S, S)`` images in [0, 1], each drawn from its ``seed`` (m,).

    ``grayscale``: luma in every channel; ``blur``: Gaussian blur of 2%, 2.5% or 3% of the image side; ``jitter``:
    brightness and contrast scaled by 0.65 to 1.35 and saturation by 0.5 to 1.5.

    Example:
        >>> x = render(sample_attributes(2, seed=0))
        >>> gray = photo_effect(x, "grayscale", torch.tensor([1, 2]))
        >>> torch.equal(gray[:, 0], gray[:, 1])
        True
    """
    if effect == "grayscale":
        return _luma(images).expand(-1, 3, -1, -1).contiguous()
    m, size = images.shape[0], images.shape[-1]
    seed = seed.view(m, 1, 1, 1)
    if effect == "blur":
        # three levels, so each level's images are blurred in one batched call; the seed picks the level
        level = torch.floor(_hash01(seed.view(m), 60) * 3).long()  # (m,)
        out = images.clone()
        for k in level.unique().tolist():
            idx = (level == k).nonzero().squeeze(1)
            out[idx] = _blur(images[idx], size * (0.02 + 0.005 * k)).clamp(0, 1)
        return out
    if effect == "jitter":
        brightness = 0.65 + 0.7 * _hash01(seed, 61)
        contrast = 0.65 + 0.7 * _hash01(seed, 62)
        saturation = 0.5 + _hash01(seed, 63)
        out = images * brightness
        mean = _luma(out).mean((2, 3), keepdim=True)
        out = mean + (out - mean) * contrast
        grey = _luma(out)
        return (grey + (out - grey) * saturation).clamp(0, 1)
    raise unknown_name_error("photo effect", effect, PHOTO_EFFECTS)


def render(attrs: Attributes, config: WorldConfig = WorldConfig(), class_names: Sequence[str] | None = None) -> Tensor:
    """Draw the images that ``attrs`` describe.

    Each image depends only on its own attributes (textures and noise come from its ``texture_seed``), so
    rendering a subset gives the same pixels (up to float rounding) as rendering everything and slicing.

    Args:
        attrs: what to draw, e.g. from :func:`sample_attributes`.
        config: image size, photo noise and pixel-art grid.
        class_names: names to draw for ``attrs.class_idx`` (default ``attrs.classes``); each must be one of
            :data:`CLASSES` or :data:`CROSS_CLASSES`.

    Returns:
        (n, 3, S, S) float32 images in [0, 1], S = ``config.image_size``.

    Example:
        >>> render(sample_attributes(2, seed=0), WorldConfig(image_size=48)).shape
        torch.Size([2, 3, 48, 48])
    """
    if not isinstance(attrs, Attributes):
        raise TypeError(f"render expects Attributes (see sample_attributes); got {type(attrs).__name__}.")
    names = attrs.classes if class_names is None else tuple(class_names)
    for name in names:
        if name not in _SHAPES:
            raise unknown_name_error("class", name, tuple(_SHAPES))
    if len(attrs) and int(attrs.class_idx.max()) >= len(names):
        raise ValueError(
            f"attrs.class_idx reaches {int(attrs.class_idx.max())} but only {len(names)} class names given."
        )
    size = config.image_size
    out = torch.empty(len(attrs), 3, size, size)
    for start in range(0, len(attrs), _CHUNK):
        out[start : start + _CHUNK] = _render_chunk(attrs[start : start + _CHUNK], config, names)
    return out


# ----------------------------------------------------------------------------------------------------- captions

# Ways of naming the style: index 0 is the plain "a <style> of" form CLIP prompts use.
_STYLE_OF: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "a photograph of", "a close photo of"),
    "sketch": ("a sketch of", "a pencil sketch of", "a drawing of"),
    "painting": ("a painting of", "an oil painting of", "a painted picture of"),
    "pixel": ("pixel art of", "a pixel art image of", "a pixelated image of"),
}
# Style-free ways of saying "an image of".
_NEUTRAL_OF = ("an image of", "a picture of")
_STYLE_NOUN: dict[str, str] = {"photo": "a photo", "sketch": "a sketch", "painting": "a painting", "pixel": "pixel art"}
_BG_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass", "in the grass"),
    "sand": ("on sand", "on the sand", "in the sand"),
    "water": ("over water", "on the water", "in the water"),
    "snow": ("in the snow", "on snow", "on the snow"),
    "sky": ("in the sky", "against the sky", "in a blue sky"),
    "brick": ("against a brick wall", "on brick", "in front of a brick wall"),
}
_BG_NOUN: dict[str, str] = {
    "grass": "grass",
    "sand": "sand",
    "water": "water",
    "snow": "snow",
    "sky": "the sky",
    "brick": "a brick wall",
}
# {style}: "a photo of"-like phrase; {neutral}: "an image of"-like; {obj}: "a small red star" (article, maybe
# size and colour); {bare}: the same without article; {bg}: "on the grass"-like; {bgnoun}: "grass"-like;
# {medium}: "a photo"-like; {stylenoun}: "photo"-like; {cls}, {acls} ("an arrow"), {colour}, {size}. The plain
# "<style> of <object>" forms come twice: they are the prompts CLIP is queried with.
_TEMPLATES: tuple[str, ...] = (
    "{style} {obj}.",
    "{style} {obj}.",
    "{style} {obj} {bg}.",
    "{style} {obj} {bg}.",
    "{obj} {bg}.",
    "{obj}.",
    "{neutral} {obj} {bg}.",
    "there is {obj} {bg}.",
    "this is {style} {obj}.",
    "{style} {obj} with {bgnoun} behind it.",
    "{obj} in {medium}.",
    "{obj} {bg}, in {medium}.",
    "{style} the {cls}.",
    "the {cls} is {colour}.",
    "a {size} {cls} {bg}.",
    "the {cls} in this {stylenoun} is {colour}.",
    "{bare} {bg}.",
    "{neutral} {acls}.",
)
_STYLE_WORD: dict[str, str] = {"photo": "photo", "sketch": "sketch", "painting": "painting", "pixel": "picture"}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(attrs: Attributes, i: int, rng: random.Random) -> str:
    """A caption of sample ``i`` from a random template; the class name always appears.

    Args:
        attrs: the batch's attributes.
        i: the sample to describe.
        rng: the source of the template and wording choices.

    Returns:
        A lowercase sentence such as "a sketch of a star on sand." or "a small blue heart over water.".

    Example:
        >>> "star" in caption(sample_attributes(1, seed=0, classes=("star",)), 0, random.Random(0))
        True
    """
    d = attrs.describe(i)
    cls, colour, size, bg, style = d["class"], d["colour"], d["size"], d["background"], d["style"]
    words = [w for w, p in ((size, 0.35), (colour, 0.7)) if rng.random() < p]
    bare = " ".join([*words, cls])
    template = rng.choice(_TEMPLATES)
    return template.format(
        style=rng.choice(_STYLE_OF[style]),
        neutral=rng.choice(_NEUTRAL_OF),
        obj=_article(bare),
        bare=bare,
        bg=rng.choice(_BG_PHRASES[bg]),
        bgnoun=_BG_NOUN[bg],
        medium=_STYLE_NOUN[style],
        stylenoun=_STYLE_WORD[style],
        cls=cls,
        acls=_article(cls),
        colour=colour,
        size=size,
    )


def captions(attrs: Attributes, seed: int) -> list[str]:
    """One caption per sample, deterministic from ``seed``.

    Args:
        attrs: the batch's attributes.
        seed: seeds a local ``random.Random`` (independent of the Python hash seed).

    Example:
        >>> len(captions(sample_attributes(5, seed=0), seed=0))
        5
    """
    rng = random.Random(int(seed))
    return [caption(attrs, i, rng) for i in range(len(attrs))]


def corpus_words() -> list[str]:
    """Every word a caption can use (all class, colour, size, background and style words and the templates').

    Example:
        >>> {"photo", "sketch", "painting", "pixel", "art"} <= set(corpus_words())
        True
    """
    texts = [
        *CLASSES,
        *CROSS_CLASSES,
        *COLOURS,
        *SIZES,
        *_TEMPLATES,
        *_NEUTRAL_OF,
        *_STYLE_NOUN.values(),
        *_STYLE_WORD.values(),
        *_BG_NOUN.values(),
        "a an",
    ]
    texts += [p for phrases in (*_STYLE_OF.values(), *_BG_PHRASES.values()) for p in phrases]
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text)))
    return sorted(words)


# ------------------------------------------------------------------------------------------------- convenience


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Rendered ``(n, 3, S, S)`` images in [0, 1] -> a CLIP's input (per-channel ``(x - mean) / std``).

    Example:
        >>> normalize_images(torch.ones(1, 3, 2, 2), (0.5,) * 3, (0.25,) * 3).unique()
        tensor([2.])
    """
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class WorldBatch:
    """Images with their attributes and captions.

    Args:
        images: (n, 3, S, S) float32 in [0, 1].
        attrs: what each image shows.
        captions: one caption per image.
    """

    images: Tensor
    attrs: Attributes
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def generate(n: int, seed: int, *, config: WorldConfig = WorldConfig(), **kwargs) -> WorldBatch:
    """Sample attributes, render them and caption them, all from one seed.

    Args:
        n: number of images.
        seed: seed of the attributes and of the captions.
        config: rendering settings.
        **kwargs: passed to :func:`sample_attributes` (``classes``, ``styles``, ``class_background_bias``, ...).

    Example:
        >>> batch = generate(4, seed=0, styles=("pixel",))
        >>> len(batch), batch.images.dtype
        (4, torch.float32)
    """
    attrs = sample_attributes(n, seed, **kwargs)
    return WorldBatch(images=render(attrs, config), attrs=attrs, captions=captions(attrs, seed))
