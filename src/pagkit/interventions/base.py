"""What a weak branch does to the model: an intervention installed once and active on the rows marked for it."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

from torch import nn


class Intervention(ABC):
    """A change of the model's computation for the rows the engine marks with this intervention's key.

    ``targets`` are the modules where the changed computation starts: up to the first of them (in forward
    order) the branch equals the conditional one, which prefix sharing exploits. ``install`` returns an exit
    stack whose ``close()`` restores the model exactly.
    """

    @abstractmethod
    def targets(self, model: nn.Module) -> list[nn.Module]: ...

    @abstractmethod
    def install(self, model: nn.Module, key: int) -> contextlib.ExitStack: ...
