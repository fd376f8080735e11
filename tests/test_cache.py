"""The one cache helper (prompt_robust.cache): the dataset identity policy, cache keys, checked cache files, and
its four users (refiner targets, interventional features, the counterfactual flow, fit's resume check) reusing
their result on an identical second run and recomputing it after a label changes. Also atomic_write's cheap
sweep for orphaned temporary files. Tiny in-process models, CPU, seconds."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import CLASSNAMES, LEARNER_KWARGS, make_backbone
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

import prompt_robust as pr
from prompt_robust import _io, cache
from prompt_robust.addons.counterfactual.feature_flow import FeatureFlow, fit_feature_flow
from prompt_robust.addons.invariance.features import interventional_features
from prompt_robust.addons.refiner import targets as targets_module
from prompt_robust.data import FewShotSubset
from prompt_robust.data.loaders import ImageListDataset, transform_for
from prompt_robust.training import CheckpointMismatchError, FitConfig, fit

N = 24  # more items than the 16 whose pixels a file-listing dataset has hashed in full


def _images(n: int = N, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return [(images[i], i % len(CLASSNAMES)) for i in range(n)]


def _relabelled(data, index: int = 1):
    changed = list(data)
    changed[index] = (changed[index][0], (changed[index][1] + 1) % len(CLASSNAMES))
    return changed


class Counting(list):
    """A list dataset that counts item reads."""

    reads = 0

    def __getitem__(self, index):
        type(self).reads += 1
        return list.__getitem__(self, index)


# ---------------------------------------------------------------------------------------------------------------
# 1. the dataset identity


def test_in_memory_digest_follows_labels_and_every_pixel_and_nothing_else():
    data = _images()
    digest = cache.dataset_digest(data)
    copy = [(x.clone(), int(y)) for x, y in data]
    assert cache.dataset_digest(copy) == digest  # the same items in other objects
    assert cache.dataset_digest([(x, torch.tensor(y)) for x, y in data]) == digest  # labels as 0-dim tensors
    assert cache.dataset_digest(_relabelled(data)) != digest
    one_value = list(data)
    pixels = one_value[1][0].clone()
    pixels[2, 17, 5] += 1e-3  # one value of an item that is not among the evenly spaced ones
    one_value[1] = (pixels, one_value[1][1])
    assert cache.dataset_digest(one_value) != digest
    assert cache.dataset_digest(data[:-1]) != digest
    Counting.reads = 0
    cache.dataset_digest(Counting(data))
    assert Counting.reads == N  # every item read once


def _folder(root, n: int = N) -> list:
    generator = torch.Generator().manual_seed(3)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
        paths.append(root / f"img_{i:03d}.png")
        Image.fromarray(pixels.numpy()).save(paths[-1])
    return paths


class CountingImages(ImageListDataset):
    opened = 0

    def load_image(self, index):
        type(self).opened += 1
        return super().load_image(index)


def test_file_listing_digest_follows_labels_paths_and_file_times_without_opening_every_image(bb, tmp_path):
    paths = _folder(tmp_path / "images")
    labels = [i % len(CLASSNAMES) for i in range(N)]

    def dataset(paths, labels=labels, cls=ImageListDataset):
        return cls(paths, labels, CLASSNAMES, transform=transform_for(bb), root=tmp_path / "images")

    CountingImages.opened = 0
    digest = cache.dataset_digest(dataset(paths, cls=CountingImages))
    assert CountingImages.opened == cache.FULL_ITEMS  # only the transform check opens images
    assert cache.dataset_digest(dataset(paths)) == digest  # rebuilt from the same files
    relabelled = [*labels[:1], (labels[1] + 1) % len(CLASSNAMES), *labels[2:]]  # item 1: not opened for the key
    assert cache.dataset_digest(dataset(paths, relabelled)) != digest
    renamed = tmp_path / "images" / "renamed.png"
    renamed.write_bytes(paths[1].read_bytes())  # the same pixels under another name
    assert cache.dataset_digest(dataset([paths[0], renamed, *paths[2:]])) != digest
    os.utime(paths[1], ns=(1, 1))  # rewritten in place (only its time tells)
    touched = cache.dataset_digest(dataset(paths))
    assert touched != digest
    # a few-shot view and a copy of the same items are the same data
    picked = [0, 5, 6, 11, 20]
    view = FewShotSubset(dataset(paths), picked)
    assert cache.dataset_digest(view) == cache.dataset_digest(dataset(paths).subset(picked))
    assert cache.dataset_digest(FewShotSubset(dataset(paths), [0, 5, 6, 11, 21])) != cache.dataset_digest(view)


class Labelled(Dataset):
    """Exposes its labels; any item read is an error (what fit's fingerprint must never do)."""

    def __init__(self, labels):
        self.labels = torch.as_tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        raise AssertionError("an item was read")


def test_the_metadata_only_identity_reads_no_item():
    identity = cache.dataset_identity(Labelled([0, 1, 1]), read_items=False)
    assert sorted(identity) == ["labels", "length"]
    assert identity != cache.dataset_identity(Labelled([0, 1, 0]), read_items=False)
    # an in-memory list gives its labels without a read
    Counting.reads = 0
    assert "labels" in cache.dataset_identity(Counting(_images(4)), read_items=False) and Counting.reads == 0


# ---------------------------------------------------------------------------------------------------------------
# 2. keys


def test_cache_key_covers_settings_tensors_modules_and_data():
    data = cache.dataset_digest(_images(4))
    layer = nn.Linear(3, 2)
    key = cache.cache_key("toy-cache", {"lr": 0.1, "steps": 5}, torch.arange(4), layer, data)
    assert key.startswith("toy-cache-") and len(key) == len("toy-cache-") + cache.KEY_DIGITS
    assert key == cache.cache_key("toy-cache", {"steps": 5, "lr": 0.1}, torch.arange(4), layer, data)  # dict order
    others = [
        cache.cache_key("toy-cache", {"lr": 0.2, "steps": 5}, torch.arange(4), layer, data),
        cache.cache_key("toy-cache", {"lr": 0.1, "steps": 5}, torch.arange(4).float(), layer, data),
        cache.cache_key("toy-cache", {"lr": 0.1, "steps": 5}, torch.arange(4), layer, cache.dataset_digest([])),
        cache.cache_key("other-cache", {"lr": 0.1, "steps": 5}, torch.arange(4), layer, data),
    ]
    assert len({key, *others}) == 5
    with torch.no_grad():
        layer.bias.add_(1.0)
    assert cache.cache_key("toy-cache", {"lr": 0.1, "steps": 5}, torch.arange(4), layer, data) != key
    with pytest.raises(TypeError, match="dataset_digest"):
        cache.cache_key("toy-cache", _images(2))
    with pytest.raises(ValueError, match="lower-case"):
        cache.cache_key("Toy cache")


def test_module_fingerprint_of_a_learner_is_its_backbone_and_its_own_tensors(bb):
    torch.manual_seed(0)
    learner = pr.build_learner("coop", bb, CLASSNAMES, **LEARNER_KWARGS["coop"])
    before = cache.module_fingerprint(learner)
    assert cache.module_fingerprint(bb) != before
    with torch.no_grad():
        learner.ctx.add_(0.01)
    assert cache.module_fingerprint(learner) != before
    other_weights = pr.build_learner("coop", make_backbone("hf", seed=1), CLASSNAMES, n_ctx=4)
    with torch.no_grad():
        other_weights.ctx.copy_(learner.ctx)
    assert cache.module_fingerprint(other_weights) != cache.module_fingerprint(learner)


# ---------------------------------------------------------------------------------------------------------------
# 3. checked files


def _tensors():
    return {"a": torch.arange(6, dtype=torch.float32).reshape(3, 2), "b": torch.ones(3, dtype=torch.int64)}


def _read(path, **kwargs):
    return cache.read_cached(path, key="toy-cache-1", **kwargs)


def test_a_cached_file_round_trips_silently(tmp_path):
    path = tmp_path / "entry.safetensors"
    assert _read(path) is None  # nothing cached yet: no warning
    cache.write_cached(path, _tensors(), key="toy-cache-1", place={"batch": "0"}, info={"loss": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = _read(path, place={"batch": "0"}, rows={"a": 3, "b": 3}, info=True, finite=True)
    assert entry.info == {"loss": 0.5}
    for name, tensor in _tensors().items():
        assert torch.equal(entry.tensors[name], tensor)


def _flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "kwargs", "reason"),
    [
        (_flip_last_byte, {}, "checksum does not match"),
        (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), {}, "not readable"),
        (lambda p: save_file(_tensors(), str(p)), {}, "no cache record"),  # another tool's file
        (lambda p: None, {"key": "toy-cache-2"}, "belongs to cache entry 'toy-cache-1'"),
        (lambda p: None, {"place": {"batch": "1"}}, "swapped"),
        (lambda p: None, {"rows": {"a": 4}}, "lacks tensors or rows"),
        (lambda p: p.with_suffix(".json").write_text("{"), {"info": True}, "sidecar"),
        (
            lambda p: p.with_suffix(".json").write_text('{"cache": {"key": "toy-cache-1", "sha256": "0"}}'),
            {"info": True},
            "other tensors",
        ),
        (lambda p: None, {"validate": lambda entry: "the caller refuses it"}, "the caller refuses it"),
    ],
)
def test_a_damaged_or_foreign_cache_file_is_refused_with_a_warning(tmp_path, damage, kwargs, reason):
    path = tmp_path / "entry.safetensors"
    cache.write_cached(path, _tensors(), key="toy-cache-1", place={"batch": "0"}, info={"loss": 0.5})
    damage(path)
    kwargs = {"key": "toy-cache-1", "place": {"batch": "0"}, **kwargs}
    with pytest.warns(RuntimeWarning, match=rf"toy file '.*entry.safetensors' is not used: .*{reason}.*recomput"):
        assert cache.read_cached(path, what="toy file", **kwargs) is None


