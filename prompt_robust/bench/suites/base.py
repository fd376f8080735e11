"""The bench suites' registry: what ``prompt-robust bench --suite NAME`` runs.

A suite is a function ``run(request: SuiteRequest) -> str`` that measures something on the embedded world (or a
given backbone), writes its files into ``request.out`` and returns the text the command line prints. It is
registered once, where it is defined::

    @register_suite("my-suite", outputs=("my.json", "my.md"), help="what it measures")
    def _my_suite(request: SuiteRequest) -> str: ...

and its module is imported in ``prompt_robust/bench/suites/__init__.py``. The command line reads ``SUITES`` for
the ``--suite`` choices and their help, and for the files an earlier run left in ``--out`` (refused, or moved
aside with ``--overwrite``); it knows no suite by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...config import unknown_name_error

__all__ = ["SUITES", "Suite", "SuiteRequest", "get_suite", "register_suite"]


def _no_claim(settings: dict[str, Any] | None) -> None:
    """The default :attr:`SuiteRequest.claim`: any output directory may be written (the API's behaviour)."""


@dataclass(frozen=True)
class SuiteRequest:
    """What one run of a suite is asked to do: the command line's settings, as plain values.

    Args:
        out: the output directory, as given (the suites print it back as given).
        seeds: the seeds to average over.
        backbone: a :func:`~prompt_robust.backbones.load_backbone` spec; None: the suite's default.
        bench_options: :class:`~prompt_robust.bench.runner.BenchConfig` fields set on the command line; they win
            over the suite's own choices (see :meth:`bench_config`).
        learner: the learner of the refiner sweep and the mechanism suites.
        mechanisms: which mechanism suites ``mechanisms`` runs.
        refiner: refiner settings (``RefinerConfig`` fields) set on the command line.
        addons: settings of the other add-ons, ``{"counterfactual" | "invariance" | "debias": {field: value}}``.
        progress: show progress bars.
        command: the command as typed, recorded in the suites' reports.
        claim: called with the run's settings (or None: a suite that records none) before anything is written,
            to refuse or move aside an earlier run's outputs; suites registered with ``resumes=True`` call it
            themselves once they know their settings.

    Example:
        >>> SuiteRequest(out="bench", seeds=[1], bench_options={"steps": 2}).bench_config(steps=5).steps
        2
    """

    out: str
    seeds: list[int]
    backbone: str | None = None
    bench_options: dict[str, Any] = field(default_factory=dict)
    learner: str = "coop"
    mechanisms: list[str] | None = None
    refiner: dict[str, Any] = field(default_factory=dict)
    addons: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    command: str = ""
    claim: Callable[[dict[str, Any] | None], None] = _no_claim

    def bench_config(self, **defaults: Any) -> Any:
        """A :class:`~prompt_robust.bench.runner.BenchConfig` of the suite's ``defaults`` with the command line's
        :attr:`bench_options` over them."""
        from ..runner import BenchConfig

        return BenchConfig(**{**defaults, **self.bench_options})

    def wrote(self, files: Sequence[str], started: float, out: Any = None) -> str:
        """The line a suite ends with: the files it wrote, where, how long it took and the command.

        Example:
            >>> SuiteRequest(out="runs/x", seeds=[1], command="prompt-robust bench").wrote(["a.json"], time.time())
            'wrote a.json to runs/x (0 s); command: prompt-robust bench'
        """
        where = self.out if out is None else out
        return f"wrote {', '.join(files)} to {where} ({time.time() - started:.0f} s); command: {self.command}"

    def load_backbone(self, default: str = "embedded") -> Any:
        """The backbone of :attr:`backbone` (``default`` when none was given)."""
        from ...backbones import load_backbone

        return load_backbone(self.backbone or default)


@dataclass(frozen=True)
class Suite:
    """One registered suite.

    Args:
        name: its ``--suite`` name.
        run: ``run(request) -> text to print``.
        outputs: the files it writes into ``--out`` (what a rerun would replace).
        help: one phrase for ``--suite``'s help.
        saves_runs: it saves each (method, seed) run under ``runs/`` (and splits under ``splits/``) for a rerun to
            reuse; ``--overwrite`` moves them aside with the outputs.
        resumes: it records its settings and calls ``request.claim(settings)`` itself, so a rerun with the same
            settings resumes; otherwise any earlier output of it is refused before it runs.
    """

    name: str
    run: Callable[[SuiteRequest], str]
    outputs: tuple[str, ...]
    help: str
    saves_runs: bool = False
    resumes: bool = False


#: suite name -> :class:`Suite`, in registration order (the order of ``--suite``'s choices)
SUITES: dict[str, Suite] = {}


def register_suite(
    name: str,
    *,
    outputs: tuple[str, ...],
    help: str,  # noqa: A002 (argparse's word)
    saves_runs: bool = False,
    resumes: bool = False,
) -> Callable[[Callable[[SuiteRequest], str]], Callable[[SuiteRequest], str]]:
    """Function decorator registering a suite under ``name`` (see the module docstring).

    Example:
        >>> @register_suite("doc-example", outputs=("x.json",), help="nothing")
        ... def _doc_example(request):
        ...     return "done"
        >>> SUITES.pop("doc-example").run(SuiteRequest(out="x", seeds=[1]))
        'done'
    """

    def register(run: Callable[[SuiteRequest], str]) -> Callable[[SuiteRequest], str]:
        if name in SUITES:
            raise ValueError(f"a bench suite named {name!r} is registered already (by {SUITES[name].run.__module__}).")
        SUITES[name] = Suite(name, run, tuple(outputs), help, saves_runs=saves_runs, resumes=resumes)
        return run

    return register


def get_suite(name: str) -> Suite:
    """The suite registered as ``name``; an unknown name is answered with the valid ones and the closest."""
    if name not in SUITES:
        raise unknown_name_error("bench suite", name, list(SUITES))
    return SUITES[name]
