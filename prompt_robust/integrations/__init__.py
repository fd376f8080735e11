"""Optional integrations (import the submodule you need; the core never imports them):

* ``prompt_robust.integrations.trainer``: ``RobustCallback`` and ``robust_metrics`` for ``transformers.Trainer``.
"""