def test_nan_with_a_consistent_checksum_is_refused_where_finite_is_asked(tmp_path):
    path = tmp_path / "entry.safetensors"
    tensors = _tensors()
    tensors["a"][0, 0] = float("nan")
    cache.write_cached(path, tensors, key="toy-cache-1")  # a buggy writer: the record matches the NaN
    assert _read(path) is not None
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert _read(path, finite=True) is None


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (str(_Boom.target),))


def test_a_pickle_in_place_of_a_cache_file_is_never_unpickled(tmp_path):
    path = tmp_path / "entry.safetensors"
    _Boom.target = tmp_path / "unpickled"
    path.write_bytes(pickle.dumps({"a": _Boom()}))
    with pytest.warns(RuntimeWarning, match="not readable"):
        assert _read(path) is None
    assert not _Boom.target.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. the four users: an identical rerun reuses, a changed label recomputes


@pytest.fixture(scope="module")
def learner(bb):
    torch.manual_seed(0)
    return pr.build_learner("coop", bb, CLASSNAMES, **LEARNER_KWARGS["coop"])


def test_refiner_targets_are_reused_and_recomputed_after_a_label_change(learner, tmp_path, monkeypatch):
    data = _images(10)

    def build(data):
        return targets_module.build_targets(
            learner, data, steps=1, lr=0.05, batch_size=4, cache_dir=tmp_path, progress=False
        )

    first = build(data)
    real = targets_module.overfit_prompts
    monkeypatch.setattr(targets_module, "overfit_prompts", lambda *a, **k: pytest.fail("targets recomputed"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = build([(x.clone(), y) for x, y in data])
    assert torch.equal(again.cond, first.cond) and again.cache_path == first.cache_path
    calls = []
    monkeypatch.setattr(targets_module, "overfit_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    changed = build(_relabelled(data))
    assert calls and changed.cache_path != first.cache_path
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("refiner-targets-")]) == 2


def test_interventional_features_are_reused_and_recomputed_after_a_label_change(bb, learner, tmp_path):
    data = _images(8)
    kwargs = {"mean": bb.image_mean, "std": bb.image_std, "cache_dir": tmp_path, "progress": False}
    first = interventional_features(learner, data, ["grayscale"], **kwargs)
    learner.image_features = lambda *a, **k: pytest.fail("features recomputed")  # an instance attribute shadows it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = interventional_features(learner, list(data), ["grayscale"], **kwargs)
    finally:
        del learner.image_features
    assert torch.equal(again.intervened, first.intervened) and again.cache_path == first.cache_path
    changed = interventional_features(learner, _relabelled(data), ["grayscale"], **kwargs)
    assert changed.cache_path != first.cache_path and changed.labels[1] != first.labels[1]
    assert len(list(tmp_path.glob("invariance-features-*.safetensors"))) == 2


def test_interventional_features_cache_with_a_wrong_shape_is_recomputed(bb, learner, tmp_path):
    data = _images(8)
    kwargs = {"mean": bb.image_mean, "std": bb.image_std, "cache_dir": tmp_path, "progress": False}
    first = interventional_features(learner, data, ["grayscale"], **kwargs)
    tensors = {"clean": first.clean, "intervened": first.intervened[:, :, :-1], "labels": first.labels}
    key = first.cache_path.name[: -len(".safetensors")]
    cache.write_cached(first.cache_path, tensors, key=key, place={"columns": "grayscale"})  # consistent, wrong
    with pytest.warns(RuntimeWarning, match="interventional features .* is not used: inconsistent"):
        repaired = interventional_features(learner, data, ["grayscale"], **kwargs)
    assert torch.equal(repaired.intervened, first.intervened)


def test_feature_flow_is_reused_and_refitted_after_a_label_change(tmp_path):
    features = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 2

    def run(labels):
        flow = FeatureFlow(feature_dim=4, num_classes=2, hidden_dim=16, depth=1)
        return fit_feature_flow(flow, features, labels, steps=3, cache_dir=tmp_path, progress=False), flow

    first, flow = run(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, reloaded = run(labels.clone())
    assert not first.cached and again.cached and again.final_loss == first.final_loss
    for name, value in flow.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    relabelled = labels.clone()
    relabelled[1] = 0
    changed, _ = run(relabelled)
    assert not changed.cached and changed.cache_path != first.cache_path
    assert {p.name for p in first.cache_path.iterdir()} == {"flow.safetensors", "flow.json"}
    # the JSON sidecar is bound to its tensor file: one from another entry is refused
    (first.cache_path / "flow.json").write_bytes((changed.cache_path / "flow.json").read_bytes())
    with pytest.warns(RuntimeWarning, match="flow.json.*(belongs to other tensors|no final loss)"):
        assert not run(labels)[0].cached


@dataclass
class _Out:
    loss: torch.Tensor | None
    logits: torch.Tensor


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, len(CLASSNAMES))

    def forward(self, pixel_values, labels=None, **extra):
        logits = self.head(pixel_values.flatten(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return _Out(loss, logits)


def test_fit_resumes_on_the_same_data_and_refuses_a_changed_label(tmp_path):
    data = _images(8)
    config = FitConfig(steps=2, batch_size=4, checkpoint_every=2, progress=False, log_every=0)
    torch.manual_seed(0)
    fit(_Head(), data, config, checkpoint_dir=tmp_path)
    again = fit(_Head(), [(x.clone(), y) for x, y in data], config, checkpoint_dir=tmp_path)
    assert again.resumed_from == 2
    with pytest.raises(CheckpointMismatchError, match=r"dataset labels: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        fit(_Head(), _relabelled(data), config, checkpoint_dir=tmp_path)


def test_fit_resumes_a_checkpoint_whose_dataset_fingerprint_an_older_version_wrote(tmp_path):
    data = _images(8)
    config = FitConfig(steps=2, batch_size=4, checkpoint_every=2, progress=False, log_every=0)
    fit(_Head(), data, config, checkpoint_dir=tmp_path)
    (checkpoint,) = tmp_path.glob("checkpoint-*")
    state_path = checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["fingerprint"]["dataset"].update({"indices": "0123456789abcdef", "dataset.labels": "fedcba9876543210"})
    state_path.write_text(json.dumps(state))
    assert fit(_Head(), data, config, checkpoint_dir=tmp_path).resumed_from == 2  # the parts both record agree
    state["fingerprint"]["dataset"]["length"] = 9
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointMismatchError, match="dataset length: 9 -> 8"):
        fit(_Head(), data, config, checkpoint_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 5. atomic_write lists a folder only when it may hold a new orphan


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write(path):
    _io.atomic_write(path, lambda tmp: tmp.write_bytes(b"data"))


def test_many_writes_into_one_folder_list_it_once(tmp_path, monkeypatch):
    listed = []
    real = os.scandir

    def scandir(path):
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(_io.os, "scandir", scandir)
    for i in range(50):
        _write(tmp_path / f"shard-{i:05d}.safetensors")
    assert listed.count(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-{i:05d}.safetensors" for i in range(50)]


def test_an_orphan_left_while_this_process_writes_is_removed_by_its_next_write(tmp_path):
    host = _io.HOST_TAG
    _write(tmp_path / "a.safetensors")
    time.sleep(0.05)  # past the filesystem's time granularity: the folder's new time shows the change
    orphan = tmp_path / f".b.safetensors.{_dead_pid()}-{host}.abcd1234.tmp"  # another target's, killed writer
    orphan.write_bytes(b"x")
    not_ours = tmp_path / ".b.safetensors.my-notes.tmp"
    not_ours.write_bytes(b"x")
    _write(tmp_path / "a.safetensors")
    assert not orphan.exists() and not_ours.exists()


def test_a_live_writer_killed_later_leaves_an_orphan_the_next_write_removes(tmp_path):
    host = _io.HOST_TAG
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write(tmp_path / "a.safetensors")
        time.sleep(0.05)
        live = tmp_path / f".a.safetensors.{child.pid}-{host}.efgh5678.tmp"
        live.write_bytes(b"x")
        _write(tmp_path / "a.safetensors")
        assert live.exists()  # its writer is alive
    finally:
        child.kill()
        child.wait()
    _write(tmp_path / "c.safetensors")  # the death changed nothing in the folder: the kept file is checked again
    assert not live.exists()
