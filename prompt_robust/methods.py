"""Method names as the benchmark, ``reproduce`` and the CLI write them: ``learner[+add-on[:mode]]...``.

Example:
    >>> parse_method("maple+debias:oracle")
    ('maple', ['debias:oracle'])
    >>> addon_config("debias", "oracle", {}).mode
    'oracle'
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import RobustConfig, unknown_name_error
from .learners import LEARNERS

__all__ = ["addon_config", "parse_method"]


def parse_method(method: str) -> tuple[str, list[str]]:
    """``"maple+debias"`` -> ``("maple", ["debias"])``, with names checked. An add-on may name a variant of its
    config's ``mode`` after a colon: ``"coop+debias:oracle"``.

    Raises:
        ValueError: an unknown learner or add-on (the closest name suggested), or a ``:mode`` for an add-on
            without modes.
    """
    learner, *addons = [part.strip() for part in method.split("+")]
    if learner not in LEARNERS:
        raise unknown_name_error("learner", learner, list(LEARNERS))
    configs = RobustConfig.addon_configs()
    for addon in addons:
        name, _, mode = addon.partition(":")
        if name not in configs:
            raise unknown_name_error("add-on", name, list(configs))
        if mode and "mode" not in {f.name for f in dataclasses.fields(configs[name])}:
            raise ValueError(f"add-on {name!r} has no modes; write {learner}+{name} without ':{mode}'.")
    return learner, addons


def addon_config(name: str, mode: str, settings: dict[str, Any]) -> Any:
    """The config of add-on ``name`` from ``settings`` (its fields), with ``mode`` (from ``name:mode``) if given."""
    return RobustConfig.addon_configs()[name](**{**settings, **({"mode": mode} if mode else {})})
