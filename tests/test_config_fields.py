"""Constraints declared beside each config field (``help_field(..., ge=, gt=, le=, lt=, choices=, ...)``).

One generic ``ConfigMixin.__post_init__`` checks the type the annotation gives and the declared constraints; a
config's own ``__post_init__`` holds only rules between fields. These tests check each constraint kind on a toy
config (rejected with a message naming ``Class.field``, boundary values accepted), the same checks through
``from_dict``, and that every number field of every registered config declares its bounds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from prompt_robust.addons.base import addon_configs
from prompt_robust.config import CONSTRAINTS, ConfigMixin, field_allowed, field_help_text, help_field
from prompt_robust.learners import LEARNERS
from prompt_robust.training import FitConfig


@dataclass
class Toy(ConfigMixin):
    """A config with one field per constraint kind."""

    count: int = help_field(1, "An integer >= 1.", ge=1)
    rate: float = help_field(0.5, "A number in (0, 1].", gt=0, le=1)
    share: float = help_field(0.0, "A number in [0, 1).", ge=0, lt=1)
    limit: int | None = help_field(None, "An integer >= 0, or None.", ge=0)
    method: str = help_field("euler", "A solver.", choices=("euler", "midpoint"), kind="ODE method")
    mode: str = help_field("a", "A mode from a ClassVar.", choices="MODES")
    grid: list[float] = help_field([0.5], "Values in (0, 1].", gt=0, le=1, min_len=1)
    names: list[str] = help_field(["x"], "Distinct names from NAMES.", choices="NAMES", min_len=1, unique=True)
    key: str = help_field("k", "A non-empty string.", min_len=1)
    template: str = help_field("a {}.", "A template.", placeholder="the class name")
    seed: int = help_field(0, "Any integer.", unbounded=True)
    weight: float = help_field(1.0, "A weight.", ge=0, hint="The paper uses 1.")

    MODES: ClassVar[tuple[str, ...]] = ("a", "b")
    NAMES: ClassVar[tuple[str, ...]] = ("x", "y", "z")


BAD = [
    ({"count": 0}, r"Toy\.count must be an integer >= 1; got 0\. .*default \(1\)"),
    ({"count": True}, r"Toy\.count must be an integer >= 1; got True \(bool\)"),
    ({"count": 1.0}, r"Toy\.count must be an integer >= 1; got 1\.0 \(float\)"),
    ({"rate": 0.0}, r"Toy\.rate must be in \(0, 1\]; got 0\.0"),
    ({"rate": 1.5}, r"Toy\.rate must be in \(0, 1\]; got 1\.5"),
    ({"rate": math.nan}, r"Toy\.rate must be a finite number in \(0, 1\]; got nan"),
    ({"share": 1.0}, r"Toy\.share must be in \[0, 1\); got 1\.0"),
    ({"share": -0.1}, r"Toy\.share must be in \[0, 1\); got -0\.1"),
    ({"limit": -1}, r"Toy\.limit must be an integer >= 0 or None; got -1"),
    ({"limit": "3"}, r"Toy\.limit must be an integer >= 0 or None; got '3' \(str\)"),
    ({"method": "rk4"}, r"Toy\.method: unknown ODE method 'rk4'; valid: euler, midpoint\."),
    ({"method": "eulr"}, r"Toy\.method: unknown ODE method 'eulr'.*Did you mean 'euler'\?"),
    ({"mode": "c"}, r"Toy\.mode: unknown mode 'c'; valid: a, b\."),
    ({"grid": []}, r"Toy\.grid must hold at least one value in \(0, 1\]; got \[\]"),
    ({"grid": [0.5, 0.0]}, r"Toy\.grid must hold at least one value in \(0, 1\] and no other; .*entry 1 is 0\.0"),
    ({"grid": [0.5, math.inf]}, r"Toy\.grid\[1\] must be a finite number in \(0, 1\]; got inf"),
    ({"grid": ["a"]}, r"Toy\.grid must be a list of numbers; got \['a'\]"),
    ({"names": []}, r"Toy\.names must hold at least one entry from x, y, z; got \[\]"),
    ({"names": ["x", "w"]}, r"Toy\.names: unknown names 'w'; valid: x, y, z\."),
    ({"names": ["x", "x"]}, r"Toy\.names must be distinct; repeated: \['x'\]"),
    ({"key": ""}, r"Toy\.key must be a non-empty string; got ''"),
    ({"template": "a photo"}, r"Toy\.template: template 'a photo' must contain exactly one '\{\}' placeholder"),
    ({"template": "a {} {}"}, r"exactly one '\{\}' placeholder for the class name"),
    ({"template": "a {x} {}"}, r"exactly one '\{\}' placeholder"),
    ({"seed": 1.5}, r"Toy\.seed must be an integer; got 1\.5"),
    ({"weight": -1.0}, r"Toy\.weight must be >= 0; got -1\.0\. The paper uses 1\. Fix the value"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[json.dumps(k) for k, _ in BAD])
def test_each_constraint_kind_rejects_a_bad_value_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Toy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 1},
        {"rate": 1.0},
        {"rate": 1e-12},
        {"share": 0.0},
        {"share": 0.999},
        {"limit": 0},
        {"limit": None},
        {"method": "midpoint"},
        {"mode": "b"},
        {"grid": [1.0, 1e-9]},
        {"names": ["z", "y", "x"]},
        {"names": ("y",)},  # a tuple is a list for Python callers
        {"key": "g"},
        {"template": "{}"},
        {"seed": -(2**40)},
        {"weight": 0},  # an int is a number
    ],
    ids=json.dumps,
)
def test_boundary_values_are_accepted(kwargs):
    config = Toy(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


JSON_CASES = [
    '{"count": 0}',
    '{"count": "5"}',
    '{"rate": 1.5}',
    '{"rate": NaN}',
    '{"share": 1}',
    '{"limit": -1}',
    '{"method": "eulr"}',
    '{"grid": [0.5, 0]}',
    '{"names": ["x", "x"]}',
    '{"template": "no placeholder"}',
]


@pytest.mark.parametrize("text", JSON_CASES)
def test_from_dict_with_a_json_value_out_of_bounds_fails_the_same_way(text):
    data = json.loads(text)
    with pytest.raises(ValueError, match=rf"Toy\.{next(iter(data))}") as from_json:
        Toy.from_dict(data)
    with pytest.raises(ValueError) as direct:
        Toy(**data)
    assert str(from_json.value) == str(direct.value)


def test_from_dict_of_a_real_config_out_of_bounds():
    from prompt_robust import RefinerConfig

    with pytest.raises(ValueError, match=r"RefinerConfig\.entropy_keep must be in \(0, 1\]; got 1\.5") as info:
        RefinerConfig.from_dict(json.loads('{"entropy_keep": 1.5}'))
    assert "leave the field out to use its default (0.1)" in str(info.value)
    with pytest.raises(ValueError, match=r"FitConfig\.momentum must be in \[0, 1\); got 1"):
        FitConfig.from_dict(json.loads('{"momentum": 1}'))


def test_help_field_takes_one_bound_per_side():
    with pytest.raises(TypeError, match="one lower bound"):
        help_field(1, "x", ge=0, gt=0)
    with pytest.raises(TypeError, match="one upper bound"):
        help_field(1, "x", le=1, lt=1)


def test_allowed_values_in_words_for_the_docs_and_the_cli():
    allowed = {f.name: field_allowed(Toy, f) for f in dataclasses.fields(Toy)}
    assert allowed == {
        "count": ">= 1",
        "rate": "in (0, 1]",
        "share": "in [0, 1)",
        "limit": ">= 0",
        "method": "one of euler, midpoint",
        "mode": "one of a, b",
        "grid": "at least one entry; each in (0, 1]",
        "names": "at least one entry; each one of x, y, z; distinct",
        "key": "non-empty",
        "template": "with exactly one '{}' (for the class name)",
        "seed": "any",
        "weight": ">= 0",
    }
    count = next(f for f in dataclasses.fields(Toy) if f.name == "count")
    assert field_help_text(Toy, count) == "An integer >= 1. Allowed: >= 1."


def test_cli_help_shows_the_allowed_values():
    from prompt_robust._docgen import _subcommands
    from prompt_robust.cli import build_parser

    helps = {
        option: action.help
        for _, sub in _subcommands(build_parser())
        for action in sub._actions
        for option in action.option_strings
    }
    assert "Allowed: >= 1." in helps["--refiner-num-steps"]
    assert "Allowed: one of euler, midpoint, rk4." in helps["--refiner-method"]


# ---------------------------------------------------------------------------------------------------------------
# every registered config
# ---------------------------------------------------------------------------------------------------------------
def _registered_configs() -> list[type]:
    configs = [*addon_configs().values(), *(cls.config_class for cls in LEARNERS.values()), FitConfig]
    return list(dict.fromkeys(configs))


CONFIGS = _registered_configs()

#: fields a config needs beyond its defaults (DebiasConfig's default mode needs attribute values)
REQUIRED = {"DebiasConfig": {"attribute_values": ["land background", "water background"]}}


def _build(cls: type, **kwargs: Any) -> Any:
    return cls(**{**REQUIRED.get(cls.__name__, {}), **kwargs})


def _number_type(hint: Any) -> type | None:
    """``int``/``float`` when a field holds numbers (``x | None`` and ``list[x]`` included), else None."""
    if typing.get_origin(hint) is list:
        hint = (typing.get_args(hint) or (Any,))[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _numeric_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, kind) for f in dataclasses.fields(cls) if (kind := _number_type(hints[f.name])) is not None]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_number_field_declares_bounds_or_is_documented_as_unbounded(cls):
    missing = [
        f.name
        for f, _ in _numeric_fields(cls)
        if not any(key in f.metadata for key in ("ge", "gt", "le", "lt", "unbounded"))
    ]
    assert not missing, (
        f"{cls.__name__}: number fields without bounds (declare ge/gt/le/lt or unbounded=True): {missing}"
    )


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_satisfy_the_declared_constraints_and_every_choices_name_resolves(cls):
    _build(cls)  # the defaults pass the generic check and the cross-field rules
    for f in dataclasses.fields(cls):
        assert set(f.metadata) <= {"help", *CONSTRAINTS}, f"{cls.__name__}.{f.name}: unknown metadata keys"
        field_allowed(cls, f)  # a choices= name that names no ClassVar raises TypeError


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_a_redeclared_field_keeps_the_constraints_of_its_base(cls):
    """A subclass that changes a field's default (CoCoOpConfig.n_ctx) must not drop its constraints."""
    for base in cls.__mro__[1:]:
        if not dataclasses.is_dataclass(base):
            continue
        inherited = {f.name: f for f in dataclasses.fields(base)}
        for f in dataclasses.fields(cls):
            if f.name in inherited:
                mine = {k: v for k, v in f.metadata.items() if k != "help"}
                theirs = {k: v for k, v in inherited[f.name].metadata.items() if k != "help"}
                assert mine == theirs, f"{cls.__name__}.{f.name} redeclares {base.__name__}'s field without its bounds"


