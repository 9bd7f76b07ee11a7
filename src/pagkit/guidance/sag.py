"""Self-Attention Guidance (Hong et al., ICCV 2023), PAG's main baseline, as a guidance term.

SAG reads the self-attention map of a layer during the conditional pass, blurs the regions of the predicted
``x0`` that the map attends to most, re-noises the result to ``x_t`` with the predicted noise, runs the model
once more, and guides away from that prediction (Hong et al. Eq. 11 without CFG):

    x0     = (x_t - sqrt(1 - a_t) eps_c) / sqrt(a_t)
    M      = 1[ sum_q mean_h A[h, q, k] > mean_k(.) ]          (upsampled from the token grid to the image)
    x0'    = M * blur(x0) + (1 - M) * x0
    x_t'   = sqrt(a_t) x0' + sqrt(1 - a_t) eps_c
    eps    = eps_c + s (eps_c - eps(x_t'))

``a_t`` (alpha-bar) comes from the step's noise level: ``a_t = 1 / (1 + sigma^2)``. With CFG, pagkit's SAG
term uses the conditional branch (as PAG does); diffusers' SAG pipeline uses the unconditional one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagkit.attention.ops import gaussian_blur, token_grid
from pagkit.guidance.rules import check_scale
from pagkit.guidance.schedules import CONSTANT, Schedule, Step, parse_schedule
from pagkit.guidance.term import COND, Branch, Term
from pagkit.interventions.attention import mirror_signature
from pagkit.layers import select_layers


@dataclass(frozen=True)
class SAG(Term):
    """Self-attention guidance with scale ``s`` (0: off), reading the map of ``layer`` (a layer spec).

    ``blur_sigma`` is the Gaussian blur of ``x0`` in pixels (Hong et al. use 1 with a 9-tap kernel; pagkit's
    blur has radius ceil(3 sigma)). A spec naming several layers uses the union of their masks. Its branch is
    sequential (its input depends on the conditional prediction): the engine runs it after the batched call.
    """

    scale: float = 0.75
    layer: str | Sequence[str] = "mid"
    blur_sigma: float = 1.0
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("sag scale", self.scale)
        if not (math.isfinite(self.blur_sigma) and self.blur_sigma > 0):
            raise ValueError(f"sag blur sigma must be a positive number, got {self.blur_sigma}")

    @classmethod
    def make(
        cls,
        scale: float = 0.75,
        layer: str | Sequence[str] = "mid",
        blur_sigma: float = 1.0,
        schedule: str | Schedule | None = None,
    ) -> SAG:
        return cls(scale, layer, blur_sigma, parse_schedule(schedule))

    def branches(self) -> tuple[Branch, ...]:
        return ()

    def scale_at(self, step: Step) -> float:
        """The multiplier of ``eps_c - eps_sag`` at this step (0 means: skip the extra pass)."""
        return self.scale * self.schedule(step)

    def weight(self, step: Step) -> float:
        return self.scale_at(step)

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        return weight * (preds[COND] - preds["sag"])

    def runner(self, model: nn.Module) -> SAGRunner:
        return SAGRunner(self, model)


class SAGRunner:
    """SAG's two stages on one model: record the conditional rows' maps, then the degraded-input pass."""

    def __init__(self, term: SAG, model: nn.Module) -> None:
        self.term = term
        self.layers = select_layers(model, term.layer)
        joint = [layer.name for layer in self.layers if layer.kind != "self"]
        if joint:
            raise ValueError(f"SAG reads a self-attention map; {joint[0]} is a joint (MMDiT) attention layer")
        self.records: list[CapturedMap] = []
        self.alpha_bar = 1.0

    @contextlib.contextmanager
    def recording(self, x: torch.Tensor, t: Any, step: Step, batch: int, cond_rows: torch.Tensor) -> Iterator[None]:
        self.records = []
        if self.term.scale_at(step) == 0.0:
            yield
            return
        self.alpha_bar = alpha_bar_of(step)  # fail before any model call
        rows = torch.zeros(batch, dtype=torch.bool, device=x.device)
        rows[cond_rows] = True
        with captured_attention(self.layers, rows) as records:
            self.records = records
            yield

    def contribution(self, x: torch.Tensor, t: Any, step: Step, eps_c: torch.Tensor, predict: Any) -> torch.Tensor:
        weight = self.term.scale_at(step)
        if weight == 0.0:
            return torch.zeros_like(eps_c)
        mask = None
        for record in self.records:
            if record.probs is None:
                raise RuntimeError("SAG: the chosen attention layer was not called during the model's forward pass")
            m = sag_mask(record.probs, record.grid, (int(x.shape[-2]), int(x.shape[-1])))
            mask = m if mask is None else torch.maximum(mask, m)
        assert mask is not None
        x_degraded = sag_degrade(x, eps_c, self.alpha_bar, mask, self.term.blur_sigma)
        return self.term.combine({COND: eps_c, "sag": predict(x_degraded, t)}, weight)


def attention_probs(attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax attention map ``[B, heads, N, N]`` of a diffusers self-attention layer on its input.

    ``hidden_states`` is ``[B, C, H, W]`` or ``[B, N, C]``; the layer's norms are applied as its processor does.
    """
    x = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        x = attn.spatial_norm(x, temb)
    if x.ndim == 4:
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    heads = attn.heads
    b, n, _ = x.shape
    q = attn.to_q(x).view(b, n, heads, -1).transpose(1, 2)
    k = attn.to_k(x).view(b, n, heads, -1).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)


