"""Perturbed self-attention on chosen layers of any diffusers model (Ahn et al. Sec. 3.3).

For the rows the engine marks (:mod:`pagkit.interventions.rows`), a chosen layer's attention map is replaced by
a perturbation op (the identity for PAG: each token keeps its own value). Two mechanisms, chosen per layer:

- **fast path** (classic ``Attention`` with diffusers' standard processors): the layer's processor is wrapped;
  unmarked rows run the original processor, marked rows compute ``to_out(to_v(x))``: no Q, no K, no softmax.
  SD3-style joint layers (``JointAttnProcessor2_0``) perturb only the image-image block, in an ``[N, 1 + T]``
  softmax (image query i attends to its own key and to the text keys), so the text stream is unchanged.
- **interception** (every other processor, e.g. the ``AttentionModuleMixin`` family of Flux, Wan, LTX,
  QwenImage, HunyuanVideo, CogVideoX): the layer's own processor runs unchanged (rotary embeddings, qk-norms,
  tuples and masks included), and its call of ``F.scaled_dot_product_attention`` is intercepted through a
  ``TorchFunctionMode`` scoped to that layer's forward: the marked rows get the op instead. Joint attention
  (text and image tokens in one sequence) perturbs only the image-image block; text queries attend as before.
  If the layer's attention was not computed through that function (another attention backend, a processor
  that multiplies maps by hand), the call raises: never a silent no-op.

Nothing is replaced that pagkit did not create: processors are restored and hooks removed on exit (also after
an exception), and other hooks (diffusers' HookRegistry, accelerate, peft) stay as they are.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pagkit.attention.ops import Perturbation, make_perturbation
from pagkit.batch import map_rows, shared_rotary
from pagkit.interventions.base import Intervention
from pagkit.interventions.rows import BatchLayoutError, CallRows, current, marked, rows_for
from pagkit.layers import AttentionLayer, select_layers

# classic processors whose math the fast path reproduces exactly
FAST_SELF = frozenset({"AttnProcessor2_0", "AttnProcessor", "SanaLinearAttnProcessor2_0"})
# processors whose self-attention output is to_out(attention(...)) with rotary embeddings or qk-norms inside:
# the identity needs only to_out(to_v(x)); the other ops (which need Q and K) go through interception
FAST_IDENTITY = frozenset(
    {
        "WanAttnProcessor",
        "WanAttnProcessor2_0",
        "LTXVideoAttnProcessor",
        "LTXVideoAttentionProcessor2_0",
        "HunyuanAttnProcessor2_0",
        "AllegroAttnProcessor2_0",
    }
)
FAST_JOINT = frozenset({"JointAttnProcessor2_0"})
# where the text tokens sit in the sequence that a joint processor hands to attention
TEXT_FIRST = frozenset(
    {
        "FluxAttnProcessor",
        "FluxAttnProcessor2_0",
        "FusedFluxAttnProcessor2_0",
        "QwenDoubleStreamAttnProcessor2_0",
        "CogVideoXAttnProcessor2_0",
        "FusedCogVideoXAttnProcessor2_0",
        "AuraFlowAttnProcessor2_0",
        "FusedAuraFlowAttnProcessor2_0",
        "AttnAddedKVProcessor",
        "AttnAddedKVProcessor2_0",
        "Lumina2AttnProcessor2_0",
        "CogView4AttnProcessor",
    }
)
IMAGE_FIRST = frozenset(
    {"JointAttnProcessor2_0", "HunyuanVideoAttnProcessor2_0", "FusedJointAttnProcessor2_0", "MochiAttnProcessor2_0"}
)


class PerturbationError(RuntimeError):
    """A chosen layer cannot be perturbed as asked (its attention path is unknown or not intercepted)."""


# -- the fast path: classic Attention ----------------------------------------------------------------------
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _unheads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _query_key(attn: Any, x: torch.Tensor, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head queries and keys of ``x`` through ``to_q/to_k`` (or ``add_q_proj/add_k_proj``) and qk-norms."""
    proj = ("to_q", "to_k") if not prefix else ("add_q_proj", "add_k_proj")
    norms = ("norm_q", "norm_k") if not prefix else ("norm_added_q", "norm_added_k")
    out = []
    for p, n in zip(proj, norms, strict=True):
        t = _heads(getattr(attn, p)(x), attn.heads)
        norm = getattr(attn, n, None)
        out.append(norm(t) if norm is not None else t)
    return out[0], out[1]