#: other fields a boundary value needs to pass the rules between fields
COMPANIONS = {
    ("RefinerConfig", "train_steps"): {"joint_steps": 1},
    ("RefinerConfig", "hidden_dim"): {"heads": 1},
    ("CounterfactualConfig", "cond_dropout"): {"guidance_scale": 1.0, "negative_guidance": 0.0},
    ("CounterfactualConfig", "proximity_weight"): {"proximity_search": 0},
    ("CounterfactualConfig", "proximity_max"): {"proximity_search": 0},
}


def _bound_cases() -> list[tuple[type, dataclasses.Field, type, str]]:
    return [
        (cls, f, kind, key)
        for cls in CONFIGS
        for f, kind in _numeric_fields(cls)
        for key in ("ge", "gt", "le", "lt")
        if key in f.metadata
    ]


BOUND_CASES = _bound_cases()


def _value(cls: type, f: dataclasses.Field, value: Any) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    return [value] if typing.get_origin(hint) is list else value


@pytest.mark.parametrize(
    ("cls", "f", "kind", "key"), BOUND_CASES, ids=[f"{c.__name__}.{f.name}.{k}" for c, f, _, k in BOUND_CASES]
)
def test_every_declared_bound_rejects_the_value_beyond_it_and_accepts_the_one_at_it(cls, f, kind, key):
    bound = f.metadata[key]
    step = 1 if kind is int else 1e-6
    outside = {"ge": bound - step, "gt": bound, "le": bound + step, "lt": bound}[key]
    inside = {"ge": bound, "gt": bound + step, "le": bound, "lt": bound - step}[key]
    companions = COMPANIONS.get((cls.__name__, f.name), {})
    if f.name == "n_ctx":
        companions = {"ctx_init": "a photo of a"}  # n_ctx=0 is allowed when the context starts from words
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{f.name}(\[0\])? must"):
        _build(cls, **{f.name: _value(cls, f, outside), **companions})
    config = _build(cls, **{f.name: _value(cls, f, inside), **companions})
    assert getattr(config, f.name) == _value(cls, f, inside)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_non_finite_numbers_are_refused(cls):
    for f, kind in _numeric_fields(cls):
        if kind is not float:
            continue
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{f.name}(\[0\])? must be a finite number"):
                _build(cls, **{f.name: _value(cls, f, bad)})


