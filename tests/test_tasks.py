"""The benchmark tasks on world 1: determinism, disjoint splits, the spurious correlation (world 2's datasets:
test_world_v2.py)."""

from __future__ import annotations

import torch

from prompt_robust.bench import world
from prompt_robust.bench.tasks import (
    BASE_CLASSES,
    NEW_CLASSES,
    SPURIOUS_CLASSES,
    SPURIOUS_MAJORITY,
    WorldTasks,
)


def _tasks(**kwargs) -> WorldTasks:
    settings = {"pool_per_class": 8, "test_per_class": 4, "retrieval_size": 40, "version": 1, **kwargs}
    return WorldTasks(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), **settings)


def _rows(data) -> set[bytes]:
    return {row.numpy().tobytes() for row in data.pixel_values.flatten(1)}


def test_class_splits_are_disjoint_and_cover_the_world():
    assert set(BASE_CLASSES).isdisjoint(NEW_CLASSES)
    assert set(BASE_CLASSES) | set(NEW_CLASSES) == set(world.CLASSES)
    assert set(world.CROSS_CLASSES).isdisjoint(world.CLASSES)


def test_few_shot_draws_are_deterministic_and_seed_dependent():
    tasks = _tasks()
    train_a, idx_a = tasks.base_to_new_train(k=2, seed=1)
    train_b, idx_b = _tasks().base_to_new_train(k=2, seed=1)
    _, idx_c = tasks.base_to_new_train(k=2, seed=2)
    assert idx_a == idx_b and idx_a != idx_c
    assert torch.equal(train_a.pixel_values, train_b.pixel_values)
    assert torch.equal(torch.bincount(train_a.labels), torch.full((len(BASE_CLASSES),), 2))


def test_train_and_test_images_never_overlap():
    tasks = _tasks()
    pool, _ = tasks.base_to_new_train(k=8, seed=1)
    base, new = tasks.base_to_new_test()
    assert _rows(pool).isdisjoint(_rows(base))
    assert base.classnames == list(BASE_CLASSES) and new.classnames == list(NEW_CLASSES)
    dg_pool, _ = tasks.dg_train(k=8, seed=1)
    for style_set in tasks.dg_test().values():
        assert _rows(dg_pool).isdisjoint(_rows(style_set))
    assert _rows(dg_pool).isdisjoint(_rows(tasks.dg_source_test()))


def test_domain_generalisation_sets_differ_in_style_only_by_rendering():
    tasks = _tasks()
    sets = tasks.dg_test()
    assert sorted(sets) == ["painting", "pixel", "sketch"]
    for data in sets.values():
        assert data.classnames == list(world.CLASSES)
        assert torch.equal(torch.bincount(data.labels), torch.full((len(world.CLASSES),), 4))


def test_spurious_split_is_correlated_in_train_and_balanced_in_test():
    tasks = _tasks()
    train = tasks.spurious_train(n_per_class=40, seed=3)
    habitat = torch.tensor([0 if world.habitat(c) == "grass" else 1 for c in SPURIOUS_CLASSES])
    on_habitat = (train.groups % 2) == habitat[train.labels]
    assert abs(on_habitat.float().mean().item() - SPURIOUS_MAJORITY) < 1e-6
    test = tasks.spurious_test()
    assert torch.equal(torch.bincount(test.groups), torch.full((2 * len(SPURIOUS_CLASSES),), 4))
    assert test.group_names[0] == f"{SPURIOUS_CLASSES[0]} on grass"
    assert _rows(train).isdisjoint(_rows(test))
    # the backgrounds really are the named ones: water images are bluer than grass images
    water = test.pixel_values[test.groups % 2 == 1]
    grass = test.pixel_values[test.groups % 2 == 0]
    assert water[:, 2].mean() > grass[:, 2].mean()


def test_retrieval_set_has_one_caption_per_image():
    data = _tasks().retrieval_test()
    assert len(data.captions) == len(data) == 40
    for caption, label in zip(data.captions, data.labels.tolist(), strict=True):
        assert data.classnames[label] in caption
