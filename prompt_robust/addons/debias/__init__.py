"""Annotation-free debiasing of prompt tuning ("Debiased Prompt Tuning in Vision-Language Model without
Annotations", https://arxiv.org/abs/2503.08368) and the group-robustness baselines it is compared with.

* :class:`DebiasReweighting`: the ``"debias"`` add-on (``RobustConfig(debias=DebiasConfig(...))``); modes
  ``pseudo`` (DPT), ``oracle``, ``groupdro`` and ``jtt``;
* :func:`pseudo_attribute_labels`, :func:`attribute_text_features`, :func:`classify_attributes`: zero-shot
  pseudo-labels of the spurious attribute from images and words;
* :func:`jtt_error_set`: JTT's identification stage; :func:`with_index`: items that carry their position;
* :func:`group_robustness`, :func:`pseudo_label_accuracy`: metrics;
* :mod:`prompt_robust.addons.debias.weights`: the weight formulas as pure functions.

See ``docs/debias.md``.
"""

from ._data import INDEX_KEY, IndexedDataset, with_index
from .addon import DebiasReweighting
from .config import DebiasConfig
from .jtt import jtt_error_set
from .metrics import group_robustness
from .weights import balanced_group_weights, dpt_group_weights, ema_update, groupdro_update

__all__ = [
    "INDEX_KEY",
    "DebiasConfig",
    "DebiasReweighting",
    "IndexedDataset",
    "balanced_group_weights",
    "dpt_group_weights",
    "ema_update",
    "group_robustness",
    "groupdro_update",
    "jtt_error_set",
    "with_index",
]
