"""The procedural image-text world: determinism, vocabulary, sampling, rendering styles and captions."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from prompt_robust.bench.world import (
    BACKGROUNDS,
    CLASSES,
    COLOUR_RGB,
    COLOURS,
    CROSS_CLASSES,
    SIZES,
    STYLES,
    Attributes,
    WorldConfig,
    caption,
    captions,
    corpus_words,
    generate,
    habitat,
    render,
    sample_attributes,
)

torch.set_num_threads(1)

FIELDS = ("class_idx", "colour", "background", "style", "size", "x", "y", "angle", "texture_seed")
STYLE_WORDS = ("photo", "photograph", "sketch", "drawing", "painting", "painted", "pixel", "pixelated")


def same_attrs(a: Attributes, b: Attributes) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS) and a.classes == b.classes


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_is_distinct_single_words():
    assert len(CLASSES) == 24 and len(CROSS_CLASSES) == 12
    assert len(set(CLASSES)) == 24 and len(set(CROSS_CLASSES)) == 12
    assert not set(CLASSES) & set(CROSS_CLASSES)
    assert len(COLOURS) == 8 and set(COLOURS) == set(COLOUR_RGB)
    assert len(BACKGROUNDS) >= 6 and {"grass", "sand", "water"} <= set(BACKGROUNDS)
    assert STYLES == ("photo", "sketch", "painting", "pixel")
    for word in (*CLASSES, *CROSS_CLASSES, *COLOURS, *BACKGROUNDS, *STYLES, *SIZES):
        assert re.fullmatch(r"[a-z]+", word), word
    # object colours stay apart from each other
    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS])
    dist = torch.cdist(rgb, rgb) + 10 * torch.eye(len(COLOURS))
    assert dist.min() > 0.3


def test_habitat_covers_backgrounds_evenly():
    for names, per_background in ((CLASSES, 4), (CROSS_CLASSES, 2)):
        homes = [habitat(c) for c in names]
        assert all(h in BACKGROUNDS for h in homes)
        assert all(homes.count(b) == per_background for b in BACKGROUNDS)
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        habitat("dog")


# ------------------------------------------------------------------------------------------------ sampling


def test_same_seed_same_batch_and_other_seed_differs():
    a, b, c = generate(40, seed=3), generate(40, seed=3), generate(40, seed=4)
    assert torch.equal(a.images, b.images) and same_attrs(a.attrs, b.attrs) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.attrs.class_idx, c.attrs.class_idx) and a.captions != c.captions
    # the global RNG is neither used nor disturbed
    state = torch.random.get_rng_state()
    generate(5, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())


def test_independent_of_python_hash_seed():
    code = (
        "import torch; from prompt_robust.bench.world import generate; b = generate(12, seed=5); "
        "print(float(b.images.double().sum()), '|'.join(b.captions))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    here = generate(12, seed=5)
    total, text = out.strip().split(" ", 1)
    assert float(total) == float(here.images.double().sum()) and text == "|".join(here.captions)


def test_attributes_dtypes_and_ranges():
    attrs = sample_attributes(500, seed=0)
    for name in ("class_idx", "colour", "background", "style", "size", "texture_seed"):
        value = getattr(attrs, name)
        assert value.dtype == torch.long and value.shape == (500,)
    for name in ("x", "y", "angle"):
        assert getattr(attrs, name).dtype == torch.float32
    assert set(attrs.style.tolist()) == set(range(4)) and set(attrs.class_idx.tolist()) == set(range(24))
    assert attrs.x.abs().max() < 0.6 and attrs.angle.abs().max() < 0.3
    # larger objects stay closer to the centre so that they fit
    assert attrs.x[attrs.size == 1].abs().max() < attrs.x[attrs.size == 0].abs().max()


def test_class_background_bias():
    n = 6000
    always = sample_attributes(n, seed=1, class_background_bias=1.0)
    homes = torch.tensor([BACKGROUNDS.index(habitat(c)) for c in CLASSES])
    assert torch.equal(always.background, homes[always.class_idx])

    never = sample_attributes(n, seed=1, class_background_bias=0.0)
    counts = torch.bincount(never.background, minlength=len(BACKGROUNDS)).float()
    assert (counts / n - 1 / len(BACKGROUNDS)).abs().max() < 0.02
    at_home = (never.background == homes[never.class_idx]).float().mean()
    assert abs(at_home - 1 / len(BACKGROUNDS)) < 0.02

    half = sample_attributes(n, seed=1, class_background_bias=0.5)
    at_home = (half.background == homes[half.class_idx]).float().mean()
    assert abs(at_home - (0.5 + 0.5 / len(BACKGROUNDS))) < 0.03


def test_explicit_tensors_are_respected_and_change_nothing_else():
    n = 60
    background = torch.arange(n) % 2 * BACKGROUNDS.index("water")  # grass, water, grass, ...
    classes = torch.arange(n) % 3
    plain = sample_attributes(n, seed=2, class_background_bias=0.7)
    given = sample_attributes(n, seed=2, class_background_bias=0.7, background=background, class_idx=classes)
    assert torch.equal(given.background, background) and torch.equal(given.class_idx, classes)
    for name in ("colour", "style", "size", "x", "y", "angle", "texture_seed"):
        assert torch.equal(getattr(plain, name), getattr(given, name))
    with pytest.raises(ValueError, match="length n=60"):
        sample_attributes(n, seed=2, background=background[:10])
    with pytest.raises(ValueError, match=r"indices in \[0, 6\)"):
        sample_attributes(n, seed=2, background=background + 10)


def test_explicit_background_is_what_is_drawn():
    n = 40
    photo_only = {"styles": ("photo",), "colours": ("black",)}
    water = render(sample_attributes(n, seed=0, background=[BACKGROUNDS.index("water")] * n, **photo_only))
    sand = render(sample_attributes(n, seed=0, background=[BACKGROUNDS.index("sand")] * n, **photo_only))
    red_minus_blue = lambda images: (images[:, 0] - images[:, 2]).mean()  # noqa: E731
    assert red_minus_blue(water) < -0.2 and red_minus_blue(sand) > 0.2


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"unknown class 'cirle'.*Did you mean 'circle'"):
        sample_attributes(3, seed=0, classes=("cirle", "square"))
    with pytest.raises(ValueError, match="unknown style 'cartoon'"):
        sample_attributes(3, seed=0, styles=("photo", "cartoon"))
    with pytest.raises(ValueError, match="habitat"):
        sample_attributes(3, seed=0, backgrounds=("grass",), class_background_bias=0.5)
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=16)
    with pytest.raises(ValueError, match="pixel_grid"):
        WorldConfig(pixel_grid=40)
    with pytest.raises(ValueError, match="only 2 class names"):
        render(sample_attributes(3, seed=0, class_idx=[5, 5, 5]), class_names=("circle", "square"))


def test_indexing_and_concatenation():
    attrs = sample_attributes(10, seed=0)
    assert len(attrs[3]) == 1 and len(attrs[2:5]) == 3 and len(attrs[torch.tensor([0, 9])]) == 2
    joined = Attributes.cat([attrs[:4], attrs[4:]])
    assert same_attrs(joined, attrs)
    with pytest.raises(ValueError, match="same vocabularies"):
        Attributes.cat([attrs, sample_attributes(2, seed=0, classes=CROSS_CLASSES)])


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("size", [32, 64])
def test_render_shapes_dtypes_range(size):
    attrs = sample_attributes(16, seed=0, style=torch.arange(16) % 4)
    images = render(attrs, WorldConfig(image_size=size))
    assert images.shape == (16, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05
    cross = render(sample_attributes(12, seed=0, classes=CROSS_CLASSES), WorldConfig(image_size=size))
    assert cross.shape == (12, 3, size, size)


def test_image_depends_only_on_its_own_attributes():
    attrs = sample_attributes(30, seed=0)
    # up to float rounding: convolutions may sum in another order for another batch size
    assert torch.allclose(render(attrs)[7:12], render(attrs[7:12]), rtol=0, atol=1e-6)


def foreground_masks(attrs: Attributes) -> torch.Tensor:
    """(n, S, S) object masks from public rendering only: the pixels that change with the object's colour."""
    one = dataclasses.replace(attrs, colour=torch.zeros_like(attrs.colour))  # red
    two = dataclasses.replace(attrs, colour=torch.ones_like(attrs.colour))  # green
    config = WorldConfig(noise=0.0)
    return ((render(one, config) - render(two, config)).abs().sum(1) > 0.3).float()


