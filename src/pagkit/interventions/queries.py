"""Attention ops of the PAG family that need queries and keys: SEG's query blur and head-level PAG.

Both are :class:`~pagkit.attention.ops.Perturbation` ops, so they run through the one
:class:`~pagkit.interventions.attention.AttentionPerturbation` intervention (fast path for classic layers,
``scaled_dot_product_attention`` interception for the others) and on joint attention through ``attend_joint``
(image queries only; text queries attend as before).

- ``seg`` (Hong 2024, Smoothed Energy Guidance, arXiv 2408.00760): the image queries, seen as a ``C``-channel
  image over the layer's token grid, are Gaussian-blurred with ``sigma`` (in tokens) before the softmax. The
  kernel follows the paper's code: size ``ceil(6 sigma) + 1`` (odd), reflect padding, clamped to the grid.
  ``sigma = inf`` replaces every query by the mean query (the limit of the blur: every query attends alike).
  The token grid: a U-Net layer's own resolution, else the model input's patch grid (``[B, C, F, H, W]`` video:
  per frame), else a square grid; anything else is an error naming the layer.
- ``heads`` (head-level PAG): the identity map on the chosen heads only; the other heads attend normally.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagkit.attention.ops import Perturbation, Soft
from pagkit.interventions.attention import AttentionPerturbation

Identity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class TokenGridError(ValueError):
    """A perturbation that needs the token grid got a token count it cannot place on one."""


def seg_kernel_size(sigma: float) -> int:
    """The paper code's kernel size: ``ceil(6 sigma) + 1``, made odd."""
    k = math.ceil(6 * sigma)
    return k + 1 - k % 2