class CapturedMap:
    """The attention map of chosen rows, recorded by :class:`CaptureProcessor` during one model call."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # bool [B]: which rows to record
        self.probs: torch.Tensor | None = None  # [R, heads, N, N]
        self.grid: tuple[int, int] | None = None


class CaptureProcessor:
    """Wraps a layer's processor: records the attention map of ``record.rows``; the output is unchanged."""

    def __init__(self, original: Any, record: CapturedMap) -> None:
        self.original = original
        self.record = record
        mirror_signature(self, original)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self.record.rows
        if rows is not None and len(rows) < hidden_states.shape[0]:  # weak branches' rows appended after them
            rows = torch.cat([rows, rows.new_zeros(hidden_states.shape[0] - len(rows))])
        if rows is not None:
            if len(rows) != hidden_states.shape[0]:
                raise RuntimeError(
                    f"SAG: the attention layer got {hidden_states.shape[0]} rows but {len(rows)} were declared"
                )
            temb = kwargs.get("temb")
            if isinstance(temb, torch.Tensor) and temb.shape[0] == len(rows):
                temb = temb[rows]
            self.record.probs = attention_probs(attn, hidden_states[rows.to(hidden_states.device)], temb)
            if hidden_states.ndim == 4:
                self.record.grid = (hidden_states.shape[2], hidden_states.shape[3])
        return self.original(attn, hidden_states, *args, **kwargs)


@contextlib.contextmanager
def captured_attention(layers: Sequence[Any], rows: torch.Tensor) -> Iterator[list[CapturedMap]]:
    """Record the maps of ``rows`` (bool ``[B]``) in ``layers`` (``AttentionLayer``s); restore on exit."""
    records: list[CapturedMap] = []
    originals = []
    try:
        for layer in layers:
            record = CapturedMap()
            record.rows = rows
            module = layer.module
            originals.append((module, module.processor))
            module.set_processor(CaptureProcessor(module.processor, record))
            records.append(record)
        yield records
    finally:
        for module, processor in reversed(originals):
            module.set_processor(processor)


def sag_mask(probs: torch.Tensor, grid: tuple[int, int] | None, size: tuple[int, int]) -> torch.Tensor:
    """SAG's mask ``[B, 1, H, W]`` (0/1) from a map ``[B, heads, N, N]``: keys attended above the mean."""
    # mean over heads, then total attention each key receives (sum over queries)
    received = probs.mean(1).sum(1)  # [B, N]
    mask = (received > received.mean(-1, keepdim=True)).to(probs.dtype)
    gh, gw = token_grid(probs.shape[-1], grid, "SAG (to place its attention mask)")
    return F.interpolate(mask.view(-1, 1, gh, gw), size=size, mode="nearest")


def sag_degrade(
    x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, mask: torch.Tensor, blur_sigma: float
) -> torch.Tensor:
    """``x_t'``: blur the predicted ``x0`` where ``mask`` is 1 and re-noise it with ``eps`` (all ``[B, C, H, W]``)."""
    sa, sb = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    x0 = (x - sb * eps) / sa
    mask = mask.to(x.dtype)
    x0_degraded = mask * gaussian_blur(x0, blur_sigma) + (1.0 - mask) * x0
    return sa * x0_degraded + sb * eps


def alpha_bar_of(step: Step) -> float:
    """alpha-bar of a VP model at the step's noise level: ``1 / (1 + sigma^2)``."""
    if step.sigma is None or not math.isfinite(step.sigma):
        raise ValueError(
            "SAG needs the noise level of each step (Step.sigma) to predict x0: call the guided denoiser "
            "from pagkit's sampling loop, or pass Step(sigma=...)"
        )
    return 1.0 / (1.0 + step.sigma**2)
