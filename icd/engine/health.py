"""Training health: loss terms that sit at a degenerate constant or blow up.

The trainer feeds ``LossHealth.check`` the per-iteration loss values it already converts to
Python floats for its record (no extra device synchronisation). Two problems are reported,
each once per loss term:

- **stuck**: the term took the same value (within ``rel_tol``) for ``window`` iterations in a
  row, e.g. FCOS's GIoU box loss at exactly 1.0 when every regressed box is empty, or a term
  that is 0 on every batch. Real losses of real batches always move a little.
- **blow-up**: the term exceeds ``growth`` times where it stood up to ``window`` iterations
  earlier: the median of the oldest fifth (at least 3) of its last ``window`` non-zero values,
  so that one odd batch (e.g. one without boxes, whose losses are tiny or exactly zero) does not
  count; below ``floor`` as ``floor``; looked for once the term has 10 such values (or
  ``window``, if fewer). E.g. a feature-imitation loss going from ~1 to 1e15 within a hundred
  iterations. A steady exponential growth is caught once it gains ``growth`` over about
  ``window`` iterations.

``icd train`` also checks each evaluation of an ICD run: real instances whose attention falls
less on their own boxes than on the average valid token (mean lift below
``ATTENTION_LIFT_FLOOR``) make a "looks-away" health record (``Trainer._check_attention``).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from icd.errors import IcdError

HEALTH_ACTIONS = ("warn", "stop")
STUCK, BLOW_UP = "stuck", "blow-up"
# blow-ups are looked for once a term has this many non-zero values (or --health-window, if fewer)
MIN_HISTORY = 10
# an ICD evaluation whose mean lift is below this is reported: uniform attention has lift 1
ATTENTION_LIFT_FLOOR = 1.0


@dataclass(frozen=True)
class HealthProblem:
    """One finding: ``loss`` (its record name) showed ``kind`` at ``iteration``."""

    loss: str
    kind: str
    iteration: int
    value: float
    reference: float  # stuck: the value it sits at; blow-up: where it stood before
    window: int  # iterations looked at

    @property
    def message(self) -> str:
        if self.kind == STUCK:
            return (f"{self.loss} has stayed at {self.value:.6g} for the last {self.window} iterations "
                    f"(iteration {self.iteration}): a degenerate constant (e.g. a dead regression "
                    f"branch or a term that is always empty)")
        ratio = abs(self.value) / self.reference
        return (f"{self.loss} = {self.value:.6g} at iteration {self.iteration}: {ratio:.3g}x "
                f"{self.reference:.6g}, where it stood up to {self.window} iterations earlier; the loss is "
                f"blowing up")


class UnhealthyTrainingError(IcdError, RuntimeError):
    """Raised by the trainer under ``--on-unhealthy stop`` (the CLI: one line, exit status 1)."""

    exit_code = 1


class LossHealth:
    """Watches named loss values iteration by iteration (see the module docstring).

    Args:
        window: iterations a term must stay constant to count as stuck, and the history a
            new value is compared with for a blow-up (>= 2).
        rel_tol: values within ``rel_tol * max(|v|)`` of each other count as the same.
        growth: a value above ``growth`` x the median of the oldest fifth (>= 3) of the non-zero
            history (at least ``floor``) is a blow-up.
        floor: the smallest reference a blow-up is measured against (losses near zero).
    """

    def __init__(self, window: int = 50, rel_tol: float = 1e-6, growth: float = 1e3, floor: float = 1e-3) -> None:
        if window < 2:
            raise ValueError(f"LossHealth: window = {window}; expected at least 2 iterations")
        if growth <= 1 or floor <= 0 or rel_tol < 0:
            raise ValueError(f"LossHealth: growth {growth} (> 1), floor {floor} (> 0), rel_tol {rel_tol} (>= 0)")
        self.window = window
        self.rel_tol = rel_tol
        self.growth = growth
        self.floor = floor
        self._history: dict[str, deque[float]] = {}
        self._reported: set[tuple[str, str]] = set()

    def check(self, iteration: int, losses: Mapping[str, float]) -> list[HealthProblem]:
        """Add one iteration's values; returns the problems seen for the first time."""
        found = []
        for name, value in losses.items():
            history = self._history.setdefault(name, deque(maxlen=self.window))
            problem = self._blow_up(name, iteration, value, history)
            history.append(value)
            problem = problem or self._stuck(name, iteration, value, history)
            if problem is not None and (name, problem.kind) not in self._reported:
                self._reported.add((name, problem.kind))
                found.append(problem)
        return found

    def _blow_up(self, name: str, iteration: int, value: float, history: deque[float]) -> HealthProblem | None:
        if not history:
            return None
        active = [abs(v) for v in history if v != 0]  # a batch without boxes gives some terms exact zeros
        if len(active) < min(self.window, MIN_HISTORY):
            return None
        reference = max(statistics.median(active[: max(3, len(active) // 5)]), self.floor)
        if abs(value) > self.growth * reference:  # False for NaN (the trainer stops on those itself)
            return HealthProblem(name, BLOW_UP, iteration, value, reference, len(history))
        return None

    def _stuck(self, name: str, iteration: int, value: float, history: deque[float]) -> HealthProblem | None:
        if len(history) < self.window:
            return None
        low, high = min(history), max(history)
        if high - low <= self.rel_tol * max(abs(low), abs(high)):
            return HealthProblem(name, STUCK, iteration, value, value, self.window)
        return None
