"""World v2: web-like captions and several downstream datasets, so that the baselines behave as on real CLIP.

World v1 (:mod:`.world`) captions name every object by its class name in a handful of forms that include the
downstream prompt ("a photo of a {}."), and its single downstream dataset shows the 24 classes on every
background and colour. A mini-CLIP pretrained on it reaches the linear-probe ceiling zero-shot, so no prompt has
anything to learn (docs/benchmark.md). World v2 keeps the renderer and changes what real CLIP differs in:

* **web-like captions** (:func:`caption`): paraphrased, rarely in the downstream template, naming the object
  with a hypernym ("a shape", "a polygon", "a star") or not at all in a share of captions that depends on how
  common the concept is (:func:`grounding`), naming surface patterns sometimes, with a little label noise;
* **a broader concept set** than any one task: the 36 objects of v1, 7 fine-grained polygons and stars
  (:data:`~.world.FINE_CLASSES`) and 12 surface patterns (:data:`~.world.PATTERNS`);
* **downstream datasets** (:data:`DATASETS`), each with its own class list and appearance, like the 11 datasets
  of the CoOp protocol: generic objects, fine-grained polygons and stars, textures (patterns), and the 12
  cross-dataset objects.

Everything stays a pure function of seeds.

Example:
    >>> import random
    >>> from prompt_robust.bench import world
    >>> attrs = world.sample_attributes(3, seed=0, classes=ALL_SHAPES, patterns=world.PATTERNS)
    >>> all(text.endswith(".") for text in captions(attrs, seed=0))
    True
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..config import unknown_name_error
from . import world

__all__ = [
    "ALL_BACKGROUNDS",
    "ALL_SHAPES",
    "COMMON_SHAPES",
    "DATASETS",
    "OUTLINE",
    "PATTERN_CLASSES",
    "DatasetSpec",
    "caption",
    "captions",
    "corpus_words",
    "grounding",
    "render_config",
]

#: Shapes whose names web-like captions use most of the time (v1's 24 main and 12 cross-dataset classes).
COMMON_SHAPES: tuple[str, ...] = world.CLASSES + world.CROSS_CLASSES
#: Every shape of world v2: the common ones, then the fine-grained polygons and stars.
ALL_SHAPES: tuple[str, ...] = COMMON_SHAPES + world.FINE_CLASSES
#: The patterns a texture dataset can name (every pattern but the solid fill).
PATTERN_CLASSES: tuple[str, ...] = world.PATTERNS[1:]

# Share of captions that name a shape by its own name (the rest use a hypernym): common objects are named as
# often as web alt-text names an everyday object, fine-grained ones as rarely as it names an aircraft variant.
_GROUNDING_COMMON = 0.9
_GROUNDING_FINE = 0.08
# Share of patterned objects whose caption names the pattern.
_PATTERN_NAMED = 0.2
# Share of captions naming a random other shape (web noise).
_LABEL_NOISE = 0.03
# Share of fine-grained names (and pattern words) replaced by a similar concept's (a heptagon called a hexagon, a
# speckled object called dotted), as web alt-text confuses fine-grained categories.
_CONFUSION = 0.3
_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "hexagon": ("pentagon", "heptagon"),
    "heptagon": ("hexagon", "octagon"),
    "octagon": ("heptagon", "hexagon"),
    "four-point star": ("star", "six-point star"),
    "six-point star": ("star", "seven-point star"),
    "seven-point star": ("six-point star", "eight-point star"),
    "eight-point star": ("seven-point star", "six-point star"),
    "striped": ("diagonal",),
    "diagonal": ("striped",),
    "dotted": ("spotted", "speckled"),
    "spotted": ("dotted", "speckled"),
    "speckled": ("dotted", "spotted"),
    "checkered": ("gridded", "hatched"),
    "gridded": ("checkered", "hatched"),
    "hatched": ("gridded", "checkered"),
    "wavy": ("zigzag",),
    "zigzag": ("wavy",),
    "ringed": ("two-tone",),
    "two-tone": ("ringed",),
}

_HYPERNYMS_COMMON = ("shape", "object", "thing", "figure")
_HYPERNYMS_POLYGON = ("polygon", "shape", "figure")
_HYPERNYMS_STAR = ("star",)
_STARS = tuple(name for name in world.FINE_CLASSES if name.endswith("star"))

_PATTERN_ADJECTIVE: dict[str, str] = {
    "striped": "striped",
    "dotted": "dotted",
    "checkered": "checkered",
    "zigzag": "zigzag",
    "wavy": "wavy",
    "gridded": "gridded",
    "diagonal": "diagonally striped",
    "ringed": "ringed",
    "spotted": "spotted",
    "speckled": "speckled",
    "two-tone": "two-tone",
    "hatched": "hatched",
}
_PATTERN_NOUN: dict[str, str] = {
    "striped": "stripes",
    "dotted": "dots",
    "checkered": "checks",
    "zigzag": "zigzags",
    "wavy": "waves",
    "gridded": "a grid",
    "diagonal": "diagonal stripes",
    "ringed": "rings",
    "spotted": "spots",
    "speckled": "speckles",
    "two-tone": "two colours",
    "hatched": "cross-hatching",
}

# Ways of saying the medium; the downstream prompt's "a photo of" is one of five photo forms.
_STYLE_OF: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "a photograph of", "a close-up photo of", "a snapshot of", "a picture of"),
    "sketch": ("a sketch of", "a pencil sketch of", "a drawing of", "a pencil drawing of", "a doodle of"),
    "painting": ("a painting of", "an oil painting of", "a painted picture of", "an artwork of", "a canvas of"),
    "pixel": ("pixel art of", "a pixel art image of", "a pixelated image of", "a retro game sprite of", "8-bit art of"),
}
_MEDIUM: dict[str, tuple[str, ...]] = {
    "photo": ("a photo", "a photograph", "a snapshot"),
    "sketch": ("a sketch", "a drawing", "pencil"),
    "painting": ("a painting", "oil paint", "an artwork"),
    "pixel": ("pixel art", "a pixelated image", "a game sprite"),
}
_BG_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass", "in the grass", "on a lawn", "in a meadow"),
    "sand": ("on sand", "on the sand", "in the sand", "on a beach", "in the desert"),
    "water": ("over water", "on the water", "in the water", "on a lake", "at sea"),
    "snow": ("in the snow", "on snow", "on the snow", "in the winter snow", "on a snowfield"),
    "sky": ("in the sky", "against the sky", "in a blue sky", "up in the air", "among the clouds"),
    "brick": ("against a brick wall", "on brick", "in front of a brick wall", "by a wall", "on a brick background"),
    "forest": ("in a forest", "in the woods", "among the trees", "in a dark forest", "in the forest"),
    "rock": ("on rock", "on a rock", "on stone", "on rocky ground", "on a boulder"),
    "wood": ("on wood", "on a wooden floor", "on a table", "on wooden planks", "on a wooden board"),
    "tiles": ("on tiles", "on a tiled floor", "on bathroom tiles", "on a tiled wall", "in front of tiles"),
    "lava": ("on lava", "near a volcano", "on molten lava", "over lava", "on glowing lava"),
    "field": ("in a field", "over farmland", "in a crop field", "above the fields", "in a farm field"),
}
# The background as a noun, for captions that name the scene itself ("a photo of a forest with a red star.").
_BG_NOUN: dict[str, tuple[str, ...]] = {
    "grass": ("grass", "a lawn"),
    "sand": ("sand", "a beach"),
    "water": ("water", "a lake"),
    "snow": ("snow", "a snowfield"),
    "sky": ("the sky", "a blue sky"),
    "brick": ("a brick wall", "bricks"),
    "forest": ("a forest", "the woods"),
    "rock": ("rock", "a rocky ground"),
    "wood": ("wood", "a wooden floor"),
    "tiles": ("tiles", "a tiled floor"),
    "lava": ("lava", "a lava field"),
    "field": ("a field", "farmland"),
}
#: Every background of world 2: the six habitats of world 1 and the six scenes.
ALL_BACKGROUNDS: tuple[str, ...] = world.BACKGROUNDS + world.SCENES
_NEUTRAL_OF = ("an image of", "a shot of", "a view of")
# Effects a pretraining photo may carry (grayscale, blur, brightness changes), and how captions say so.
_EFFECT_OF: dict[str, tuple[str, ...]] = {
    "grayscale": ("a black and white photo of", "a grayscale photo of", "a monochrome photo of"),
    "blur": ("a blurry photo of", "an out of focus photo of", "a soft photo of"),
    "jitter": ("a bright photo of", "a dark photo of", "a washed out photo of"),
}

# {style}: "a photo of"-like; {obj}: "a small red striped star" (article, maybe size, colour, pattern);
# {bare}: the same without article; {bg}: "on the grass"-like; {bgnoun}: "a lawn"-like; {medium}: "a photo"-like;
# {neutral}: "an image of"-like; {name}: the object word alone; {colour}: the colour word.
_TEMPLATES: tuple[str, ...] = (
    "{style} {obj}.",
    "{style} {obj} {bg}.",
    "{obj} {bg}.",
    "{obj}.",
    "{neutral} {obj} {bg}.",
    "there is {obj} {bg}.",
    "{obj} {bg}, in {medium}.",
    "{obj} in {medium}.",
    "look at this {bare}!",
    "my {bare} {bg}.",
    "close-up of {obj}.",
    "{style} {obj}, {bg}.",
    "{bare} {bg}, {medium}.",
    "the {name} is {colour}.",
    "a {colour} {name} {bg}.",
    "{obj} sitting {bg}.",
    "just {obj} {bg}.",
    "{neutral} {obj}.",
    "check out this {bare} {bg}.",
    "{bare}, {medium}.",
    "spotted {obj} {bg} today.",
    "{style} {obj} i made.",
    "{style} {bgnoun} with {obj}.",
    "{obj} with {bgnoun} behind it.",
)


#: Contour darkening of world 2's photos and paintings (:attr:`~.world.WorldConfig.outline`): real objects have
#: edges, which keep their shape visible in black and white; without one, a red object on grass vanishes in
#: grayscale.
OUTLINE = 0.6


def render_config(image_size: int = 48) -> world.WorldConfig:
    """How world 2 renders images of side ``image_size``.

    Example:
        >>> render_config(48).outline
        0.6
    """
    return world.WorldConfig(image_size=image_size, outline=OUTLINE)


def grounding(shape: str) -> float:
    """Share of captions that name ``shape`` by its own name rather than a hypernym.

    Example:
        >>> grounding("star") > grounding("heptagon")
        True
    """
    if shape not in ALL_SHAPES:
        raise unknown_name_error("class", shape, ALL_SHAPES)
    return _GROUNDING_FINE if shape in world.FINE_CLASSES else _GROUNDING_COMMON


def _confused(name: str, rng: random.Random) -> str:
    """``name``, or with probability ``_CONFUSION`` a similar concept's name (fine-grained names and patterns)."""
    if name in _NEIGHBOURS and rng.random() < _CONFUSION:
        return rng.choice(_NEIGHBOURS[name])
    return name


