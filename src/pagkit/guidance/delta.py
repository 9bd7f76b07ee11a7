"""The cached guidance delta (opt-in): PAG's ``eps_c - eps_perturbed`` reused for the next k-1 steps."""

from __future__ import annotations

import torch

from pagkit.guidance.schedules import Step


class DeltaCache:
    """Keeps the delta of step j and hands it out at steps j+1 .. j+k-1 of the same run (``every = k``).

    The perturbed branch is recomputed at steps 0, k, 2k, ...; a delta from another run (a step index that is
    not within k-1 after the stored one) or of another batch size is never reused.
    """

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"reuse_delta must be an integer >= 1 (1: recompute every step), got {every!r}")
        self.every = every
        self._delta: torch.Tensor | None = None
        self._index = -1

    def get(self, step: Step | None, rows: int) -> torch.Tensor | None:
        """The delta to reuse at ``step`` for ``rows`` conditional rows, or None: compute it."""
        if self.every == 1 or step is None or step.index is None or self._delta is None:
            return None
        if step.index % self.every == 0 or not 0 < step.index - self._index < self.every:
            return None
        return self._delta if self._delta.shape[0] == rows else None

    def put(self, step: Step | None, delta: torch.Tensor) -> None:
        """Remember the delta computed at ``step`` (only when reuse is on and the step number is known)."""
        if self.every > 1 and step is not None and step.index is not None:
            self._delta, self._index = delta, step.index