def normalised(masks: torch.Tensor, out: int = 24) -> torch.Tensor:
    """Resample each mask around its centre of mass at a scale set by its area (undoes position and size)."""
    n, size, _ = masks.shape
    lin = torch.linspace(-1, 1, size)
    area = masks.sum((1, 2)).clamp(min=1)
    cx = (masks * lin.view(1, 1, -1)).sum((1, 2)) / area
    cy = (masks * lin.view(1, -1, 1)).sum((1, 2)) / area
    scale = 2.2 * (area / size**2).sqrt()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    grid = F.affine_grid(theta, (n, 1, out, out), align_corners=False)
    return F.grid_sample(masks.unsqueeze(1), grid, align_corners=False).flatten(1)


@pytest.mark.parametrize("classes", [CLASSES, CROSS_CLASSES], ids=["classes", "cross_classes"])
def test_classes_are_distinguishable(classes):
    # Two independent sets of 20 images per class with random colours, backgrounds, sizes, positions and
    # rotations: nearest class mean on position- and size-normalised object masks must name the class.
    k = len(classes)
    train, test = (
        sample_attributes(20 * k, seed=seed, classes=classes, styles=("photo",), class_idx=torch.arange(20 * k) % k)
        for seed in (10, 11)
    )
    x_train, x_test = normalised(foreground_masks(train)), normalised(foreground_masks(test))
    means = torch.stack([x_train[train.class_idx == c].mean(0) for c in range(k)])
    predicted = torch.cdist(x_test, means).argmin(1)
    per_class = torch.stack([(predicted[test.class_idx == c] == c).float().mean() for c in range(k)])
    assert per_class.mean() > 0.9, per_class
    assert per_class.min() >= 0.7, {classes[c]: round(float(a), 2) for c, a in enumerate(per_class)}


