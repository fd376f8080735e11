"""The package's import rules, read from the source with ``ast`` (imports inside functions included):

* the synthetic benchmark (``prompt_robust.bench``) is a leaf: only the command line and the docs generator
  import it, so no method depends on the world it is measured on;
* the add-on packages (``prompt_robust.addons.<name>``) do not import the training loop or one another
  (``prompt_robust.addons.base``, the slot and the registry, is shared), and each has the same shape: ``config.py``
  (its config dataclass) + ``addon.py`` (the add-on, registered once) + internals;
* ``bench --suite`` offers exactly the suites registered in ``prompt_robust.bench.suites.SUITES``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prompt_robust
from prompt_robust.addons import ADDONS, RobustAddon, register_addon
from prompt_robust.addons.base import AddonFit, ForwardState, LossTerms
from prompt_robust.config import ConfigMixin

PACKAGE = Path(prompt_robust.__file__).resolve().parent
BENCH = "prompt_robust.bench"
#: the modules allowed to import the benchmark (besides the benchmark itself)
BENCH_USERS = {"prompt_robust.cli", "prompt_robust._docgen"}
#: the add-ons' home: ``base`` (the slot and the registry, shared) and one package per add-on
ADDONS_PACKAGE = "prompt_robust.addons"
ADDON_PACKAGES = ("refiner", "counterfactual", "invariance", "debias")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    if level > len(base):
        raise ValueError(f"{path}: relative import beyond the top-level package")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path``: ``import a.b``, ``from a import b`` (both
    ``a`` and ``a.b``, since ``b`` may be a module), relative forms resolved, and ``importlib.import_module``
    calls with literal arguments; at module level or inside functions alike."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node.level, node.module) if node.level else node.module or ""
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            name = node.args[0].value
            if name.startswith("."):
                anchor = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(anchor, ast.Constant) and isinstance(anchor.value, str)):
                    # import_module(".x", __package__): relative to the module's own package
                    anchor = ast.Constant(_resolve(module, path, 1, None))
                level = len(name) - len(name.lstrip("."))
                parent = anchor.value.split(".")
                name = ".".join([*parent[: len(parent) - (level - 1)], name.lstrip(".")]).rstrip(".")
            found.append((node.lineno, name))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(modules: dict[str, Path], forbidden) -> list[str]:
    """``path:line imports name`` for each import ``forbidden(module, name)`` refuses (one per statement)."""
    bad = {}
    for module, path in modules.items():
        for line, name in imports_of(module, path):
            key = (path.relative_to(PACKAGE.parent), line)
            if forbidden(module, name) and not (key in bad and _within(name, bad[key])):
                bad[key] = name
    return [f"{path}:{line} imports {name}" for (path, line), name in bad.items()]


def test_the_import_reader_sees_every_form(tmp_path):
    package = tmp_path / "prompt_robust" / "addons" / "refiner"
    package.mkdir(parents=True)
    source = package / "x.py"
    source.write_text(
        "import prompt_robust.bench.world\n"
        "from ... import bench\n"
        "from ...bench.runner import BenchConfig\n"
        "def f():\n"
        "    from ...training import fit\n"
        "    importlib.import_module('.bench.tasks', 'prompt_robust')\n"
        "    importlib.import_module('..debias', __package__)\n",
        encoding="utf-8",
    )
    names = {name for _, name in imports_of("prompt_robust.addons.refiner.x", source)}
    assert {
        "prompt_robust.bench.world",
        "prompt_robust.bench",
        "prompt_robust.bench.runner",
        "prompt_robust.training",
        "prompt_robust.bench.tasks",
        "prompt_robust.addons.debias",
    } <= names


def test_nothing_in_the_library_imports_the_benchmark():
    modules = {m: p for m, p in _modules().items() if not _within(m, BENCH) and m not in BENCH_USERS}
    assert "prompt_robust.backbones" in modules and "prompt_robust.data" in modules  # the walk found the core
    bad = _violations(modules, lambda module, name: _within(name, BENCH))
    assert not bad, "the benchmark is a leaf package; move what the library needs out of it:\n" + "\n".join(bad)


def test_importing_the_library_loads_no_benchmark_module():
    """The same rule at run time: every core module imported, ``prompt_robust.bench`` is still not loaded."""
    core = sorted(m for m in _modules() if not _within(m, BENCH) and m not in BENCH_USERS and m != "prompt_robust")
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"  # a module of an optional extra that is not installed
        "        pass\n"
        f"print(sorted(m for m in sys.modules if m == {BENCH!r} or m.startswith({BENCH + '.'!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _addon_violation(module: str, name: str) -> bool:
    own = next((p for p in ADDON_PACKAGES if _within(module, f"{ADDONS_PACKAGE}.{p}")), None)
    if own is None:
        return False
    others = [f"{ADDONS_PACKAGE}.{p}" for p in ADDON_PACKAGES if p != own]
    return _within(name, "prompt_robust.training") or any(_within(name, other) for other in others)


def _addon_modules() -> dict[str, Path]:
    return {m: p for m, p in _modules().items() if any(_within(m, f"{ADDONS_PACKAGE}.{a}") for a in ADDON_PACKAGES)}


def test_addons_import_neither_the_training_loop_nor_each_other():
    modules = _addon_modules()
    assert {m.split(".")[2] for m in modules} == set(ADDON_PACKAGES)
    bad = _violations(modules, _addon_violation)
    assert not bad, "add-on packages must declare stages, not drive fit() or reach into another add-on:\n" + (
        "\n".join(bad)
    )


def test_every_addon_package_has_the_same_shape():
    """``config.py`` holds the config dataclass, ``addon.py`` the add-on and its one ``@register_addon``."""
    for name in ADDON_PACKAGES:
        folder = PACKAGE / "addons" / name
        assert (folder / "config.py").is_file() and (folder / "addon.py").is_file(), folder
        addon = ADDONS[name]
        assert addon.__module__ == f"{ADDONS_PACKAGE}.{name}.addon"
        assert addon.config_class.__module__ == f"{ADDONS_PACKAGE}.{name}.config"
        registrations = [
            path.relative_to(PACKAGE)
            for path in sorted(folder.rglob("*.py"))
            for line in path.read_text().splitlines()
            if line.strip() == "@register_addon"
        ]
        assert registrations == [Path("addons", name, "addon.py")], registrations


def _suite_option() -> argparse.Action:
    from prompt_robust.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in commands.choices["bench"]._actions if "--suite" in a.option_strings)


def test_the_cli_offers_exactly_the_registered_suites():
    from prompt_robust.bench.suites import SUITES

    option = _suite_option()
    assert list(option.choices) == list(SUITES)
    assert {"quick", "full", "calibration", "mechanisms", "refiner-sweep", "icm"} <= set(SUITES)
    for name, suite in SUITES.items():
        assert suite.name == name and suite.outputs and suite.help and callable(suite.run)
        assert f"{name}: {suite.help}" in option.help


def test_an_unknown_suite_is_answered_with_the_closest_one():
    from prompt_robust.bench.suites import get_suite, register_suite

    with pytest.raises(ValueError, match=r"unknown bench suite 'icm-grd'.*Did you mean 'icm-grid'\?"):
        get_suite("icm-grd")
    with pytest.raises(ValueError, match="registered already"):
        register_suite("icm", outputs=("x.json",), help="again")(lambda request: "")


# ---------------------------------------------------------------------------------------------------------------
# adding an add-on from outside the package: one module + one registration


@dataclasses.dataclass
class ToyShiftConfig(ConfigMixin):
    """A toy add-on's settings.

    Args:
        shift: initial value added to the logit of class 0.
    """

    shift: float = 2.0


class ToyShift(RobustAddon):
    """Adds a trainable constant to the logit of class 0 (a toy, defined outside the package)."""

    name = "toy_shift"
    config_class = ToyShiftConfig
    description = "Adds a trainable constant to the first class's logit."
    order = 50

    fit_phase = "before_prompt"

    def __init__(self, learner, config: ToyShiftConfig) -> None:
        super().__init__(learner, config)
        self.shift = torch.nn.Parameter(torch.tensor(float(config.shift)))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # training images fitted on (saved)

    @property
    def fitted(self) -> bool:
        return int(self.seen) > 0

    def fit(self, model, dataset, *, seed=0, cache_dir=None, progress=True) -> AddonFit:
        self.seen.fill_(len(dataset))
        return AddonFit(logs={"toy_shift/seen": float(len(dataset))})

    def adjust_output(self, state: ForwardState):
        offset = torch.zeros_like(state.output.logits)
        offset[..., 0] = self.shift
        return dataclasses.replace(state.output, logits=state.output.logits + offset)

    def loss_terms(self, state: ForwardState) -> LossTerms:
        # weight the first sample twice: the wrapped model's loss is the weighted mean of the cross-entropy
        weights = torch.ones(state.pixel_values.shape[0])
        weights[0] = 2.0
        return LossTerms(weights=weights, logs={"toy_shift/seen": float(self.seen)})


@pytest.fixture
def toy_registered():
    register_addon(ToyShift)
    try:
        yield ToyShift
    finally:
        ADDONS.pop(ToyShift.name, None)


def test_an_addon_registered_from_outside_works_end_to_end(toy_registered, bb, tmp_path):
    import prompt_robust as pr

    assert list(pr.RobustConfig.addon_configs())[-1] == "toy_shift"  # after the built-ins (order 50)
    config = pr.RobustConfig(toy_shift=ToyShiftConfig(shift=3.0))
    assert config.enabled() == ["toy_shift"] and pr.RobustConfig.from_dict(config.to_dict()) == config
    torch.manual_seed(0)
    learner = pr.build_learner("coop", bb, ["cat", "dog", "bird"], n_ctx=2)
    pixels = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        plain = learner(pixels).logits
        model = pr.wrap(learner, config)
        shifted = model(pixels).logits
    assert torch.allclose(shifted[:, 0], plain[:, 0] + 3.0, atol=1e-5)
    assert torch.equal(shifted[:, 1:], plain[:, 1:])
    with torch.no_grad():
        model.addons["toy_shift"].shift.fill_(-1.5)  # as if trained
    # the training loss is the add-on's weighted mean (sample 0 counts twice), with its logs
    labels = torch.tensor([0, 2])
    model.train()
    out = model(pixels, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits, labels, reduction="none")
    assert torch.allclose(out.loss, (2 * ce[0] + ce[1]) / 3) and out.logs == {"toy_shift/seen": 0.0}
    # prompt_robust.fit fits the unfitted before-prompt add-on first; fit_addons then keeps it
    assert model.unfitted_addons() == ["toy_shift"]
    data = [(pixels[i], int(labels[i])) for i in range(2)]
    pr.fit(model, data, pr.FitConfig(steps=1, batch_size=2, warmup_steps=0, progress=False))
    assert int(model.addons["toy_shift"].seen) == 2 and model.unfitted_addons() == []
    assert model.fit_addons(data[:1], progress=False) == {}  # already fitted: kept
    assert model.fit_addons(data[:1], refit=True, progress=False) == {"toy_shift/seen": 1.0}
    with torch.no_grad():
        plain = model.learner(pixels).logits  # the prompt was tuned one step
    model.save_pretrained(tmp_path / "adapter")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=bb)
    assert float(loaded.addons["toy_shift"].shift) == -1.5 and loaded.addons["toy_shift"].fitted
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixels).logits[:, 0], plain[:, 0] - 1.5, atol=1e-5)


def test_a_saved_addon_that_is_not_registered_is_named_on_load(bb, tmp_path):
    import prompt_robust as pr

    register_addon(ToyShift)
    try:
        learner = pr.build_learner("coop", bb, ["cat", "dog"], n_ctx=2)
        pr.wrap(learner, pr.RobustConfig(toy_shift=ToyShiftConfig())).save_pretrained(tmp_path / "adapter")
    finally:
        ADDONS.pop(ToyShift.name, None)
    with pytest.raises(ValueError, match=r"enables add-on 'toy_shift', which is not registered"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=bb)


def test_registration_refuses_bad_names_and_configs():
    class Upper(ToyShift):
        name = "Toy"

    class Taken(ToyShift):
        name = "refiner"

    class NoConfig(ToyShift):
        name = "no_config"
        config_class = dict

    with pytest.raises(ValueError, match="lowercase identifier"):
        register_addon(Upper)
    with pytest.raises(ValueError, match="already registered"):
        register_addon(Taken)
    with pytest.raises(ValueError, match="config_class must be a @dataclass config"):
        register_addon(NoConfig)
    assert list(ADDONS) == ["refiner", "counterfactual", "invariance", "debias"]
