"""Mechanism suites (``prompt-robust bench --suite mechanisms``): does an add-on work where its premise holds?

A broad benchmark can miss an add-on's effect for two reasons: the task gives the mechanism nothing to gain, or
the design fails. Each suite here first measures the **headroom** with an oracle, on a task built so that the
add-on's premise holds, then the learner and learner + add-on on the same data:

* refiner: the premise is that the best prompt depends on the image. Task: the domain-generalisation classes
  in all four styles, in training and test (``WorldTasks.styled_train`` / ``styled_test``). Oracle: the learner's
  prompt trained further on each style's training images (for 0 or :data:`ORACLE_EPOCHS` epochs, chosen on that
  style's validation images), applied by the test image's true style. Recovery =
  (learner + refiner − learner) / (oracle − learner), on the test images; the target rule of the refiner is
  chosen on validation images (the pool's unused images), never on the test set.

* refiner-tpt: the premise of a *label-free* per-image prompt (test-time prompt tuning's): the prompt that makes
  an image's augmented views agree helps on unseen styles. Task: domain generalisation (photo shots, unseen
  styles). Oracle: that rule applied to every test image itself (``refiner.targets.entropy_prompts``, the
  refiner's ``"entropy"`` targets, here 3 steps of relative length 0.25, chosen on unused training photos): the
  most a refiner that amortises the rule could gain. Compared: the refiner trained on those label-free targets
  and the paper's overfitted ones. Recovery on the unseen-style average.

* counterfactual: the premise is that images differing only in a nuisance factor exist and the prompt should
  treat them alike. Task: the spurious task (95% of each class on its habitat background). Oracle: the learner
  trained on the training images *and* their true twins rendered with the other background
  (``WorldTasks.spurious_twins``). Compared: the paper's class counterfactuals (``twin="class"``) and attribute
  twins (``twin="attribute"``: the background changed by the class-centred attribute offsets, the class kept).
  Recovery = (learner + counterfactual − learner) / (oracle − learner) in worst-group test accuracy; the twin
  design is compared on a separate balanced validation set (``WorldTasks.spurious_val``).
* invariance (ICM): the premise is that pairs of images differing only in a nuisance factor reveal the
  directions to discard. Task: the domain-generalisation split (photo shots, unseen styles). Oracles: ICM fitted
  on *true* twins rendered by the world (``WorldTasks.dg_twins``): the same photo with another colour,
  background or geometry (``oracle_nuisance``), or in another style (``oracle_style``: the unseen styles
  themselves, the most an intervention could know). Recovery = (ICM with the default interventions − plain
  zero-shot) / (oracle − plain zero-shot) on the unseen-style average.

Every run also reports diagnostics computed from what the add-on learned (the targets' label decodability, the
agreement of generated offsets with the learner's own predictions, how well the label-free groups match the true
ones).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ... import _io
from ...addons.refiner.config import RefinerConfig
from ...backbones.base import ClipBackbone
from ...config import RobustConfig
from ...data.fewshot import unused_indices
from ...eval.metrics import accuracy
from ...model import wrap
from ...training import fit
from ..runner import BenchConfig, _accuracy, _outputs, _Runner
from ..tasks import TaskData
from .base import SuiteRequest, register_suite

__all__ = [
    "COUNTERFACTUAL_TWINS",
    "ICM_ORACLES",
    "MECHANISMS",
    "REFINER_RULES",
    "TPT_RULES",
    "counterfactual_mechanism",
    "format_mechanisms",
    "group_purity",
    "icm_mechanism",
    "mechanisms_benchmark",
    "refiner_mechanism",
    "refiner_tpt_mechanism",
]

#: the counterfactual designs compared by the suite (``CounterfactualConfig.twin``)
COUNTERFACTUAL_TWINS: tuple[str, ...] = ("class", "attribute")

#: the ICM oracles: name -> the twin factors whose pairs it is fitted on
ICM_ORACLES: dict[str, tuple[str, ...]] = {
    "oracle_nuisance": ("colour", "background", "geometry"),
    "oracle_style": ("style",),
}

#: fine-tuning lengths (epochs) the per-style oracle chooses from on validation, besides 0 (the learner's prompt)
ORACLE_EPOCHS: tuple[int, ...] = (5, 20, 80)

#: the refiner target rules compared by the suite
REFINER_RULES: tuple[str, ...] = ("overfit", "group")

#: the label-free (test-time prompt tuning) rule of the refiner-tpt suite: RefinerConfig fields
TPT_RULE: dict[str, Any] = {"targets": "entropy", "inner_steps": 3, "inner_lr": 0.25}

#: the refiner target rules the refiner-tpt suite trains: name -> RefinerConfig overrides
TPT_RULES: dict[str, dict[str, Any]] = {"entropy": TPT_RULE, "overfit": {"targets": "overfit"}}


def group_purity(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of samples whose found group's most common true group is their own (1.0: every found group lies
    inside one true group; ``max share of a true group``: the found groups ignore the true ones).

    Example:
        >>> group_purity(torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 3, 3]))
        1.0
        >>> group_purity(torch.tensor([0, 0, 0, 0]), torch.tensor([2, 2, 3, 3]))
        0.5
    """
    if found.shape != truth.shape:
        raise ValueError(
            f"found and truth must have the same shape; got {tuple(found.shape)} and {tuple(truth.shape)}."
        )
    hits = 0
    for g in found.unique():
        members = truth[found == g]
        hits += int(torch.bincount(members).max())
    return hits / len(found)