def test_styles_are_different_domains():
    n = 48
    # the same objects on the same backgrounds in every style
    by_style = {s: render(sample_attributes(n, seed=0, style=torch.full((n,), k))) for k, s in enumerate(STYLES)}
    photo, sketch, painting, pixel = (by_style[s] for s in STYLES)
    # sketch: grayscale, mostly white paper
    assert torch.equal(sketch[:, 0], sketch[:, 1]) and torch.equal(sketch[:, 1], sketch[:, 2])
    assert sketch.mean() > 0.75 > photo.mean()
    # pixel: 2x2 blocks at 32 px with a 16-cell grid, four levels per channel
    assert torch.equal(pixel, F.interpolate(pixel[:, :, ::2, ::2], scale_factor=2, mode="nearest"))
    assert torch.allclose(pixel * 3, (pixel * 3).round(), atol=1e-5)
    # painting: smoother than the noisy photo, and its colours shifted
    roughness = lambda images: (images[..., 1:] - images[..., :-1]).abs().mean()  # noqa: E731
    assert roughness(painting) < 0.8 * roughness(photo)
    assert (painting.mean((2, 3)) - photo.mean((2, 3))).abs().mean() > 0.02
    # photo: the noise knob adds pixel noise
    quiet = render(sample_attributes(n, seed=0, style=torch.zeros(n, dtype=torch.long)), WorldConfig(noise=0.0))
    assert 0.02 < (photo - quiet).std() < 0.04


# ------------------------------------------------------------------------------------------------ captions


def test_captions_name_the_class_and_vary():
    attrs = sample_attributes(600, seed=0)
    texts = captions(attrs, seed=0)
    vocabulary = set(corpus_words())
    for i, text in enumerate(texts):
        words = re.findall(r"[a-z]+", text)
        assert attrs.classes[int(attrs.class_idx[i])] in words, text
        assert set(words) <= vocabulary, text
        assert text == text.lower() and text.endswith(".")
    assert len(set(texts)) > 400
    split = [re.findall(r"[a-z]+", t) for t in texts]
    with_style = [any(w in words for w in STYLE_WORDS) for words in split]
    assert 0.3 < sum(with_style) / len(texts) < 0.9
    # a named style is the image's own
    for i, words in enumerate(split):
        if "sketch" in words:
            assert attrs.styles[int(attrs.style[i])] == "sketch", texts[i]
    colour_named = [attrs.colours[int(attrs.colour[i])] in words for i, words in enumerate(split)]
    assert 0.4 < sum(colour_named) / len(texts) < 0.95
    bg_named = [attrs.backgrounds[int(attrs.background[i])] in words for i, words in enumerate(split)]
    assert 0.3 < sum(bg_named) / len(texts) < 0.9


def test_caption_templates_and_words_cover_everything():
    attrs = sample_attributes(3000, seed=1, classes=CROSS_CLASSES)
    words = {w for t in captions(attrs, seed=1) for w in re.findall(r"[a-z]+", t)}
    words |= {w for t in captions(sample_attributes(3000, seed=2), seed=2) for w in re.findall(r"[a-z]+", t)}
    assert words == set(corpus_words())  # every listed word is used, and no other
    # at least 12 sentence forms once the attribute words are blanked out
    d = attrs.describe(0)
    blank = r"\b(" + "|".join([d["class"], d["colour"], d["size"]]) + r")\b"
    forms = {re.sub(blank, "X", caption(attrs, 0, random.Random(s))) for s in range(400)}
    assert len({re.sub(r"(X )+", "X ", f) for f in forms}) >= 12
