"""The ``prompt-robust bench --suite`` suites, registered by name in :data:`SUITES`.

Adding a suite = one module here defining ``run(request) -> str`` under ``@register_suite(...)`` (see
:mod:`.base`) + one line importing it below.
"""

from __future__ import annotations

from .base import SUITES, Suite, SuiteRequest, get_suite, register_suite

# each module registers its suites when imported, in the order of --suite's choices
# isort: off
from . import standard  # noqa: F401  quick, full
from . import calibration  # noqa: F401  calibration
from . import mechanisms  # noqa: F401  mechanisms
from . import refiner  # noqa: F401  refiner-sweep, refiner-cost
from . import counterfactual  # noqa: F401  counterfactual-quality
from . import icm  # noqa: F401  icm, icm-grid
from . import speed  # noqa: F401  speed
# isort: on

__all__ = ["SUITES", "Suite", "SuiteRequest", "get_suite", "register_suite"]