def _object_word(shape: str, rng: random.Random) -> str:
    if rng.random() < _LABEL_NOISE:
        return rng.choice(ALL_SHAPES)
    if rng.random() < grounding(shape):
        return _confused(shape, rng)
    if shape in _STARS:
        return rng.choice(_HYPERNYMS_STAR)
    if shape in world.FINE_CLASSES:
        return rng.choice(_HYPERNYMS_POLYGON)
    return rng.choice(_HYPERNYMS_COMMON)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(attrs: world.Attributes, i: int, rng: random.Random, effect: str | None = None) -> str:
    """A web-like caption of sample ``i``.

    Args:
        attrs: the batch's attributes (classes from :data:`ALL_SHAPES`, patterns from :data:`~.world.PATTERNS`).
        i: the sample to describe.
        rng: the source of every wording choice.
        effect: a photo effect the image carries (``"grayscale"``, ``"blur"``, ``"jitter"``), which the caption
            may name.

    Example:
        >>> from prompt_robust.bench import world
        >>> attrs = world.sample_attributes(1, seed=0, classes=("circle",))
        >>> caption(attrs, 0, random.Random(0)).endswith(".")
        True
    """
    d = attrs.describe(i)
    shape, colour, size, bg, style, pattern = (
        d["class"],
        d["colour"],
        d["size"],
        d["background"],
        d["style"],
        d["pattern"],
    )
    name = _object_word(shape, rng)
    adjectives = [w for w, p in ((size, 0.3), (colour, 0.6)) if rng.random() < p]
    suffix = ""
    if pattern != "plain" and rng.random() < _PATTERN_NAMED:
        pattern = _confused(pattern, rng)
        if rng.random() < 0.6:
            adjectives.append(_PATTERN_ADJECTIVE[pattern])
        else:
            suffix = " with " + _PATTERN_NOUN[pattern]
    bare = " ".join([*adjectives, name]) + suffix
    style_of = rng.choice(_STYLE_OF[style])
    if effect is not None and style == "photo" and rng.random() < 0.5:
        style_of = rng.choice(_EFFECT_OF[effect])
    template = rng.choice(_TEMPLATES)
    return template.format(
        style=style_of,
        obj=_article(bare),
        bare=bare,
        bg=rng.choice(_BG_PHRASES[bg]),
        medium=rng.choice(_MEDIUM[style]),
        bgnoun=rng.choice(_BG_NOUN[bg]),
        neutral=rng.choice(_NEUTRAL_OF),
        name=name,
        colour=colour,
    )