def blur_tokens(x: torch.Tensor, grid: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Blur ``x: [B, N, C]`` over the token grid ``(h, w)`` or ``(f, h, w)`` (per frame) with a Gaussian of
    ``sigma`` tokens; ``sigma = inf``: every token becomes the mean token of its frame."""
    b, n, c = x.shape
    h, w = grid[-2:]
    frames = n // (h * w)
    img = x.reshape(b * frames, h, w, c).permute(0, 3, 1, 2)
    if math.isinf(sigma):
        out = img.mean(dim=(-2, -1), keepdim=True).expand_as(img)
    else:
        side = min(h, w)
        k = min(seg_kernel_size(sigma), side - (side % 2 - 1))  # at most the grid (odd), as the reference code
        half = (k - 1) / 2
        t = torch.linspace(-half, half, steps=k, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(x.dtype)
        kernel2d = (kernel[:, None] @ kernel[None, :]).expand(c, 1, k, k)
        pad = k // 2
        padded = F.pad(img, [pad] * 4, mode="reflect") if pad else img
        out = F.conv2d(padded, kernel2d, groups=c)
    return out.permute(0, 2, 3, 1).reshape(b, n, c)


@dataclass
class SEGBlur(Perturbation):
    """Smoothed Energy Guidance: Gaussian blur (``sigma`` tokens; ``inf``: the mean) of the queries."""

    name: str = "seg"
    sigma: float = 10.0
    input_grid: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._check("sigma", self.sigma > 0.0 and not math.isnan(self.sigma), "positive (inf: uniform)")

    def grid_for(self, n: int, grid: tuple[int, int] | None) -> tuple[int, ...]:
        if grid is not None and grid[0] * grid[1] == n:
            return grid
        g = self.input_grid
        if g is not None and math.prod(g) == n:
            return g
        if g is not None and len(g) == 3 and n % (g[1] * g[2]) == 0:  # frames regrouped by the model
            return g[1:]
        side = math.isqrt(n)
        if side * side == n:
            return side, side
        raise TokenGridError(
            f"SEG blurs queries over the token grid, but a layer has {n} image tokens, which is neither the "
            f"model input's grid {g} nor square: choose layers whose tokens form the input's grid"
        )

    def blur(self, q: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """Blurred queries ``[B, H, N, D]`` (every head's channels blurred alike)."""
        b, h, n, d = q.shape
        flat = q.permute(0, 2, 1, 3).reshape(b, n, h * d)
        out = blur_tokens(flat, self.grid_for(n, grid), self.sigma)
        return out.reshape(b, n, h, d).permute(0, 2, 1, 3)

    def attend(self, q, k, v, scale, grid=None):
        return F.scaled_dot_product_attention(self.blur(q, grid).to(k.dtype), k, v, scale=scale)

    def attend_joint(
        self,
        sdpa: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float,
        img_q: slice,
        identity: Identity,
    ) -> torch.Tensor:
        """Joint attention: blur the image queries only; every query attends to every key as before."""
        q2 = q.clone()
        q2[:, :, img_q] = self.blur(q[:, :, img_q], None).to(q.dtype)
        return sdpa(q2, k, v, attn_mask=attn_mask, scale=scale)


def _parse_heads(heads: Any) -> tuple[int, ...]:
    if isinstance(heads, str):
        items = [s for s in heads.replace(";", ",").replace("|", ",").split(",") if s.strip()]
        try:
            heads = [int(s) for s in items]
        except ValueError:
            raise ValueError(f"head-PAG heads must be integers, e.g. 0 or 0,1; got {heads!r}") from None
    if isinstance(heads, (int, float)):
        heads = [int(heads)]
    out = tuple(sorted({int(h) for h in heads}))
    if not out or out[0] < 0:
        raise ValueError(f"head-PAG needs at least one head index >= 0, got {heads!r}")
    return out


@dataclass
class Heads(Perturbation):
    """Head-level PAG: the identity map on ``heads`` (indices), normal attention on the other heads."""

    name: str = "heads"
    heads: Any = (0,)

    def __post_init__(self) -> None:
        self.heads = _parse_heads(self.heads)

    def _split(self, n_heads: int) -> tuple[list[int], list[int]]:
        bad = [h for h in self.heads if h >= n_heads]
        if bad:
            raise ValueError(
                f"head-PAG: head {bad[0]} does not exist: the layer has {n_heads} heads (0..{n_heads - 1})"
            )
        chosen = list(self.heads)
        return chosen, [h for h in range(n_heads) if h not in self.heads]

    def attend(self, q, k, v, scale, grid=None):
        _, rest = self._split(v.shape[1])
        out = v.clone()
        if rest:
            out[:, rest] = F.scaled_dot_product_attention(q[:, rest], k[:, rest], v[:, rest], scale=scale).to(v.dtype)
        return out

    def attend_joint(
        self,
        sdpa: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float,
        img_q: slice,
        identity: Identity,
    ) -> torch.Tensor:
        """Joint attention: the chosen heads get PAG's joint identity (image-image block), the rest attend."""
        chosen, rest = self._split(q.shape[1])

        def heads_of(m: torch.Tensor | None, idx: list[int]) -> torch.Tensor | None:
            return m[:, idx] if m is not None and m.ndim == 4 and m.shape[1] == q.shape[1] > 1 else m

        out = torch.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=v.dtype, device=v.device)
        if rest:
            out[:, rest] = sdpa(q[:, rest], k[:, rest], v[:, rest], attn_mask=heads_of(attn_mask, rest), scale=scale)
        out[:, chosen] = identity(q[:, chosen], k[:, chosen], v[:, chosen], heads_of(attn_mask, chosen))
        return out


@dataclass
class SoftJoint(Soft):
    """SoftPAG's op (``soft:alpha``) that also serves joint attention: ``(1 - alpha)`` the attention as it is plus
    ``alpha`` PAG's joint identity (image-image block), text queries unchanged."""

    def attend_joint(
        self,
        sdpa: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float,
        img_q: slice,
        identity: Identity,
    ) -> torch.Tensor:
        full = sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        return torch.lerp(full, identity(q, k, v, attn_mask).to(full.dtype), self.alpha)


def _input_grid(model: nn.Module, sample: torch.Tensor) -> tuple[int, ...] | None:
    """The patch grid of a model input: ``(h, w)`` for ``[B, C, H, W]``, ``(f, h, w)`` for video."""
    config = getattr(model, "config", None)
    p = getattr(config, "patch_size", None)
    p = p[-1] if isinstance(p, (tuple, list)) else p
    p = p if isinstance(p, int) and p >= 1 else 1
    pt = getattr(config, "patch_size_t", None)
    if pt is None:
        full = getattr(config, "patch_size", None)
        pt = full[0] if isinstance(full, (tuple, list)) and len(full) == 3 else 1
    if sample.ndim == 4:
        return sample.shape[2] // p, sample.shape[3] // p
    if sample.ndim == 5:
        frames_first = type(model).__name__ == "CogVideoXTransformer3DModel"
        f = sample.shape[1] if frames_first else sample.shape[2]
        return max(f // (pt or 1), 1), sample.shape[-2] // p, sample.shape[-1] // p
    return None


class QueryPerturbation(AttentionPerturbation):
    """:class:`AttentionPerturbation` whose op also learns the model input's token grid (SEG)."""

    def install(self, model: nn.Module, key: int) -> contextlib.ExitStack:
        stack = super().install(model, key)
        op = self.op
        if isinstance(op, SEGBlur):

            def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                if isinstance(sample, torch.Tensor):
                    op.input_grid = _input_grid(module, sample)

            try:
                hook = model.register_forward_pre_hook(record, with_kwargs=True)
            except BaseException:
                stack.close()
                raise
            stack.callback(hook.remove)
        return stack


def head_list(heads: str | Sequence[int] | int) -> tuple[int, ...]:
    """Parse a head selection (``"0"``, ``"0,2"``, ``[1, 3]``)."""
    return _parse_heads(heads)
