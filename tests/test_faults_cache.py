"""Faults in the refiner's target cache (issue 14): a flipped bit, NaN or swapped shards are detected and
recomputed (the result equals the uncached computation), and a change anywhere in the dataset, not only in the
items whose pixels are hashed in full, gives a new cache folder."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import CLASSNAMES, LEARNER_KWARGS, N_TRAIN
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import prompt_robust as pr
from prompt_robust.addons.refiner import targets as targets_module
from prompt_robust.data.loaders import ImageListDataset, transform_for

STEPS, LR, BATCH = 2, 0.05, 5  # N_TRAIN = 12 samples: shards of 5, 5 and 2


@pytest.fixture(scope="module")
def learner(bb):
    torch.manual_seed(0)
    return pr.build_learner("coop", bb, CLASSNAMES, **LEARNER_KWARGS["coop"])


def build(learner, data, cache_dir=None, **kwargs):
    return targets_module.build_targets(
        learner, data, steps=STEPS, lr=LR, batch_size=BATCH, cache_dir=cache_dir, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def truth(learner, train_data):
    """The targets computed without a cache: what every repaired cache must give back."""
    return build(learner, train_data)


def folders(root):
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("refiner-targets-"))


def shards(root):
    (folder,) = folders(root)
    return sorted(folder.glob("shard-*.safetensors"))


def assert_same(a, b):
    torch.testing.assert_close(a.cond, b.cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss_before, b.loss_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss_after, b.loss_after, rtol=0, atol=1e-6)
    assert set(a.deltas) == set(b.deltas)
    for site in a.deltas:
        torch.testing.assert_close(a.deltas[site], b.deltas[site], rtol=0, atol=1e-6)


def assert_silent_rerun(learner, data, cache_dir, truth):
    """A rerun after the repair reads the rewritten shards without any warning and gives the true targets."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(build(learner, data, cache_dir), truth)


def read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_a_flipped_bit_in_a_shard_is_detected_and_recomputed(learner, train_data, truth, tmp_path):
    build(learner, train_data, tmp_path)
    shard = shards(tmp_path)[1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x40  # the high byte of the data region's last float32: its exponent
    shard.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=rf"{shard.name}.*checksum.*recomput"):
        repaired = build(learner, train_data, tmp_path)
    assert_same(repaired, truth)
    assert_silent_rerun(learner, train_data, tmp_path, truth)


def test_a_damaged_shard_header_is_detected_and_recomputed(learner, train_data, truth, tmp_path):
    build(learner, train_data, tmp_path)
    shard = shards(tmp_path)[0]
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])  # a header length no file can have
    with pytest.warns(RuntimeWarning, match=rf"{shard.name}.*not readable.*recomput"):
        assert_same(build(learner, train_data, tmp_path), truth)
    assert_silent_rerun(learner, train_data, tmp_path, truth)


@pytest.mark.parametrize("consistent_checksum", [False, True])
def test_nan_in_a_shard_is_detected_and_recomputed(learner, train_data, truth, tmp_path, consistent_checksum):
    """NaN written by another tool (old checksum kept), or by a buggy writer that also rewrote the checksum: the
    shard is refused either way."""
    build(learner, train_data, tmp_path)
    shard = shards(tmp_path)[2]
    tensors, metadata = read(shard)
    tensors["cond"][0, 0] = float("nan")
    if consistent_checksum:
        metadata = {**metadata, "sha256": targets_module._checksum(tensors)}
    save_file(tensors, str(shard), metadata=metadata)
    with pytest.warns(RuntimeWarning, match=rf"{shard.name}.*(NaN|checksum).*recomput"):
        repaired = build(learner, train_data, tmp_path)
    assert torch.isfinite(repaired.cond).all()
    assert_same(repaired, truth)
    assert_silent_rerun(learner, train_data, tmp_path, truth)


