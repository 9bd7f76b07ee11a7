"""Prefix sharing: the perturbed branch reuses everything the network computed before its first perturbed layer.

Up to the first perturbed attention layer, the perturbed branch equals the conditional one (Ahn et al.'s
perturbation only changes attention maps). :class:`PrefixCache` records, during the ordinary (main) model call,
the outputs of every submodule that finished before a perturbed layer started; the perturbed call then runs
the same forward code on the conditional rows, but those submodules return their recorded outputs (rows
selected) instead of recomputing. Submodules on the path to the perturbed layers are expanded, so sharing
reaches down to the block, resnet and norm that precede the layer: for a U-Net with mid-block PAG the whole
down path, its skip tensors and the time/text embeddings are computed once; for a DiT, all blocks before the
first perturbed one.

It works on any model whose forward calls submodules (diffusers U-Nets, DiTs, our embedded model) without
copying its forward: it only needs the same forward code to call the same submodules in the same order.

Two layouts share the same choice of submodules:

- :class:`PrefixDedup` (the default): one batched call ``[main rows | copies of the conditional rows]``; every
  submodule that runs before the first perturbed layer computes the main rows only and hands the copies on
  (its output rows duplicated), so the copies cost nothing until the fork and run batched from there on.
- :class:`PrefixCache` (``"replay"``): the main call as the caller made it, then a second call on the conditional
  rows that replays the recorded prefix outputs. Least memory (no duplicated activations), but a second, smaller
  forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagkit.batch import append_rows, map_rows
from pagkit.layers import attention_layers

SHARING_MODES = ("batched", "replay", "off")
_MISSING = object()


class RowCompletingProcessor:
    """Wraps a cross-attention layer's processor: where the query rows include appended copies of conditional
    rows but the encoder states arrived with the main rows only (``complete(encoder_states, query_rows)``
    appends the copies' rows, for this call only), the original processor sees matching batches."""

    def __init__(self, original: Any, complete: Any) -> None:
        from pagkit.interventions.attention import mirror_signature

        self.original = original
        self.complete = complete
        mirror_signature(self, original)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = hidden_states.shape[0]
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = self.complete(kwargs["encoder_hidden_states"], rows)
        elif args:
            args = (self.complete(args[0], rows), *args[1:])
        return self.original(attn, hidden_states, *args, **kwargs)


def sharing_mode(prefix_sharing: bool | str) -> str:
    """``batched`` (:class:`PrefixDedup`), ``replay`` (:class:`PrefixCache`) or ``off`` from a ``prefix_sharing``
    argument (True: batched, False: off)."""
    if prefix_sharing is True:
        return "batched"
    if prefix_sharing is False:
        return "off"
    if prefix_sharing not in SHARING_MODES:
        raise ValueError(f"unknown prefix_sharing {prefix_sharing!r}: use True, False or one of {SHARING_MODES}")
    return str(prefix_sharing)


@dataclass
class _Unit:
    name: str
    module: nn.Module
    shared: bool  # no perturbed layer inside: may be replayed
    calls: int = 0
    outputs: dict[int, Any] = field(default_factory=dict)


def prefix_units(model: nn.Module, perturbed: set[int]) -> list[_Unit]:
    """The submodules that can be shared (``shared``: no perturbed layer inside), expanded along the path to the
    perturbed layers (ids in ``perturbed``), in registration order; the perturbed layers themselves excluded."""
    units: list[_Unit] = []

    def contains(module: nn.Module) -> bool:
        return any(id(m) in perturbed for m in module.modules())

    def collect(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers are never called themselves
                collect(child, path + ".")
                continue
            if id(child) in perturbed:
                continue  # the layer itself always runs perturbed
            has = contains(child)
            units.append(_Unit(path, child, shared=not has))
            if has:
                collect(child, path + ".")

    collect(model, "")
    return units


class PrefixCache:
    """Record the main call's prefix outputs, then replay them in the perturbed call."""

    def __init__(self, model: nn.Module, perturbed: list[nn.Module]) -> None:
        self.model = model
        self.perturbed = {id(m) for m in perturbed}
        self.units = prefix_units(model, self.perturbed)
        self._recording = False
        self._forked = False
        self._batch = 0
        self._rows: torch.Tensor | None = None
        self._hooks: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the (cheap, passive unless recording) hooks. Call :meth:`remove` to take them off."""
        for module in self.model.modules():
            if id(module) in self.perturbed:
                self._hooks.append(module.register_forward_pre_hook(self._on_perturbed_layer))
        for unit in self.units:
            if unit.shared:
                self._hooks.append(unit.module.register_forward_hook(self._make_post_hook(unit)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.clear()

    def clear(self) -> None:
        for unit in self.units:
            unit.calls = 0
            unit.outputs.clear()
        self._forked = False

    def _on_perturbed_layer(self, module: nn.Module, args: Any) -> None:
        self._forked = True

    def _make_post_hook(self, unit: _Unit) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._recording:
                return
            if not self._forked:
                # keep only the rows the perturbed call needs; the main call frees the rest as usual
                rows = self._rows
                unit.outputs[unit.calls] = (
                    output if rows is None else map_rows(output, self._batch, lambda t: t[rows.to(t.device)])
                )
            unit.calls += 1

        return hook

    # -- the two calls -------------------------------------------------------------------------------------
    def start_recording(self, batch: int, rows: torch.Tensor) -> None:
        """From now on, remember rows ``rows`` (of a call of ``batch`` rows) of the outputs of shared units that
        finish before the first perturbed layer starts."""
        self.clear()
        self._batch = batch
        self._rows = (
            None if len(rows) == batch and bool((rows == torch.arange(batch, device=rows.device)).all()) else rows
        )
        self._recording = True

    def stop_recording(self) -> None:
        self._recording = False

    @contextlib.contextmanager
    def record(self, batch: int, rows: torch.Tensor) -> Iterator[None]:
        """Around the main call: :meth:`start_recording`, then stop on exit."""
        self.start_recording(batch, rows)
        try:
            yield
        finally:
            self.stop_recording()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Around the perturbed call on the recorded rows: recorded units return their recorded outputs instead
        of computing. Restores every forward on exit: an instance-level ``forward`` that another library
        installed (diffusers' HookRegistry, accelerate) is put back, never deleted."""
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for unit in self.units:
                if unit.outputs:
                    patched.append((unit.module, unit.module.__dict__.get("forward", _MISSING)))
                    self._patch(unit)
            yield
        finally:
            for module, previous in reversed(patched):
                if previous is _MISSING:
                    del module.forward
                else:
                    module.forward = previous
            self.clear()

    @staticmethod
    def _patch(unit: _Unit) -> None:
        original = unit.module.forward
        counter = iter(range(1 << 30))

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = next(counter)
            if call in unit.outputs:
                return unit.outputs[call]
            return original(*args, **kwargs)

        unit.module.forward = forward

    def shared_units(self) -> list[str]:
        """Names of the units replayed in the last perturbed call (for reports and tests)."""
        return [u.name for u in self.units if u.outputs]


class PrefixDedup:
    """One batched call for the main and perturbed rows, with the shared prefix computed for the main rows only.

    Around a call of ``batch + len(rows)`` rows whose last ``len(rows)`` rows are copies of main rows ``rows``
    (:meth:`dedup`), each shared submodule that starts before the first perturbed layer gets the main rows of its
    batch-indexed inputs only, and its output gets those rows' copies appended. From the first perturbed layer on
    every row is computed, batched. Equal to computing all rows throughout (the copies are identical until the
    fork), at the FLOPs of :class:`PrefixCache` and without its second forward pass.

    The caller may also pass the encoder states (text embeddings) with the main rows only: cross-attention layers
    then get the copies' rows appended inside each call (:meth:`complete`), so no copy of them lives through the
    whole forward pass beside the pipeline's own.
    """

    def __init__(self, model: nn.Module, perturbed: list[nn.Module]) -> None:
        self.model = model
        self.perturbed = {id(m) for m in perturbed}
        self.units = [unit for unit in prefix_units(model, self.perturbed) if unit.shared]
        self.cross_attention: list[Any] = [layer.module for layer in attention_layers(model) if layer.kind == "cross"]
        self._active = False
        self._forked = False
        self._batch = 0
        self._total = 0
        self._rows: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._processors: list[tuple[nn.Module, Any]] = []
        self.deduplicated: list[str] = []  # the submodules that computed the main rows only in the last call

    def install(self) -> None:
        """Register the hooks and wrap the cross-attention processors (passive outside :meth:`dedup`). Call
        :meth:`remove` to restore the model."""
        try:
            for module in self.model.modules():
                if id(module) in self.perturbed:
                    self._hooks.append(module.register_forward_pre_hook(self._on_perturbed_layer))
            for unit in self.units:
                pre = self._make_pre_hook(unit)
                self._hooks.append(unit.module.register_forward_pre_hook(pre, with_kwargs=True))
                self._hooks.append(unit.module.register_forward_hook(self._post_hook))
            for module in self.cross_attention:
                self._processors.append((module, module.processor))
                module.set_processor(RowCompletingProcessor(module.processor, self.complete))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module, processor in reversed(self._processors):
            module.set_processor(processor)
        self._processors = []
        self._active = False

    def complete(self, value: Any, rows: int) -> Any:
        """``value`` (e.g. encoder states) for a call of ``rows`` query rows: the copies' rows appended where the
        queries include the copies and ``value`` has the main rows only."""
        if not self._active or rows != self._total:
            return value
        assert self._rows is not None
        return append_rows(value, self._batch, self._rows)

    def start(self, batch: int, rows: torch.Tensor) -> None:
        """Before one model call of ``batch + len(rows)`` rows, the last ones copies of main rows ``rows``."""
        self._batch, self._rows, self._total = batch, rows, batch + len(rows)
        self._forked, self._active = False, True
        self.deduplicated = []

    def stop(self) -> None:
        """After that call (also when it raised): the hooks are passive again."""
        self._active = False

    @contextlib.contextmanager
    def dedup(self, batch: int, rows: torch.Tensor) -> Iterator[None]:
        """:meth:`start` and :meth:`stop` around a block."""
        self.start(batch, rows)
        try:
            yield
        finally:
            self.stop()

    def _on_perturbed_layer(self, module: nn.Module, args: Any) -> None:
        self._forked = True

    def _make_pre_hook(self, unit: _Unit) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if not self._active or self._forked:
                return None
            self.deduplicated.append(unit.name)
            main = lambda t: t[: self._batch]  # noqa: E731
            kwargs = map_rows(kwargs, self._total, main)
            if kwargs.get("batch_size") == self._total:  # an explicit batch size follows the rows it describes
                kwargs["batch_size"] = self._batch
            return map_rows(args, self._total, main), kwargs

        return hook

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self._active or self._forked:  # a shared unit holds no perturbed layer: no fork inside it
            return None
        assert self._rows is not None
        return append_rows(output, self._batch, self._rows)