def captions(attrs: world.Attributes, seed: int, effects: Sequence[str | None] | None = None) -> list[str]:
    """One web-like caption per sample, deterministic from ``seed``.

    Args:
        attrs: the batch's attributes.
        seed: seeds a local ``random.Random``.
        effects: per sample, the photo effect it carries or None.
    """
    rng = random.Random(int(seed))
    effects = effects if effects is not None else [None] * len(attrs)
    return [caption(attrs, i, rng, effects[i]) for i in range(len(attrs))]


def corpus_words() -> list[str]:
    """Every word a v2 caption or a v2 dataset's class name can use (for the tokenizer's vocabulary).

    Example:
        >>> {"heptagon", "striped", "polygon", "sprite"} <= set(corpus_words())
        True
    """
    texts = [
        *ALL_SHAPES,
        *world.PATTERNS,
        *world.COLOURS,
        *ALL_BACKGROUNDS,
        *world.SIZES,
        *_TEMPLATES,
        *_HYPERNYMS_COMMON,
        *_HYPERNYMS_POLYGON,
        *_NEUTRAL_OF,
        *_PATTERN_ADJECTIVE.values(),
        *_PATTERN_NOUN.values(),
        *(p for spec in DATASETS.values() for p in spec.classes),
        "a an photo of with",
    ]
    for table in (_STYLE_OF, _MEDIUM, _BG_PHRASES, _BG_NOUN, _EFFECT_OF):
        texts += [p for phrases in table.values() for p in phrases]
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+", re.sub(r"\{[a-z]+\}", " ", text)))
    return sorted(words)


