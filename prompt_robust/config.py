"""Dataclass configuration shared by learners, add-ons and the CLI.

Every config is a ``@dataclass`` whose fields carry ``metadata={"help": ...}`` and whose ``__post_init__``
validates values; ``to_dict``/``from_dict`` round-trip through JSON and reject unknown keys by name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import numbers
import types
import typing
from dataclasses import field, fields
from typing import Any, ClassVar, TypeVar, Union

__all__ = ["ConfigMixin", "RobustConfig", "help_field"]

T = TypeVar("T", bound="ConfigMixin")


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field with a help text (used by the docs and the CLI)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def unknown_name_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    """A ValueError for an unknown name that lists the valid ones and suggests the closest."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}.{hint}")


class ConfigMixin:
    """JSON round trip for config dataclasses (nested configs included)."""

    #: nested config fields -> their classes, for from_dict
    nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigMixin) else value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build the config from a dict (e.g. parsed JSON): unknown keys and values of the wrong type (``"abc"``
        for an int field) raise a ValueError naming the field; the dataclass then validates the values.

        Example:
            >>> from prompt_robust import RefinerConfig
            >>> RefinerConfig.from_dict({"num_steps": "5"})
            Traceback (most recent call last):
            ...
            ValueError: RefinerConfig.num_steps must be an integer; got '5' (str). Fix the value, or leave the field out to use its default.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict; got {type(data).__name__}.")
        names = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(names)}. "
                "The file may come from a newer prompt_robust version."
            )
        hints = _field_types(cls)
        kwargs = {}
        for key, value in data.items():
            hint = hints.get(key, Any)
            if not _matches_type(value, hint):
                raise ValueError(
                    f"{cls.__name__}.{key} must be {_describe_type(hint)}; got {_short_repr(value)} "
                    f"({type(value).__name__}). Fix the value, or leave the field out to use its default."
                )
            sub = cls.nested.get(key)
            kwargs[key] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (``{}`` when they cannot be resolved: nothing is checked)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something unimportable: leave the checks to __post_init__
        return {}


def _matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from JSON or keyword arguments) has the type a field is annotated with.

    Lenient where Python callers are: an int is a float, a tuple a list, numpy scalars are numbers; annotations
    this check does not know are accepted (their ``__post_init__`` validates them).
    """
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union or origin is types.UnionType:
        return any(_matches_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_matches_type(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and (
            not args or all(_matches_type(k, args[0]) and _matches_type(v, args[1]) for k, v in value.items())
        )
    if isinstance(hint, type) and issubclass(hint, ConfigMixin):
        return isinstance(value, (hint, dict))
    return True


def _describe_type(hint: Any) -> str:
    """``int | None`` -> ``"an integer or null"``: the JSON a field accepts, for error messages."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe_type(arg) for arg in typing.get_args(hint))
    if hint is list or origin is list:
        args = typing.get_args(hint)
        return "a list" + (f" of {_describe_type(args[0]).split(' ', 1)[-1]}s" if args and args[0] is not Any else "")
    if hint is dict or origin is dict:
        return "a JSON object"
    if isinstance(hint, type) and issubclass(hint, ConfigMixin):
        return f"a JSON object (of {hint.__name__} fields)"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}.")


class RobustConfig:
    """Which robustness add-ons ``wrap()`` attaches to a learner: one keyword per registered add-on (None: off).

    The keywords are the names of the registered add-ons (:func:`prompt_robust.addons.register_addon`): the
    built-in ``refiner``, ``counterfactual``, ``invariance`` and ``debias``, and any add-on registered by your own
    code, whose config class the registration supplies. Unset add-ons read as None.

    Example:
        >>> RobustConfig()  # no add-on: the wrapped model behaves exactly like the learner
        RobustConfig(refiner=None, counterfactual=None, invariance=None, debias=None)
        >>> from prompt_robust import RefinerConfig
        >>> RobustConfig(refiner=RefinerConfig(num_steps=5)).enabled()
        ['refiner']
    """

    def __init__(self, **addons: Any) -> None:
        object.__setattr__(self, "_addons", {})
        for name, value in addons.items():
            setattr(self, name, value)

    @staticmethod
    def addon_configs() -> dict[str, type]:
        """``{add-on name: its config class}`` of every registered add-on, in the order the model runs them."""
        from .addons import addon_configs

        return addon_configs()

    def __setattr__(self, name: str, value: Any) -> None:
        known = self.addon_configs()
        if name not in known:
            if isinstance(value, ConfigMixin):  # an add-on's config under a name nothing registered: a typo
                raise unknown_name_error("add-on", name, list(known))
            # other attributes stay possible, as on a dataclass: integrations set their own (Trainer: use_cache)
            object.__setattr__(self, name, value)
            return
        if value is not None and not isinstance(value, known[name]):
            raise TypeError(
                f"RobustConfig.{name} must be a {known[name].__name__} or None; got {type(value).__name__}."
            )
        if value is None:
            self._addons.pop(name, None)
        else:
            self._addons[name] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        known = self.addon_configs()
        if name in known:
            return self._addons.get(name)
        raise AttributeError(f"RobustConfig has no add-on {name!r}; registered add-ons: {', '.join(known)}.")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RobustConfig) and self._addons == other._addons

    __hash__ = None  # mutable, like the dataclass configs

    def __repr__(self) -> str:
        return "RobustConfig(" + ", ".join(f"{n}={self._addons.get(n)!r}" for n in self.addon_configs()) + ")"

    def enabled(self) -> list[str]:
        """Names of the add-ons that are switched on, in the order the model runs them."""
        return [name for name in self.addon_configs() if name in self._addons]

    def to_dict(self) -> dict[str, Any]:
        """``{name: config dict or None}`` of every registered add-on (JSON-ready)."""
        return {n: (self._addons[n].to_dict() if n in self._addons else None) for n in self.addon_configs()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RobustConfig:
        """Build it from :meth:`to_dict`'s output. A key naming an add-on that is not registered in this process
        is refused when it is enabled (import the module that registers it first) and skipped when it is None.

        Example:
            >>> RobustConfig.from_dict({"refiner": {"num_steps": 3}, "debias": None}).enabled()
            ['refiner']
        """
        if not isinstance(data, dict):
            raise TypeError(f"RobustConfig.from_dict expects a dict; got {type(data).__name__}.")
        known = cls.addon_configs()
        addons = {}
        for name, value in data.items():
            if name not in known:
                if value is None:
                    continue
                raise ValueError(
                    f"the config enables add-on {name!r}, which is not registered in this process (registered: "
                    f"{', '.join(known)}). Import the module that registers it (register_addon) before loading."
                )
            if value is not None and not isinstance(value, dict):
                raise ValueError(
                    f"RobustConfig.{name} must be a JSON object of {known[name].__name__} fields or null; got "
                    f"{_short_repr(value)} ({type(value).__name__})."
                )
            addons[name] = None if value is None else known[name].from_dict(value)
        return cls(**addons)
