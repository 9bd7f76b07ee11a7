"""Weak branches that change whole modules for the marked rows: skipped blocks or attention layers (SLG / STG).

Skip-layer guidance (SD3.5; Hyung et al., *Spatiotemporal Skip Guidance*, arXiv 2411.18664) builds its weak
prediction by skipping chosen blocks. :class:`SkipModules` does that for the rows the engine marks: the
module computes the other rows only, and the marked rows get

- a **block** (a transformer block, a U-Net mid block: any module whose outputs have its inputs' shapes): its
  inputs unchanged (``hidden_states``, and ``encoder_hidden_states`` where the block returns both: a joint
  block's text stream is skipped with it, as SD3.5's skip layers do);
- an **attention layer**: no contribution. A layer that adds its own residual (U-Net ``Attention`` with
  ``residual_connection``) returns its input, every other one zeros (its block adds the residual).

Modules are named by the layer-spec vocabulary: ``blocks.N`` is the N-th transformer block (``transformer_blocks.N``
or ``blocks.N``), an exact module path that is not an attention layer is a block, and every other spec
(``mid``, ``down.1``, attention paths) selects attention layers (:func:`pagkit.layers.select_layers`).

The wrapper is an instance ``forward`` (removed on exit), so the rows are split inside the module's call: pre-
and post-hooks of other tools, prefix sharing included, still see every row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagkit.batch import map_rows
from pagkit.interventions.base import InstanceForward, Intervention
from pagkit.interventions.rows import rows_for
from pagkit.layers import LayerSpecError, _spec_items, select_layers

_HIDDEN = ("hidden_states", "sample", "x")
_ENCODER = ("encoder_hidden_states",)


@dataclass(frozen=True)
class Unit:
    """One module a weak branch changes: its path, the module, and ``block`` or ``attention``."""

    name: str
    module: nn.Module
    kind: str


def resolve_units(model: nn.Module, spec: str | list[str] | tuple[str, ...]) -> list[Unit]:
    """The modules a block-level spec names, in model order (see the module docstring)."""
    modules = dict(model.named_modules())
    attention_names = {layer.name for layer in _all_attention(model)}
    units: dict[str, Unit] = {}
    for item in _spec_items(spec):
        path = None
        if item.startswith("blocks.") and item[len("blocks.") :].isdigit():
            n = item[len("blocks.") :]
            path = next((p for p in (f"transformer_blocks.{n}", f"blocks.{n}") if p in modules), None)
            if path is None:
                raise LayerSpecError(f"{item!r}: {type(model).__name__} has no transformer_blocks.{n} or blocks.{n}")
        elif item in modules and item not in attention_names and item != "":
            path = item
        if path is not None:
            units.setdefault(path, Unit(path, modules[path], "block"))
            continue
        for layer in select_layers(model, item):
            units.setdefault(layer.name, Unit(layer.name, layer.module, "attention"))
    order = {name: i for i, name in enumerate(modules)}
    return sorted(units.values(), key=lambda u: order[u.name])


def _all_attention(model: nn.Module) -> list[Any]:
    from pagkit.layers import attention_layers

    return attention_layers(model)


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, str | int | None]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    for key in _HIDDEN:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], key
    return None, None


def _encoder_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    value = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return value if isinstance(value, torch.Tensor) else None


def _lazy(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 2 and 1 < value.shape[0] < batch


def _merge(keep: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = keep.new_empty((len(mask), *keep.shape[1:]))
    out[~mask] = keep
    out[mask] = other.to(keep.dtype)
    return out


class RowSplitForward(InstanceForward):
    """An instance ``forward`` on ``module``: rows marked for ``key`` get ``marked(args, kwargs, mask, kept)``,
    the other rows the original forward. ``marked`` receives the kept rows' output (None if all are marked)."""

    def __init__(self, module: nn.Module, key: int, name: str, marked: Callable[..., Any]) -> None:
        super().__init__(module)
        self.module = module
        self.key = key
        self.name = name
        self.marked = marked

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first, _ = _first_input(args, kwargs)
        if first is None:
            return self.original(*args, **kwargs)
        batch = first.shape[0]
        mask = rows_for(self.key, batch, f"module {self.name}")
        if mask is None:
            return self.original(*args, **kwargs)
        mask = mask.to(first.device)
        if any(_lazy(v, batch) for v in (*args, *kwargs.values())):
            # inputs passed with the caller's rows only (encoder states completed per call by cross-attention):
            # the module runs on every row and the marked rows' outputs are replaced
            return self.marked(args, kwargs, mask, ("__all__", self.original(*args, **kwargs)))
        keep = (~mask).nonzero().squeeze(1)
        kept = None
        if len(keep):
            take = lambda t: t[keep]  # noqa: E731
            kept = self.original(*map_rows(args, batch, take), **map_rows(kwargs, batch, take))
        return self.marked(args, kwargs, mask, kept)


