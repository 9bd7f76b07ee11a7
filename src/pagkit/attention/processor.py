"""A swappable attention op: wrap a layer's diffusers processor so chosen batch rows run a perturbation.

Which rows are perturbed is passed explicitly through a :class:`RowPlan` (set by the caller around one model
call), never guessed from the batch position. Rows not marked run the layer's original processor unchanged;
marked rows run :func:`perturbed_self_attention` (or :func:`perturbed_joint_attention` for MMDiT layers).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagkit.attention.ops import Perturbation


class BatchLayoutError(RuntimeError):
    """The batch reaching an attention layer does not match the rows the caller declared."""


class RowPlan:
    """Which rows of the current model call are perturbed: a bool mask ``[B]``, or None for none."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    @contextlib.contextmanager
    def perturb(self, rows: torch.Tensor | None) -> Iterator[None]:
        """Mark ``rows`` (bool ``[B]``) as perturbed for the model calls inside the block."""
        if rows is not None and (rows.dtype != torch.bool or rows.ndim != 1):
            raise TypeError(f"rows must be a 1-D bool mask, got {rows.dtype} {tuple(rows.shape)}")
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous


def _take(value: Any, index: torch.Tensor, batch: int) -> Any:
    """Select batch rows of a tensor whose leading dim is the batch; pass anything else through."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[index]
    return value


def _merge(keep: torch.Tensor, ptb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if bool(mask[-len(ptb) :].all()):  # the common layout: perturbed rows last
        return torch.cat([keep, ptb.to(keep.dtype)])
    out = keep.new_empty((len(mask), *keep.shape[1:]))
    out[~mask] = keep
    out[mask] = ptb.to(keep.dtype)
    return out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _unheads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _query_key(attn: nn.Module, x: torch.Tensor, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head queries and keys of ``x`` through the layer's ``{prefix}q/k`` projections and qk-norms
    (``prefix=""``: ``to_q``/``norm_q``; ``prefix="add_"``: ``add_q_proj``/``norm_added_q``)."""
    proj = ("to_q", "to_k") if not prefix else ("add_q_proj", "add_k_proj")
    norms = ("norm_q", "norm_k") if not prefix else ("norm_added_q", "norm_added_k")
    out = []
    for p, n in zip(proj, norms, strict=True):
        t = _heads(getattr(attn, p)(x), attn.heads)
        norm = getattr(attn, n, None)
        out.append(norm(t) if norm is not None else t)
    return out[0], out[1]


def perturbed_self_attention(
    attn: nn.Module, hidden_states: torch.Tensor, op: Perturbation, temb: torch.Tensor | None = None
) -> torch.Tensor:
    """One diffusers self-attention layer with its map replaced by ``op`` (norms and residual kept).

    ``hidden_states`` is ``[B, C, H, W]`` or ``[B, N, C]``. For the identity op this computes
    ``to_out(to_v(norm(x)))`` (+ residual): no Q, no K, no softmax.
    """
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    grid = None
    ndim = hidden_states.ndim
    if ndim == 4:
        b, c, h, w = hidden_states.shape
        grid = (h, w)
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    heads = attn.heads
    value = _heads(attn.to_v(hidden_states), heads)
    if op.needs_qk:
        query, key = _query_key(attn, hidden_states)
        out = op.attend(query, key, value, attn.scale, grid)
    else:
        out = op.attend(None, None, value, attn.scale, grid)
    out = _unheads(out.to(value.dtype))
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(residual.shape)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / attn.rescale_output_factor


def perturbed_joint_attention(
    attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor, op: Perturbation
) -> tuple[torch.Tensor, torch.Tensor]:
    """An MMDiT joint-attention layer with the image-image part perturbed and image-text attention kept.

    Image query i attends to the text keys and to its own image key only (the identity on the image-image
    block), computed as an ``[N, 1 + T]`` softmax: no dense ``N x N`` mask. Text queries attend to everything,
    as in the unperturbed layer. The model's qk-norms are applied.
    """
    if op.name != "identity":
        raise NotImplementedError(f"joint attention supports the identity perturbation only, not {op.name!r}")
    heads = attn.heads
    q, k = _query_key(attn, hidden_states)
    v = _heads(attn.to_v(hidden_states), heads)
    tq, tk = _query_key(attn, context, prefix="add_")
    tv = _heads(attn.add_v_proj(context), heads)
    scale = attn.scale
    # image queries: [own key | text keys]
    self_logit = (q * k).sum(-1, keepdim=True) * scale
    text_logit = q @ tk.transpose(-1, -2) * scale
    p = torch.cat([self_logit, text_logit], dim=-1).softmax(-1)
    img = p[..., :1] * v + p[..., 1:] @ tv
    # text queries: unchanged joint attention over [image keys | text keys]
    txt = F.scaled_dot_product_attention(tq, torch.cat([k, tk], 2), torch.cat([v, tv], 2))
    img = attn.to_out[1](attn.to_out[0](_unheads(img).to(hidden_states.dtype)))
    txt = _unheads(txt).to(context.dtype)
    if not getattr(attn, "context_pre_only", True):
        txt = attn.to_add_out(txt)
    return img, txt