def _scored(model, val: TaskData, test: TaskData) -> tuple[dict[str, Any], torch.Tensor]:
    """``{"val", "test", "groups": {group: test accuracy}}`` and the test predictions, from one pass over each
    set (a refined model's forward is the suite's most expensive step)."""
    predictions = _outputs(model, test)[0]
    groups = {
        name: accuracy(predictions[test.groups == g], test.labels[test.groups == g])
        for g, name in enumerate(test.group_names or [])
    }
    return {"val": _accuracy(model, val), "test": accuracy(predictions, test.labels), "groups": groups}, predictions


def _held_out(pool: TaskData, used: Sequence[int], strata: torch.Tensor, per_stratum: int, seed: int) -> TaskData:
    """The validation set: the pool's images a split did not use, up to ``per_stratum`` per value of ``strata``
    (one int per pool image), drawn in a seeded order."""
    unused = unused_indices(len(pool), used)
    generator = torch.Generator().manual_seed(10_000 + seed)
    order = [unused[i] for i in torch.randperm(len(unused), generator=generator).tolist()]
    taken: dict[int, int] = {}
    chosen = []
    for index in order:
        key = int(strata[index])
        if taken.get(key, 0) < per_stratum:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(index)
    return pool.subset(sorted(chosen))


def _validation(tasks, train_indices: Sequence[int], per_class_style: int, seed: int) -> TaskData:
    """Unused pool images (the validation set): up to ``per_class_style`` per class and style, seeded."""
    pool = tasks.styled_pool()
    n_styles = int(pool.groups.max()) + 1
    return _held_out(pool, train_indices, pool.labels * n_styles + pool.groups, per_class_style, seed)


