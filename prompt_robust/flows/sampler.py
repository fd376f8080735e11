"""Fixed-grid ODE sampling of a velocity field from ``t = 0`` (noise) to ``t = 1`` (data), with torchdiffeq.

The sampler knows nothing about the network it integrates: it takes any ``velocity(t, x) -> dx/dt`` (the refiner's
prompt-space network, the counterfactual generator's guided feature field). One algorithm choice per name,
answered with the valid names when unknown (as torchdiffeq's ``odeint`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import _check, unknown_name_error

__all__ = ["SOLVER_ORDERS", "ODESampler", "SamplerOutput"]

#: solver name -> (order of accuracy, velocity evaluations per step)
SOLVER_ORDERS: dict[str, tuple[int, int]] = {"euler": (1, 1), "midpoint": (2, 2), "rk4": (4, 4)}


@dataclass
class SamplerOutput:
    """What :meth:`ODESampler.sample` returns.

    Attributes:
        sample: the state at ``t = 1``, shaped like the initial state.
        evaluations: how many times the velocity was evaluated.
    """

    sample: torch.Tensor
    evaluations: int


class ODESampler:
    """Integrates ``dx/dt = v(t, x)`` on ``[0, 1]`` with ``num_steps`` equal steps of a fixed-grid solver.

    ``euler`` costs one velocity evaluation per step, ``midpoint`` two and ``rk4`` four (torchdiffeq's ``rk4``
    is the 3/8-rule fourth-order variant). Gradients flow through the steps (no adjoint), which is what joint
    training through a 5-step sampler needs.

    Args:
        num_steps: equal steps on ``[0, 1]`` (>= 1).
        method: ``"euler"``, ``"midpoint"`` or ``"rk4"``.

    Example:
        >>> sampler = ODESampler(num_steps=5, method="euler")
        >>> out = sampler.sample(lambda t, x: -x, torch.ones(2))
        >>> round(float(out.sample[0]), 5), out.evaluations  # (1 - 1/5) ** 5
        (0.32768, 5)
    """

    def __init__(self, num_steps: int = 5, method: str = "euler") -> None:
        _check(
            isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1,
            f"num_steps must be an integer >= 1; got {num_steps!r}. Use e.g. num_steps=5.",
        )
        if method not in SOLVER_ORDERS:
            raise unknown_name_error("ODE method", method, tuple(SOLVER_ORDERS))
        self.num_steps = num_steps
        self.method = method

    @property
    def evaluations_per_sample(self) -> int:
        """Velocity evaluations one :meth:`sample` call makes."""
        return self.num_steps * SOLVER_ORDERS[self.method][1]

    def sample(self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor) -> SamplerOutput:
        """Integrate from ``x0`` at ``t = 0`` to ``t = 1``.

        Args:
            velocity: ``v(t, x)`` with ``t`` a 0-dim tensor and ``x`` shaped like ``x0``.
            x0: initial state (e.g. noise), any shape.

        Returns:
            :class:`SamplerOutput` with the state at ``t = 1``.
        """
        from torchdiffeq import odeint

        count = 0

        def counted(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return velocity(t, x)

        grid = torch.linspace(0.0, 1.0, self.num_steps + 1, dtype=torch.float64).to(x0.dtype)
        trajectory = odeint(counted, x0, grid.to(x0.device), method=self.method)  # (num_steps + 1, *x0.shape)
        return SamplerOutput(sample=trajectory[-1], evaluations=count)

    def __repr__(self) -> str:
        return f"ODESampler(num_steps={self.num_steps}, method={self.method!r})"