def mirror_signature(wrapper: Any, original: Any) -> None:
    """diffusers passes a processor only the keyword arguments its ``__call__`` signature names: give
    ``wrapper`` the signature of the processor it wraps (an instance attribute that only ``inspect`` sees;
    Python still calls the class's ``__call__``)."""
    signature = inspect.signature(original.__call__)

    def call(*args: Any, **kwargs: Any) -> Any:
        return type(wrapper).__call__(wrapper, *args, **kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__call__ = call


class PerturbedProcessor:
    """Wraps a layer's original processor; rows marked in ``plan`` run ``op`` instead of attention."""

    def __init__(self, original: Any, op: Perturbation, plan: RowPlan, joint: bool = False) -> None:
        self.original = original
        self.op = op
        self.plan = plan
        self.joint = joint
        mirror_signature(self, original)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mask = self.plan.rows
        if mask is None or not bool(mask.any()):
            return self.original(attn, hidden_states, *args, **kwargs)
        batch = hidden_states.shape[0]
        if batch != len(mask):
            raise BatchLayoutError(
                f"attention layer got a batch of {batch} rows but the caller declared {len(mask)}: this model "
                "reshapes its batch (e.g. video frames); PAG needs the batch to reach attention unchanged"
            )
        if mask.device != hidden_states.device:
            mask = mask.to(hidden_states.device)
        keep_idx, ptb_idx = (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)
        if self.joint:
            return self._joint(attn, hidden_states, mask, keep_idx, ptb_idx, *args, **kwargs)
        keep = None
        if len(keep_idx):
            keep = self.original(
                attn,
                hidden_states[keep_idx],
                *[_take(a, keep_idx, batch) for a in args],
                **{key: _take(v, keep_idx, batch) for key, v in kwargs.items()},
            )
        temb = _take(kwargs.get("temb"), ptb_idx, batch)
        ptb = perturbed_self_attention(attn, hidden_states[ptb_idx], self.op, temb)
        return ptb if keep is None else _merge(keep, ptb, mask)

    def _joint(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        mask: torch.Tensor,
        keep_idx: torch.Tensor,
        ptb_idx: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        batch = hidden_states.shape[0]
        context = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if context is None:
            raise BatchLayoutError("joint attention layer called without encoder_hidden_states")
        img_p, txt_p = perturbed_joint_attention(attn, hidden_states[ptb_idx], context[ptb_idx], self.op)
        if not len(keep_idx):
            return img_p, txt_p
        img_k, txt_k = self.original(
            attn,
            hidden_states[keep_idx],
            *[_take(a, keep_idx, batch) for a in args],
            **{key: _take(v, keep_idx, batch) for key, v in kwargs.items()},
        )
        return _merge(img_k, img_p, mask), _merge(txt_k, txt_p, mask)


class RowCompletingProcessor:
    """Wraps a cross-attention layer's processor: where the query rows include appended copies of conditional
    rows but the encoder states arrived with the main rows only (``complete(encoder_states, query_rows)``
    appends the copies' rows, for this call only), the original processor sees matching batches."""

    def __init__(self, original: Any, complete: Callable[[Any, int], Any]) -> None:
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


@contextlib.contextmanager
def patched_attention(layers: Sequence[Any], op: Perturbation, plan: RowPlan) -> Iterator[None]:
    """Install :class:`PerturbedProcessor` on ``layers`` (``AttentionLayer``s); restore the originals on exit."""
    originals = []
    try:
        for layer in layers:
            module = layer.module
            if isinstance(module.processor, PerturbedProcessor):
                raise RuntimeError(
                    f"layer {layer.name} is already perturbed: PAG is applied twice to the same model; "
                    "remove the first handle (handle.remove()) before applying again"
                )
            originals.append((module, module.processor))
            module.set_processor(PerturbedProcessor(module.processor, op, plan, joint=layer.kind == "joint"))
        yield
    finally:
        for module, processor in reversed(originals):
            module.set_processor(processor)
