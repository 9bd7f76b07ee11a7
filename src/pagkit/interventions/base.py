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


class InstanceForward:
    """A callable installed as ``module``'s instance ``forward`` while an intervention is installed; ``remove``
    puts back exactly what was there (another library's instance forward, or none). ``original`` is the forward
    it replaces (call it for the rows it leaves alone)."""

    def __init__(self, module: nn.Module) -> None:
        self.target = module
        self.original = module.forward
        self._had = "forward" in module.__dict__
        self._saved = module.__dict__.get("forward")

    def install(self) -> None:
        setattr(self.target, "forward", self)  # noqa: B010 (an instance attribute, restored by remove())

    def remove(self) -> None:
        if self._had:
            setattr(self.target, "forward", self._saved)  # noqa: B010
        else:
            self.target.__dict__.pop("forward", None)