def _flat_offsets(addon: Any, targets: Any, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The refiner's training targets ``(N, D)`` and the offsets it generates for ``cond`` ``(M, D)``, every site
    flattened and concatenated in sorted order (the generated ones in prompt units, times the site's scale)."""
    sites = sorted(addon.sites)
    flat = torch.cat([targets.deltas[s].flatten(1) for s in sites], dim=1)
    with torch.no_grad():
        generated = addon.sample_offsets(cond)
        generated = torch.cat([(addon.scale(s) * generated[s]).flatten(1) for s in sites], dim=1)
    return flat, generated


def refiner_mechanism(
    runner: _Runner,
    seed: int,
    *,
    learner: str = "coop",
    k: int = 4,
    refiner: dict[str, Any] | None = None,
    val_per_class: int = 4,
) -> dict[str, Any]:
    """One seed of the refiner's mechanism suite (see the module docstring).

    Args:
        runner: the benchmark runner (backbone, tasks, cache folder, learner schedules).
        seed: few-shot draw and initialisation.
        learner: the prompt learner.
        k: shots per class *and style*.
        refiner: RefinerConfig overrides shared by every rule (``targets`` is set per rule).
        val_per_class: validation images per class and style.

    Returns:
        ``{"learner", "oracle", "refiner:<rule>" (each ``{"val", "test", "groups": {style: acc}}``),
        "diagnostics": {rule: {...}}}``.
    """
    from ...addons.refiner.diagnostics import label_decodability, prediction_agreement

    tasks = runner.tasks
    train, indices = tasks.styled_train(k, seed)
    runner._save_split("styled", seed, indices)
    val = _validation(tasks, indices, val_per_class, seed)
    test = tasks.styled_test()
    splits = (("val", val), ("test", test))
    classes = tasks.dg_classes()

    base = runner._model(learner, [], classes, seed)
    runner._train(base, train, seed)
    out: dict[str, Any] = {}
    out["learner"], predictions = _scored(base, val, test)  # the learner's test predictions, for the diagnostics

    # oracle: the learned prompt trained further on each style's images, used on that style's images; how long
    # it trains (0 epochs: the learner's own prompt) is chosen on that style's validation images
    correct = {"val": 0, "test": 0}
    groups: dict[str, float] = {}
    epochs_chosen: dict[str, int] = {}
    for g, style in enumerate(test.group_names or []):
        subset = train.subset((train.groups == g).nonzero().flatten().tolist())
        parts = {split: data.subset((data.groups == g).nonzero().flatten().tolist()) for split, data in splits}
        best = (_accuracy(base, parts["val"]), 0, base)
        for epochs in ORACLE_EPOCHS:
            oracle = copy.deepcopy(base)
            config = runner._fit_config(learner, len(subset), seed)
            per_epoch = math.ceil(len(subset) / config.batch_size)
            fit(oracle, subset, dataclasses.replace(config, steps=epochs * per_epoch, warmup_steps=per_epoch))
            score = _accuracy(oracle, parts["val"])
            if score > best[0]:
                best = (score, epochs, oracle)
        val_accuracy, epochs_chosen[style], chosen = best
        groups[style] = _accuracy(chosen, parts["test"])
        correct["val"] += round(val_accuracy * len(parts["val"]))
        correct["test"] += round(groups[style] * len(parts["test"]))
    out["oracle"] = {
        "val": correct["val"] / len(val),
        "test": correct["test"] / len(test),
        "groups": groups,
        "epochs": epochs_chosen,
    }

    out["diagnostics"] = {}
    for rule in REFINER_RULES:
        config = RefinerConfig(**{**(refiner or {}), "targets": rule, "num_groups": len(test.group_names or [])})
        model = wrap(copy.deepcopy(base.learner), RobustConfig(refiner=config))
        cache = runner.out_dir / "cache"
        model.fit_addons(train, seed=seed, cache_dir=cache, progress=False)
        name = f"refiner:{rule}"
        out[name] = _scored(model, val, test)[0]
        addon = model.addons["refiner"]
        targets = addon.build_targets(train, cache_dir=cache, progress=False, seed=seed)  # cached: no recompute
        model.eval()
        flat, generated = _flat_offsets(addon, targets, base.learner.image_features(test.pixel_values))
        diagnostics = {
            "label_decodability": label_decodability(flat, train.labels),
            "prediction_agreement": prediction_agreement(flat, train.labels, generated, predictions),
            "chance": 1 / len(classes),
        }
        if targets.groups is not None:
            diagnostics["group_purity"] = group_purity(targets.groups, train.groups)
        out["diagnostics"][rule] = diagnostics
    return out


def _tpt_predictions(learner, data: TaskData, config: RefinerConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions of ``learner`` with every image's own label-free prompt (the rule of ``config``: its
    ``inner_steps``, ``inner_lr``, ``entropy_views``, ``entropy_keep``), and those prompts' offsets ``(N, D)``."""
    from ...addons.refiner.targets import _logits, entropy_prompts

    generator = torch.Generator().manual_seed(20_000 + seed)
    base = {site: p.detach() for site, p in learner.prompt_tokens().items()}
    predictions, offsets = [], []
    was_training = learner.training
    learner.eval()
    try:
        for start in range(0, len(data), config.target_batch_size):
            x = data.pixel_values[start : start + config.target_batch_size]
            prompts, _, _ = entropy_prompts(
                learner,
                x,
                steps=config.inner_steps,
                lr=config.inner_lr,
                views=config.entropy_views,
                keep=config.entropy_keep,
                generator=generator,
            )
            with torch.no_grad():
                predictions.append(_logits(learner(x, prompt_override=prompts)).argmax(-1))
            offsets.append(torch.cat([(prompts[s] - base[s]).flatten(1) for s in sorted(base)], dim=1))
    finally:
        learner.train(was_training)
    return torch.cat(predictions), torch.cat(offsets)


def _style_scores(correct: dict[str, torch.Tensor]) -> dict[str, float]:
    from ..tasks import TARGET_STYLES

    scores = {split: float(hits.float().mean()) for split, hits in correct.items()}
    scores["avg"] = statistics.fmean(scores[s] for s in TARGET_STYLES)
    return scores


def refiner_tpt_mechanism(
    runner: _Runner,
    seed: int,
    *,
    learner: str = "coop",
    refiner: dict[str, Any] | None = None,
    val_per_class: int = 8,
) -> dict[str, Any]:
    """One seed of the refiner-tpt suite (see the module docstring): domain generalisation, the learner, the
    label-free rule applied to every evaluation image (the oracle), and the refiner trained on each rule of
    :data:`TPT_RULES`.

    Returns:
        ``{"learner", "oracle", "refiner:<rule>": {"val", <style>..., "avg"}, "diagnostics": {...}}``; ``val`` is
        accuracy on unused training-pool photos.
    """
    from ...addons.refiner.diagnostics import label_decodability

    tasks = runner.tasks
    train, indices = tasks.dg_train(runner.config.k, seed)
    runner._save_split("domain_generalization", seed, indices)
    pool = tasks.dg_pool()
    sets = {"val": _held_out(pool, indices, pool.labels, val_per_class, seed), **tasks.dg_test()}
    classes = tasks.dg_classes()

    base = runner._model(learner, [], classes, seed)
    runner._train(base, train, seed)
    out: dict[str, Any] = {}
    out["learner"] = _style_scores({name: _outputs(base, data)[0] == data.labels for name, data in sets.items()})
    rule = RefinerConfig(**{**(refiner or {}), **TPT_RULE})
    oracle_offsets = {}
    correct = {}
    for name, data in sets.items():
        predictions, oracle_offsets[name] = _tpt_predictions(base.learner, data, rule, seed)
        correct[name] = predictions == data.labels
    out["oracle"] = _style_scores(correct)
    out["diagnostics"] = {}
    for rule_name, overrides in TPT_RULES.items():
        config = RefinerConfig(**{**(refiner or {}), **overrides})
        model = wrap(copy.deepcopy(base.learner), RobustConfig(refiner=config))
        cache = runner.out_dir / "cache"
        model.fit_addons(train, seed=seed, cache_dir=cache, progress=False)
        model.eval()
        out[f"refiner:{rule_name}"] = _style_scores(
            {name: _outputs(model, data)[0] == data.labels for name, data in sets.items()}
        )
        addon = model.addons["refiner"]
        targets = addon.build_targets(train, cache_dir=cache, progress=False, seed=seed)  # cached: no recompute
        flat, generated = _flat_offsets(addon, targets, base.learner.image_features(sets["val"].pixel_values))
        wanted = oracle_offsets["val"]
        out["diagnostics"][rule_name] = {
            "label_decodability": label_decodability(flat, train.labels),
            "chance": 1 / len(classes),
            # does the generator give a validation image the offset the label-free rule would give it?
            "cosine_to_rule_offset": float(torch.nn.functional.cosine_similarity(generated, wanted, dim=1).mean()),
            "norm_ratio_to_rule_offset": float(generated.norm(dim=1).mean() / wanted.norm(dim=1).mean()),
        }
    return out


def _worst_and_avg(model, data: TaskData) -> dict[str, float]:
    from ...eval.metrics import per_group_accuracy, worst_group_accuracy

    predictions = _outputs(model, data)[0]
    groups = per_group_accuracy(predictions, data.labels, data.groups)
    return {"avg": accuracy(predictions, data.labels), "worst_group": worst_group_accuracy(groups)}


def counterfactual_mechanism(
    runner: _Runner,
    seed: int,
    *,
    learner: str = "coop",
    counterfactual: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One seed of the counterfactual suite on the spurious task (see the module docstring).

    Returns:
        ``{"learner", "oracle", "counterfactual:<twin>": {"val": {...}, "test": {...}}, "diagnostics": {...}}``,
        each split with ``avg`` and ``worst_group``.
    """
    from ...addons.counterfactual.config import CounterfactualConfig
    from ...attributes import classify_attributes
    from ...learners.base import image_features_in_batches
    from ..tasks import SPURIOUS_BACKGROUNDS, TaskData

    tasks, n = runner.tasks, runner.config.spurious_per_class
    train = tasks.spurious_train(n, seed)
    twins = tasks.spurious_twins(n, seed, "background")
    val, test = tasks.spurious_val(), tasks.spurious_test()
    classes = train.classnames

    def scores(model) -> dict[str, Any]:
        return {"val": _worst_and_avg(model, val), "test": _worst_and_avg(model, test)}

    base = runner._model(learner, [], classes, seed)
    runner._train(base, train, seed)
    out: dict[str, Any] = {"learner": scores(base)}
    oracle = runner._model(learner, [], classes, seed)
    both = TaskData(
        torch.cat([train.pixel_values, twins.pixel_values]),
        torch.cat([train.labels, twins.labels]),
        list(classes),
        torch.cat([train.groups, twins.groups]),
        train.group_names,
    )
    runner._train(oracle, both, seed)
    out["oracle"] = scores(oracle)
    out["diagnostics"] = {}
    for twin in COUNTERFACTUAL_TWINS:
        settings = {**(counterfactual or {}), "twin": twin}
        if twin == "attribute":
            settings.setdefault("attribute_values", list(SPURIOUS_BACKGROUNDS))
        model = wrap(
            _fresh_learner(runner, learner, classes, seed),
            RobustConfig(counterfactual=CounterfactualConfig(**settings)),
        )
        runner._train(model, train, seed)
        out[f"counterfactual:{twin}"] = scores(model)
        if twin == "attribute":
            # what the generated twins changed, against the true twins of the same images
            addon = model.addons["counterfactual"]
            z = image_features_in_batches(model.learner, train.pixel_values)
            true = image_features_in_batches(model.learner, twins.pixel_values)
            generated, read, targets = addon.attribute_twins(z)
            background = train.groups % len(SPURIOUS_BACKGROUNDS)
            zero_shot = model.learner.fixed_text_features([f"a photo of a {c}." for c in classes])
            out["diagnostics"][twin] = {
                "attribute_read_correctly": float((read == background).float().mean()),
                "twin_attribute_flipped": float(
                    (classify_attributes(generated, addon.attribute_text)[0] == targets).float().mean()
                ),
                "twin_class_kept": float(((generated @ zero_shot.t()).argmax(-1) == train.labels).float().mean()),
                "cosine_to_true_twin": float((generated * true).sum(-1).mean()),
                "factual_cosine_to_true_twin": float((z * true).sum(-1).mean()),
            }
    return out


def _fresh_learner(runner: _Runner, learner: str, classes: Sequence[str], seed: int):
    return runner._model(learner, [], classes, seed).learner


def icm_mechanism(setup: Any, seed: int) -> dict[str, Any]:
    """One seed of the ICM suite: plain zero-shot, ICM with the configured interventions and ICM with each
    oracle's true twins, every projection chosen by the same rule on held-out training images (see the module
    docstring). ``setup``: the ICM suites' shared state (``bench.suites.icm._DGSetup``).

    Returns:
        ``{"zero_shot", "icm", <oracle>...: {style: acc, "avg"}, "chosen": {method: {"lam", "dim"}}}``.
    """
    from ...addons.invariance.features import InterventionalFeatures
    from ...addons.invariance.predict import compare_predictors
    from ...learners.base import image_features_in_batches
    from ..tasks import TARGET_STYLES

    feats = setup.features(seed)
    _, indices = setup.tasks.dg_train(setup.k, seed)
    candidates = {"icm": feats}
    for oracle, factors in ICM_ORACLES.items():
        intervened = [
            image_features_in_batches(setup.learner, setup.tasks.dg_twins(indices, f, seed).pixel_values)
            for f in factors
        ]
        candidates[oracle] = InterventionalFeatures(
            feats.clean, torch.stack(intervened, dim=1), feats.labels, list(factors)
        )
    out: dict[str, Any] = {"chosen": {}}
    for name, pairs in candidates.items():
        icm, _ = setup.fit(pairs, seed)
        scores = compare_predictors(
            feats.clean, feats.labels, icm, setup.text, setup.tests, methods=("zero_shot", "icm_zero_shot")
        )
        for values in scores.values():
            values["avg"] = statistics.fmean(values[s] for s in TARGET_STYLES)
        out.setdefault("zero_shot", scores["zero_shot"])
        out[name] = scores["icm_zero_shot"]
        out["chosen"][name] = {"lam": float(icm.lam_relative), "dim": int(icm.dim)}
    return out


def _nuisance_overlap(setup: Any, seeds: Sequence[int]) -> dict[str, Any]:
    """Per twin factor, the share of the true twins' feature differences inside the class-mean span
    (:func:`prompt_robust.addons.invariance.icm.class_subspace_share`) over ``seeds``, and what random directions give."""
    from ...addons.invariance.icm import class_subspace_share
    from ...learners.base import image_features_in_batches

    feats = {seed: setup.features(seed) for seed in seeds}
    shares: dict[str, dict[str, float]] = {}
    for factor in setup.tasks.TWIN_FACTORS:
        values = []
        for seed in seeds:
            _, indices = setup.tasks.dg_train(setup.k, seed)
            twins = image_features_in_batches(setup.learner, setup.tasks.dg_twins(indices, factor, seed).pixel_values)
            values.append(class_subspace_share(feats[seed].clean, twins, feats[seed].labels))
        shares[factor] = _mean_std(values)
    clean = feats[seeds[0]].clean
    random = int(feats[seeds[0]].labels.max()) / clean.shape[1]  # (n_classes - 1) / d
    return {"factors": shares, "random": random}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


#: the mechanism suites ``mechanisms_benchmark`` runs (``bench --suite mechanisms --mechanisms ...``)
MECHANISMS: tuple[str, ...] = ("refiner", "refiner-tpt", "counterfactual", "invariance")


def _seeded(out_dir: Path, suite: str, seeds: Sequence[int], settings: dict[str, Any], run, progress: bool) -> dict:
    """``{seed: run(seed)}``, each seed saved as ``runs/mechanisms_<suite>_seed<seed>.json`` and reused by a rerun
    with the same settings (other settings are refused: nothing saved is silently reused or overwritten)."""
    from tqdm.auto import tqdm

    per_seed = {}
    for seed in tqdm(list(seeds), desc=f"{suite} mechanism", disable=not progress):
        path = out_dir / "runs" / f"mechanisms_{suite}_seed{seed}.json"
        if path.is_file():
            saved = _io.read_json(path)
            if saved.get("settings") != settings:
                raise ValueError(
                    f"{path} was run with other settings ({saved.get('settings')}); delete it or choose another "
                    "--out to rerun."
                )
            per_seed[seed] = saved["result"]
            continue
        per_seed[seed] = run(seed)
        _io.write_json(path, {"settings": settings, "result": per_seed[seed]})
    return per_seed


def _refiner_summary(per_seed: dict[int, Any], seeds: Sequence[int], learner: str, k: int) -> dict[str, Any]:
    methods = ["learner", "oracle", *(f"refiner:{r}" for r in REFINER_RULES)]
    summary = {
        m: {split: _mean_std([per_seed[s][m][split] for s in seeds]) for split in ("val", "test")} for m in methods
    }
    # the rule is chosen on validation images; recovery is then read on the test images
    choice = max(REFINER_RULES, key=lambda r: summary[f"refiner:{r}"]["val"]["mean"])
    headroom = statistics.fmean(per_seed[s]["oracle"]["test"] - per_seed[s]["learner"]["test"] for s in seeds)
    recovery = {
        rule: statistics.fmean(per_seed[s][f"refiner:{rule}"]["test"] - per_seed[s]["learner"]["test"] for s in seeds)
        / headroom
        if headroom
        else 0.0
        for rule in REFINER_RULES
    }
    diagnostics = {
        rule: {
            key: _mean_std([per_seed[s]["diagnostics"][rule][key] for s in seeds])
            for key in per_seed[seeds[0]]["diagnostics"][rule]
        }
        for rule in REFINER_RULES
    }
    return {
        "learner": learner,
        "k": k,
        "summary": summary,
        "recovery": recovery,
        "choice": choice,
        "diagnostics": diagnostics,
        "seeds": {str(s): per_seed[s] for s in seeds},
    }


def _recovered(summary: dict, variants: Sequence[str], prefix: str, key: str) -> dict[str, float | None]:
    """Each variant's share of the oracle's gain over the learner in ``summary[...][key]`` (None: no headroom)."""
    plain = summary["learner"][key]["mean"]
    headroom = summary["oracle"][key]["mean"] - plain
    return {v: (summary[f"{prefix}:{v}"][key]["mean"] - plain) / headroom if headroom > 0 else None for v in variants}


def _diagnostics(per_seed: dict[int, Any], seeds: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean ± std over seeds of every variant's diagnostics."""
    return {
        variant: {key: _mean_std([per_seed[s]["diagnostics"][variant][key] for s in seeds]) for key in values}
        for variant, values in per_seed[seeds[0]]["diagnostics"].items()
    }


def _refiner_tpt_summary(per_seed: dict[int, Any], seeds: Sequence[int], learner: str) -> dict[str, Any]:
    methods = ["learner", "oracle", *(f"refiner:{r}" for r in TPT_RULES)]
    keys = list(per_seed[seeds[0]]["learner"])
    summary = {m: {key: _mean_std([per_seed[s][m][key] for s in seeds]) for key in keys} for m in methods}
    return {
        "learner": learner,
        "rule": TPT_RULE,
        "summary": summary,
        "recovery": _recovered(summary, list(TPT_RULES), "refiner", "avg"),
        "choice": max(TPT_RULES, key=lambda r: summary[f"refiner:{r}"]["val"]["mean"]),
        "diagnostics": _diagnostics(per_seed, seeds),
        "seeds": {str(s): per_seed[s] for s in seeds},
    }


def _counterfactual_summary(per_seed: dict[int, Any], seeds: Sequence[int], learner: str) -> dict[str, Any]:
    methods = ["learner", "oracle", *(f"counterfactual:{t}" for t in COUNTERFACTUAL_TWINS)]
    summary = {
        m: {
            f"{split}/{metric}": _mean_std([per_seed[s][m][split][metric] for s in seeds])
            for split in ("val", "test")
            for metric in ("avg", "worst_group")
        }
        for m in methods
    }
    return {
        "learner": learner,
        "summary": summary,
        "recovery": _recovered(summary, COUNTERFACTUAL_TWINS, "counterfactual", "test/worst_group"),
        "choice": max(COUNTERFACTUAL_TWINS, key=lambda t: summary[f"counterfactual:{t}"]["val/worst_group"]["mean"]),
        "diagnostics": _diagnostics(per_seed, seeds),
        "seeds": {str(s): per_seed[s] for s in seeds},
    }


def _icm_summary(per_seed: dict[int, Any], seeds: Sequence[int], preservation: dict[str, Any]) -> dict[str, Any]:
    from ..tasks import TARGET_STYLES

    methods = ["zero_shot", "icm", *ICM_ORACLES]
    keys = [*TARGET_STYLES, "avg"]
    summary = {m: {key: _mean_std([per_seed[s][m][key] for s in seeds]) for key in keys} for m in methods}
    plain = summary["zero_shot"]["avg"]["mean"]
    recovery = {}
    for oracle in ICM_ORACLES:
        headroom = summary[oracle]["avg"]["mean"] - plain
        recovery[oracle] = (summary["icm"]["avg"]["mean"] - plain) / headroom if headroom > 0 else None
    return {
        "summary": summary,
        "recovery": recovery,
        "preservation": preservation,
        "seeds": {str(s): per_seed[s] for s in seeds},
    }


def mechanisms_benchmark(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    suites: Sequence[str] = MECHANISMS,
    bench: BenchConfig | None = None,
    learner: str = "coop",
    k: int = 4,
    refiner: dict[str, Any] | None = None,
    counterfactual: dict[str, Any] | None = None,
    invariance: dict[str, Any] | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the mechanism suites over seeds and write ``mechanisms.json`` and ``mechanisms.md``.

    Every seed's result is saved under ``runs/`` and reused by a rerun with the same settings (a changed setting
    is refused: delete the file or pick another ``out_dir``).

    Args:
        backbone: the CLIP (the embedded mini-CLIP in the CLI).
        out_dir: output directory.
        seeds: few-shot draws and initialisations.
        suites: which of :data:`MECHANISMS` to run.
        bench: benchmark settings (learner schedules, pool and test sizes, ``k`` of the ICM suite's photo shots).
        learner / k: the refiner suite's prompt learner and its shots per class and style.
        refiner / counterfactual / invariance: config overrides of the add-ons (the refiner's ``targets`` and the
            counterfactual's ``twin`` are set per variant).
        progress: show progress bars.
        command: the command line, recorded in the outputs.

    Returns:
        ``{suite: {...}, "command", "wall_seconds", "backbone"}``.
    """
    from ...addons.invariance.config import InvarianceConfig

    for suite in suites:
        if suite not in MECHANISMS:
            from ...config import unknown_name_error

            raise unknown_name_error("mechanism suite", suite, MECHANISMS)
    started = time.time()
    out_dir = Path(out_dir)
    config = bench or BenchConfig()
    result: dict[str, Any] = {}
    if "refiner" in suites:
        runner = _Runner(backbone, config, out_dir)
        settings = {"learner": learner, "k": k, "refiner": refiner or {}, "bench": config.to_dict()}

        def run_refiner(seed: int) -> dict[str, Any]:
            return refiner_mechanism(runner, seed, learner=learner, k=k, refiner=refiner)

        per_seed = _seeded(out_dir, "refiner", seeds, settings, run_refiner, progress)
        result["refiner"] = _refiner_summary(per_seed, seeds, learner, k)
    if "refiner-tpt" in suites:
        runner = _Runner(backbone, config, out_dir)
        settings = {"learner": learner, "refiner": refiner or {}, "rules": TPT_RULES, "bench": config.to_dict()}

        def run_refiner_tpt(seed: int) -> dict[str, Any]:
            return refiner_tpt_mechanism(runner, seed, learner=learner, refiner=refiner)

        per_seed = _seeded(out_dir, "refiner-tpt", seeds, settings, run_refiner_tpt, progress)
        result["refiner-tpt"] = _refiner_tpt_summary(per_seed, seeds, learner)
    if "counterfactual" in suites:
        runner = _Runner(backbone, config, out_dir)
        settings = {"learner": learner, "counterfactual": counterfactual or {}, "bench": config.to_dict()}

        def run_counterfactual(seed: int) -> dict[str, Any]:
            return counterfactual_mechanism(runner, seed, learner=learner, counterfactual=counterfactual)

        per_seed = _seeded(out_dir, "counterfactual", seeds, settings, run_counterfactual, progress)
        result["counterfactual"] = _counterfactual_summary(per_seed, seeds, learner)
    if "invariance" in suites:
        from .calibration import intervention_preservation
        from .icm import _DGSetup

        icm_config = InvarianceConfig(**(invariance or {}))
        setup = _DGSetup(backbone, icm_config, out_dir, config.k, config.test_per_class)
        settings = {"invariance": icm_config.to_dict(), "k": config.k, "test_per_class": config.test_per_class}
        per_seed = _seeded(out_dir, "invariance", seeds, settings, lambda seed: icm_mechanism(setup, seed), progress)
        preservation = intervention_preservation(backbone, setup.tasks, icm_config.interventions)
        result["invariance"] = _icm_summary(per_seed, seeds, preservation)
        result["invariance"]["class_subspace_share"] = _nuisance_overlap(setup, seeds)
    result.update(command=command, wall_seconds=round(time.time() - started), backbone=backbone.name)
    _io.write_json(out_dir / "mechanisms.json", result)
    (out_dir / "mechanisms.md").write_text(format_mechanisms(result) + "\n")
    return result


def _cell(value: dict[str, float]) -> str:
    return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"


def _variant_table(part: dict[str, Any], share_header: str) -> list[str]:
    """Rows of ``part["summary"]`` (method -> metric -> mean ± std) with each variant's share of the oracle's gain."""
    keys = list(next(iter(part["summary"].values())))
    lines = ["| method | " + " | ".join(keys) + f" | {share_header} |", "|---" * (len(keys) + 2) + "|"]
    for method, row in part["summary"].items():
        variant = method.partition(":")[2]
        share = part["recovery"].get(variant) if variant else None
        cell = "" if not variant else ("no headroom" if share is None else f"{100 * share:.0f}%")
        lines.append(f"| {method} | " + " | ".join(_cell(row[k]) for k in keys) + f" | {cell} |")
    return lines


def _diagnostics_table(diagnostics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One row per diagnostic, one column per variant (blank where a variant has none)."""
    variants = list(diagnostics)
    lines = ["| diagnostic | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for key in sorted({k for d in diagnostics.values() for k in d}):
        cells = []
        for variant in variants:
            value = diagnostics[variant].get(key)
            cells.append("" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def format_mechanisms(result: dict[str, Any]) -> str:
    """Markdown tables of the mechanism suites: oracle / learner / learner + add-on (mean ± std over seeds), the
    recovered share of the oracle's gain, and the diagnostics."""
    lines = []
    if result.get("command"):
        lines += [f"Command: `{result['command']}`  ", f"Backbone: `{result.get('backbone', '')}`  "]
        lines += [f"Wall time: {result.get('wall_seconds', 0)} s", ""]
    if "refiner" in result:
        ref = result["refiner"]
        lines += [
            f"### Refiner: mixed styles ({ref['learner']}, {ref['k']} shots per class and style)",
            "",
            "| method | validation | test | recovered share of the oracle's test gain |",
            "|---|---|---|---|",
        ]
        for method, row in ref["summary"].items():
            rule = method.partition(":")[2]
            share = f"{100 * ref['recovery'][rule]:.0f}%" if rule else ""
            lines.append(f"| {method} | {_cell(row['val'])} | {_cell(row['test'])} | {share} |")
        lines += ["", f"Rule chosen on validation: `{ref['choice']}`.", ""]
        lines += _diagnostics_table(ref["diagnostics"])
    if "refiner-tpt" in result:
        tpt = result["refiner-tpt"]
        rule = ", ".join(f"{k}={v}" for k, v in tpt["rule"].items())
        lines += ["", f"### Refiner, label-free targets: domain generalisation ({tpt['learner']}; rule {rule})", ""]
        lines += _variant_table(tpt, "recovered share of the oracle's gain (avg)")
        lines += ["", f"Rule chosen on validation (unused training photos): `{tpt['choice']}`.", ""]
        lines += _diagnostics_table(tpt["diagnostics"])
    if "counterfactual" in result:
        cf = result["counterfactual"]
        lines += ["", f"### Counterfactual: spurious task ({cf['learner']}), average and worst group", ""]
        lines += _variant_table(cf, "recovered share of the oracle's worst-group gain")
        lines += ["", f"Twin design chosen on validation (worst group): `{cf['choice']}`."]
        for twin, values in cf["diagnostics"].items():
            lines += ["", f"Diagnostics of the {twin} twins (training images):", ""]
            lines += ["| diagnostic | value |", "|---|---|"]
            lines += [f"| {k} | {v['mean']:.3f} ± {v['std']:.3f} |" for k, v in values.items()]
    if "invariance" in result:
        icm = result["invariance"]
        keys = list(next(iter(icm["summary"].values())))
        lines += ["", "### Invariance (ICM): unseen styles, zero-shot with and without the projection", ""]
        lines += ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for method, row in icm["summary"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(row[k]) for k in keys) + " |")
        shares = ", ".join(
            f"{oracle}: {'no headroom' if share is None else f'{100 * share:.0f}%'}"
            for oracle, share in icm["recovery"].items()
        )
        lines += ["", f"Recovered share of each oracle's gain (unseen-style average): {shares}.", ""]
        lines += ["| intervention | zero-shot on intervened / clean training photos |", "|---|---|"]
        for name, value in icm["preservation"].items():
            lines.append(f"| {name} | {value['ratio']:.2f} |")
        overlap = icm.get("class_subspace_share")
        if overlap:
            note = f"random directions: {overlap['random']:.2f}; near 1, removing the nuisance removes the classes"
            lines += ["", f"Share of the true twins' feature change inside the class-mean span ({note}):", ""]
            lines += ["| twin factor | share |", "|---|---|"]
            lines += [f"| {f} | {v['mean']:.2f} ± {v['std']:.2f} |" for f, v in overlap["factors"].items()]
    return "\n".join(lines)


@register_suite(
    "mechanisms",
    outputs=("mechanisms.json", "mechanisms.md"),
    help="each add-on where its premise holds, against an oracle (LEARNER, default coop)",
    saves_runs=True,
)
def _mechanisms_suite(request: SuiteRequest) -> str:
    started = time.time()
    refiner = {k: v for k, v in request.refiner.items() if k != "targets"}  # the suite compares every target rule
    result = mechanisms_benchmark(
        request.load_backbone(),
        request.out,
        seeds=request.seeds,
        suites=MECHANISMS if request.mechanisms is None else request.mechanisms,
        bench=request.bench_config(seeds=request.seeds),
        learner=request.learner,
        refiner=refiner,
        counterfactual=request.addons.get("counterfactual", {}),
        invariance=request.addons.get("invariance", {}),
        progress=request.progress,
        command=request.command,
    )
    return f"{format_mechanisms(result)}\n" + request.wrote(["mechanisms.json", "mechanisms.md"], started)
