"""Dataclass configuration shared by learners, add-ons and the CLI.

Every config is a ``@dataclass`` whose fields are declared with :func:`help_field`: the help text and the values a
field allows (bounds, choices) live beside the field, and :meth:`ConfigMixin.__post_init__` checks them all; a
config overrides ``__post_init__`` only for rules between fields. ``to_dict``/``from_dict`` round-trip through JSON
and reject unknown keys by name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from dataclasses import field, fields
from typing import Any, ClassVar, TypeVar, Union

__all__ = [
    "CONSTRAINTS",
    "ConfigMixin",
    "RobustConfig",
    "field_allowed",
    "field_default",
    "field_help_text",
    "help_field",
]

T = TypeVar("T", bound="ConfigMixin")


#: the constraint keywords of :func:`help_field`, stored in the field's metadata beside ``"help"``
CONSTRAINTS = ("ge", "gt", "le", "lt", "choices", "kind", "min_len", "unique", "placeholder", "unbounded", "hint")


def help_field(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | str | None = None,
    kind: str | None = None,
    min_len: int | None = None,
    unique: bool = False,
    placeholder: str | None = None,
    unbounded: bool = False,
    hint: str = "",
    **kwargs: Any,
) -> Any:
    """A dataclass field with a help text (used by the docs and the CLI) and the values it allows.

    The constraints live in the field's metadata and :meth:`ConfigMixin.__post_init__` checks them, after the
    type the annotation gives (``int``: an integer, not a bool; ``float``: a finite number; ``x | None``: also
    None, which skips the constraints). On a list field they apply to every entry.

    Args:
        default: the default value (a list, dict or set default is copied for every instance).
        help: what the field does, for the docs and ``--help``.
        ge: the smallest allowed number (``>=``); ``gt``: numbers must be greater (``>``).
        le: the largest allowed number (``<=``); ``lt``: numbers must be smaller (``<``).
        choices: the allowed strings: a tuple, or the name of a ClassVar tuple of the config class.
        kind: what an unknown choice is called in the error (``unknown ODE method 'rk5'``); default: the field name.
        min_len: fewest entries of a list (characters of a string).
        unique: the entries of a list must be distinct.
        placeholder: the strings are templates with exactly one ``'{}'``, which stands for this (``"the class
            name"``).
        unbounded: a number field that takes any value on purpose (every number field declares bounds or this).
        hint: a sentence added to the field's errors (e.g. the value the paper uses).
        kwargs: passed to :func:`dataclasses.field`.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Sampler(ConfigMixin):
        ...     steps: int = help_field(5, "ODE steps.", ge=1)
        ...     method: str = help_field("euler", "Solver.", choices=("euler", "rk4"), kind="ODE method")
        >>> Sampler(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: Sampler.steps must be an integer >= 1; got 0. Fix the value, or leave the field out to use its default (5).
        >>> Sampler(method="rk5")
        Traceback (most recent call last):
        ...
        ValueError: Sampler.method: unknown ODE method 'rk5'; valid: euler, rk4. Did you mean 'rk4'?
    """
    given = {
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "choices": choices,
        "kind": kind,
        "min_len": min_len,
        "unique": unique or None,
        "placeholder": placeholder,
        "unbounded": unbounded or None,
        "hint": hint or None,
    }
    if (ge is not None and gt is not None) or (le is not None and lt is not None):
        raise TypeError("help_field takes one lower bound (ge or gt) and one upper bound (le or lt).")
    metadata = {"help": help, **{key: value for key, value in given.items() if value is not None}}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def unknown_name_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    """A ValueError for an unknown name that lists the valid ones and suggests the closest."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}.{hint}")


class ConfigMixin:
    """Validation of the constraints declared with :func:`help_field` and JSON round trip for config dataclasses
    (nested configs included)."""

    #: nested config fields -> their classes, for from_dict
    nested: ClassVar[dict[str, type]] = {}

    def __post_init__(self) -> None:
        """Check every field against its annotation and the constraints of its :func:`help_field`. A config with
        rules between fields overrides this, calls ``super().__post_init__()`` first, then checks only those rules.
        """
        cls = type(self)
        hints = _field_types(cls)
        for f in fields(self):
            _check_field(cls, f, hints.get(f.name, Any), getattr(self, f.name))

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
            ValueError: RefinerConfig.num_steps must be an integer >= 1; got '5' (str). The paper's sampler uses 5. Fix the value, or leave the field out to use its default (5).
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
        by_name = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            hint = hints.get(key, Any)
            if not _matches_type(value, hint):
                raise _type_error(cls, by_name[key], hint, value)
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
        args = typing.get_args(hint)
        values = _describe_type(args[1]).split(" ", 1)[-1] if args and args[1] is not Any else ""
        return "a JSON object" + (f" of {values}s" if values else "")
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


# ---------------------------------------------------------------------------------------------------------------
# the constraints of help_field: checks, error messages and their text for the docs and the CLI


def _choices(cls: type, f: dataclasses.Field) -> tuple[str, ...] | None:
    """The field's allowed strings (a ClassVar named by ``choices=`` is looked up on the class)."""
    choices = f.metadata.get("choices")
    if isinstance(choices, str):
        resolved = getattr(cls, choices, None)
        if not isinstance(resolved, (tuple, list, frozenset, set)):
            raise TypeError(f"{cls.__name__}.{f.name}: choices={choices!r} names no tuple attribute of the class.")
        return tuple(resolved)
    return None if choices is None else tuple(choices)


def _bounds(meta: typing.Mapping[str, Any]) -> str:
    """``">= 1"``, ``"< 1"`` or ``"in (0, 1]"``: the declared bounds of a number ("" when none)."""
    low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = (meta["le"], "]") if "le" in meta else (meta["lt"], ")") if "lt" in meta else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[1] == ']' else '<'} {high[0]}"
    return ""