class SkipModules(Intervention):
    """Skip blocks or attention layers (``layers``: a block-level spec) for the marked rows."""

    def __init__(self, layers: str | list[str] | tuple[str, ...]) -> None:
        self.layers = layers
        self._order: dict[int, str] = {}  # module id -> learned tuple order ("eh": (encoder, hidden))

    def __repr__(self) -> str:
        return f"SkipModules(layers={self.layers!r})"

    def resolve(self, model: nn.Module) -> list[Unit]:
        return resolve_units(model, self.layers)

    def targets(self, model: nn.Module) -> list[nn.Module]:
        return [u.module for u in self.resolve(model)]

    def install(self, model: nn.Module, key: int) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        try:
            for unit in self.resolve(model):
                wrapper = RowSplitForward(unit.module, key, unit.name, self._skipper(unit))
                wrapper.install()
                stack.callback(wrapper.remove)
        except BaseException:
            stack.close()
            raise
        return stack

    def _skipper(self, unit: Unit) -> Callable[..., Any]:
        def skipped(args: tuple[Any, ...], kwargs: dict[str, Any], mask: torch.Tensor, kept: Any) -> Any:
            hidden, _ = _first_input(args, kwargs)
            assert hidden is not None
            encoder = _encoder_input(args, kwargs)
            if encoder is not None and encoder.shape[0] != hidden.shape[0]:
                encoder = None  # cross-attention context, not a stream the block returns
            if kept is None and encoder is None:
                kept = ("__template__", hidden[mask])  # a tensor output: nothing else to learn
            if unit.kind == "attention":
                if getattr(unit.module, "residual_connection", False):
                    value = hidden[mask] / getattr(unit.module, "rescale_output_factor", 1.0)
                else:
                    value = torch.zeros_like(hidden[mask])
                values = {"hidden": value, "encoder": None if encoder is None else torch.zeros_like(encoder[mask])}
            else:
                values = {"hidden": hidden[mask], "encoder": None if encoder is None else encoder[mask]}
            if kept is None:
                kept = self._all_marked(unit, args, kwargs, mask)
            return self._merge_output(unit, kept, values, mask)

        return skipped

    def _all_marked(self, unit: Unit, args: tuple[Any, ...], kwargs: dict[str, Any], mask: torch.Tensor) -> Any:
        """Every row is marked (the replay layout's second call): the output's structure is still needed, so the
        module runs on one row and its values are replaced."""
        hidden, _ = _first_input(args, kwargs)
        assert hidden is not None
        take = lambda t: t[:1]  # noqa: E731
        out = unit.module.__class__.forward(
            unit.module, *map_rows(args, hidden.shape[0], take), **map_rows(kwargs, hidden.shape[0], take)
        )
        return ("__template__", out)

    def _merge_output(self, unit: Unit, kept: Any, values: dict[str, Any], mask: torch.Tensor) -> Any:
        tag = kept[0] if isinstance(kept, tuple) and len(kept) == 2 and isinstance(kept[0], str) else None
        template = tag == "__template__"
        out = kept[1] if tag is not None else kept

        def place(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if k.shape[1:] != v.shape[1:]:
                raise LayerSpecError(
                    f"cannot skip {unit.name} ({type(unit.module).__name__}): its output {tuple(k.shape[1:])} does "
                    f"not have its input's shape {tuple(v.shape[1:])}; choose transformer blocks (blocks.N), the "
                    "mid block or attention layers"
                )
            if tag == "__all__":  # every row computed: replace the marked ones
                out_ = k.clone()
                out_[mask] = v.to(k.dtype)
                return out_
            return v.to(k.dtype) if template else _merge(k, v, mask)

        if isinstance(out, torch.Tensor):
            return place(out, values["hidden"])
        if isinstance(out, tuple) and values["encoder"] is not None:
            tensors = [i for i, o in enumerate(out) if isinstance(o, torch.Tensor)]
            if len(tensors) != 2:
                raise LayerSpecError(f"cannot skip {unit.name}: its output has {len(tensors)} tensors, expected 2")
            h, e = values["hidden"], values["encoder"]
            a, b = (out[i] for i in tensors)
            fits = lambda t, v: t.shape[1:] == v.shape[1:]  # noqa: E731
            if fits(a, h) and fits(b, e) and not (fits(a, e) and fits(b, h)):
                order = ("hidden", "encoder")
            elif fits(a, e) and fits(b, h) and not (fits(a, h) and fits(b, e)):
                order = ("encoder", "hidden")
            elif fits(a, h) and fits(b, h):  # same shapes: diffusers' joint blocks return (encoder, hidden)
                first_hidden = type(unit.module).__name__.startswith(("HunyuanVideo", "Hunyuan"))
                order = ("hidden", "encoder") if first_hidden else ("encoder", "hidden")
            else:
                raise LayerSpecError(f"cannot skip {unit.name}: its outputs do not have its inputs' shapes")
            result = list(out)
            for i, which in zip(tensors, order, strict=True):
                result[i] = place(out[i], values[which])
            return tuple(result)
        if isinstance(out, tuple) and isinstance(out[0], torch.Tensor) and len(out) >= 1:
            result = list(out)
            result[0] = place(out[0], values["hidden"])
            return tuple(result)
        raise LayerSpecError(
            f"cannot skip {unit.name} ({type(unit.module).__name__}): its output is not a tensor of its input's "
            "shape; choose transformer blocks (blocks.N) or attention layers"
        )