def test_swapped_shards_are_detected_and_recomputed(learner, train_data, truth, tmp_path):
    build(learner, train_data, tmp_path)
    first, second, _ = shards(tmp_path)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)  # both hold 5 samples: only their position tells them apart
    second.write_bytes(a)
    with pytest.warns(RuntimeWarning) as record:
        repaired = build(learner, train_data, tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert first.name in messages and second.name in messages and "batch" in messages
    assert_same(repaired, truth)
    assert_silent_rerun(learner, train_data, tmp_path, truth)


def test_freshly_computed_non_finite_targets_raise_naming_the_fix(learner, train_data, tmp_path):
    bad = list(train_data)
    bad[3] = (torch.full_like(bad[3][0], float("nan")), bad[3][1])
    with pytest.raises(FloatingPointError, match=r"not finite.*batch 0.*(NaN|nan).*pixel"):
        build(learner, bad, tmp_path)
    assert not list(folders(tmp_path)[0].glob("shard-*.safetensors"))  # nothing non-finite was cached


def test_group_targets_file_is_checked_too(bb, train_data, tmp_path):
    torch.manual_seed(0)
    learner = pr.build_learner("coop", bb, CLASSNAMES, **LEARNER_KWARGS["coop"])
    truth = build(learner, train_data, rule="group", n_groups=3)
    build(learner, train_data, tmp_path, rule="group", n_groups=3)
    (folder,) = folders(tmp_path)
    path = folder / "group-targets.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=r"group-targets.safetensors.*recomput"):
        repaired = build(learner, train_data, tmp_path, rule="group", n_groups=3)
    assert_same(repaired, truth)
    assert torch.equal(repaired.groups, truth.groups)


# ---------------------------------------------------------------------------------------------------------------
# the cache key covers the whole dataset

N_BIG = 40  # more items than the old key hashed (16 evenly spaced: 0, 3, 5, 8, ...); item 1 was never among them


def _big_data():
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(N_BIG, 3, 32, 32, generator=generator)
    return [(images[i], i % len(CLASSNAMES)) for i in range(N_BIG)]


def test_a_label_change_outside_the_hashed_items_gives_a_new_cache(learner, tmp_path):
    data = _big_data()
    build(learner, data, tmp_path)
    changed = list(data)
    changed[1] = (changed[1][0], (changed[1][1] + 1) % len(CLASSNAMES))
    fresh = build(learner, changed)
    cached = build(learner, changed, tmp_path)
    assert len(folders(tmp_path)) == 2
    assert_same(cached, fresh)


def test_a_pixel_change_outside_the_hashed_items_gives_a_new_cache(learner, tmp_path):
    data = _big_data()
    build(learner, data, tmp_path)
    changed = list(data)
    changed[1] = (changed[1][0].flip(-1), changed[1][1])
    build(learner, changed, tmp_path)
    assert len(folders(tmp_path)) == 2


def _image_folder(root, bb, n=N_BIG):
    generator = torch.Generator().manual_seed(3)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = torch.randint(0, 256, (bb.image_size, bb.image_size, 3), generator=generator, dtype=torch.uint8)
        path = root / f"img_{i:03d}.png"
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(path)
    return paths


def test_an_item_identity_change_outside_the_hashed_items_gives_a_new_cache(bb, learner, tmp_path):
    paths = _image_folder(tmp_path / "images", bb)
    labels = [i % len(CLASSNAMES) for i in range(N_BIG)]

    def dataset(paths):
        return ImageListDataset(paths, labels, CLASSNAMES, transform=transform_for(bb), root=tmp_path / "images")

    cache = tmp_path / "cache"
    build(learner, dataset(paths), cache)
    build(learner, dataset(paths), cache)
    assert len(folders(cache)) == 1  # unchanged data: reused
    # the same pixels under another name: another item, another key
    renamed = tmp_path / "images" / "renamed.png"
    renamed.write_bytes(paths[1].read_bytes())
    build(learner, dataset([*paths[:1], renamed, *paths[2:]]), cache)
    assert len(folders(cache)) == 2
    # a file replaced in place (same path): its size or time changed
    Image.new("RGB", (bb.image_size, bb.image_size), (1, 2, 3)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))
    build(learner, dataset(paths), cache)
    assert len(folders(cache)) == 3


def test_cache_of_the_fixture_is_reused_and_reads_each_item_once(learner, train_data, tmp_path):
    build(learner, train_data, tmp_path)

    class Counting(list):
        reads = 0

        def __getitem__(self, index):
            Counting.reads += 1
            return list.__getitem__(self, index)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(learner, Counting(train_data), tmp_path)
    assert len(folders(tmp_path)) == 1 and Counting.reads == N_TRAIN