def _in_bounds(meta: typing.Mapping[str, Any], x: float) -> bool:
    return not (
        ("ge" in meta and x < meta["ge"])
        or ("gt" in meta and x <= meta["gt"])
        or ("le" in meta and x > meta["le"])
        or ("lt" in meta and x >= meta["lt"])
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _scalar(hint: Any) -> Any:
    """``int | None`` -> ``int``, ``list[float]`` -> ``float``: the one type a value or list entry has (else None)."""
    if typing.get_origin(hint) is list:
        hint = (typing.get_args(hint) or (Any,))[0]
    args = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (Union, types.UnionType)
        else [hint]
    )
    return args[0] if len(args) == 1 else None


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)


def _entries(min_len: int, noun: str) -> str:
    return f"at least one {noun}" if min_len == 1 else f"at least {min_len} {noun}s"


def field_default(cls: type, name: str) -> Any:
    """The declared default of config field ``name``: functions that take a component's settings as keyword
    arguments default to it, so each component has one source of defaults (its config).

    Example:
        >>> from prompt_robust import RefinerConfig
        >>> field_default(RefinerConfig, "num_steps")
        5
    """
    declared = {f.name: f for f in fields(cls)}
    if name not in declared:
        raise AttributeError(f"{cls.__name__} has no field {name!r}.")
    f = declared[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_allowed(cls: type, f: dataclasses.Field) -> str:
    """What the constraints of field ``f`` of config ``cls`` allow, in words ("" when it declares none).

    Example:
        >>> from prompt_robust import RefinerConfig
        >>> [field_allowed(RefinerConfig, f) for f in fields(RefinerConfig)][:3]
        ['>= 1', 'one of euler, midpoint, rk4', '>= 1']
    """
    meta = f.metadata
    hint = _field_types(cls).get(f.name, Any)
    is_list = typing.get_origin(hint) is list or hint is list
    parts = []
    if "min_len" in meta:
        parts.append(_entries(meta["min_len"], "entry") if is_list else "non-empty")
    each = []
    if _bounds(meta):
        each.append(_bounds(meta))
    choices = _choices(cls, f)
    if choices is not None:
        each.append("one of " + ", ".join(choices))
    if "placeholder" in meta:
        each.append(f"with exactly one '{{}}' (for {meta['placeholder']})")
    parts += [("each " if is_list else "") + text for text in each]
    if meta.get("unique"):
        parts.append("distinct")
    if meta.get("unbounded") and not parts:
        parts.append("any")
    return "; ".join(parts)


def field_help_text(cls: type, f: dataclasses.Field) -> str:
    """The field's help text followed by what it allows (for ``--help``)."""
    allowed = field_allowed(cls, f)
    text = f.metadata.get("help", "")
    return f"{text} Allowed: {allowed}." if allowed and allowed != "any" else text


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f" Fix the value, or leave the field out to use its default ({_short_repr(f.default)})."
    if f.default_factory is not dataclasses.MISSING:
        return f" Fix the value, or leave the field out to use its default ({_short_repr(f.default_factory())})."
    return " Fix the value."


def _field_error(f: dataclasses.Field, message: str) -> ValueError:
    """``message`` (which names the field and what it got), the field's hint and how to fix it."""
    hint = f.metadata.get("hint")
    return ValueError(message + (f" {hint}" if hint else "") + _default_text(f))


def _type_error(cls: type, f: dataclasses.Field, hint: Any, value: Any) -> ValueError:
    """The error of a value that does not have the field's type: names the field, the type and its bounds."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    optional = type(None) in args
    args = [a for a in args if a is not type(None)]
    wanted = " or ".join(_describe_type(a) for a in args) or "None"
    if len(args) == 1 and args[0] in (int, float):
        bounds = _bounds(f.metadata)
        wanted = ("an integer" if args[0] is int else "a finite number") + (f" {bounds}" if bounds else "")
    choices = _choices(cls, f)
    if choices is not None and args == [str]:
        wanted += ", one of " + ", ".join(choices)
    wanted += " or None" if optional else ""
    return _field_error(
        f,
        f"{cls.__name__}.{f.name} must be {wanted}; got {_short_repr(value)} ({type(value).__name__}).",
    )


def _check_field(cls: type, f: dataclasses.Field, hint: Any, value: Any) -> None:
    """Raise a ValueError when ``value`` does not have field ``f``'s type or breaks a constraint it declares."""
    meta = f.metadata
    where = f"{cls.__name__}.{f.name}"
    if not _matches_type(value, hint):
        raise _type_error(cls, f, hint, value)
    if value is None:
        return
    is_list = isinstance(value, (list, tuple))
    items = list(value) if is_list else [value]
    if "min_len" in meta and isinstance(value, (str, list, tuple)) and len(value) < meta["min_len"]:
        if is_list:
            what = _entries(meta["min_len"], "value" if _scalar(hint) in (int, float) else "entry")
            raise _field_error(f, f"{where} must hold {what}{_each(cls, f)}; got {_short_repr(value)}.")
        raise _field_error(f, f"{where} must be a non-empty string; got {value!r}.")
    choices = _choices(cls, f)
    for i, item in enumerate(items):
        if _is_number(item):
            bounds = _bounds(meta)
            if not math.isfinite(item):
                label = f"{where}[{i}]" if is_list else where
                raise _field_error(f, f"{label} must be a finite number{' ' + bounds if bounds else ''}; got {item!r}.")
            if not _in_bounds(meta, item):
                if is_list:
                    what = (
                        f"{_entries(meta['min_len'], 'value')}{_each(cls, f)} and no other"
                        if "min_len" in meta
                        else (f"only values{_each(cls, f)}")
                    )
                    raise _field_error(
                        f, f"{where} must hold {what}; got {_short_repr(value)} (entry {i} is {item!r})."
                    )
                wanted = (
                    ("an integer " if _scalar(hint) is int else "") + bounds + (" or None" if _optional(hint) else "")
                )
                raise _field_error(f, f"{where} must be {wanted}; got {item!r}.")
        if choices is not None and isinstance(item, str) and item not in choices:
            raise ValueError(f"{where}: {unknown_name_error(meta.get('kind', f.name), item, choices)}")
        if "placeholder" in meta and isinstance(item, str) and not _one_placeholder(item):
            raise _field_error(
                f,
                f"{where}: template {item!r} must contain exactly one '{{}}' placeholder for {meta['placeholder']} "
                "(and no other braces), e.g. 'a photo of a {}.'.",
            )
    if meta.get("unique") and is_list:
        repeated = sorted({str(v) for v in items if items.count(v) > 1})
        if repeated:
            raise _field_error(f, f"{where} must be distinct; repeated: {repeated}.")


def _each(cls: type, f: dataclasses.Field) -> str:
    """`` in (0, 1]`` / `` from a, b``: what every entry of a list field must be ("" when nothing)."""
    choices = _choices(cls, f)
    if _bounds(f.metadata):
        return " " + _bounds(f.metadata)
    return f" from {', '.join(choices)}" if choices is not None else ""


def _one_placeholder(template: str) -> bool:
    """Whether ``template`` has exactly one ``{}`` and formats with one value (no other braces)."""
    if template.count("{}") != 1:
        return False
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return True


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