# ------------------------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class DatasetSpec:
    """A downstream dataset of world v2: its classes and its appearance.

    Args:
        name: the dataset's name.
        classes: class names in label order; the first half are the base classes of base-to-new, the second the
            new ones (as in the CoCoOp protocol).
        label: what a class fixes: ``"shape"`` (the class is a shape), ``"pattern"`` (a surface pattern drawn on
            one of ``shapes``) or ``"background"`` (the scene behind one of ``shapes``).
        shapes: the shapes drawn when the class is not a shape.
        backgrounds / colours: what images of this dataset show.
        sizes: object sizes (indices into :data:`~.world.SIZES`).
        style: the rendering style of the dataset's images (its domain).
        template: the hand-crafted zero-shot prompt of this dataset (as CoOp's zero-shot baseline has one per
            dataset, e.g. "{} texture." for DTD).
        analogue: the real dataset it stands in for.
    """

    name: str
    classes: tuple[str, ...]
    label: str = "shape"
    shapes: tuple[str, ...] = ()
    backgrounds: tuple[str, ...] = world.BACKGROUNDS
    colours: tuple[str, ...] = world.COLOURS
    sizes: tuple[int, ...] = (0, 1)
    style: str = "photo"
    template: str = "a photo of a {}."
    analogue: str = ""

    @property
    def base_classes(self) -> tuple[str, ...]:
        return self.classes[: len(self.classes) // 2]

    @property
    def new_classes(self) -> tuple[str, ...]:
        return self.classes[len(self.classes) // 2 :]

    def attributes(
        self, labels: Tensor, seed: int, *, style: str | None = None, background: Tensor | None = None
    ) -> world.Attributes:
        """Attributes of images with the given class ``labels`` (indices into ``classes``), drawn from ``seed``, in
        ``style`` (default: the dataset's own)."""
        style = style or self.style
        n = len(labels)
        gen = torch.Generator().manual_seed(int(seed) + 17)
        style_idx = torch.full((n,), world.STYLES.index(style), dtype=torch.long)
        sizes = torch.tensor(self.sizes)[torch.randint(len(self.sizes), (n,), generator=gen)]
        kwargs: dict[str, Any] = {"colours": self.colours, "style": style_idx}
        if self.label == "shape":
            kwargs.update(classes=self.classes, backgrounds=self.backgrounds, class_idx=labels, background=background)
        else:  # the label is the background or the pattern of a shape drawn from ``shapes``
            shape_idx = torch.randint(len(self.shapes), (n,), generator=gen)
            kwargs.update(classes=self.shapes, class_idx=shape_idx)
            if self.label == "background":
                kwargs.update(backgrounds=self.classes, background=labels)
            else:
                kwargs.update(backgrounds=self.backgrounds, background=background)
                kwargs.update(patterns=PATTERN_CLASSES, pattern=labels)
        attrs = world.sample_attributes(n, seed, **kwargs)
        return _with_sizes(attrs, sizes)


def _with_sizes(attrs: world.Attributes, sizes: Tensor) -> world.Attributes:
    # keep the object inside the image for its (new) size, as sample_attributes does
    old = torch.tensor(world._SCALES)[attrs.size]
    new = torch.tensor(world._SCALES)[sizes]
    ratio = (1.0 - 1.1 * new) / (1.0 - 1.1 * old)
    return replace(attrs, size=sizes, x=attrs.x * ratio, y=attrs.y * ratio)


#: The downstream datasets of world v2 (base-to-new averages over all of them).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("objects", world.CLASSES, analogue="ImageNet / Caltech101: everyday objects, varied scenes"),
        DatasetSpec(
            "polygons",
            (
                "triangle",
                "pentagon",
                "heptagon",
                "four-point star",
                "six-point star",
                "eight-point star",
                "square",
                "hexagon",
                "octagon",
                "star",
                "seven-point star",
                "diamond",
            ),
            backgrounds=("sand", "snow", "brick"),
            sizes=(1,),
            analogue="FGVC Aircraft / Stanford Cars: fine-grained variants told apart by one attribute",
        ),
        DatasetSpec(
            "textures",
            PATTERN_CLASSES,
            label="pattern",
            shapes=("circle", "square", "heart", "cloud", "drop", "mushroom"),
            sizes=(1,),
            template="a photo of a {} shape.",
            analogue="DTD: surface patterns, named by adjectives",
        ),
        DatasetSpec("gadgets", world.CROSS_CLASSES, analogue="a second object dataset (cross-dataset transfer)"),
        DatasetSpec(
            "scenes",
            ("grass", "sand", "water", "forest", "rock", "wood", "snow", "sky", "brick", "tiles", "lava", "field"),
            label="background",
            shapes=COMMON_SHAPES,
            sizes=(0,),
            template="a photo of {} with a shape.",
            analogue="SUN397 / EuroSAT: scenes, half of them rare on the web",
        ),
    )
}