def perturbed_self_attention(
    attn: Any, hidden_states: torch.Tensor, op: Perturbation, temb: torch.Tensor | None = None
) -> torch.Tensor:
    """A classic diffusers self-attention layer with its map replaced by ``op`` (norms and residual kept).

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
    value = _heads(attn.to_v(hidden_states), attn.heads)
    if op.needs_qk:
        query, key = _query_key(attn, hidden_states)
        out = op.attend(query, key, value, attn.scale, grid)
    else:
        out = op.attend(None, None, value, 1.0, grid)
    out = attn.to_out[1](attn.to_out[0](_unheads(out.to(value.dtype))))
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(residual.shape)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def _identity_joint(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    self_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image queries ``q [B, H, N, D]`` attending to their own key and the text keys ``tk [B, H, T, D]`` only
    (the identity on the image-image block), as an ``[N, 1 + T]`` softmax; ``bias`` ``[B|1, H|1, N|1, T]`` is an
    additive mask on the text logits."""
    self_logit = (q.float() * k.float()).sum(-1, keepdim=True) * scale
    text_logit = (q.float() @ tk.float().transpose(-1, -2)) * scale
    if bias is not None:
        text_logit = text_logit + bias
    if self_bias is not None:
        self_logit = self_logit + self_bias
    p = torch.cat([self_logit, text_logit], dim=-1).softmax(-1)
    return (p[..., :1] * v.float() + p[..., 1:] @ tv.float()).to(v.dtype)


def perturbed_joint_attention(
    attn: Any, hidden_states: torch.Tensor, context: torch.Tensor, op: Perturbation
) -> tuple[torch.Tensor, torch.Tensor]:
    """An SD3-style joint-attention layer with the image-image block perturbed; text queries unchanged."""
    if op.name != "identity":
        raise PerturbationError(f"joint attention supports the identity perturbation only, not {op.name!r}")
    q, k = _query_key(attn, hidden_states)
    v = _heads(attn.to_v(hidden_states), attn.heads)
    tq, tk = _query_key(attn, context, prefix="add_")
    tv = _heads(attn.add_v_proj(context), attn.heads)
    img = _identity_joint(q, k, v, tk, tv, attn.scale)
    txt = F.scaled_dot_product_attention(tq, torch.cat([k, tk], 2), torch.cat([v, tv], 2))
    img = attn.to_out[1](attn.to_out[0](_unheads(img).to(hidden_states.dtype)))
    txt = _unheads(txt).to(context.dtype)
    if not getattr(attn, "context_pre_only", True):
        txt = attn.to_add_out(txt)
    return img, txt


