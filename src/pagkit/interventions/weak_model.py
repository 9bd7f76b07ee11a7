"""Autoguidance's weak branch (Karras et al., arXiv 2406.02507): the marked rows go through a weaker model.

The intervention wraps the guided model's ``forward`` (an instance attribute, removed on exit): the rows the
engine marks are computed by ``weak`` (a smaller or shorter-trained model of the same family, called with the
same inputs), every other row by the model itself, in one call of the engine. Its fork is the model's input, so
nothing is shared with the conditional branch (the engine runs no prefix sharing while it is installed).
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from pagkit.batch import first_tensor, map_rows, replace_first_tensor
from pagkit.interventions.base import InstanceForward, Intervention
from pagkit.interventions.blocks import _first_input
from pagkit.interventions.rows import _CURRENT, CallRows, current, rows_for


class WeakModelError(ValueError):
    """The weak model cannot serve as the guided model's weak branch."""


def check_same_family(model: nn.Module, weak: nn.Module) -> None:
    """The weak model must take the guided model's inputs: the same class."""
    if weak is model:
        raise WeakModelError(
            "autoguidance's weak model is the guided model itself: give a smaller or shorter-trained one"
        )
    if type(weak) is not type(model):
        raise WeakModelError(
            f"autoguidance's weak model must be of the guided model's family ({type(model).__name__}), "
            f"got {type(weak).__name__}"
        )


class _Routed(InstanceForward):
    """An instance ``forward``: marked rows through the weak model, the others through the original forward."""

    def __init__(self, model: nn.Module, weak: nn.Module, key: int) -> None:
        super().__init__(model)
        self.model, self.weak, self.key = model, weak, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first, _ = _first_input(args, kwargs)
        if first is None:
            return self.original(*args, **kwargs)
        batch = first.shape[0]
        mask = rows_for(self.key, batch, "the model's input")
        plan = current()
        if mask is None or plan is None:
            return self.original(*args, **kwargs)
        mask = mask.to(first.device)
        keep, weak_rows = (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)
        take_weak = lambda t: t[weak_rows.to(t.device)]  # noqa: E731
        token = _CURRENT.set(None)  # the weak model runs without the other branches' marks
        try:
            weak_out = first_tensor(self.weak(*map_rows(args, batch, take_weak), **map_rows(kwargs, batch, take_weak)))
        finally:
            _CURRENT.reset(token)
        if not len(keep):
            return weak_out
        take = lambda t: t[keep.to(t.device)]  # noqa: E731
        masks = {k: m.to(keep.device)[keep] for k, m in plan.masks.items() if k != self.key}
        sub = CallRows(len(keep), masks, plan.image_tokens)
        token = _CURRENT.set(sub)
        try:
            kept = self.original(*map_rows(args, batch, take), **map_rows(kwargs, batch, take))
        finally:
            _CURRENT.reset(token)
        main = first_tensor(kept)
        out = main.new_empty((batch, *main.shape[1:]))
        out[keep] = main
        out[weak_rows] = weak_out.to(main.dtype)
        return replace_first_tensor(kept, out)


class WeakModel(Intervention):
    """Route the marked rows through ``weak`` (autoguidance)."""

    def __init__(self, weak: nn.Module) -> None:
        self.weak = weak

    def __repr__(self) -> str:
        return f"WeakModel({type(self.weak).__name__})"

    def targets(self, model: nn.Module) -> list[nn.Module]:
        return [model]

    def install(self, model: nn.Module, key: int) -> contextlib.ExitStack:
        check_same_family(model, self.weak)
        param = next(model.parameters(), None)
        if param is not None:
            self.weak.to(param.device)
        self.weak.eval().requires_grad_(False)
        stack = contextlib.ExitStack()
        routed = _Routed(model, self.weak, key)
        routed.install()
        stack.callback(routed.remove)
        return stack


def parameters_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