def test_choices_errors_keep_their_suggestions():
    from prompt_robust import CounterfactualConfig, DebiasConfig, InvarianceConfig, RefinerConfig

    with pytest.raises(ValueError, match=r"RefinerConfig\.method: unknown ODE method 'rk5'.*Did you mean 'rk4'\?"):
        RefinerConfig(method="rk5")
    with pytest.raises(ValueError, match=r"CounterfactualConfig\.twin: .*Did you mean 'attribute'\?"):
        CounterfactualConfig(twin="attributes")
    with pytest.raises(ValueError, match=r"InvarianceConfig\.interventions: .*Did you mean 'posterize'\?"):
        InvarianceConfig(interventions=["posterise"])
    with pytest.raises(ValueError, match=r"DebiasConfig\.mode: unknown debias mode 'psuedo'.*Did you mean 'pseudo'"):
        DebiasConfig(mode="psuedo")
    with pytest.raises(ValueError, match=r"FitConfig\.optimizer: unknown optimizer 'adam'.*Did you mean 'adamw'"):
        FitConfig(optimizer="adam")


def test_cross_field_rules_stay_in_post_init():
    from prompt_robust import RefinerConfig

    with pytest.raises(ValueError, match=r"RefinerConfig\.hidden_dim \(30\) must be a multiple of heads \(4\)"):
        RefinerConfig(hidden_dim=30, heads=4)
    with pytest.raises(ValueError, match=r"train_steps \+ joint_steps must be >= 1"):
        RefinerConfig(train_steps=0, joint_steps=0)
    with pytest.raises(ValueError, match=r"FitConfig\.warmup_steps \(5\) must be smaller than steps \(5\)"):
        FitConfig(steps=5, warmup_steps=5)