def mirror_signature(wrapper: Any, original: Any) -> None:
    """diffusers passes a processor only the keyword arguments its ``__call__`` names: give ``wrapper`` the
    signature of the processor it wraps (an instance attribute that only ``inspect`` sees)."""
    signature = inspect.signature(original.__call__)

    def call(*args: Any, **kwargs: Any) -> Any:
        return type(wrapper).__call__(wrapper, *args, **kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__call__ = call


def _take(value: Any, index: torch.Tensor, batch: int) -> Any:
    """Rows ``index`` of every batch-indexed tensor in ``value`` (tensors, and tuples such as (cos, sin))."""
    return map_rows(value, batch, lambda t: t[index.to(t.device)])


def _take_kwargs(kwargs: dict[str, Any], index: torch.Tensor, batch: int) -> dict[str, Any]:
    """``_take`` over keyword arguments; rotary tables ``[S, D]`` (no batch axis) are never sliced, whatever S."""
    return {k: v if shared_rotary(k, v) else _take(v, index, batch) for k, v in kwargs.items()}


def _merge(keep: torch.Tensor, ptb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = keep.new_empty((len(mask), *keep.shape[1:]))
    out[~mask] = keep
    out[mask] = ptb.to(keep.dtype)
    return out


class FastProcessor:
    """Wraps a classic layer's standard processor: marked rows compute the perturbed layer directly."""

    def __init__(self, original: Any, op: Perturbation, key: int, name: str, joint: bool) -> None:
        self.original = original
        self.op = op
        self.key = key
        self.name = name
        self.joint = joint
        mirror_signature(self, original)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch = hidden_states.shape[0]
        mask = rows_for(self.key, batch, f"layer {self.name}")
        if mask is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        mask = mask.to(hidden_states.device)
        keep_idx, ptb_idx = (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)
        sliced_args = [_take(a, keep_idx, batch) for a in args]
        sliced_kwargs = _take_kwargs(kwargs, keep_idx, batch)
        if self.joint:
            context = kwargs.get("encoder_hidden_states", args[0] if args else None)
            if context is None:
                raise BatchLayoutError(f"joint attention layer {self.name} called without encoder_hidden_states")
            img_p, txt_p = perturbed_joint_attention(attn, hidden_states[ptb_idx], context[ptb_idx], self.op)
            if not len(keep_idx):
                return img_p, txt_p
            img_k, txt_k = self.original(attn, hidden_states[keep_idx], *sliced_args, **sliced_kwargs)
            return _merge(img_k, img_p, mask), _merge(txt_k, txt_p, mask)
        context = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if context is not None and context is not hidden_states:
            raise PerturbationError(f"layer {self.name} received encoder states: it is cross-attention, not self")
        temb = _take(kwargs.get("temb"), ptb_idx, batch)
        ptb = perturbed_self_attention(attn, hidden_states[ptb_idx], self.op, temb)
        if not len(keep_idx):
            return ptb
        keep = self.original(attn, hidden_states[keep_idx], *sliced_args, **sliced_kwargs)
        return _merge(keep, ptb, mask)


# -- interception: any processor -----------------------------------------------------------------------------
def _sdpa_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    out = dict(zip(names, args, strict=False))
    out.update(kwargs)
    return out


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as an additive float bias (bool: True = attend)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _rows_of(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    if t is None or t.ndim < 4 or t.shape[0] == 1:
        return t
    return t[index]


class _Intercept(TorchFunctionMode):
    """Active during one perturbed layer's forward: applies ``layer.attend`` to its attention calls."""

    def __init__(self, layer: InterceptedLayer) -> None:
        super().__init__()
        self.layer = layer
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.layer.attend(func, _sdpa_args(args, kwargs))
        return func(*args, **kwargs)


class InterceptedLayer:
    """Hooks on one attention module that perturb its attention call for the marked rows."""

    def __init__(self, layer: AttentionLayer, op: Perturbation, key: int, parent: nn.Module | None) -> None:
        self.layer = layer
        self.module = layer.module
        self.op = op
        self.key = key
        self.processor = type(getattr(self.module, "processor", None)).__name__
        self.single_stream = layer.kind == "single"
        self._mode: _Intercept | None = None
        self._mask: torch.Tensor | None = None
        self._text: int | None = None  # text tokens handed to the layer as encoder states
        self._hidden: int | None = None  # tokens of the layer's own input
        self._sample_calls = 0

    def install(self) -> list[Any]:
        return [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            return
        mask = rows_for(self.key, hidden.shape[0], f"layer {self.layer.name}")
        if mask is None:
            return
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is hidden:  # Lumina2 passes the layer's own input as "encoder states": self-attention
            context = None
        self._text = context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        assert isinstance(hidden, torch.Tensor)
        self._hidden = hidden.shape[1] if hidden.ndim == 3 else None
        self._mask = mask.to(hidden.device)
        self._sample_calls = 0
        self._mode = _Intercept(self)
        self._mode.__enter__()

    def _after(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        mode, self._mode = self._mode, None
        if mode is None:
            return
        mode.__exit__(None, None, None)
        self._mask = None
        if output is not None and mode.calls == 0:
            raise PerturbationError(
                f"layer {self.layer.name} ({type(self.module).__name__} with {self.processor}) did not compute its "
                "attention through torch's scaled_dot_product_attention, so pagkit cannot perturb it: use "
                "diffusers' native attention backend (model.set_attention_backend('native')) or its default processor"
            )

    def _text_span(self, nq: int, nk: int) -> tuple[int, bool]:
        """(text tokens T, text first?) in the sequence of this attention call; T = 0 for pure self-attention."""
        plan = current()
        known = self.processor in TEXT_FIRST or self.processor in IMAGE_FIRST
        if self._text is not None and (known or self.layer.kind == "joint"):
            # the processor joins the layer's input and the text: the text is what exceeds the input
            text = max(nk, nq) - self._hidden if self._hidden is not None else self._text
        elif self._text is not None:
            raise PerturbationError(
                f"layer {self.layer.name} attends to encoder states ({self.processor}): it is cross-attention; "
                "PAG perturbs self-attention"
            )
        elif (self.single_stream or known) and plan is not None and plan.image_tokens and nq > plan.image_tokens:
            text = nq - plan.image_tokens  # one stream of text and image tokens (Flux single blocks, Lumina2)
        else:
            return 0, False
        if text <= 0:
            return 0, False
        if self.processor in TEXT_FIRST:
            return text, True
        if self.processor in IMAGE_FIRST:
            return text, False
        raise PerturbationError(
            f"layer {self.layer.name}: pagkit does not know where {self.processor} puts the text tokens of its joint "
            "attention, so it cannot perturb the image-image part only; choose another layer"
        )

    def attend(self, sdpa: Callable[..., torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
        q, k, v = a["query"], a["key"], a["value"]
        mask = self._mask
        assert mask is not None
        if q.shape[0] == 1 and len(mask) > 1 and self._sample_calls < len(mask):  # one call per row (Mochi)
            mask = mask[self._sample_calls : self._sample_calls + 1]
            self._sample_calls += 1
        if q.shape[0] != len(mask):
            if len(mask) % q.shape[0] == 0 or q.shape[0] % len(mask):
                raise BatchLayoutError(
                    f"layer {self.layer.name} computes attention on {q.shape[0]} rows, not on the {len(mask)} rows "
                    "of the layer's input (e.g. one attention call per image): pagkit cannot map its rows"
                )
            mask = mask.repeat_interleave(q.shape[0] // len(mask))
        if a.get("is_causal") or a.get("dropout_p", 0.0):
            raise PerturbationError(f"layer {self.layer.name}: causal or dropout attention cannot be perturbed")
        extra = {key: a[key] for key in ("scale", "enable_gqa") if key in a}
        attn_mask = a.get("attn_mask")
        keep_idx, ptb_idx = (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)
        out = torch.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=v.dtype, device=v.device)
        if len(keep_idx):
            out[keep_idx] = sdpa(
                q[keep_idx], k[keep_idx], v[keep_idx], attn_mask=_rows_of(attn_mask, keep_idx), **extra
            )
        qp, kp, vp = q[ptb_idx], k[ptb_idx], v[ptb_idx]
        if vp.shape[1] != qp.shape[1]:  # grouped-query attention: share each key/value head
            kp = kp.repeat_interleave(qp.shape[1] // kp.shape[1], dim=1)
            vp = vp.repeat_interleave(qp.shape[1] // vp.shape[1], dim=1)
        out[ptb_idx] = self._perturbed(sdpa, qp, kp, vp, _rows_of(attn_mask, ptb_idx), a.get("scale"))
        return out

    def _perturbed(
        self,
        sdpa: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        plain: bool = False,
    ) -> torch.Tensor:
        nq, nk = q.shape[2], k.shape[2]
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        text, text_first = self._text_span(nq, nk)
        if text == 0:
            if nq != nk:
                raise PerturbationError(
                    f"layer {self.layer.name} attends {nq} queries to {nk} keys: it is cross-attention, not self"
                )
            if self.op.needs_qk:
                return self.op.attend(q, k, v, scale, _grid(self.layer, nq)).to(v.dtype)
            return self.op.attend(None, None, v, scale, None).to(v.dtype)
        joint = None if plain else getattr(self.op, "attend_joint", None)
        if joint is not None:  # ops of the PAG family with their own joint rule (pagkit.interventions.queries)
            image = (slice(text, nk) if text_first else slice(0, nk - text)) if nq == nk else slice(0, nq)
            identity = lambda q_, k_, v_, m_: self._perturbed(sdpa, q_, k_, v_, m_, scale, plain=True)  # noqa: E731
            return joint(sdpa, q, k, v, attn_mask, scale, image, identity)
        if self.op.name != "identity" and not plain:
            raise PerturbationError(f"joint attention supports the identity perturbation only, not {self.op.name!r}")
        img_k = slice(text, nk) if text_first else slice(0, nk - text)
        txt_k = slice(0, text) if text_first else slice(nk - text, nk)
        queries_have_text = nq == nk
        img_q = img_k if queries_have_text else slice(0, nq)
        bias = _bias(attn_mask, torch.float32)
        out = torch.empty((q.shape[0], q.shape[1], nq, v.shape[3]), dtype=v.dtype, device=v.device)
        text_bias = self_bias = None
        if bias is not None:  # an additive mask applies to every logit, the kept own-key one included
            bq = bias if bias.shape[-2] == 1 else bias[..., img_q, :]
            text_bias = bq[..., txt_k]
            own = bq[..., img_k][..., : bq.shape[-2] if bq.shape[-2] > 1 else None]
            self_bias = own.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) if bq.shape[-2] > 1 else own.transpose(-1, -2)
        k_img = k[:, :, img_k] if queries_have_text else k[:, :, img_k][:, :, :nq]
        v_img = v[:, :, img_k] if queries_have_text else v[:, :, img_k][:, :, :nq]
        out[:, :, img_q] = _identity_joint(
            q[:, :, img_q], k_img, v_img, k[:, :, txt_k], v[:, :, txt_k], scale, text_bias, self_bias
        )
        if queries_have_text:  # text queries: the unperturbed attention over every key
            tmask = attn_mask if attn_mask is None or attn_mask.shape[-2] == 1 else attn_mask[..., txt_k, :]
            out[:, :, txt_k] = sdpa(q[:, :, txt_k], k, v, attn_mask=tmask, scale=scale)
        return out


def _grid(layer: AttentionLayer, n: int) -> tuple[int, int] | None:
    r = layer.resolution
    return (r, r) if r and r * r == n else None


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


class AttentionPerturbation(Intervention):
    """Replace the attention map of ``layers`` by ``op`` (PAG: the identity) on the marked rows."""

    def __init__(self, layers: str | Sequence[str] = "mid", op: str | Perturbation = "identity") -> None:
        self.layers = layers
        self.op = make_perturbation(op)

    def __repr__(self) -> str:
        return f"AttentionPerturbation(layers={self.layers!r}, op={self.op.name!r})"

    def resolve(self, model: nn.Module) -> list[AttentionLayer]:
        return select_layers(model, self.layers)

    def targets(self, model: nn.Module) -> list[nn.Module]:
        return [layer.module for layer in self.resolve(model)]

    def install(self, model: nn.Module, key: int) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        try:
            modules = _parents(model)
            for layer in self.resolve(model):
                module: Any = layer.module
                processor = getattr(module, "processor", None)
                name = type(processor).__name__
                fast = (name in FAST_SELF and layer.kind == "self") or (name in FAST_JOINT and layer.kind == "joint")
                fast = fast or (name in FAST_IDENTITY and layer.kind == "self" and not self.op.needs_qk)
                if fast and hasattr(module, "set_processor") and (not self.op.needs_qk or layer.kind == "self"):
                    wrapper = FastProcessor(processor, self.op, key, layer.name, joint=layer.kind == "joint")
                    module.set_processor(wrapper)
                    stack.callback(module.set_processor, processor)
                    continue
                parent = modules.get(layer.name.rsplit(".", 1)[0]) if "." in layer.name else None
                hooks = InterceptedLayer(layer, self.op, key, parent).install()
                for hook in hooks:
                    stack.callback(hook.remove)
        except BaseException:
            stack.close()
            raise
        return stack


@contextlib.contextmanager
def perturbed(
    model: nn.Module, layers: str | Sequence[str], rows: torch.Tensor, op: str | Perturbation = "identity"
) -> Iterator[None]:
    """Run ``model`` with ``layers`` perturbed on ``rows`` (bool ``[B]`` of the calls inside the block)."""
    with AttentionPerturbation(layers, op).install(model, 0), marked(CallRows(len(rows), {0: rows})):
        yield
