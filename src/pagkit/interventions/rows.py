"""Which rows of the current denoiser call each intervention acts on: declared by the engine, never guessed.

The engine marks, around one model call, a bool mask ``[B]`` per intervention (``B`` = rows of that call). A
layer that sees ``k * B`` rows (frames or tokens folded into the batch, as video U-Nets and temporal blocks do:
``(b f)`` order, diffusers' convention) gets the mask repeated per row; any other row count is an error.
The state lives in a context variable, so concurrent threads each see their own call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch


class BatchLayoutError(RuntimeError):
    """The rows reaching a layer do not match the rows the engine declared for the call."""


@dataclass
class CallRows:
    """The row plan of one denoiser call."""

    batch: int  # rows of the call, as the model receives them
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # intervention key -> bool [batch]
    image_tokens: int | None = None  # tokens of the image/video stream at the model's input (joint models)


_CURRENT: ContextVar[CallRows | None] = ContextVar("pagkit_call_rows", default=None)


def current() -> CallRows | None:
    """The row plan of the running call (None outside a guided call)."""
    return _CURRENT.get()


@contextlib.contextmanager
def marked(plan: CallRows) -> Iterator[CallRows]:
    """Declare ``plan`` for the model call(s) inside the block."""
    for key, mask in plan.masks.items():
        if mask.dtype != torch.bool or mask.ndim != 1 or len(mask) != plan.batch:
            raise TypeError(f"row mask of intervention {key} must be bool [{plan.batch}], got {tuple(mask.shape)}")
    token = _CURRENT.set(plan)
    try:
        yield plan
    finally:
        _CURRENT.reset(token)


def rows_for(key: int, rows: int, where: str) -> torch.Tensor | None:
    """The mask of intervention ``key`` for a layer that sees ``rows`` rows; None when it perturbs nothing."""
    plan = _CURRENT.get()
    if plan is None:
        return None
    mask = plan.masks.get(key)
    if mask is None or not bool(mask.any()):
        return None
    if rows == plan.batch:
        return mask
    if rows % plan.batch == 0:  # frames/tokens folded into the batch in (b f) order
        return mask.repeat_interleave(rows // plan.batch)
    raise BatchLayoutError(
        f"{where} got {rows} rows in a denoiser call of {plan.batch} rows: this block folds its batch in a way "
        "pagkit cannot map to images (it expects the call's rows or a multiple of them in (b f) order); "
        "choose layers outside this block"
    )
